// Device building blocks shared by the forward and backward kernels: element conversions, the
// bilinear sample record, the two tile loaders (sampled pixels x channels, and dense rows) and the
// block-level matrix engines (tensor cores through ldmatrix + mma.sync, and exact SIMT FMA).
// No XLA types in here.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "deft/geometry.h"
#include "deft/tiling.h"

namespace deft {
namespace kern {

// ---------------------------------------------------------------------------------------------
// Types: T is the storage type, Acc the accumulation type (float, double for double).
template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using Acc = typename AccOf<T>::type;
template <typename T>
constexpr bool kIsHalf = std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

// Elements per 16-byte vector.
template <typename T> constexpr int kVec = 16 / static_cast<int>(sizeof(T));

template <typename A> __device__ __forceinline__ A to_acc(float v) { return A(v); }
template <typename A> __device__ __forceinline__ A to_acc(double v) { return A(v); }
template <typename A> __device__ __forceinline__ A to_acc(__half v) { return A(__half2float(v)); }
template <typename A> __device__ __forceinline__ A to_acc(__nv_bfloat16 v) { return A(__bfloat162float(v)); }

template <typename T> __device__ __forceinline__ T from_acc(float v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <typename T> __device__ __forceinline__ T from_acc(double v);
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }

// Atomic accumulation targets: the output itself for float/double, an fp32 workspace for halves.
template <typename T> struct AtomOf { using type = float; };
template <> struct AtomOf<double> { using type = double; };
template <typename T> using Atom = typename AtomOf<T>::type;

// dst[0..N) += v (atomically per element; sm_90 has 16-byte float4 atomics: a quarter of the ops).
template <int N>
__device__ __forceinline__ void atomic_add_n(float* dst, const float (&v)[N]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVec4 = N % 4 == 0;
#else
  constexpr bool kVec4 = false;
#endif
  if constexpr (kVec4) {
#pragma unroll
    for (int j = 0; j < N / 4; ++j)
      atomicAdd(reinterpret_cast<float4*>(dst) + j, make_float4(v[4 * j], v[4 * j + 1], v[4 * j + 2], v[4 * j + 3]));
  } else {
#pragma unroll
    for (int e = 0; e < N; ++e) atomicAdd(dst + e, v[e]);
  }
}
template <int N>
__device__ __forceinline__ void atomic_add_n(double* dst, const double (&v)[N]) {
#pragma unroll
  for (int e = 0; e < N; ++e) atomicAdd(dst + e, v[e]);
}

// ---------------------------------------------------------------------------------------------
// Geometry handed to every kernel by value: the problem plus derived constants.
struct Geo {
  ConvParams p;
  int64_t K, Cg, Cog, Cpog;  // taps, C_in per feature group, C_out per group, C_in per offset group
  int64_t tile_h, tile_w;    // spatial output tile of the pixel-tiled kernels
  int64_t tiles_w, tiles_img;  // tiles per image row / per image (flat: per problem)
  int64_t pixels;            // n * h_out * w_out of one problem
  bool vec;                  // every channel count and start is a multiple of the 16-byte vector
  bool pipeline;             // forward: register-prefetch + double-buffered pipeline (stages=2)
  bool x32;                  // x has < 2^31 elements: corner offsets fit int32 (the pipelined loaders)
  bool flat;                 // streaming forward: tile_w consecutive pixels of (n, h_out, w_out)
};

// Channel chunk `q` of feature group `fg`: chunks never straddle an offset group, so one bilinear
// record per (pixel, tap) serves the whole chunk. Returns false when q is past the last chunk.
// I = int64_t on the host and in the weight pass; int in the kernels' 32-bit block decode
// (tile_tap_chunk: check_extents bounds the channel counts). The index arguments take I's type
// from the outputs (common_type<I>::type is not deduced).
template <typename I>
__host__ __device__ __forceinline__ bool chunk_of(const Geo& g, typename std::common_type<I>::type fg,
                                                  typename std::common_type<I>::type q,
                                                  typename std::common_type<I>::type bk, I* c0, I* cnt, I* og) {
  const I cg = static_cast<I>(g.Cg), cpog = static_cast<I>(g.Cpog);
  const I beg = fg * cg, end = beg + cg;
  I c = beg, idx = 0;
  while (c < end) {
    const I o = c / cpog;
    const I se = (o + 1) * cpog < end ? (o + 1) * cpog : end;
    const I n = (se - c + bk - 1) / bk;
    if (q < idx + n) {
      *c0 = c + (q - idx) * bk;
      *cnt = se - *c0 < bk ? se - *c0 : bk;
      *og = o;
      return true;
    }
    idx += n;
    c = se;
  }
  return false;
}

inline int64_t max_chunks(const Geo& g, int64_t bk) {
  int64_t best = 0;
  for (int64_t fg = 0; fg < g.p.feature_groups; ++fg) {
    int64_t q = 0, c0, cnt, og;
    while (chunk_of(g, fg, q, bk, &c0, &cnt, &og)) ++q;
    best = q > best ? q : best;
  }
  return best;
}

// The work of one block of the (spatial tile) x (feature group, tap, channel chunk) grids of the
// data pass and the split forward, launched as gridDim.x = images x tiles, gridDim.y = fg x taps x
// maxq. Blocks start in linear order (x fastest). IMAGE_MAJOR decodes the linear index as (image;
// fg, tap, q; tile) from slowest to fastest, so the resident blocks work on about one image at a
// time, all taps: the data pass's x, dY and dx accumulator then stay in L2 between taps (with
// (image, tile) fastest each tap swept the whole batch: L2 hit rate 58% at S2 fp32; docs/kernels.md
// "dx merge"), while neighbouring blocks still take different tiles of one tap (their dx atomics
// land on different lines). The split forward keeps (image, tile) fastest: its y accumulator
// is small enough for L2 anyway.
struct TileTapChunk {
  int64_t img, b, th0, tw0, tap, fg, c0, og;  // img over batch*n, b the problem of the batch
  int cnt;                                    // channels of the chunk [c0, c0 + cnt)
};
// False when the block's chunk q is past its feature group's last one (uniform over the block).
// 32-bit throughout: the launchers bound gridDim.x < 2^31, gridDim.y <= 65535 and, image-major,
// gridDim.x * gridDim.y < 2^31. A 64-bit division is a range check plus a subroutine: this decode
// and the data pass's per-slot row math were 20% of that pass's instructions at S2 fp32 (Nsight
// Compute source counters, docs/kernels.md).
template <bool IMAGE_MAJOR>
__device__ __forceinline__ bool tile_tap_chunk(const Geo& g, int64_t maxq, int bc, TileTapChunk* w) {
  const unsigned tiles = static_cast<unsigned>(g.tiles_img);
  unsigned inner = blockIdx.y, outer = blockIdx.x;  // (fg, tap, q), (image, tile)
  if constexpr (IMAGE_MAJOR) {
    const unsigned lin = blockIdx.y * gridDim.x + blockIdx.x;
    const unsigned per_img = tiles * gridDim.y, im = lin / per_img, rem = lin - im * per_img;
    inner = rem / tiles;
    outer = im * tiles + (rem - inner * tiles);
  }
  const unsigned img = outer / tiles, tile = outer - img * tiles;
  const unsigned tiles_w = static_cast<unsigned>(g.tiles_w), trow = tile / tiles_w;
  w->img = img;
  w->b = img / static_cast<unsigned>(g.p.n);
  w->th0 = static_cast<int64_t>(trow) * g.tile_h;
  w->tw0 = static_cast<int64_t>(tile - trow * tiles_w) * g.tile_w;
  const unsigned mq = static_cast<unsigned>(maxq), K = static_cast<unsigned>(g.K);
  const unsigned ft = inner / mq, q = inner - ft * mq, fg = ft / K;
  w->tap = ft - fg * K;
  w->fg = fg;
  int c0, cnt, og;
  if (!chunk_of<int>(g, static_cast<int>(fg), static_cast<int>(q), bc, &c0, &cnt, &og)) return false;
  w->c0 = c0;
  w->og = og;
  w->cnt = cnt;
  return true;
}

// ---------------------------------------------------------------------------------------------
// One bilinear sample (pixel, tap, offset group) of the data pass. y0 >= -1: a live sample;
// y0 = kRecDead: contributes nothing (a pixel past the image, a point outside it); y0 = kRecNan:
// a NaN coordinate, which reads no corner (nothing for dx) but whose doffset and dmask are NaN.
constexpr int kRecDead = -4, kRecNan = -3;
template <typename A>
struct Rec {
  int64_t xoff;  // element offset of the pixel's image in x
  int y0, x0;
  A ly, lx, m;
};

// pix: linear index of the output pixel over (batch, n, h_out, w_out); img: its (batch*n) image.
template <typename T, typename A>
__device__ __forceinline__ Rec<A> make_rec(const Geo& g, const T* __restrict__ offset,
                                           const T* __restrict__ mask, bool valid, int64_t pix,
                                           int64_t img, int64_t ho, int64_t wo, int tap, int64_t og) {
  const ConvParams& p = g.p;
  Rec<A> r;
  r.xoff = img * p.h * p.w * p.c_in;
  r.y0 = kRecDead;
  r.x0 = kRecDead;
  r.ly = r.lx = r.m = A(0);
  if (!valid) return r;
  const int kw = static_cast<int>(p.kw);  // 32-bit, as in build_samp
  const int i = tap / kw, j = tap - i * kw;
  const T* o = offset + pix * (p.offset_groups * g.K * 2) + (og * g.K + tap) * 2;
  const A dy = to_acc<A>(o[0]), dx = to_acc<A>(o[1]);
  const A m = p.with_mask ? to_acc<A>(mask[pix * (p.offset_groups * g.K) + og * g.K + tap]) : A(1);
  const A y = A(p.base_y(ho, i)) + dy, x = A(p.base_x(wo, j)) + dx;
  const Bilinear<A> b = make_bilinear<A>(y, x, p.h, p.w);
  if (!b.inside) {
    if (b.nan_point) r.y0 = kRecNan;
    return r;
  }
  r.y0 = static_cast<int>(b.y0);
  r.x0 = static_cast<int>(b.x0);
  r.ly = b.ly;
  r.lx = b.lx;
  r.m = m;
  return r;
}

// One bilinear sample as the loaders consume it: each corner's element offset into x (channel 0
// of that pixel, image offset included) and its weight with the mask folded in. Computed once per
// (pixel, tap, offset group) so the per-chunk loaders do no index arithmetic beyond one add per
// corner. off = -1: the corner is outside the image (or the sample contributes nothing). Such a
// dead corner has weight 0, except corner 0 of a sample with no live corner (the point is not
// inside), whose weight is the sample's value: fill() * mask, NaN for a NaN coordinate or a
// non-finite mask, else 0. The pipelined blend multiplies it by the zero-filled corner
// (NaN * 0 = NaN) and load_samples starts from it, so a NaN sample costs nothing per channel.
// I = int32_t (Geo::x32: x has < 2^31 elements) on the pipelined forward and weight loaders: a
// corner's address is then one IMAD.WIDE where the 64-bit offset took a 64-bit add, a shift and a
// reload of x's pointer, and the record is 32 bytes instead of 48 (docs/kernels.md).
template <typename A, typename I = int64_t>
struct alignas(16) Samp {
  I off[4];
  A w[4];
};

// The raw inputs of one sample (offset pair, mask), loaded apart from building the Samp so a
// pipelined loop can have them in flight a step ahead.
template <typename A>
struct SampIn {
  A dy, dx, m;
};

template <typename T, typename A>
__device__ __forceinline__ SampIn<A> load_samp_in(const Geo& g, const T* __restrict__ offset,
                                                  const T* __restrict__ mask, bool valid, int64_t pix,
                                                  int tap, int64_t og) {
  const ConvParams& p = g.p;
  SampIn<A> in{A(0), A(0), A(1)};
  if (!valid) return in;
  const T* o = offset + pix * (p.offset_groups * g.K * 2) + (og * g.K + tap) * 2;
  in.dy = to_acc<A>(o[0]);
  in.dx = to_acc<A>(o[1]);
  if (p.with_mask) in.m = to_acc<A>(mask[pix * (p.offset_groups * g.K) + og * g.K + tap]);
  return in;
}

template <typename A, typename I = int64_t>
__device__ __forceinline__ Samp<A, I> build_samp(const Geo& g, const SampIn<A>& in, bool valid, int64_t img,
                                                 int64_t ho, int64_t wo, int tap) {
  const ConvParams& p = g.p;
  Samp<A, I> s;
#pragma unroll
  for (int k = 0; k < 4; ++k) s.off[k] = -1, s.w[k] = A(0);
  if (!valid) return s;
  const int kw = static_cast<int>(p.kw);  // 32-bit: a 64-bit division is a ~70-instruction call
  const int i = tap / kw, j = tap - i * kw;
  const Bilinear<A> b = make_bilinear<A>(A(p.base_y(ho, i)) + in.dy, A(p.base_x(wo, j)) + in.dx, p.h, p.w);
  if (!b.inside) {
    s.w[0] = b.fill() * in.m;  // 0, or NaN (see Samp)
    return s;
  }
  const A hy = A(1) - b.ly, hx = A(1) - b.lx, m = in.m;
  const A wt[4] = {hy * hx * m, hy * b.lx * m, b.ly * hx * m, b.ly * b.lx * m};
  const bool ok[4] = {b.v00, b.v01, b.v10, b.v11};
  const int64_t px0 = (img * p.h + b.y0) * p.w + b.x0;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    if (!ok[k]) continue;
    s.off[k] = static_cast<I>((px0 + (k >> 1) * p.w + (k & 1)) * p.c_in);
    s.w[k] = wt[k];
  }
  return s;
}

template <typename T, typename A, typename I = int64_t>
__device__ __forceinline__ Samp<A, I> make_samp(const Geo& g, const T* __restrict__ offset,
                                                const T* __restrict__ mask, bool valid, int64_t pix,
                                                int64_t img, int64_t ho, int64_t wo, int tap, int64_t og) {
  return build_samp<A, I>(g, load_samp_in<T, A>(g, offset, mask, valid, pix, tap, og), valid, img, ho, wo, tap);
}

// A 16-byte vector of T as kVec<T> accumulators. bf16 -> fp32 is a shift or a mask of the 32-bit
// word (one instruction per element, where the generic conversion takes two).
template <typename T, typename A>
__device__ __forceinline__ void unpack_vec(const uint4& raw, A (&v)[kVec<T>]) {
  const unsigned u[4] = {raw.x, raw.y, raw.z, raw.w};
  if constexpr (std::is_same<T, __nv_bfloat16>::value && std::is_same<A, float>::value) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      v[2 * j] = __uint_as_float(u[j] << 16);
      v[2 * j + 1] = __uint_as_float(u[j] & 0xffff0000u);
    }
  } else if constexpr (std::is_same<T, __half>::value && std::is_same<A, float>::value) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      __half2 h;
      memcpy(&h, &u[j], sizeof(h));
      const float2 f = __half22float2(h);
      v[2 * j] = f.x;
      v[2 * j + 1] = f.y;
    }
  } else {
    const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int k = 0; k < kVec<T>; ++k) v[k] = to_acc<A>(e[k]);
  }
}

