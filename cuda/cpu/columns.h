// CPU deformable convolution as columns: a sampler that writes the bilinearly sampled column
// tensor and a col2im that turns its cotangent into dx, doffset and dmask. The reduction over
// (tap, input channel) against the kernel is not in here: it is XLA's dot (deft_jax/_columns.py),
// the same split as the GPU's GEMM-dominated route. No XLA types: cuda/ffi/cpu_ffi.cc decodes the
// buffers and supplies the threads (task_runner.h).
//
// Layouts (dense, row-major), images = every leading dim folded into p.n (p.batch == 1):
//   x      [n, h, w, c_in]
//   offset [n, h_out, w_out, G * K * 2]   (deft/geometry.h)
//   mask   [n, h_out, w_out, G * K]       (unused when !p.with_mask)
//   cols   [n, h_out, w_out, K, c_in]     cols[.., k, c] = mask * bilinear sample of channel c at tap k
//
// Every output element is written by one task in a fixed order of operations, so the results are
// bitwise the same for any number of threads and any schedule.
#pragma once

#include <cstdint>

#include "cpu/task_runner.h"
#include "deft/geometry.h"
#include "deft/host_half.h"

namespace deft::cpu {

// cols in x's type T (blended in Acc<T>: float, double for double).
template <typename T>
void SampleColumns(const ConvParams& p, const T* x, const T* offset, const T* mask, T* cols,
                   TaskRunner& runner);

// For dcols [n, h_out, w_out, K, c_in] in the accumulation type A = Acc<T>: dx (in A, every element
// written), doffset and dmask (in T; dmask not written when !p.with_mask).
template <typename T>
void Col2Im(const ConvParams& p, const T* x, const T* offset, const T* mask,
            const typename Acc<T>::type* dcols, typename Acc<T>::type* dx, T* doffset, T* dmask,
            TaskRunner& runner);

// The instruction set the kernels above run with: "avx512", "avx2" or "generic" (the compiler's
// default target), chosen once per process.
const char* CpuIsaName();

}  // namespace deft::cpu
