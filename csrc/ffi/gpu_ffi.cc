// XLA typed-FFI handlers for platform "CUDA" (the fused forward and backward; the column route's
// sampler and col2im) and the nanobind module `_deft_cuda` that hands their
// capsules to Python. Decoding, checking and launching only; the arithmetic is in csrc/cuda/.
// Execute never synchronises, allocates device memory or reads device memory back, so the handlers
// are command-buffer (CUDA graph) compatible. The workspace is the last output buffer, sized by
// Python through workspace_bytes(): an output lives in XLA's buffer assignment, so its address stays
// valid whenever a captured graph replays the kernels. (Memory from ffi::ScratchAllocator is handed
// back when the handler returns, so a graph that captured its address could replay into buffers
// XLA had since given to other ops. This was suspected of a bf16 training divergence, but the
// code from before this change trained normally on an H100 and an H200 (benchmarks/RESULTS.md).)
#include <cuda_runtime.h>

#include <string>

#include "cuda/columns.h"
#include "cuda/launch.h"
#include "ffi/column_attrs.h"
#include "ffi/conv_attrs.h"
#include "ffi/tile_check.h"
#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace deft_ffi {

namespace {

ffi::Error cuda_error(const char* what, cudaError_t e, const deft::ConvParams& p) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string("deft_jax: ") + what + " failed: " + cudaGetErrorString(e) + " (batch=" +
                        std::to_string(p.batch) + ", x=[" + std::to_string(p.n) + ", " + std::to_string(p.h) +
                        ", " + std::to_string(p.w) + ", " + std::to_string(p.c_in) + "], c_out=" +
                        std::to_string(p.c_out) + ", kernel " + std::to_string(p.kh) + "x" +
                        std::to_string(p.kw) + ")");
}

ffi::Error CheckTile(const ConvAttrs& attrs, deft::DType dtype) {
  if (attrs.deterministic != 0 && attrs.deterministic != 1)
    return invalid("deterministic must be 0 or 1, got " + std::to_string(attrs.deterministic));
  const std::string why = GpuTileError(tile_of(attrs), dtype);
  return why.empty() ? ffi::Error::Success() : invalid(why);
}

// The workspace output (nullptr when none is needed), checked against the bytes the launch needs.
ffi::ErrorOr<void*> Workspace(ffi::Result<ffi::AnyBuffer>& ws, size_t bytes, const char* what) {
  if (ws->size_bytes() < bytes)
    return ffi::Unexpected(invalid(std::string(what) + " has " + std::to_string(ws->size_bytes()) +
                                   " bytes, the launch needs " + std::to_string(bytes) +
                                   " (size it with _deft_cuda.workspace_bytes)"));
  return bytes == 0 ? nullptr : ws->untyped_data();
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                       ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> workspace,
                       ConvAttrs attrs) {
  deft::ConvParams p;
  if (auto err = BuildParams(x, offset, mask, kernel, y->dimensions(), attrs, &p); !err.success()) return err;
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype.error();
  if (y->element_type() != x.element_type()) return invalid("output dtype differs from x's");
  if (auto err = CheckTile(attrs, *dtype); !err.success()) return err;
  if (y->element_count() == 0) return ffi::Error::Success();
  const deft::TileConfig tile = tile_of(attrs);
  auto ws = Workspace(workspace, deft::DeformConvForwardWorkspaceBytes(y->element_count(), tile, *dtype),
                      "forward workspace");
  if (ws.has_error()) return ws.error();
  const cudaError_t e = deft::LaunchDeformConvForward(stream, p, tile, *dtype, attrs.allow_tf32 != 0,
                                                      attrs.deterministic != 0, x.untyped_data(), offset.untyped_data(),
                                                      mask.untyped_data(), kernel.untyped_data(),
                                                      y->untyped_data(), *ws);
  if (e != cudaSuccess) return cuda_error("forward launch", e, p);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(cudaStream_t stream, ffi::AnyBuffer x,
                        ffi::AnyBuffer offset, ffi::AnyBuffer mask, ffi::AnyBuffer kernel, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> doffset,
                        ffi::Result<ffi::AnyBuffer> dmask, ffi::Result<ffi::AnyBuffer> dkernel,
                        ffi::Result<ffi::AnyBuffer> workspace, ConvAttrs attrs) {
  deft::ConvParams p;
  if (auto err = BuildParams(x, offset, mask, kernel, dy.dimensions(), attrs, &p); !err.success()) return err;
  auto dtype = CheckBackwardBuffers(x, offset, mask, kernel, dy, *dx, *doffset, *dmask, *dkernel);
  if (dtype.has_error()) return dtype.error();
  if (auto err = CheckTile(attrs, *dtype); !err.success()) return err;
  if (dx->element_count() + doffset->element_count() + dmask->element_count() + dkernel->element_count() == 0)
    return ffi::Error::Success();
  const deft::TileConfig tile = tile_of(attrs);
  auto ws = Workspace(workspace,
                      deft::DeformConvBackwardWorkspaceBytes(dx->element_count(), doffset->element_count(),
                                                             dmask->element_count(), dkernel->element_count(), *dtype,
                                                             attrs.deterministic != 0),
                      "backward workspace");
  if (ws.has_error()) return ws.error();
  const cudaError_t e = deft::LaunchDeformConvBackward(
      stream, p, tile, *dtype, attrs.allow_tf32 != 0, attrs.deterministic != 0, x.untyped_data(), offset.untyped_data(),
      mask.untyped_data(), kernel.untyped_data(), dy.untyped_data(), dx->untyped_data(),
      doffset->untyped_data(), dmask->untyped_data(), dkernel->untyped_data(), *ws);
  if (e != cudaSuccess) return cuda_error("backward launch", e, p);
  return ffi::Error::Success();
}

// The column route's sampler (columns.h): cols [..., b, Ho, Wo, K, C] in x's dtype for the b
// whole images that start at the device scalar `start` (the v2 contract: whole images only; the
// CPU's v3 sampler also takes runs of rows).
ffi::Error SampleColumnsImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                             ffi::AnyBuffer start, ffi::Result<ffi::AnyBuffer> cols, ColumnAttrs attrs) {
  deft::ConvParams p;
  int64_t n_out = 0, unit = 1;
  if (auto err = BuildColumnParams(x, offset, mask, start, cols->dimensions(), attrs, ChunkUnit::kImages, &p, &n_out,
                                   &unit);
      !err.success())
    return err;
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype.error();
  if (cols->element_type() != x.element_type()) return invalid("columns dtype differs from x's");
  if (cols->element_count() == 0) return ffi::Error::Success();
  const cudaError_t e = deft::LaunchSampleColumns(stream, p, n_out, static_cast<const int32_t*>(start.untyped_data()),
                                                  *dtype, x.untyped_data(), offset.untyped_data(),
                                                  mask.untyped_data(), cols->untyped_data());
  if (e != cudaSuccess) return cuda_error("column sampler launch", e, p);
  return ffi::Error::Success();
}

