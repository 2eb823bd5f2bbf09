// Helpers shared by the CPU and CUDA FFI layers: error messages and the element type decoding.
#pragma once

#include <string>

#include "deft/dtype.h"
#include "xla/ffi/api/ffi.h"

namespace deft_ffi {

namespace ffi = xla::ffi;

// Plain std::string building, no std::ostringstream: on the GPU machine (H100, jax 0.11.2) the
// process died with SIGSEGV on both error paths that formatted with an ostringstream (this helper
// for a CPU handler's error, and the tile check's message) and not where the message was built
// this way. The cause is not understood (not reproduced with CPU-only jax 0.11.2).
inline std::string dims_str(ffi::Span<const int64_t> d) {
  std::string s = "(";
  for (size_t i = 0; i < d.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(d[i]);
  }
  s += d.size() == 1 ? ",)" : ")";
  return s;
}

inline ffi::Error invalid(const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "deft_jax: " + msg);
}

inline ffi::ErrorOr<deft::DType> to_dtype(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F32: return deft::DType::kF32;
    case ffi::DataType::F64: return deft::DType::kF64;
    case ffi::DataType::BF16: return deft::DType::kBF16;
    case ffi::DataType::F16: return deft::DType::kF16;
    default: return ffi::Unexpected(invalid("unsupported element type; expected float32, float64, bfloat16 or float16"));
  }
}

// The result shape must equal the input's (cotangent of x/offset/mask/kernel).
inline ffi::Error CheckSameShape(const char* name, ffi::Span<const int64_t> got,
                                 ffi::Span<const int64_t> want) {
  bool ok = got.size() == want.size();
  for (size_t i = 0; ok && i < got.size(); ++i) ok = got[i] == want[i];
  if (!ok) return invalid(std::string(name) + " has shape " + dims_str(got) + ", expected " + dims_str(want));
  return ffi::Error::Success();
}

}  // namespace deft_ffi
