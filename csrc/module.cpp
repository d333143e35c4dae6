// The Python module pretrain_kernels._C: loading it runs the TORCH_LIBRARY registrations.
// It exposes build information only; every kernel is reached through torch.ops.
#include <Python.h>

#include <string>

#ifndef PK_CUDA_ARCHS
#define PK_CUDA_ARCHS ""
#endif
#ifndef PK_TORCH_VERSION
#define PK_TORCH_VERSION "unknown"
#endif
#ifndef PK_CPU_ISA
#define PK_CPU_ISA "generic"
#endif

namespace {

PyObject* build_info(PyObject*, PyObject*) {
#ifdef PK_WITH_CUDA
  const bool with_cuda = true;
#else
  const bool with_cuda = false;
#endif
  return Py_BuildValue("{s:O,s:s,s:s,s:s,s:s}", "with_cuda", with_cuda ? Py_True : Py_False, "cuda_archs",
                       PK_CUDA_ARCHS, "cpu_isa", PK_CPU_ISA, "torch_version", PK_TORCH_VERSION, "compiler",
#if defined(__clang__)
                       "clang " __clang_version__
#elif defined(__GNUC__)
                       "gcc " __VERSION__
#else
                       "unknown"
#endif
  );
}

PyMethodDef methods[] = {
    {"build_info", build_info, METH_NOARGS, "What this build of the extension contains."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pretrain-kernels native ops (see torch.ops.pretrain_kernels)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
