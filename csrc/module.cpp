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
#include <optional>
#include <stdexcept>
#include <tuple>
#include <vector>
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
  for (const at::Tensor* t : tensors) {  // nullptr: an optional argument left out
    if (t == nullptr) continue;
    if (!t->defined() || (grad && t->requires_grad())) return false;
    keys = keys | t->key_set();
  }
  const c10::impl::LocalDispatchKeySet local = c10::impl::tls_local_dispatch_key_set();
  // BackendSelect is in torch's default included set; it is a fallthrough for these ops
  keys = ((keys | local.included_) - local.excluded_) - c10::autograd_dispatch_keyset_with_ADInplaceOrView -
         c10::DispatchKeySet(c10::DispatchKey::BackendSelect);
  return keys.highestPriorityTypeId() == c10::DispatchKey::CPU;
}

// Reading the ops' arguments: each returns false for a value of another type (the
// entry then gives NotImplemented and the op takes the call, raising its usual errors).
bool read(PyObject* o, std::optional<at::Tensor>& t) {
  if (o == Py_None) return true;
  if (!THPVariable_CheckExact(o)) return false;
  t = THPVariable_Unpack(o);
  return true;
}

bool read(PyObject* o, double& x) {
  if (!PyFloat_CheckExact(o)) return false;
  x = PyFloat_AS_DOUBLE(o);
  return true;
}

bool read(PyObject* o, int64_t& x) {
  if (!PyLong_CheckExact(o)) return false;
  int overflow = 0;
  x = PyLong_AsLongLongAndOverflow(o, &overflow);
  return overflow == 0 && !(x == -1 && PyErr_Occurred());
}

bool read(PyObject* o, bool& x) {
  if (!PyBool_Check(o)) return false;
  x = o == Py_True;
  return true;
}

PyObject* wrap_pair(std::tuple<at::Tensor, at::Tensor>&& result) {
  PyObject* a = THPVariable_Wrap(std::move(std::get<0>(result)));
  if (a == nullptr) return nullptr;
  PyObject* b = THPVariable_Wrap(std::move(std::get<1>(result)));
  if (b == nullptr) {
    Py_DECREF(a);
    return nullptr;
  }
  PyObject* pair = PyTuple_Pack(2, a, b);
  Py_DECREF(a);
  Py_DECREF(b);
  return pair;
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
  std::optional<at::Tensor> q, k, v;
  double scale = 0;
  int64_t window_right = 0;
  bool bottom_right = false, heads_first = false;  // heads_first: torch SDPA's (batch, heads, seqlen, head_dim)
  if (!read(args[0], q) || !q || !read(args[1], k) || !k || !read(args[2], v) || !v || !read(args[3], scale) ||
      !read(args[4], window_right) || !read(args[5], bottom_right) || !read(args[6], heads_first)) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  if (!reaches_cpu_kernel({&*q, &*k, &*v})) Py_RETURN_NOTIMPLEMENTED;
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
  return wrap_pair(std::move(result));
}

// mlm_mask_direct(*args) / span_mask_direct(*args): the ops' CPU kernels on the ops' own
// positional arguments (schema order, as the wrappers pass them), or NotImplemented where the
// dispatcher would not go straight to the CPU kernel or the kernel's checks fail.
template <typename Last, typename Kernel>
PyObject* masking_direct(PyObject* const* args, Py_ssize_t nargs, const char* name, const char* record, Kernel kernel) {
  if (nargs != 13) {
    PyErr_Format(PyExc_TypeError, "%s: expected the op's 13 positional arguments, got %zd", name, nargs);
    return nullptr;
  }
  std::optional<at::Tensor> ids, attn, special, words, rows, seed;
  double mask_prob = 0, replace_prob = 0, random_prob = 0;
  int64_t mask_token_id = 0, vocab_size = 0;
  Last last1{};
  int64_t last2 = 0;
  if (!read(args[0], ids) || !ids || !read(args[1], attn) || !read(args[2], special) || !read(args[3], words) ||
      !read(args[4], rows) || !read(args[5], seed) || !seed || !read(args[6], mask_prob) ||
      !read(args[7], mask_token_id) || !read(args[8], vocab_size) || !read(args[9], replace_prob) ||
      !read(args[10], random_prob) || !read(args[11], last1) || !read(args[12], last2)) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  const auto ptr = [](const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; };
  if (!reaches_cpu_kernel({&*ids, ptr(attn), ptr(special), ptr(words), ptr(rows), &*seed})) Py_RETURN_NOTIMPLEMENTED;
  std::tuple<at::Tensor, at::Tensor> result;
  bool ok = true;
  Py_BEGIN_ALLOW_THREADS
  try {
    RECORD_FUNCTION(record, std::vector<c10::IValue>());
    result = kernel(*ids, attn, special, words, rows, *seed, mask_prob, mask_token_id, vocab_size, replace_prob,
                    random_prob, last1, last2);
  } catch (const std::exception&) {
    ok = false;
  }
  Py_END_ALLOW_THREADS
  if (!ok) Py_RETURN_NOTIMPLEMENTED;
  return wrap_pair(std::move(result));
}

