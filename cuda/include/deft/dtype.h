// Element types the native code supports, independent of XLA's enum.
#pragma once

namespace deft {

enum class DType { kF32, kF64, kBF16, kF16 };

inline const char* dtype_name(DType t) {
  switch (t) {
    case DType::kF32: return "float32";
    case DType::kF64: return "float64";
    case DType::kBF16: return "bfloat16";
    case DType::kF16: return "float16";
  }
  return "?";
}

}  // namespace deft
