// Every environment variable the kernels read, in one place (the README lists them).
//
// These are kernel-development knobs only: they pick between code paths that compute the same
// result, to compare them on a new machine. Nothing that changes an op's semantics is read
// from the environment (torch.compile and CUDA graphs cannot see it); such choices are op
// arguments. Each knob is read on every call, so a test or benchmark can flip it in-process.
//
//   PK_CPU_ISA=generic|avx2|avx512|avx512bf16|amx
//                                      caps the instruction set the CPU kernels dispatch to
//                                      (default: the best the CPU has; csrc/cpu/cpu_isa.h;
//                                      avx512bf16: the bf16 attention tiles without AMX)
//   PK_ATTENTION_CUDA_PATH=simt        float16/bfloat16 attention on the SIMT kernels instead
//                                      of the tensor-core ones
//   PK_ATTENTION_FWD_BLOCK_M=64        64-row forward blocks everywhere (default: 128 rows
//                                      where the head dim allows)
//   PK_ATTENTION_BWD=separate|ordered  the dQ scheme of the tensor-core backward when it must be
//                                      reproducible (flash_attn_bwd's deterministic=true; both
//                                      schemes are bit-for-bit reproducible; default separate)
#pragma once
#include <cstdlib>
#include <cstring>

namespace pk {
namespace knobs {

// The value of PK_<name>, or "" when unset.
inline const char* env(const char* name) {
  const char* v = std::getenv(name);
  return v == nullptr ? "" : v;
}

inline bool env_is(const char* name, const char* value) { return std::strcmp(env(name), value) == 0; }

inline const char* cpu_isa_cap() { return env("PK_CPU_ISA"); }
inline bool attention_cuda_simt() { return env_is("PK_ATTENTION_CUDA_PATH", "simt"); }
inline bool attention_fwd_block_m_64() { return env_is("PK_ATTENTION_FWD_BLOCK_M", "64"); }
inline const char* attention_bwd_scheme() { return env("PK_ATTENTION_BWD"); }

}  // namespace knobs
}  // namespace pk
