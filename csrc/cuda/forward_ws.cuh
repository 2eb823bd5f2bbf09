// Warp-specialized forward: producer warps sample x into a ring of shared-memory A tiles (and copy
// the weight tiles in by cp.async) while consumer warps run the MMA on the slots already filled.
// Same GEMM, tiles and epilogue as the streaming forward (forward.cuh); what changes is the
// schedule. There, every warp gathers, blends, waits at a block barrier and then multiplies, so the
// tensor cores idle while the block samples and the gather latency is exposed once per chunk (S4
// fp32 on an H200: 2 warps per scheduler, 0.62 eligible, 33% of issue slots used; docs/kernels.md
// "Warp-specialized forward"). Here the two halves run concurrently and meet only at the ring
// slots' mbarriers (full: the producers filled it; empty: the consumers are done with it).
#pragma once

#include "cuda/barriers.cuh"
#include "cuda/forward.cuh"

namespace deft {
namespace kern {

// Thread-block clusters (sm_90; the launcher runs the k-split ring only there): the barrier over
// every thread of the cluster (release/acquire: shared-memory writes before it are visible to the
// other blocks' reads after it), this block's rank, and a 16-byte load from the shared memory of
// block `rank` at the address that `local` has in ours.
__device__ __forceinline__ void cluster_sync_all() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ int cluster_rank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return static_cast<int>(r);
#else
  __trap();
  return 0;
#endif
}
__device__ __forceinline__ float4 ld_cluster_f4(const float* local, int rank) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  const uint32_t a = static_cast<uint32_t>(__cvta_generic_to_shared(local));
  uint32_t ra;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(ra) : "r"(a), "r"(rank));
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(ra)
               : "memory");
#else
  (void)local, (void)rank;
  __trap();
#endif
  return v;
}

// The producers' bilinear record: four corner offsets that are always inside x, so a corner load
// is one IMAD.WIDE.U32 + LDG with no predicate and no zero fill. (The streaming records mark a
// corner outside the image with -1, and each corner then cost ~11 instructions: sign test, zero
// fill, 64-bit address; S4 fp32 ws profile: 71 instructions per 4-corner vector, the producers the
// bottleneck.) A corner outside the image is redirected to the valid corner of its row or column,
// and that valid corner's weight is split evenly over the copies: the rows and columns of a sample
// inside the image are valid in at least one of each, so the copies number 1, 2 or 4 and the
// halves and quarters are exact; the sum equals the masked bilinear sum up to summation order,
// infinities included (no 0 x inf). A sample outside the image (it contributes nothing) points at
// the image's pixel 0 with w[0] = -0.0, which no live record carries (a live -0 weight is stored as
// +0: only the sign of a zero product changes), and its blend is replaced by zeros. (A flag bit in
// off[0] cost six 64-bit address instructions per vector.) A sample whose value is NaN with no
// corner to read (a NaN coordinate, or a point outside the image times a non-finite mask: Samp's
// rule in common.cuh) is live instead, on pixel 0 with w = {NaN, 0, 0, 0}: its blend is NaN
// (NaN * x is NaN whatever x holds) and nothing is read outside the image. float accumulators
// only (no fp64 ring).
template <typename A>
struct alignas(16) WsSamp {
  uint32_t off[4];
  A w[4];
};
constexpr uint32_t kWsDead = 0x80000000u;  // the bits of -0.0f
__device__ __forceinline__ bool ws_live(float w0) { return __float_as_uint(w0) != kWsDead; }

