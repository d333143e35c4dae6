// Philox4x32-10 counter-based RNG (Salmon et al., "Parallel random numbers: as easy
// as 1, 2, 3", SC'11), usable from host and device code.
//
// Every random number in pretrain-kernels comes from here. A draw is a pure function of
// (key, counter): key = the 64-bit seed, counter = (element index lo, element index hi,
// offset, draw). "offset" separates independent uses of one seed inside an op, "draw"
// numbers successive draws for the same element (rejection loops). Because nothing
// depends on the launch shape or thread count, the same seed gives bit-identical
// integers on CPU and CUDA; uniform floats are exact functions of those integers, so they
// match bit for bit too. Normals go through logf/cosf/sinf, which may differ by an ulp
// between the host libm and CUDA.
#pragma once
#include <cmath>
#include <cstdint>

#include "host_device.h"

namespace pk {

struct Philox4x32 {
  uint32_t v[4];
};

PK_HD uint32_t mulhilo32(uint32_t a, uint32_t b, uint32_t* hi) {
  const uint64_t p = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  *hi = static_cast<uint32_t>(p >> 32);
  return static_cast<uint32_t>(p);
}

// The raw bijection: 10 rounds, key bumped between rounds (Random123's philox4x32_R).
PK_HD Philox4x32 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                               uint32_t k1) {
  constexpr uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u;
  constexpr uint32_t W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += W0;
      k1 += W1;
    }
    uint32_t hi0, hi1;
    const uint32_t lo0 = mulhilo32(M0, c0, &hi0);
    const uint32_t lo1 = mulhilo32(M1, c2, &hi1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
  }
  Philox4x32 out;
  out.v[0] = c0;
  out.v[1] = c1;
  out.v[2] = c2;
  out.v[3] = c3;
  return out;
}

// Four 32-bit words for (seed, element index, offset, draw).
PK_HD Philox4x32 philox_draw(uint64_t seed, uint64_t index, uint32_t offset, uint32_t draw = 0) {
  return philox4x32_10(static_cast<uint32_t>(index), static_cast<uint32_t>(index >> 32), offset,
                       draw, static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32));
}

// Uniform float in [0, 1) with 24 random bits: exact, identical on every backend.
PK_HD float uniform_float(uint32_t x) { return static_cast<float>(x >> 8) * 5.9604644775390625e-08f; }

// Uniform float in (0, 1]: safe as the argument of a log.
PK_HD float uniform_float_open0(uint32_t x) {
  return (static_cast<float>(x >> 8) + 1.0f) * 5.9604644775390625e-08f;
}

// A stream of words for one element: successive philox blocks with draw = 0, 1, 2, ...
// Used where an element needs an unbounded number of words (rejection sampling).
struct PhiloxStream {
  uint64_t seed;
  uint64_t index;
  uint32_t offset;
  uint32_t draw;
  Philox4x32 block;
  int used;
  PK_HD PhiloxStream(uint64_t seed_, uint64_t index_, uint32_t offset_)
      : seed(seed_), index(index_), offset(offset_), draw(0), used(4) {}
  PK_HD uint32_t next() {
    if (used == 4) {
      block = philox_draw(seed, index, offset, draw++);
      used = 0;
    }
    return block.v[used++];
  }
};

// Uniform integer in [0, n) without modulo bias (Lemire's multiply-shift with rejection).
// n must be >= 1 and < 2^32. The expected number of words is below 2 for any n.
PK_HD uint32_t uniform_int(PhiloxStream& s, uint32_t n) {
  uint64_t m = static_cast<uint64_t>(s.next()) * n;
  uint32_t low = static_cast<uint32_t>(m);
  if (low < n) {
    const uint32_t threshold = (0u - n) % n;  // 2^32 mod n
    while (low < threshold) {
      m = static_cast<uint64_t>(s.next()) * n;
      low = static_cast<uint32_t>(m);
    }
  }
  return static_cast<uint32_t>(m >> 32);
}

// Two independent standard normals by Box-Muller from two words.
PK_HD void normal_pair(uint32_t a, uint32_t b, float* z0, float* z1) {
  const float u1 = uniform_float_open0(a);
  const float u2 = uniform_float(b);
  const float r = sqrtf(-2.0f * logf(u1));
  const float theta = 6.283185307179586f * u2;
#if defined(__CUDA_ARCH__)
  float s, c;
  sincosf(theta, &s, &c);
  *z0 = r * c;
  *z1 = r * s;
#else
  *z0 = r * cosf(theta);
  *z1 = r * sinf(theta);
#endif
}

#if !defined(__CUDA_ARCH__)
// N independent Philox blocks at once, counters (c0 + i, c1, c2, c3) for i < N, in
// structure-of-arrays form so that the compiler vectorises the rounds (32x32->64-bit
// multiplies map to vpmuludq). Host only; results equal N calls of philox4x32_10.
template <int N>
#if defined(__GNUC__)
__attribute__((always_inline))  // inline into each ISA clone of the caller so it vectorises there
#endif
inline void philox4x32_10_block(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0, uint32_t k1,
                                uint32_t (*out)[N]) {
  uint32_t a[N], b[N], c[N], d[N];
  for (int i = 0; i < N; ++i) {
    a[i] = c0 + static_cast<uint32_t>(i);
    b[i] = c1;
    c[i] = c2;
    d[i] = c3;
  }
  for (int r = 0; r < 10; ++r) {
    if (r > 0) {
      k0 += 0x9E3779B9u;
      k1 += 0xBB67AE85u;
    }
    for (int i = 0; i < N; ++i) {
      const uint64_t p0 = static_cast<uint64_t>(0xD2511F53u) * a[i];
      const uint64_t p1 = static_cast<uint64_t>(0xCD9E8D57u) * c[i];
      const uint32_t n0 = static_cast<uint32_t>(p1 >> 32) ^ b[i] ^ k0;
      const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ d[i] ^ k1;
      a[i] = n0;
      b[i] = static_cast<uint32_t>(p1);
      c[i] = n2;
      d[i] = static_cast<uint32_t>(p0);
    }
  }
  for (int i = 0; i < N; ++i) {
    out[0][i] = a[i];
    out[1][i] = b[i];
    out[2][i] = c[i];
    out[3][i] = d[i];
  }
}
#endif

}  // namespace pk
