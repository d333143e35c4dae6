// CPU kernel of the rotary position embedding (pk.rotary_embedding; the layouts, the math and
// the checks are csrc/common/rotary.h). at::parallel_for over the tokens; per token the cos
// row and the (sign-adjusted) sin row are read once and applied to every head. Each head is
// one pass in the math dtype over plain loops that the compiler vectorises: float32 and
// float64 rows are rotated in place of the load, float16/bfloat16 rows are widened into a
// float32 buffer, rotated, and narrowed into the output. Every output element depends on its
// own pair only, so the thread count never changes a result.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/rotary.h"

namespace pk {
namespace rotary {
namespace {

// One head: o[0:D] = rotate(x[0:D]) with c/s the token's half-length rows (s signed).
template <typename acc_t>
inline void rotate_head(const acc_t* x, acc_t* o, const acc_t* c, const acc_t* s, int64_t half, int64_t D,
                        bool interleaved) {
  if (interleaved) {
    for (int64_t i = 0; i < half; ++i) {
      acc_t a, b;
      rotate(x[2 * i], x[2 * i + 1], c[i], s[i], a, b);
      o[2 * i] = a;
      o[2 * i + 1] = b;
    }
  } else {
    for (int64_t i = 0; i < half; ++i) {
      acc_t a, b;
      rotate(x[i], x[i + half], c[i], s[i], a, b);
      o[i] = a;
      o[i + half] = b;
    }
  }
  for (int64_t j = 2 * half; j < D; ++j) o[j] = x[j];
}

template <typename scalar_t>
void rotary_cpu(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out, const Params& p) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr bool kWiden = !std::is_same<acc_t, scalar_t>::value;
  const scalar_t* xp = x.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const acc_t* cp = cos.data_ptr<acc_t>();
  const acc_t* sp = sin.data_ptr<acc_t>();
  const int64_t B = p.B, T = p.T, H = p.H, D = p.D, half = p.half;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(H * D, 1));
  at::parallel_for(0, B * T, grain, [&](int64_t n0, int64_t n1) {
    std::vector<acc_t> sbuf(half), xbuf(kWiden ? 2 * D : 0);
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t b = n / T, t = n % T;
      const acc_t* c = cp + (b * p.cos_sb + t) * half;
      const acc_t* s = sp + (b * p.cos_sb + t) * half;
      if (p.conjugate) {
        for (int64_t i = 0; i < half; ++i) sbuf[i] = -s[i];
        s = sbuf.data();
      }
      for (int64_t h = 0; h < H; ++h) {
        const scalar_t* xr = xp + b * p.sxb + t * p.sxt + h * p.sxh;
        scalar_t* orow = op + (n * H + h) * D;
        if constexpr (kWiden) {
          acc_t* xw = xbuf.data();
          acc_t* ow = xw + D;
          for (int64_t j = 0; j < D; ++j) xw[j] = static_cast<acc_t>(xr[j]);
          rotate_head<acc_t>(xw, ow, c, s, half, D, p.interleaved);
          for (int64_t j = 0; j < D; ++j) orow[j] = static_cast<scalar_t>(ow[j]);
        } else {
          rotate_head<acc_t>(xr, orow, c, s, half, D, p.interleaved);
        }
      }
    }
  });
}

at::Tensor rotary_embedding_cpu(const at::Tensor& x_in, const at::Tensor& cos_in, const at::Tensor& sin_in,
                                bool interleaved, bool conjugate) {
  TORCH_CHECK(x_in.device().is_cpu(), "x: expected a CPU tensor, got one on ", x_in.device());
  const at::Tensor x = unit_feature_stride(x_in);
  const Params p = check_args(x, cos_in, sin_in, interleaved, conjugate);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  if (out.numel() == 0) return out;
  const at::Tensor cos = table(cos_in, x), sin = table(sin_in, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "pk_rotary_embedding_cpu",
                                  [&] { rotary_cpu<scalar_t>(x, cos, sin, out, p); });
  return out;
}

}  // namespace
}  // namespace rotary
}  // namespace pk

TORCH_LIBRARY_IMPL(pretrain_kernels, CPU, m) { m.impl("rotary_embedding", &pk::rotary::rotary_embedding_cpu); }
