// One instance of the tensor-core attention backward (see ../attention_mma_instances.cuh).
#include "../attention_mma_instances.cuh"

namespace pk {
namespace attention {
namespace cuda {
template PK_ATTN_BWD_MMA_SIGNATURE(__nv_bfloat16, 256);
}  // namespace cuda
}  // namespace attention
}  // namespace pk
