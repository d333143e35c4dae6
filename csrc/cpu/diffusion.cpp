// CPU kernels of the denoising family: add_noise, diffusion_loss (+ backward) and the solver
// steps (DDPM, DDIM, Euler, Heun, DPM-Solver++ 2M, flow matching).
//
// Every op is "per-sample coefficients, then one elementwise pass" (csrc/common/diffusion.h).
// The pass walks the batch in chunks of kChunk elements of one sample (at::parallel_for over
// chunks): the chunk's coefficients are computed once in double, fp16/bf16 inputs are
// widened into float buffers (fp32/fp64 are read in place), the branch-free body runs over
// the chunk (the compiler vectorises it), and the outputs are narrowed back. Noise is drawn
// from Philox per element index, so the thread count never changes a result and the CUDA
// kernels draw the same normals.
//
// diffusion_loss reduces (pred - target)^2 per chunk in float (double for fp64), then adds
// the chunk sums of a sample in order in double: deterministic for any thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/diffusion.h"
#include "../common/diffusion_ops.h"
#include "cpu_isa.h"
#include "direct_calls.h"

namespace pk {
namespace diffusion {
namespace {

constexpr int64_t kChunk = 1024;

// The elementwise body over one chunk. Branch free, so the compiler vectorises it.
template <typename acc_t, class Step>
inline __attribute__((always_inline)) void apply_loop(const acc_t* __restrict__ c, const acc_t* __restrict__ a0,
                                                      const acc_t* __restrict__ a1, const acc_t* __restrict__ a2,
                                                      const acc_t* __restrict__ a3, const acc_t* __restrict__ z,
                                                      acc_t* __restrict__ o0, acc_t* __restrict__ o1, int64_t n) {
  acc_t cl[kNumCoef];
  for (int k = 0; k < kNumCoef; ++k) cl[k] = c[k];
  for (int64_t j = 0; j < n; ++j) {
    acc_t r0, r1;
    Step::template apply<acc_t>(cl, a0[j], a1[j], a2[j], a3[j], z[j], r0, r1);
    o0[j] = r0;
    o1[j] = r1;
  }
}

// The default build targets baseline x86-64 (SSE2). The float body is also compiled for
// AVX2 + FMA and picked at run time by the CPU dispatch of csrc/cpu/cpu_isa.h: the steps do
// 10-20 flops per element, so the 8-wide version is about twice as fast as the 4-wide one.
#if PK_X86
template <class Step>
PK_TARGET_AVX2 void apply_loop_avx2(const float* c, const float* a0, const float* a1, const float* a2, const float* a3,
                                    const float* z, float* o0, float* o1, int64_t n) {
  apply_loop<float, Step>(c, a0, a1, a2, a3, z, o0, o1, n);
}
#endif

template <typename acc_t, class Step>
void apply_chunk(const acc_t* c, const acc_t* a0, const acc_t* a1, const acc_t* a2, const acc_t* a3, const acc_t* z,
                 acc_t* o0, acc_t* o1, int64_t n) {
#if PK_X86
  if constexpr (std::is_same<acc_t, float>::value) {
    if (cpu::has_isa(cpu::Isa::kAvx2)) {
      apply_loop_avx2<Step>(c, a0, a1, a2, a3, z, o0, o1, n);
      return;
    }
  }
#endif
  apply_loop<acc_t, Step>(c, a0, a1, a2, a3, z, o0, o1, n);
}

// Normals of elements [base, base + n) into out[(base % 4) + j]: whole Philox blocks, four
// normals each, in a loop without branches (vectorised, AVX2 when the CPU has it).
inline void fill_normals_generic(uint64_t seed, uint32_t offset, int64_t blk0, int64_t nblk, float* __restrict__ out) {
  for (int64_t k = 0; k < nblk; ++k) normal_block(seed, static_cast<uint64_t>(blk0 + k), offset, out + 4 * k);
}

#if PK_X86
PK_TARGET_AVX2 void fill_normals_avx2(uint64_t seed, uint32_t offset, int64_t blk0, int64_t nblk,
                                                           float* __restrict__ out) {
  for (int64_t k = 0; k < nblk; ++k) normal_block(seed, static_cast<uint64_t>(blk0 + k), offset, out + 4 * k);
}
#endif

inline void fill_normals(uint64_t seed, uint32_t offset, int64_t base, int64_t n, float* out) {
  const int64_t blk0 = base >> 2, blk1 = (base + n + 3) >> 2;
#if PK_X86
  if (cpu::has_isa(cpu::Isa::kAvx2)) {
    fill_normals_avx2(seed, offset, blk0, blk1 - blk0, out);
    return;
  }
#endif
  fill_normals_generic(seed, offset, blk0, blk1 - blk0, out);
}

struct CpuBackend {
  template <class Step>
  static void run(const Step& st, StepIO& io) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, io.out[0].scalar_type(), "pk_diffusion_step_cpu", [&] {
      run_typed<scalar_t>(st, io);
    });
  }

