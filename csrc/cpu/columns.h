// CPU deformable convolution as columns: a sampler that writes the bilinearly sampled column
// tensor and a col2im that turns its cotangent into dx, doffset and dmask. The reduction over
// (tap, input channel) against the kernel is not in here: it is XLA's dot (deft_jax/_columns.py),
// the same split as the GPU's GEMM-dominated route. No XLA types: csrc/ffi/cpu_ffi.cc decodes the
// buffers and supplies the threads (task_runner.h).
//
// Layouts (dense, row-major), with `batch` = every leading dim folded (vmap), n_in images each in
// the inputs:
//   x      [batch, n_in, h, w, c_in]
//   offset [batch, n_in, h_out, w_out, G * K * 2]   (deft/geometry.h)
//   mask   [batch, n_in, h_out, w_out, G * K]       (unused when !p.with_mask)
//   cols   [batch, count, K, c_in]                  cols[.., k, c] = mask * sample of channel c at tap k
// for a run of `count` output pixels of each problem (PixelRange: whole images or any run of
// output rows); col2im's dcols has the same layout, its doffset / dmask the layout of offset /
// mask for the run's pixels, and dx [batch, DxImages::count, h, w, c_in] the images the run's
// pixels lie in. Both read their inputs in place: no copy per chunk.
//
// Every output element is written by one task in a fixed order of operations, so the results are
// bitwise the same for any number of threads and any schedule.
#pragma once

#include <cstdint>

#include "cpu/task_runner.h"
#include "deft/geometry.h"
#include "deft/host_half.h"

namespace deft::cpu {

// The output pixels a sampler call covers: pixels [start, start + count) of each problem's
// n_in * pixels_out, image-major; output pixel t of the call is pixel row(t) of offset / mask.
struct PixelRange {
  int64_t batch, per_problem, count, start;
  int64_t total() const { return batch * count; }
  int64_t row(int64_t t) const { return (t / count) * per_problem + start + t % count; }
};

// The dx images a col2im call adds into: images [first, first + count) of each problem, which
// hold every pixel of its PixelRange.
struct DxImages {
  int64_t first, count;
};

// cols in x's type T (blended in Acc<T>: float, double for double).
template <typename T>
void SampleColumns(const ConvParams& p, const PixelRange& px, const T* x, const T* offset, const T* mask,
                   T* cols, TaskRunner& runner);

// For dcols [batch, count, K, c_in] in the accumulation type A = Acc<T> of the run px: dx += its
// scatter (dx [batch, di.count, h, w, c_in] in A, read and written: a run's images may be summed
// over several calls, in order), doffset and dmask of the run's pixels (in T; dmask not written
// when !p.with_mask).
template <typename T>
void Col2Im(const ConvParams& p, const PixelRange& px, const DxImages& di, const T* x, const T* offset,
            const T* mask, const typename Acc<T>::type* dcols, typename Acc<T>::type* dx, T* doffset,
            T* dmask, TaskRunner& runner);

// The instruction set the kernels above run with: "avx512", "avx2" or "generic" (the compiler's
// default target), chosen once per process.
const char* CpuIsaName();

}  // namespace deft::cpu
