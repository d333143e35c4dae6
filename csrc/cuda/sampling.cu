// CUDA kernels of the sampling family: sample, top_k_top_p_filter, speculative_accept,
// unmask_step.
//
// One block of 1024 threads per row, sort-free, no scratch memory, no host sync (CUDA-graph
// capturable). Every value, weight, mass, bin choice and the draw come from the shared
// functions of csrc/common/sampling.h, so the kernels reach the thresholds and tokens of
// the CPU kernels bit for bit; only the organisation of the passes differs:
//
//   1. max pass: mx = max of the penalised logits (greedy rows: their argmax, lowest index on
//      ties) -> row mode (normal / +inf entries / nothing drawable); values (x - mx) / T;
//   2. top-k: three radix levels (11, 11, 10 bits of the 32-bit key) into a shared 2048-bin
//      count histogram (warp-aggregated atomics); the block finds the crossing bin with one
//      BlockScan over the bins. A bin that holds exactly the missing count ends the descent
//      early. After the first level, when at most 2048 keys lie at or above the chosen bin
//      (the usual top-k case), they are gathered into shared memory and every later step
//      (top-k levels, top-p, min-p, total, draw) works on that list; otherwise each level
//      rescans the row (L2-resident after the first pass);
//   3. top-p: the same three levels with fixed-point mass histograms, restricted to the
//      top-k set; the first level's total is Z_k;
//   4. draw (candidate list: each kept candidate's index-order mass prefix by a loop over the
//      list); on the row: each warp owns a contiguous chunk of the row; the warps' kept masses give Z,
//      one 64-bit uniform gives the target, and the one warp whose chunk holds it walks its
//      chunk with warp prefix sums to the token (first index whose inclusive mass sum
//      exceeds the target, as on the CPU).
// Penalties go first into a float32 copy of the logits (one block per row applies each
// distinct previous id once, with its count). Speculative acceptance: thread 0 walks the
// draft, then the block draws the correction / bonus token with the same chunked draw.
//
// unmask_step runs the sample kernel with one block per position (b, l) of the logits
// [B, L, V] (RowMap below: row b's knobs and seed, draw counter l, the mask token read as
// -inf, positions not holding the mask token return at once), which also writes each drawn
// token's confidence; then one block per row ranks the masked positions by (key, position)
// and reveals the num_reveal first: each thread counts, for its positions, the masked
// positions ordered before them (O(L^2 / threads) per row, no sort, no scratch beyond the
// keys).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#ifndef PK_CUDA_EMULATION
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/cub.cuh>
#endif

#include "cuda_seams.cuh"

#include "../common/sampling.h"
#include "../common/sampling_ops.h"

