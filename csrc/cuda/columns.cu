// The GPU column sampler and col2im (columns.h). The sampler takes 64 taps ((output pixel, offset
// group, tap) triples) per block, builds their bilinear records in shared memory and streams the
// (tap, channel vector) items with several corner loads in flight per thread, writing the column
// rows (vectors of V elements, 16 bytes where the channel count allows). col2im gives each tap a
// group of `lanes` threads that reads the column cotangent once, scatters it to the four corners of
// dx (float atomics, or in deterministic mode 64-bit fixed point: det.cuh) and reduces the four
// corner dot products over the lanes for doffset and dmask. The bilinear math is
// deft/geometry.h's make_bilinear, the same as the CPU route's and the fused kernels', and so is
// the non-finite policy (a NaN point samples NaN and scatters nothing).

#include "cuda/columns.h"
#include "cuda/common.cuh"
#include "cuda/det.cuh"

namespace deft {
namespace kern {
namespace {

constexpr int kThreads = 256;

// The chunk and how threads cover it: `lanes` threads (a power of two <= 32) per tap, `vectors`
// vectors of V channels per (tap, offset group).
struct ColGeo {
  ConvParams p;
  int64_t n_out;  // images per problem in the chunk
  int64_t taps;   // batch * n_out * pixels_out * G * K
  int lanes, vectors;
  bool narrow;    // taps < 2^31: decode with 32-bit divisions (a 64-bit one is a ~70-instruction call)
};

// The chunk's first image, clamped as XLA's dynamic_slice clamps its start.
__device__ __forceinline__ int64_t chunk_start(const int32_t* start, const ColGeo& cg) {
  const int64_t s = *start, hi = cg.p.n - cg.n_out;
  return s < 0 ? 0 : (s > hi ? hi : s);
}

// Tap t of the chunk, in the order (output image o, pixel, offset group g, tap k).
struct ColTap {
  int64_t q;    // o * pixels_out + pixel: the row of cols / dcols / doffset / dmask
  int64_t o;    // output image (all problems)
  int64_t img;  // its input image
  int64_t row;  // img * pixels_out + pixel: the row of offset / mask
  int64_t ho, wo;
  int g, k, i, j;  // offset group, tap, and the tap's kernel row and column
};

// The divisions of decode in the index type I (uint32_t where every index fits, else int64_t).
template <typename I>
__device__ __forceinline__ void decode_in(const ColGeo& cg, I t, ColTap* c, I* in_problem) {
  const ConvParams& p = cg.p;
  const I K = static_cast<I>(p.taps()), G = static_cast<I>(p.offset_groups);
  const I P = static_cast<I>(p.pixels_out()), wout = static_cast<I>(p.w_out), kw = static_cast<I>(p.kw);
  const I n_out = static_cast<I>(cg.n_out);
  const I k = t % K, r = t / K, q = r / G, pix = q % P, o = q / P, ho = pix / wout, i = k / kw;
  c->k = static_cast<int>(k), c->g = static_cast<int>(r % G);
  c->q = q, c->o = o, c->ho = ho, c->wo = pix - ho * wout;
  c->i = static_cast<int>(i), c->j = static_cast<int>(k - i * kw);
  c->img = static_cast<int64_t>(o / n_out) * cg.p.n;  // the problem's first input image
  *in_problem = o % n_out;
}

__device__ __forceinline__ ColTap decode(const ColGeo& cg, int64_t t, int64_t start) {
  ColTap c;
  if (cg.narrow) {
    uint32_t in_problem;
    decode_in<uint32_t>(cg, static_cast<uint32_t>(t), &c, &in_problem);
    c.img += start + in_problem;
  } else {
    int64_t in_problem;
    decode_in<int64_t>(cg, t, &c, &in_problem);
    c.img += start + in_problem;
  }
  c.row = c.img * cg.p.pixels_out() + c.ho * cg.p.w_out + c.wo;
  return c;
}

// The tap's sample point and modulation m (1 without mask).
template <typename T, typename A>
__device__ __forceinline__ Bilinear<A> point(const ConvParams& p, const ColTap& c, const T* __restrict__ offset,
                                             const T* __restrict__ mask, A* m) {
  const int64_t gk = c.g * p.taps() + c.k;
  const T* off = offset + c.row * p.offset_channels() + gk * 2;
  *m = p.with_mask ? to_acc<A>(mask[c.row * p.mask_channels() + gk]) : A(1);
  return make_bilinear<A>(A(p.base_y(c.ho, c.i)) + to_acc<A>(off[0]), A(p.base_x(c.wo, c.j)) + to_acc<A>(off[1]),
                          p.h, p.w);
}

// V elements at src / dst, aligned to V * sizeof(E) (up to 16 bytes a transaction).
template <typename E, int V>
struct alignas(sizeof(E) * V > 16 ? 16 : sizeof(E) * V) Pack {
  E e[V];
};
template <typename E, int V>
__device__ __forceinline__ void load_n(const E* __restrict__ src, E (&v)[V]) {
  const Pack<E, V> pk = *reinterpret_cast<const Pack<E, V>*>(src);
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = pk.e[e];
}
template <typename E, int V>
__device__ __forceinline__ void store_n(E* __restrict__ dst, const E (&v)[V]) {
  Pack<E, V> pk;
#pragma unroll
  for (int e = 0; e < V; ++e) pk.e[e] = v[e];
  *reinterpret_cast<Pack<E, V>*>(dst) = pk;
}
template <typename T, typename A, int V>
__device__ __forceinline__ void load_acc(const T* __restrict__ src, A (&v)[V]) {
  T raw[V];
  load_n<T, V>(src, raw);
#pragma unroll
  for (int e = 0; e < V; ++e) v[e] = to_acc<A>(raw[e]);
}

// The per-tap sampler, 64-bit positions: images of 2^31 elements or more (use_tiled).
template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    sample_columns_kernel(ColGeo cg, const int32_t* __restrict__ start_ptr, const T* __restrict__ x,
                          const T* __restrict__ offset, const T* __restrict__ mask, T* __restrict__ cols) {
  using A = Acc<T>;
  const ConvParams& p = cg.p;
  const int64_t start = chunk_start(start_ptr, cg);
  const int L = cg.lanes, lane = threadIdx.x & (L - 1);
  const int64_t per_block = kThreads / L, C = p.c_in, Cg = p.c_per_offset_group(), K = p.taps();
  for (int64_t t = blockIdx.x * per_block + threadIdx.x / L; t < cg.taps; t += int64_t(gridDim.x) * per_block) {
    const ColTap c = decode(cg, t, start);
    A m;
    const Bilinear<A> b = point<T, A>(p, c, offset, mask, &m);
    const T* base = x + (c.img * p.h * p.w) * C + c.g * Cg;
    const T* src[4] = {base + (b.y0 * p.w + b.x0) * C, base + (b.y0 * p.w + b.x0 + 1) * C,
                       base + ((b.y0 + 1) * p.w + b.x0) * C, base + ((b.y0 + 1) * p.w + b.x0 + 1) * C};
    const bool valid[4] = {b.v00, b.v01, b.v10, b.v11};
    const A w[4] = {b.w00(), b.w01(), b.w10(), b.w11()};
    T* dst = cols + (c.q * K + c.k) * C + c.g * Cg;
    for (int v = lane; v < cg.vectors; v += L) {
      A out[V];
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = b.fill();  // NaN for a NaN point (geometry.h), else 0
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (!valid[j]) continue;
        A s[V];
        load_acc<T, A, V>(src[j] + v * V, s);
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] += s[e] * w[j];
      }
      T res[V];
#pragma unroll
      for (int e = 0; e < V; ++e) res[e] = from_acc<T>(out[e] * m);
      store_n<T, V>(dst + v * V, res);
    }
  }
}

// The tiled sampler: a block takes kRecs consecutive taps. Its threads first build one bilinear
// record per tap into shared memory (one thread per tap, not one warp per tap), then stream the
// (tap, channel vector) items, consecutive threads on consecutive vectors (coalesced loads and
// stores), kUnroll items per thread in flight (their 4 kUnroll corner loads issued before any
// blend). Corner positions are 32-bit within the (image, offset group) base: the launcher takes
// this kernel only where one image has fewer than 2^31 elements.
constexpr int kRecs = 64;

// Items in flight per thread: 8 corner vectors of 16 bytes (a register budget that keeps more
// threads resident).
template <typename T, int V>
constexpr int sampler_unroll() {
  return V * sizeof(T) >= 16 ? 2 : 4;
}

template <typename A>
struct RecTile {
  int64_t base[kRecs];  // x offset of the tap's (image, offset group)
  int64_t dst[kRecs];   // cols offset of the tap's row
  int32_t pos[4][kRecs];  // corner element offsets from base, -1: outside the image
  A w[4][kRecs];
  A m[kRecs], fill[kRecs];
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads)
    sample_columns_tiled_kernel(ColGeo cg, const int32_t* __restrict__ start_ptr, const T* __restrict__ x,
                                const T* __restrict__ offset, const T* __restrict__ mask, T* __restrict__ cols) {
  using A = Acc<T>;
  constexpr int kUnroll = sampler_unroll<T, V>();
  __shared__ RecTile<A> rt;
  const ConvParams& p = cg.p;
  const int64_t start = chunk_start(start_ptr, cg);
  const int64_t C = p.c_in, Cg = p.c_per_offset_group(), K = p.taps();
  const int64_t t0 = int64_t(blockIdx.x) * kRecs;
  const int recs = static_cast<int>(cg.taps - t0 < kRecs ? cg.taps - t0 : kRecs);
  if (threadIdx.x < recs) {
    const int r = threadIdx.x;
    const ColTap c = decode(cg, t0 + r, start);
    A m;
    const Bilinear<A> b = point<T, A>(p, c, offset, mask, &m);
    const int64_t at[4] = {b.y0 * p.w + b.x0, b.y0 * p.w + b.x0 + 1, (b.y0 + 1) * p.w + b.x0,
                           (b.y0 + 1) * p.w + b.x0 + 1};
    const bool valid[4] = {b.v00, b.v01, b.v10, b.v11};
    const A w[4] = {b.w00(), b.w01(), b.w10(), b.w11()};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      rt.pos[j][r] = valid[j] ? static_cast<int32_t>(at[j] * C) : -1;
      rt.w[j][r] = w[j];
    }
    rt.base[r] = (c.img * p.h * p.w) * C + c.g * Cg;
    rt.dst[r] = (c.q * K + c.k) * C + c.g * Cg;
    rt.m[r] = m;
    rt.fill[r] = b.fill();
  }
  __syncthreads();
  const int vectors = cg.vectors;
  const int items = recs * vectors;
  for (int i0 = threadIdx.x; i0 < items; i0 += kThreads * kUnroll) {
    Pack<T, V> s[kUnroll][4];  // raw vectors: 16-bit corners in half the registers
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kThreads;
      const int r = i / vectors, v = i - r * vectors;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int32_t pos = i < items ? rt.pos[j][r] : -1;
        if (pos >= 0) s[u][j] = *reinterpret_cast<const Pack<T, V>*>(x + rt.base[r] + pos + v * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * kThreads;
      if (i >= items) break;
      const int r = i / vectors, v = i - r * vectors;
      A out[V];
#pragma unroll
      for (int e = 0; e < V; ++e) out[e] = rt.fill[r];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (rt.pos[j][r] < 0) continue;
        const A w = rt.w[j][r];
#pragma unroll
        for (int e = 0; e < V; ++e) out[e] += to_acc<A>(s[u][j].e[e]) * w;
      }
      const A m = rt.m[r];
      T res[V];
#pragma unroll
      for (int e = 0; e < V; ++e) res[e] = from_acc<T>(out[e] * m);
      store_n<T, V>(cols + rt.dst[r] + v * V, res);
    }
  }
}

