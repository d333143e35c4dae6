// The Python module pretrain_kernels._C: loading it runs the TORCH_LIBRARY registrations.
// It exposes build information and the direct entries of the wrappers' CPU fast paths
// (csrc/cpu/direct_calls.h); every kernel is an op of torch.ops.pretrain_kernels.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/GradMode.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/python_variable.h>

#include <atomic>
#include <string>

#include "cpu/cpu_isa.h"
#include "cpu/direct_calls.h"

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

// Whether the dispatcher would send an op call on these tensors straight to its CPU kernel,
// leaving aside the autograd keys (the caller needs no derivative: checked again here for grad
// mode): no autocast, no torch dispatch mode or subclass (Python keys), no functorch layer, no
// conjugate / negative view, all on the CPU. The same key sets the dispatcher reads.
bool reaches_cpu_kernel(std::initializer_list<const at::Tensor*> tensors) {
  c10::DispatchKeySet keys;
  const bool grad = c10::GradMode::is_enabled();
  for (const at::Tensor* t : tensors) {
    if (!t->defined() || (grad && t->requires_grad())) return false;
    keys = keys | t->key_set();
  }
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  // BackendSelect is in torch's default included set; it is a fallthrough for these ops
  keys = ((keys | local.included_) - local.excluded_) - c10::autograd_dispatch_keyset_with_ADInplaceOrView -
         c10::DispatchKeySet(c10::DispatchKey::BackendSelect);
  return keys.highestPriorityTypeId() == c10::DispatchKey::CPU;
}

// The exact torch.Tensor at args[i], or nullptr (a subclass takes the dispatcher's route).
const at::Tensor* exact_tensor(PyObject* const* args, Py_ssize_t i) {
  return THPVariable_CheckExact(args[i]) ? &THPVariable_Unpack(args[i]) : nullptr;
}

// attention_fwd_plain(q, k, v, scale, window_right, bottom_right, heads_first) -> (out, lse), or
// NotImplemented when the call is not one for this entry (the wrapper then calls the op):
// flash_attn_fwd with no varlen, mask, softcap, ALiBi, prefix or dropout, window (-1,
// window_right), on CPU tensors that need no derivative; heads_first: q, k, v and out in torch
// SDPA's layout (batch, heads, seqlen, head_dim). Errors of the kernel's checks also give
// NotImplemented: the op, called next, raises them with the wrapper's messages.
PyObject* attention_fwd_plain(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 7) {
    PyErr_SetString(PyExc_TypeError,
                    "attention_fwd_plain: expected (q, k, v, scale, window_right, bottom_right, heads_first)");
    return nullptr;
  }
  const at::Tensor* q = exact_tensor(args, 0);
  const at::Tensor* k = exact_tensor(args, 1);
  const at::Tensor* v = exact_tensor(args, 2);
  if (q == nullptr || k == nullptr || v == nullptr || !PyFloat_CheckExact(args[3]) || !PyLong_CheckExact(args[4]) ||
      !PyBool_Check(args[5]) || !PyBool_Check(args[6]))
    Py_RETURN_NOTIMPLEMENTED;
  const double scale = PyFloat_AS_DOUBLE(args[3]);
  const long long window_right = PyLong_AsLongLong(args[4]);
  if (window_right == -1 && PyErr_Occurred()) return nullptr;
  const bool bottom_right = args[5] == Py_True;
  const bool heads_first = args[6] == Py_True;  // torch SDPA's (batch, heads, seqlen, head_dim)
  if (!reaches_cpu_kernel({q, k, v})) Py_RETURN_NOTIMPLEMENTED;
  std::tuple<at::Tensor, at::Tensor> result;
  bool ok = true;
  Py_BEGIN_ALLOW_THREADS
  try {
    RECORD_FUNCTION("pretrain_kernels::flash_attn_fwd", std::vector<c10::IValue>());
    if (heads_first) {
      if (q->dim() != 4 || k->dim() != 4 || v->dim() != 4) throw std::invalid_argument("not 4-d");
      result = pk::attention::cpu::forward_plain(q->transpose(1, 2), k->transpose(1, 2), v->transpose(1, 2), scale,
                                                 window_right, bottom_right);
      std::get<0>(result) = std::get<0>(result).transpose(1, 2);
    } else {
      result = pk::attention::cpu::forward_plain(*q, *k, *v, scale, window_right, bottom_right);
    }
  } catch (const std::exception&) {
    ok = false;
  }
  Py_END_ALLOW_THREADS
  if (!ok) Py_RETURN_NOTIMPLEMENTED;
  PyObject* out = THPVariable_Wrap(std::move(std::get<0>(result)));
  if (out == nullptr) return nullptr;
  PyObject* lse = THPVariable_Wrap(std::move(std::get<1>(result)));
  if (lse == nullptr) {
    Py_DECREF(out);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, out, lse);
  Py_DECREF(out);
  Py_DECREF(lse);
  return pair;
}

PyMethodDef methods[] = {
    {"attention_fwd_plain", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(attention_fwd_plain)),
     METH_FASTCALL, "flash_attn_fwd's plain CPU call, past the dispatcher (see csrc/module.cpp)."},
    {"build_info", build_info, METH_NOARGS, "What this build of the extension contains."},
    {"parallel_threads", parallel_threads, METH_NOARGS,
     "Number of threads an at::parallel_for of the extension's kernels runs on."},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "pretrain-kernels native ops (see torch.ops.pretrain_kernels)",
                      -1, methods};

}  // namespace

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&module); }