namespace pk {
namespace {

using namespace sampling;

constexpr int kThreads = 1024;
constexpr int kWarps = kThreads / 32;
constexpr int kBinsPerThread = kMaxBins / kThreads;
constexpr int kCand = kMaxBins;  // capacity of the shared candidate list
using ull = unsigned long long;

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  return static_cast<float>(x);
}

struct MaxOp {
  __device__ __forceinline__ float operator()(float a, float b) const { return b > a ? b : a; }
};
struct ArgMax {
  float v;
  int64_t i;
};
struct ArgMaxOp {
  __device__ __forceinline__ ArgMax operator()(const ArgMax& a, const ArgMax& b) const {
    if (a.i < 0) return b;
    if (b.i < 0) return a;
    if (a.v > b.v) return a;
    if (b.v > a.v) return b;
    return a.i < b.i ? a : b;
  }
};

struct Shared {
  union {
    typename cub::BlockScan<ull, kThreads>::TempStorage scan;
    typename cub::BlockReduce<float, kThreads>::TempStorage reduce_f;
    typename cub::BlockReduce<ArgMax, kThreads>::TempStorage reduce_am;
    typename cub::BlockReduce<ull, kThreads>::TempStorage reduce_u;
  } tmp;
  ull hist[kMaxBins];  // histograms; the candidates' masses in the draw of the candidate path
  uint32_t cand_idx[kCand];
  uint32_t cand_key[kCand];
  int ncand;
  ull warp_sum[kWarps];
  ull total;
  ull before;
  ull offset;
  int bin;
  int sel_warp;
  int64_t token;
  int64_t argmax;
  float max_value;
};

// Which row of logits a block of sample_kernel reads and where its results go. sample and
// top_k_top_p_filter: block r is row r (L = 1). unmask_step: block r is position (b, l) =
// (r / L, r % L) of logits [B, L, V] (element strides stride_b, stride_l), drawing with row
// b's knobs and counter l; positions whose token is not mask_id write -1 and return.
struct RowMap {
  int64_t L = 1;
  int64_t stride_b = 0, stride_l = 0;
  const int64_t* tokens = nullptr;  // unmask_step: the tokens [B, L]
  int64_t mask_id = -1;             // never drawn (read as -inf); -1: none
  uint32_t offset = kSampleOffset;
  float* confidence = nullptr;      // unmask_step: the drawn token's confidence [B, L]
};

// Histogram increments of one warp step (all 32 lanes call it): lanes that share a bin add
// once, with the number of lanes.
__device__ __forceinline__ void hist_add_count(ull* hist, uint32_t bin, bool active) {
  const unsigned mask = __ballot_sync(0xffffffffu, active);
  if (active) {
    const unsigned peers = __match_any_sync(mask, bin);
    if ((threadIdx.x & 31) == static_cast<unsigned>(__ffs(peers) - 1)) atomicAdd(&hist[bin], static_cast<ull>(__popc(peers)));
  }
}

// The bin where the running sum over bins, top bin first, first satisfies crossed(cum, total):
// for counts cum >= rem, for masses mass_crossed(above, cum, limit), the first top-p level's
// limit coming from the total of its bins. Same bin as crossing_count / crossing_mass. Sets
// s.bin (-1 if none), s.before and s.total (the sum of all bins).
template <typename Crossed>
__device__ void block_crossing(Shared& s, int nb, Crossed crossed) {
  const int t = threadIdx.x;
  ull vals[kBinsPerThread];
  ull tsum = 0;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int q = t * kBinsPerThread + j;
    vals[j] = q < nb ? s.hist[nb - 1 - q] : 0ull;
    tsum += vals[j];
  }
  if (t == 0) s.bin = -1;
  ull excl, total;
  cub::BlockScan<ull, kThreads>(s.tmp.scan).ExclusiveSum(tsum, excl, total);
  ull cum = excl;
#pragma unroll
  for (int j = 0; j < kBinsPerThread; ++j) {
    const int q = t * kBinsPerThread + j;
    if (q < nb && !crossed(cum, total) && crossed(cum + vals[j], total)) {
      s.bin = nb - 1 - q;
      s.before = cum;
    }
    cum += vals[j];
  }
  if (t == 0) s.total = total;
  __syncthreads();
}

__device__ __forceinline__ void clear_hist(Shared& s, int nb) {
  for (int i = threadIdx.x; i < nb; i += kThreads) s.hist[i] = 0;
  __syncthreads();
}

__device__ __forceinline__ ull warp_sum(ull x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// The chunk of the row owned by a warp in the draw.
__device__ __forceinline__ void warp_chunk(int64_t V, int w, int64_t* lo, int64_t* hi) {
  const int64_t chunk = ((V + kWarps - 1) / kWarps + 31) / 32 * 32;
  *lo = w * chunk;
  *hi = (w + 1) * chunk < V ? (w + 1) * chunk : V;
  if (*lo > V) *lo = V;
}

// Sum of mass(i) over the row (every thread gets it).
template <typename MassFn>
__device__ ull block_total(Shared& s, int64_t V, MassFn mass) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  int64_t lo, hi;
  warp_chunk(V, w, &lo, &hi);
  ull acc = 0;
  for (int64_t i = lo + lane; i < hi; i += 32) acc += mass(i);
  acc = warp_sum(acc);
  if (lane == 0) s.warp_sum[w] = acc;
  __syncthreads();
  if (threadIdx.x == 0) {
    ull z = 0;
    for (int k = 0; k < kWarps; ++k) z += s.warp_sum[k];
    s.total = z;
  }
  __syncthreads();
  return s.total;
}

