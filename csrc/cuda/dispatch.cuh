// Host side of the kernels: derived geometry, the tile configurations that are instantiated, and
// the per-dtype forward/backward drivers. ops_<dtype>.cu instantiate these once per dtype so the
// heavy templates compile in parallel; launch.cu is the public entry (launch.h).
#pragma once

#include <algorithm>
#include <type_traits>

#include "cuda/backward.cuh"
#include "cuda/forward.cuh"
#include "cuda/forward_ws.cuh"
#include "cuda/launch.h"

namespace deft {
namespace kern {

// A tile of height 1 is flat (TileConfig docs): tile_w consecutive output pixels in (n, h_out,
// w_out) order, across rows and images. Only the streaming forward walks pixels that way.
inline bool is_flat_tile(const TileConfig& t) { return t.tile_h == 1; }

// 2D tile of the backward passes and the split forward (BM = 64 pixels there): the configured one
// when it is a 64-pixel rectangle, else 8 x 8.
inline void bwd_spatial_tile(const TileConfig& t, int64_t* th, int64_t* tw) {
  if (t.tile_h * t.tile_w == DataCfg::BM && !is_flat_tile(t)) {
    *th = t.tile_h;
    *tw = t.tile_w;
  } else {
    *th = 8;
    *tw = 8;
  }
}

template <typename T>
Geo make_geo(const ConvParams& p, int64_t tile_h, int64_t tile_w, bool flat = false) {
  Geo g;
  g.p = p;
  g.K = p.kh * p.kw;
  g.Cg = p.c_in_per_group();
  g.Cog = p.c_out_per_group();
  g.Cpog = p.c_per_offset_group();
  g.tile_h = tile_h;
  g.tile_w = tile_w;
  g.pixels = p.n * p.h_out * p.w_out;
  g.flat = flat;
  g.tiles_w = flat ? 1 : (p.w_out + tile_w - 1) / tile_w;
  g.tiles_img = flat ? (g.pixels + tile_w - 1) / tile_w : ((p.h_out + tile_h - 1) / tile_h) * g.tiles_w;
  constexpr int64_t V = kVec<T>;
  g.pipeline = false;
  g.x32 = p.batch * p.x_size() <= 0x7fffffffLL;
  g.vec = p.c_in % V == 0 && g.Cg % V == 0 && g.Cpog % V == 0 && p.c_out % V == 0 && g.Cog % V == 0;
  return g;
}

// Image extents must fit the int32 corner arithmetic, channel counts the int32 block decode
// (common.cuh, chunk_of<int>); element offsets are 64-bit.
inline cudaError_t check_extents(const ConvParams& p) {
  if (p.h > 0x3fffffffLL || p.w > 0x3fffffffLL || p.h * p.w > 0x3fffffffffffLL) return cudaErrorInvalidValue;
  if (p.c_in > 0x3fffffffLL || p.c_out > 0x3fffffffLL) return cudaErrorInvalidValue;
  return cudaSuccess;
}

// Instantiated forward tiles (pixels, tile_n, warps), tile_k = 32. (tile_k = 64 for 16-bit types
// needed 255 registers with spills on the pipelined path: 4 vectors x 4 corners in flight.)
// stages: 1 = load, barrier, MMA; 2 = register-prefetch pipeline (tensor-core vector path).
// The last template argument is the blocks per SM the registers must allow: 4 x 4 warps caps a
// 16-bit-type thread of the 64-pixel tile at 128 registers (16 warps per SM instead of 8: the
// loop is latency-bound; measured in docs/kernels.md). fp32 holds twice the corner vectors
// per element and spills at 128, and a 128-register cap on the 128-pixel tiles spilled (slower),
// so those keep the allocation they were measured with.
template <typename T> constexpr int kFwdBK = 32;
template <typename T> using Fwd64x64 = FwdCfg<64, 64, kFwdBK<T>, 2, 2, kIsHalf<T> ? 4 : sizeof(T) == 4 ? 2 : 1>;
template <typename T> using Fwd128x64 = FwdCfg<128, 64, kFwdBK<T>, 2, 2, 2>;
template <typename T> using Fwd128x128 = FwdCfg<128, 128, kFwdBK<T>, 4, 2, 1>;
// The 128 x 128 tile with 16 warps (32 x 32 per warp): half the accumulators and corner vectors
// per thread, twice the warps per SM of the 8-warp tile (236 registers, 8 warps per SM). Measured
// 1-4% faster at S3/S4/S6, not the 1.3-1.6x a latency bound would give (docs/kernels.md).
template <typename T> using Fwd128x128w16 = FwdCfg<128, 128, kFwdBK<T>, 4, 4, 1>;

template <typename T, typename F>
cudaError_t with_fwd_cfg(const TileConfig& t, F&& f) {
  if (t.family != kFamilyStreaming || t.tile_k != kFwdBK<T> || t.stages < 1 || t.stages > 2 || t.k_splits != 1)
    return cudaErrorInvalidValue;
  const int64_t px = t.pixels();
  if (px == 64 && t.tile_n == 64 && t.warps == 4) return f(Fwd64x64<T>{});
  if constexpr (!std::is_same<T, double>::value) {
    if (px == 128 && t.tile_n == 64 && t.warps == 4) return f(Fwd128x64<T>{});
    if (px == 128 && t.tile_n == 128 && t.warps == 8) return f(Fwd128x128<T>{});
    if (px == 128 && t.tile_n == 128 && t.warps == 16) return f(Fwd128x128w16<T>{});
  }
  return cudaErrorInvalidValue;
}

// Warp-specialized forward tiles (forward_ws.cuh), family ring: stages = 3 is the producer/consumer ring of 3
// slots, tile_k = 32; (pixels, tile_n, warps) = (128, 128, 8): 2 x 2 consumer warps (64 x 64
// each) + 4 producers, or (64, 64, 8) / (64, 128, 8): 2 x 2 consumers (32 x 32 / 32 x 64) + 4
// producers, 2 blocks per SM.
// Not float64. k_splits in {2, 4} (sm_90): clusters of that many blocks split each tile's
// reduction (forward_ws.cuh); every other tile has k_splits = 1. Where the ring does not apply (fp32 without TF32, channel counts off the 16-byte
// vector, x of 2^31 or more elements) the streaming kernel of the same tile runs (ws_fallback).
// Measured and not kept (docs/kernels.md): a 4-slot ring (within 1-2%),
// 4 + 8 warps (168-register cap: fp32 spills, 10-15% slower; bf16 3-6% faster), 8 + 8 warps.
using Ws128x128w8 = WsCfg<128, 128, 32, 2, 2, 4, 3, 1>;
using Ws64x64w8 = WsCfg<64, 64, 32, 2, 2, 4, 3, 2>;
// 64 pixels x 128 channels (2 x 2 consumers of 32 x 64), 2 blocks per SM: as many samples per
// output channel as the 128 x 128 tile, twice its blocks and blocks per SM (S4: 196 blocks, all
// resident at once, where the 128 x 128 tile leaves 34 of 132 SMs idle).
using Ws64x128w8 = WsCfg<64, 128, 32, 2, 2, 4, 3, 2>;

inline bool is_ws_tile(const TileConfig& t) {
  const int64_t px = t.pixels();
  return t.family == kFamilyRing && (t.k_splits == 1 || t.k_splits == 2 || t.k_splits == 4) && t.stages == 3 &&
         t.tile_k == 32 && t.warps == 8 &&
         ((px == 128 && t.tile_n == 128) || (px == 64 && (t.tile_n == 64 || t.tile_n == 128)));
}

template <typename F>
cudaError_t with_ws_cfg(const TileConfig& t, F&& f) {
  if (!is_ws_tile(t)) return cudaErrorInvalidValue;
  if (t.pixels() == 128) return f(Ws128x128w8{});
  return t.tile_n == 64 ? f(Ws64x64w8{}) : f(Ws64x128w8{});
}

// The streaming tile of the same shape (register-prefetch pipeline); for 64 x 128 (no streaming
// instantiation) the 64 x 64 one.
inline TileConfig ws_fallback(const TileConfig& t) {
  TileConfig s = t;
  s.family = kFamilyStreaming;
  s.stages = 2;
  s.k_splits = 1;
  if (t.pixels() == 64) s.warps = 4, s.tile_n = 64;
  return s;
}

// Split-forward tiles (forward.cuh, deform_fwd_split_kernel): tile_k input channels resident per
// block, on the 64-pixel x 64-channel tile with 4 warps and the cp.async weight pipeline.
inline bool is_split_tile(const TileConfig& t) {
  return t.family == kFamilySplit && (t.tile_k == 128 || t.tile_k == 256 || t.tile_k == 512) && t.k_splits == 1 &&
         t.pixels() == SplitCfg::BM && t.tile_n == SplitCfg::BN && t.warps * 32 == SplitCfg::kThreads && t.stages == 2;
}

// Forward workspace: the split forward's fp32 accumulator of y (y_elements) for 16-bit types.
template <typename T>
size_t fwd_workspace(int64_t y_elements, const TileConfig& t) {
  if constexpr (kIsHalf<T>) {
    if (is_split_tile(t)) return align_up(sizeof(float) * y_elements, 256);
  }
  (void)y_elements, (void)t;
  return 0;
}

template <typename T>
cudaError_t convert_out(cudaStream_t stream, const float* src, void* dst, int64_t n);

// deterministic: the split forward (partial sums over taps meet in float atomics) is replaced by the
// streaming kernel of the same 64 x 64 tile; every other forward is deterministic as it is (each
// output tile reduced by one block, or by one cluster in rank order). tiling.py never picks the
// split forward in deterministic mode; this is the guard for a hand-made tile.
template <typename T>
cudaError_t run_forward(cudaStream_t stream, const ConvParams& p, const TileConfig& t, bool allow_tf32,
                        bool deterministic, const void* x, const void* offset, const void* mask,
                        const void* kernel, void* y, void* workspace) {
  if (cudaError_t e = check_extents(p); e != cudaSuccess) return e;
  const T* xs = static_cast<const T*>(x);
  const T* os = static_cast<const T*>(offset);
  const T* ms = static_cast<const T*>(mask);
  const T* ks = static_cast<const T*>(kernel);
  T* ys = static_cast<T*>(y);
  if constexpr (!std::is_same<T, double>::value) {
    if (is_split_tile(t)) {
      int64_t th, tw;
      bwd_spatial_tile(t, &th, &tw);
      Geo g = make_geo<T>(p, th, tw);
      // The split loader fetches 16-byte vectors only; other channel counts take the streaming
      // kernel of the same 64 x 64 tile (same result up to summation order).
      if (g.vec && !deterministic) {
        const int64_t ny = p.batch * p.y_size();
        Atom<T>* acc = static_cast<Atom<T>*>(kIsHalf<T> ? workspace : y);
        if (acc == nullptr) return cudaErrorInvalidValue;
        if (cudaError_t e = cudaMemsetAsync(acc, 0, sizeof(Atom<T>) * ny, stream); e != cudaSuccess) return e;
        const int kc = static_cast<int>(t.tile_k);
        cudaError_t e;
        if constexpr (std::is_same<T, float>::value) {
          e = allow_tf32 ? launch_forward_split<T, true>(stream, g, kc, xs, os, ms, ks, acc)
                         : launch_forward_split<T, false>(stream, g, kc, xs, os, ms, ks, acc);
        } else {
          e = launch_forward_split<T, true>(stream, g, kc, xs, os, ms, ks, acc);
        }
        if (e != cudaSuccess) return e;
        if constexpr (kIsHalf<T>) return convert_out<T>(stream, acc, y, ny);
        return cudaSuccess;
      }
      TileConfig streaming = t;
      streaming.family = kFamilyStreaming;
      streaming.tile_k = kFwdBK<T>;
      return run_forward<T>(stream, p, streaming, allow_tf32, deterministic, x, offset, mask, kernel, y, workspace);
    }
  }
  Geo g = make_geo<T>(p, t.tile_h, t.tile_w, is_flat_tile(t));
  if constexpr (!std::is_same<T, double>::value) {
    if (is_ws_tile(t)) {
      const bool tc = kIsHalf<T> || allow_tf32;
      if (!(tc && g.vec && g.x32)) {
        return run_forward<T>(stream, p, ws_fallback(t), allow_tf32, deterministic, x, offset, mask, kernel, y,
                              workspace);
      }
      return with_ws_cfg(t, [&](auto cfg) -> cudaError_t {
        return launch_forward_ws<T, decltype(cfg)>(stream, g, static_cast<int>(t.k_splits), xs, os, ms, ks, ys);
      });
    }
  }
  g.pipeline = t.stages >= 2;
  return with_fwd_cfg<T>(t, [&](auto cfg) -> cudaError_t {
    using Cfg = decltype(cfg);
    if constexpr (std::is_same<T, double>::value) {
      return launch_forward<T, false, Cfg>(stream, g, xs, os, ms, ks, ys);
    } else if constexpr (std::is_same<T, float>::value) {
      return allow_tf32 ? launch_forward<T, true, Cfg>(stream, g, xs, os, ms, ks, ys)
                        : launch_forward<T, false, Cfg>(stream, g, xs, os, ms, ks, ys);
    } else {
      return launch_forward<T, true, Cfg>(stream, g, xs, os, ms, ks, ys);
    }
  });
}

// Workspace regions: fp32 accumulators of the four cotangents, half types only; deterministic mode
// (every dtype): the maxima and scales, then int64 accumulators and flag words of the four
// cotangents (det.cuh), one contiguous range zeroed by one memset.
struct BwdWorkspace {
  size_t dx, doff, dmask, dk, total;
  size_t det_max, det_scale, det_acc[4], det_flags[4];  // deterministic mode only
};

// Element counts of the four cotangents (all leading batch dims included).
struct GradCounts {
  int64_t x, offset, mask, kernel;
};

inline GradCounts grad_counts(const ConvParams& p) {
  return {p.batch * p.x_size(), p.batch * p.offset_size(), p.batch * p.mask_size(), p.batch * p.kernel_size()};
}

template <typename T>
BwdWorkspace bwd_workspace(const GradCounts& n, bool deterministic) {
  BwdWorkspace w{};
  if (deterministic) {
    const int64_t counts[4] = {n.x, n.offset, n.mask, n.kernel};
    w.det_max = 0;                                      // 4 x uint64: maxima of x, dy, kernel, mask
    w.det_scale = w.det_max + 4 * sizeof(uint64_t);     // 4 x double
    size_t at = align_up(w.det_scale + 4 * sizeof(double), 256);
    for (int i = 0; i < 4; ++i) {
      w.det_acc[i] = at;
      at += align_up(sizeof(uint64_t) * counts[i], 256);
    }
    for (int i = 0; i < 4; ++i) {
      w.det_flags[i] = at;
      at += align_up(sizeof(uint32_t) * ((counts[i] + 7) / 8), 256);
    }
    w.total = at;
    return w;
  }
  if constexpr (kIsHalf<T>) {
    w.dx = 0;
    w.doff = w.dx + align_up(sizeof(float) * n.x, 256);
    w.dmask = w.doff + align_up(sizeof(float) * n.offset, 256);
    w.dk = w.dmask + align_up(sizeof(float) * n.mask, 256);
    w.total = w.dk + align_up(sizeof(float) * n.kernel, 256);
  }
  (void)n;
  return w;
}

// Blocks of `fn` resident on the whole device at once (occupancy x SMs); a guess if the runtime
// cannot say.
template <typename F>
int64_t resident_blocks(F* fn, int threads, size_t smem) {
  int dev = 0, sms = 132, occ = 4;
  if (cudaGetDevice(&dev) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, threads, smem) != cudaSuccess || occ < 1) occ = 4;
  return int64_t(sms) * occ;
}

// Pixel splits of the weight pass. Its blocks are uniform: each reduces `per` steps of pixels and
// flushes one tile with atomics (about one step's work), so the time goes as
// rounds x (per + 1) with rounds = ceil(blocks / resident). Pick the split count that minimises
// it (ties: fewer splits, fewer atomics). Replaces "~8 blocks per SM", which at S2 gave 2.01
// rounds of resident blocks = 3 rounds, the last one nearly empty (docs/kernels.md).
inline int64_t weight_splits(int64_t gx, int64_t steps, int64_t resident) {
  resident = std::max<int64_t>(resident, 1);
  const int64_t max_s = std::min<int64_t>({steps, 65535, 4 * resident / std::max<int64_t>(gx, 1) + 1});
  int64_t best = 1, best_cost = -1;
  for (int64_t s = 1; s <= max_s; ++s) {
    const int64_t per = (steps + s - 1) / s;
    if ((steps + per - 1) / per != s) continue;  // same per as a smaller split count
    const int64_t cost = ((gx * s + resident - 1) / resident) * (per + 1);
    if (best_cost < 0 || cost < best_cost) best_cost = cost, best = s;
  }
  return best;
}

// launch(std::true_type) runs the pipelined instantiation, launch(std::false_type) the simple
// one; only tensor-core paths have a pipelined instantiation.
template <bool TC, typename F>
cudaError_t with_pipe(bool pipe, F&& launch) {
  if constexpr (TC) {
    if (pipe) return launch(std::true_type{});
  }
  return launch(std::false_type{});
}

// The weight pass with configuration C (WeightCfg or WeightCfgWide), pipelined or not.
template <typename T, bool TC, bool PIPE, typename C, bool DET>
cudaError_t launch_weight(cudaStream_t stream, const Geo& g, const T* x, const T* offset, const T* mask,
                          const T* dy, Atom<T>* dka, const DetAcc& det) {
  const ConvParams& p = g.p;
  const int64_t maxq = max_chunks(g, C::BC);
  const int64_t nob = (g.Cog + C::BN - 1) / C::BN;
  const int64_t gx = p.batch * p.feature_groups * g.K * maxq * nob;
  const int64_t steps = (g.pixels + C::BK - 1) / C::BK;
  if (gx > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  using L = WeightLayout<T, PIPE ? 2 : 1, C>;
  auto fn = deform_bwd_weight_kernel<T, TC, PIPE, C, DET>;
  if (cudaError_t e = allow_smem(fn, L::kBytes); e != cudaSuccess) return e;
  const int64_t splits = weight_splits(gx, steps, resident_blocks(fn, C::kThreads, L::kBytes));
  const int64_t per = (steps + splits - 1) / splits;
  fn<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(splits)), C::kThreads, L::kBytes, stream>>>(
      g, maxq, per, x, offset, mask, dy, dka, det);
  return cudaGetLastError();
}

// wide_weight: the weight pass's 64 x 128 tile (TileConfig::bwd_tile_n == 128) on the pipelined
// path; the simple path has the 64 x 64 tile only.
template <typename T, bool TC, bool DET>
cudaError_t launch_backward(cudaStream_t stream, const Geo& g, bool wide_weight, const T* x,
                            const T* offset, const T* mask, const T* kernel, const T* dy, Atom<T>* dxa,
                            Atom<T>* doffa, Atom<T>* dmaska, Atom<T>* dka, const DetAcc& det) {
  const ConvParams& p = g.p;
  if (g.K == 0 || g.Cg == 0 || g.Cog == 0 || g.pixels == 0) return cudaSuccess;
  // stages >= 2 (g.pipeline) on the tensor-core vector path: the pipelined instantiations.
  const bool pipe = TC && g.vec && g.pipeline;
  {  // data pass
    const int64_t maxq = max_chunks(g, DataCfg::BC);
    const int64_t gx = p.batch * p.n * g.tiles_img, gy = p.feature_groups * g.K * maxq;
    // The image-major decode runs in 32-bit over gx * gy blocks; its row math shifts by log2 of
    // the tile width (64-pixel tiles: a power of two).
    if (gx > 0x7fffffffLL || gy > 65535 || gx * gy > 0x7fffffffLL || (g.tile_w & (g.tile_w - 1)) != 0)
      return cudaErrorInvalidConfiguration;
    auto launch = [&](auto pipe_tag) {
      constexpr bool PIPE = decltype(pipe_tag)::value;
      using L = DataLayout<T, PIPE ? kDataStages : 1>;
      auto fn = deform_bwd_data_kernel<T, TC, PIPE, DET>;
      if (cudaError_t e = allow_smem(fn, L::kBytes); e != cudaSuccess) return e;
      fn<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), DataCfg::kThreads, L::kBytes, stream>>>(
          g, maxq, x, offset, mask, kernel, dy, dxa, doffa, dmaska, det);
      return cudaGetLastError();
    };
    if (cudaError_t e = with_pipe<TC>(pipe, launch); e != cudaSuccess) return e;
  }
  if constexpr (TC) {  // only tensor-core paths have a pipelined (and a wide) instantiation
    // The pipelined weight loop keeps 32-bit corner offsets: x with 2^31 or more elements takes
    // the simple loop (64-bit records).
    if (pipe && g.x32 && wide_weight)
      return launch_weight<T, TC, true, WeightCfgWide, DET>(stream, g, x, offset, mask, dy, dka, det);
    if (pipe && g.x32) return launch_weight<T, TC, true, WeightCfg, DET>(stream, g, x, offset, mask, dy, dka, det);
  }
  return launch_weight<T, TC, false, WeightCfg, DET>(stream, g, x, offset, mask, dy, dka, det);
}