// Deterministic dx: det.cuh's fixed-point accumulators, non-finite flags and scale, for dx alone.
struct DetDx {
  unsigned long long* acc;
  unsigned* flags;
  const double* scale;  // [1]
};

// The loop over taps is uniform per warp (every lane runs the same iterations, inactive taps
// included) so the lanes of a tap can reduce with shuffles.
template <typename T, int V, bool DET>
__global__ void __launch_bounds__(kThreads)
    col2im_kernel(ColGeo cg, const int32_t* __restrict__ start_ptr, const T* __restrict__ x,
                  const T* __restrict__ offset, const T* __restrict__ mask, const Acc<T>* __restrict__ dcols,
                  Acc<T>* __restrict__ dx, T* __restrict__ doffset, T* __restrict__ dmask, DetDx det) {
  using A = Acc<T>;
  const ConvParams& p = cg.p;
  const int64_t start = chunk_start(start_ptr, cg);
  const double det_scale = DET ? *det.scale : 0.0;
  const int L = cg.lanes, lane = threadIdx.x & (L - 1);
  const int64_t C = p.c_in, Cg = p.c_per_offset_group(), K = p.taps(), HW = p.h * p.w;
  const int64_t per_warp = 32 / L;
  const int64_t warp = (int64_t(blockIdx.x) * kThreads + threadIdx.x) / 32;
  const int64_t stride = int64_t(gridDim.x) * (kThreads / 32) * per_warp;
  for (int64_t t0 = warp * per_warp; t0 < cg.taps; t0 += stride) {
    const int64_t t = t0 + (threadIdx.x & 31) / L;
    const bool active = t < cg.taps;
    A d[4] = {A(0), A(0), A(0), A(0)};  // sum over channels of dcols * corner j
    ColTap c{};
    Bilinear<A> b{};
    A m = A(0);
    if (active) {
      c = decode(cg, t, start);
      b = point<T, A>(p, c, offset, mask, &m);
      const int64_t at[4] = {b.y0 * p.w + b.x0, b.y0 * p.w + b.x0 + 1, (b.y0 + 1) * p.w + b.x0,
                             (b.y0 + 1) * p.w + b.x0 + 1};
      const bool valid[4] = {b.v00, b.v01, b.v10, b.v11};
      const A wm[4] = {b.w00() * m, b.w01() * m, b.w10() * m, b.w11() * m};
      const T* xb = x + c.img * HW * C + c.g * Cg;
      const int64_t dx0 = c.o * HW * C + c.g * Cg;  // this (image, offset group)'s dx
      const A* gsrc = dcols + (c.q * K + c.k) * C + c.g * Cg;
      for (int v = lane; v < cg.vectors; v += L) {
        A gv[V];
        load_n<A, V>(gsrc + v * V, gv);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (!valid[j]) continue;
          A s[V], upd[V];
          load_acc<T, A, V>(xb + at[j] * C + v * V, s);
#pragma unroll
          for (int e = 0; e < V; ++e) {
            d[j] += gv[e] * s[e];
            upd[e] = wm[j] * gv[e];
          }
          if constexpr (DET) {
#pragma unroll
            for (int e = 0; e < V; ++e) {
              unsigned bad = 0u;
              const long long q = det_fixed(upd[e], det_scale, &bad);
              det_add(det.acc, det.flags, dx0 + at[j] * C + v * V + e, q, bad);
            }
          } else {
            atomic_add_n<V>(dx + dx0 + at[j] * C + v * V, upd);
          }
        }
      }
    }
#pragma unroll
    for (int s = 16; s > 0; s >>= 1) {
      if (s >= L) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) d[j] += __shfl_xor_sync(0xffffffffu, d[j], s);
    }
    if (active && lane == 0) {
      const A ly = b.ly, lx = b.lx, f = b.fill();  // f: NaN for a NaN point, else 0
      // d sample / d(y, x) of each corner's weight, as torchvision and the CPU route.
      const A gy = f - (A(1) - lx) * d[0] - lx * d[1] + (A(1) - lx) * d[2] + lx * d[3];
      const A gx = f - (A(1) - ly) * d[0] + (A(1) - ly) * d[1] - ly * d[2] + ly * d[3];
      T* doff = doffset + c.q * p.offset_channels() + (c.g * K + c.k) * 2;
      doff[0] = from_acc<T>(A(m * gy));
      doff[1] = from_acc<T>(A(m * gx));
      if (p.with_mask) {
        const A gm = f + b.w00() * d[0] + b.w01() * d[1] + b.w10() * d[2] + b.w11() * d[3];
        dmask[c.q * p.mask_channels() + c.g * K + c.k] = from_acc<T>(gm);
      }
    }
  }
}