// The first index whose inclusive mass prefix exceeds target (< total); needs the warp sums
// of block_total with the same mass function. Every thread gets the index.
template <typename MassFn>
__device__ int64_t block_pick(Shared& s, int64_t V, ull target, MassFn mass) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  if (threadIdx.x == 0) {
    s.token = -1;
    s.sel_warp = -1;
    ull cum = 0;
    for (int k = 0; k < kWarps; ++k) {
      if (target < cum + s.warp_sum[k]) {
        s.sel_warp = k;
        s.offset = target - cum;
        break;
      }
      cum += s.warp_sum[k];
    }
  }
  __syncthreads();
  if (w == s.sel_warp) {
    int64_t lo, hi;
    warp_chunk(V, w, &lo, &hi);
    const ull off = s.offset;
    ull carry = 0;
    for (int64_t base = lo; base < hi; base += 32) {
      const int64_t i = base + lane;
      const ull m = i < hi ? mass(i) : 0ull;
      ull incl = m;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const ull y = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += y;
      }
      const bool hit = carry + incl > off && carry + incl - m <= off;
      const unsigned ballot = __ballot_sync(0xffffffffu, hit);
      if (ballot != 0u) {
        if (lane == __ffs(ballot) - 1) s.token = i;
        break;
      }
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
  }
  __syncthreads();
  return s.token;
}