  template <typename scalar_t, class Step>
  static void run_typed(const Step& st, StepIO& io) {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
    const int64_t B = io.B, inner = io.inner;
    const int64_t nchunks = (inner + kChunk - 1) / kChunk;
    const scalar_t* in[4];
    for (int k = 0; k < 4; ++k) in[k] = io.in[k].defined() ? io.in[k].template data_ptr<scalar_t>() : nullptr;
    const scalar_t* noise = io.noise.defined() ? io.noise.template data_ptr<scalar_t>() : nullptr;
    scalar_t* out0 = io.out[0].template data_ptr<scalar_t>();
    scalar_t* out1 = io.out[1].defined() ? io.out[1].template data_ptr<scalar_t>() : nullptr;
    const bool draw = io.draw_noise;
    const uint64_t seed = io.seed;
    const uint32_t offset = io.offset;
    const int64_t grain = std::max<int64_t>(1, 32768 / kChunk);
    at::parallel_for(0, B * nchunks, grain, [&](int64_t c0, int64_t c1) {
      // Buffers: 4 inputs, noise, 2 outputs, zeros.
      std::vector<acc_t> buf(8 * kChunk);
      acc_t* bin[4] = {buf.data(), buf.data() + kChunk, buf.data() + 2 * kChunk, buf.data() + 3 * kChunk};
      acc_t* bz = buf.data() + 4 * kChunk;
      acc_t* bo0 = buf.data() + 5 * kChunk;
      acc_t* bo1 = buf.data() + 6 * kChunk;
      acc_t* zeros = buf.data() + 7 * kChunk;
      std::fill(zeros, zeros + kChunk, acc_t(0));
      std::vector<float> nbuf(draw ? kChunk + 8 : 0);
      int64_t last_b = -1;
      double cd[kNumCoef] = {0};
      acc_t cf[kNumCoef] = {};
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c / nchunks;
        const int64_t j0 = (c - b * nchunks) * kChunk;
        const int64_t n = std::min(kChunk, inner - j0);
        const int64_t base = b * inner + j0;
        if (b != last_b) {
          for (int k = 0; k < kNumCoef; ++k) cd[k] = 0.0;
          st.coef(b, cd);
          for (int k = 0; k < kNumCoef; ++k) cf[k] = static_cast<acc_t>(cd[k]);
          last_b = b;
        }
        const acc_t* a[4];
        for (int k = 0; k < 4; ++k) {
          if (in[k] == nullptr) {
            a[k] = zeros;
          } else if constexpr (kDirect) {
            a[k] = reinterpret_cast<const acc_t*>(in[k] + base);
          } else {
            for (int64_t j = 0; j < n; ++j) bin[k][j] = static_cast<acc_t>(in[k][base + j]);
            a[k] = bin[k];
          }
        }
        const acc_t* z = zeros;
        if (noise != nullptr) {
          if constexpr (kDirect) {
            z = reinterpret_cast<const acc_t*>(noise + base);
          } else {
            for (int64_t j = 0; j < n; ++j) bz[j] = static_cast<acc_t>(noise[base + j]);
            z = bz;
          }
        } else if (draw) {
          fill_normals(seed, offset, base, n, nbuf.data());
          for (int64_t j = 0; j < n; ++j) bz[j] = static_cast<acc_t>(nbuf[(base & 3) + j]);
          z = bz;
        }
        acc_t* o0 = bo0;
        acc_t* o1 = bo1;
        if constexpr (kDirect) {
          o0 = reinterpret_cast<acc_t*>(out0 + base);
          if (out1 != nullptr) o1 = reinterpret_cast<acc_t*>(out1 + base);
        }
        apply_chunk<acc_t, Step>(cf, a[0], a[1], a[2], a[3], z, o0, o1, n);
        if constexpr (!kDirect) {
          for (int64_t j = 0; j < n; ++j) out0[base + j] = static_cast<scalar_t>(bo0[j]);
          if (out1 != nullptr)
            for (int64_t j = 0; j < n; ++j) out1[base + j] = static_cast<scalar_t>(bo1[j]);
        }
      }
    });
  }

