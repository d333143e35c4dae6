// One instance of the tensor-core attention forward (see ../attention_mma_instances.cuh).
#include "../attention_mma_instances.cuh"

namespace pk {
namespace attention {
namespace cuda {
template PK_ATTN_FWD_MMA_SIGNATURE(__half, 128);
}  // namespace cuda
}  // namespace attention
}  // namespace pk