template <typename T, typename A>
__device__ __forceinline__ void load_vec(const T* __restrict__ src, A (&v)[kVec<T>]) {
  unpack_vec<T, A>(__ldg(reinterpret_cast<const uint4*>(src)), v);
}

// kVec<T> accumulators as one 16-byte vector of T.
template <typename T, typename A>
__device__ __forceinline__ uint4 pack_vec(const A (&v)[kVec<T>]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < kVec<T>; ++k) e[k] = from_acc<T>(v[k]);
  return raw;
}

template <typename T, typename A, int N>
__device__ __forceinline__ void store_elems(T* dst, const A (&v)[N]) {
  if constexpr (N * sizeof(T) == 16) {
    *reinterpret_cast<uint4*>(dst) = pack_vec<T, A>(v);
  } else {
#pragma unroll
    for (int k = 0; k < N; ++k) dst[k] = from_acc<T>(v[k]);
  }
}

// The pipelined loaders' two halves: fetch the four corner vectors of one sample at channels
// xc[0, kVec) into registers (zeros where a corner is outside or `ok` is false) ...
template <typename T, typename A, typename I>
__device__ __forceinline__ void fetch_corners(uint4 (&cr)[4], const T* __restrict__ xc, const Samp<A, I>& q,
                                              bool ok) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const I o = q.off[k];
    cr[k] = (ok && o >= 0) ? __ldg(reinterpret_cast<const uint4*>(xc + o)) : make_uint4(0, 0, 0, 0);
  }
}

