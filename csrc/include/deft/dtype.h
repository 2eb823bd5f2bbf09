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

// The DType of a numpy dtype name; false if unsupported.
inline bool dtype_from_name(const char* name, DType* t) {
  for (DType d : {DType::kF32, DType::kF64, DType::kBF16, DType::kF16}) {
    const char* n = dtype_name(d);
    const char* a = name;
    while (*a && *a == *n) ++a, ++n;
    if (*a == 0 && *n == 0) {
      *t = d;
      return true;
    }
  }
  return false;
}

}  // namespace deft