// Threads per tap and vector width from the channels of one offset group; grid from the taps.
// max_vec = 1 for the deterministic col2im: its 64-bit atomics are scalar, and with one element per
// lane a warp's atomics cover consecutive words (8 sectors) instead of one word per lane's vector
// (32 sectors).
template <typename T>
ColGeo make_col_geo(const ConvParams& p, int64_t n_out, int* vec, int max_vec = kVec<T>) {
  ColGeo cg;
  cg.p = p;
  cg.n_out = n_out;
  cg.taps = p.batch * n_out * p.pixels_out() * p.offset_groups * p.taps();
  cg.narrow = cg.taps < (int64_t(1) << 31);
  const int64_t cpog = p.c_per_offset_group();
  int v = max_vec;
  while (v > 1 && cpog % v != 0) v /= 2;
  *vec = v;
  cg.vectors = static_cast<int>(cpog / v);
  int lanes = 1;
  while (lanes < 32 && lanes < cg.vectors) lanes *= 2;
  cg.lanes = lanes;
  return cg;
}

// The tiled sampler wants corner positions within one image and items per block (kRecs x vectors)
// in 32 bits; larger images take the per-tap sampler with 64-bit positions.
bool use_tiled(const ConvParams& p, const ColGeo& cg) {
  return p.h * p.w * p.c_in < (int64_t(1) << 31) && int64_t(cg.vectors) * kRecs < (1 << 30);
}

