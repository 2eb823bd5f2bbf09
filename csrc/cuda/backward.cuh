// Backward kernels.
//  (a) data pass: grad_col[pixels x (tap, C_in chunk)] = dY * W^T as an implicit GEMM on chip, then
//      each (pixel, channel) scatters its bilinear share into dX (atomics) and the channel sums
//      dmask = sum grad_col * sample, doffset = sum grad_col * mask * d sample / d(y, x) are reduced
//      in registers + warp shuffles (one atomic per pixel, tap and chunk).
//  (b) weight pass: dW[(tap, C_in) x C_out] = cols^T * dY as an implicit GEMM whose A loader
//      recomputes the samples, split over pixels; partial tiles meet in fp32 (fp64) atomics.
// Temporaries: fp32 accumulators of dx, doffset, dmask, dkernel for half types only.
// DET = true (deterministic mode, det.cuh): every contribution that goes into a float atomic below
// (and every term of the dx list sums) goes into 64-bit fixed-point accumulators instead; DET =
// false compiles the same code as before the flag existed.
#pragma once

#include "cuda/common.cuh"
#include "cuda/det.cuh"

namespace deft {
namespace kern {

// Data pass: BM pixels (spatial tile) x BC input channels of one tap, reduction over C_out/fg.
struct DataCfg {
  static constexpr int BM = 64, BC = 64, BK = 32, WM = 2, WN = 2, kThreads = 128;
};
// Weight pass: BC input channels x BN output channels of one tap, reduction over BK-pixel steps,
// WM x WN warps. Every block re-samples its (tap, channel chunk) for all pixels, once per BN
// output channels: the wide tile halves that at C_out >= 128 (tiling.py's bwd_tile_n picks it; the
// pipelined path only, the simple loop has the 64-wide tile).
template <int BC_, int BN_, int BK_, int WM_, int WN_>
struct WeightCfgT {
  static constexpr int BC = BC_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, kThreads = WM_ * WN_ * 32;
};
using WeightCfg = WeightCfgT<64, 64, 32, 2, 2>;
using WeightCfgWide = WeightCfgT<64, 128, 32, 2, 4>;

// Pipelined variants (tensor cores, 16-byte vector path): the data pass streams dY and W^T tiles
// through kDataStages shared-memory stages by cp.async; the weight pass double-buffers its tiles
// with the sampled corners prefetched in registers (as the forward) and dY rows by cp.async.
constexpr int kDataStages = 3;

template <typename T, int STAGES>
struct DataLayout {
  using A = Acc<T>;
  using C = DataCfg;
  static constexpr int LDA = C::BK + kPad<T>;  // As[BM][LDA]: dY rows
  static constexpr int LDB = C::BK + kPad<T>;  // Bs[BC][LDB]: W^T stored column-major (ci rows)
  static constexpr int LDC = C::BC + kCPad;    // Cs[BM][LDC]: grad_col
  static constexpr size_t kABElems = size_t(C::BM) * LDA + size_t(C::BC) * LDB;  // one stage
  static constexpr size_t kAB = align_up(STAGES * kABElems * sizeof(T), 128);
  static constexpr size_t kC = align_up(size_t(C::BM) * LDC * sizeof(A), 128);
  static constexpr size_t kMain = kAB > kC ? kAB : kC;
  static constexpr size_t kRecEnd = kMain + size_t(C::BM) * sizeof(Rec<A>);
  // dx merge tables (see the scatter): per (pixel, corner) entry its dx element offset, weight,
  // list link; a kWin x kWin window of list heads; the leader list and its count. They sit behind
  // the grad_col tile where the stages leave room (free once the GEMM is done), else at the end.
  static constexpr int kWin = 32, kEnt = 4 * C::BM;
  static constexpr size_t kMergeBytes = kEnt * (sizeof(int64_t) + sizeof(A) + 2 * sizeof(int)) +
                                        (kWin * kWin + 4) * sizeof(int);
  static constexpr size_t kMerge = kMain - kC >= kMergeBytes ? kC : align_up(kRecEnd, 128);
  static constexpr size_t kBytes = kMerge == kC ? kRecEnd : kMerge + kMergeBytes;
};

template <typename T, int BUFS, typename Cfg = WeightCfg>
struct WeightLayout {
  using A = Acc<T>;
  using C = Cfg;
  static constexpr int LDA = C::BC + kPadK<T>;  // As[BK pixels][LDA]: samples (column-major A)
  static constexpr int LDB = C::BN + kPadK<T>;  // Bs[BK pixels][LDB]: dY rows (k-major)
  static constexpr int LDC = C::BN + kCPad;    // Cs[BC][LDC]
  static constexpr size_t kABElems = size_t(C::BK) * LDA + size_t(C::BK) * LDB;  // one buffer
  static constexpr size_t kAB = align_up(BUFS * kABElems * sizeof(T), 128);
  static constexpr size_t kC = align_up(size_t(C::BC) * LDC * sizeof(A), 128);
  static constexpr size_t kMain = kAB > kC ? kAB : kC;
  // Records: 32-bit (Geo::x32) on the double-buffered pipelined loop, 64-bit on the simple one.
  using Rec = Samp<A, std::conditional_t<BUFS == 2, int32_t, int64_t>>;
  static constexpr size_t kBytes = kMain + BUFS * size_t(C::BK) * sizeof(Rec);
};

// Blocks per SM the pipelined data pass's registers must allow: 4 for fp32 (its stages' shared
// memory fits 4 x 57 KB exactly; at 131 registers it fell to 3, docs/kernels.md), 5 for 16-bit
// types (as before the merge, 93 registers). The simple loop and float64 are left to the compiler.
template <typename T, bool PIPE>
constexpr int kDataMinBlocks = !PIPE || sizeof(T) == 8 ? 1 : sizeof(T) == 4 ? 4 : 5;

template <typename T, bool TC, bool PIPE, bool DET = false>
__global__ void __launch_bounds__(DataCfg::kThreads, kDataMinBlocks<T, PIPE>)
    deform_bwd_data_kernel(const Geo g, int64_t maxq, const T* __restrict__ x,
                           const T* __restrict__ offset, const T* __restrict__ mask,
                           const T* __restrict__ kernel, const T* __restrict__ dy, Atom<T>* dxa,
                           Atom<T>* doffa, Atom<T>* dmaska, const DetAcc det) {
  using A = Acc<T>;
  constexpr int S = PIPE ? kDataStages : 1;
  using L = DataLayout<T, S>;
  constexpr int BM = DataCfg::BM, BC = DataCfg::BC, BK = DataCfg::BK, NT = DataCfg::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);  // (BM, BK)
  T* Bs = As + BM * L::LDA;            // (BC, BK)
  A* Cs = reinterpret_cast<A*>(smem);  // (BM, BC)
  Rec<A>* recs = reinterpret_cast<Rec<A>*>(smem + L::kMain);

  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  TileTapChunk w;
  if (!tile_tap_chunk<true>(g, maxq, BC, &w)) return;
  const int64_t img = w.img, th0 = w.th0, tw0 = w.tw0, tap = w.tap, fg = w.fg, c0 = w.c0, og = w.og;
  const int cnt = w.cnt;
  const T* kb = kernel + w.b * (g.K * g.Cg * p.c_out);  // kernel_size() without its division
  const int64_t cbeg = fg * g.Cg;
  // Tile pixel r is (r >> tws, r & twm): 64-pixel tiles have power-of-two sides (the launcher
  // checks), so no division per row. The simple loop keeps the division: with the shift its
  // compiler-scheduled loads hold more registers (fp32 140 -> 172, 3 -> 2 blocks per SM).
  const int tws = __ffs(static_cast<int>(g.tile_w)) - 1, twm = static_cast<int>(g.tile_w) - 1;
  auto tile_row = [&](int r) { return PIPE ? int64_t(r >> tws) : r / g.tile_w; };
  auto tile_col = [&](int r) { return PIPE ? int64_t(r & twm) : r % g.tile_w; };

