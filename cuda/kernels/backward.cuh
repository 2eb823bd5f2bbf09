// Backward kernels.
//  (a) data pass: one block = a spatial tile of output pixels x a chunk of BC input channels, all
//      taps. Per tap grad_col[pixels x BC] = dY * W_tap^T on chip; then each (pixel, channel) adds
//      its bilinear share of dX into a shared-memory window around the tile's sampling region
//      (global atomics only for corners outside it), and the channel sums
//      dmask = sum grad_col * sample, doffset = sum grad_col * mask * d sample / d(y, x) are
//      reduced in registers + warp shuffles (one atomic per pixel, tap and chunk). The window is
//      flushed into dX once, after the last tap.
//  (b) weight pass: dW[(tap, C_in) x C_out] = cols^T * dY as an implicit GEMM whose A loader
//      recomputes the samples, split over pixels; partial tiles meet in fp32 (fp64) atomics.
// Temporaries: fp32 accumulators of dx, doffset, dmask, dkernel for half types only.
#pragma once

#include "kernels/common.cuh"

namespace deft {
namespace kern {

// Data pass: BM pixels (spatial tile) x BC input channels, looping over the taps. The grad_col
// GEMM reduces over C_out/fg in steps of DataKD<T>; with C_out/fg <= DataKD<T> the dY tile stays
// in shared memory for all taps. Scatter: kLanes lanes per pixel, BC / kLanes = 4 adjacent
// channels each.
struct DataCfg {
  static constexpr int BM = 64, BC = 32, WM = 2, WN = 2, kThreads = 128;
  static constexpr int kLanes = 8;
  static constexpr int kMargin = 3;  // window margin (pixels) around the base sampling region
};
template <typename T> constexpr int DataKD = sizeof(T) == 8 ? 32 : 64;
// Window positions at most (BC accumulators each). 289 = 17x17 = an 8x8 tile of a 3x3 stride-1
// conv with a 3-pixel margin; with it 3 blocks fit an SM (fp32: 76 KB each). fp64: 13x13.
template <typename T> constexpr int DataWinCap = sizeof(Atom<T>) == 8 ? 169 : 289;
template <typename T> constexpr int DataMinBlocks = sizeof(T) == 8 ? 2 : 3;

// dx window of one launch: wh x ww positions whose origin is the block's base sampling region
// origin minus (oy, ox) (negative when the window was clipped to the cap).
struct DataWin {
  int wh, ww;
  int64_t oy, ox;
};

// One (pixel, tap) of the data pass, built once per tap by one thread and read by the pixel's
// kLanes lanes: the top-left corner (y0 = -4: contributes nothing), each corner's byte offset in
// the dx window as 16 bits (kOffImage: outside the image, kOffGlobal: inside the image but not
// the window), the bilinear fractions and the mask.
template <typename A>
struct alignas(16) DataRec {
  int y0, x0;
  unsigned wo01, wo23;  // corners 0, 1 and 2, 3 (corner k: y0 + k / 2, x0 + k % 2)
  A ly, lx, m;
};
constexpr unsigned kOffImage = 0xffff, kOffGlobal = 0xfffe;

template <typename T>
struct DataLayout {
  using A = Acc<T>;
  using C = DataCfg;
  static constexpr int KD = DataKD<T>;
  static constexpr int LDA = KD + kPad<T>;    // As[BM][LDA]: dY rows
  static constexpr int LDB = KD + kPad<T>;    // Bs[BC][LDB]: W^T stored column-major (ci rows)
  static constexpr int LDC = C::BC + kCPad;   // Cs[BM][LDC]: grad_col
  static constexpr int LDW = C::BC;           // window[pos][LDW] (unpadded: see the scatter)
  static constexpr size_t kA = align_up(size_t(C::BM) * LDA * sizeof(T), 128);
  static constexpr size_t kB = align_up(size_t(C::BC) * LDB * sizeof(T), 128);
  static constexpr size_t kC = align_up(size_t(C::BM) * LDC * sizeof(A), 128);
  static constexpr size_t kR = align_up(2 * size_t(C::BM) * sizeof(DataRec<A>), 128);  // two taps
  static constexpr size_t kFixed = kA + kB + kC + kR;
  static constexpr size_t bytes(int64_t positions) { return kFixed + size_t(positions) * LDW * sizeof(Atom<T>); }
};

// Weight pass: BC input channels x BN output channels of one tap, reduction over BK-pixel steps.
struct WeightCfg {
  static constexpr int BC = 64, BN = 64, BK = 32, WM = 2, WN = 2, kThreads = 128;
};

template <typename T>
struct WeightLayout {
  using A = Acc<T>;
  using C = WeightCfg;
  static constexpr int LDA = C::BC + kPad<T>;  // As[BK pixels][LDA]: samples (column-major A)
  static constexpr int LDB = C::BN + kPad<T>;  // Bs[BK pixels][LDB]: dY rows
  static constexpr int LDC = C::BN + kCPad;    // Cs[BC][LDC]
  static constexpr size_t kAB = align_up((size_t(C::BK) * LDA + size_t(C::BK) * LDB) * sizeof(T), 128);
  static constexpr size_t kC = align_up(size_t(C::BC) * LDC * sizeof(A), 128);
  static constexpr size_t kMain = kAB > kC ? kAB : kC;
  static constexpr size_t kBytes = kMain + size_t(C::BK) * sizeof(Rec<A>);
};

// ---------------------------------------------------------------------------------------------
// Data-pass helpers.

// The inputs of one bilinear record, loaded a tap ahead (their latency hides behind the scatter).
template <typename A>
struct RawSample {
  A dy, dx, m;
};

template <typename T, typename A>
__device__ __forceinline__ RawSample<A> load_sample(const Geo& g, const T* __restrict__ offset,
                                                    const T* __restrict__ mask, bool valid, int64_t pix,
                                                    int tap, int64_t og) {
  RawSample<A> s{A(0), A(0), A(1)};
  if (!valid) return s;
  const ConvParams& p = g.p;
  const T* o = offset + pix * (p.offset_groups * g.K * 2) + (og * g.K + tap) * 2;
  s.dy = to_acc<A>(o[0]);
  s.dx = to_acc<A>(o[1]);
  if (p.with_mask) s.m = to_acc<A>(mask[pix * (p.offset_groups * g.K) + og * g.K + tap]);
  return s;
}

// make_rec's arithmetic on a RawSample, plus the corners' window offsets (window origin
// (wy0, wx0), wh x ww positions of `pos_bytes` each).
template <typename A>
__device__ __forceinline__ DataRec<A> data_rec(const Geo& g, const RawSample<A>& s, bool valid, int64_t ho,
                                               int64_t wo, int tap, int wy0, int wx0, int wh, int ww,
                                               unsigned pos_bytes) {
  const ConvParams& p = g.p;
  DataRec<A> r;
  r.y0 = -4;
  r.x0 = -4;
  r.wo01 = r.wo23 = 0xffffffffu;
  r.ly = r.lx = r.m = A(0);
  if (!valid) return r;
  const int64_t i = tap / p.kw, j = tap - (tap / p.kw) * p.kw;
  const A y = A(p.base_y(ho, i)) + s.dy, x = A(p.base_x(wo, j)) + s.dx;
  const Bilinear<A> b = make_bilinear<A>(y, x, p.h, p.w);
  if (!b.inside) return r;
  r.y0 = static_cast<int>(b.y0);
  r.x0 = static_cast<int>(b.x0);
  r.ly = b.ly;
  r.lx = b.lx;
  r.m = s.m;
  unsigned off[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    const int yy = r.y0 + (k >> 1), xx = r.x0 + (k & 1);
    const bool ok = static_cast<unsigned>(yy) < static_cast<unsigned>(p.h) &&
                    static_cast<unsigned>(xx) < static_cast<unsigned>(p.w);
    const unsigned wy = static_cast<unsigned>(yy - wy0), wx = static_cast<unsigned>(xx - wx0);
    off[k] = !ok ? kOffImage
                 : (wy < static_cast<unsigned>(wh) && wx < static_cast<unsigned>(ww) ? (wy * ww + wx) * pos_bytes
                                                                                        : kOffGlobal);
  }
  r.wo01 = off[0] | (off[1] << 16);
  r.wo23 = off[2] | (off[3] << 16);
  return r;
}

// 4 adjacent elements as accumulators; `whole`: all 4 inside the chunk and vector-aligned.
template <typename T, typename A>
__device__ __forceinline__ void load4(const T* __restrict__ src, bool whole, int n, A (&v)[4]) {
  if (whole) {
    if constexpr (sizeof(T) == 2) {
      const uint2 raw = __ldg(reinterpret_cast<const uint2*>(src));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = to_acc<A>(e[k]);
    } else if constexpr (sizeof(T) == 4) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src));
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < 4; ++k) v[k] = to_acc<A>(e[k]);
    } else {
      const uint4 r0 = __ldg(reinterpret_cast<const uint4*>(src));
      const uint4 r1 = __ldg(reinterpret_cast<const uint4*>(src) + 1);
      const T* e0 = reinterpret_cast<const T*>(&r0);
      const T* e1 = reinterpret_cast<const T*>(&r1);
      v[0] = to_acc<A>(e0[0]);
      v[1] = to_acc<A>(e0[1]);
      v[2] = to_acc<A>(e1[0]);
      v[3] = to_acc<A>(e1[1]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < 4; ++k) v[k] = k < n ? to_acc<A>(src[k]) : A(0);
  }
}