// The column route's col2im: dx (accumulation type), doffset and dmask of the chunk; the workspace
// (uint8) holds deterministic mode's accumulators (Col2ImWorkspaceBytes, (0,) otherwise).
ffi::Error Col2ImImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                      ffi::AnyBuffer start, ffi::AnyBuffer dcols, ffi::Result<ffi::AnyBuffer> dx,
                      ffi::Result<ffi::AnyBuffer> doffset, ffi::Result<ffi::AnyBuffer> dmask,
                      ffi::Result<ffi::AnyBuffer> workspace, ColumnAttrs attrs) {
  deft::ConvParams p;
  int64_t n_out = 0, unit = 1;
  if (auto err = BuildColumnParams(x, offset, mask, start, dcols.dimensions(), attrs, ChunkUnit::kImages, &p,
                                   &n_out, &unit);
      !err.success())
    return err;
  auto dtype = CheckCol2ImBuffers(x, offset, mask, dcols, *dx, *doffset, *dmask, attrs, n_out);
  if (dtype.has_error()) return dtype.error();
  const bool det = attrs.deterministic != 0;
  auto ws = Workspace(workspace, deft::Col2ImWorkspaceBytes(static_cast<int64_t>(dx->element_count()), det),
                      "the col2im workspace");
  if (ws.has_error()) return ws.error();
  if (dx->element_count() + doffset->element_count() == 0) return ffi::Error::Success();
  const cudaError_t e = deft::LaunchCol2Im(stream, p, n_out, static_cast<const int32_t*>(start.untyped_data()),
                                           *dtype, det, x.untyped_data(), offset.untyped_data(), mask.untyped_data(),
                                           dcols.untyped_data(), dx->untyped_data(), doffset->untyped_data(),
                                           dmask->untyped_data(), *ws);
  if (e != cudaSuccess) return cuda_error("col2im launch", e, p);
  return ffi::Error::Success();
}

}  // namespace

