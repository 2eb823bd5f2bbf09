// Forward kernel: implicit GEMM y[pixels x C_out] = cols[pixels x (tap, C_in)] * W, where the
// columns are never stored: the A-tile loader samples x bilinearly (4 corners, 16-byte vectors
// along C) straight into shared memory in the MMA input type.
#pragma once

#include "kernels/common.cuh"

namespace deft {
namespace kern {

// One block: BM output pixels (a tile_h x tile_w spatial tile of one image) x BN output channels
// of one feature group; the reduction runs over (tap, chunk of BK input channels).
// kMinBlocks resident blocks per SM bound the registers (65536 / (threads * kMinBlocks)): the
// gather is latency-bound, so warps in flight matter more than registers per thread.
template <int BM_, int BN_, int BK_, int WM_, int WN_, int MIN_BLOCKS>
struct FwdCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, kThreads = WM * WN * 32;
  static constexpr int kMinBlocks = MIN_BLOCKS;
};

template <typename T, bool TC, typename Cfg>
struct FwdLayout {
  using A = Acc<T>;
  static constexpr int LDA = Cfg::BK + kPad<T>;  // As[BM][LDA]: pixels x channels
  static constexpr int LDB = Cfg::BN + kPad<T>;  // Bs[BK][LDB]: channels x output channels
  static constexpr int LDC = Cfg::BN + kCPad;    // Cs[BM][LDC]: accumulators (aliases As/Bs)
  static constexpr int kBufs = TC ? 2 : 1;       // double-buffered A/B tiles on the pipelined path
  static constexpr size_t kABElems = size_t(Cfg::BM) * LDA + size_t(Cfg::BK) * LDB;
  static constexpr size_t kAB = align_up(kBufs * kABElems * sizeof(T), 128);
  static constexpr size_t kC = align_up(size_t(Cfg::BM) * LDC * sizeof(A), 128);
  static constexpr size_t kMain = kAB > kC ? kAB : kC;
  static constexpr size_t kBytes = kMain + 2 * size_t(Cfg::BM) * sizeof(Rec<A>);
};

// Walks the reduction of one block: taps, then the offset-group segments of the feature group's
// channels, then chunks of BK channels; `group` counts (tap, segment) pairs (one bilinear table
// each). 32-bit state (channel counts fit easily): two copies of it live in registers.
struct WalkBounds {
  int cbeg, cend, Cpog, K, bk;
};
struct ChunkWalk {
  int tap, c0, se, cnt, group;
  bool is_first;  // the chunk opens a new (tap, segment) group
  __device__ __forceinline__ void init(const WalkBounds& w) {
    tap = 0, group = 0, is_first = true;
    start_segment(w, w.cbeg);
  }
  __device__ __forceinline__ void start_segment(const WalkBounds& w, int cs) {
    c0 = cs;
    se = (cs / w.Cpog + 1) * w.Cpog < w.cend ? (cs / w.Cpog + 1) * w.Cpog : w.cend;
    cnt = se - c0 < w.bk ? se - c0 : w.bk;
  }
  __device__ __forceinline__ bool valid(const WalkBounds& w) const { return tap < w.K && w.cbeg < w.cend; }
  __device__ __forceinline__ void next(const WalkBounds& w) {
    is_first = false;
    if (c0 + w.bk < se) {
      c0 += w.bk;
      cnt = se - c0 < w.bk ? se - c0 : w.bk;
      return;
    }
    ++group;
    is_first = true;
    if (se < w.cend) {
      start_segment(w, se);
    } else {
      ++tap;
      start_segment(w, w.cbeg);
    }
  }
};

// Bilinear record of the pipelined path: corner (y0, x0) relative to the block's image and the
// weights; y0 = -4 marks "contributes nothing". No 64-bit image offset (block-uniform there).
template <typename A>
struct FRec {
  int y0, x0;
  A ly, lx, m;
};

// Position of one (tap, offset-group segment) reduction group: its tap and first channel.
struct GroupPos {
  int tap, cs;
  __device__ __forceinline__ void advance(const WalkBounds& w) {
    const int se = (cs / w.Cpog + 1) * w.Cpog < w.cend ? (cs / w.Cpog + 1) * w.Cpog : w.cend;
    if (se < w.cend) {
      cs = se;
    } else {
      ++tap;
      cs = w.cbeg;
    }
  }
};

// Pipelined main loop (tensor cores, 16-byte vector path, images of < 2^31 elements): the global
// loads of chunk i+1 (four corners per vector, weights tile) are in flight in registers while the
// MMA of chunk i runs from the other shared-memory buffer; one barrier per chunk. Bilinear tables
// are built one (tap, segment) group ahead into a double buffer, from offset/mask values that
// were loaded into registers a further group ahead, so no global latency sits on the critical
// path of a group change. Corner addresses are 32-bit offsets into the block's image.
template <typename T, typename Cfg, typename L, typename Mma>
__device__ __forceinline__ void fwd_main_pipelined(const Geo& g, Mma& mma, unsigned char* smem,
                                                   const T* __restrict__ x, const T* __restrict__ offset,
                                                   const T* __restrict__ mask, const T* __restrict__ kb,
                                                   int64_t img, int64_t th0, int64_t tw0, int64_t fg,
                                                   int64_t o0, int ocnt) {
  using A = Acc<T>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::kThreads, V = kVec<T>;
  constexpr int VPR = BK / V, RSTEP = NT / VPR, IT = BM / RSTEP;        // A: vectors per thread
  constexpr int BVPR = BN / V, BRSTEP = NT / BVPR;                      // B: vectors per thread
  constexpr int IB = BK / BRSTEP > 0 ? BK / BRSTEP : 1;
  static_assert(NT % VPR == 0 && BM % RSTEP == 0 && NT % BVPR == 0, "pipeline split");
  static_assert(BM <= NT, "one thread per pixel builds the bilinear tables");
  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  const int H = static_cast<int>(p.h), W = static_cast<int>(p.w), C = static_cast<int>(p.c_in);
  const T* __restrict__ xim = x + img * p.h * p.w * p.c_in;
  FRec<A>* recs = reinterpret_cast<FRec<A>*>(smem + L::kMain);  // (2, BM)
  auto As = [&](int b) { return reinterpret_cast<T*>(smem) + b * L::kABElems; };
  auto Bs = [&](int b) { return reinterpret_cast<T*>(smem) + b * L::kABElems + BM * L::LDA; };
  const int cv = (tid % VPR) * V, r0 = tid / VPR;
  const int bc = (tid % BVPR) * V, br0 = tid / BVPR;

  // This thread's pixel for the bilinear tables (threads >= BM only load tiles).
  const bool own = tid < BM;
  const int64_t my_ho = th0 + tid / g.tile_w, my_wo = tw0 + tid % g.tile_w;
  const bool my_valid = own && my_ho < p.h_out && my_wo < p.w_out;
  const int64_t my_pix = (img * p.h_out + my_ho) * p.w_out + my_wo;
  T pend_dy{}, pend_dx{}, pend_m{};  // raw offset/mask of the group after the next one

  const WalkBounds wb{static_cast<int>(fg * g.Cg), static_cast<int>((fg + 1) * g.Cg),
                      static_cast<int>(g.Cpog), static_cast<int>(g.K), BK};
  auto load_raw = [&](const GroupPos& gp) {
    if (!my_valid) return;
    const int64_t og = gp.cs / g.Cpog, k = og * g.K + gp.tap;
    const T* o = offset + my_pix * (p.offset_groups * g.K * 2) + 2 * k;
    pend_dy = o[0];
    pend_dx = o[1];
    if (p.with_mask) pend_m = mask[my_pix * (p.offset_groups * g.K) + k];
  };
  auto build_from_pending = [&](const GroupPos& gp, int buf) {
    if (!own) return;
    FRec<A> r{-4, -4, A(0), A(0), A(0)};
    if (my_valid) {
      const int64_t i = gp.tap / p.kw, j = gp.tap - i * p.kw;
      const A yy = A(p.base_y(my_ho, i)) + to_acc<A>(pend_dy);
      const A xx = A(p.base_x(my_wo, j)) + to_acc<A>(pend_dx);
      const Bilinear<A> b = make_bilinear<A>(yy, xx, p.h, p.w);
      if (b.inside) {
        r.y0 = static_cast<int>(b.y0);
        r.x0 = static_cast<int>(b.x0);
        r.ly = b.ly;
        r.lx = b.lx;
        r.m = p.with_mask ? to_acc<A>(pend_m) : A(1);
      }
    }
    recs[buf * BM + tid] = r;
  };

  uint4 cr[IT][4];
  A w[IT][4];
  uint4 br[IB];

  auto prefetch = [&](const ChunkWalk& ch) {
    const FRec<A>* rb = recs + (ch.group & 1) * BM;
    const int cofs = ch.c0 + cv;
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const FRec<A> q = rb[r0 + i * RSTEP];
      const bool ok = cv < ch.cnt && q.y0 > -4;
      const A hy = A(1) - q.ly, hx = A(1) - q.lx;
      const A wt[4] = {hy * hx * q.m, hy * q.lx * q.m, q.ly * hx * q.m, q.ly * q.lx * q.m};
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int yy = q.y0 + (k >> 1), xx = q.x0 + (k & 1);
        const bool in = ok && static_cast<unsigned>(yy) < static_cast<unsigned>(H) &&
                        static_cast<unsigned>(xx) < static_cast<unsigned>(W);
        w[i][k] = in ? wt[k] : A(0);
        cr[i][k] = in ? __ldg(reinterpret_cast<const uint4*>(xim + ((yy * W + xx) * C + cofs)))
                      : make_uint4(0, 0, 0, 0);
      }
    }
    const T* krow = kb + (ch.tap * g.Cg + (ch.c0 - wb.cbeg)) * p.c_out + o0;
#pragma unroll
    for (int j = 0; j < IB; ++j) {
      const int r = br0 + j * BRSTEP;
      br[j] = (r < ch.cnt && r < BK && bc < ocnt)
                  ? __ldg(reinterpret_cast<const uint4*>(krow + r * p.c_out + bc))
                  : make_uint4(0, 0, 0, 0);
    }
  };
  auto store = [&](int buf) {
    T* as = As(buf);
    T* bs = Bs(buf);
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      A acc[V];
#pragma unroll
      for (int e = 0; e < V; ++e) acc[e] = A(0);
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const T* e4 = reinterpret_cast<const T*>(&cr[i][k]);
#pragma unroll
        for (int e = 0; e < V; ++e) acc[e] += w[i][k] * to_acc<A>(e4[e]);
      }
      store_elems<T, A, V>(as + (r0 + i * RSTEP) * L::LDA + cv, acc);
    }
