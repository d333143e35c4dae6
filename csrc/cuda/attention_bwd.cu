// CUDA backward of flash attention (flash_attn_bwd). Semantics: csrc/cpu/attention_bwd.cpp.
//
// With P = softmax(S), S = Q K^T * scale (+ mask), O = P V and Di = rowsum(dO * O) - dlse:
//   dV = P^T dO,  dP = dO V^T,  dS = P * (dP - Di),  dQ = scale * dS K,  dK = scale * dS^T Q.
// P is recomputed tile by tile from the saved lse (P = exp(S - lse)); nothing of size
// Sq x Sk is ever stored.
//
// Passes:
//   1. bwd_dot_kernel: Di per (token, head), laid out like lse.
//   2. dK, dV: a block owns a block of keys of one kv head and walks over every query block
//      (of every query head of the GQA group) that sees it, accumulating dK and dV in
//      registers; each key row is written once by the block that owns it.
//   3. dQ: a block owns a block of queries of one head and walks over the key blocks it
//      sees, accumulating dQ in registers.
// Splitting dQ from dK/dV recomputes S and P once more, but no two blocks ever add into the
// same output and no atomics are used: the gradients are deterministic, bit for bit, for any
// launch configuration.
//
// The tensor-core path can instead fuse dQ into pass 2 (DqMode in attention_bwd_mma.cuh): each
// dK/dV block adds dS K for its 64 keys into a float copy of dQ, which is then scaled and
// rounded. That is 5 tile products per (query tile, key tile) instead of 7, as FlashAttention 2
// does, at the price of contention:
//   atomic   float atomics, FlashAttention 2's choice; the sum order varies from run to run.
//            Used when the op's `deterministic` is false and
//            torch.use_deterministic_algorithms(True) is not in force.
//   ordered  the key blocks that see a query tile take turns on it through a counter per tile,
//            in a fixed order (highest key block first, launched first), FlashAttention 3's
//            deterministic scheme. Under a causal mask the turns come in the order the blocks
//            reach the tile anyway; without one a block may wait for its predecessor.
//   separate pass 3.
// deterministic=true runs separate, or ordered when PK_ATTENTION_BWD=ordered (a kernel-
// development knob read on every call: both are reproducible bit for bit, and which of them is
// faster has not been measured on a GPU yet). The SIMT kernels have one, deterministic, scheme.
//
// float16 / bfloat16 without attn_mask use tensor cores (ldmatrix +
// mma.sync m16n8k16, fp32 accumulation, the same fragment helpers as the forward in
// attention_ptx.cuh): every warp owns 16 rows (queries for dQ, keys for dK/dV), and the
// score accumulators are reused as the A operand of the following product (P^T dO, dS K,
// dS^T Q) after rounding to the input dtype, as FlashAttention does. At head_dim 256 the dK
// and dV accumulators do not both fit in registers, so two dK/dV passes each recompute the
// scores (attention_bwd_mma.cuh). Everything else (float32, a caller's mask, GPUs before
// sm_80) runs the SIMT kernels of
// attention_bwd_rows.cuh: a warp per query row (dQ) or per key row (dK, dV), a lane per
// key or query. With softcap / ALiBi every kernel recomputes the forward's modified scores
// and multiplies dS by the soft-cap's derivative 1 - tanh^2 (modified_score_log2).
// Attention dropout (csrc/common/attention_dropout.h) runs on both paths, forward and backward:
// every kernel regenerates the keep factor M of its (query, key) elements from Philox,
// dV = (P M)^T dO and dS = P (dP M - Di). The SIMT kernels draw a Philox block per lane and
// shuffle it to the 8 lanes whose keys it serves (DropoutRow); the tensor-core kernels draw each
// block of a score fragment once per warp and exchange keep bits (dropout_keep_query_row for the
// dQ pass, whose rows are queries, dropout_keep_key_rows for the dK/dV pass, whose rows are keys).
#include <torch/library.h>

#include "attention_host.cuh"

#include "attention_bwd_rows.cuh"
#include "attention_mma_instances.cuh"