template <typename A>
__device__ __forceinline__ WsSamp<A> build_ws_samp(const Geo& g, const SampIn<A>& in, bool valid, int64_t img,
                                                   int64_t ho, int64_t wo, int tap) {
  const ConvParams& p = g.p;
  WsSamp<A> s;
  // The image's pixel 0; for a pixel past the last image (a flat tile's tail: img == N) x's pixel 0:
  // its corners are loaded too, and image N would lie past x's end.
  const uint32_t base = valid ? static_cast<uint32_t>(img * p.h * p.w * p.c_in) : 0u;
#pragma unroll
  for (int k = 0; k < 4; ++k) s.off[k] = base, s.w[k] = A(0);
  s.w[0] = __uint_as_float(kWsDead);
  if (!valid) return s;
  const int kw = static_cast<int>(p.kw);
  const int i = tap / kw, j = tap - i * kw;
  const Bilinear<A> b = make_bilinear<A>(A(p.base_y(ho, i)) + in.dy, A(p.base_x(wo, j)) + in.dx, p.h, p.w);
  if (!b.inside) {
    const A z = b.fill() * in.m;  // the sample's value: 0 (dead), or NaN (live, see above)
    if (z != z) s.w[0] = z;
    return s;
  }
  const bool y0ok = b.y0 >= 0, y1ok = b.y0 + 1 < p.h, x0ok = b.x0 >= 0, x1ok = b.x0 + 1 < p.w;
  const int64_t ya = y0ok ? b.y0 : b.y0 + 1, yb = y1ok ? b.y0 + 1 : b.y0;  // rows of corners (0, 1) / (2, 3)
  const int64_t xa = x0ok ? b.x0 : b.x0 + 1, xb = x1ok ? b.x0 + 1 : b.x0;
  const A hy = A(1) - b.ly, hx = A(1) - b.lx;
  // Row weights (top, bottom) and column weights (left, right), halved where both copies are one row.
  const A ry0 = y0ok && y1ok ? hy : (y0ok ? hy : b.ly) * A(0.5), ry1 = y0ok && y1ok ? b.ly : ry0;
  const A cx0 = x0ok && x1ok ? hx : (x0ok ? hx : b.lx) * A(0.5), cx1 = x0ok && x1ok ? b.lx : cx0;
  const A m = in.m;
  s.w[0] = ry0 * cx0 * m, s.w[1] = ry0 * cx1 * m, s.w[2] = ry1 * cx0 * m, s.w[3] = ry1 * cx1 * m;
  if (!ws_live(s.w[0])) s.w[0] = A(0);
  const int64_t row_a = (img * p.h + ya) * p.w, row_b = (img * p.h + yb) * p.w;
  s.off[0] = static_cast<uint32_t>((row_a + xa) * p.c_in);
  s.off[1] = static_cast<uint32_t>((row_a + xb) * p.c_in);
  s.off[2] = static_cast<uint32_t>((row_b + xa) * p.c_in);
  s.off[3] = static_cast<uint32_t>((row_b + xb) * p.c_in);
  return s;
}

// Four corner vectors at channels xc[0, kVec) of one record; no predicates (see WsSamp).
template <typename T, typename A>
__device__ __forceinline__ void ws_fetch(uint4 (&cr)[4], const T* __restrict__ xc, const WsSamp<A>& q) {
#pragma unroll
  for (int k = 0; k < 4; ++k) cr[k] = __ldg(reinterpret_cast<const uint4*>(xc + q.off[k]));
}

// Blend (as blend_store) and store kVec elements; zeros where `live` is false.
template <typename T, typename A>
__device__ __forceinline__ void ws_blend_store(T* dst, const uint4 (&cr)[4], const WsSamp<A>& q, bool live) {
  A acc[kVec<T>];
  blend_corners<T, A>(cr, q.w, acc);
  const uint4 raw = pack_vec<T, A>(acc);
  *reinterpret_cast<uint4*>(dst) = live ? raw : make_uint4(0, 0, 0, 0);
}

// BM x BN block tile, BK channels per chunk; WM x WN consumer warps (the MMA), PW producer warps
// (gather, blend, weight copies), S ring slots; MINB blocks per SM for the register allocation.
template <int BM_, int BN_, int BK_, int WM_, int WN_, int PW_, int S_, int MINB_>
struct WsCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, WM = WM_, WN = WN_, kStages = S_, kMinBlocks = MINB_;
  static constexpr int kConsumers = WM * WN * 32, kProducers = PW_ * 32, kThreads = kConsumers + kProducers;
};

