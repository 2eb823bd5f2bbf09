// Plain launch functions of the CUDA deformable-convolution kernels. No XLA types: the FFI layer
// (cuda/ffi/gpu_ffi.cc) decodes buffers and attributes and calls these on XLA's stream.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <string>

#include "deft/dtype.h"
#include "deft/geometry.h"
#include "deft/tiling.h"

namespace deft {

// Empty string if `tile` is a configuration the kernels instantiate for `dtype`, else the reason.
std::string CheckGpuTileConfig(const TileConfig& tile, DType dtype);

// Scratch bytes LaunchDeformConvForward needs (the split forward's fp32 accumulator of y for
// 16-bit types; 0 otherwise).
size_t DeformConvForwardWorkspaceBytes(const ConvParams& p, const TileConfig& tile, DType dtype);

// y = deform_conv2d(x, offset, mask, kernel). `mask` is ignored when !p.with_mask.
cudaError_t LaunchDeformConvForward(cudaStream_t stream, const ConvParams& p, const TileConfig& tile,
                                    DType dtype, bool allow_tf32, const void* x, const void* offset,
                                    const void* mask, const void* kernel, void* y, void* workspace);

// Scratch bytes LaunchDeformConvBackward needs (fp32 accumulators for half types).
size_t DeformConvBackwardWorkspaceBytes(const ConvParams& p, const TileConfig& tile, DType dtype);

// Cotangents of x, offset, mask (skipped when !p.with_mask) and kernel, given dy.
cudaError_t LaunchDeformConvBackward(cudaStream_t stream, const ConvParams& p, const TileConfig& tile,
                                     DType dtype, bool allow_tf32, const void* x, const void* offset,
                                     const void* mask, const void* kernel, const void* dy, void* dx,
                                     void* doffset, void* dmask, void* dkernel, void* workspace);

}  // namespace deft
