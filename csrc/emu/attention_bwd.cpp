// The CUDA kernels and launchers of csrc/cuda/attention_bwd.cu, compiled as C++ for the CPU emulator
// (see cuda_emulation.h); PK_CUDA_EMULATION comes from the build flags.
#include "../cuda/attention_bwd.cu"