template <typename T, typename Cfg>
struct WsLayout {
  using A = Acc<T>;
  using Rec = WsSamp<A>;                         // Geo::x32 (the launcher checks it)
  static constexpr int LDA = Cfg::BK + kPad<T>;   // A slot [BM][LDA]: pixels x channels
  static constexpr int LDB = Cfg::BN + kPadK<T>;  // B slot [BK][LDB]: channels x output channels
  static constexpr int LDC = Cfg::BN + kCPad;     // Cs[BM][LDC] after the loop (aliases the ring)
  static constexpr size_t kAElems = size_t(Cfg::BM) * LDA;
  static constexpr size_t kSlot = align_up((kAElems + size_t(Cfg::BK) * LDB) * sizeof(T), 128);
  static constexpr size_t kRing = Cfg::kStages * kSlot;
  static constexpr size_t kC = align_up(size_t(Cfg::BM) * LDC * sizeof(A), 128);
  static constexpr size_t kMain = kRing > kC ? kRing : kC;
  static constexpr size_t kBars = align_up(kMain + 2 * size_t(Cfg::BM) * sizeof(Rec), 8);  // + two record buffers
  static constexpr size_t kBytes = kBars + 2 * Cfg::kStages * sizeof(uint64_t);  // + full[S], empty[S]
};

// The ring's mbarriers, after the record buffers: full[s] completes when the PT producer threads
// have filled slot s, empty[s] when the CT consumer threads are done with it.
template <typename L>
__device__ __forceinline__ uint64_t* ws_full_bars(unsigned char* smem) {
  return reinterpret_cast<uint64_t*>(smem + L::kBars);
}

