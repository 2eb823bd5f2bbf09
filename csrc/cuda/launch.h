// Plain launch functions of the CUDA deformable-convolution kernels. No XLA types: the FFI layer
// (csrc/ffi/gpu_ffi.cc) decodes buffers and attributes and calls these on XLA's stream.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

#include "deft/dtype.h"
#include "deft/geometry.h"
#include "deft/tiling.h"

namespace deft {

// Which part of `tile` the kernels do not instantiate for `dtype` (kTileOk: all of it). A code, not
// a message: csrc/ffi/tile_check.h words it on the host compiler's side. (The message once built
// here with a std::ostringstream crashed the process with SIGSEGV on the GPU machine's build, H100,
// 2026-12-07; see csrc/ffi/ffi_util.h's dims_str for the second such crash.)
enum TileCheck : int { kTileOk = 0, kTileForward = 1, kTileBackward = 2 };
TileCheck CheckGpuTileConfig(const TileConfig& tile, DType dtype);

// Workspace bytes LaunchDeformConvForward needs for y_elements outputs, all leading dims included
// (the split forward's fp32 accumulator of y for 16-bit types; 0 otherwise). The caller owns the
// workspace for as long as the launched work runs: XLA hands it in as an output buffer.
size_t DeformConvForwardWorkspaceBytes(int64_t y_elements, const TileConfig& tile, DType dtype);

// y = deform_conv2d(x, offset, mask, kernel). `mask` is ignored when !p.with_mask. deterministic:
// bitwise reproducible (the split forward, whose partial sums meet in float atomics, is replaced by
// the streaming kernel of its tile; every other forward is reproducible anyway).
cudaError_t LaunchDeformConvForward(cudaStream_t stream, const ConvParams& p, const TileConfig& tile,
                                    DType dtype, bool allow_tf32, bool deterministic, const void* x,
                                    const void* offset, const void* mask, const void* kernel, void* y,
                                    void* workspace);

// Workspace bytes LaunchDeformConvBackward needs, from the cotangents' element counts: fp32
// accumulators of the four cotangents for half types (0 otherwise); deterministic: int64
// fixed-point accumulators and non-finite flags of the four cotangents for every dtype.
size_t DeformConvBackwardWorkspaceBytes(int64_t x_elements, int64_t offset_elements, int64_t mask_elements,
                                        int64_t kernel_elements, DType dtype, bool deterministic);

// Cotangents of x, offset, mask (skipped when !p.with_mask) and kernel, given dy. deterministic:
// bitwise reproducible, accumulated in 64-bit fixed point (kernels/det.cuh).
cudaError_t LaunchDeformConvBackward(cudaStream_t stream, const ConvParams& p, const TileConfig& tile,
                                     DType dtype, bool allow_tf32, bool deterministic, const void* x,
                                     const void* offset, const void* mask, const void* kernel, const void* dy,
                                     void* dx, void* doffset, void* dmask, void* dkernel, void* workspace);

}  // namespace deft
