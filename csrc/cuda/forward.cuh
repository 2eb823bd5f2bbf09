// Forward kernel: implicit GEMM y[pixels x C_out] = cols[pixels x (tap, C_in)] * W, where the
// columns are never stored: the A-tile loader samples x bilinearly (4 corners, 16-byte vectors
// along C) straight into shared memory in the MMA input type.
#pragma once

#include "cuda/common.cuh"

namespace deft {
namespace kern {

// One block: BM output pixels (a tile_h x tile_w spatial tile of one image) x BN output channels
// of one feature group; the reduction runs over (tap, chunk of BK input channels). MINB: blocks
// per SM the register allocation must allow (__launch_bounds__): the loop is latency-bound, so
// warps per SM matter more than registers per thread (docs/kernels.md).
template <int BM_, int BN_, int BK_, int WM_, int WN_, int MINB_>
struct FwdCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, kThreads = WM * WN * 32;
  static constexpr int kMinBlocks = MINB_;
};

template <typename T, bool TC, typename Cfg>
struct FwdLayout {
  using A = Acc<T>;
  static constexpr int LDA = Cfg::BK + kPad<T>;  // As[BM][LDA]: pixels x channels
  static constexpr int LDB = Cfg::BN + kPadK<T>;  // Bs[BK][LDB]: channels x output channels (k-major)
  static constexpr int LDC = Cfg::BN + kCPad;    // Cs[BM][LDC]: accumulators (aliases As/Bs)
  static constexpr int kBufs = TC ? 2 : 1;       // double-buffered A/B tiles on the pipelined path
  static constexpr size_t kABElems = size_t(Cfg::BM) * LDA + size_t(Cfg::BK) * LDB;
  static constexpr size_t kAB = align_up(kBufs * kABElems * sizeof(T), 128);
  static constexpr size_t kC = align_up(size_t(Cfg::BM) * LDC * sizeof(A), 128);
  static constexpr size_t kMain = kAB > kC ? kAB : kC;
  // Records: two buffers of BM 32-bit ones (pipelined) or BM 64-bit ones (simple loop).
  using Rec32 = Samp<A, int32_t>;
  static_assert(2 * sizeof(Rec32) >= sizeof(Samp<A>), "record space");
  static constexpr size_t kBytes = kMain + 2 * size_t(Cfg::BM) * sizeof(Rec32);
};

// Walks the reduction of one block: taps, then the offset-group segments of the feature group's
// channels, then chunks of BK channels; `group` counts (tap, segment) pairs (one bilinear table
// each). 32-bit: channel counts and tap counts fit in int.
struct ChunkWalk {
  int tap, c0, se, og, cnt, group;
  int cbeg, cend, Cpog, K, bk;
  bool is_first;  // the chunk opens a new (tap, segment) group
  __device__ __forceinline__ void init(const Geo& g, int fg, int bk_) {
    cbeg = fg * static_cast<int>(g.Cg), cend = cbeg + static_cast<int>(g.Cg);
    Cpog = static_cast<int>(g.Cpog), K = static_cast<int>(g.K), bk = bk_;
    tap = 0, group = 0, is_first = true;
    start_segment(cbeg);
  }
  __device__ __forceinline__ void start_segment(int cs) {
    c0 = cs;
    og = cs / Cpog;
    se = (og + 1) * Cpog < cend ? (og + 1) * Cpog : cend;
    cnt = se - c0 < bk ? se - c0 : bk;
  }
  __device__ __forceinline__ bool valid() const { return tap < K && cbeg < cend; }
  // Chunks of the whole walk (K taps x the chunks of every segment).
  __device__ __forceinline__ int count() const {
    int per_tap = 0;
    for (int c = cbeg; c < cend;) {
      const int o = c / Cpog, e = (o + 1) * Cpog < cend ? (o + 1) * Cpog : cend;
      per_tap += (e - c + bk - 1) / bk;
      c = e;
    }
    return K * per_tap;
  }
  // (tap, first channel) of the group after the current one; false past the end.
  __device__ __forceinline__ bool next_group(int* ntap, int* ncs) const {
    if (se < cend) {
      *ntap = tap, *ncs = se;
    } else {
      *ntap = tap + 1, *ncs = cbeg;
    }
    return *ntap < K;
  }
  __device__ __forceinline__ void next() {
    is_first = false;
    if (c0 + bk < se) {
      c0 += bk;
      cnt = se - c0 < bk ? se - c0 : bk;
      return;
    }
    ++group;
    is_first = true;
    if (se < cend) {
      start_segment(se);
    } else {
      ++tap;
      start_segment(cbeg);
    }
  }
};

// The output pixels of one streaming-forward block. A tile_h x tile_w rectangle of one image, or
// (Geo::flat) tile_w consecutive pixels of one problem in (n, h_out, w_out) order, across rows and
// images: small images then waste no MMA rows on a tile overhanging them (a 14 x 14 image in 8 x 16
// tiles is 23% padding), and fewer blocks carry the same work (S4: 128 -> 98; 2-3% faster per
// kernel, docs/kernels.md).
struct PixTile {
  int64_t base;      // 2D: the tile's image over batch*n; flat: the linear index of its row 0
  int64_t th0, tw0;  // 2D: the tile's origin; flat: th0 = row 0's pixel within the problem
  int64_t b;         // the problem of the batch (its kernel)
  __device__ __forceinline__ static PixTile of_block(const Geo& g, int64_t blk) {
    PixTile t;
    const int64_t tile = blk % g.tiles_img, outer = blk / g.tiles_img;
    if (g.flat) {
      t.b = outer, t.th0 = tile * g.tile_w, t.tw0 = 0, t.base = outer * g.pixels + t.th0;
    } else {
      t.base = outer, t.b = outer / g.p.n;
      t.th0 = (tile / g.tiles_w) * g.tile_h, t.tw0 = (tile % g.tiles_w) * g.tile_w;
    }
    return t;
  }
  // Row r of the A tile: its linear index over (batch*n, h_out, w_out), or -1 past the image
  // (2D) or the problem (flat); with its image and position.
  __device__ __forceinline__ int64_t pixel(const Geo& g, int r, int64_t* img, int64_t* ho, int64_t* wo) const {
    const ConvParams& p = g.p;
    if (g.flat) {
      const int64_t lin = base + r, hw = p.h_out * p.w_out;
      *img = lin / hw;
      const int64_t rem = lin - *img * hw;
      *ho = rem / p.w_out, *wo = rem - *ho * p.w_out;
      return th0 + r < g.pixels ? lin : -1;
    }
    *img = base;
    return rect_pixel(g, r, ho, wo);
  }
  // Row r of a 2D tile (not flat; the split forward's tiles are always 2D).
  __device__ __forceinline__ int64_t rect_pixel(const Geo& g, int r, int64_t* ho, int64_t* wo) const {
    const int tw = static_cast<int>(g.tile_w);
    *ho = th0 + r / tw, *wo = tw0 + r % tw;
    if (*ho >= g.p.h_out || *wo >= g.p.w_out) return -1;
    return (base * g.p.h_out + *ho) * g.p.w_out + *wo;
  }
  // The same linear index alone (the epilogue: no division on the flat path).
  __device__ __forceinline__ int64_t out_pixel(const Geo& g, int r) const {
    if (g.flat) return th0 + r < g.pixels ? base + r : -1;
    int64_t ho, wo;
    return rect_pixel(g, r, &ho, &wo);
  }
};

// The block's output tile from the accumulator tile Cs (BM x BN, row stride LDC) into y.
template <typename T, int BM, int BN, int NT, int LDC>
__device__ __forceinline__ void fwd_epilogue(const Geo& g, const PixTile& pt, const Acc<T>* Cs, T* __restrict__ y,
                                             int64_t o0, int ocnt, int tid) {
  using A = Acc<T>;
  const ConvParams& p = g.p;
  constexpr int V = kVec<T>;
  if (g.vec) {
    for (int idx = tid; idx < BM * (BN / V); idx += NT) {
      const int r = idx / (BN / V), c = (idx % (BN / V)) * V;
      const int64_t pix = pt.out_pixel(g, r);
      if (pix < 0 || c >= ocnt) continue;
      A v[V];
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = Cs[r * LDC + c + e];
      store_elems<T, A, V>(y + pix * p.c_out + o0 + c, v);
    }
  } else {
    for (int idx = tid; idx < BM * BN; idx += NT) {
      const int r = idx / BN, c = idx % BN;
      const int64_t pix = pt.out_pixel(g, r);
      if (pix < 0 || c >= ocnt) continue;
      y[pix * p.c_out + o0 + c] = from_acc<T>(Cs[r * LDC + c]);
    }
  }
}

// Pipelined main loop (tensor cores, 16-byte vector path): the global loads of chunk i+1 (four
// corners per vector, weights tile) are in flight in registers while the MMA of chunk i runs from
// the other shared-memory buffer; one barrier per chunk. Bilinear tables (Samp: corner offsets
// and weights, so the loader only adds the chunk's channel) are built one (tap, segment) group
// ahead into a double buffer.
template <typename T, typename Cfg, typename L, typename Mma>
__device__ __forceinline__ void fwd_main_pipelined(const Geo& g, Mma& mma, unsigned char* smem,
                                                   const T* __restrict__ x, const T* __restrict__ offset,
                                                   const T* __restrict__ mask, const T* __restrict__ kb,
                                                   const PixTile& pt, int fg,
                                                   int64_t o0, int ocnt) {
  using A = Acc<T>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, NT = Cfg::kThreads, V = kVec<T>;
  constexpr int VPR = BK / V, RSTEP = NT / VPR, IT = BM / RSTEP;        // A: vectors per thread
  constexpr int BVPR = BN / V, BRSTEP = NT / BVPR, IB = BK / BRSTEP;    // B: vectors per thread
  static_assert(NT % VPR == 0 && BM % RSTEP == 0 && NT % BVPR == 0 && BK % BRSTEP == 0, "pipeline split");
  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  using Rec = Samp<A, int32_t>;  // Geo::x32 (the launcher checks it for this loop)
  Rec* recs = reinterpret_cast<Rec*>(smem + L::kMain);  // (2, BM)
  auto As = [&](int b) { return reinterpret_cast<T*>(smem) + b * L::kABElems; };
  auto Bs = [&](int b) { return reinterpret_cast<T*>(smem) + b * L::kABElems + BM * L::LDA; };
  const int cv = (tid % VPR) * V, r0 = tid / VPR;
  const int bc = (tid % BVPR) * V, br0 = tid / BVPR;
  // The output pixel whose bilinear records this thread builds (one per thread, BM <= NT).
  static_assert(BM <= NT, "one record per thread");
  int64_t my_img = 0, my_ho = 0, my_wo = 0;
  const int64_t my_pix = tid < BM ? pt.pixel(g, tid, &my_img, &my_ho, &my_wo) : -1;
  const int64_t ldo = p.c_out;
  // This thread's weight rows: the walk consumes the (tap, channel) rows of the kernel in order,
  // cnt per chunk, so one pointer advanced per prefetch replaces the per-chunk 64-bit row products
  // (~40 of the loop's ~460 instructions per warp and chunk at S4 fp32; docs/kernels.md).
  const bool bok = bc < ocnt;
  const T* wp = kb + o0 + bc + static_cast<int64_t>(br0) * ldo;
  const int64_t wstep = static_cast<int64_t>(BRSTEP) * ldo;

  uint4 cr[IT][4];
  uint4 br[IB];

  auto build_recs = [&](int tap, int og, int buf) {
    if (tid < BM)
      recs[buf * BM + tid] = make_samp<T, A, int32_t>(g, offset, mask, my_pix >= 0, my_pix, my_img, my_ho, my_wo, tap, og);
  };
  auto prefetch = [&](const ChunkWalk& ch) {
    const Rec* rb = recs + (ch.group & 1) * BM;
    const bool cok = cv < ch.cnt;
    const T* xc = x + (ch.c0 + cv);
#pragma unroll
    for (int i = 0; i < IT; ++i) fetch_corners<T, A>(cr[i], xc, rb[r0 + i * RSTEP], cok);
#pragma unroll
    for (int j = 0; j < IB; ++j) {
      const int r = br0 + j * BRSTEP;
      br[j] = (bok && r < ch.cnt) ? __ldg(reinterpret_cast<const uint4*>(wp + j * wstep)) : make_uint4(0, 0, 0, 0);
    }
    wp += ch.cnt * ldo;  // rows tap * Cg + (c0 - cbeg) + cnt on: the next chunk's
  };
  // Blend the prefetched corners of `ch` (weights re-read from its table, which stays intact
  // until the barrier after this store) into A tile `buf`, and stage the weights rows.
  auto store = [&](const ChunkWalk& ch, int buf) {
    const Rec* rb = recs + (ch.group & 1) * BM;
    T* as = As(buf);
    T* bs = Bs(buf);
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int r = r0 + i * RSTEP;
      blend_store<T, A>(as + r * L::LDA + cv, cr[i], rb[r]);
    }
#pragma unroll
    for (int j = 0; j < IB; ++j) *reinterpret_cast<uint4*>(bs + (br0 + j * BRSTEP) * L::LDB + bc) = br[j];
  };

