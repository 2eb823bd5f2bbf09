// Deterministic mode of the backward (the `deterministic` FFI attribute): every contribution that the
// default mode adds with a floating-point atomic (and every term of the data pass's on-chip dx list
// sums) is converted to 64-bit fixed point, q = llrint(v * scale), and accumulated with 64-bit
// integer atomics. Integer addition is associative, so the sums do not depend on the order in which
// the atomics land: the four cotangents are bitwise identical run to run.
//
// Scales. One power-of-two scale per cotangent (dx, doffset, dmask, dkernel), scale = 2^(61 - E)
// where 2^E >= B, a bound on |any partial or total sum| of that cotangent's elements, from maxima
// of the inputs (a max is order-independent, so the scales are reproducible too). With A = max|x|,
// D = max|dy|, Wm = max|kernel|, M = max|mask| (1 without a mask), all over finite entries, and per
// problem P = N * H_out * W_out pixels, K taps, Cog = C_out / feature_groups, Cpog = C_in /
// offset_groups:
//   grad_col(pixel, tap, c) = sum over Cog output channels of dy * kernel:  |.| <= Cog D Wm
//   dx[pos, c]   = sum over (pixel, tap) of (bilinear weights, summing to <= 1 over the corners)
//                  x mask x grad_col                                      <= P K Cog D Wm M
//   doffset      = mask x sum over <= Cpog channels of grad_col x d sample / d(y, x), where
//                  |d sample / d(y, x)| <= 2 A (a difference of corners, convex in the other
//                  coordinate)                                            <= 2 Cpog Cog D Wm A M
//   dmask        = sum over <= Cpog channels of grad_col x sample (|sample| <= A)
//                                                                         <= Cpog Cog D Wm A
//   dkernel      = sum over P pixels of sample x mask x dy                <= P A M D
// Every partial sum of finite terms is bounded the same way, so |accumulator| <= 2^61 (x (1 + a few
// ulp) for the rounding of the float terms themselves, e.g. TF32 operands) < 2^63: no overflow. The
// exponent E is exact (a product of frexp mantissas and a sum of exponents), clamped so that the
// scale stays within [2^-1000, 2^1000]; only inputs near the float64 range reach the clamp, where
// q saturates at +-2^62 instead of overflowing.
//
// Accuracy. Each term is rounded to the quantum q = 2^(E - 61) <= 2^-60 B: an element that sums n
// terms is off by at most n q / 2 (then rounded once to the output dtype). The bounds are worst
// cases (every sample landing on one element), so B is far above the largest element: measured on
// the suite's shapes (float64 reference, batch 1-8, offsets ~ N(0, 2^2)), log2(B / max|element|)
// is 19-21 for dx, 11-15 for doffset and dmask, 9-10 for dkernel, i.e. q = 2^-40 .. 2^-52 of the
// largest element (dx at S2's full batch of 32: ~2^-36). With ~36 terms per dx element that is
// ~2^-31 of max|dx| at worst, far below float32's rounding (2^-24 relative) and bfloat16/float16's.
// For float64 it is coarser than float64's own rounding (2^-53): the fixed point then limits
// float64 gradients to ~1e-10 .. 1e-12 of their largest element (test_gpu.py's float64 tolerance
// is 1e-10 of it).
//
// Non-finite terms never enter the integers: a NaN, +inf or -inf term sets its bit in a per-element
// flag nibble (8 elements per uint32 word, atomicOr), so a non-finite value reaches exactly the
// elements it reaches in the default mode. The conversion gives NaN where the NaN bit or both
// infinity bits are set, +-inf where one infinity bit is set, else (double)q / scale rounded once to
// the output dtype.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"

namespace deft {
namespace kern {

// The cotangents, in the order of the accumulators, flags and scales.
enum DetOut : int { kDetDx = 0, kDetDoff = 1, kDetDmask = 2, kDetDk = 3 };

// Device pointers of the deterministic backward (all in the backward's workspace). Passed by value
// to the data and weight passes (unused, and not read, when their DET flag is false).
struct DetAcc {
  unsigned long long* acc[4];  // int64 fixed-point accumulators (two's complement in uint64 words)
  unsigned* flags[4];          // non-finite bits: element i at nibble i % 8 of word i / 8
  const double* scale;         // [4]: 2^(61 - E) per cotangent
};

constexpr unsigned kDetNan = 1u, kDetPosInf = 2u, kDetNegInf = 4u;

// The fixed point of a term; a non-finite term returns 0 and ORs its bit into *bad.
template <typename A>
__device__ __forceinline__ long long det_fixed(A v, double scale, unsigned* bad) {
  if (!isfinite(v)) {
    *bad |= v != v ? kDetNan : v > A(0) ? kDetPosInf : kDetNegInf;
    return 0;
  }
  const double s = fmin(fmax(static_cast<double>(v) * scale, -0x1p62), 0x1p62);
  return __double2ll_rn(s);
}

// acc[i] += q (mod 2^64, i.e. int64 addition) and flags(i) |= bad. Zero terms cost nothing.
__device__ __forceinline__ void det_add(unsigned long long* acc, unsigned* flags, int64_t i, long long q,
                                        unsigned bad) {
  if (q != 0) atomicAdd(acc + i, static_cast<unsigned long long>(q));
  if (bad != 0u) atomicOr(flags + (i >> 3), bad << (4 * static_cast<unsigned>(i & 7)));
}

// One term straight into its element (the doffset/dmask reductions, the weight pass's tiles).
template <typename A>
__device__ __forceinline__ void det_put(const DetAcc& d, int which, int64_t i, A v) {
  unsigned bad = 0u;
  const long long q = det_fixed(v, d.scale[which], &bad);
  det_add(d.acc[which], d.flags[which], i, q, bad);
}

// ---------------------------------------------------------------------------------------------
// Scales. det_max_kernel: maxima of |finite entries| of x, dy, kernel, mask (blockIdx.y = 0..3) as
// the bits of a non-negative double (whose order as uint64 is the order of the values), by
// atomicMax: order-independent.
struct DetMaxIn {
  const void* a[4];
  int64_t n[4];
};

template <typename T>
__global__ void det_max_kernel(DetMaxIn in, unsigned long long* maxbits) {
  const int which = blockIdx.y;
  const T* a = static_cast<const T*>(in.a[which]);
  const int64_t n = in.n[which];
  double m = 0.0;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const double v = fabs(static_cast<double>(to_acc<Acc<T>>(a[i])));
    if (isfinite(v)) m = fmax(m, v);
  }
#pragma unroll
  for (int s = 16; s > 0; s >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, s));
  __shared__ double wmax[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) wmax[warp] = m;
  __syncthreads();
  if (warp == 0) {
    m = lane < int(blockDim.x / 32) ? wmax[lane] : 0.0;
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) m = fmax(m, __shfl_xor_sync(0xffffffffu, m, s));
    if (lane == 0 && m > 0.0) atomicMax(maxbits + which, static_cast<unsigned long long>(__double_as_longlong(m)));
  }
}

