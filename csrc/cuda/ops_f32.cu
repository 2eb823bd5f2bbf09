// Forward and backward drivers for float (one translation unit per dtype: parallel builds).
#include "cuda/dispatch.cuh"

namespace deft {
namespace kern {
DEFT_INSTANTIATE_DRIVERS(float)
}  // namespace kern
}  // namespace deft