  template <typename acc_t>
  static acc_t sumsq_diff(const acc_t* __restrict__ p, const acc_t* __restrict__ y, int64_t n) {
    // Eight independent partial sums: vectorises without reassociating a single chain.
    acc_t s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
      for (int l = 0; l < 8; ++l) {
        const acc_t d = p[j + l] - y[j + l];
        s[l] += d * d;
      }
    for (; j < n; ++j) {
      const acc_t d = p[j] - y[j];
      s[0] += d * d;
    }
    return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
  }

  static void loss(const LossWeights& w, const at::Tensor& pred, const at::Tensor& target, int64_t B, int64_t inner,
                   at::Tensor& out) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pred.scalar_type(), "pk_diffusion_loss_cpu",
                                    [&] { loss_typed<scalar_t>(w, pred, target, B, inner, out); });
  }

  template <typename scalar_t>
  static void loss_typed(const LossWeights& w, const at::Tensor& pred, const at::Tensor& target, int64_t B,
                         int64_t inner, at::Tensor& out) {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr bool kDirect = std::is_same<scalar_t, acc_t>::value;
    const scalar_t* p = pred.data_ptr<scalar_t>();
    const scalar_t* y = target.data_ptr<scalar_t>();
    const int64_t nchunks = (inner + kChunk - 1) / kChunk;
    std::vector<double> partial(B * nchunks);
    at::parallel_for(0, B * nchunks, std::max<int64_t>(1, 32768 / kChunk), [&](int64_t c0, int64_t c1) {
      std::vector<acc_t> buf(2 * kChunk);
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = c / nchunks;
        const int64_t j0 = (c - b * nchunks) * kChunk;
        const int64_t n = std::min(kChunk, inner - j0);
        const int64_t base = b * inner + j0;
        if constexpr (kDirect) {
          partial[c] = static_cast<double>(sumsq_diff<acc_t>(p + base, y + base, n));
        } else {
          for (int64_t j = 0; j < n; ++j) {
            buf[j] = static_cast<acc_t>(p[base + j]);
            buf[kChunk + j] = static_cast<acc_t>(y[base + j]);
          }
          partial[c] = static_cast<double>(sumsq_diff<acc_t>(buf.data(), buf.data() + kChunk, n));
        }
      }
    });
    for (int64_t b = 0; b < B; ++b) {
      double s = 0.0;
      for (int64_t c = 0; c < nchunks; ++c) s += partial[b * nchunks + c];
      const double v = w.weight(b) * s / static_cast<double>(inner);
      if (out.scalar_type() == at::kDouble) out.data_ptr<double>()[b] = v;
      else out.data_ptr<float>()[b] = static_cast<float>(v);
    }
  }
};

}  // namespace
}  // namespace diffusion

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) { PK_REGISTER_DIFFUSION_OPS(m, ::pk::diffusion::CpuBackend); }

// diffusion_loss's CPU kernel for the direct entry of csrc/module.cpp (direct_calls.h): the
// Ops member registered above, under a name module.cpp can reach.
at::Tensor cpu::diffusion_loss(const at::Tensor& pred, const at::Tensor& target,
                               const std::optional<at::Tensor>& timesteps,
                               const std::optional<at::Tensor>& alphas_cumprod, c10::string_view weighting,
                               double gamma, c10::string_view prediction_type) {
  return diffusion::Ops<diffusion::CpuBackend>::diffusion_loss(pred, target, timesteps, alphas_cumprod, weighting,
                                                               gamma, prediction_type);
}

}  // namespace pk
