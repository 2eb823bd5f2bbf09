// Forward and backward drivers for __half (one translation unit per dtype: parallel builds).
#include "cuda/dispatch.cuh"

namespace deft {
namespace kern {
DEFT_INSTANTIATE_DRIVERS(__half)
}  // namespace kern
}  // namespace deft
