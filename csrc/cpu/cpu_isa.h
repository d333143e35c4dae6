// The one CPU instruction-set dispatch of the CPU kernels.
//
// The default build targets baseline x86-64 (no -march flag), so the wheel runs anywhere.
// Kernels whose speed depends on wider vectors compile their hot loop a second (or third)
// time with a per-function target attribute (PK_TARGET_AVX2, PK_TARGET_AVX512,
// PK_TARGET_AVX512BF16, PK_TARGET_AMX) and pick the version at run time from cpu_isa(),
// detected once from the CPU's features.
// AMX (the tile registers, amx-tile and amx-bf16: the bfloat16 attention tiles) needs more
// than the CPU's feature bits: Linux (5.16 and later) keeps the tile data state off until the
// process asks for it with arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA), and the first
// tile instruction of a process that did not ask faults (SIGILL). The level counts only when
// that request succeeds; elsewhere (other systems, older kernels, CPUs without AMX, AMD) the
// kernels stay on AVX512-BF16 or below. PK_CPU_ISA (csrc/common/env_knobs.h) caps the choice to compare paths;
// it is read once per process, at the first call (the kernels ask per tile).
// pk.build_info()["cpu_isa"] reports what cpu_isa() picks.
// Kernels whose baseline loops are fast enough (the sampler's 4-lane vectors) do not dispatch.
// -DPK_NO_X86 leaves the x86 code out of the build.
#pragma once
#include <cstring>

#include "../common/env_knobs.h"

#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__)) && !defined(PK_NO_X86)
#include <cpuid.h>
#include <immintrin.h>
#define PK_X86 1
#define PK_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define PK_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq")))
#define PK_TARGET_AVX512BF16 __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16")))
#define PK_TARGET_AMX \
  __attribute__((target("avx2,fma,avx512f,avx512vl,avx512bw,avx512dq,avx512bf16,amx-tile,amx-bf16")))
#else
#define PK_X86 0
#endif

namespace pk {
namespace cpu {

// Ordered levels: each implies the ones below it.
enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// Whether this process may use the AMX tiles for bfloat16: the CPU has amx-tile and amx-bf16
// (cpuid leaf 7, EDX bits 24 and 22) and Linux grants the tile data state (see the top).
// The permission is the process's, for all its threads, and asking twice is harmless.
inline bool amx_usable() {
#if PK_X86 && defined(__linux__) && defined(SYS_arch_prctl)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1u) || !((d >> 22) & 1u)) return false;
  constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

// What the hardware has (detected once).
inline Isa detected_isa() {
  static const Isa isa = [] {
#if PK_X86
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq");
    if (avx512 && __builtin_cpu_supports("avx512bf16")) return amx_usable() ? Isa::kAmx : Isa::kAvx512Bf16;
    if (avx512) return Isa::kAvx512;
    if (avx2) return Isa::kAvx2;
#endif
    return Isa::kGeneric;
  }();
  return isa;
}

// What the kernels use: the detected level, capped by PK_CPU_ISA (read once).
inline Isa cpu_isa() {
  static const Isa isa = [] {
    const Isa hw = detected_isa();
    const char* cap = knobs::cpu_isa_cap();
    Isa limit = Isa::kAmx;
    if (std::strcmp(cap, "generic") == 0) limit = Isa::kGeneric;
    if (std::strcmp(cap, "avx2") == 0) limit = Isa::kAvx2;
    if (std::strcmp(cap, "avx512") == 0) limit = Isa::kAvx512;
    if (std::strcmp(cap, "avx512bf16") == 0) limit = Isa::kAvx512Bf16;
    return static_cast<int>(hw) < static_cast<int>(limit) ? hw : limit;
  }();
  return isa;
}

inline bool has_isa(Isa level) { return static_cast<int>(cpu_isa()) >= static_cast<int>(level); }

inline const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "generic";
  }
}

#if PK_X86
// The bfloat16 bits of 16 floats, rounded as c10::BFloat16 rounds (to nearest even, NaN to
// 0x7fc0), in the low half of each 32-bit lane. Unlike vcvtneps2bf16 it keeps denormals.
PK_TARGET_AVX512 inline __m512i bf16_bits_avx512(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  const __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb)), 16);
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc0));
}
#endif

}  // namespace cpu
}  // namespace pk