// Shared-memory window updates. atomicAdd on a shared float/double compiles to one serial
// load + CAS loop per call; shared_add_n issues all N loads, then all N CAS, so the latencies
// overlap. A CAS that lost a race (another warp updated the element in between) is retried from
// the value it saw. Adding 0 needs nothing, so callers may point unused entries anywhere inside
// the window with v = 0 (such a CAS either rewrites the same value or fails harmlessly).
template <typename W> using Bits = std::conditional_t<sizeof(W) == 8, unsigned long long, unsigned>;
__device__ __forceinline__ unsigned lds_volatile(unsigned a, unsigned) {
  unsigned v;
  asm volatile("ld.volatile.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ unsigned long long lds_volatile(unsigned a, unsigned long long) {
  unsigned long long v;
  asm volatile("ld.volatile.shared.u64 %0, [%1];\n" : "=l"(v) : "r"(a) : "memory");
  return v;
}
__device__ __forceinline__ unsigned cas_shared(unsigned a, unsigned cmp, unsigned val) {
  unsigned got;
  asm volatile("atom.shared.cas.b32 %0, [%1], %2, %3;\n" : "=r"(got) : "r"(a), "r"(cmp), "r"(val) : "memory");
  return got;
}
__device__ __forceinline__ unsigned long long cas_shared(unsigned a, unsigned long long cmp, unsigned long long val) {
  unsigned long long got;
  asm volatile("atom.shared.cas.b64 %0, [%1], %2, %3;\n" : "=l"(got) : "r"(a), "l"(cmp), "l"(val) : "memory");
  return got;
}

// *addr[i] += v[i] (shared-memory byte addresses).
template <int N, typename W>
__device__ __forceinline__ void shared_add_n(const unsigned (&addr)[N], const W (&v)[N]) {
  using U = Bits<W>;
  auto to_bits = [](W f) -> U {
    if constexpr (sizeof(W) == 8) return static_cast<U>(__double_as_longlong(f));
    else return __float_as_uint(f);
  };
  auto from_bits = [](U u) -> W {
    if constexpr (sizeof(W) == 8) return __longlong_as_double(static_cast<long long>(u));
    else return __uint_as_float(u);
  };
  U old[N], got[N];
#pragma unroll
  for (int i = 0; i < N; ++i) old[i] = lds_volatile(addr[i], U(0));
#pragma unroll
  for (int i = 0; i < N; ++i) got[i] = cas_shared(addr[i], old[i], to_bits(from_bits(old[i]) + v[i]));
  bool lost = false;
#pragma unroll
  for (int i = 0; i < N; ++i) lost |= got[i] != old[i];
  if (lost) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      U cur = got[i];
      while (cur != old[i] && v[i] != W(0)) {
        old[i] = cur;
        cur = cas_shared(addr[i], old[i], to_bits(from_bits(old[i]) + v[i]));
      }
    }
  }
}

