// FFI attribute schemas of the targets that take the kernel (the fused CUDA forward and backward,
// the fused CPU forward), and the checks that turn decoded buffers + attributes into a
// deft::ConvParams. Checking only: no arithmetic of the op.
#pragma once

#include <cstdint>
#include <string>
#include <utility>

#include "deft/dtype.h"
#include "deft/geometry.h"
#include "deft/tiling.h"
#include "ffi/ffi_util.h"
#include "xla/ffi/api/ffi.h"

namespace deft_ffi {

namespace ffi = xla::ffi;

// The attributes of the deft_deform_conv2d_{fwd,bwd}_cuda_v6 targets; Python passes them by name
// (deft_jax/_ffi.py). Flags are int64 0/1 so the schema needs no bool attribute support.
// `deterministic`: bitwise reproducible forward and backward (csrc/cuda/det.cuh).
struct ConvAttrs {
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
  int64_t dil_h, dil_w;
  int64_t offset_groups, feature_groups;
  int64_t with_mask, allow_tf32;
  int64_t tile_h, tile_w, tile_n, tile_k, warps, stages, bwd_tile_n, k_splits, family;
  int64_t deterministic;
};

// The attributes of deft_deform_conv2d_fwd_cpu_v1 (csrc/cpu/forward.h): the geometry and the
// pixels per tile (deft_jax/tiling.py, cpu_tile_pixels).
struct CpuForwardAttrs {
  int64_t stride_h, stride_w;
  int64_t pad_top, pad_bottom, pad_left, pad_right;
  int64_t dil_h, dil_w;
  int64_t offset_groups, feature_groups;
  int64_t with_mask;
  int64_t tile_pixels;
};

inline deft::TileConfig tile_of(const ConvAttrs& a) {
  return deft::TileConfig{a.tile_h, a.tile_w, a.tile_n, a.tile_k, a.warps, a.stages, a.bwd_tile_n, a.k_splits,
                          a.family};
}

// Shapes: x [B..., N, H, W, C], offset [B..., N, Ho, Wo, G*K*2], mask [B..., N, Ho, Wo, G*K] or
// (0,) without mask, kernel [B..., kh, kw, C/fg, Co], y [B..., N, Ho, Wo, Co]; the leading dims B...
// (from vmap) must agree and are folded into ConvParams::batch. Attrs: any schema with the
// geometry's fields (ConvAttrs, CpuForwardAttrs).
template <typename Attrs>
inline ffi::Error BuildGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& offset,
                                const ffi::AnyBuffer& mask, const ffi::AnyBuffer& kernel,
                                ffi::Span<const int64_t> y_dims, const Attrs& a, deft::ConvParams* p) {
  auto xd = x.dimensions(), od = offset.dimensions(), md = mask.dimensions(), kd = kernel.dimensions();
  if (xd.size() < 4) return invalid("x must have rank >= 4 [..., N, H, W, C], got " + dims_str(xd));
  const size_t lead = xd.size() - 4;
  auto same_lead = [&](ffi::Span<const int64_t> d) {
    if (d.size() != lead + 4) return false;
    for (size_t i = 0; i < lead; ++i)
      if (d[i] != xd[i]) return false;
    return true;
  };
  if (!same_lead(od)) return invalid("offset rank/leading dims do not match x: offset " + dims_str(od) + ", x " + dims_str(xd));
  if (!same_lead(kd)) return invalid("kernel rank/leading dims do not match x: kernel " + dims_str(kd) + ", x " + dims_str(xd));
  if (!same_lead(y_dims)) return invalid("output rank/leading dims do not match x: " + dims_str(y_dims));
  if (a.with_mask != 0 && !same_lead(md)) return invalid("mask rank/leading dims do not match x: mask " + dims_str(md));
  if (a.with_mask == 0 && mask.element_count() != 0) return invalid("with_mask=0 but a non-empty mask was passed: " + dims_str(md));
  if (offset.element_type() != x.element_type() || kernel.element_type() != x.element_type() ||
      (a.with_mask != 0 && mask.element_type() != x.element_type()))
    return invalid("x, offset, mask and kernel must share one dtype");

  int64_t batch = 1;
  for (size_t i = 0; i < lead; ++i) batch *= xd[i];
  deft::ConvParams q{};
  q.batch = batch;
  q.n = xd[lead], q.h = xd[lead + 1], q.w = xd[lead + 2], q.c_in = xd[lead + 3];
  q.kh = kd[lead], q.kw = kd[lead + 1], q.c_out = kd[lead + 3];
  q.h_out = y_dims[lead + 1], q.w_out = y_dims[lead + 2];
  q.stride_h = a.stride_h, q.stride_w = a.stride_w, q.dil_h = a.dil_h, q.dil_w = a.dil_w;
  q.pad_top = a.pad_top, q.pad_left = a.pad_left;
  q.offset_groups = a.offset_groups, q.feature_groups = a.feature_groups;
  q.with_mask = a.with_mask != 0;

  if (q.stride_h < 1 || q.stride_w < 1 || q.dil_h < 1 || q.dil_w < 1)
    return invalid("strides and dilations must be >= 1");
  if (q.offset_groups < 1 || q.feature_groups < 1 || q.c_in % q.offset_groups != 0 ||
      q.c_in % q.feature_groups != 0 || q.c_out % q.feature_groups != 0)
    return invalid("group counts must divide the channel counts");
  if (kd[lead + 2] * q.feature_groups != q.c_in)
    return invalid("kernel " + dims_str(kd) + " does not match C_in / feature_groups of x " + dims_str(xd));
  const int64_t ho = deft::conv_out_size(q.h, a.pad_top, a.pad_bottom, q.kh, q.stride_h, q.dil_h);
  const int64_t wo = deft::conv_out_size(q.w, a.pad_left, a.pad_right, q.kw, q.stride_w, q.dil_w);
  if (ho != q.h_out || wo != q.w_out || y_dims[lead] != q.n || y_dims[lead + 3] != q.c_out)
    return invalid("output shape " + dims_str(y_dims) + " inconsistent with the convolution geometry");
  if (od[lead] != q.n || od[lead + 1] != ho || od[lead + 2] != wo || od[lead + 3] != q.offset_channels())
    return invalid("offset " + dims_str(od) + " must be [..., N, H_out, W_out, G*kh*kw*2]");
  if (q.with_mask && (md[lead] != q.n || md[lead + 1] != ho || md[lead + 2] != wo ||
                      md[lead + 3] != q.mask_channels()))
    return invalid("mask " + dims_str(md) + " must be [..., N, H_out, W_out, G*kh*kw]");
  *p = q;
  return ffi::Error::Success();
}

