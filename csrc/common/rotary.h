// Rotary position embedding (pk.rotary_embedding), shared by the CPU and CUDA kernels: the
// parameter struct, the argument checks (one place, RuntimeError naming the argument) and the
// per-pair math.
//
// x is [B, T, H, D] (or varlen [N, H, D], read as B = 1, T = N), cos/sin hold rotary_dim / 2
// angles per position: [T, rd/2] shared by the batch, or per token [B, T, rd/2] ([N, rd/2]
// for varlen). The first rd = 2 * (rd/2) features of every head are rotated in pairs,
//   interleaved (GPT-J):            (x[2i], x[2i+1])
//   rotate-half (GPT-NeoX, Llama):  (x[i], x[i + rd/2])
// by the angle theta_i of the token: (a, b) -> (a cos - b sin, a sin + b cos); the features
// past rd are copied. conjugate rotates by -theta instead (sin -> -sin): the inverse rotation,
// which is also the op's backward (a rotation's transpose is its inverse). Math in float32
// (float64 for float64 x); the output is a new contiguous tensor shaped and typed like x.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

#include "host_device.h"

namespace pk {
namespace rotary {

struct Params {
  int64_t B = 0, T = 0, H = 0, D = 0, half = 0;  // half = rd / 2
  int64_t sxb = 0, sxt = 0, sxh = 0;            // strides of x (elements; the feature stride is 1)
  int64_t cos_sb = 0;                           // stride of a batch in cos/sin (0: shared), rows of half
  bool interleaved = false;
  bool conjugate = false;
};

// The offsets (within a head) of the two features of pair i.
PK_HD void pair_offsets(int64_t i, int64_t half, bool interleaved, int64_t& first, int64_t& second) {
  first = interleaved ? 2 * i : i;
  second = interleaved ? 2 * i + 1 : i + half;
}

// (a, b) rotated by the angle with cosine c and sine s (s already negated for conjugate).
template <typename acc_t>
PK_HD void rotate(acc_t a, acc_t b, acc_t c, acc_t s, acc_t& out_a, acc_t& out_b) {
  out_a = a * c - b * s;
  out_b = a * s + b * c;
}

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The checks of the op (both backends) and its parameters. x must already have a unit
// feature stride (the entry points copy it otherwise).
inline Params check_args(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved,
                         bool conjugate) {
  TORCH_CHECK(x.dim() == 4 || x.dim() == 3,
              "x: expected [batch, seqlen, heads, head_dim] or varlen [tokens, heads, head_dim], got shape ", x.sizes());
  TORCH_CHECK(is_float_dtype(x.scalar_type()), "x: expected float32, float16, bfloat16 or float64, got ",
              x.scalar_type());
  TORCH_CHECK(is_float_dtype(cos.scalar_type()), "cos: expected a float tensor, got ", cos.scalar_type());
  TORCH_CHECK(is_float_dtype(sin.scalar_type()), "sin: expected a float tensor, got ", sin.scalar_type());
  TORCH_CHECK(cos.device() == x.device(), "cos: expected a tensor on ", x.device(), " (that of x), got ", cos.device());
  TORCH_CHECK(sin.device() == x.device(), "sin: expected a tensor on ", x.device(), " (that of x), got ", sin.device());
  TORCH_CHECK(cos.sizes() == sin.sizes(), "cos, sin: expected one shape, got ", cos.sizes(), " and ", sin.sizes());
  Params p;
  const bool varlen = x.dim() == 3;
  p.B = varlen ? 1 : x.size(0);
  p.T = varlen ? x.size(0) : x.size(1);
  p.H = x.size(-2);
  p.D = x.size(-1);
  p.sxb = varlen ? 0 : x.stride(0);
  p.sxt = varlen ? x.stride(0) : x.stride(1);
  p.sxh = x.stride(-2);
  p.interleaved = interleaved;
  p.conjugate = conjugate;
  TORCH_CHECK(cos.dim() >= 1, "cos: expected [seqlen, rotary_dim / 2] or per token [batch, seqlen, rotary_dim / 2], "
              "got a 0-d tensor");
  p.half = cos.size(-1);
  TORCH_CHECK(p.half >= 1 && 2 * p.half <= p.D, "cos: rotary_dim (2 * its last dim, ", 2 * p.half,
              ") must be in [2, head_dim ", p.D, "]");
  if (varlen) {
    TORCH_CHECK(cos.dim() == 2 && cos.size(0) == p.T, "cos: expected [tokens, rotary_dim / 2] = [", p.T,
                ", rotary_dim / 2] for varlen x, got shape ", cos.sizes());
  } else if (cos.dim() == 2) {
    TORCH_CHECK(cos.size(0) == p.T, "cos: expected [seqlen, rotary_dim / 2] = [", p.T,
                ", rotary_dim / 2] (seqlen of x), got shape ", cos.sizes());
  } else {
    TORCH_CHECK(cos.dim() == 3 && cos.size(0) == p.B && cos.size(1) == p.T,
                "cos: expected [seqlen, rotary_dim / 2] or per token [batch, seqlen, rotary_dim / 2] = [", p.B, ", ",
                p.T, ", rotary_dim / 2], got shape ", cos.sizes());
    p.cos_sb = p.T;
  }
  return p;
}

// x with a unit feature stride, cos and sin contiguous in the kernels' math dtype.
inline at::Tensor unit_feature_stride(const at::Tensor& x) {
  return x.size(-1) <= 1 || x.stride(-1) == 1 ? x : x.contiguous();
}

inline at::Tensor table(const at::Tensor& t, const at::Tensor& x) {
  return t.to(x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat).contiguous();
}

}  // namespace rotary
}  // namespace pk
