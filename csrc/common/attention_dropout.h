// Attention dropout: which entries of the attention matrix a call keeps, the same decision on
// the CPU and the CUDA kernels, bit for bit.
//
// Semantics (torch's and FlashAttention's). P = softmax(S) is the softmax of the scores,
// computed WITHOUT dropout (the statistics m, l and the returned lse are the no-dropout ones);
// the output is
//     out = (P * keep / (1 - p)) V
// with keep a Bernoulli(1 - p) mask per (sequence, head, query, key). The backward pass
// regenerates the mask (it is never stored) and computes
//     dV = (P * keep / (1 - p))^T dO,   dP = (dO V^T) * keep / (1 - p),
//     dS = P * (dP - Di),  Di = rowsum(dO * out) (- dlse),
// which is the plain identity: out already contains the dropout, and
// sum_j P_ij dP_ij = sum_j P_ij keep_ij / (1 - p) (dO_i . V_j) = dO_i . out_i.
//
// The keep mask. Element (b, h, i, j): sequence b of the call, query head h of H, query i and
// key j as positions inside the sequence (so a sequence gets the same mask dense or packed into
// a varlen batch), takes a 16-bit value
//     u = 16-bit half (j % 2) of word (j % 8) / 2 of
//         philox_draw(seed, index = (b * H + h) << 32 | i, offset, draw = j / 8)
// (the low half for even j) and is kept when u >= threshold, threshold = round(p * 65536).
// One Philox block serves 8 neighbouring keys. p is quantised to 1/65536: the keep probability
// is exactly 1 - threshold / 65536, and the kept values are scaled by 65536 / (65536 -
// threshold) (so the output stays unbiased); p >= 1 - 2^-17 drops every element and the output
// is 0 (torch's convention for p = 1). Limits of the packing: b * H + h < 2^32, i < 2^32 and
// j < 2^35 (the checks keep heads <= 2^20 and batch < 2^31; sequences this long do not fit
// in memory).
//
// seed and offset: the 64-bit Philox key and a 32-bit counter word, both taken from the
// dropout_seed tensor (int64 [2]: seed, offset; offset in [0, 2^32)). A call's forward and
// backward pass the same tensor. Nothing depends on thread count, tile shape or launch shape.
#pragma once
#include <cstdint>

#include "host_device.h"
#include "philox.h"

namespace pk {
namespace attention {

constexpr uint32_t kDropoutOne = 65536;  // threshold of p = 1 (drop everything)

struct Dropout {
  uint32_t threshold = 0;   // 0: off; keep when the 16-bit value >= threshold
  float rscale = 1.f;       // 65536 / (65536 - threshold), 0 when everything is dropped
  uint64_t seed = 0;
  uint32_t offset = 0;
  const int64_t* seed_dev = nullptr;  // CUDA: seed tensor on the GPU, read by the kernels
  PK_HD bool on() const { return threshold != 0; }
};

// round(p * 65536) for p in [0, 1].
PK_HD uint32_t dropout_threshold(double p) {
  const double t = p * 65536.0 + 0.5;
  return t >= 65536.0 ? kDropoutOne : static_cast<uint32_t>(t);
}

PK_HD double dropout_rscale(uint32_t threshold) {
  return threshold >= kDropoutOne ? 0.0 : 65536.0 / static_cast<double>(kDropoutOne - threshold);
}

// Philox index of row (sequence b, head h of H, query i).
PK_HD uint64_t dropout_row_index(int64_t b, int64_t h, int64_t H, int64_t i) {
  return (static_cast<uint64_t>(b * H + h) << 32) | static_cast<uint32_t>(i);
}

// The 16-bit value of key j in row `index` (the scalar reference of every backend).
PK_HD uint32_t dropout_bits(uint64_t seed, uint32_t offset, uint64_t index, int64_t j) {
  const Philox4x32 w = philox_draw(seed, index, offset, static_cast<uint32_t>(j >> 3));
  const uint32_t word = w.v[(j & 7) >> 1];
  return (j & 1) ? (word >> 16) : (word & 0xFFFFu);
}

PK_HD bool dropout_keep(const Dropout& d, uint64_t index, int64_t j) {
  return dropout_bits(d.seed, d.offset, index, j) >= d.threshold;
}

}  // namespace attention
}  // namespace pk