// dst[0..1] += (a, b): one 8-byte atomic on sm_90.
__device__ __forceinline__ void atomic_add2(float* dst, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  atomicAdd(reinterpret_cast<float2*>(dst), make_float2(a, b));
#else
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
#endif
}
__device__ __forceinline__ void atomic_add2(double* dst, double a, double b) {
  atomicAdd(dst, a);
  atomicAdd(dst + 1, b);
}

// 16 bytes global -> shared without a register round trip; reads `n` bytes (0 or 16), zero-fills
// the rest. cp_async_wait_all: this thread's copies have landed (a barrier publishes them).
__device__ __forceinline__ void cp_async16(void* dst, const void* src, int n) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(d), "l"(src), "r"(n) : "memory");
#else
  *reinterpret_cast<uint4*>(dst) = n > 0 ? *reinterpret_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);
#endif
}
__device__ __forceinline__ void cp_async_wait_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

template <typename T, bool TC>
__global__ void __launch_bounds__(DataCfg::kThreads, DataMinBlocks<T>)
    deform_bwd_data_kernel(const Geo g, const DataWin win, int64_t maxq, const T* __restrict__ x,
                           const T* __restrict__ offset, const T* __restrict__ mask,
                           const T* __restrict__ kernel, const T* __restrict__ dy, Atom<T>* dxa,
                           Atom<T>* doffa, Atom<T>* dmaska) {
  using A = Acc<T>;
  using W = Atom<T>;
  using L = DataLayout<T>;
  constexpr int BM = DataCfg::BM, BC = DataCfg::BC, KD = L::KD, NT = DataCfg::kThreads;
  // Scatter layout: LN lanes per pixel x VE channels each; a warp holds PPW pixels, a pass PPP.
  constexpr int LN = DataCfg::kLanes, VE = BC / LN, PPW = 32 / LN, PPP = NT / LN;
  static_assert(VE == 4 && PPW == VE && BM % PPP == 0 && NT >= BM, "scatter lane layout");
  static_assert(size_t(DataWinCap<T>) * L::LDW * sizeof(Atom<T>) < kOffGlobal, "window offsets fit 16 bits");
  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);                                       // (BM, KD)
  T* Bs = reinterpret_cast<T*>(smem + L::kA);                               // (BC, KD)
  A* Cs = reinterpret_cast<A*>(smem + L::kA + L::kB);                       // (BM, BC)
  DataRec<A>* recs = reinterpret_cast<DataRec<A>*>(smem + L::kA + L::kB + L::kC);  // (2, BM)
  W* wsm = reinterpret_cast<W*>(smem + L::kFixed);                          // (wh * ww, BC)

  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x % g.tiles_img, img = blockIdx.x / g.tiles_img;
  const int64_t b = img / p.n;
  const int64_t th0 = (tile / g.tiles_w) * g.tile_h, tw0 = (tile % g.tiles_w) * g.tile_w;
  const int tw = static_cast<int>(g.tile_w);  // <= BM
  const int64_t q = blockIdx.y % maxq, fg = blockIdx.y / maxq;
  int64_t c0, cnt64, og;
  if (!chunk_of(g, fg, q, BC, &c0, &cnt64, &og)) return;  // uniform over the block
  const int cnt = static_cast<int>(cnt64);
  const int K = static_cast<int>(g.K);
  const T* kb = kernel + b * p.kernel_size();
  const int64_t ocol0 = fg * g.Cog, krow0 = (c0 - fg * g.Cg) * p.c_out + ocol0;
  const int H = static_cast<int>(p.h), Wi = static_cast<int>(p.w);
  const int64_t C = p.c_in, xoff = img * p.h * p.w * p.c_in;

  // Window origin, clamped: a window off the image (only with huge strides/pads) catches nothing.
  auto clamp30 = [](int64_t v) {
    constexpr int64_t L30 = int64_t(1) << 30;
    return static_cast<int>(v < -L30 ? -L30 : (v > L30 ? L30 : v));
  };
  const int wy0 = clamp30(th0 * p.stride_h - p.pad_top - win.oy);
  const int wx0 = clamp30(tw0 * p.stride_w - p.pad_left - win.ox);
  const int wpos = win.wh * win.ww;
  {
    uint4* w4 = reinterpret_cast<uint4*>(wsm);
    const int n16 = wpos * static_cast<int>(L::LDW * sizeof(W) / 16);
    for (int i = tid; i < n16; i += NT) w4[i] = make_uint4(0, 0, 0, 0);
  }

  auto dy_row = [&](int r, int64_t o) -> const T* {
    const int64_t ho = th0 + r / tw, wo = tw0 + r % tw;
    if (ho >= p.h_out || wo >= p.w_out) return nullptr;
    return dy + ((img * p.h_out + ho) * p.w_out + wo) * p.c_out + ocol0 + o;
  };
  auto load_b = [&](int tap, int64_t o, int ocnt) {
    const T* krow = kb + tap * g.Cg * p.c_out + krow0 + o;
    load_rows<T, BC, KD, NT>(
        Bs, L::LDB, [&](int r) -> const T* { return r < cnt ? krow + r * p.c_out : nullptr; }, ocnt, g.vec, tid);
  };
  // Bs for the next tap while the scatter runs (resident dY, 16-byte rows only).
  auto load_b_async = [&](int tap) {
    constexpr int V = kVec<T>, VPR = KD / V;
    const T* krow = kb + tap * g.Cg * p.c_out + krow0;
    const int ocnt = static_cast<int>(g.Cog);
    for (int i = tid; i < BC * VPR; i += NT) {
      const int r = i / VPR, cc = (i - r * VPR) * V;
      const bool in = r < cnt && cc < ocnt;
      cp_async16(Bs + r * L::LDB + cc, in ? krow + r * p.c_out + cc : krow, in ? 16 : 0);
    }
  };

  // Thread tid < BM owns the record of pixel tid.
  const int64_t rho = th0 + tid / tw, rwo = tw0 + tid % tw;
  const bool rvalid = tid < BM && rho < p.h_out && rwo < p.w_out;
  const int64_t rpix = (img * p.h_out + rho) * p.w_out + rwo;
  auto fetch = [&](int tap) { return load_sample<T, A>(g, offset, mask, rvalid, rpix, tap, og); };
  auto put = [&](const RawSample<A>& s, int tap) {
    if (tid < BM)
      recs[(tap & 1) * BM + tid] =
          data_rec<A>(g, s, rvalid, rho, rwo, tap, wy0, wx0, win.wh, win.ww, L::LDW * sizeof(W));
  };

  // Scatter of one tap: pixel r, channels c .. c+3 of the chunk.
  const int lane = tid & 31, slot = lane / LN, sub = lane % LN, c = sub * VE;
  // Shared address of the lane's window element e at position 0. Element e of the lane goes to
  // channel c + (e + slot) % 4: at each step the warp's 4 pixels x 8 lanes then touch 32
  // distinct banks wherever the corners fall.
  unsigned wlane[VE];
