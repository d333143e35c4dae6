// CUDA forward of flash attention (flash_attn_fwd) and the launcher the kv-cache op
// (attention_decode.cu) shares. Semantics: csrc/ops.cpp and csrc/cpu/attention.cpp.
//
// The approach
// ------------
// float16 / bfloat16 run on tensor cores (fwd_mma_kernel in attention_fwd_mma.cuh), the
// FlashAttention-2 scheme written with mma.sync m16n8k16 (sm_80+):
//   * a block of 4 warps owns 128 query rows of one (sequence, head), two m-tiles of 16 rows
//     per warp, so every K/V fragment read from shared memory feeds two mma; a row's
//     online-softmax statistics never leave the 4 threads that hold it. Head dim 256 (whose
//     accumulators would not fit in registers twice), decode and short chunks (at most 64
//     rows) and calls with an attn_mask (its per-element reads need registers that two
//     m-tiles hold) use 64-row blocks of one m-tile per warp (FwdTile in attention_tiles.cuh);
//     PK_ATTENTION_FWD_BLOCK_M=64 in the environment forces those everywhere;
//   * Q, one key tile K (kBN x d) and one value tile V (kBN x d) live in shared memory (rows
//     padded by 8 elements so that the fragment loads hit 32 different banks); kBN = 64 keys,
//     32 for head_dim 256, so a block needs 15-70 KB;
//   * per key tile: S = Q K^T into registers (fp32), scale, mask, online softmax in base 2,
//     then O += P V with P taken straight from the S registers (the accumulator layout of
//     m16n8k16 is the A-operand layout of the next mma), O stays in registers;
//   * loads go through cp.async, three barriers per key tile: V(j) is in flight while S(j)
//     is computed, K(j+1) while the softmax and P V(j) are; rows outside the sequence and
//     columns past the head dim are zero-filled;
//   * head_dim is a template parameter padded up to 32, 64, 96, 128 or 256 (q/k and v head
//     dims may differ: both pad to the larger one);
//   * tiles that the causal/window mask hides are never visited (the key loop runs over the
//     visible interval of the block, csrc/common/attention.h), and the per-element mask is
//     only evaluated on tiles that are not fully visible, or when the caller passes a mask;
//   * softcap / ALiBi (modified_score_log2, the CPU's formula from csrc/common/attention.h):
//     the scores are scaled in natural-log units, modified, then taken to base 2; the kernel
//     picks the modified or the plain loop once per key tile.
//   * dropout (csrc/common/attention_dropout.h): after the online softmax of a key tile the
//     dropped entries of P are zeroed before P V (the row sums and the lse stay without
//     dropout) and the output is scaled by 1 / (1 - p) at the end. The keep bits of the score
//     fragment come from Philox, each block drawn once per warp and shared by shuffles
//     (dropout_keep_query_row, attention_common.cuh); under dropout the key loop starts at a
//     multiple of 8 so that its 8-key n-tiles are whole Philox blocks.
// float32 inputs (and GPUs before sm_80) run fwd_rows_kernel: one warp per query row, a
// lane per key for the scores and a lane per head-dim slot for the output, same online
// softmax in float; exact to float32 rounding, slower.
// PK_ATTENTION_CUDA_PATH=simt in the environment sends float16 / bfloat16 there too (forward
// and backward), to tell a tensor-core problem from anything else on a new GPU.
//
// Split-KV: when the grid is too small to fill the GPU (decode, batch 1), the key range of
// every query is cut into n_splits pieces that run as separate blocks and write float
// partial outputs and lse; combine_kernel merges them. The same kernels serve
// flash_attn_kvcache, with per-row key counts from cache_seqlens (read on the device).
//
// Work is indexed by a grid-stride loop over (query block, head x split, sequence), so the
// grid extent only bounds the parallelism: varlen without max_seqlen_q uses the token count
// as the bound, and no host ever reads cu_seqlens.
#include <torch/library.h>

