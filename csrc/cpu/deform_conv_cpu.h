// Multi-threaded CPU deformable convolution (forward and backward). No XLA types: the FFI
// layer (csrc/ffi/cpu_ffi.cc) decodes buffers and calls these.
#pragma once

#include <cstdint>

#include "deft/geometry.h"

namespace deft::cpu {

// y = deform_conv2d(x, offset, mask, kernel); mask unused when !p.with_mask. Layouts as in
// deft/geometry.h. One task handles `pixels_per_task` output pixels of one image.
template <typename T>
void Forward(const ConvParams& p, int64_t pixels_per_task, const T* x, const T* offset,
             const T* mask, const T* kernel, T* y);

// Cotangents for dy; dmask is not written when !p.with_mask. Every output is fully written.
template <typename T>
void Backward(const ConvParams& p, int64_t pixels_per_task, const T* x, const T* offset,
              const T* mask, const T* kernel, const T* dy, T* dx, T* doffset, T* dmask,
              T* dkernel);

}  // namespace deft::cpu
