// FFI attribute schema (version 2) of the column targets: deft_sample_columns_cpu_v3 and
// deft_col2im_cpu_v3 (a chunk is a run of output rows; col2im adds into a given dx),
// deft_sample_columns_cuda_v2 and deft_col2im_cuda_v2 (whole images), and the checks that turn
// their decoded buffers + attributes into a deft::ConvParams. Checking only: no arithmetic of the op.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>


#include "deft/geometry.h"
#include "ffi/ffi_util.h"
#include "xla/ffi/api/ffi.h"

namespace deft_ffi {

// Geometry of the sampling; Python passes these by name (deft_jax/_ffi.py). The kernel is not an
// operand of these targets, so its size is an attribute. Flags are int64 0/1.
struct ColumnAttrs {
  int64_t kh, kw;
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
  int64_t dil_h, dil_w;
  int64_t offset_groups;
  int64_t with_mask;
  // The CUDA col2im's dx in 64-bit fixed point (bitwise reproducible; its workspace holds the
  // accumulators). Every other column kernel, and the CPU's, is deterministic either way.
  int64_t deterministic;
};

// What `start` and a chunk count in: the sampler's chunk is a run of output rows (whole images
// included), col2im's whole images.
enum class ChunkUnit { kRows, kImages };

// Shapes: x [B..., N, H, W, C], offset [B..., N, Ho, Wo, G*K*2], mask [B..., N, Ho, Wo, G*K] or
// (0,) without mask (leading dims B... from vmap, folded into ConvParams::batch; N is
// ConvParams::n), and the chunk's cols [B..., b, R, Wo, K, C]:
//   kRows:   the b * R output rows [start * R, (start + b) * R) of each problem's N * Ho rows
//            (image-major; `start` counts in units of R rows, so R = Ho makes it an image; a run
//            may cross images); *chunk = b * R rows, *unit = R;
//   kImages: R = Ho, images [start, start + b) of each problem; *chunk = b, *unit = 1.
// `start` is a scalar int32 operand (traced in a loop); it lives in the platform's memory, so
// only its type is checked here (the CPU handler reads its host copy).
inline ffi::Error BuildColumnParams(const ffi::AnyBuffer& x, const ffi::AnyBuffer& offset,
                                    const ffi::AnyBuffer& mask, const ffi::AnyBuffer& start,
                                    ffi::Span<const int64_t> cols, const ColumnAttrs& a, ChunkUnit kind,
                                    deft::ConvParams* p, int64_t* chunk, int64_t* unit) {
  auto xd = x.dimensions(), od = offset.dimensions(), md = mask.dimensions();
  if (xd.size() < 4) return invalid("x must have rank >= 4 [..., N, H, W, C], got " + dims_str(xd));
  const size_t lead = xd.size() - 4;
  auto same_lead = [&](ffi::Span<const int64_t> d, size_t rank, bool with_n) {
    if (d.size() != lead + rank) return false;
    for (size_t i = 0; i < lead + (with_n ? 1 : 0); ++i)
      if (d[i] != xd[i]) return false;
    return true;
  };
  if (!same_lead(od, 4, true)) return invalid("offset rank/leading dims do not match x: offset " + dims_str(od) + ", x " + dims_str(xd));
  if (!same_lead(cols, 5, false)) return invalid("columns " + dims_str(cols) + " must be [..., b, R, W_out, K, C] for x " + dims_str(xd));
  if (a.with_mask != 0 && !same_lead(md, 4, true)) return invalid("mask rank/leading dims do not match x: mask " + dims_str(md));
  if (a.with_mask == 0 && mask.element_count() != 0) return invalid("with_mask=0 but a non-empty mask was passed: " + dims_str(md));
  if (offset.element_type() != x.element_type() || (a.with_mask != 0 && mask.element_type() != x.element_type()))
    return invalid("x, offset and mask must share one dtype");
  if (start.element_type() != ffi::DataType::S32 || start.element_count() != 1)
    return invalid("start must be an int32 scalar (the chunk's first row or image)");

  deft::ConvParams q{};
  q.batch = 1;
  for (size_t i = 0; i < lead; ++i) q.batch *= xd[i];
  q.n = xd[lead], q.h = xd[lead + 1], q.w = xd[lead + 2], q.c_in = xd[lead + 3];
  q.kh = a.kh, q.kw = a.kw, q.c_out = 0;
  q.stride_h = a.stride_h, q.stride_w = a.stride_w, q.dil_h = a.dil_h, q.dil_w = a.dil_w;
  q.pad_top = a.pad_top, q.pad_left = a.pad_left;
  q.offset_groups = a.offset_groups, q.feature_groups = 1;
  q.with_mask = a.with_mask != 0;

  if (a.deterministic != 0 && a.deterministic != 1) return invalid("deterministic must be 0 or 1");
  if (q.kh < 1 || q.kw < 1) return invalid("kernel size (kh, kw) must be >= 1");
  if (q.stride_h < 1 || q.stride_w < 1 || q.dil_h < 1 || q.dil_w < 1)
    return invalid("strides and dilations must be >= 1");
  if (a.pad_top < 0 || a.pad_bottom < 0 || a.pad_left < 0 || a.pad_right < 0)
    return invalid("paddings must be >= 0");
  if (q.offset_groups < 1 || q.c_in % q.offset_groups != 0)
    return invalid("offset_groups must be >= 1 and divide the channel count of x " + dims_str(xd));
  const int64_t ho = deft::conv_out_size(q.h, a.pad_top, a.pad_bottom, q.kh, q.stride_h, q.dil_h);
  const int64_t wo = deft::conv_out_size(q.w, a.pad_left, a.pad_right, q.kw, q.stride_w, q.dil_w);
  q.h_out = ho, q.w_out = wo;
  const bool rows = kind == ChunkUnit::kRows;
  if ((!rows && cols[lead + 1] != ho) || cols[lead + 2] != wo || cols[lead + 3] != q.taps() ||
      cols[lead + 4] != q.c_in)
    return invalid("columns " + dims_str(cols) + " inconsistent with the convolution geometry (expected [..., b, " +
                   (rows ? std::string("R") : std::to_string(ho)) + ", " + std::to_string(wo) + ", " +
                   std::to_string(q.taps()) + ", " + std::to_string(q.c_in) + "])");
  if (od[lead + 1] != ho || od[lead + 2] != wo || od[lead + 3] != q.offset_channels())
    return invalid("offset " + dims_str(od) + " must be [..., N, H_out, W_out, G*kh*kw*2]");
  if (q.with_mask && (md[lead + 1] != ho || md[lead + 2] != wo || md[lead + 3] != q.mask_channels()))
    return invalid("mask " + dims_str(md) + " must be [..., N, H_out, W_out, G*kh*kw]");
  const int64_t count = rows ? cols[lead] * cols[lead + 1] : cols[lead];
  const int64_t limit = rows ? q.n * ho : q.n;
  if (cols[lead] < 0 || cols[lead + 1] < 0 || count > limit || (rows && count > 0 && cols[lead + 1] == 0))
    return invalid("a chunk of " + std::to_string(count) + (rows ? " output rows" : " images") +
                   " does not fit the " + std::to_string(limit) + (rows ? " output rows" : " images") + " of x");
  *p = q;
  *chunk = count;
  *unit = rows ? std::max<int64_t>(1, cols[lead + 1]) : 1;
  return ffi::Error::Success();
}

// `dims` with its image axis (index rank - 4 of an NHWC-like array) set to `images`.
inline std::vector<int64_t> WithImages(ffi::Span<const int64_t> dims, int64_t images) {
  std::vector<int64_t> d(dims.begin(), dims.end());
  if (d.size() >= 4) d[d.size() - 4] = images;
  return d;
}

// The element types of a col2im's buffers: the column cotangent and dx (dx_in too where given) in
// the accumulation type (float32, float64 for float64), doffset and dmask in x's. Returns x's dtype.
inline ffi::ErrorOr<deft::DType> CheckCol2ImTypes(const ffi::AnyBuffer& x, const ffi::AnyBuffer& dcols,
                                                  const ffi::AnyBuffer& dx, const ffi::AnyBuffer* dx_in,
                                                  const ffi::AnyBuffer& doffset, const ffi::AnyBuffer& dmask) {
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype;
  const ffi::DataType acc = x.element_type() == ffi::DataType::F64 ? ffi::DataType::F64 : ffi::DataType::F32;
  if (dcols.element_type() != acc || dx.element_type() != acc || (dx_in && dx_in->element_type() != acc))
    return ffi::Unexpected(invalid("the column cotangent and dx must be float32 (float64 for float64 inputs)"));
  if (doffset.element_type() != x.element_type() || dmask.element_type() != x.element_type())
    return ffi::Unexpected(invalid("doffset and dmask must have x's dtype"));
  return dtype;
}

// The col2im's buffers: dcols and dx in the accumulation type (float32, float64 for float64),
// doffset and dmask in x's; dx, doffset and dmask hold the chunk's n_out images; dmask is (0,) like
// the mask placeholder without modulation. Returns x's dtype.
inline ffi::ErrorOr<deft::DType> CheckCol2ImBuffers(const ffi::AnyBuffer& x, const ffi::AnyBuffer& offset,
                                                    const ffi::AnyBuffer& mask, const ffi::AnyBuffer& dcols,
                                                    const ffi::AnyBuffer& dx, const ffi::AnyBuffer& doffset,
                                                    const ffi::AnyBuffer& dmask, const ColumnAttrs& attrs,
                                                    int64_t n_out) {
  auto dtype = CheckCol2ImTypes(x, dcols, dx, nullptr, doffset, dmask);
  if (dtype.has_error()) return dtype;
  const auto want_dmask = attrs.with_mask ? WithImages(mask.dimensions(), n_out)
                                          : std::vector<int64_t>(mask.dimensions().begin(), mask.dimensions().end());
  if (auto e = CheckSameShape("dx", dx.dimensions(), WithImages(x.dimensions(), n_out)); !e.success())
    return ffi::Unexpected(e);
  if (auto e = CheckSameShape("doffset", doffset.dimensions(), WithImages(offset.dimensions(), n_out)); !e.success())
    return ffi::Unexpected(e);
  if (auto e = CheckSameShape("dmask", dmask.dimensions(), want_dmask); !e.success()) return ffi::Unexpected(e);
  return dtype;
}

// The buffers of the CPU col2im of a run of rows (deft_col2im_cpu_v3), dcols [B..., b, R, Wo, K, C]
// for the b * R rows from row `first_row`: dcols, dx_in and dx in the accumulation type (float32,
// float64 for float64), dx_in and dx [B..., m, H, W, C] for the m images the run's rows lie in,
// doffset and dmask [B..., b, R, Wo, channels] in x's dtype (dmask (0,) like the mask placeholder
// without modulation). Returns x's dtype.
inline ffi::ErrorOr<deft::DType> CheckCol2ImRunBuffers(const deft::ConvParams& p, const ffi::AnyBuffer& x,
                                                       const ffi::AnyBuffer& mask, const ffi::AnyBuffer& dcols,
                                                       const ffi::AnyBuffer& dx_in, const ffi::AnyBuffer& dx,
                                                       const ffi::AnyBuffer& doffset, const ffi::AnyBuffer& dmask,
                                                       int64_t first_row, int64_t rows) {
  auto dtype = CheckCol2ImTypes(x, dcols, dx, &dx_in, doffset, dmask);
  if (dtype.has_error()) return dtype;
  const int64_t images = rows > 0 && p.h_out > 0 ? (first_row + rows - 1) / p.h_out - first_row / p.h_out + 1 : 0;
  auto xd = x.dimensions(), cd = dcols.dimensions();
  std::vector<int64_t> want_dx(xd.begin(), xd.end());
  want_dx[want_dx.size() - 4] = images;
  if (auto e = CheckSameShape("dx_in", dx_in.dimensions(), want_dx); !e.success()) return ffi::Unexpected(e);
  if (auto e = CheckSameShape("dx", dx.dimensions(), want_dx); !e.success()) return ffi::Unexpected(e);
  std::vector<int64_t> want_doffset(cd.begin(), cd.end() - 2);  // [B..., b, R, Wo]
  want_doffset.push_back(p.offset_channels());
  if (auto e = CheckSameShape("doffset", doffset.dimensions(), want_doffset); !e.success()) return ffi::Unexpected(e);
  std::vector<int64_t> want_dmask(want_doffset.begin(), want_doffset.end() - 1);
  want_dmask.push_back(p.mask_channels());
  if (!p.with_mask) want_dmask.assign(mask.dimensions().begin(), mask.dimensions().end());
  if (auto e = CheckSameShape("dmask", dmask.dimensions(), want_dmask); !e.success()) return ffi::Unexpected(e);
  return dtype;
}

}  // namespace deft_ffi

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    deft_ffi::ColumnAttrs, ::xla::ffi::StructMember<int64_t>("kh"),
    ::xla::ffi::StructMember<int64_t>("kw"), ::xla::ffi::StructMember<int64_t>("stride_h"),
    ::xla::ffi::StructMember<int64_t>("stride_w"), ::xla::ffi::StructMember<int64_t>("pad_top"),
    ::xla::ffi::StructMember<int64_t>("pad_bottom"), ::xla::ffi::StructMember<int64_t>("pad_left"),
    ::xla::ffi::StructMember<int64_t>("pad_right"), ::xla::ffi::StructMember<int64_t>("dil_h"),
    ::xla::ffi::StructMember<int64_t>("dil_w"), ::xla::ffi::StructMember<int64_t>("offset_groups"),
    ::xla::ffi::StructMember<int64_t>("with_mask"), ::xla::ffi::StructMember<int64_t>("deterministic"));