unsigned grid_of(const ColGeo& cg) {
  const int64_t per_block = kThreads / cg.lanes;
  const int64_t blocks = (cg.taps + per_block - 1) / per_block;
  return static_cast<unsigned>(blocks < (1 << 20) ? (blocks < 1 ? 1 : blocks) : (1 << 20));
}

template <typename T, typename F>
cudaError_t with_vec(int v, F&& f) {
  switch (v) {
    case 1: return f(std::integral_constant<int, 1>{});
    case 2: return f(std::integral_constant<int, 2>{});
    case 4:
      if constexpr (kVec<T> >= 4) return f(std::integral_constant<int, 4>{});
      break;
    case 8:
      if constexpr (kVec<T> >= 8) return f(std::integral_constant<int, 8>{});
      break;
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t sample_columns(cudaStream_t stream, const ConvParams& p, int64_t n_out, const int32_t* start,
                           const void* x, const void* offset, const void* mask, void* cols) {
  int v = 1;
  const ColGeo cg = make_col_geo<T>(p, n_out, &v);
  if (cg.taps == 0 || p.c_in == 0) return cudaSuccess;
  const bool tiled = use_tiled(p, cg);
  return with_vec<T>(v, [&](auto vc) {
    if (tiled) {
      const int64_t blocks = (cg.taps + kRecs - 1) / kRecs;
      if (blocks >= (int64_t(1) << 31)) return cudaErrorInvalidValue;
      sample_columns_tiled_kernel<T, decltype(vc)::value><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
          cg, start, static_cast<const T*>(x), static_cast<const T*>(offset), static_cast<const T*>(mask),
          static_cast<T*>(cols));
    } else {
      sample_columns_kernel<T, decltype(vc)::value><<<grid_of(cg), kThreads, 0, stream>>>(
          cg, start, static_cast<const T*>(x), static_cast<const T*>(offset), static_cast<const T*>(mask),
          static_cast<T*>(cols));
    }
    return cudaGetLastError();
  });
}

// The deterministic workspace: accumulators, flags (8 elements per word), the maxima of |dcols|
// and |mask| (as double bits), the scale; 256-byte aligned pieces.
struct ColDetLayout {
  size_t flags, maxbits, scale, total;
  explicit ColDetLayout(int64_t n) {
    flags = align_up(size_t(n) * 8, 256);
    maxbits = align_up(flags + size_t((n + 7) / 8) * 4, 256);
    scale = maxbits + 16;
    total = align_up(scale + 8, 256);
  }
};

// scale = 2^(61 - E), 2^E >= terms x max|dcols| x max|mask|: a bound on every partial sum of a dx
// element, which takes at most one term (bilinear weight <= 1, times the mask, times dcols) from
// each (pixel, tap) of its image.
__global__ void col2im_det_scale_kernel(const unsigned long long* maxbits, double terms, bool with_mask,
                                        double* scale) {
  if (threadIdx.x != 0 || blockIdx.x != 0) return;
  const double g = __longlong_as_double(static_cast<long long>(maxbits[0]));
  const double m = with_mask ? __longlong_as_double(static_cast<long long>(maxbits[1])) : 1.0;
  const double f[] = {terms, g, m};
  scale[0] = det_scale_of(f, 3);
}

unsigned blocks_for(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 1024 ? 1024 : b));
}