// One row of sample (FILTER = false: token + logprob; with map.confidence, unmask_step's
// draw: token + confidence) or of top_k_top_p_filter (FILTER = true: the filtered row in out).
template <typename in_t, typename out_t, bool FILTER>
__global__ void __launch_bounds__(kThreads)
    sample_kernel(Params p, RowMap map, const in_t* __restrict__ logits, const out_t* __restrict__ original,
                  int64_t* __restrict__ tokens, float* __restrict__ logprobs, out_t* __restrict__ out) {
  __shared__ Shared s;
  const int64_t r = blockIdx.x;  // the output index
  const int64_t b = r / map.L, l = r % map.L;
  const int64_t V = p.V;
  const int tid = threadIdx.x;
  const bool unmask = map.confidence != nullptr;
  auto emit = [&](int64_t token, float logprob, float confidence) {
    tokens[r] = token;
    if (unmask) {
      map.confidence[r] = confidence;
    } else {
      logprobs[r] = logprob;
    }
  };
  if (map.tokens != nullptr && map.tokens[r] != map.mask_id) {
    if (tid == 0) emit(-1, neg_inf(), -1.0f);
    return;
  }
  const in_t* row = logits + b * map.stride_b + l * map.stride_l;
  auto load = [&](int64_t i) { return i == map.mask_id ? neg_inf() : to_float(row[i]); };
  const RowKnobs k = p.knobs(b);
  const bool greedy = !FILTER && k.greedy();
  // a greedy draw of unmask_step takes its confidence from the filtered row at temperature 1
  const float temperature = FILTER || greedy ? 1.0f : k.temperature;

  // 1. max (or argmax for greedy rows).
  if (greedy) {
    ArgMax best{neg_inf(), -1};
    for (int64_t i = tid; i < V; i += kThreads) {
      const float x = load(i);
      if (x > best.v) {
        best.v = x;
        best.i = i;
      }
    }
    const ArgMax am = cub::BlockReduce<ArgMax, kThreads>(s.tmp.reduce_am).Reduce(best, ArgMaxOp());
    if (tid == 0) s.argmax = am.i;
    __syncthreads();
    if (!unmask || s.argmax < 0) {
      if (tid == 0) emit(s.argmax, s.argmax < 0 ? neg_inf() : 0.0f, -1.0f);
      return;
    }
  }
  float mx = neg_inf();  // the largest logit, NaN ignored
  for (int64_t i = tid; i < V; i += kThreads) {
    const float x = load(i);
    mx = x > mx ? x : mx;
  }
  mx = cub::BlockReduce<float, kThreads>(s.tmp.reduce_f).Reduce(mx, MaxOp());
  if (tid == 0) s.max_value = mx;
  __syncthreads();
  mx = s.max_value;
  const int mode = row_mode(mx);
  if (mode == kEmpty) {
    if (FILTER) {
      for (int64_t i = tid; i < V; i += kThreads) out[b * V + i] = static_cast<out_t>(neg_inf());
    } else if (tid == 0) {
      emit(-1, neg_inf(), -1.0f);
    }
    return;
  }
  const float m = 0.0f;  // the largest value (row_value)
  auto value = [&](int64_t i) { return row_value(load(i), mx, temperature, mode); };

  // 2. top-k threshold. The first level runs over the row; when the keys at or above the
  // chosen bin number at most kCand (the usual case for top-k: k plus one bin's worth),
  // they are gathered into shared memory and everything after (the other top-k levels,
  // top-p, min-p, the draw) runs on that list instead of rescanning the row.
  uint32_t threshold = 0;
  bool compact = false;
  int n = 0;
  if (k.topk_on(V)) {
    ull rem = static_cast<ull>(k.top_k);
    uint32_t prefix = 0;
    clear_hist(s, level_bins(0));
    for (int64_t base = 0; base < V; base += kThreads) {
      const int64_t i = base + tid;
      uint32_t key = 0;
      if (i < V) key = float_key(value(i));
      hist_add_count(s.hist, level_bin(key, 0), i < V);
    }
    __syncthreads();
    block_crossing(s, level_bins(0), [rem](ull cum, ull) { return cum >= rem; });
    const int bin0 = s.bin;
    if (bin0 >= 0) {  // always (k < V)
      const ull at_or_above = s.before + s.hist[bin0];
      rem -= s.before;
      prefix = static_cast<uint32_t>(bin0) << level_shift(0);
      bool exact = rem == s.hist[bin0];
      compact = at_or_above <= static_cast<ull>(kCand);
      if (tid == 0) s.ncand = 0;
      __syncthreads();
      if (compact) {
        for (int64_t i = tid; i < V; i += kThreads) {
          const uint32_t key = float_key(value(i));
          if (key >= prefix) {
            const int pos = atomicAdd(&s.ncand, 1);
            if (pos < kCand) {  // always: exactly at_or_above <= kCand keys qualify
              s.cand_idx[pos] = static_cast<uint32_t>(i);
              s.cand_key[pos] = key;
            }
          }
        }
        __syncthreads();
        n = s.ncand < kCand ? s.ncand : kCand;
      }
      for (int level = 1; level < kLevels && !exact; ++level) {
        const int nb = level_bins(level);
        clear_hist(s, nb);
        if (compact) {
          for (int c = tid; c < n; c += kThreads) {
            const uint32_t key = s.cand_key[c];
            if (level_match(key, prefix, level)) atomicAdd(&s.hist[level_bin(key, level)], 1ull);
          }
        } else {
          for (int64_t base = 0; base < V; base += kThreads) {
            const int64_t i = base + tid;
            uint32_t key = 0;
            bool active = false;
            if (i < V) {
              key = float_key(value(i));
              active = level_match(key, prefix, level);
            }
            hist_add_count(s.hist, level_bin(key, level), active);
          }
        }
        __syncthreads();
        block_crossing(s, nb, [rem](ull cum, ull) { return cum >= rem; });
        const int bin = s.bin;
        if (bin < 0) break;  // cannot happen; keep the bins found so far
        rem -= s.before;
        prefix |= static_cast<uint32_t>(bin) << level_shift(level);
        exact = rem == s.hist[bin];
        __syncthreads();
      }
      threshold = prefix;
    }
    __syncthreads();
  }

  // 3. top-p threshold within the top-k set.
  auto weight = [&](float v) { return exp_nonpos(fsub(v, m)); };
  if (k.topp_on()) {
    uint32_t tp;
    if (!(k.top_p > 0.0f)) {
      tp = float_key(m);
    } else {
      uint32_t prefix = 0;
      ull above = 0;
      double limit = 0.0;
      bool ok = true;
      for (int level = 0; level < kLevels; ++level) {
        const int nb = level_bins(level);
        clear_hist(s, nb);
        if (compact) {
          for (int c = tid; c < n; c += kThreads) {
            const uint32_t key = s.cand_key[c];
            if (key < threshold || !level_match(key, prefix, level)) continue;
            const ull w = mass_of(weight(key_float(key)));
            if (w != 0) atomicAdd(&s.hist[level_bin(key, level)], w);
          }
        } else {
          for (int64_t i = tid; i < V; i += kThreads) {
            const float v = value(i);
            const uint32_t key = float_key(v);
            if (key < threshold || !level_match(key, prefix, level)) continue;
            const ull w = mass_of(weight(v));
            if (w != 0) atomicAdd(&s.hist[level_bin(key, level)], w);
          }
        }
        __syncthreads();
        if (level == 0) {
          const float top_p = k.top_p;
          block_crossing(s, nb, [top_p](ull cum, ull total) { return mass_crossed(0, cum, topp_limit(top_p, total)); });
          limit = topp_limit(k.top_p, s.total);
        } else {
          block_crossing(s, nb, [above, limit](ull cum, ull) { return mass_crossed(above, cum, limit); });
        }
        const int bin = s.bin;
        const ull before = s.before;
        __syncthreads();
        if (bin < 0) {  // cannot happen (the limit is below the total); keep the top-k set
          ok = false;
          break;
        }
        above += before;
        prefix |= static_cast<uint32_t>(bin) << level_shift(level);
      }
      tp = ok ? prefix : threshold;
    }
    threshold = tp > threshold ? tp : threshold;
  }

  const bool minp = k.minp_on();
  const float min_p = k.min_p;
  auto kept_mass = [&](int64_t i) -> ull {
    const float v = value(i);
    if (float_key(v) < threshold) return 0ull;
    const float e = weight(v);
    if (minp && !(e >= min_p)) return 0ull;
    return mass_of(e);
  };

  if (FILTER) {
    const bool need_e = minp;
    for (int64_t i = tid; i < V; i += kThreads) {
      const float v = value(i);
      bool keep = float_key(v) >= threshold && filter_passes(load(i), mode);
      if (keep && need_e) keep = weight(v) >= min_p;
      out[b * V + i] = keep ? original[b * V + i] : static_cast<out_t>(neg_inf());
    }
    return;
  }

  // 4. the draw (a greedy row of unmask_step: only the total, for the argmax's confidence).
  const Philox4x32 words = p.words(b, map.offset, static_cast<uint32_t>(l));
  auto finish = [&](int64_t token, ull z) {  // thread 0
    if (greedy) token = s.argmax;
    const float lp = token < 0 ? neg_inf() : logprob_of(value(token), m, z);
    const float conf = unmask && token >= 0 ? unmask_confidence(mass_of(weight(value(token))), z) : -1.0f;
    emit(token, lp, conf);
  };
  if (compact) {
    // Masses of the kept candidates (into the free histogram), their total, then each kept
    // candidate's mass prefix in index order; the one whose interval holds the target wins.
    ull local = 0;
    for (int c = tid; c < n; c += kThreads) {
      const uint32_t key = s.cand_key[c];
      ull w = 0;
      if (key >= threshold) {
        const float e = weight(key_float(key));
        if (!minp || e >= min_p) w = mass_of(e);
      }
      s.hist[c] = w;
      local += w;
    }
    const ull zsum = cub::BlockReduce<ull, kThreads>(s.tmp.reduce_u).Sum(local);
    if (tid == 0) {
      s.total = zsum;
      s.token = -1;
    }
    __syncthreads();
    const ull z = s.total;
    const ull target = draw_target(z, words);
    for (int c = tid; c < n; c += kThreads) {
      const ull w = s.hist[c];
      if (w == 0) continue;
      const uint32_t idx = s.cand_idx[c];
      ull before = 0;
      for (int j = 0; j < n; ++j) before += s.cand_idx[j] < idx ? s.hist[j] : 0ull;
      if (before <= target && target < before + w) s.token = idx;
    }
    __syncthreads();
    if (tid == 0) finish(s.token, z);
    return;
  }
  const ull z = block_total(s, V, kept_mass);
  const ull target = draw_target(z, words);
  const int64_t token = greedy ? s.argmax : block_pick(s, V, target, kept_mass);
  if (tid == 0) finish(token, z);
}