// The producers' side of the ring: for each chunk of the walk, gather the four corners of every
// (pixel, channel vector) into registers, copy the next chunk's weight rows into the next slot by
// cp.async once the consumers have freed it, blend the samples into this slot's A tile and
// announce the slot. Bilinear records are built one (tap, segment) group ahead into a double
// buffer; a producer-only barrier at each group's first chunk publishes them and retires the
// buffer that the next build overwrites.
template <typename T, typename Cfg, typename L>
__device__ __forceinline__ void ws_produce(const Geo& g, unsigned char* smem, const T* __restrict__ x,
                                           const T* __restrict__ offset, const T* __restrict__ mask,
                                           const T* __restrict__ kb, const PixTile& pt, ChunkWalk walk,
                                           int nchunks, int64_t o0, int ocnt, int ptid) {
  using A = Acc<T>;
  using Rec = typename L::Rec;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, S = Cfg::kStages, V = kVec<T>;
  constexpr int PT = Cfg::kProducers;
  constexpr int kProd = 1;  // the producers' own named barrier
  uint64_t* full = ws_full_bars<L>(smem);
  uint64_t* empty = full + S;
  constexpr int VPR = BK / V, RSTEP = PT / VPR, IT = BM / RSTEP;      // A: vectors per thread
  constexpr int BVPR = BN / V, BRSTEP = PT / BVPR, IB = BK / BRSTEP;  // B: vectors per thread
  static_assert(PT % VPR == 0 && BM % RSTEP == 0 && PT % BVPR == 0 && BK % BRSTEP == 0, "producer split");
  static_assert(BM <= PT, "one record per producer thread");
  const ConvParams& p = g.p;
  Rec* recs = reinterpret_cast<Rec*>(smem + L::kMain);  // (2, BM)
  const int cv = (ptid % VPR) * V, r0 = ptid / VPR;
  const int bc = (ptid % BVPR) * V, br0 = ptid / BVPR;
  int64_t my_img = 0, my_ho = 0, my_wo = 0;
  const int64_t my_pix = ptid < BM ? pt.pixel(g, ptid, &my_img, &my_ho, &my_wo) : -1;
  const int64_t ldo = p.c_out;
  // Weight rows by one pointer: the walk consumes the kernel's (tap, channel) rows in order, from
  // the row of its current chunk (a k-split block starts inside the walk).
  const bool bok = bc < ocnt;
  const int64_t row0 = static_cast<int64_t>(walk.tap) * (walk.cend - walk.cbeg) + (walk.c0 - walk.cbeg);
  const T* wp = kb + o0 + bc + (row0 + br0) * ldo;
  const int64_t wstep = static_cast<int64_t>(BRSTEP) * ldo;
  auto build_recs = [&](int tap, int og, int buf) {
    if (ptid < BM) {
      const SampIn<A> in = load_samp_in<T, A>(g, offset, mask, my_pix >= 0, my_pix, tap, og);
      recs[buf * BM + ptid] = build_ws_samp<A>(g, in, my_pix >= 0, my_img, my_ho, my_wo, tap);
    }
  };

  // Weight rows go out one chunk ahead (chunk i + 1's during chunk i), so their L2 round trip
  // overlaps the corner gather. Copied behind the corner loads and waited for after the blend,
  // they were the producers' second exposed latency per chunk (profile of: that wait and
  // a stall before the copies, ~17% of the producers' stall samples); bf16 0.87-0.94x, fp32 1.00x.
  ChunkWalk bwalk = walk;  // the chunk whose weight rows are copied next
  auto issue_b = [&](int slot) {
    T* bs = reinterpret_cast<T*>(smem + slot * L::kSlot) + L::kAElems;
#pragma unroll
    for (int j = 0; j < IB; ++j) {
      const int r = br0 + j * BRSTEP;
      const bool ok = bok && r < bwalk.cnt;
      cp_async16(bs + r * L::LDB + bc, ok ? wp + j * wstep : kb, ok);
    }
    wp += bwalk.cnt * ldo;
    bwalk.next();
  };

  // A k-split block may start inside a group: its first chunk publishes the records and builds
  // the next group's, as a group's first chunk does.
  build_recs(walk.tap, walk.og, walk.group & 1);
  issue_b(0);  // every slot is free at the start
  cp_async_commit();
  for (int i = 0, s = 0; i < nchunks; ++i) {
    const bool opens = walk.is_first || i == 0;
    if (opens) named_sync(kProd, PT);
    const Rec* rb = recs + (walk.group & 1) * BM;
    // Past the chunk's channels the thread loads channel 0 (in bounds) and stores zeros.
    const bool cok = cv < walk.cnt;
    const T* xc = cok ? x + (walk.c0 + cv) : x;
    uint4 cr[IT][4];
#pragma unroll
    for (int it = 0; it < IT; ++it) ws_fetch<T, A>(cr[it], xc, rb[r0 + it * RSTEP]);
    if (opens) {  // the next group's records, while the corners are in flight
      int ntap, ncs;
      if (walk.next_group(&ntap, &ncs)) build_recs(ntap, ncs / walk.Cpog, (walk.group + 1) & 1);
    }
    const int s1 = s + 1 == S ? 0 : s + 1;
    if (i + 1 < nchunks) {
      // The consumers are done with slot s1's last chunk, i + 1 - S: empty[s1]'s ((i + 1) / S - 1)th phase.
      if (i + 1 >= S) mbar_wait(empty + s1, ((i + 1) / S - 1) & 1);
      issue_b(s1);
    }
    cp_async_commit();  // (empty past the last chunk: the wait below counts groups)
    // Slot s: its empty-slot wait came with its weight rows, an iteration ago.
    T* as = reinterpret_cast<T*>(smem + s * L::kSlot);
#pragma unroll
    for (int it = 0; it < IT; ++it) {
      const int r = r0 + it * RSTEP;
      ws_blend_store<T, A>(as + r * L::LDA + cv, cr[it], rb[r], cok && ws_live(rb[r].w[0]));
    }
    cp_async_wait<1>();  // chunk i's weight rows (all but the group just committed)
    mbar_arrive(full + s);
    walk.next();
    s = s1;
  }
  cp_async_wait<0>();
}