#pragma unroll
    for (int j = 0; j < IB; ++j) {
      const int r = br0 + j * BRSTEP;
      if (r < BK) *reinterpret_cast<uint4*>(bs + r * L::LDB + bc) = br[j];
    }
  };

  ChunkWalk cur;
  cur.init(wb);
  if (!cur.valid(wb)) return;
  GroupPos gp{0, wb.cbeg};  // the group whose raw offsets are (to be) in pend_*
  load_raw(gp);
  build_from_pending(gp, 0);
  gp.advance(wb);
  if (gp.tap < wb.K) load_raw(gp);
  __syncthreads();
  prefetch(cur);
  ChunkWalk nxt = cur;
  nxt.next(wb);
  int buf = 0;
  while (true) {
    if (cur.is_first && gp.tap < wb.K) {
      // Group cur.group starts: the tables of the next group from registers, then the raw
      // offsets of the one after it.
      build_from_pending(gp, (cur.group + 1) & 1);
      gp.advance(wb);
      if (gp.tap < wb.K) load_raw(gp);
    }
    store(buf);
    __syncthreads();
    const bool more = nxt.valid(wb);
    if (more) prefetch(nxt);
    mma.compute(As(buf), L::LDA, Bs(buf), L::LDB, tid);
    if (!more) break;
    cur = nxt;
    nxt.next(wb);
    buf ^= 1;
  }
  __syncthreads();  // the accumulator tile aliases the A/B buffers
}