PyObject* mlm_mask_direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return masking_direct<bool>(args, nargs, "mlm_mask_direct", "pretrain_kernels::mlm_mask", pk::cpu::mlm_mask);
}

PyObject* span_mask_direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  return masking_direct<double>(args, nargs, "span_mask_direct", "pretrain_kernels::span_mask", pk::cpu::span_mask);
}

bool read(PyObject* o, c10::string_view& x) {
  if (!PyUnicode_CheckExact(o)) return false;
  Py_ssize_t n = 0;
  const char* c = PyUnicode_AsUTF8AndSize(o, &n);
  if (c == nullptr) return false;
  x = c10::string_view(c, static_cast<size_t>(n));
  return true;
}

// diffusion_loss_direct(pred, target, timesteps, alphas_cumprod, weighting, gamma,
// prediction_type, mean): the op's CPU kernel on its arguments, then, when `mean`, their mean
// (the wrapper's reduction="mean", at::mean as Tensor.mean); NotImplemented where the dispatcher
// would not go straight to the CPU kernel or the kernel's checks fail (the wrapper then calls the
// op, which raises).
PyObject* diffusion_loss_direct(PyObject*, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 8) {
    PyErr_Format(PyExc_TypeError, "diffusion_loss_direct: expected the op's 7 arguments and `mean`, got %zd", nargs);
    return nullptr;
  }
  std::optional<at::Tensor> pred, target, timesteps, acp;
  c10::string_view weighting, prediction_type;
  double gamma = 0;
  bool mean = false;
  if (!read(args[0], pred) || !pred || !read(args[1], target) || !target || !read(args[2], timesteps) ||
      !read(args[3], acp) || !read(args[4], weighting) || !read(args[5], gamma) || !read(args[6], prediction_type) ||
      !read(args[7], mean)) {
    PyErr_Clear();
    Py_RETURN_NOTIMPLEMENTED;
  }
  const auto ptr = [](const std::optional<at::Tensor>& t) { return t ? &*t : nullptr; };
  if (!reaches_cpu_kernel({&*pred, &*target, ptr(timesteps), ptr(acp)})) Py_RETURN_NOTIMPLEMENTED;
  at::Tensor result;
  bool ok = true;
  Py_BEGIN_ALLOW_THREADS
  try {
    RECORD_FUNCTION("pretrain_kernels::diffusion_loss", std::vector<c10::IValue>());
    result = pk::cpu::diffusion_loss(*pred, *target, timesteps, acp, weighting, gamma, prediction_type);
    if (mean) result = result.mean();
  } catch (const std::exception&) {
    ok = false;
  }
  Py_END_ALLOW_THREADS
  if (!ok) Py_RETURN_NOTIMPLEMENTED;
  return THPVariable_Wrap(std::move(result));
}

PyMethodDef methods[] = {
    {"diffusion_loss_direct", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(diffusion_loss_direct)),
     METH_FASTCALL, "diffusion_loss's CPU kernel (and the mean), past the dispatcher (see csrc/module.cpp)."},
    {"mlm_mask_direct", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(mlm_mask_direct)), METH_FASTCALL,
     "mlm_mask's CPU kernel, past the dispatcher (see csrc/module.cpp)."},
    {"span_mask_direct", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)()>(span_mask_direct)), METH_FASTCALL,
     "span_mask's CPU kernel, past the dispatcher (see csrc/module.cpp)."},
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
