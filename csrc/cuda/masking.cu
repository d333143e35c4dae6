// CUDA kernels of the MLM masking family. Same decisions as csrc/cpu/masking.cpp, bit for
// bit: both call the per-token functions of csrc/common/masking.h with the same Philox keys.
//
//  * mlm_mask, Bernoulli selection on tokens: one flat elementwise pass, one thread per
//    four tokens (they share a Philox block of selection words), nothing shared. When rows
//    hold a multiple of four tokens and the tensors are 16-byte aligned (the host checks the
//    pointers, nothing more), a thread reads its four ids with one (int32) or two (int64)
//    16-byte loads, its four attention-mask bytes with one 4-byte load, and writes each output
//    the same way.
//  * mlm_mask with whole words and/or an exact count: one block per row. Whole words need
//    each token's word start, a running max over the row (cub::BlockScan, carried across
//    chunks of blockDim tokens). Exact counts need the k-th smallest unit key of the row:
//    a radix select over the 64-bit keys, 8 passes of 8 bits with a shared 256-bin
//    histogram; keys are recomputed from Philox in every pass instead of being stored, so
//    the kernel needs no scratch memory and any row length works. No host sync anywhere.
//  * span_mask: spans depend on the earlier spans of the row, so one thread walks one row
//    (the same sequential code as on the CPU); rows run in parallel.
#include <ATen/ATen.h>
#include <torch/library.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>
#endif

#include "cuda_seams.cuh"

#include "../common/masking.h"
#include "../common/masking_checks.h"