// The k-split ring's epilogue: the cluster's blocks computed the same output tile over disjoint
// chunk ranges, each left its fp32 partial tile in its own shared memory (Cs, same address in
// every block), and block `rank` sums rows [rank, rank + 1) * BM / splits of all of them, in rank
// order (deterministic), and stores them. Vector path only (the ring's).
template <typename T, int BM, int BN, int NT, int LDC>
__device__ __forceinline__ void ws_split_epilogue(const Geo& g, const PixTile& pt, const float* Cs,
                                                  T* __restrict__ y, int64_t o0, int ocnt, int tid,
                                                  int splits, int rank) {
  constexpr int V = kVec<T>, F4 = V / 4;  // 16-byte stores of T, from V / 4 16-byte loads per block
  const int rows = BM / splits, rbeg = rank * rows;
  for (int idx = tid; idx < rows * (BN / V); idx += NT) {
    const int r = rbeg + idx / (BN / V), c = (idx % (BN / V)) * V;
    const int64_t pix = pt.out_pixel(g, r);
    if (pix < 0 || c >= ocnt) continue;
    float v[V];
#pragma unroll
    for (int e = 0; e < V; ++e) v[e] = 0.f;
    for (int q = 0; q < splits; ++q) {
#pragma unroll
      for (int f = 0; f < F4; ++f) {
        const float4 t = ld_cluster_f4(Cs + r * LDC + c + 4 * f, q);
        v[4 * f] += t.x, v[4 * f + 1] += t.y, v[4 * f + 2] += t.z, v[4 * f + 3] += t.w;
      }
    }
    store_elems<T, float, V>(y + pix * g.p.c_out + o0 + c, v);
  }
}