// ... and, a pipeline stage later, blend them with the sample's weights into kVec elements at dst.
// In fp32 for 16-bit types too (the contract: accumulation in float32). A packed HFMA2 blend
// (bf16x2/half2, rounded per step) was measured: bf16 forward up to 10% faster, its error vs the
// reference 2-4x larger (S2 1.4e-3 -> 5.7e-3; docs/kernels.md).
// acc = sum over the four corners of w[k] * corner k (kVec elements), in corner order.
template <typename T, typename A>
__device__ __forceinline__ void blend_corners(const uint4 (&cr)[4], const A (&w)[4], A (&acc)[kVec<T>]) {
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    A v[kVec<T>];
    unpack_vec<T, A>(cr[k], v);
#pragma unroll
    for (int e = 0; e < kVec<T>; ++e) acc[e] = k == 0 ? w[0] * v[e] : fma(w[k], v[e], acc[e]);
  }
}

template <typename T, typename A, typename I>
__device__ __forceinline__ void blend_store(T* dst, const uint4 (&cr)[4], const Samp<A, I>& q) {
  A acc[kVec<T>];
  blend_corners<T, A>(cr, q.w, acc);
  store_elems<T, A, kVec<T>>(dst, acc);
}

// Sampled tile: dst[r * ld + c] = sample(recs[r])[c0 + c] for c < cnt, 0 elsewhere (ROWS x COLS).
// The four corners are fetched as 16-byte vectors along C when `vec`.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_samples(T* dst, int ld, const Samp<Acc<T>>* recs,
                                             const T* __restrict__ x, bool vec, int64_t c0, int cnt,
                                             int tid) {
  using A = Acc<T>;
  if (vec) {
    constexpr int V = kVec<T>, VPR = COLS / V;
    static_assert(COLS % V == 0, "tile columns must hold whole vectors");
#pragma unroll 2
    for (int idx = tid; idx < ROWS * VPR; idx += THREADS) {
      const int r = idx / VPR, c = (idx - r * VPR) * V;
      const Samp<A>& q = recs[r];
      // The sum starts from a dead corner 0's weight: 0, or NaN for a NaN sample (see Samp).
      const A z = c < cnt && q.off[0] < 0 ? q.w[0] : A(0);
      A acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = z;
      if (c < cnt) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (q.off[k] < 0) continue;
          A v[V];
          load_vec<T, A>(x + q.off[k] + c0 + c, v);
#pragma unroll
          for (int e = 0; e < V; ++e) acc[e] += q.w[k] * v[e];
        }
      }
      store_elems<T, A, V>(dst + r * ld + c, acc);
    }
  } else {
    for (int idx = tid; idx < ROWS * COLS; idx += THREADS) {
      const int r = idx / COLS, c = idx - r * COLS;
      const Samp<A>& q = recs[r];
      A acc = c < cnt && q.off[0] < 0 ? q.w[0] : A(0);  // as above
      if (c < cnt) {
#pragma unroll
        for (int k = 0; k < 4; ++k)
          if (q.off[k] >= 0) acc += q.w[k] * to_acc<A>(x[q.off[k] + c0 + c]);
      }
      dst[r * ld + c] = from_acc<T>(acc);
    }
  }
}