namespace pk {
namespace {

using masking::MaskParams;

struct DeviceArgs {
  bool vec4;  // rows of 4k tokens and aligned tensors: four tokens per vector load and store
  MaskParams p;
  const int64_t* seed_dev;  // when the seed lives on the GPU (graph capture with fresh seeds)
  const float* prob_rows;
  double prob;  // the scalar rate in double: exact counts round prob * n like Python
  const bool* attn;
  const bool* word_starts;
  int64_t B, L;
  int64_t max_predictions;
};

__device__ __forceinline__ MaskParams resolve(const DeviceArgs& a) {
  MaskParams p = a.p;
  if (a.seed_dev != nullptr) p.seed = static_cast<uint64_t>(*a.seed_dev);
  p.n_allowed = p.vocab_size - masking::count_specials_in_vocab(p.special, p.n_special, p.vocab_size);
  return p;
}

// Four consecutive ids from / to a 16-byte aligned address: one 16-byte access for int32, two
// for int64 (little-endian halves).
template <typename id_t>
__device__ __forceinline__ void load4(const id_t* src, id_t (&v)[4]) {
  const uint4* q = reinterpret_cast<const uint4*>(src);
  if constexpr (sizeof(id_t) == 4) {
    const uint4 x = q[0];
    v[0] = static_cast<id_t>(x.x), v[1] = static_cast<id_t>(x.y), v[2] = static_cast<id_t>(x.z),
    v[3] = static_cast<id_t>(x.w);
  } else {
    const uint4 x = q[0], y = q[1];
    v[0] = static_cast<id_t>((static_cast<uint64_t>(x.y) << 32) | x.x);
    v[1] = static_cast<id_t>((static_cast<uint64_t>(x.w) << 32) | x.z);
    v[2] = static_cast<id_t>((static_cast<uint64_t>(y.y) << 32) | y.x);
    v[3] = static_cast<id_t>((static_cast<uint64_t>(y.w) << 32) | y.z);
  }
}

template <typename id_t>
__device__ __forceinline__ void store4(id_t* dst, const id_t (&v)[4]) {
  uint4* q = reinterpret_cast<uint4*>(dst);
  if constexpr (sizeof(id_t) == 4) {
    q[0] = make_uint4(static_cast<unsigned>(v[0]), static_cast<unsigned>(v[1]), static_cast<unsigned>(v[2]),
                      static_cast<unsigned>(v[3]));
  } else {
    const auto lo = [](id_t x) { return static_cast<unsigned>(static_cast<uint64_t>(x)); };
    const auto hi = [](id_t x) { return static_cast<unsigned>(static_cast<uint64_t>(x) >> 32); };
    q[0] = make_uint4(lo(v[0]), hi(v[0]), lo(v[1]), hi(v[1]));
    q[1] = make_uint4(lo(v[2]), hi(v[2]), lo(v[3]), hi(v[3]));
  }
}

// One thread per group of four neighbouring tokens of a row: the four share one Philox
// block of selection words.
template <typename id_t>
__global__ void mlm_mask_flat_kernel(DeviceArgs a, const id_t* __restrict__ ids, id_t* __restrict__ out,
                                     id_t* __restrict__ labels) {
  const MaskParams p = resolve(a);
  const int64_t groups_per_row = (a.L + 3) >> 2;
  const int64_t n = a.B * groups_per_row;
  for (int64_t g = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; g < n;
       g += static_cast<int64_t>(blockDim.x) * gridDim.x) {
    const int64_t b = g / groups_per_row, l0 = (g - b * groups_per_row) << 2;
    const float pr = a.prob_rows ? masking::row_rate(a.prob_rows[b]) : static_cast<float>(a.prob);
    const Philox4x32 w = philox_draw(p.seed, masking::token_index(b, l0 >> 2), masking::kMaskOffset);
    if (a.vec4) {  // l0 + 4 <= L, and every address below is aligned
      const int64_t i0 = b * a.L + l0;
      id_t raw[4], o[4], lab[4];
      load4(ids + i0, raw);
      unsigned att = 0x01010101u;
      if (a.attn != nullptr) att = *reinterpret_cast<const unsigned*>(a.attn + i0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const bool attended = ((att >> (8 * k)) & 0xFFu) != 0;
        const bool selected = uniform_float(masking::word_of(w, k)) < pr &&
                              masking::eligible(p, static_cast<int64_t>(raw[k]), attended);
        masking::write_token(p, selected, raw[k], b, l0 + k, &o[k], &lab[k]);
      }
      store4(out + i0, o);
      store4(labels + i0, lab);
      continue;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int64_t l = l0 + k;
      if (l >= a.L) break;
      const int64_t i = b * a.L + l;
      const id_t raw = ids[i];
      const bool selected =
          uniform_float(w.v[k]) < pr && masking::eligible(p, static_cast<int64_t>(raw), a.attn == nullptr || a.attn[i]);
      masking::write_token(p, selected, raw, b, l, out + i, labels + i);
    }
  }
}

constexpr int kRowThreads = 256;

struct MaxOp {  // cub::Max is gone from newer CCCL releases
  __device__ __forceinline__ int operator()(int a, int b) const { return a > b ? a : b; }
};

template <typename id_t>
__global__ void __launch_bounds__(kRowThreads)
    mlm_mask_row_kernel(DeviceArgs a, bool exact_count, const id_t* __restrict__ ids, id_t* __restrict__ out,
                        id_t* __restrict__ labels) {
  using BlockScan = cub::BlockScan<int, kRowThreads>;
  using BlockReduce = cub::BlockReduce<int, kRowThreads>;
  __shared__ union {
    typename BlockScan::TempStorage scan;
    typename BlockReduce::TempStorage reduce;
  } tmp;
  __shared__ unsigned int hist[256];
  __shared__ uint64_t s_prefix;
  __shared__ int64_t s_remaining;
  __shared__ int s_carry;

  const MaskParams p = resolve(a);
  const int64_t b = blockIdx.x;
  const int64_t L = a.L;
  const id_t* row = ids + b * L;
  const bool* arow = a.attn ? a.attn + b * L : nullptr;
  const bool* wrow = a.word_starts ? a.word_starts + b * L : nullptr;
  const double prd = a.prob_rows ? static_cast<double>(masking::row_rate(a.prob_rows[b])) : a.prob;
  const float pr = static_cast<float>(prd);
  auto elig = [&](int64_t l) { return masking::eligible(p, static_cast<int64_t>(row[l]), !arow || arow[l]); };
  auto is_unit = [&](int64_t l) { return (!wrow || l == 0 || wrow[l]) && elig(l); };
  auto key_of = [&](int64_t l) {
    return masking::exact_key(masking::selection_word(p.seed, b, l), l);
  };

  uint64_t threshold = 0;
  bool any = false;
  if (exact_count) {
    int count = 0;
    for (int64_t l = threadIdx.x; l < L; l += blockDim.x) count += is_unit(l);
    const int n_units = BlockReduce(tmp.reduce).Sum(count);
    if (threadIdx.x == 0) {
      s_remaining = prd > 0.0 ? masking::exact_budget(prd, n_units, a.max_predictions) : 0;
      s_prefix = 0;
    }
    __syncthreads();
    any = s_remaining > 0;
    if (any) {
      // Radix select of the s_remaining-th smallest key, most significant byte first.
      for (int shift = 56; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
        __syncthreads();
        const uint64_t prefix = s_prefix;
        const uint64_t high_mask = shift == 56 ? 0 : (~uint64_t(0) << (shift + 8));
        for (int64_t l = threadIdx.x; l < L; l += blockDim.x) {
          if (!is_unit(l)) continue;
          const uint64_t k = key_of(l);
          if ((k & high_mask) == prefix) atomicAdd(&hist[(k >> shift) & 255], 1u);
        }
        __syncthreads();
        if (threadIdx.x == 0) {
          int64_t rem = s_remaining;
          int d = 0;
          for (; d < 256; ++d) {
            if (rem <= hist[d]) break;
            rem -= hist[d];
          }
          s_prefix = prefix | (static_cast<uint64_t>(d) << shift);
          s_remaining = rem;
        }
        __syncthreads();
      }
      threshold = s_prefix;
    }
  }

  if (threadIdx.x == 0) s_carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < L; base += blockDim.x) {
    const int64_t l = base + threadIdx.x;
    const bool in = l < L;
    int unit = static_cast<int>(l);
    if (wrow) {
      // Word start of each token: running max of the positions that start a word.
      const int start = (in && (l == 0 || wrow[l])) ? static_cast<int>(l) : -1;
      int running;
      BlockScan(tmp.scan).InclusiveScan(start, running, MaxOp());
      const int carry = s_carry;
      unit = running > carry ? running : carry;
      __syncthreads();
      if (threadIdx.x == blockDim.x - 1) s_carry = unit;
      __syncthreads();
    }
    if (!in) continue;
    bool selected = false;
    if (elig(l) && (unit == l || elig(unit))) {
      if (exact_count) {
        selected = any && key_of(unit) <= threshold;
      } else {
        selected = uniform_float(masking::selection_word(p.seed, b, unit)) < pr;
      }
    }
    masking::write_token(p, selected, row[l], b, l, out + b * L + l, labels + b * L + l);
  }
}

template <typename id_t>
__global__ void span_mask_kernel(DeviceArgs a, float geometric_p, int64_t max_span,
                                 const id_t* __restrict__ ids, id_t* __restrict__ out, id_t* __restrict__ labels) {
  const MaskParams p = resolve(a);
  const int64_t b = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (b >= a.B) return;
  const int64_t L = a.L;
  masking::span_mask_row<id_t, id_t, bool>(p, ids + b * L, a.attn ? a.attn + b * L : nullptr,
                                           a.word_starts ? a.word_starts + b * L : nullptr, out + b * L,
                                           labels + b * L, L, b,
                                           a.prob_rows ? static_cast<double>(masking::row_rate(a.prob_rows[b])) : a.prob,
                                           geometric_p, max_span);
}

DeviceArgs make_args(const masking::CheckedInputs& c, const at::Tensor& seed, double mask_prob,
                     int64_t mask_token_id, int64_t vocab_size, double replace_prob, double random_prob,
                     int64_t max_predictions) {
  DeviceArgs a;
  a.vec4 = false;
  a.p = masking::make_params(c, mask_token_id, vocab_size, replace_prob, random_prob);
  a.seed_dev = on_kernel_device(seed) ? seed.data_ptr<int64_t>() : nullptr;
  a.p.seed = on_kernel_device(seed) ? 0 : static_cast<uint64_t>(seed.item<int64_t>());  // CPU scalar: no device sync
  a.prob_rows = c.prob_rows.defined() ? c.prob_rows.data_ptr<float>() : nullptr;
  a.prob = mask_prob;
  a.attn = c.attn.defined() ? c.attn.data_ptr<bool>() : nullptr;
  a.word_starts = c.word_starts.defined() ? c.word_starts.data_ptr<bool>() : nullptr;
  a.B = c.ids.size(0);
  a.L = c.ids.size(1);
  a.max_predictions = max_predictions;
  return a;
}

std::tuple<at::Tensor, at::Tensor> mlm_mask_cuda(const at::Tensor& input_ids,
                                                 const c10::optional<at::Tensor>& attention_mask,
                                                 const c10::optional<at::Tensor>& special_ids,
                                                 const c10::optional<at::Tensor>& word_starts,
                                                 const c10::optional<at::Tensor>& mask_prob_rows,
                                                 const at::Tensor& seed, double mask_prob, int64_t mask_token_id,
                                                 int64_t vocab_size, double replace_prob, double random_prob,
                                                 bool exact_count, int64_t max_predictions) {
  const c10::cuda::CUDAGuard guard(input_ids.device());
  auto c = masking::check_inputs(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed,
                                 mask_token_id, vocab_size, mask_prob, replace_prob, random_prob);
  auto out = at::empty_like(c.ids);
  auto labels = at::empty_like(c.ids);
  if (c.ids.numel() == 0) return {out, labels};
  DeviceArgs a =
      make_args(c, seed, mask_prob, mask_token_id, vocab_size, replace_prob, random_prob, max_predictions);
  const auto aligned = [](const void* ptr, uintptr_t n) { return reinterpret_cast<uintptr_t>(ptr) % n == 0; };
  a.vec4 = c.ids.size(1) % 4 == 0 && aligned(c.ids.data_ptr(), 16) && aligned(out.data_ptr(), 16) &&
           aligned(labels.data_ptr(), 16) && (a.attn == nullptr || aligned(a.attn, 4));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(c.ids.scalar_type(), "mlm_mask_cuda", [&] {
    if (!exact_count && !c.word_starts.defined()) {
      const int threads = 256;
      const int64_t n = c.ids.size(0) * ((c.ids.size(1) + 3) / 4);
      const int64_t max_blocks = static_cast<int64_t>(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 16;
      const int blocks = static_cast<int>(std::min<int64_t>((n + threads - 1) / threads, max_blocks));
      PK_LAUNCH(blocks, threads, 0, stream, mlm_mask_flat_kernel<index_t>)(a, c.ids.data_ptr<index_t>(),
                                                                    out.data_ptr<index_t>(), labels.data_ptr<index_t>());
    } else {
      TORCH_CHECK(c.ids.size(0) <= 2147483647, "input_ids: too many rows");
      PK_LAUNCH(static_cast<unsigned>(c.ids.size(0)), kRowThreads, 0, stream, mlm_mask_row_kernel<index_t>)(
          a, exact_count, c.ids.data_ptr<index_t>(), out.data_ptr<index_t>(), labels.data_ptr<index_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, labels};
}

std::tuple<at::Tensor, at::Tensor> span_mask_cuda(const at::Tensor& input_ids,
                                                  const c10::optional<at::Tensor>& attention_mask,
                                                  const c10::optional<at::Tensor>& special_ids,
                                                  const c10::optional<at::Tensor>& word_starts,
                                                  const c10::optional<at::Tensor>& mask_prob_rows,
                                                  const at::Tensor& seed, double mask_prob, int64_t mask_token_id,
                                                  int64_t vocab_size, double replace_prob, double random_prob,
                                                  double geometric_p, int64_t max_span) {
  const c10::cuda::CUDAGuard guard(input_ids.device());
  auto c = masking::check_inputs(input_ids, attention_mask, special_ids, word_starts, mask_prob_rows, seed,
                                 mask_token_id, vocab_size, mask_prob, replace_prob, random_prob);
  const int64_t span_cap = masking::check_span_args(geometric_p, max_span, c.ids.size(1));
  auto out = c.ids.clone();
  auto labels = at::full_like(c.ids, -100);
  if (c.ids.numel() == 0) return {out, labels};
  const DeviceArgs a = make_args(c, seed, mask_prob, mask_token_id, vocab_size, replace_prob, random_prob, 0);
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_INDEX_TYPES(c.ids.scalar_type(), "span_mask_cuda", [&] {
    const int threads = 64;
    const int blocks = static_cast<int>((c.ids.size(0) + threads - 1) / threads);
    PK_LAUNCH(blocks, threads, 0, stream, span_mask_kernel<index_t>)(a, static_cast<float>(geometric_p),
                                                              span_cap, c.ids.data_ptr<index_t>(),
                                                              out.data_ptr<index_t>(), labels.data_ptr<index_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, labels};
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("mlm_mask", &mlm_mask_cuda);
  m.impl("span_mask", &span_mask_cuda);
}

}  // namespace pk
