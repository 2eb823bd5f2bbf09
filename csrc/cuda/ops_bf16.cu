// Forward and backward drivers for __nv_bfloat16 (one translation unit per dtype: parallel builds).
#include "cuda/dispatch.cuh"

namespace deft {
namespace kern {
DEFT_INSTANTIATE_DRIVERS(__nv_bfloat16)
}  // namespace kern
}  // namespace deft