#pragma unroll
  for (int e = 0; e < VE; ++e)
    wlane[e] = static_cast<unsigned>(__cvta_generic_to_shared(wsm + c + ((e + slot) & (VE - 1))));
  const T* xc = x + xoff + c0 + c;
  W* dxc = dxa + xoff + c0 + c;
  const int64_t pix0 = (img * p.h_out + th0) * p.w_out + tw0;  // the tile's first pixel
  W* doffc = doffa + og * g.K * 2;
  W* dmaskc = p.with_mask ? dmaska + og * g.K : dmaska;
  const int64_t WC = p.w * C;
  // kWhole: every lane's 4 channels are inside the chunk and vector-aligned (vector loads and
  // atomics, no per-element checks).
  auto scatter = [&](auto whole_tag, const DataRec<A>* rb, int tap) {
    constexpr bool kWhole = decltype(whole_tag)::value;
#pragma unroll 1
    for (int r = (tid / 32) * PPW + slot; r < BM; r += PPP) {
      const DataRec<A> rec = rb[r];
      A s_m = A(0), s_y = A(0), s_x = A(0);
      if (rec.y0 > -4 && c < cnt) {
        const A ly = rec.ly, lx = rec.lx, hy = A(1) - ly, hx = A(1) - lx;
        const A wt[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
        const unsigned wo[4] = {rec.wo01 & 0xffffu, rec.wo01 >> 16, rec.wo23 & 0xffffu, rec.wo23 >> 16};
        const bool whole = kWhole || (g.vec && c + VE <= cnt);
        const int64_t at0 = (static_cast<int64_t>(rec.y0) * Wi + rec.x0) * C;  // corner 0 from xc / dxc
        auto at = [&](int k) { return at0 + ((k & 2) ? WC : 0) + ((k & 1) ? C : 0); };
        // x at the corners first: the loads are in flight during the window updates.
        A v[4][VE];
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (wo[k] != kOffImage) {
            load4<T, A>(xc + at(k), whole, cnt - c, v[k]);
          } else {
#pragma unroll
            for (int e = 0; e < VE; ++e) v[k][e] = A(0);
          }
        }
        A gc[VE], gm[VE];
        const A* crow = Cs + r * L::LDC + c;
        if constexpr (sizeof(A) == 4) {
          const float4 t = *reinterpret_cast<const float4*>(crow);
          gc[0] = t.x, gc[1] = t.y, gc[2] = t.z, gc[3] = t.w;
        } else {
#pragma unroll
          for (int e = 0; e < VE; e += 2) {
            const double2 t = *reinterpret_cast<const double2*>(crow + e);
            gc[e] = t.x, gc[e + 1] = t.y;
          }
        }
#pragma unroll
        for (int e = 0; e < VE; ++e) gm[e] = gc[e] * rec.m;
        // Window updates (the rotation of gm matches wlane); corners outside it add 0 at position 0.
        {
          A gr[VE];
#pragma unroll
          for (int e = 0; e < VE; ++e) gr[e] = gm[e];
          if (slot & 1) {
            const A t = gr[0];
            gr[0] = gr[1], gr[1] = gr[2], gr[2] = gr[3], gr[3] = t;
          }
          if (slot & 2) {
            A t = gr[0];
            gr[0] = gr[2], gr[2] = t;
            t = gr[1];
            gr[1] = gr[3], gr[3] = t;
          }
          constexpr int KB = 2;  // corners per batch (4: spills)
#pragma unroll
          for (int k0 = 0; k0 < 4; k0 += KB) {
            unsigned addr[KB * VE];
            W val[KB * VE];
#pragma unroll
            for (int k = 0; k < KB; ++k) {
              const bool in = wo[k0 + k] < kOffGlobal;
              const unsigned off = in ? wo[k0 + k] : 0u;
              const A w = in ? wt[k0 + k] : A(0);
#pragma unroll
              for (int e = 0; e < VE; ++e) {
                addr[k * VE + e] = wlane[e] + off;
                val[k * VE + e] = static_cast<W>(gr[e] * w);
              }
            }
            shared_add_n<KB * VE, W>(addr, val);
          }
        }
        // Corners inside the image but outside the window: straight to dX.
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          if (wo[k] != kOffGlobal) continue;
          W part[VE];
#pragma unroll
          for (int e = 0; e < VE; ++e) part[e] = static_cast<W>(gm[e] * wt[k]);
          W* dst = dxc + at(k);
          if (whole) {
            atomic_add_n<VE>(dst, part);
          } else {
#pragma unroll
            for (int e = 0; e < VE; ++e)
              if (c + e < cnt) atomicAdd(dst + e, part[e]);
          }
        }
        // sample = top + ly * (bot - top); d/dy = bot - top; d/dx = hy * (v1 - v0) + ly * (v3 - v2).
#pragma unroll
        for (int e = 0; e < VE; ++e) {
          const A d01 = v[1][e] - v[0][e], d23 = v[3][e] - v[2][e];
          const A top = v[0][e] + lx * d01, bot = v[2][e] + lx * d23;
          const A dyv = bot - top;
          const A val = top + ly * dyv;
          const A dxv = hy * d01 + ly * d23;
          s_m += gc[e] * val;
          s_y += gm[e] * dyv;
          s_x += gm[e] * dxv;
        }
      }
#pragma unroll
      for (int s = LN / 2; s > 0; s >>= 1) {
        s_m += __shfl_xor_sync(0xffffffffu, s_m, s);
        s_y += __shfl_xor_sync(0xffffffffu, s_y, s);
        s_x += __shfl_xor_sync(0xffffffffu, s_x, s);
      }
      if (sub == 0 && rec.y0 > -4) {
        const int64_t pix = pix0 + (r / tw) * p.w_out + r % tw;
        atomic_add2(doffc + pix * (p.offset_groups * g.K * 2) + 2 * tap, static_cast<W>(s_y), static_cast<W>(s_x));
        if (p.with_mask) atomicAdd(dmaskc + pix * (p.offset_groups * g.K) + tap, static_cast<W>(s_m));
      }
    }
  };

  // Taps. Barriers per tap: loads -> MMA, MMA -> scatter (resident dY: 2 in all).
  const bool resident = g.Cog <= KD;
  const bool async_b = resident && g.vec;
  const bool all_whole = g.vec && cnt % VE == 0;
  if (resident) {
    load_rows<T, BM, KD, NT>(As, L::LDA, [&](int r) { return dy_row(r, 0); }, static_cast<int>(g.Cog), g.vec, tid);
    load_b(0, 0, static_cast<int>(g.Cog));
  }
  put(fetch(0), 0);
  MmaTile<T, TC, BM, BC, KD, DataCfg::WM, DataCfg::WN, false, true> mma;