template <typename T>
cudaError_t convert_out(cudaStream_t stream, const float* src, void* dst, int64_t n) {
  if (n == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>((n + 1023) / 1024, 65535);  // 4 elements per thread
  convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(src, static_cast<T*>(dst), n);
  return cudaGetLastError();
}

// The backward's passes on the path of T (tensor cores for 16-bit types, for float32 when TF32 is
// allowed; exact SIMT otherwise), default (DET = false) or deterministic.
template <typename T, bool DET>
cudaError_t launch_backward_path(cudaStream_t stream, const Geo& g, bool wide, bool allow_tf32, const T* xs,
                                 const T* os, const T* ms, const T* ks, const T* ds, Atom<T>* dxa,
                                 Atom<T>* doffa, Atom<T>* dmaska, Atom<T>* dka, const DetAcc& det) {
  if constexpr (std::is_same<T, double>::value) {
    (void)allow_tf32;
    return launch_backward<T, false, DET>(stream, g, wide, xs, os, ms, ks, ds, dxa, doffa, dmaska, dka, det);
  } else if constexpr (std::is_same<T, float>::value) {
    return allow_tf32
               ? launch_backward<T, true, DET>(stream, g, wide, xs, os, ms, ks, ds, dxa, doffa, dmaska, dka, det)
               : launch_backward<T, false, DET>(stream, g, wide, xs, os, ms, ks, ds, dxa, doffa, dmaska, dka, det);
  } else {
    (void)allow_tf32;
    return launch_backward<T, true, DET>(stream, g, wide, xs, os, ms, ks, ds, dxa, doffa, dmaska, dka, det);
  }
}

// Deterministic backward (det.cuh): zero the fixed-point workspace, the maxima of |x|, |dy|,
// |kernel|, |mask| (order-independent atomicMax), the four scales, the passes with DET = true, and
// the conversion of (int64, flags) into each cotangent.
template <typename T>
cudaError_t run_backward_det(cudaStream_t stream, const Geo& g, bool wide, bool allow_tf32, const T* xs,
                             const T* os, const T* ms, const T* ks, const T* ds, void* const (&outs)[4],
                             const GradCounts& n, void* workspace) {
  const ConvParams& p = g.p;
  const BwdWorkspace w = bwd_workspace<T>(n, true);
  if (workspace == nullptr) return cudaErrorInvalidValue;
  char* base = static_cast<char*>(workspace);
  if (cudaError_t e = cudaMemsetAsync(base, 0, w.total, stream); e != cudaSuccess) return e;
  auto* maxbits = reinterpret_cast<unsigned long long*>(base + w.det_max);
  auto* scale = reinterpret_cast<double*>(base + w.det_scale);
  DetAcc det;
  for (int i = 0; i < 4; ++i) {
    det.acc[i] = reinterpret_cast<unsigned long long*>(base + w.det_acc[i]);
    det.flags[i] = reinterpret_cast<unsigned*>(base + w.det_flags[i]);
  }
  det.scale = scale;
  const int64_t counts[4] = {n.x, n.offset, n.mask, n.kernel};
  {
    const DetMaxIn in{{xs, ds, ks, ms}, {n.x, p.batch * p.y_size(), n.kernel, p.with_mask ? n.mask : 0}};
    const int64_t most = std::max(std::max(in.n[0], in.n[1]), std::max(in.n[2], in.n[3]));
    const int64_t blocks = std::min<int64_t>(std::max<int64_t>((most + 2047) / 2048, 1), 1024);  // >= 8 per thread
    det_max_kernel<T><<<dim3(static_cast<unsigned>(blocks), 4), 256, 0, stream>>>(in, maxbits);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
    const DetScaleIn sin{{double(p.n * p.h_out * p.w_out), double(g.K), double(g.Cog), double(g.Cpog)}, p.with_mask};
    det_scale_kernel<T><<<1, 32, 0, stream>>>(maxbits, sin, scale);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (cudaError_t e = launch_backward_path<T, true>(stream, g, wide, allow_tf32, xs, os, ms, ks, ds, nullptr,
                                                    nullptr, nullptr, nullptr, det);
      e != cudaSuccess)
    return e;
  for (int i = 0; i < 4; ++i) {
    if (counts[i] == 0) continue;
    const int64_t blocks = std::min<int64_t>((counts[i] + 1023) / 1024, 65535);  // 4 elements per thread
    det_convert_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(det.acc[i], det.flags[i], scale, i,
                                                                              static_cast<T*>(outs[i]), counts[i]);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

template <typename T>
cudaError_t run_backward(cudaStream_t stream, const ConvParams& p, const TileConfig& t, bool allow_tf32,
                         bool deterministic, const void* x, const void* offset, const void* mask,
                         const void* kernel, const void* dy, void* dx, void* doffset, void* dmask,
                         void* dkernel, void* workspace) {
  if (cudaError_t e = check_extents(p); e != cudaSuccess) return e;
  int64_t th, tw;
  bwd_spatial_tile(t, &th, &tw);
  Geo g = make_geo<T>(p, th, tw);
  g.pipeline = t.stages >= 2;  // the backward follows the tile's stages too
  const GradCounts n = grad_counts(p);
  const T* xs = static_cast<const T*>(x);
  const T* os = static_cast<const T*>(offset);
  const T* ms = static_cast<const T*>(mask);
  const T* ks = static_cast<const T*>(kernel);
  const T* ds = static_cast<const T*>(dy);
  const bool wide = t.bwd_tile_n == WeightCfgWide::BN;
  if (deterministic) {
    void* const outs[4] = {dx, doffset, dmask, dkernel};
    return run_backward_det<T>(stream, g, wide, allow_tf32, xs, os, ms, ks, ds, outs, n, workspace);
  }
  const int64_t nx = n.x, no = n.offset, nm = n.mask, nk = n.kernel;
  Atom<T> *dxa, *doffa, *dmaska, *dka;
  if constexpr (kIsHalf<T>) {
    const BwdWorkspace w = bwd_workspace<T>(n, false);
    if (workspace == nullptr && w.total > 0) return cudaErrorInvalidValue;
    char* base = static_cast<char*>(workspace);
    dxa = reinterpret_cast<float*>(base + w.dx);
    doffa = reinterpret_cast<float*>(base + w.doff);
    dmaska = reinterpret_cast<float*>(base + w.dmask);
    dka = reinterpret_cast<float*>(base + w.dk);
  } else {
    dxa = static_cast<Atom<T>*>(dx);
    doffa = static_cast<Atom<T>*>(doffset);
    dmaska = static_cast<Atom<T>*>(dmask);
    dka = static_cast<Atom<T>*>(dkernel);
  }
  const int64_t counts[4] = {nx, no, nm, nk};
  Atom<T>* bufs[4] = {dxa, doffa, dmaska, dka};
  for (int i = 0; i < 4; ++i) {
    if (counts[i] == 0) continue;
    if (cudaError_t e = cudaMemsetAsync(bufs[i], 0, sizeof(Atom<T>) * counts[i], stream); e != cudaSuccess)
      return e;
  }
  cudaError_t e = launch_backward_path<T, false>(stream, g, wide, allow_tf32, xs, os, ms, ks, ds, dxa, doffa,
                                                 dmaska, dka, DetAcc{});
  if (e != cudaSuccess) return e;
  if constexpr (kIsHalf<T>) {
    void* outs[4] = {dx, doffset, dmask, dkernel};
    for (int i = 0; i < 4; ++i)
      if ((e = convert_out<T>(stream, bufs[i], outs[i], counts[i])) != cudaSuccess) return e;
  }
  return cudaSuccess;
}

// Per-dtype drivers, instantiated in ops_<dtype>.cu.
#define DEFT_DECLARE_DRIVERS(T)                                                                              \
  extern template cudaError_t run_forward<T>(cudaStream_t, const ConvParams&, const TileConfig&, bool, bool, \
                                             const void*, const void*, const void*, const void*, void*,      \
                                             void*);                                                         \
  extern template cudaError_t run_backward<T>(cudaStream_t, const ConvParams&, const TileConfig&, bool, bool, \
                                              const void*, const void*, const void*, const void*,             \
                                              const void*, void*, void*, void*, void*, void*);
#define DEFT_INSTANTIATE_DRIVERS(T)                                                                       \
  template cudaError_t run_forward<T>(cudaStream_t, const ConvParams&, const TileConfig&, bool, bool,    \
                                      const void*, const void*, const void*, const void*, void*, void*); \
  template cudaError_t run_backward<T>(cudaStream_t, const ConvParams&, const TileConfig&, bool, bool,   \
                                       const void*, const void*, const void*, const void*, const void*,  \
                                       void*, void*, void*, void*, void*);

}  // namespace kern
}  // namespace deft