template <typename T>
cudaError_t col2im(cudaStream_t stream, const ConvParams& p, int64_t n_out, const int32_t* start, bool det,
                   const void* x, const void* offset, const void* mask, const void* dcols, void* dx, void* doffset,
                   void* dmask, void* workspace) {
  using A = Acc<T>;
  const int64_t n_dx = p.batch * n_out * p.h * p.w * p.c_in;
  int v = 1;
  const ColGeo cg = make_col_geo<T>(p, n_out, &v, det ? 1 : kVec<T>);
  const bool empty = cg.taps == 0 || p.c_in == 0;
  if ((empty || !det) && n_dx > 0)
    if (cudaError_t e = cudaMemsetAsync(dx, 0, size_t(n_dx) * sizeof(A), stream); e != cudaSuccess) return e;
  if (empty) return cudaSuccess;
  DetDx dd{};
  if (det) {
    const ColDetLayout w(n_dx);
    auto* base = static_cast<unsigned char*>(workspace);
    if (cudaError_t e = cudaMemsetAsync(base, 0, w.scale, stream); e != cudaSuccess) return e;
    auto* maxbits = reinterpret_cast<unsigned long long*>(base + w.maxbits);
    const int64_t n_dcols = cg.taps / p.offset_groups * p.c_in;  // batch * n_out * pixels * K * C
    DetMaxIn in{};
    in.a[0] = dcols, in.n[0] = n_dcols;
    det_max_kernel<A><<<blocks_for(n_dcols), kThreads, 0, stream>>>(in, maxbits);
    if (p.with_mask) {
      const int64_t n_mask = p.batch * p.n * p.pixels_out() * p.mask_channels();
      in.a[0] = mask, in.n[0] = n_mask;
      det_max_kernel<T><<<blocks_for(n_mask), kThreads, 0, stream>>>(in, maxbits + 1);
    }
    auto* scale = reinterpret_cast<double*>(base + w.scale);
    col2im_det_scale_kernel<<<1, 32, 0, stream>>>(maxbits, double(p.pixels_out() * p.taps()), p.with_mask, scale);
    dd = DetDx{reinterpret_cast<unsigned long long*>(base), reinterpret_cast<unsigned*>(base + w.flags), scale};
  }
  const cudaError_t launched = with_vec<T>(v, [&](auto vc) {
    constexpr int VC = decltype(vc)::value;
    auto kernel = det ? col2im_kernel<T, VC, true> : col2im_kernel<T, VC, false>;
    kernel<<<grid_of(cg), kThreads, 0, stream>>>(
        cg, start, static_cast<const T*>(x), static_cast<const T*>(offset), static_cast<const T*>(mask),
        static_cast<const A*>(dcols), static_cast<A*>(dx), static_cast<T*>(doffset), static_cast<T*>(dmask), dd);
    return cudaGetLastError();
  });
  if (launched != cudaSuccess || !det) return launched;
  det_convert_kernel<A><<<blocks_for(n_dx), kThreads, 0, stream>>>(dd.acc, dd.flags, dd.scale, 0,
                                                                   static_cast<A*>(dx), n_dx);
  return cudaGetLastError();
}