#pragma unroll 1
  for (int tap = 0; tap < K; ++tap) {
    if (tap > 0 && !async_b) {
      put(fetch(tap), tap);
      if (resident) load_b(tap, 0, static_cast<int>(g.Cog));
    }
    mma.zero();
    if (resident) {
      __syncthreads();
      mma.compute(As, L::LDA, Bs, L::LDB, tid);
    } else {
      for (int64_t o = 0; o < g.Cog; o += KD) {
        const int ocnt = static_cast<int>(g.Cog - o < KD ? g.Cog - o : KD);
        load_rows<T, BM, KD, NT>(As, L::LDA, [&](int r) { return dy_row(r, o); }, ocnt, g.vec, tid);
        load_b(tap, o, ocnt);
        __syncthreads();
        mma.compute(As, L::LDA, Bs, L::LDB, tid);
        if (o + KD < g.Cog) __syncthreads();
      }
    }
    mma.store(Cs, L::LDC, tid);
    __syncthreads();
    const bool ahead = async_b && tap + 1 < K;
    RawSample<A> next{A(0), A(0), A(1)};
    if (ahead) {
      load_b_async(tap + 1);
      next = fetch(tap + 1);
    }
    if (all_whole) {
      scatter(std::true_type{}, recs + (tap & 1) * BM, tap);
    } else {
      scatter(std::false_type{}, recs + (tap & 1) * BM, tap);
    }
    if (ahead) {
      put(next, tap + 1);
      cp_async_wait_all();
    }
  }
  __syncthreads();

  // Flush: every window vector inside the image and the chunk, all-zero ones skipped.
  constexpr int FV = 16 / static_cast<int>(sizeof(W)), VPP = BC / FV;
  for (int i = tid; i < wpos * VPP; i += NT) {
    const int pos = i / VPP, cc = (i - pos * VPP) * FV;
    const int wy = pos / win.ww, yy = wy0 + wy, xx = wx0 + (pos - wy * win.ww);
    if (cc >= cnt || static_cast<unsigned>(yy) >= static_cast<unsigned>(H) ||
        static_cast<unsigned>(xx) >= static_cast<unsigned>(Wi))
      continue;
    W v[FV];
    {
      const uint4 raw = *reinterpret_cast<const uint4*>(wsm + pos * L::LDW + cc);
      const W* e = reinterpret_cast<const W*>(&raw);
#pragma unroll
      for (int k = 0; k < FV; ++k) v[k] = e[k];
    }
    bool nz = false;
#pragma unroll
    for (int k = 0; k < FV; ++k) nz |= v[k] != W(0);
    if (!nz) continue;
    W* dst = dxa + xoff + (static_cast<int64_t>(yy) * Wi + xx) * C + c0 + cc;
    if (g.vec && cc + FV <= cnt) {
      atomic_add_n<FV>(dst, v);
    } else {
#pragma unroll
      for (int k = 0; k < FV; ++k)
        if (cc + k < cnt && v[k] != W(0)) atomicAdd(dst + k, v[k]);
    }
  }
}

