// Geometry and bilinear-sampling math of a deformable convolution, shared by the CPU
// handler and the CUDA kernels. No XLA and no CUDA runtime types in here.
//
// Layouts (dense, row-major), with `batch` independent problems stacked in front
// (vmap folds into it):
//   x      [batch, n, h, w, c_in]                 NHWC
//   offset [batch, n, h_out, w_out, G * K * 2]    per group, taps k = i*kw + j, per tap (dy, dx)
//   mask   [batch, n, h_out, w_out, G * K]        (absent when !with_mask: DCNv1)
//   kernel [batch, kh, kw, c_in / fg, c_out]      HWIO
//   y      [batch, n, h_out, w_out, c_out]
// The arithmetic is torchvision.ops.deform_conv2d's with channels last.
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__CUDACC__)
#define DEFT_HD __host__ __device__ __forceinline__
#else
#define DEFT_HD inline
#endif

namespace deft {

struct ConvParams {
  int64_t batch;  // independent problems (leading dims folded), each with its own kernel
  int64_t n, h, w, c_in;
  int64_t h_out, w_out, c_out;
  int64_t kh, kw;
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_left;
  int64_t dil_h, dil_w;
  int64_t offset_groups;   // G: input channel c uses offset group c / (c_in / G)
  int64_t feature_groups;  // grouped convolution, as lax.conv's feature_group_count
  bool with_mask;          // DCNv2 modulation present

  DEFT_HD int64_t taps() const { return kh * kw; }
  DEFT_HD int64_t c_per_offset_group() const { return c_in / offset_groups; }
  DEFT_HD int64_t c_in_per_group() const { return c_in / feature_groups; }
  DEFT_HD int64_t c_out_per_group() const { return c_out / feature_groups; }
  DEFT_HD int64_t pixels_out() const { return h_out * w_out; }
  DEFT_HD int64_t offset_channels() const { return offset_groups * taps() * 2; }
  DEFT_HD int64_t mask_channels() const { return offset_groups * taps(); }

  // Element counts of one problem of the stack.
  DEFT_HD int64_t x_size() const { return n * h * w * c_in; }
  DEFT_HD int64_t y_size() const { return n * pixels_out() * c_out; }
  DEFT_HD int64_t offset_size() const { return n * pixels_out() * offset_channels(); }
  DEFT_HD int64_t mask_size() const { return with_mask ? n * pixels_out() * mask_channels() : 0; }
  DEFT_HD int64_t kernel_size() const { return taps() * c_in_per_group() * c_out; }

  // Undeformed sample position of tap (i, j) at output pixel (ho, wo).
  DEFT_HD int64_t base_y(int64_t ho, int64_t i) const { return ho * stride_h - pad_top + i * dil_h; }
  DEFT_HD int64_t base_x(int64_t wo, int64_t j) const { return wo * stride_w - pad_left + j * dil_w; }
};

// Output extent of one spatial axis, as lax.conv_general_dilated computes it.
DEFT_HD int64_t conv_out_size(int64_t in, int64_t pad_lo, int64_t pad_hi, int64_t k, int64_t stride,
                              int64_t dil) {
  const int64_t span = in + pad_lo + pad_hi - dil * (k - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

// The four corners of a bilinear sample and their weights. A corner outside the image has
// `valid_*` false and contributes 0 (zero padding); a point with y <= -1, y >= h, x <= -1 or
// x >= w gives 0 altogether (`inside` false), exactly as torchvision.
//
// Non-finite coordinates (the policy of deform_conv2d's docstring, "Non-finite values"):
// - A NaN coordinate (`nan_point`) has no sample point: `inside` is false (no corner is read, no
//   input pixel gets a gradient from it), but the sample is NaN, for every channel of its offset
//   group, and so are its derivatives by offset and mask. fill() carries that NaN to the
//   consumers: it is the value every channel of a sample starts from (0 for any other point).
// - An infinite or finite-but-huge coordinate is simply outside: the tap contributes exactly 0
//   and gets exactly 0 gradient.
// The ordered comparisons come first and are false for NaN, so no float -> int conversion ever
// sees a NaN (undefined behaviour in C++ and CUDA) or a value beyond the image (no index
// overflow); a point that is not inside has y0 = x0 = 0, ly = lx = 0 and no valid corner.
// A consumer that multiplies the sample by a modulation m should start from fill() * m: a
// non-finite mask then makes even a zero sample non-finite (0 * inf = NaN), as the reference.
template <typename A>
struct Bilinear {
  int64_t y0, x0;     // top-left corner (floor)
  A ly, lx;           // fractional parts
  bool inside;        // any corner can contribute (false for a NaN coordinate)
  bool nan_point;     // y or x is NaN: the sample and its derivatives are NaN
  bool v00, v01, v10, v11;

  DEFT_HD A w00() const { return (A(1) - ly) * (A(1) - lx); }
  DEFT_HD A w01() const { return (A(1) - ly) * lx; }
  DEFT_HD A w10() const { return ly * (A(1) - lx); }
  DEFT_HD A w11() const { return ly * lx; }
  // Value every channel of the sample starts from before the corners are added: NaN for a NaN
  // point, 0 otherwise.
  DEFT_HD A fill() const { return nan_point ? std::numeric_limits<A>::quiet_NaN() : A(0); }
};

template <typename A>
DEFT_HD A floor_of(A v);
template <>
DEFT_HD float floor_of<float>(float v) { return floorf(v); }
template <>
DEFT_HD double floor_of<double>(double v) { return floor(v); }

template <typename A>
DEFT_HD Bilinear<A> make_bilinear(A y, A x, int64_t h, int64_t w) {
  Bilinear<A> b;
  b.inside = y > A(-1) && y < A(h) && x > A(-1) && x < A(w);  // false for NaN
  b.nan_point = y != y || x != x;
  const A fy = b.inside ? floor_of<A>(y) : A(0);  // in [-1, h - 1] when inside
  const A fx = b.inside ? floor_of<A>(x) : A(0);
  b.y0 = static_cast<int64_t>(fy);
  b.x0 = static_cast<int64_t>(fx);
  b.ly = b.inside ? y - fy : A(0);
  b.lx = b.inside ? x - fx : A(0);
  const bool y0ok = b.inside && b.y0 >= 0, y1ok = b.inside && b.y0 + 1 <= h - 1;
  const bool x0ok = b.inside && b.x0 >= 0, x1ok = b.inside && b.x0 + 1 <= w - 1;
  b.v00 = y0ok && x0ok;
  b.v01 = y0ok && x1ok;
  b.v10 = y1ok && x0ok;
  b.v11 = y1ok && x1ok;
  return b;
}

}  // namespace deft
