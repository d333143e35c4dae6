// C++ tests of csrc/common/philox.h: the published Random123 known-answer vectors for
// Philox4x32-10, plus properties of the derived helpers. Run by ctest (see CMakeLists.txt).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <vector>

#include "common/philox.h"

static int failures = 0;
#define EXPECT(cond)                                                   \
  do {                                                                 \
    if (!(cond)) {                                                     \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                      \
    }                                                                  \
  } while (0)

static void known_answers() {
  struct Kat {
    uint32_t ctr[4], key[2], out[4];
  };
  const Kat kats[] = {
      {{0, 0, 0, 0}, {0, 0}, {0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u}},
      {{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu},
       {0xffffffffu, 0xffffffffu},
       {0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu}},
      {{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u},
       {0xa4093822u, 0x299f31d0u},
       {0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}},
  };
  for (const auto& k : kats) {
    const pk::Philox4x32 r = pk::philox4x32_10(k.ctr[0], k.ctr[1], k.ctr[2], k.ctr[3], k.key[0], k.key[1]);
    for (int i = 0; i < 4; ++i) EXPECT(r.v[i] == k.out[i]);
  }
  // philox_draw's layout: counter = (index lo, index hi, offset, draw), key = seed.
  const pk::Philox4x32 a = pk::philox_draw(0x299f31d0a4093822ull, 0x85a308d3243f6a88ull, 0x13198a2eu, 0x03707344u);
  EXPECT(a.v[0] == 0xd16cfe09u && a.v[3] == 0x24126ea1u);
}

static void uniform_helpers() {
  EXPECT(pk::uniform_float(0u) == 0.0f);
  EXPECT(pk::uniform_float(0xffffffffu) < 1.0f);
  EXPECT(pk::uniform_float_open0(0u) > 0.0f);
  EXPECT(pk::uniform_float_open0(0xffffffffu) == 1.0f);
  // uniform_int: in range, and close to uniform over a non-power-of-two n.
  const uint32_t n = 7;
  std::vector<int> counts(n, 0);
  const int draws = 700000;
  for (int i = 0; i < draws; ++i) {
    pk::PhiloxStream s(42, static_cast<uint64_t>(i), 0);
    const uint32_t x = pk::uniform_int(s, n);
    EXPECT(x < n);
    counts[x]++;
  }
  double chi = 0;
  for (uint32_t i = 0; i < n; ++i) {
    const double e = draws / double(n);
    chi += (counts[i] - e) * (counts[i] - e) / e;
  }
  EXPECT(chi < 40.0);  // 6 dof: p ~ 3e-7
  // n = 1 and a huge n that forces rejections stay in range.
  pk::PhiloxStream s1(1, 1, 1);
  EXPECT(pk::uniform_int(s1, 1) == 0);
  for (int i = 0; i < 1000; ++i) {
    pk::PhiloxStream s(7, static_cast<uint64_t>(i), 3);
    EXPECT(pk::uniform_int(s, 0x80000001u) < 0x80000001u);
  }
  // Normals: mean ~0, variance ~1.
  double sum = 0, sq = 0;
  const int m = 200000;
  for (int i = 0; i < m; ++i) {
    const pk::Philox4x32 w = pk::philox_draw(9, static_cast<uint64_t>(i), 0);
    float z0, z1;
    pk::normal_pair(w.v[0], w.v[1], &z0, &z1);
    EXPECT(std::isfinite(z0) && std::isfinite(z1));
    sum += z0 + z1;
    sq += double(z0) * z0 + double(z1) * z1;
  }
  const double mean = sum / (2.0 * m), var = sq / (2.0 * m) - mean * mean;
  EXPECT(std::fabs(mean) < 0.01);
  EXPECT(std::fabs(var - 1.0) < 0.02);
}

int main() {
  known_answers();
  uniform_helpers();
  if (failures) {
    std::fprintf(stderr, "%d check(s) failed\n", failures);
    return 1;
  }
  std::printf("philox: all checks passed\n");
  return 0;
}
