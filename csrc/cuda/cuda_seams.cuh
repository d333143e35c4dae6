// The few CUDA-only spellings of the kernels in csrc/cuda/, in one place, so that the tests can
// compile those files as C++ and run them on the CPU (csrc/emu/cuda_emulation.h, with
// PK_CUDA_EMULATION defined; never part of the package). In the real build they are plain
// CUDA:
//   PK_LAUNCH(grid, block, smem, stream, kernel)(args...)   kernel<<<grid, block, smem, stream>>>(args...)
//   PK_CUDA_LIBRARY_IMPL(m)       TORCH_LIBRARY_IMPL(pretrain_kernels, CUDA, m)
//   on_kernel_device(t)           t.is_cuda() (t.is_cpu() under the emulator)
//   dynamic_smem<T>()             the block's dynamic shared memory (extern __shared__)
// Files that need the CUDA runtime, CUB or the ATen CUDA context include them inside
// #ifndef PK_CUDA_EMULATION; the emulator supplies what the kernels use of them. This header
// stays free of ATen so that the per-instance attention files compile quickly.
#pragma once
#ifdef PK_CUDA_EMULATION
#include "../emu/cuda_emulation.h"
#else
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#ifdef PK_CUDA_EMULATION
#define PK_LAUNCH(grid, block, smem, stream, ...) ::pk::emu::launch(grid, block, smem, __VA_ARGS__)
#define PK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pretrain_kernels_emu, CPU, m)
#else
#define PK_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#define PK_CUDA_LIBRARY_IMPL(m) TORCH_LIBRARY_IMPL(pretrain_kernels, CUDA, m)
#endif

namespace pk {

// The device the ops' tensors must be on (a template, so that this header needs no ATen).
template <typename Tensor>
inline bool on_kernel_device(const Tensor& t) {
#ifdef PK_CUDA_EMULATION
  return t.is_cpu();
#else
  return t.is_cuda();
#endif
}

#ifdef PK_CUDA_EMULATION
template <typename T>
inline T* dynamic_smem() {
  return ::pk::emu::dynamic_smem<T>();
}
#else
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char pk_dynamic_smem[];
  return reinterpret_cast<T*>(pk_dynamic_smem);
}
#endif

}  // namespace pk