// Tensor-core vector path only (bf16/fp16, fp32 with TF32; x32): the launcher hands every other
// case to the streaming kernel of the same tile. KSPLIT: the blocks of one cluster (gridDim.z of
// them, sm_90) split the (tap, chunk) walk of one output tile into equal ranges and meet in
// distributed shared memory. That gives a layer whose tiles leave SMs idle (S4: 98 blocks of 1 per
// SM on 132 SMs) or a half-empty last wave (S3/S6: 196) more, shorter blocks: each block's time is
// its chain of chunks (latency-bound, docs/kernels.md), not its pixel count.
template <typename T, typename Cfg, bool KSPLIT>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    deform_fwd_ws_kernel(const Geo g, const T* __restrict__ x, const T* __restrict__ offset,
                         const T* __restrict__ mask, const T* __restrict__ kernel, T* __restrict__ y) {
  using A = Acc<T>;
  using L = WsLayout<T, Cfg>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, S = Cfg::kStages;
  constexpr int NT = Cfg::kThreads, CT = Cfg::kConsumers;
  extern __shared__ __align__(128) unsigned char smem[];

  const ConvParams& p = g.p;
  const int tid = threadIdx.x;
  const PixTile pt = PixTile::of_block(g, blockIdx.x);
  const int64_t nblk = (g.Cog + BN - 1) / BN;
  const int fg = static_cast<int>(blockIdx.y / nblk);
  const int64_t ob = blockIdx.y % nblk;
  const int64_t o0 = fg * g.Cog + ob * BN;
  const int ocnt = static_cast<int>(g.Cog - ob * BN < BN ? g.Cog - ob * BN : BN);
  ChunkWalk walk;
  walk.init(g, fg, BK);
  int nchunks = walk.valid() ? walk.count() : 0;
  int splits = 1, rank = 0;
  if constexpr (KSPLIT) {  // this block's range of the walk: chunks [i0, i1)
    splits = static_cast<int>(gridDim.z), rank = cluster_rank();
    const int per = (nchunks + splits - 1) / splits;
    const int i0 = min(rank * per, nchunks), i1 = min(i0 + per, nchunks);
    for (int i = 0; i < i0; ++i) walk.next();
    nchunks = i1 - i0;
  }

  uint64_t* full = ws_full_bars<L>(smem);
  uint64_t* empty = full + S;
  if (tid < S) {
    mbar_init(full + tid, Cfg::kProducers);
    mbar_init(empty + tid, CT);
  }
  __syncthreads();  // the barriers are initialised before anyone arrives or waits

  MmaTile<T, true, BM, BN, BK, Cfg::WM, Cfg::WN, false, false> mma;
  if (tid < CT) {  // consumers: warps 0 .. WM*WN-1, as the MMA tile numbers them
    mma.zero();
    for (int i = 0, s = 0; i < nchunks; ++i) {
      mbar_wait(full + s, (i / S) & 1);  // chunk i is slot s's (i / S)th fill
      const T* as = reinterpret_cast<const T*>(smem + s * L::kSlot);
      mma.compute(as, L::LDA, as + L::kAElems, L::LDB, tid);
      if (i + S < nchunks) mbar_arrive(empty + s);  // the producers wait for it at chunk i + S
      s = s + 1 == S ? 0 : s + 1;
    }
  } else if (nchunks > 0) {
    ws_produce<T, Cfg, L>(g, smem, x, offset, mask, kernel + pt.b * p.kernel_size(), pt, walk, nchunks, o0,
                          ocnt, tid - CT);
  }
  __syncthreads();  // the accumulator tile aliases the ring
  if (tid < CT) mma.store(reinterpret_cast<A*>(smem), L::LDC, tid);
  if constexpr (KSPLIT) {
    cluster_sync_all();  // every block's partial tile is in its shared memory
    ws_split_epilogue<T, BM, BN, NT, L::LDC>(g, pt, reinterpret_cast<const float*>(smem), y, o0, ocnt, tid,
                                             splits, rank);
    cluster_sync_all();  // ... and stays there until the whole cluster has read it
  } else {
    __syncthreads();
    fwd_epilogue<T, BM, BN, NT, L::LDC>(g, pt, reinterpret_cast<const A*>(smem), y, o0, ocnt, tid);
  }
}

// Whether this device runs thread-block clusters (compute capability 9.0 or newer).
inline bool device_has_clusters() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return false;
  return major >= 9;
}

// splits = 1: the plain ring. splits in {2, 4}: clusters of `splits` blocks along the grid's z
// (tiling.py picks it; BM / splits rows per block in the epilogue). Not on devices without
// clusters: an error, never a silent change of kernel.
template <typename T, typename Cfg>
cudaError_t launch_forward_ws(cudaStream_t stream, const Geo& g, int splits, const T* x, const T* offset,
                              const T* mask, const T* kernel, T* y) {
  if (!g.vec || !g.x32) return cudaErrorInvalidValue;  // run_forward routes these elsewhere
  constexpr size_t smem = WsLayout<T, Cfg>::kBytes;
  if (splits == 1) {
    return launch_tiled_forward(stream, g, deform_fwd_ws_kernel<T, Cfg, false>, Cfg::BN, Cfg::kThreads, smem, 1,
                                g, x, offset, mask, kernel, y);
  }
  if ((splits != 2 && splits != 4) || Cfg::BM % splits != 0) return cudaErrorInvalidValue;
  if (!device_has_clusters()) return cudaErrorNotSupported;
  return launch_tiled_forward(stream, g, deform_fwd_ws_kernel<T, Cfg, true>, Cfg::BN, Cfg::kThreads, smem, splits,
                              g, x, offset, mask, kernel, y);
}

}  // namespace kern
}  // namespace deft