  ChunkWalk cur;
  cur.init(g, fg, BK);
  if (!cur.valid()) return;
  build_recs(cur.tap, cur.og, 0);
  __syncthreads();
  prefetch(cur);
  ChunkWalk nxt = cur;
  nxt.next();
  int buf = 0;
  while (true) {
    if (cur.is_first) {
      int ntap, ncs;
      if (cur.next_group(&ntap, &ncs)) build_recs(ntap, ncs / cur.Cpog, (cur.group + 1) & 1);
    }
    store(cur, buf);
    __syncthreads();
    const bool more = nxt.valid();
    if (more) prefetch(nxt);
    mma.compute(As(buf), L::LDA, Bs(buf), L::LDB, tid);
    if (!more) break;
    cur = nxt;
    nxt.next();
    buf ^= 1;
  }
  __syncthreads();  // the accumulator tile aliases the A/B buffers
}

// PIPE: the pipelined loop (tensor cores, 16-byte vectors, stages=2) is its own instantiation so
// the simple loop's registers do not count against it.
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
  Samp<A>* recs = reinterpret_cast<Samp<A>*>(smem + L::kMain);  // (BM)

  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  const PixTile pt = PixTile::of_block(g, blockIdx.x);
  const int64_t b = pt.b;
  const int64_t nblk = (g.Cog + BN - 1) / BN;
  const int fg = static_cast<int>(blockIdx.y / nblk);
  const int64_t ob = blockIdx.y % nblk;
  const int64_t o0 = fg * g.Cog + ob * BN;
  const int ocnt = static_cast<int>(g.Cog - ob * BN < BN ? g.Cog - ob * BN : BN);
  const T* kb = kernel + b * p.kernel_size();
  const int64_t cbeg = fg * g.Cg, cend = cbeg + g.Cg;

  MmaTile<T, TC, BM, BN, BK, Cfg::WM, Cfg::WN, false, false> mma;
  mma.zero();

  if constexpr (PIPE) {
    fwd_main_pipelined<T, Cfg, L>(g, mma, smem, x, offset, mask, kb, pt, fg, o0, ocnt);
  } else {
    for (int tap = 0; tap < g.K; ++tap) {
      for (int64_t cs = cbeg; cs < cend;) {
        const int64_t og = cs / g.Cpog;
        const int64_t se = (og + 1) * g.Cpog < cend ? (og + 1) * g.Cpog : cend;
        for (int r = tid; r < BM; r += NT) {
          int64_t im, ho, wo;
          const int64_t pix = pt.pixel(g, r, &im, &ho, &wo);
          recs[r] = make_samp<T, A>(g, offset, mask, pix >= 0, pix, im, ho, wo, tap, og);
        }
        __syncthreads();
        for (int64_t c0 = cs; c0 < se; c0 += BK) {
          const int cnt = static_cast<int>(se - c0 < BK ? se - c0 : BK);
          load_samples<T, BM, BK, NT>(As, L::LDA, recs, x, g.vec, c0, cnt, tid);
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
  fwd_epilogue<T, BM, BN, NT, L::LDC>(g, pt, Cs, y, o0, ocnt, tid);
}

// ---------------------------------------------------------------------------------------------
// Split forward (tile_k > 32): one block = BM pixels x one tap x one segment of `ks` input
// channels (inside one offset group). The segment's sampled A tile stays in shared memory while
// the block walks every BN block of the output channels, so x is sampled once per (pixel, tap,
// channel) instead of once per output-channel block (8x at S5's 512 channels); the partial sums
// over (tap, segment) meet in fp32 atomics: y itself for fp32, a workspace for 16-bit types.
// Pays where output channels are many and pixels few (docs/kernels.md).
struct SplitCfg {
  static constexpr int BM = 64, BN = 64, BK = 32, WM = 2, WN = 2, kThreads = 128;
  // Weight tiles double-buffered by cp.async. 4 stages measured no faster for bf16 (S5 152 -> 149
  // us) and slower for fp32 (264 -> 314: 89 KiB of shared memory leaves 2 blocks per SM, not 3):
  // the loop is not waiting on its weight loads (docs/kernels.md).
  static constexpr int kStages = 2;
  static constexpr int kMinBlocks = 3;  // registers for 12 warps per SM (shared memory decides the rest)
};

template <typename T>
struct SplitLayout {
  using A = Acc<T>;
  using C = SplitCfg;
  static constexpr int LDB = C::BN + kPadK<T>;  // Bs[stage][BK][LDB]: weight rows (k-major)
  static constexpr int LDC = C::BN + kCPad;    // Cs[BM][LDC]: one output block's partial sums
  static constexpr size_t kB = align_up(size_t(C::kStages) * C::BK * LDB * sizeof(T), 128);
  static constexpr size_t kC = align_up(size_t(C::BM) * LDC * sizeof(A), 128);
  __host__ __device__ static constexpr int lda(int ks) { return ks + kPad<T>; }  // As[BM][lda]
  __host__ __device__ static constexpr size_t a_bytes(int ks) { return align_up(size_t(C::BM) * lda(ks) * sizeof(T), 128); }
  __host__ __device__ static constexpr size_t bytes(int ks) {
    return a_bytes(ks) + kB + kC + C::BM * (sizeof(Samp<A>) + sizeof(int64_t));  // + recs, row pixels
  }
};

template <typename T, bool TC>
__global__ void __launch_bounds__(SplitCfg::kThreads, SplitCfg::kMinBlocks)
    deform_fwd_split_kernel(const Geo g, int ks, int64_t maxq, const T* __restrict__ x,
                            const T* __restrict__ offset, const T* __restrict__ mask,
                            const T* __restrict__ kernel, Atom<T>* yacc) {
  using A = Acc<T>;
  using C = SplitCfg;
  using L = SplitLayout<T>;
  constexpr int BM = C::BM, BN = C::BN, BK = C::BK, NT = C::kThreads, S = C::kStages, V = kVec<T>;
  extern __shared__ __align__(128) unsigned char smem[];
  const int lda = L::lda(ks);
  T* As = reinterpret_cast<T*>(smem);  // (BM, ks): the sampled segment
  auto Bs = [&](int st) { return reinterpret_cast<T*>(smem + L::a_bytes(ks)) + st * BK * L::LDB; };
  A* Cs = reinterpret_cast<A*>(smem + L::a_bytes(ks) + L::kB);
  Samp<A>* recs = reinterpret_cast<Samp<A>*>(smem + L::a_bytes(ks) + L::kB + L::kC);
  int64_t* rowpix = reinterpret_cast<int64_t*>(recs + BM);  // output pixel of A row r, -1 past the image

  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  TileTapChunk w;
  if (!tile_tap_chunk<false>(g, maxq, ks, &w)) return;
  const int64_t img = w.img, th0 = w.th0, tw0 = w.tw0, tap = w.tap, fg = w.fg, c0 = w.c0, og = w.og;
  const int cnt = w.cnt;
  const T* kb = kernel + w.b * p.kernel_size();
  const int64_t krow0 = tap * g.Cg + (c0 - fg * g.Cg);  // the segment's first weight row

  if (tid < BM) {
    const PixTile pt{img, th0, tw0, w.b};
    int64_t ho, wo;
    const int64_t pix = pt.rect_pixel(g, tid, &ho, &wo);
    recs[tid] = make_samp<T, A>(g, offset, mask, pix >= 0, pix, img, ho, wo, static_cast<int>(tap), og);
    rowpix[tid] = pix;
  }
  __syncthreads();
  {  // Sample the segment once (zeros past cnt); U vectors' corners in flight per thread.
    constexpr int U = 4;
    const int vpr = ks / V;
    const T* xc = x + c0;
    for (int base = tid; base < BM * vpr; base += NT * U) {
      uint4 cr[U][4];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = base + u * NT, r = idx / vpr, c = (idx - r * vpr) * V;
        if (idx < BM * vpr) fetch_corners<T, A>(cr[u], xc + c, recs[r], c < cnt);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int idx = base + u * NT, r = idx / vpr, c = (idx - r * vpr) * V;
        if (idx < BM * vpr) blend_store<T, A>(As + r * lda + c, cr[u], recs[r]);
      }
    }
  }

  // Every output block of the feature group against the resident segment: (ob, k chunk) steps,
  // weight tiles by cp.async S - 1 steps ahead, one barrier per step (it also publishes As).
  // No divisions in the loop: the issue cursor and the compute cursor advance incrementally, and
  // each thread's copy slots (row, column of the weight tile) are fixed (the profile showed ~400
  // instructions per step, mostly index arithmetic, before this).
  constexpr int BVPR = BN / V, BSLOTS = BK * BVPR / NT;
  static_assert(BSLOTS * NT == BK * BVPR, "weight tile copy slots");
  const int nob = static_cast<int>((g.Cog + BN - 1) / BN), nk = (cnt + BK - 1) / BK;
  int slot_r[BSLOTS], slot_c[BSLOTS];
#pragma unroll
  for (int j = 0; j < BSLOTS; ++j) slot_r[j] = (tid + j * NT) / BVPR, slot_c[j] = ((tid + j * NT) % BVPR) * V;
  const T* kseg = kb + krow0 * p.c_out + fg * g.Cog;  // weight row 0 of the segment, group's column 0
  int iss_ob = 0, iss_k0 = 0, iss_stage = 0;
  auto issue = [&]() {  // the next weight tile (an empty group past the end keeps the counts even)
    if (iss_ob < nob) {
      const int kcnt = cnt - iss_k0, ocnt = static_cast<int>(g.Cog) - iss_ob * BN;
      const T* src = kseg + int64_t(iss_k0) * p.c_out + iss_ob * BN;
      T* dst = Bs(iss_stage);
#pragma unroll
      for (int j = 0; j < BSLOTS; ++j) {
        const bool ok = slot_r[j] < kcnt && slot_c[j] < ocnt;
        cp_async16(dst + slot_r[j] * L::LDB + slot_c[j], ok ? src + int64_t(slot_r[j]) * p.c_out + slot_c[j] : kb, ok);
      }
      iss_k0 += BK;
      if (iss_k0 >= cnt) iss_k0 = 0, ++iss_ob;
      iss_stage = iss_stage + 1 == S ? 0 : iss_stage + 1;
    }
    cp_async_commit();
  };
  MmaTile<T, TC, BM, BN, BK, C::WM, C::WN, false, false> mma;
  mma.zero();
#pragma unroll
  for (int i = 0; i < S - 1; ++i) issue();
  int ob = 0, kc = 0, stage = 0;
  while (ob < nob) {
    cp_async_wait<S - 2>();
    __syncthreads();
    issue();
    mma.compute(As + kc * BK, lda, Bs(stage), L::LDB, tid);
    stage = stage + 1 == S ? 0 : stage + 1;
    if (++kc < nk) continue;
    // Output block done: its partial sums into y (the next write of Cs is a barrier away).
    mma.store(Cs, L::LDC, tid);
    __syncthreads();
    const int64_t o0 = fg * g.Cog + int64_t(ob) * BN;
    const int ocnt = static_cast<int>(g.Cog) - ob * BN;
    constexpr int AV = 16 / static_cast<int>(sizeof(Atom<T>));
    for (int idx = tid; idx < BM * (BN / AV); idx += NT) {
      const int r = idx / (BN / AV), c = (idx % (BN / AV)) * AV;
      const int64_t pix = rowpix[r];
      if (pix < 0 || c >= ocnt) continue;
      Atom<T> v[AV];
#pragma unroll
      for (int e = 0; e < AV; ++e) v[e] = static_cast<Atom<T>>(Cs[r * L::LDC + c + e]);
      atomic_add_n<AV>(yacc + pix * p.c_out + o0 + c, v);
    }
    mma.zero();
    kc = 0;
    ++ob;
  }
  cp_async_wait<0>();
}

template <typename T, bool TC>
cudaError_t launch_forward_split(cudaStream_t stream, const Geo& g, int ks, const T* x, const T* offset,
                                 const T* mask, const T* kernel, Atom<T>* yacc) {
  const ConvParams& p = g.p;
  const int64_t maxq = max_chunks(g, ks);
  const int64_t gx = p.batch * p.n * g.tiles_img, gy = p.feature_groups * g.K * maxq;
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidConfiguration;
  const size_t bytes = SplitLayout<T>::bytes(ks);
  auto fn = deform_fwd_split_kernel<T, TC>;
  if (const cudaError_t e = allow_smem(fn, bytes); e != cudaSuccess) return e;
  fn<<<dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy)), SplitCfg::kThreads, bytes, stream>>>(
      g, ks, maxq, x, offset, mask, kernel, yacc);
  return cudaGetLastError();
}