// Dense tile: dst[r * ld + c] = row(r)[c] for c < cnt (row(r) == nullptr: a zero row), ROWS x COLS.
template <typename T, int ROWS, int COLS, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_rows(T* dst, int ld, RowPtr row, int cnt, bool vec, int tid) {
  if (vec) {
    constexpr int V = kVec<T>, VPR = COLS / V;
    static_assert(COLS % V == 0, "tile columns must hold whole vectors");
#pragma unroll 4
    for (int idx = tid; idx < ROWS * VPR; idx += THREADS) {
      const int r = idx / VPR, c = (idx - r * VPR) * V;
      const T* src = row(r);
      uint4 v = make_uint4(0, 0, 0, 0);
      if (src != nullptr && c < cnt) v = __ldg(reinterpret_cast<const uint4*>(src + c));
      *reinterpret_cast<uint4*>(dst + r * ld + c) = v;
    }
  } else {
    for (int idx = tid; idx < ROWS * COLS; idx += THREADS) {
      const int r = idx / COLS, c = idx - r * COLS;
      const T* src = row(r);
      dst[r * ld + c] = (src != nullptr && c < cnt) ? src[c] : from_acc<T>(Acc<T>(0));
    }
  }
}

// Asynchronous 16-byte global -> shared copies (sm_80 cp.async, L2 only: the rows are read once per
// block). ok = false zero-fills the destination without reading `src` (any valid address).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, bool ok) {
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(ok ? 16 : 0) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Wait until at most N committed groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

