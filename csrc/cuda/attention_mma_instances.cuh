// The tensor-core attention kernels are compiled once per (dtype, head dim), each in its own
// file under csrc/cuda/instances/, so that a parallel build compiles them side by side instead
// of one long translation unit per direction. The dispatching files (attention_fwd.cu,
// attention_bwd.cu) see only these declarations. The lists below and the files must match:
// a missing file is a link error, not a silent fallback.
#pragma once
#include "attention_bwd_mma.cuh"
#include "attention_fwd_mma.cuh"

#define PK_ATTN_FWD_MMA_INSTANCES(X) X(__half, 32) X(__half, 64) X(__half, 96) X(__half, 128) X(__half, 256) X(__nv_bfloat16, 32) X(__nv_bfloat16, 64) X(__nv_bfloat16, 96) X(__nv_bfloat16, 128) X(__nv_bfloat16, 256)
#define PK_ATTN_BWD_MMA_INSTANCES(X) X(__half, 32) X(__half, 64) X(__half, 96) X(__half, 128) X(__half, 256) X(__nv_bfloat16, 32) X(__nv_bfloat16, 64) X(__nv_bfloat16, 96) X(__nv_bfloat16, 128) X(__nv_bfloat16, 256)

#define PK_ATTN_FWD_MMA_SIGNATURE(T, D) void launch_fwd_mma<T, D>(const AttnParams&, int64_t, cudaStream_t)
#define PK_ATTN_BWD_MMA_SIGNATURE(T, D)                                                                        \
  void launch_bwd_mma<T, D>(const AttnParams&, const T*, const float*, const float*, T*, T*, T*, int64_t, int64_t, \
                            const DqAccum&, cudaStream_t)

namespace pk {
namespace attention {
namespace cuda {

#define PK_ATTN_EXTERN_FWD(T, D) extern template PK_ATTN_FWD_MMA_SIGNATURE(T, D);
#define PK_ATTN_EXTERN_BWD(T, D) extern template PK_ATTN_BWD_MMA_SIGNATURE(T, D);
PK_ATTN_FWD_MMA_INSTANCES(PK_ATTN_EXTERN_FWD)
PK_ATTN_BWD_MMA_INSTANCES(PK_ATTN_EXTERN_BWD)
#undef PK_ATTN_EXTERN_FWD
#undef PK_ATTN_EXTERN_BWD

}  // namespace cuda
}  // namespace attention
}  // namespace pk
