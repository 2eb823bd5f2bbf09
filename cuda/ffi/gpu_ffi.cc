// XLA typed-FFI handlers for platform "CUDA" and the nanobind module `_deft_cuda` that hands their
// capsules to Python. Decoding, checking and launching only; the arithmetic is in cuda/kernels/.
// Execute never synchronises, allocates device memory itself or reads device memory back: the
// workspace comes from XLA's scratch allocator, so the handlers are command-buffer compatible.
#include <cuda_runtime.h>

#include <string>

#include "ffi/conv_attrs.h"
#include "kernels/launch.h"
#include "nanobind/nanobind.h"
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
  const std::string why = deft::CheckGpuTileConfig(tile_of(attrs), dtype);
  return why.empty() ? ffi::Error::Success() : invalid(why);
}

// Scratch from XLA's allocator (nullptr when none is needed).
ffi::ErrorOr<void*> Workspace(ffi::ScratchAllocator& scratch, size_t bytes, const char* what) {
  if (bytes == 0) return static_cast<void*>(nullptr);
  auto got = scratch.Allocate(bytes, 16);  // XLA caps the requested alignment at 16; its allocator gives 256
  if (!got.has_value())
    return ffi::Unexpected(ffi::Error(ffi::ErrorCode::kResourceExhausted,
                                      "deft_jax: could not allocate " + std::to_string(bytes) + " bytes of " + what));
  return *got;
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                       ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, ConvAttrs attrs) {
  deft::ConvParams p;
  if (auto err = BuildParams(x, offset, mask, kernel, y->dimensions(), attrs, &p); !err.success()) return err;
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype.error();
  if (y->element_type() != x.element_type()) return invalid("output dtype differs from x's");
  if (auto err = CheckTile(attrs, *dtype); !err.success()) return err;
  if (y->element_count() == 0) return ffi::Error::Success();
  const deft::TileConfig tile = tile_of(attrs);
  auto ws = Workspace(scratch, deft::DeformConvForwardWorkspaceBytes(p, tile, *dtype), "forward workspace");
  if (ws.has_error()) return ws.error();
  const cudaError_t e = deft::LaunchDeformConvForward(stream, p, tile, *dtype, attrs.allow_tf32 != 0,
                                                      x.untyped_data(), offset.untyped_data(),
                                                      mask.untyped_data(), kernel.untyped_data(),
                                                      y->untyped_data(), *ws);
  if (e != cudaSuccess) return cuda_error("forward launch", e, p);
  return ffi::Error::Success();
}

ffi::Error BackwardImpl(cudaStream_t stream, ffi::ScratchAllocator scratch, ffi::AnyBuffer x,
                        ffi::AnyBuffer offset, ffi::AnyBuffer mask, ffi::AnyBuffer kernel, ffi::AnyBuffer dy,
                        ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> doffset,
                        ffi::Result<ffi::AnyBuffer> dmask, ffi::Result<ffi::AnyBuffer> dkernel,
                        ConvAttrs attrs) {
  deft::ConvParams p;
  if (auto err = BuildParams(x, offset, mask, kernel, dy.dimensions(), attrs, &p); !err.success()) return err;
  auto dtype = CheckBackwardBuffers(x, offset, mask, kernel, dy, *dx, *doffset, *dmask, *dkernel);
  if (dtype.has_error()) return dtype.error();
  if (auto err = CheckTile(attrs, *dtype); !err.success()) return err;
  if (dx->element_count() + doffset->element_count() + dmask->element_count() + dkernel->element_count() == 0)
    return ffi::Error::Success();
  const deft::TileConfig tile = tile_of(attrs);
  auto ws = Workspace(scratch, deft::DeformConvBackwardWorkspaceBytes(p, tile, *dtype), "backward workspace");
  if (ws.has_error()) return ws.error();
  const cudaError_t e = deft::LaunchDeformConvBackward(
      stream, p, tile, *dtype, attrs.allow_tf32 != 0, x.untyped_data(), offset.untyped_data(),
      mask.untyped_data(), kernel.untyped_data(), dy.untyped_data(), dx->untyped_data(),
      doffset->untyped_data(), dmask->untyped_data(), dkernel->untyped_data(), *ws);
  if (e != cudaSuccess) return cuda_error("backward launch", e, p);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace deft_ffi

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftDeformConv2dFwdCuda, deft_ffi::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Arg<ffi::AnyBuffer>()  // mask, (0,) without mask
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attrs<deft_ffi::ConvAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftDeformConv2dBwdCuda, deft_ffi::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Ctx<ffi::ScratchAllocator>()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Arg<ffi::AnyBuffer>()  // mask, (0,) without mask
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // doffset
                                  .Ret<ffi::AnyBuffer>()  // dmask, (0,) without mask
                                  .Ret<ffi::AnyBuffer>()  // dkernel
                                  .Attrs<deft_ffi::ConvAttrs>(),
                              {ffi::Traits::kCmdBufferCompatible});

NB_MODULE(_deft_cuda, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["deft_deform_conv2d_fwd_v3"] = nb::capsule(reinterpret_cast<void*>(DeftDeformConv2dFwdCuda));
    d["deft_deform_conv2d_bwd_v3"] = nb::capsule(reinterpret_cast<void*>(DeftDeformConv2dBwdCuda));
    return d;
  });
}