// load_rows by cp.async (16-byte vector path only: every row start and `cnt` multiples of kVec).
template <typename T, int ROWS, int COLS, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_rows_async(T* dst, int ld, RowPtr row, int cnt, const T* any, int tid) {
  constexpr int V = kVec<T>, VPR = COLS / V;
  static_assert(COLS % V == 0, "tile columns must hold whole vectors");
#pragma unroll
  for (int idx = tid; idx < ROWS * VPR; idx += THREADS) {
    const int r = idx / VPR, c = (idx - r * VPR) * V;
    const T* src = row(r);
    const bool ok = src != nullptr && c < cnt;
    cp_async16(dst + r * ld + c, ok ? src + c : any, ok);
  }
}

// ---------------------------------------------------------------------------------------------
// Block matrix engines: C[BM x BN] += A[BM x BK] * B[BK x BN] from shared memory.
// A_COL: A(m, k) at As[k * lda + m] (else As[m * lda + k]); B_COL: B(k, n) at Bs[n * ldb + k].

// Tensor cores through mma.sync (m16n8k16 for 16-bit types, m16n8k8 TF32 for fp32) with the
// fragments loaded by ldmatrix from 32-bit shared addresses. Replaced wmma, whose fragment loads
// compiled to generic 64-bit LD.E plus MOVM transposes (docs/kernels.md).
// Layouts (g = lane / 4, t = lane % 4; PTX ISA "mma.m16n8k16" / "m16n8k8"): A regs {(g, 2t..),
// (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)}, B regs {(k 2t.., n g), (k 2t+8.., n g)}, C {(g, 2t..),
// (g+8, 2t..)}; TF32 halves the k extents. ldmatrix gives lane l the word (row l/4, pair l%4) of
// each 8x8 b16 matrix (.trans: the transposed matrix), lanes 8q..8q+7 addressing matrix q's rows.
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr) : "memory");
}
__device__ __forceinline__ uint32_t to_tf32(float v) {
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(v));
  return r;
}