#include "attention_host.cuh"

#include "attention_combine.cuh"
#include "attention_fwd_rows.cuh"
#include "attention_mma_instances.cuh"

namespace pk {
namespace attention {
namespace cuda {

namespace {

int padded_head_dim(int d) {
  if (d <= 32) return 32;
  if (d <= 64) return 64;
  if (d <= 96) return 96;
  if (d <= 128) return 128;
  return 256;
}

template <typename T, int kDPL>
void launch_rows(const AttnParams& p, int64_t q_bound, cudaStream_t stream) {
  const int64_t blocks = std::max<int64_t>(1, ceil_div(q_bound * p.H, 4));
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>(blocks, 1 << 30)),
                  static_cast<unsigned>(std::min<int64_t>(p.n_splits, 65535)),
                  static_cast<unsigned>(std::min<int64_t>(p.batch, 65535)));
  PK_LAUNCH(grid, 128, 0, stream, fwd_rows_kernel<T, kDPL>)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_rows_any(const AttnParams& p, int64_t q_bound, cudaStream_t stream) {
  const int d = std::max(p.D, p.Dv);
  if (d <= 32)
    launch_rows<T, 1>(p, q_bound, stream);
  else if (d <= 64)
    launch_rows<T, 2>(p, q_bound, stream);
  else if (d <= 128)
    launch_rows<T, 4>(p, q_bound, stream);
  else
    launch_rows<T, 8>(p, q_bound, stream);
}

template <typename T>
void launch_mma_any(const AttnParams& p, int64_t q_bound, cudaStream_t stream) {
  switch (padded_head_dim(std::max(p.D, p.Dv))) {
    case 32: launch_fwd_mma<T, 32>(p, q_bound, stream); break;
    case 64: launch_fwd_mma<T, 64>(p, q_bound, stream); break;
    case 96: launch_fwd_mma<T, 96>(p, q_bound, stream); break;
    case 128: launch_fwd_mma<T, 128>(p, q_bound, stream); break;
    default: launch_fwd_mma<T, 256>(p, q_bound, stream); break;
  }
}

template <typename T>
void launch_combine(const AttnParams& p, cudaStream_t stream) {
  const int64_t blocks = std::max<int64_t>(1, ceil_div(p.total_q * p.H, 4));
  PK_LAUNCH(static_cast<unsigned>(std::min<int64_t>(blocks, 1 << 30)), 128, 0, stream, combine_kernel<T>)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void forward_typed(AttnParams& p, bool tensor_cores, int64_t q_bound, int64_t k_bound, const at::Tensor& like,
                   cudaStream_t stream) {
  int64_t blocks, key_block;
  if (tensor_cores) {
    const int kd = padded_head_dim(std::max(p.D, p.Dv));
    // Fewer queries than a block has rows (decode, short chunks): the query heads of a GQA
    // group fill the block together and read their K/V tiles once.
    const int G = p.H / p.Hk;
    p.pack_gqa = G > 1 && q_bound < 64;
    // Tall blocks once a (sequence, head group) has more rows than a short block holds, and
    // no caller's mask (fwd_mma_kernel reads it in 64-row blocks only).
    const int64_t rows = fwd_group_rows(p, q_bound);
    p.fwd_tall = kd <= 128 && rows > 64 && !p.has_mask() && fwd_tall_blocks_allowed();
    blocks = ceil_div(rows, fwd_block_rows(p.fwd_tall)) * fwd_row_groups(p) * int64_t(p.batch);
    key_block = fwd_key_block(kd);
  } else {
    blocks = ceil_div(q_bound * p.H, 4) * int64_t(p.batch);
    key_block = 32;
  }
  choose_splits(p, blocks, k_bound, key_block);
  at::Tensor out_part, lse_part;
  if (p.n_splits > 1) {
    const auto fopt = like.options().dtype(at::kFloat);
    out_part = at::empty({p.n_splits, p.total_q, p.H, p.Dv}, fopt);
    lse_part = at::full({p.n_splits, p.total_q, p.H}, -std::numeric_limits<float>::infinity(), fopt);
    p.out_part = out_part.data_ptr<float>();
    p.lse_part = lse_part.data_ptr<float>();
  }
  if constexpr (std::is_same_v<T, float>) {
    launch_rows_any<T>(p, q_bound, stream);
  } else {
    if (tensor_cores)
      launch_mma_any<T>(p, q_bound, stream);
    else
      launch_rows_any<T>(p, q_bound, stream);
  }
  if (p.n_splits > 1) launch_combine<T>(p, stream);
}

}  // namespace

void run_forward(AttnParams& p, at::ScalarType dtype, int64_t q_bound, int64_t k_bound, const at::Tensor& like) {
  if (p.total_q == 0 || p.batch == 0) return;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const bool sm80 = use_tensor_cores();
  switch (dtype) {
    case at::kHalf: forward_typed<__half>(p, sm80, q_bound, k_bound, like, stream); break;
    case at::kBFloat16: forward_typed<__nv_bfloat16>(p, sm80, q_bound, k_bound, like, stream); break;
    case at::kFloat: forward_typed<float>(p, false, q_bound, k_bound, like, stream); break;
    default: TORCH_CHECK(false, "flash attention on CUDA: unsupported dtype ", dtype);
  }
}

namespace {

std::tuple<at::Tensor, at::Tensor> flash_attn_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                       const at::Tensor& v_in,
                                                       const std::optional<at::Tensor>& cu_seqlens_q,
                                                       const std::optional<at::Tensor>& cu_seqlens_k,
                                                       const std::optional<at::Tensor>& attn_mask,
                                                       int64_t max_seqlen_q, int64_t max_seqlen_k, double scale,
                                                       int64_t window_left, int64_t window_right, bool bottom_right,
                                                       double softcap, const std::optional<at::Tensor>& alibi_slopes,
                                                       const std::optional<at::Tensor>& prefix_lens, double dropout_p,
                                                       const std::optional<at::Tensor>& dropout_seed) {
  TORCH_CHECK(on_kernel_device(q_in), "q: expected a CUDA tensor, got one on ", q_in.device());
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor q = q_in, k = k_in, v = v_in;
  std::optional<at::Tensor> cu_q = cu_seqlens_q, cu_k = cu_seqlens_k, mask = attn_mask, prefix = prefix_lens;
  AttnParams p = make_params(q, k, v, cu_q, cu_k, mask, scale, window_left, window_right, bottom_right, softcap,
                             alibi_slopes, prefix, dropout_p, dropout_seed);
  const bool varlen = cu_q.has_value();
  std::vector<int64_t> out_shape(q.sizes().begin(), q.sizes().end());
  out_shape.back() = p.Dv;
  const auto lse_opt = q.options().dtype(at::kFloat);
  const std::vector<int64_t> lse_shape =
      varlen ? std::vector<int64_t>{p.H, p.total_q} : std::vector<int64_t>{p.batch, p.H, p.sq};
  // varlen: tokens outside every sequence (only with malformed cu_seqlens) read as 0 / -inf
  at::Tensor out = varlen ? at::zeros(out_shape, q.options()) : at::empty(out_shape, q.options());
  at::Tensor lse = varlen ? at::full(lse_shape, -std::numeric_limits<float>::infinity(), lse_opt)
                          : at::empty(lse_shape, lse_opt);
  if (out.numel() == 0) {
    lse.fill_(-std::numeric_limits<double>::infinity());
    return {out, lse};
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  run_forward(p, q.scalar_type(), query_bound(p, max_seqlen_q), key_bound(p, max_seqlen_k), q);
  return {out, lse};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) { m.impl("flash_attn_fwd", &flash_attn_fwd_cuda); }

}  // namespace cuda
}  // namespace attention
}  // namespace pk