  auto build_recs = [&]() {
    for (int r = tid; r < BM; r += NT) {
      const int64_t ho = th0 + tile_row(r), wo = tw0 + tile_col(r);
      const bool valid = ho < p.h_out && wo < p.w_out;
      const int64_t pix = (img * p.h_out + ho) * p.w_out + wo;
      recs[r] = make_rec<T, A>(g, offset, mask, valid, pix, img, ho, wo, static_cast<int>(tap), og);
    }
  };
  // dY row of tile pixel r (nullptr past the image), W^T row of chunk channel r.
  auto dy_row = [&](int64_t ocol) {
    return [=, &g](int r) -> const T* {
      const int64_t ho = th0 + tile_row(r), wo = tw0 + tile_col(r);
      if (ho >= g.p.h_out || wo >= g.p.w_out) return nullptr;
      return dy + ((img * g.p.h_out + ho) * g.p.w_out + wo) * g.p.c_out + ocol;
    };
  };
  auto w_row = [&](int64_t ocol) {
    const T* krow = kb + (tap * g.Cg + (c0 - cbeg)) * p.c_out + ocol;
    return [=, &p](int r) -> const T* { return r < cnt ? krow + r * p.c_out : nullptr; };
  };

  MmaTile<T, TC, BM, BC, BK, DataCfg::WM, DataCfg::WN, false, true> mma;
  mma.zero();
  const int nk = static_cast<int>((g.Cog + BK - 1) / BK);
  if constexpr (PIPE) {
    auto As = [&](int st) { return reinterpret_cast<T*>(smem) + st * L::kABElems; };
    // This thread's copy slots (row, column) of the dY and W^T tiles are the same for every
    // chunk: their row pointers are resolved once, so a chunk costs one add per slot.
    constexpr int V = kVec<T>, VPR = BK / V, SLOTS = BM * VPR / NT;
    static_assert(SLOTS * NT == BM * VPR && BC == BM, "data pass copy slots");
    const T* arow[SLOTS];
    const T* brow[SLOTS];
    int soff_a[SLOTS], soff_b[SLOTS], scol[SLOTS];
    {
      const int64_t ocol0 = fg * g.Cog;
      auto a_of = dy_row(ocol0);
      auto b_of = w_row(ocol0);
#pragma unroll
      for (int j = 0; j < SLOTS; ++j) {
        const int idx = tid + j * NT, r = idx / VPR, c = (idx - r * VPR) * V;
        arow[j] = a_of(r);
        brow[j] = b_of(r);
        if (arow[j] != nullptr) arow[j] += c;
        if (brow[j] != nullptr) brow[j] += c;
        soff_a[j] = r * L::LDA + c;
        soff_b[j] = BM * L::LDA + r * L::LDB + c;
        scol[j] = c;
      }
    }
    auto issue = [&](int i) {  // chunk i of C_out into stage i % S (an empty group past the end)
      if (i < nk) {
        const int o = i * BK;
        const int ocnt = static_cast<int>(g.Cog - o < BK ? g.Cog - o : BK);
        T* as = As(i % S);
#pragma unroll
        for (int j = 0; j < SLOTS; ++j) {
          const bool oka = arow[j] != nullptr && scol[j] < ocnt, okb = brow[j] != nullptr && scol[j] < ocnt;
          cp_async16(as + soff_a[j], oka ? arow[j] + o : dy, oka);
          cp_async16(as + soff_b[j], okb ? brow[j] + o : dy, okb);
        }
      }
      cp_async_commit();
    };
#pragma unroll
    for (int i = 0; i < S - 1; ++i) issue(i);
    build_recs();  // its offset loads overlap the first copies
    for (int i = 0; i < nk; ++i) {
      cp_async_wait<S - 2>();  // chunk i has landed (this thread's copies) ...
      __syncthreads();         // ... everyone's, and stage (i - 1) % S is free again
      issue(i + S - 1);
      mma.compute(As(i % S), L::LDA, As(i % S) + BM * L::LDA, L::LDB, tid);
    }
    cp_async_wait<0>();
  } else {
    build_recs();
    for (int i = 0; i < nk; ++i) {
      const int64_t o = int64_t(i) * BK, ocol = fg * g.Cog + o;
      const int ocnt = static_cast<int>(g.Cog - o < BK ? g.Cog - o : BK);
      load_rows<T, BM, BK, NT>(As, L::LDA, dy_row(ocol), ocnt, g.vec, tid);
      load_rows<T, BC, BK, NT>(Bs, L::LDB, w_row(ocol), ocnt, g.vec, tid);
      __syncthreads();
      mma.compute(As, L::LDA, Bs, L::LDB, tid);
      __syncthreads();
    }
  }
  __syncthreads();  // the grad_col tile aliases the A/B stages
  mma.store(Cs, L::LDC, tid);

