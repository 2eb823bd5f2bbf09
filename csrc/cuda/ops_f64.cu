// Forward and backward drivers for double (one translation unit per dtype: parallel builds).
#include "cuda/dispatch.cuh"

namespace deft {
namespace kern {
DEFT_INSTANTIATE_DRIVERS(double)
}  // namespace kern
}  // namespace deft