// Launch a pixel-tiled forward (the streaming kernel, the warp-specialized one) on its grid:
// x = pixel tiles (flat tiles: per problem; 2D: per image), y = (feature group, bn-wide block of
// output channels), z = the `cluster` blocks of one thread-block cluster that share a tile (1: no
// cluster; the k-split ring, forward_ws.cuh). Nothing to do for an empty problem.
template <typename F, typename... Args>
cudaError_t launch_tiled_forward(cudaStream_t stream, const Geo& g, F* fn, int64_t bn, int threads, size_t smem,
                                 int cluster, Args... args) {
  const ConvParams& p = g.p;
  const int64_t gx = (g.flat ? p.batch : p.batch * p.n) * g.tiles_img;
  const int64_t gy = p.feature_groups * ((g.Cog + bn - 1) / bn);
  if (gx == 0 || gy == 0) return cudaSuccess;
  if (gx > 0x7fffffffLL || gy > 65535) return cudaErrorInvalidConfiguration;
  if (const cudaError_t e = allow_smem(fn, smem); e != cudaSuccess) return e;
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy), static_cast<unsigned>(cluster));
  if (cluster == 1) {
    fn<<<grid, threads, smem, stream>>>(args...);
    return cudaGetLastError();
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = dim3(threads);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = 1;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = static_cast<unsigned>(cluster);
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  if (const cudaError_t e = cudaLaunchKernelEx(&cfg, fn, args...); e != cudaSuccess) return e;
  return cudaGetLastError();
}

template <typename T, bool TC, typename Cfg>
cudaError_t launch_forward(cudaStream_t stream, const Geo& g, const T* x, const T* offset,
                           const T* mask, const T* kernel, T* y) {
  auto fn = deform_fwd_kernel<T, TC, false, Cfg>;
  if constexpr (TC) {
    // The pipelined loop keeps 32-bit corner offsets: x with 2^31 or more elements takes the
    // simple loop (64-bit records).
    if (g.vec && g.pipeline && g.x32) fn = deform_fwd_kernel<T, TC, true, Cfg>;
  }
  return launch_tiled_forward(stream, g, fn, Cfg::BN, Cfg::kThreads, FwdLayout<T, TC, Cfg>::kBytes, 1, g, x,
                              offset, mask, kernel, y);
}

}  // namespace kern
}  // namespace deft