  // dx: the block's 4 * BM (pixel, corner) entries often share a position (2.07 per position at
  // offsets ~N(0, 2^2), more for smaller offsets; docs/kernels.md), and the global atomics
  // bound this pass. Entries inside a kWin^2 window around the tap's footprint are linked per
  // position (atomicExch on a list head in shared memory); each list is summed on chip and added
  // to dX with one atomic per channel vector. Each list and each entry outside the window gets one
  // leader at registration: the entry that found its position's head empty (leader code ENT + the
  // position: the scatter starts at the position's final head), or the lone entry itself.
  constexpr int WIN = L::kWin, ENT = L::kEnt;
  int64_t* ent_at = reinterpret_cast<int64_t*>(smem + L::kMerge);  // dx element offset, -1: none
  A* ent_w = reinterpret_cast<A*>(ent_at + ENT);                    // bilinear weight x mask
  int* ent_next = reinterpret_cast<int*>(ent_w + ENT);              // -1 end of list, -2 no list
  int* leaders = ent_next + ENT;
  int* head = leaders + ENT;  // (WIN, WIN)
  int* nleaders = head + WIN * WIN;
  for (int i = tid; i < WIN * WIN; i += NT) head[i] = -1;
  if (tid == 0) *nleaders = 0;
  const int ti = static_cast<int>(tap) / static_cast<int>(p.kw), tj = static_cast<int>(tap) - ti * static_cast<int>(p.kw);
  const int wy0 = static_cast<int>(p.base_y(th0, ti) + (g.tile_h - 1) * p.stride_h / 2) - (WIN / 2 - 1);
  const int wx0 = static_cast<int>(p.base_x(tw0, tj) + (g.tile_w - 1) * p.stride_w / 2) - (WIN / 2 - 1);
  __syncthreads();