// The fused CUDA targets: the geometry and a tile whose entries are all >= 1.
inline ffi::Error BuildParams(const ffi::AnyBuffer& x, const ffi::AnyBuffer& offset,
                              const ffi::AnyBuffer& mask, const ffi::AnyBuffer& kernel,
                              ffi::Span<const int64_t> y_dims, const ConvAttrs& a,
                              deft::ConvParams* p) {
  if (auto e = BuildGeometry(x, offset, mask, kernel, y_dims, a, p); !e.success()) return e;
  if (a.tile_h < 1 || a.tile_w < 1 || a.tile_n < 1 || a.tile_k < 1 || a.warps < 1 || a.stages < 1 ||
      a.bwd_tile_n < 1 || a.k_splits < 1)
    return invalid("tile configuration entries must be >= 1");
  return ffi::Error::Success();
}

// Backward: the dtype of x, checked against dy and every cotangent buffer, whose shapes must
// equal their primal's (dmask is (0,) like the mask placeholder without modulation).
inline ffi::ErrorOr<deft::DType> CheckBackwardBuffers(
    const ffi::AnyBuffer& x, const ffi::AnyBuffer& offset, const ffi::AnyBuffer& mask,
    const ffi::AnyBuffer& kernel, const ffi::AnyBuffer& dy, const ffi::AnyBuffer& dx,
    const ffi::AnyBuffer& doffset, const ffi::AnyBuffer& dmask, const ffi::AnyBuffer& dkernel) {
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype;
  for (const ffi::AnyBuffer* b : {&dy, &dx, &doffset, &dmask, &dkernel})
    if (b->element_type() != x.element_type())
      return ffi::Unexpected(invalid("dy and the cotangents must have x's dtype"));
  const char* names[] = {"dx", "doffset", "dmask", "dkernel"};
  const ffi::AnyBuffer* got[] = {&dx, &doffset, &dmask, &dkernel};
  const ffi::AnyBuffer* want[] = {&x, &offset, &mask, &kernel};
  for (int i = 0; i < 4; ++i)
    if (auto e = CheckSameShape(names[i], got[i]->dimensions(), want[i]->dimensions()); !e.success())
      return ffi::Unexpected(std::move(e));
  return dtype;
}

}  // namespace deft_ffi

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    deft_ffi::ConvAttrs, ::xla::ffi::StructMember<int64_t>("stride_h"),
    ::xla::ffi::StructMember<int64_t>("stride_w"), ::xla::ffi::StructMember<int64_t>("pad_top"),
    ::xla::ffi::StructMember<int64_t>("pad_bottom"), ::xla::ffi::StructMember<int64_t>("pad_left"),
    ::xla::ffi::StructMember<int64_t>("pad_right"), ::xla::ffi::StructMember<int64_t>("dil_h"),
    ::xla::ffi::StructMember<int64_t>("dil_w"), ::xla::ffi::StructMember<int64_t>("offset_groups"),
    ::xla::ffi::StructMember<int64_t>("feature_groups"), ::xla::ffi::StructMember<int64_t>("with_mask"),
    ::xla::ffi::StructMember<int64_t>("allow_tf32"), ::xla::ffi::StructMember<int64_t>("tile_h"),
    ::xla::ffi::StructMember<int64_t>("tile_w"), ::xla::ffi::StructMember<int64_t>("tile_n"),
    ::xla::ffi::StructMember<int64_t>("tile_k"), ::xla::ffi::StructMember<int64_t>("warps"),
    ::xla::ffi::StructMember<int64_t>("stages"), ::xla::ffi::StructMember<int64_t>("bwd_tile_n"),
    ::xla::ffi::StructMember<int64_t>("k_splits"), ::xla::ffi::StructMember<int64_t>("family"),
    ::xla::ffi::StructMember<int64_t>("deterministic"));

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(
    deft_ffi::CpuForwardAttrs, ::xla::ffi::StructMember<int64_t>("stride_h"),
    ::xla::ffi::StructMember<int64_t>("stride_w"), ::xla::ffi::StructMember<int64_t>("pad_top"),
    ::xla::ffi::StructMember<int64_t>("pad_bottom"), ::xla::ffi::StructMember<int64_t>("pad_left"),
    ::xla::ffi::StructMember<int64_t>("pad_right"), ::xla::ffi::StructMember<int64_t>("dil_h"),
    ::xla::ffi::StructMember<int64_t>("dil_w"), ::xla::ffi::StructMember<int64_t>("offset_groups"),
    ::xla::ffi::StructMember<int64_t>("feature_groups"), ::xla::ffi::StructMember<int64_t>("with_mask"),
    ::xla::ffi::StructMember<int64_t>("tile_pixels"));