template <typename T, bool TC>
__global__ void __launch_bounds__(WeightCfg::kThreads)
    deform_bwd_weight_kernel(const Geo g, int64_t maxq, int64_t steps_per_split,
                             const T* __restrict__ x, const T* __restrict__ offset,
                             const T* __restrict__ mask, const T* __restrict__ dy, Atom<T>* dka) {
  using A = Acc<T>;
  using L = WeightLayout<T>;
  constexpr int BC = WeightCfg::BC, BN = WeightCfg::BN, BK = WeightCfg::BK, NT = WeightCfg::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);  // (BK pixels, BC)
  T* Bs = As + BK * L::LDA;            // (BK pixels, BN)
  A* Cs = reinterpret_cast<A*>(smem);  // (BC, BN)
  Rec<A>* recs = reinterpret_cast<Rec<A>*>(smem + L::kMain);

  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  const int64_t nob = (g.Cog + BN - 1) / BN;
  int64_t t = blockIdx.x;
  const int64_t ob = t % nob;
  t /= nob;
  const int64_t q = t % maxq;
  t /= maxq;
  const int64_t tap = t % g.K;
  t /= g.K;
  const int64_t fg = t % p.feature_groups, b = t / p.feature_groups;
  int64_t c0, cnt64, og;
  if (!chunk_of(g, fg, q, BC, &c0, &cnt64, &og)) return;
  const int cnt = static_cast<int>(cnt64);
  const int64_t o0 = fg * g.Cog + ob * BN;
  const int ocnt = static_cast<int>(g.Cog - ob * BN < BN ? g.Cog - ob * BN : BN);
  const int64_t hw = p.h_out * p.w_out;
  const int64_t step0 = blockIdx.y * steps_per_split;
  const int64_t steps = (g.pixels + BK - 1) / BK;
  const int64_t step1 = step0 + steps_per_split < steps ? step0 + steps_per_split : steps;

  MmaTile<T, TC, BC, BN, BK, WeightCfg::WM, WeightCfg::WN, true, false> mma;
  mma.zero();
  for (int64_t s = step0; s < step1; ++s) {
    const int64_t p0 = s * BK;
    for (int r = tid; r < BK; r += NT) {
      const int64_t pl = p0 + r;
      const bool valid = pl < g.pixels;
      const int64_t im = pl / hw, ho = (pl % hw) / p.w_out, wo = pl % p.w_out;
      recs[r] = make_rec<T, A>(g, offset, mask, valid, b * g.pixels + pl, b * p.n + im, ho, wo,
                               static_cast<int>(tap), og);
    }
    __syncthreads();
    load_samples<T, BK, BC, NT>(As, L::LDA, recs, x, g, c0, cnt, tid);
    const T* drow = dy + (b * g.pixels + p0) * p.c_out + o0;
    load_rows<T, BK, BN, NT>(
        Bs, L::LDB,
        [&](int r) -> const T* { return p0 + r < g.pixels ? drow + r * p.c_out : nullptr; }, ocnt,
        g.vec, tid);
    __syncthreads();
    mma.compute(As, L::LDA, Bs, L::LDB, tid);
    __syncthreads();
  }
  mma.store(Cs, L::LDC, tid);
  __syncthreads();
  Atom<T>* dst = dka + b * p.kernel_size() + (tap * g.Cg + (c0 - fg * g.Cg)) * p.c_out + o0;
  for (int idx = tid; idx < BC * BN; idx += NT) {
    const int r = idx / BN, c = idx % BN;
    if (r < cnt && c < ocnt) atomicAdd(dst + r * p.c_out + c, static_cast<Atom<T>>(Cs[r * L::LDC + c]));
  }
}

template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dst[i] = from_acc<T>(src[i]);
}

}  // namespace kern
}  // namespace deft