template <typename T>
__device__ __forceinline__ void mma_16n8(float (&c)[4], const uint32_t (&a)[4], const uint32_t* b) {
  if constexpr (std::is_same<T, float>::value) {
    asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else if constexpr (std::is_same<T, __nv_bfloat16>::value) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%0, %1, %2, %3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
}

template <typename T, int BM, int BN, int BK, int WM, int WN, bool A_COL, bool B_COL>
struct SyncMmaTile {
  static constexpr bool kTf32 = std::is_same<T, float>::value;
  static constexpr int KK = kTf32 ? 8 : 16;
  static constexpr int TM = BM / WM, TN = BN / WN, FM = TM / 16, FN = TN / 8;
  static constexpr int ES = static_cast<int>(sizeof(T));  // bytes per element
  static_assert(FM * 16 * WM == BM && FN * 8 * WN == BN && BK % KK == 0 && FN % 2 == 0, "mma tile shape");
  float acc[FM][FN][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  __device__ __forceinline__ void compute(const T* As, int lda, const T* Bs, int ldb, int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    const int m0 = (warp / WN) * TM, n0 = (warp % WN) * TN;
    const int g = lane >> 2, t = lane & 3, q = lane >> 3, r = lane & 7;
    const unsigned sa = smem_addr(As), sb = smem_addr(Bs);
#pragma unroll
    for (int k = 0; k < BK; k += KK) {
      uint32_t a[FM][4], b[FN][2];
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int mb = m0 + i * 16;
        if constexpr (!A_COL) {  // As[m][k]: rows m, k contiguous
          const int row = mb + (lane & 15), col = k + (lane >> 4) * (kTf32 ? 4 : 8);
          ldsm_x4(a[i], sa + (row * lda + col) * ES);
        } else if constexpr (!kTf32) {  // As[k][m]: the transposed 8x8 blocks
          const int krow = k + r + (q >> 1) * 8, mcol = mb + (q & 1) * 8;
          ldsm_x4_trans(a[i], sa + (krow * lda + mcol) * ES);
        } else {  // TF32 from k-major storage: ldmatrix cannot transpose 32-bit words
          const float* Af = reinterpret_cast<const float*>(As);
          a[i][0] = __float_as_uint(Af[(k + t) * lda + mb + g]);
          a[i][1] = __float_as_uint(Af[(k + t) * lda + mb + g + 8]);
          a[i][2] = __float_as_uint(Af[(k + t + 4) * lda + mb + g]);
          a[i][3] = __float_as_uint(Af[(k + t + 4) * lda + mb + g + 8]);
        }
        if constexpr (kTf32) {
#pragma unroll
          for (int e = 0; e < 4; ++e) a[i][e] = to_tf32(__uint_as_float(a[i][e]));
        }
      }
#pragma unroll
      for (int j = 0; j < FN; j += 2) {  // two n8 tiles per ldmatrix.x4
        const int nb = n0 + j * 8;
        uint32_t v[4];
        if constexpr (B_COL) {  // Bs[n][k]: rows n, k contiguous
          const int nrow = nb + r + (q >> 1) * 8, kcol = k + (q & 1) * (kTf32 ? 4 : 8);
          ldsm_x4(v, sb + (nrow * ldb + kcol) * ES);
          b[j][0] = v[0], b[j][1] = v[1], b[j + 1][0] = v[2], b[j + 1][1] = v[3];
        } else if constexpr (!kTf32) {  // Bs[k][n]: the transposed 8x8 blocks
          const int krow = k + r + (q & 1) * 8, ncol = nb + (q >> 1) * 8;
          ldsm_x4_trans(v, sb + (krow * ldb + ncol) * ES);
          b[j][0] = v[0], b[j][1] = v[1], b[j + 1][0] = v[2], b[j + 1][1] = v[3];
        } else {
          const float* Bf = reinterpret_cast<const float*>(Bs);
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            b[j + h][0] = __float_as_uint(Bf[(k + t) * ldb + nb + h * 8 + g]);
            b[j + h][1] = __float_as_uint(Bf[(k + t + 4) * ldb + nb + h * 8 + g]);
          }
        }
        if constexpr (kTf32) {
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < 2; ++e) b[j + h][e] = to_tf32(__uint_as_float(b[j + h][e]));
        }
      }
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) mma_16n8<T>(acc[i][j], a[i], b[j]);
    }
  }

  // Cs[m * ldc + n] = C(m, n) (row-major BM x BN, float; ldc even).
  __device__ __forceinline__ void store(float* Cs, int ldc, int tid) {
    const int lane = tid & 31, warp = tid >> 5;
    const int m0 = (warp / WN) * TM, n0 = (warp % WN) * TN, g = lane >> 2, t = lane & 3;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        float* c = Cs + (m0 + i * 16 + g) * ldc + n0 + j * 8 + 2 * t;
        *reinterpret_cast<float2*>(c) = make_float2(acc[i][j][0], acc[i][j][1]);
        *reinterpret_cast<float2*>(c + 8 * ldc) = make_float2(acc[i][j][2], acc[i][j][3]);
      }
  }
};