// Penalties into the float32 copy `work` of the logits: one block per row of work (L rows per
// knob row b: unmask_step's positions); each distinct id of prev_tokens (ids outside [0, V)
// ignored) is handled by the thread of its first occurrence.
__global__ void penalty_kernel(Params p, int64_t L, float* __restrict__ work) {
  const int64_t r = blockIdx.x;
  const int64_t b = r / L;
  if (!p.penalties_on(b)) return;
  const int64_t* prev = p.prev + b * p.T;
  const float rep = p.repetition_of(b), pres = p.presence_of(b), freq = p.frequency_of(b);
  for (int64_t j = threadIdx.x; j < p.T; j += blockDim.x) {
    const int64_t id = prev[j];
    if (id < 0 || id >= p.V) continue;
    bool first = true;
    int64_t count = 0;
    for (int64_t q = 0; q < p.T; ++q) {
      if (prev[q] == id) {
        ++count;
        if (q < j) first = false;
      }
    }
    if (first) work[r * p.V + id] = penalize(work[r * p.V + id], count, rep, pres, freq);
  }
}

// The draw of sample (rows = B) or of unmask_step (rows = B * L positions): with penalties
// on, through a float32 copy of the logits [rows, V] that penalty_kernel adjusts.
void launch_draws(const Inputs& in, RowMap map, int64_t rows, int64_t* tokens, float* logprobs) {
  TORCH_CHECK(rows <= 2147483647, "logits: too many rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  const Params& p = in.p;
  const bool penalties = in.prev.defined() && p.T > 0 &&
                         (in.repetition.defined() || in.presence.defined() || in.frequency.defined() ||
                          p.repetition != 1.0f || p.presence != 0.0f || p.frequency != 0.0f);
  if (penalties) {
    auto work = at::empty({rows, p.V}, in.logits.options().dtype(at::kFloat));
    work.view(in.logits.sizes()).copy_(in.logits);
    PK_LAUNCH(static_cast<unsigned>(rows), 256, 0, stream, penalty_kernel)(p, map.L, work.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    map.stride_b = map.L * p.V;
    map.stride_l = p.V;
    PK_LAUNCH(static_cast<unsigned>(rows), kThreads, 0, stream, sample_kernel<float, float, false>)(
        p, map, work.data_ptr<float>(), nullptr, tokens, logprobs, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "sample_cuda", [&] {
    PK_LAUNCH(static_cast<unsigned>(rows), kThreads, 0, stream, sample_kernel<scalar_t, scalar_t, false>)(
        p, map, in.logits.data_ptr<scalar_t>(), nullptr, tokens, logprobs, nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// The CUDA backend of csrc/common/sampling_ops.h.
struct CudaBackend {
  using Guard = c10::cuda::CUDAGuard;
  static constexpr bool kReadsHostValues = false;

  static void sample(const Inputs& in, at::Tensor& tokens, at::Tensor& logprobs) {
    RowMap map;
    map.stride_b = in.p.V;
    launch_draws(in, map, in.p.B, tokens.data_ptr<int64_t>(), logprobs.data_ptr<float>());
  }

  static void filter(const Inputs& in, at::Tensor& out);
  static void speculative(const SpecInputs& s, at::Tensor& out, at::Tensor& accepted);
  static void unmask(const UnmaskInputs& u, at::Tensor& out, at::Tensor& drawn, at::Tensor& confidence);
};

void CudaBackend::filter(const Inputs& in, at::Tensor& out) {
  TORCH_CHECK(in.p.B <= 2147483647, "logits: too many rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, in.logits.scalar_type(), "top_k_top_p_filter_cuda", [&] {
    const scalar_t* x = in.logits.data_ptr<scalar_t>();
    RowMap map;
    map.stride_b = in.p.V;
    PK_LAUNCH(static_cast<unsigned>(in.p.B), kThreads, 0, stream, sample_kernel<scalar_t, scalar_t, true>)(
        in.p, map, x, x, nullptr, nullptr, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    speculative_kernel(Params p, int64_t n, const scalar_t* __restrict__ draft, const int64_t* __restrict__ ids,
                       const scalar_t* __restrict__ target, int64_t* __restrict__ out, int64_t* __restrict__ accepted) {
  __shared__ Shared s;
  __shared__ int64_t s_j;
  const int64_t b = blockIdx.x;
  const int64_t V = p.V;
  const scalar_t* dp = draft + b * n * V;
  const scalar_t* tp = target + b * (n + 1) * V;
  int64_t* orow = out + b * (n + 1);
  if (threadIdx.x == 0) {
    // The walk of csrc/common/sampling.h, as on the CPU (an id outside [0, V) is rejected).
    const int64_t j = accept_walk<scalar_t>(p, b, n, V, ids + b * n, dp, tp, orow);
    s_j = j;
    accepted[b] = j;
  }
  __syncthreads();
  const int64_t j = s_j;
  const scalar_t* t = tp + j * V;
  const scalar_t* q = j < n ? dp + j * V : nullptr;
  auto residual = [&](int64_t i) { return residual_mass(to_float(t[i]), to_float(q[i])); };
  auto direct = [&](int64_t i) { return prob_mass(to_float(t[i])); };
  const Philox4x32 w = p.words(b, kSpeculativeOffset, static_cast<uint32_t>(j));
  int64_t token = -1;
  ull z = q != nullptr ? block_total(s, V, residual) : 0ull;
  if (z != 0) {
    token = block_pick(s, V, draw_target_words(z, w.v[2], w.v[3]), residual);
  } else {
    z = block_total(s, V, direct);
    if (z != 0) token = block_pick(s, V, draw_target_words(z, w.v[2], w.v[3]), direct);
  }
  if (threadIdx.x == 0) {
    orow[j] = token;
    for (int64_t r = j + 1; r <= n; ++r) orow[r] = -1;
  }
}

void CudaBackend::speculative(const SpecInputs& s, at::Tensor& out, at::Tensor& accepted) {
  TORCH_CHECK(s.B <= 2147483647, "draft_probs: too many rows");
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.draft.scalar_type(), "speculative_accept_cuda", [&] {
    PK_LAUNCH(static_cast<unsigned>(s.B), kThreads, 0, stream, speculative_kernel<scalar_t>)(
        s.p, s.n, s.draft.data_ptr<scalar_t>(), s.ids.data_ptr<int64_t>(), s.target.data_ptr<scalar_t>(),
        out.data_ptr<int64_t>(), accepted.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// unmask_step, stage 2: one block per row. Each masked position's ordering key goes to
// keys[r]; then each thread ranks its positions against the row's masked positions, and a
// position whose rank is below the row's reveal count takes its drawn token (if any).
constexpr int kSelectThreads = 256;

__global__ void __launch_bounds__(kSelectThreads)
    unmask_select_kernel(Params p, int64_t L, int64_t mask_id, int strategy, const int64_t* __restrict__ num_reveal,
                         int64_t num_reveal_value, const int64_t* __restrict__ tok, const int64_t* __restrict__ drawn,
                         const float* __restrict__ confidence, uint64_t* __restrict__ keys,
                         int64_t* __restrict__ out) {
  __shared__ typename cub::BlockReduce<ull, kSelectThreads>::TempStorage reduce;
  __shared__ ull s_masked;
  const int64_t b = blockIdx.x;
  const int64_t* trow = tok + b * L;
  uint64_t* krow = keys + b * L;
  ull local = 0;
  for (int64_t l = threadIdx.x; l < L; l += kSelectThreads) {
    if (trow[l] != mask_id) continue;
    const int64_t r = b * L + l;
    const Philox4x32 w = strategy == kRandom ? p.words(b, kRevealOffset, static_cast<uint32_t>(l)) : Philox4x32{};
    krow[l] = reveal_key(strategy, drawn[r], confidence[r], w);
    ++local;
  }
  const ull masked = cub::BlockReduce<ull, kSelectThreads>(reduce).Sum(local);
  if (threadIdx.x == 0) s_masked = masked;
  __syncthreads();  // also publishes the keys to the block
  const int64_t n = reveal_count(num_reveal ? num_reveal[b] : num_reveal_value, static_cast<int64_t>(s_masked));
  for (int64_t l = threadIdx.x; l < L; l += kSelectThreads) {
    const int64_t r = b * L + l;
    int64_t t = trow[l];
    if (t == mask_id && n > 0) {
      const uint64_t key = krow[l];
      int64_t rank = 0;
      for (int64_t j = 0; j < L && rank < n; ++j) {
        if (trow[j] == mask_id && reveal_before(krow[j], j, key, l)) ++rank;
      }
      if (rank < n && drawn[r] >= 0) t = drawn[r];
    }
    out[r] = t;
  }
}

void CudaBackend::unmask(const UnmaskInputs& u, at::Tensor& out, at::Tensor& drawn, at::Tensor& confidence) {
  const int64_t B = u.in.p.B, rows = B * u.L;
  if (rows > 0) {
    TORCH_CHECK(B <= 2147483647, "logits: too many rows");
    RowMap map;
    map.L = u.L;
    map.stride_b = u.stride_b;
    map.stride_l = u.stride_l;
    map.tokens = u.tokens.data_ptr<int64_t>();
    map.mask_id = u.mask_id;
    map.offset = kUnmaskOffset;
    map.confidence = confidence.data_ptr<float>();
    launch_draws(u.in, map, rows, drawn.data_ptr<int64_t>(), nullptr);
    auto keys = at::empty({rows}, u.tokens.options());
    auto stream = at::cuda::getCurrentCUDAStream();
    PK_LAUNCH(static_cast<unsigned>(B), kSelectThreads, 0, stream, unmask_select_kernel)(
        u.in.p, u.L, u.mask_id, u.strategy, u.num_reveal.defined() ? u.num_reveal.data_ptr<int64_t>() : nullptr,
        u.num_reveal_value, u.tokens.data_ptr<int64_t>(), drawn.data_ptr<int64_t>(), confidence.data_ptr<float>(),
        reinterpret_cast<uint64_t*>(keys.data_ptr<int64_t>()), out.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace

PK_CUDA_LIBRARY_IMPL(m) {
  m.impl("sample", &sampling::sample_host<CudaBackend>);
  m.impl("top_k_top_p_filter", &sampling::top_k_top_p_filter_host<CudaBackend>);
  m.impl("speculative_accept", &sampling::speculative_accept_host<CudaBackend>);
  m.impl("unmask_step", &sampling::unmask_step_host<CudaBackend>);
}

}  // namespace pk