// PIPE: the pipelined main loop (tensor cores, vector path); a separate instantiation so the
// simple loop's registers do not count against it.
template <typename T, bool TC, bool PIPE, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    deform_fwd_kernel(const Geo g, const T* __restrict__ x, const T* __restrict__ offset,
                      const T* __restrict__ mask, const T* __restrict__ kernel, T* __restrict__ y) {
  using A = Acc<T>;
  using L = FwdLayout<T, TC, Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);                         // (BM, BK)
  T* Bs = As + BM * L::LDA;                                   // (BK, BN)
  A* Cs = reinterpret_cast<A*>(smem);                         // (BM, BN) after the main loop
  Rec<A>* recs = reinterpret_cast<Rec<A>*>(smem + L::kMain);  // (BM)

  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  const int64_t tile = blockIdx.x % g.tiles_img, img = blockIdx.x / g.tiles_img;  // img over batch*n
  const int64_t b = img / p.n;
  const int64_t th0 = (tile / g.tiles_w) * g.tile_h, tw0 = (tile % g.tiles_w) * g.tile_w;
  const int64_t nblk = (g.Cog + BN - 1) / BN;
  const int64_t fg = blockIdx.y / nblk, ob = blockIdx.y % nblk;
  const int64_t o0 = fg * g.Cog + ob * BN;
  const int ocnt = static_cast<int>(g.Cog - ob * BN < BN ? g.Cog - ob * BN : BN);
  const T* kb = kernel + b * p.kernel_size();
  const int64_t cbeg = fg * g.Cg, cend = cbeg + g.Cg;

  MmaTile<T, TC, BM, BN, BK, Cfg::WM, Cfg::WN, false, false> mma;
  mma.zero();

  if constexpr (PIPE) {
    fwd_main_pipelined<T, Cfg, L>(g, mma, smem, x, offset, mask, kb, img, th0, tw0, fg, o0, ocnt);
  } else {
    for (int tap = 0; tap < g.K; ++tap) {
      for (int64_t cs = cbeg; cs < cend;) {
        const int64_t og = cs / g.Cpog;
        const int64_t se = (og + 1) * g.Cpog < cend ? (og + 1) * g.Cpog : cend;
        for (int r = tid; r < BM; r += NT) {
          const int64_t ho = th0 + r / g.tile_w, wo = tw0 + r % g.tile_w;
          const bool valid = ho < p.h_out && wo < p.w_out;
          const int64_t pix = (img * p.h_out + ho) * p.w_out + wo;
          recs[r] = make_rec<T, A>(g, offset, mask, valid, pix, img, ho, wo, tap, og);
        }
        __syncthreads();
        for (int64_t c0 = cs; c0 < se; c0 += BK) {
          const int cnt = static_cast<int>(se - c0 < BK ? se - c0 : BK);
          load_samples<T, BM, BK, NT>(As, L::LDA, recs, x, g, c0, cnt, tid);
          const T* krow = kb + (tap * g.Cg + (c0 - cbeg)) * p.c_out + o0;
          load_rows<T, BK, BN, NT>(Bs, L::LDB,
                                   [&](int r) -> const T* { return r < cnt ? krow + r * p.c_out : nullptr; },
                                   ocnt, g.vec, tid);
          __syncthreads();
          mma.compute(As, L::LDA, Bs, L::LDB, tid);
          __syncthreads();
        }
        cs = se;
      }
    }
  }

  mma.store(Cs, L::LDC, tid);
  __syncthreads();
  constexpr int V = kVec<T>;
  if (g.vec) {
    for (int idx = tid; idx < BM * (BN / V); idx += NT) {
      const int r = idx / (BN / V), c = (idx % (BN / V)) * V;
      const int64_t ho = th0 + r / g.tile_w, wo = tw0 + r % g.tile_w;
      if (ho >= p.h_out || wo >= p.w_out || c >= ocnt) continue;
      A v[V];
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = Cs[r * L::LDC + c + e];
      store_elems<T, A, V>(y + ((img * p.h_out + ho) * p.w_out + wo) * p.c_out + o0 + c, v);
    }
  } else {
    for (int idx = tid; idx < BM * BN; idx += NT) {
      const int r = idx / BN, c = idx % BN;
      const int64_t ho = th0 + r / g.tile_w, wo = tw0 + r % g.tile_w;
      if (ho >= p.h_out || wo >= p.w_out || c >= ocnt) continue;
      y[((img * p.h_out + ho) * p.w_out + wo) * p.c_out + o0 + c] = from_acc<T>(Cs[r * L::LDC + c]);
    }
  }
}

template <typename T, bool TC, typename Cfg>
cudaError_t launch_forward(cudaStream_t stream, const Geo& g, const T* x, const T* offset,
                           const T* mask, const T* kernel, T* y) {
  using L = FwdLayout<T, TC, Cfg>;
  const ConvParams& p = g.p;
  const int64_t gx = p.batch * p.n * g.tiles_img;
  const int64_t gy = p.feature_groups * ((g.Cog + Cfg::BN - 1) / Cfg::BN);
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidConfiguration;
  auto fn = TC && g.vec && g.pipeline ? deform_fwd_kernel<T, TC, TC, Cfg> : deform_fwd_kernel<T, TC, false, Cfg>;
  if (L::kBytes > 48 * 1024) {
    const cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                               static_cast<int>(L::kBytes));
    if (e != cudaSuccess) return e;
  }
  fn<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), Cfg::kThreads, L::kBytes, stream>>>(
      g, x, offset, mask, kernel, y);
  return cudaGetLastError();
}

}  // namespace kern
}  // namespace deft
