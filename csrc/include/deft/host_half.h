// Host-side storage types for bfloat16 and float16 buffers and their conversions (round to
// nearest even), so the CPU handler needs no compiler extension for half types.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace deft {

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline uint32_t float_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float bits_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float to_float(bf16_t v) { return bits_float(uint32_t(v.bits) << 16); }
inline bf16_t to_bf16(float f) {
  uint32_t u = float_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16_t{uint16_t((u >> 16) | 0x40)};  // quiet NaN
  u += 0x7FFFu + ((u >> 16) & 1u);
  return bf16_t{uint16_t(u >> 16)};
}

inline float to_float(f16_t v) {
  const uint32_t sign = uint32_t(v.bits & 0x8000u) << 16;
  const uint32_t exp = (v.bits >> 10) & 0x1Fu, mant = v.bits & 0x3FFu;
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in float
    const float mag = float(mant) * 5.9604644775390625e-8f;
    return sign ? -mag : mag;
  }
  if (exp == 31) return bits_float(sign | 0x7F800000u | (mant << 13));
  return bits_float(sign | ((exp - 15 + 127) << 23) | (mant << 13));
}
inline f16_t to_f16(float f) {
  const uint32_t x = float_bits(f);
  const uint16_t sign = uint16_t((x >> 16) & 0x8000u);
  const uint32_t ax = x & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return f16_t{uint16_t(sign | (ax > 0x7F800000u ? 0x7E00u : 0x7C00u))};
  if (ax >= 0x477FF000u) return f16_t{uint16_t(sign | 0x7C00u)};  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {  // below 2^-14: subnormal, round(|f| * 2^24) to nearest even
    return f16_t{uint16_t(sign | uint16_t(std::nearbyint(bits_float(ax) * 16777216.0f)))};
  }
  const uint32_t mant = ax & 0x7FFFFFu;
  uint32_t h = ((((ax >> 23) - 127 + 15)) << 10) | (mant >> 13);
  const uint32_t rem = mant & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry rolls into the exponent
  return f16_t{uint16_t(sign | h)};
}

// Accumulation type and conversions used by the templated CPU code.
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

template <typename A> inline A load_as(float v) { return A(v); }
template <typename A> inline A load_as(double v) { return A(v); }
template <typename A> inline A load_as(bf16_t v) { return A(to_float(v)); }
template <typename A> inline A load_as(f16_t v) { return A(to_float(v)); }

template <typename T> inline T store_as(float v);
template <> inline float store_as<float>(float v) { return v; }
template <> inline bf16_t store_as<bf16_t>(float v) { return to_bf16(v); }
template <> inline f16_t store_as<f16_t>(float v) { return to_f16(v); }
template <typename T> inline T store_as(double v);
template <> inline double store_as<double>(double v) { return v; }

}  // namespace deft