// The per-problem counts the bounds multiply (DetScaleIn::count order: P, K, Cog, Cpog).
struct DetScaleIn {
  double count[4];
  bool with_mask;
};

// 2^E >= product of the factors (exact exponent arithmetic: no overflow or underflow), or E = 61
// (scale 1) when a factor is 0: then every finite term is 0.
__device__ __forceinline__ double det_scale_of(const double* f, int nf) {
  double mant = 1.0;
  int e = 0;
  for (int i = 0; i < nf; ++i) {
    if (!(f[i] > 0.0)) return 1.0;
    int ei;
    mant *= frexp(f[i], &ei);  // [0.5, 1): the product stays >= 2^-nf
    e += ei;
  }
  int em;
  frexp(mant, &em);  // mant < 2^em
  int s = 61 - (e + em);
  s = s < -1000 ? -1000 : s > 1000 ? 1000 : s;
  return ldexp(1.0, s);
}

// One thread: the four scales from the maxima (x, dy, kernel, mask) and the counts. (A template, as
// every kernel in these headers: each ops_<dtype>.cu instantiates its own.)
template <typename T>
__global__ void det_scale_kernel(const unsigned long long* maxbits, DetScaleIn in, double* scale) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const double A = __longlong_as_double(static_cast<long long>(maxbits[0]));
  const double D = __longlong_as_double(static_cast<long long>(maxbits[1]));
  const double Wm = __longlong_as_double(static_cast<long long>(maxbits[2]));
  const double M = in.with_mask ? __longlong_as_double(static_cast<long long>(maxbits[3])) : 1.0;
  const double P = in.count[0], K = in.count[1], Cog = in.count[2], Cpog = in.count[3];
  const double fdx[] = {P, K, Cog, D, Wm, M};
  const double fdoff[] = {2.0, Cpog, Cog, D, Wm, A, M};
  const double fdmask[] = {Cpog, Cog, D, Wm, A};
  const double fdk[] = {P, A, M, D};
  scale[kDetDx] = det_scale_of(fdx, 6);
  scale[kDetDoff] = det_scale_of(fdoff, 7);
  scale[kDetDmask] = det_scale_of(fdmask, 5);
  scale[kDetDk] = det_scale_of(fdk, 4);
}

// ---------------------------------------------------------------------------------------------
// (int64, flags) -> T: flags -> NaN / +inf / -inf, else (double)q / scale rounded once to T.
template <typename T> __device__ __forceinline__ T det_from_double(double v);
template <> __device__ __forceinline__ float det_from_double<float>(double v) { return __double2float_rn(v); }
template <> __device__ __forceinline__ double det_from_double<double>(double v) { return v; }
template <> __device__ __forceinline__ __half det_from_double<__half>(double v) { return __double2half(v); }
template <> __device__ __forceinline__ __nv_bfloat16 det_from_double<__nv_bfloat16>(double v) {
  return __double2bfloat16(v);
}

template <typename T>
__global__ void det_convert_kernel(const unsigned long long* __restrict__ acc, const unsigned* __restrict__ flags,
                                   const double* __restrict__ scale, int which, T* __restrict__ dst, int64_t n) {
  const double inv = 1.0 / scale[which];  // a power of two: exact
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const unsigned f = (flags[i >> 3] >> (4 * static_cast<unsigned>(i & 7))) & 7u;
    double v;
    if (f == 0u) {
      v = static_cast<double>(static_cast<long long>(acc[i])) * inv;
    } else if ((f & kDetNan) != 0u || (f & (kDetPosInf | kDetNegInf)) == (kDetPosInf | kDetNegInf)) {
      v = __longlong_as_double(0x7ff8000000000000LL);  // quiet NaN
    } else {
      v = (f & kDetPosInf) != 0u ? __longlong_as_double(0x7ff0000000000000LL)
                                 : __longlong_as_double(static_cast<long long>(0xfff0000000000000ULL));
    }
    dst[i] = det_from_double<T>(v);
  }
}

}  // namespace kern
}  // namespace deft