// XLA's stream and the operands every CUDA target starts with: x, offset, mask ((0,) without mask).
inline auto CudaBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::PlatformStream<cudaStream_t>>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>();
}

}  // namespace deft_ffi

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftDeformConv2dFwdCuda, deft_ffi::ForwardImpl,
                              deft_ffi::CudaBinding()
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attrs<deft_ffi::ConvAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftDeformConv2dBwdCuda, deft_ffi::BackwardImpl,
                              deft_ffi::CudaBinding()
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // doffset
                                  .Ret<ffi::AnyBuffer>()  // dmask, (0,) without mask
                                  .Ret<ffi::AnyBuffer>()  // dkernel
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attrs<deft_ffi::ConvAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftSampleColumnsCuda, deft_ffi::SampleColumnsImpl,
                              deft_ffi::CudaBinding()
                                  .Arg<ffi::AnyBuffer>()  // start: int32 scalar on the device (an image)
                                  .Ret<ffi::AnyBuffer>()  // cols [..., b, Ho, Wo, K, C]
                                  .Attrs<deft_ffi::ColumnAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftCol2ImCuda, deft_ffi::Col2ImImpl,
                              deft_ffi::CudaBinding()
                                  .Arg<ffi::AnyBuffer>()  // start: int32 scalar on the device (an image)
                                  .Arg<ffi::AnyBuffer>()  // dcols [..., b, Ho, Wo, K, C]
                                  .Ret<ffi::AnyBuffer>()  // dx [..., b, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // doffset [..., b, Ho, Wo, G*K*2]
                                  .Ret<ffi::AnyBuffer>()  // dmask, (0,) without mask
                                  .Ret<ffi::AnyBuffer>()  // workspace (uint8)
                                  .Attrs<deft_ffi::ColumnAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

namespace {

deft::DType dtype_or_throw(const std::string& name) {
  deft::DType t;
  if (!deft::dtype_from_name(name.c_str(), &t)) throw nb::value_error(("unsupported dtype " + name).c_str());
  return t;
}

}  // namespace

NB_MODULE(_deft_cuda, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["deft_deform_conv2d_fwd_cuda_v6"] = nb::capsule(reinterpret_cast<void*>(DeftDeformConv2dFwdCuda));
    d["deft_deform_conv2d_bwd_cuda_v6"] = nb::capsule(reinterpret_cast<void*>(DeftDeformConv2dBwdCuda));
    d["deft_sample_columns_cuda_v2"] = nb::capsule(reinterpret_cast<void*>(DeftSampleColumnsCuda));
    d["deft_col2im_cuda_v2"] = nb::capsule(reinterpret_cast<void*>(DeftCol2ImCuda));
    return d;
  });
  m.def(
      "forward_workspace_bytes",
      [](const std::string& dtype, int64_t y_elements, int64_t tile_h, int64_t tile_w, int64_t tile_n,
         int64_t tile_k, int64_t warps, int64_t stages, int64_t bwd_tile_n, int64_t k_splits, int64_t family) {
        const deft::TileConfig tile{tile_h, tile_w, tile_n, tile_k, warps, stages, bwd_tile_n, k_splits, family};
        return deft::DeformConvForwardWorkspaceBytes(y_elements, tile, dtype_or_throw(dtype));
      },
      nb::arg("dtype"), nb::arg("y_elements"), nb::kw_only(), nb::arg("tile_h"), nb::arg("tile_w"),
      nb::arg("tile_n"), nb::arg("tile_k"), nb::arg("warps"), nb::arg("stages"), nb::arg("bwd_tile_n"),
      nb::arg("k_splits"), nb::arg("family"), "Bytes of the forward's workspace output for y_elements outputs.");
  m.def(
      "tile_error",
      [](const std::string& dtype, int64_t tile_h, int64_t tile_w, int64_t tile_n, int64_t tile_k, int64_t warps,
         int64_t stages, int64_t bwd_tile_n, int64_t k_splits, int64_t family) {
        const deft::TileConfig tile{tile_h, tile_w, tile_n, tile_k, warps, stages, bwd_tile_n, k_splits, family};
        return deft_ffi::GpuTileError(tile, dtype_or_throw(dtype));
      },
      nb::arg("dtype"), nb::kw_only(), nb::arg("tile_h"), nb::arg("tile_w"), nb::arg("tile_n"), nb::arg("tile_k"),
      nb::arg("warps"), nb::arg("stages"), nb::arg("bwd_tile_n"), nb::arg("k_splits"), nb::arg("family"),
      "Why the kernels do not instantiate this tile for dtype (the handlers' own check), or \"\".");
  m.def(
      "col2im_workspace_bytes",
      [](int64_t dx_elements, bool deterministic) { return deft::Col2ImWorkspaceBytes(dx_elements, deterministic); },
      nb::arg("dx_elements"), nb::kw_only(), nb::arg("deterministic"),
      "Bytes of the CUDA col2im's workspace output for dx_elements elements of dx.");
  m.def(
      "backward_workspace_bytes",
      [](const std::string& dtype, int64_t x_elements, int64_t offset_elements, int64_t mask_elements,
         int64_t kernel_elements, bool deterministic) {
        return deft::DeformConvBackwardWorkspaceBytes(x_elements, offset_elements, mask_elements, kernel_elements,
                                                      dtype_or_throw(dtype), deterministic);
      },
      nb::arg("dtype"), nb::arg("x_elements"), nb::arg("offset_elements"), nb::arg("mask_elements"),
      nb::arg("kernel_elements"), nb::kw_only(), nb::arg("deterministic") = false,
      "Bytes of the backward's workspace output (deterministic: the fixed-point accumulators too).");
}
