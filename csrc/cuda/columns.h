// The GPU column route: a sampler that writes a chunk of bilinearly sampled columns in x's type
// and a col2im that turns their cotangent into dx, doffset and dmask. The reduction over (tap,
// input channel) against the kernel is XLA's dot (cuBLAS), put around these by
// deft_jax/_columns.py: the same split, layouts and contract as the CPU route (csrc/cpu/columns.h).
// No XLA types: csrc/ffi/gpu_ffi.cc decodes the buffers and calls these on XLA's stream.
//
// Layouts (dense, row-major), `batch` = leading dims folded, n_in = p.n images in the inputs and
// n_out (the chunk: images [start, start + n_out) of each problem) in the outputs:
//   x      [batch, n_in, h, w, c_in]
//   offset [batch, n_in, h_out, w_out, G * K * 2]
//   mask   [batch, n_in, h_out, w_out, G * K]      (unused when !p.with_mask)
//   cols   [batch, n_out, h_out, w_out, K, c_in]   cols[.., k, c] = mask * sample of channel c at tap k
//   dcols  [batch, n_out, h_out, w_out, K, c_in]   in the accumulation type (float; double for double)
//   dx     [batch, n_out, h, w, c_in]              in the accumulation type
//   doffset, dmask: the chunk's images, in x's type
// `start` is a device int32 scalar (a loop counter of the traced program): the kernels read it and,
// as XLA's dynamic_slice does, clamp it to [0, n_in - n_out].
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "deft/dtype.h"
#include "deft/geometry.h"

namespace deft {

cudaError_t LaunchSampleColumns(cudaStream_t stream, const ConvParams& p, int64_t n_out,
                                const int32_t* start, DType dtype, const void* x, const void* offset,
                                const void* mask, void* cols);

// dx: by default zeroed here and accumulated with float atomics, so its bits may differ run to
// run; with `deterministic`, accumulated in 64-bit fixed point in `workspace`
// (Col2ImWorkspaceBytes) and converted once, bitwise reproducible (cuda/det.cuh's scheme). doffset
// and dmask are each written by one thread after a fixed-order reduction (deterministic either way).
cudaError_t LaunchCol2Im(cudaStream_t stream, const ConvParams& p, int64_t n_out, const int32_t* start,
                         DType dtype, bool deterministic, const void* x, const void* offset, const void* mask,
                         const void* dcols, void* dx, void* doffset, void* dmask, void* workspace);

// Bytes of the col2im's workspace for dx_elements elements of dx (0 unless deterministic).
size_t Col2ImWorkspaceBytes(int64_t dx_elements, bool deterministic);

}  // namespace deft
