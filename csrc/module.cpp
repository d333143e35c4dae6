// The Python module pretrain_kernels._C: loading it runs the TORCH_LIBRARY registrations.
// It exposes build information only; every kernel is reached through torch.ops.
#include <Python.h>

#include <ATen/Parallel.h>

#include <atomic>
#include <string>

#include "cpu/cpu_isa.h"

#ifndef PK_CUDA_ARCHS
#define PK_CUDA_ARCHS ""
#endif
#ifndef PK_TORCH_VERSION
#define PK_TORCH_VERSION "unknown"
#endif

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef PK_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
#ifdef _OPENMP
  const char* cpu_parallel = "openmp";
#else
  const char* cpu_parallel = "none (kernels run on the calling thread)";
#endif
  return Py_BuildValue("{s:O,s:s,s:s,s:s,s:s,s:s}", "with_cuda", with_cuda ? Py_True : Py_False, "cuda_archs",
                       PK_CUDA_ARCHS, "cpu_isa", pk::cpu::isa_name(pk::cpu::cpu_isa()), "cpu_parallel", cpu_parallel, "torch_version",
                       PK_TORCH_VERSION, "compiler",
#if defined(__clang__)
                       "clang " __clang_version__
#elif defined(__GNUC__)
                       "gcc " __VERSION__
#else
                       "unknown"
#endif
  );
}

// How many threads at::parallel_for spreads 64 one-item chunks over when called from this
// extension. at::parallel_for is a header template, so it is parallel only when the extension
// itself was compiled with the CPU backend of torch (OpenMP on Linux); the kernels use it the
// same way, so this is what they get.
PyObject* parallel_threads(PyObject*, PyObject*) {
  std::atomic<int64_t> seen{0};
  Py_BEGIN_ALLOW_THREADS
  at::parallel_for(0, 64, 1, [&](int64_t, int64_t) {
    seen.fetch_or(int64_t(1) << (at::get_thread_num() & 63));
    // Long enough that every thread of the pool picks up a chunk.
    volatile double x = 0;
    for (int i = 0; i < 200000; ++i) x = x + 1e-9 * i;
  });
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(__builtin_popcountll(static_cast<uint64_t>(seen.load())));
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of the extension contains."},
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "Number of threads an at::parallel_for of the extension's kernels runs on."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pretrain-kernels native ops (see torch.ops.pretrain_kernels)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