template <typename F>
cudaError_t by_dtype(DType t, F&& f) {
  switch (t) {
    case DType::kF32: return f(float{});
    case DType::kF64: return f(double{});
    case DType::kBF16: return f(__nv_bfloat16{});
    case DType::kF16: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace
}  // namespace kern

cudaError_t LaunchSampleColumns(cudaStream_t stream, const ConvParams& p, int64_t n_out, const int32_t* start,
                                DType dtype, const void* x, const void* offset, const void* mask, void* cols) {
  return kern::by_dtype(dtype, [&](auto tag) {
    return kern::sample_columns<decltype(tag)>(stream, p, n_out, start, x, offset, mask, cols);
  });
}

cudaError_t LaunchCol2Im(cudaStream_t stream, const ConvParams& p, int64_t n_out, const int32_t* start,
                         DType dtype, bool deterministic, const void* x, const void* offset, const void* mask,
                         const void* dcols, void* dx, void* doffset, void* dmask, void* workspace) {
  return kern::by_dtype(dtype, [&](auto tag) {
    return kern::col2im<decltype(tag)>(stream, p, n_out, start, deterministic, x, offset, mask, dcols, dx, doffset,
                                       dmask, workspace);
  });
}

size_t Col2ImWorkspaceBytes(int64_t dx_elements, bool deterministic) {
  return deterministic && dx_elements > 0 ? kern::ColDetLayout(dx_elements).total : 0;
}

}  // namespace deft
