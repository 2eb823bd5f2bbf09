// Public launchers (launch.h): dtype dispatch onto the per-dtype drivers of ops_<dtype>.cu.
#include "cuda/dispatch.cuh"

namespace deft {
namespace kern {
DEFT_DECLARE_DRIVERS(float)
DEFT_DECLARE_DRIVERS(double)
DEFT_DECLARE_DRIVERS(__nv_bfloat16)
DEFT_DECLARE_DRIVERS(__half)
}  // namespace kern

TileCheck CheckGpuTileConfig(const TileConfig& tile, DType dtype) {
  auto ok = [&](auto tag) {
    return kern::with_fwd_cfg<decltype(tag)>(tile, [](auto) { return cudaSuccess; }) == cudaSuccess;
  };
  const bool f64 = dtype == DType::kF64;
  if (tile.bwd_tile_n != kern::WeightCfg::BN && (f64 || tile.bwd_tile_n != kern::WeightCfgWide::BN))
    return kTileBackward;
  bool good = false;
  switch (tile.family) {
    case kFamilyStreaming: good = f64 ? ok(double{}) : dtype == DType::kF32 ? ok(float{}) : ok(__half{}); break;
    case kFamilySplit: good = !f64 && kern::is_split_tile(tile); break;
    case kFamilyRing: good = !f64 && kern::is_ws_tile(tile); break;
    default: break;
  }
  return good ? kTileOk : kTileForward;
}

size_t DeformConvForwardWorkspaceBytes(int64_t y_elements, const TileConfig& tile, DType dtype) {
  switch (dtype) {
    case DType::kBF16: return kern::fwd_workspace<__nv_bfloat16>(y_elements, tile);
    case DType::kF16: return kern::fwd_workspace<__half>(y_elements, tile);
    default: return 0;
  }
}

cudaError_t LaunchDeformConvForward(cudaStream_t stream, const ConvParams& p, const TileConfig& tile,
                                    DType dtype, bool allow_tf32, bool deterministic, const void* x,
                                    const void* offset, const void* mask, const void* kernel, void* y,
                                    void* workspace) {
  switch (dtype) {
    case DType::kF32:
      return kern::run_forward<float>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel, y,
                                    workspace);
    case DType::kF64:
      return kern::run_forward<double>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel, y,
                                     workspace);
    case DType::kBF16:
      return kern::run_forward<__nv_bfloat16>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel, y,
                                            workspace);
    case DType::kF16:
      return kern::run_forward<__half>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel, y,
                                     workspace);
  }
  return cudaErrorInvalidValue;
}

size_t DeformConvBackwardWorkspaceBytes(int64_t x_elements, int64_t offset_elements, int64_t mask_elements,
                                        int64_t kernel_elements, DType dtype, bool deterministic) {
  const kern::GradCounts n{x_elements, offset_elements, mask_elements, kernel_elements};
  switch (dtype) {
    case DType::kBF16: return kern::bwd_workspace<__nv_bfloat16>(n, deterministic).total;
    case DType::kF16: return kern::bwd_workspace<__half>(n, deterministic).total;
    case DType::kF32: return kern::bwd_workspace<float>(n, deterministic).total;
    case DType::kF64: return kern::bwd_workspace<double>(n, deterministic).total;
  }
  return 0;
}

cudaError_t LaunchDeformConvBackward(cudaStream_t stream, const ConvParams& p, const TileConfig& tile,
                                     DType dtype, bool allow_tf32, bool deterministic, const void* x,
                                     const void* offset, const void* mask, const void* kernel, const void* dy,
                                     void* dx, void* doffset, void* dmask, void* dkernel, void* workspace) {
  switch (dtype) {
    case DType::kF32:
      return kern::run_backward<float>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel, dy, dx,
                                       doffset, dmask, dkernel, workspace);
    case DType::kF64:
      return kern::run_backward<double>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel, dy, dx,
                                        doffset, dmask, dkernel, workspace);
    case DType::kBF16:
      return kern::run_backward<__nv_bfloat16>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel,
                                               dy, dx, doffset, dmask, dkernel, workspace);
    case DType::kF16:
      return kern::run_backward<__half>(stream, p, tile, allow_tf32, deterministic, x, offset, mask, kernel, dy, dx,
                                        doffset, dmask, dkernel, workspace);
  }
  return cudaErrorInvalidValue;
}

}  // namespace deft
