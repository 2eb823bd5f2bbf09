// CPU fused forward: the column route's split (sampler + GEMM) done per tile of output pixels
// inside one call, so a tile's columns are written and read while they sit in the core's cache
// instead of going through memory. Each task samples its tile with columns.h's sampler (into a
// per-thread buffer) and multiplies it by the kernel with a BLAS GEMM on the same thread. No XLA
// types: csrc/ffi/cpu_ffi.cc decodes the buffers, supplies the threads and the GEMMs.
//
// Layouts as columns.h, plus kernel [batch, kh, kw, c_in / feature_groups, c_out] (HWIO) and
// y [batch, n, h_out, w_out, c_out].
//
// Every output element is computed by one task (its tile) with one fixed sequence of GEMM calls,
// and the tiles depend only on tile_pixels: the result is bitwise the same for any number of
// threads (given one BLAS build running single-threaded, as deft_jax loads it).
#pragma once

#include <cstdint>

#include "cpu/task_runner.h"
#include "deft/geometry.h"
#include "deft/host_half.h"

namespace deft::cpu {

// Row-major cblas_?gemm (order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
// with 32-bit integers, as OpenBLAS exports them; the caller supplies them (the module links no
// BLAS: deft_jax/_ffi.py loads one at run time).
using SgemmFn = void (*)(int, int, int, int, int, int, float, const float*, int, const float*, int, float,
                         float*, int);
using DgemmFn = void (*)(int, int, int, int, int, int, double, const double*, int, const double*, int,
                         double, double*, int);
struct Gemm {
  SgemmFn sgemm = nullptr;
  DgemmFn dgemm = nullptr;
};

// y of every output pixel, in tiles of tile_pixels pixels of each problem (the last tile of a
// problem may be shorter). Half types: columns in T (as the column route's), converted to float
// for sgemm with the kernel converted once per call; y rounded once at the end. Needs
// gemm.sgemm (float, half types) or gemm.dgemm (double); the caller checks that every count fits
// the GEMM's int.
template <typename T>
void FusedForward(const ConvParams& p, int64_t tile_pixels, const T* x, const T* offset, const T* mask,
                  const T* kernel, T* y, const Gemm& gemm, TaskRunner& runner);

}  // namespace deft::cpu