  // Channel reductions per pixel (PARTS adjacent lanes share one) and the entries' registration.
  constexpr int PARTS = NT / BM;
  static_assert(PARTS * BM == NT && (PARTS & (PARTS - 1)) == 0 && PARTS <= 4, "parts per pixel");
  const int r = tid / PARTS, part = tid % PARTS;
  const Rec<A> rec = recs[r];
  A s_m = A(0), s_y = A(0), s_x = A(0);
  constexpr int KPL = 4 / PARTS;  // corners per lane: k = j * PARTS + part
  int lead[KPL];
#pragma unroll
  for (int j = 0; j < KPL; ++j) lead[j] = -1;
  if (rec.y0 >= -1) {  // a live sample (not kRecDead, not kRecNan)
    const int H = static_cast<int>(p.h), W = static_cast<int>(p.w);
    const A ly = rec.ly, lx = rec.lx, hy = A(1) - ly, hx = A(1) - lx;
    const A wt[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
    bool ok[4];
    int64_t at[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const int yy = rec.y0 + (k >> 1), xx = rec.x0 + (k & 1);
      ok[k] = static_cast<unsigned>(yy) < static_cast<unsigned>(H) &&
              static_cast<unsigned>(xx) < static_cast<unsigned>(W);
      at[k] = rec.xoff + (static_cast<int64_t>(yy) * W + xx) * p.c_in + c0;
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {  // corner k is this lane's when k % PARTS == part (static indices)
      if (k % PARTS != part) continue;
      const int e = 4 * r + k, wy = rec.y0 + (k >> 1) - wy0, wx = rec.x0 + (k & 1) - wx0;
      ent_at[e] = ok[k] ? at[k] : -1;
      ent_w[e] = wt[k] * rec.m;
      const bool in_win = static_cast<unsigned>(wy) < unsigned(WIN) && static_cast<unsigned>(wx) < unsigned(WIN);
      const int nxt = ok[k] && in_win ? atomicExch(head + wy * WIN + wx, e) : -2;
      ent_next[e] = nxt;
      if (ok[k]) lead[k / PARTS] = !in_win ? e : nxt == -1 ? ENT + wy * WIN + wx : -1;
    }
    // The bilinear weights are the pixel's, not the channel's: with a = v2 - v0, b = v3 - v1,
    // d = v1 - v0 (corners 0..3 = (y0,x0), (y0,x1), (y1,x0), (y1,x1)), d sample/dy = hx a + lx b,
    // d sample/dx = d + ly (b - a), sample = v0 + lx d + ly (hx a + lx b). So the channel loop
    // sums gc times v0, a, b, d (4 FMAs and 3 subtractions per element, where the three
    // per-channel dot products with wt / d/dy / d/dx took 15: 20% of this pass's instructions at
    // S2, docs/kernels.md); the weights enter once.
    A g0 = A(0), ga = A(0), gb = A(0), gd = A(0);
    const A* grow = Cs + r * L::LDC;
    auto body = [&](auto vtag, int c) {
      constexpr int V = decltype(vtag)::value;
      A v[4][V];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        if constexpr (V == 1) {
          v[k][0] = ok[k] ? to_acc<A>(x[at[k] + c]) : A(0);
        } else {
          if (ok[k]) {
            load_vec<T, A>(x + at[k] + c, v[k]);
          } else {
#pragma unroll
            for (int e = 0; e < V; ++e) v[k][e] = A(0);
          }
        }
      }
#pragma unroll
      for (int e = 0; e < V; ++e) {
        const A gc = grow[c + e];
        g0 += gc * v[0][e];
        ga += gc * (v[2][e] - v[0][e]);
        gb += gc * (v[3][e] - v[1][e]);
        gd += gc * (v[1][e] - v[0][e]);
      }
    };
    if (g.vec) {
      constexpr int V = kVec<T>;
      for (int c = part * V; c < cnt; c += PARTS * V) body(std::integral_constant<int, V>{}, c);
    } else {
      for (int c = part; c < cnt; c += PARTS) body(std::integral_constant<int, 1>{}, c);
    }
    const A gy = hx * ga + lx * gb;  // sum of gc * d sample/dy
    s_m = g0 + lx * gd + ly * gy;
    s_y = rec.m * gy;
    s_x = rec.m * (gd + ly * (gb - ga));
  } else {
#pragma unroll
    for (int k = part; k < 4; k += PARTS) ent_at[4 * r + k] = -1;
  }
#pragma unroll
  for (int s = PARTS / 2; s > 0; s >>= 1) {
    s_m += __shfl_xor_sync(0xffffffffu, s_m, s);
    s_y += __shfl_xor_sync(0xffffffffu, s_y, s);
    s_x += __shfl_xor_sync(0xffffffffu, s_x, s);
  }
  if (part == 0 && rec.y0 != kRecDead) {
    const int64_t ho = th0 + tile_row(r), wo = tw0 + tile_col(r);
    const int64_t pix = (img * p.h_out + ho) * p.w_out + wo;
    const int64_t k = og * g.K + tap;
    // An offset group inside one feature group and one chunk (C_in per offset group <= BC, as
    // at S1/S2/S6): this block is the only writer of these elements (zeroed before the pass), so
    // plain stores; else the chunks meet in atomics.
    const bool once = g.Cpog <= BC && static_cast<int>(g.Cg) % static_cast<int>(g.Cpog) == 0;
    auto put = [&](Atom<T>* dst, A v) {
      if (once) {
        *dst = static_cast<Atom<T>>(v);
      } else {
        atomicAdd(dst, static_cast<Atom<T>>(v));
      }
    };
    if (rec.y0 == kRecNan) s_y = s_x = s_m = std::numeric_limits<A>::quiet_NaN();  // NaN sample
    if constexpr (DET) {  // fixed point, always accumulated (once or not)
      const int64_t io = pix * (p.offset_groups * g.K * 2) + 2 * k;
      det_put(det, kDetDoff, io, s_y);
      det_put(det, kDetDoff, io + 1, s_x);
      if (p.with_mask) det_put(det, kDetDmask, pix * (p.offset_groups * g.K) + k, s_m);
    } else {
      put(doffa + pix * (p.offset_groups * g.K * 2) + 2 * k, s_y);
      put(doffa + pix * (p.offset_groups * g.K * 2) + 2 * k + 1, s_x);
      if (p.with_mask) put(dmaska + pix * (p.offset_groups * g.K) + k, s_m);
    }
  }
  // The leaders' warp-aggregated appends (one shared atomic per warp and corner slot; every lane
  // takes part, valid pixel or not).
  const int lane = tid % 32;
#pragma unroll
  for (int j = 0; j < KPL; ++j) {
    const bool is = lead[j] >= 0;
    const unsigned bal = __ballot_sync(0xffffffffu, is);
    int base = 0;
    if (lane == 0 && bal != 0u) base = atomicAdd(nleaders, __popc(bal));
    base = __shfl_sync(0xffffffffu, base, 0);
    if (is) leaders[base + __popc(bal & ((1u << lane) - 1u))] = lead[j];
  }
  __syncthreads();  // every entry registered, every list complete

  // One atomic per (leader, channel vector); adjacent lanes take adjacent vectors of one position.
  const int nl = *nleaders;
  // With more than half a chunk of channels, each item walks one list for W = 2 channel vectors
  // half a chunk apart (c and c + BC / 2): the list's entry loads and the item's set-up are shared
  // by both (the scatter was a quarter of this pass's instructions at S2, docs/kernels.md), and each of the two atomics still covers contiguous bytes
  // across the lanes of a position. Narrower chunks keep one vector per walk (W = 1).
  auto scatter = [&](auto vtag, auto wtag) {
    constexpr int V = decltype(vtag)::value, W = decltype(wtag)::value, STEP = BC / V / W;
    static_assert(STEP * V * W == BC, "vectors per item");
    for (int it = tid; it < nl * STEP; it += NT) {
      const int li = it / STEP, c = (it - li * STEP) * V;
      if (c >= cnt) continue;
      int e = leaders[li];
      if (e >= ENT) e = head[e - ENT];  // a window list: its final head
      const int64_t dst = ent_at[e];
      Atom<T> sum[W][V];
#pragma unroll
      for (int w = 0; w < W; ++w)
#pragma unroll
        for (int v = 0; v < V; ++v) sum[w][v] = Atom<T>(0);
      while (true) {
        const A wgt = ent_w[e];
        const A* gc = Cs + (e / 4) * L::LDC + c;  // a row has BC columns: c + (W-1) BC/2 is in it
#pragma unroll
        for (int w = 0; w < W; ++w)
#pragma unroll
          for (int v = 0; v < V; ++v) sum[w][v] += static_cast<Atom<T>>(gc[w * STEP * V + v] * wgt);
        e = ent_next[e];
        if (e < 0) break;
      }
#pragma unroll
      for (int w = 0; w < W; ++w)
        if (c + w * STEP * V < cnt) atomic_add_n<V>(dxa + dst + c + w * STEP * V, sum[w]);
    }
  };
  // DET: the same walk with every term in fixed point (the list sum is an int64 sum, so its order
  // does not matter either) and one 64-bit integer atomic per element; a non-finite term sets its
  // element's nibble of `bad` (W x V <= 8 elements per item) instead. It runs with V = 1: there is
  // no vector 64-bit atomic, and with V channels per lane each warp-wide atomic would touch one
  // word in each of 32 sectors; with one channel per lane it covers 32 consecutive words.
  auto scatter_det = [&](auto vtag, auto wtag) {
    constexpr int V = decltype(vtag)::value, W = decltype(wtag)::value, STEP = BC / V / W;
    static_assert(STEP * V * W == BC && W * V <= 8, "vectors per item");
    const double sc = det.scale[kDetDx];
    for (int it = tid; it < nl * STEP; it += NT) {
      const int li = it / STEP, c = (it - li * STEP) * V;
      if (c >= cnt) continue;
      int e = leaders[li];
      if (e >= ENT) e = head[e - ENT];
      const int64_t dst = ent_at[e];
      long long sum[W][V];
      unsigned bad = 0u;
#pragma unroll
      for (int w = 0; w < W; ++w)
#pragma unroll
        for (int v = 0; v < V; ++v) sum[w][v] = 0;
      while (true) {
        const A wgt = ent_w[e];
        const A* gc = Cs + (e / 4) * L::LDC + c;
#pragma unroll
        for (int w = 0; w < W; ++w)
#pragma unroll
          for (int v = 0; v < V; ++v) {
            unsigned b = 0u;
            sum[w][v] += det_fixed(gc[w * STEP * V + v] * wgt, sc, &b);
            bad |= b << (4 * (w * V + v));
          }
        e = ent_next[e];
        if (e < 0) break;
      }
#pragma unroll
      for (int w = 0; w < W; ++w)
        if (c + w * STEP * V < cnt)
#pragma unroll
          for (int v = 0; v < V; ++v)
            det_add(det.acc[kDetDx], det.flags[kDetDx], dst + c + w * STEP * V + v, sum[w][v],
                    (bad >> (4 * (w * V + v))) & 7u);
    }
  };
  // 16 bytes of fp32 per atomic on the vector path: two adjacent lanes fill one 32-byte sector.
  using One = std::integral_constant<int, 1>;
  using Two = std::integral_constant<int, 2>;
  using Four = std::integral_constant<int, 4>;  // DET: 4 channels 16 apart per walk (16 lanes per list)
  using Vec = std::integral_constant<int, 16 / static_cast<int>(sizeof(Atom<T>))>;
  if constexpr (DET) {  // one element per lane: a warp's 64-bit atomics cover consecutive words
    cnt > BC / 2 ? scatter_det(One{}, Four{}) : scatter_det(One{}, One{});
  } else {
    if (g.vec) {
      cnt > BC / 2 ? scatter(Vec{}, Two{}) : scatter(Vec{}, One{});
    } else {
      cnt > BC / 2 ? scatter(One{}, Two{}) : scatter(One{}, One{});
    }
  }
}

// Pipelined weight-pass loop over pixel steps [step0, step1) (tensor cores, 16-byte vectors):
// while the MMA of step s runs, the corners of step s+1 are in flight in registers and its dY rows
// by cp.async; the Samp table of step s+1 is built at the top of step s from offsets loaded one
// step earlier, so no global load sits between two barriers unhidden. One barrier per step.
template <typename T, typename L, typename Mma>
__device__ __forceinline__ void weight_main_pipelined(const Geo& g, Mma& mma, unsigned char* smem,
                                                      const T* __restrict__ x, const T* __restrict__ offset,
                                                      const T* __restrict__ mask, const T* __restrict__ dy,
                                                      int64_t b, int tap, int64_t og, int64_t c0, int cnt,
                                                      int64_t o0, int ocnt, int64_t step0, int64_t step1) {
  using A = Acc<T>;
  using C = typename L::C;
  constexpr int BC = C::BC, BN = C::BN, BK = C::BK, NT = C::kThreads;
  constexpr int V = kVec<T>, VPR = BC / V, RSTEP = NT / VPR, IT = BK / RSTEP;
  static_assert(NT % VPR == 0 && BK % RSTEP == 0 && BK <= NT, "weight pipeline split");
  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  using Rec = typename L::Rec;  // 32-bit offsets: the launcher checks Geo::x32
  Rec* recs = reinterpret_cast<Rec*>(smem + L::kMain);  // (2, BK)
  auto As = [&](int buf) { return reinterpret_cast<T*>(smem) + buf * L::kABElems; };
  auto Bs = [&](int buf) { return As(buf) + BK * L::LDA; };
  const int cv = (tid % VPR) * V, r0 = tid / VPR;
  const int64_t hw = p.h_out * p.w_out;
  uint4 cr[IT][4];

  auto load_in = [&](int64_t s) {  // this thread's pixel of step s
    const int64_t pl = s * BK + tid;
    const bool valid = tid < BK && s < step1 && pl < g.pixels;
    return load_samp_in<T, A>(g, offset, mask, valid, b * g.pixels + pl, tap, og);
  };
  auto build = [&](int64_t s, const SampIn<A>& in, int buf) {
    if (tid >= BK) return;
    const int64_t pl = s * BK + tid;
    const bool valid = pl < g.pixels;
    const int64_t im = pl / hw, rem = pl - im * hw, ho = rem / p.w_out, wo = rem - ho * p.w_out;
    recs[buf * BK + tid] = build_samp<A, int32_t>(g, in, valid, b * p.n + im, ho, wo, tap);
  };
  auto prefetch = [&](int buf) {
    const Rec* rb = recs + buf * BK;
    const bool cok = cv < cnt;
    const T* xc = x + (c0 + cv);
#pragma unroll
    for (int i = 0; i < IT; ++i) fetch_corners<T, A>(cr[i], xc, rb[r0 + i * RSTEP], cok);
  };
  auto store = [&](int buf) {  // blend the prefetched corners into A tile `buf`
    const Rec* rb = recs + buf * BK;
    T* as = As(buf);
#pragma unroll
    for (int i = 0; i < IT; ++i) {
      const int r = r0 + i * RSTEP;
      blend_store<T, A>(as + r * L::LDA + cv, cr[i], rb[r]);
    }
  };
  auto issue_dy = [&](int64_t s, int buf) {
    const int64_t p0 = s * BK;
    const T* drow = dy + (b * g.pixels + p0) * p.c_out + o0;
    load_rows_async<T, BK, BN, NT>(
        Bs(buf), L::LDB, [&](int r) -> const T* { return p0 + r < g.pixels ? drow + r * p.c_out : nullptr; },
        ocnt, dy, tid);
    cp_async_commit();
  };

  if (step0 >= step1) return;
  build(step0, load_in(step0), 0);
  SampIn<A> nin = load_in(step0 + 1);
  issue_dy(step0, 0);
  __syncthreads();
  prefetch(0);
  int buf = 0;
  for (int64_t s = step0;; ++s) {
    const bool more = s + 1 < step1;
    if (more) {
      build(s + 1, nin, buf ^ 1);
      nin = load_in(s + 2);
    }
    store(buf);
    cp_async_wait<0>();
    __syncthreads();
    if (more) {
      prefetch(buf ^ 1);
      issue_dy(s + 1, buf ^ 1);
    }
    mma.compute(As(buf), L::LDA, Bs(buf), L::LDB, tid);
    if (!more) break;
    buf ^= 1;
  }
  __syncthreads();  // the accumulator tile aliases the A/B buffers
}

// Blocks per SM the pipelined weight pass's registers must allow (weight_splits sizes the grid
// from the resulting occupancy): 4 for 16-bit types (128 registers, no spill; mma.sync had pushed
// them to 132 = 3 blocks), 3 for fp32 (168, what it uses anyway). H200 ktime, S2 bf16 weight pass
// 188 -> 146 us with the later-reverted packed blend, ~163 estimated for the bounds alone (docs/kernels.md
// "Data order, weight bounds, 16-warp tile, packed blend: outcomes"). The 8-warp wide tile: 2
// blocks = 16 warps per SM, 128 registers (16-bit types: no spill; fp32: 16 bytes, against 158
// registers and 8 warps per SM uncapped).
template <typename T, bool PIPE, typename C>
constexpr int kWeightMinBlocks = !PIPE || sizeof(T) == 8               ? 1
                                 : !std::is_same<C, WeightCfg>::value ? 2
                                 : sizeof(T) == 4                     ? 3
                                                                      : 4;

template <typename T, bool TC, bool PIPE, typename C = WeightCfg, bool DET = false>
__global__ void __launch_bounds__(C::kThreads, kWeightMinBlocks<T, PIPE, C>)
    deform_bwd_weight_kernel(const Geo g, int64_t maxq, int64_t steps_per_split,
                             const T* __restrict__ x, const T* __restrict__ offset,
                             const T* __restrict__ mask, const T* __restrict__ dy, Atom<T>* dka,
                             const DetAcc det) {
  using A = Acc<T>;
  using L = WeightLayout<T, PIPE ? 2 : 1, C>;
  constexpr int BC = C::BC, BN = C::BN, BK = C::BK, NT = C::kThreads;
  extern __shared__ __align__(128) unsigned char smem[];
  T* As = reinterpret_cast<T*>(smem);  // (BK pixels, BC)
  T* Bs = As + BK * L::LDA;            // (BK pixels, BN)
  A* Cs = reinterpret_cast<A*>(smem);  // (BC, BN)
  Samp<A>* recs = reinterpret_cast<Samp<A>*>(smem + L::kMain);

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

  MmaTile<T, TC, BC, BN, BK, C::WM, C::WN, true, false> mma;
  mma.zero();
  if constexpr (PIPE) {
    weight_main_pipelined<T, L>(g, mma, smem, x, offset, mask, dy, b, static_cast<int>(tap), og, c0, cnt, o0,
                                ocnt, step0, step1);
  } else {
    for (int64_t s = step0; s < step1; ++s) {
      const int64_t p0 = s * BK;
      for (int r = tid; r < BK; r += NT) {
        const int64_t pl = p0 + r;
        const bool valid = pl < g.pixels;
        const int64_t im = pl / hw, ho = (pl % hw) / p.w_out, wo = pl % p.w_out;
        recs[r] = make_samp<T, A>(g, offset, mask, valid, b * g.pixels + pl, b * p.n + im, ho, wo,
                                 static_cast<int>(tap), og);
      }
      __syncthreads();
      load_samples<T, BK, BC, NT>(As, L::LDA, recs, x, g.vec, c0, cnt, tid);
      const T* drow = dy + (b * g.pixels + p0) * p.c_out + o0;
      load_rows<T, BK, BN, NT>(
          Bs, L::LDB,
          [&](int r) -> const T* { return p0 + r < g.pixels ? drow + r * p.c_out : nullptr; }, ocnt,
          g.vec, tid);
      __syncthreads();
      mma.compute(As, L::LDA, Bs, L::LDB, tid);
      __syncthreads();
    }
  }
  mma.store(Cs, L::LDC, tid);
  __syncthreads();
  if constexpr (DET) {  // the partial tile in fixed point: one 64-bit integer atomic per element
    const int64_t base = b * p.kernel_size() + (tap * g.Cg + (c0 - fg * g.Cg)) * p.c_out + o0;
    for (int idx = tid; idx < BC * BN; idx += NT) {
      const int r = idx / BN, c = idx % BN;
      if (r < cnt && c < ocnt) det_put(det, kDetDk, base + r * p.c_out + c, Cs[r * L::LDC + c]);
    }
    return;
  }
  Atom<T>* dst = dka + b * p.kernel_size() + (tap * g.Cg + (c0 - fg * g.Cg)) * p.c_out + o0;
  if (g.vec) {  // c_out, o0 and ocnt are multiples of 4 here: 16-byte atomics (sm_90)
    constexpr int AV = 16 / static_cast<int>(sizeof(Atom<T>));
    for (int idx = tid; idx < BC * (BN / AV); idx += NT) {
      const int r = idx / (BN / AV), c = (idx % (BN / AV)) * AV;
      if (r >= cnt || c >= ocnt) continue;
      Atom<T> v[AV];
#pragma unroll
      for (int e = 0; e < AV; ++e) v[e] = static_cast<Atom<T>>(Cs[r * L::LDC + c + e]);
      atomic_add_n<AV>(dst + r * p.c_out + c, v);
    }
  } else {
    for (int idx = tid; idx < BC * BN; idx += NT) {
      const int r = idx / BN, c = idx % BN;
      if (r < cnt && c < ocnt) atomicAdd(dst + r * p.c_out + c, static_cast<Atom<T>>(Cs[r * L::LDC + c]));
    }
  }
}

// fp32 accumulator -> T (16-bit types). Four elements per thread and step (16-byte loads, 8-byte
// stores of two packed pairs; the same round-to-nearest as from_acc) where both pointers allow it,
// then the tail element by element. One element per step was ~2x the copy's DRAM floor.
template <typename T>
__global__ void convert_kernel(const float* __restrict__ src, T* __restrict__ dst, int64_t n) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, i0 = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  int64_t done = 0;
  if constexpr (kIsHalf<T>) {
    if (reinterpret_cast<uintptr_t>(src) % 16 == 0 && reinterpret_cast<uintptr_t>(dst) % 8 == 0) {
      using T2 = std::conditional_t<std::is_same<T, __nv_bfloat16>::value, __nv_bfloat162, __half2>;
      const int64_t n4 = n / 4;
      for (int64_t i = i0; i < n4; i += stride) {
        const float4 v = reinterpret_cast<const float4*>(src)[i];
        T2 pair[2];
        if constexpr (std::is_same<T, __nv_bfloat16>::value) {
          pair[0] = __floats2bfloat162_rn(v.x, v.y);
          pair[1] = __floats2bfloat162_rn(v.z, v.w);
        } else {
          pair[0] = __floats2half2_rn(v.x, v.y);
          pair[1] = __floats2half2_rn(v.z, v.w);
        }
        uint2 raw;
        memcpy(&raw, pair, sizeof(raw));
        reinterpret_cast<uint2*>(dst)[i] = raw;
      }
      done = n4 * 4;
    }
  }
  for (int64_t i = done + i0; i < n; i += stride) dst[i] = from_acc<T>(src[i]);
}

}  // namespace kern
}  // namespace deft