// Exact path (fp32 without TF32, fp64): each thread owns a TM x TN micro tile.
template <typename T, int BM, int BN, int BK, int THREADS, bool A_COL, bool B_COL>
struct SimtTile {
  using A = Acc<T>;
  static constexpr int TN = 4, NT = BN / TN, MT = THREADS / NT, TM = BM / MT;
  static_assert(NT * TN == BN && NT * MT == THREADS && TM * MT == BM, "simt tile shape");
  A acc[TM][TN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = A(0);
  }

  __device__ __forceinline__ void compute(const T* As, int lda, const T* Bs, int ldb, int tid) {
    const int tn = tid % NT, tm = tid / NT;
#pragma unroll 4
    for (int k = 0; k < BK; ++k) {
      A a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) {
        const int m = tm + i * MT;
        a[i] = A_COL ? As[k * lda + m] : As[m * lda + k];
      }
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int n = tn + j * NT;
        b[j] = B_COL ? Bs[n * ldb + k] : Bs[k * ldb + n];
      }
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fma(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(A* Cs, int ldc, int tid) {
    const int tn = tid % NT, tm = tid / NT;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) Cs[(tm + i * MT) * ldc + tn + j * NT] = acc[i][j];
  }
};

// Tensor cores for bf16/fp16 always, for fp32 when TF32 is allowed; SIMT otherwise.
template <typename T, bool TC, int BM, int BN, int BK, int WM, int WN, bool A_COL, bool B_COL>
using MmaTile = std::conditional_t<TC, SyncMmaTile<T, BM, BN, BK, WM, WN, A_COL, B_COL>,
                                   SimtTile<T, BM, BN, BK, WM * WN * 32, A_COL, B_COL>>;

// Shared-memory row padding: one 16-byte vector (keeps vector stores aligned, staggers banks).
template <typename T> constexpr int kPad = kVec<T>;
// ... and for a k-major operand that the TF32 MMA reads with scalar loads (element (k + t, g),
// t = lane % 4, g = lane / 4): 8 floats put rows t = 0..3 on banks 8t + g, conflict-free, where
// one vector (4) gives 4t + g, 2-way conflicts (ncu, S4 fp32 forward: half of its shared-memory
// wavefronts; docs/kernels.md). 16-bit types load these
// operands with ldmatrix and keep kPad.
template <typename T> constexpr int kPadK = std::is_same<T, float>::value ? 8 : kPad<T>;
constexpr int kCPad = 4;

// Host: opt a kernel into more than the default 48 KB of dynamic shared memory when it needs it.
template <typename F>
inline cudaError_t allow_smem(F* fn, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

__host__ __device__ constexpr size_t align_up(size_t v, size_t a) { return (v + a - 1) / a * a; }

}  // namespace kern
}  // namespace deft