namespace pk {
namespace attention {
namespace cuda {

namespace {

// ---- launchers ------------------------------------------------------------------------------

template <typename T, int kDPL>
void launch_bwd_rows(const AttnParams& p, const T* dout, const float* lse, const float* Di, T* dq, T* dk, T* dv,
                     int64_t q_bound, int64_t k_bound, cudaStream_t stream) {
  const dim3 gk(static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, ceil_div(k_bound * p.Hk, 4)), 1 << 30)),
                1, static_cast<unsigned>(std::min<int64_t>(p.batch, 65535)));
  PK_LAUNCH(gk, 128, 0, stream, bwd_dkdv_rows_kernel<T, kDPL>)(p, dout, lse, Di, dk, dv);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 gq(static_cast<unsigned>(std::min<int64_t>(std::max<int64_t>(1, ceil_div(q_bound * p.H, 4)), 1 << 30)),
                1, static_cast<unsigned>(std::min<int64_t>(p.batch, 65535)));
  PK_LAUNCH(gq, 128, 0, stream, bwd_dq_rows_kernel<T, kDPL>)(p, dout, lse, Di, dq);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// The dQ scheme of the tensor-core backward (see above).
int bwd_dq_mode(bool deterministic) {
  const std::string v = knobs::attention_bwd_scheme();
  TORCH_CHECK(v.empty() || v == "separate" || v == "ordered",
              "PK_ATTENTION_BWD: expected separate or ordered (the scheme of deterministic=True), got '", v, "'");
  if (!deterministic && !at::globalContext().deterministicAlgorithms()) return kDqAtomic;
  return v == "ordered" ? kDqOrdered : kDqSeparate;
}

template <typename T>
void backward_typed(const AttnParams& p, bool tensor_cores, const at::Tensor& dout, const at::Tensor& out,
                    const at::Tensor& lse, const std::optional<at::Tensor>& dlse, at::Tensor& Di, at::Tensor& dq,
                    at::Tensor& dk, at::Tensor& dv, int64_t q_bound, int64_t k_bound, bool deterministic,
                    cudaStream_t stream) {
  const T* dout_p = static_cast<const T*>(dout.data_ptr());
  const float* lse_p = lse.data_ptr<float>();
  float* di_p = Di.data_ptr<float>();
  {
    const int64_t blocks = std::max<int64_t>(1, ceil_div(p.total_q * p.H, 4));
    PK_LAUNCH(static_cast<unsigned>(std::min<int64_t>(blocks, 1 << 30)), 128, 0, stream, bwd_dot_kernel<T>)(
        p, dout_p, static_cast<const T*>(out.data_ptr()), dlse.has_value() ? dlse->data_ptr<float>() : nullptr, di_p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  T* dq_p = static_cast<T*>(dq.data_ptr());
  T* dk_p = static_cast<T*>(dk.data_ptr());
  T* dv_p = static_cast<T*>(dv.data_ptr());
  const int d = std::max(p.D, p.Dv);
  if constexpr (!std::is_same_v<T, float>) {
    if (tensor_cores && !p.has_mask()) {
      DqAccum dqa;
      dqa.mode = bwd_dq_mode(deterministic);
      at::Tensor acc, turns;  // fused dQ: float dQ (unscaled), one turn counter per query tile
      if (dqa.mode != kDqSeparate) {
        acc = at::zeros(dq.sizes(), dq.options().dtype(at::kFloat));
        dqa.acc = acc.data_ptr<float>();
        if (dqa.mode == kDqOrdered) {
          turns = at::zeros({p.H, p.total_q}, dq.options().dtype(at::kInt));
          dqa.turn = turns.data_ptr<int>();
        }
      }
      if (d <= 32)
        launch_bwd_mma<T, 32>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, dqa, stream);
      else if (d <= 64)
        launch_bwd_mma<T, 64>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, dqa, stream);
      else if (d <= 96)
        launch_bwd_mma<T, 96>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, dqa, stream);
      else if (d <= 128)
        launch_bwd_mma<T, 128>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, dqa, stream);
      else
        launch_bwd_mma<T, 256>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, dqa, stream);
      // scale and round in one pass (the product is formed in float, as in mul_ then copy_)
      if (dqa.mode != kDqSeparate) at::mul_out(dq, acc, at::scalar_tensor(p.scale, acc.options().device(at::kCPU)));
      return;
    }
  }
  if (d <= 32)
    launch_bwd_rows<T, 1>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, stream);
  else if (d <= 64)
    launch_bwd_rows<T, 2>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, stream);
  else if (d <= 128)
    launch_bwd_rows<T, 4>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, stream);
  else
    launch_bwd_rows<T, 8>(p, dout_p, lse_p, di_p, dq_p, dk_p, dv_p, q_bound, k_bound, stream);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const std::optional<at::Tensor>& dlse_in,
    const std::optional<at::Tensor>& cu_seqlens_q, const std::optional<at::Tensor>& cu_seqlens_k,
    const std::optional<at::Tensor>& attn_mask, int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
    int64_t window_left, int64_t window_right, bool bottom_right, double softcap,
    const std::optional<at::Tensor>& alibi_slopes, const std::optional<at::Tensor>& prefix_lens, double dropout_p,
    const std::optional<at::Tensor>& dropout_seed, bool deterministic) {
  TORCH_CHECK(on_kernel_device(q_in), "q: expected a CUDA tensor, got one on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Device dev = q_in.device();
  at::Tensor q = q_in, k = k_in, v = v_in;
  std::optional<at::Tensor> cu_q = cu_seqlens_q, cu_k = cu_seqlens_k, mask = attn_mask, prefix = prefix_lens;
  Layout l;
  AttnParams p = make_params(q, k, v, cu_q, cu_k, mask, scale, window_left, window_right, bottom_right, softcap,
                             alibi_slopes, prefix, dropout_p, dropout_seed, &l);
  check_backward_inputs(dout_in, out_in, lse_in, dlse_in, q_in, l, at::kFloat, dev);
  const std::vector<int64_t> lse_shape(lse_in.sizes().begin(), lse_in.sizes().end());
  std::optional<at::Tensor> dlse;
  if (dlse_in.has_value()) dlse = dlse_in->contiguous();
  const at::Tensor dout = dout_in.contiguous(), out = out_in.contiguous(), lse = lse_in.contiguous();
  // zeros: rows outside every sequence (malformed cu_seqlens only) and keys no query sees
  at::Tensor dq = at::zeros(q_in.sizes(), q.options());
  at::Tensor dk = at::zeros(k_in.sizes(), k.options());
  at::Tensor dv = at::zeros(v_in.sizes(), v.options());
  if (dq.numel() == 0 || dk.numel() == 0) return {dq, dk, dv};
  at::Tensor Di = at::empty(lse_shape, lse.options());
  p.dout_vec = dout.element_size() == 2 && p.Dv % 8 == 0 && reinterpret_cast<uintptr_t>(dout.data_ptr()) % 16 == 0;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool sm80 = use_tensor_cores();
  const int64_t q_bound = query_bound(p, max_seqlen_q), k_bound = key_bound(p, max_seqlen_k);
  switch (q.scalar_type()) {
    case at::kHalf:
      backward_typed<__half>(p, sm80, dout, out, lse, dlse, Di, dq, dk, dv, q_bound, k_bound, deterministic,
                             stream);
      break;
    case at::kBFloat16:
      backward_typed<__nv_bfloat16>(p, sm80, dout, out, lse, dlse, Di, dq, dk, dv, q_bound, k_bound,
                                    deterministic, stream);
      break;
    default:
      backward_typed<float>(p, false, dout, out, lse, dlse, Di, dq, dk, dv, q_bound, k_bound, deterministic, stream);
      break;
  }
  return {dq, dk, dv};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) { m.impl("flash_attn_bwd", &flash_attn_bwd_cuda); }

}  // namespace cuda
}  // namespace attention
}  // namespace pk
