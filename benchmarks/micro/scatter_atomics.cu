// Microbenchmark behind the data pass's dx design (NOTES.md "dx through cluster shared memory"):
// the S2 scatter pattern (32 x 64 x 64 x 64 fp32 dx, 8x8 tiles, 9 taps, offsets ~ N(0, 2^2),
// 4 corners x 64 channels per (pixel, tap)) done three ways, with only the scatter (no GEMM):
//   global : one block per (tile, tap), 16-byte REDG atomics straight into dx (today's kernel);
//   dsmem  : one 9-block cluster per tile (block = tap); corners land by scalar atomics in a
//            24x24-position window spread over the 9 blocks' shared memory, then each block
//            flushes its part of the window with 16-byte global atomics (zero vectors skipped);
//   dsmem4 : as dsmem with 16-byte atomics into distributed shared memory.
//   merged : one block per (tile, tap) as global, but the corners that share a position are
//            linked into lists (shared atomicExch on a 24x24 window of list heads) and summed
//            before one 16-byte atomic per (position, channel vector) (today's kernel's merge);
//   window : one block per (tile, 32-channel chunk) looping over the 9 taps: each tap merged as
//            in `merged`, the sums added with plain read-modify-write into an fp32 24x24 x 32
//            window in shared memory (one writer per position and tap, barriers between taps),
//            flushed once with 16-byte atomics (NOTES.md "Next steps" 4).
// Prints median times (cudaEvent, 20 reps) and each variant's max |difference| from `global`.
// Build/run: nvcc -O3 -arch=sm_90 -std=c++17 scatter_atomics.cu -o sa && ./sa
#include <cooperative_groups.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace cg = cooperative_groups;

constexpr int N = 32, H = 64, W = 64, C = 64, TAPS = 9, T = 8, WIN = 24, MARGIN = 8;
constexpr int TILES = (H / T) * (W / T);
constexpr int WPOS = WIN * WIN, PER_BLOCK = WPOS / TAPS;  // 64 window positions per cluster block

#define CK(x)                                                                             \
  do {                                                                                    \
    cudaError_t e_ = (x);                                                                 \
    if (e_ != cudaSuccess) {                                                              \
      std::printf("%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                       \
    }                                                                                     \
  } while (0)

struct Corner {
  int y0, x0;
  float ly, lx;
};

// Sample position of tile pixel r at tap k (3x3, padding 1) from the offsets (N, H, W, 18).
__device__ __forceinline__ Corner sample(const float* off, int n, int ty0, int tx0, int r, int k) {
  const int ho = ty0 + r / T, wo = tx0 + r % T;
  const float* o = off + ((size_t(n) * H + ho) * W + wo) * 18 + 2 * k;
  const float y = ho - 1 + k / 3 + o[0], x = wo - 1 + k % 3 + o[1];
  Corner c;
  c.y0 = int(floorf(y));
  c.x0 = int(floorf(x));
  c.ly = y - c.y0;
  c.lx = x - c.x0;
  return c;
}

__device__ __forceinline__ float payload(int r, int ch) { return 0.001f * (ch + 1) + 0.01f * r; }

__device__ __forceinline__ void red4(float* p, float4 v) { atomicAdd(reinterpret_cast<float4*>(p), v); }

// Today's pattern: two lanes per pixel, 4 channels per lane and instruction.
__global__ void __launch_bounds__(128) scatter_global(const float* off, float* dx) {
  const int tile = blockIdx.x % TILES, n = blockIdx.x / TILES, k = blockIdx.y;
  const int ty0 = (tile / (W / T)) * T, tx0 = (tile % (W / T)) * T;
  const int r = threadIdx.x / 2, part = threadIdx.x % 2;
  const Corner s = sample(off, n, ty0, tx0, r, k);
  const float wt[4] = {(1 - s.ly) * (1 - s.lx), (1 - s.ly) * s.lx, s.ly * (1 - s.lx), s.ly * s.lx};
  for (int c = part * 4; c < C; c += 8) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int yy = s.y0 + (q >> 1), xx = s.x0 + (q & 1);
      if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
      float4 v = make_float4(payload(r, c) * wt[q], payload(r, c + 1) * wt[q], payload(r, c + 2) * wt[q],
                             payload(r, c + 3) * wt[q]);
      red4(dx + ((size_t(n) * H + yy) * W + xx) * C + c, v);
    }
  }
}

// Cluster of 9 blocks = the 9 taps of one tile; the window (WIN x WIN positions x C) is spread
// over the blocks, PER_BLOCK positions each.
template <bool VEC>
__global__ void __launch_bounds__(128) scatter_dsmem(const float* off, float* dx) {
  __shared__ __align__(16) float win[PER_BLOCK * C];  // 16 KiB
  cg::cluster_group cl = cg::this_cluster();
  const int k = cl.block_rank();
  const int cid = blockIdx.x / TAPS, tile = cid % TILES, n = cid / TILES;
  const int ty0 = (tile / (W / T)) * T, tx0 = (tile % (W / T)) * T;
  const int wy0 = ty0 - MARGIN, wx0 = tx0 - MARGIN;
  for (int i = threadIdx.x; i < PER_BLOCK * C; i += 128) win[i] = 0.f;
  cl.sync();
  const int r = threadIdx.x / 2, part = threadIdx.x % 2;
  const Corner s = sample(off, n, ty0, tx0, r, k);
  const float wt[4] = {(1 - s.ly) * (1 - s.lx), (1 - s.ly) * s.lx, s.ly * (1 - s.lx), s.ly * s.lx};
  float* dst[4];
  bool inwin[4], ok[4];
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const int yy = s.y0 + (q >> 1), xx = s.x0 + (q & 1);
    ok[q] = yy >= 0 && yy < H && xx >= 0 && xx < W;
    const int wy = yy - wy0, wx = xx - wx0;
    inwin[q] = wy >= 0 && wy < WIN && wx >= 0 && wx < WIN;
    if (inwin[q]) {
      const int pos = wy * WIN + wx;
      dst[q] = cl.map_shared_rank(win, pos / PER_BLOCK) + (pos % PER_BLOCK) * C;
    } else {
      dst[q] = dx + ((size_t(n) * H + yy) * W + xx) * C;
    }
  }
  for (int c = part * 4; c < C; c += 8) {
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      if (!ok[q]) continue;
      float4 v = make_float4(payload(r, c) * wt[q], payload(r, c + 1) * wt[q], payload(r, c + 2) * wt[q],
                             payload(r, c + 3) * wt[q]);
      if (!inwin[q] || VEC) {
        red4(dst[q] + c, v);
      } else {
        atomicAdd(dst[q] + c, v.x);
        atomicAdd(dst[q] + c + 1, v.y);
        atomicAdd(dst[q] + c + 2, v.z);
        atomicAdd(dst[q] + c + 3, v.w);
      }
    }
  }
  cl.sync();
  for (int i = threadIdx.x; i < PER_BLOCK * C / 4; i += 128) {
    const int pos = k * PER_BLOCK + (i * 4) / C, c = (i * 4) % C;
    const int yy = wy0 + pos / WIN, xx = wx0 + pos % WIN;
    const float4 v = reinterpret_cast<const float4*>(win)[i];
    if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
    if (v.x == 0.f && v.y == 0.f && v.z == 0.f && v.w == 0.f) continue;
    red4(dx + ((size_t(n) * H + yy) * W + xx) * C + c, v);
  }
}

// Per-tap lists of the corners that share a window position (entry e = pixel * 4 + corner).
struct TapLists {
  int head[WPOS];      // first entry at each window position, -1 if none
  int next[4 * T * T]; // next entry at the same position, -1 at the end
  int gidx[4 * T * T]; // dx position (n, y, x) of the entry; -1 outside the image
  int wpos[4 * T * T]; // window position, -1 outside the window (then a direct global atomic)
  float w[4 * T * T];  // bilinear weight
  int leaders[WPOS];   // the non-empty window positions of this tap
  int nleaders;
};

// Link tap k's corners of the tile into `L` and collect the leader positions (128 threads).
__device__ void build_lists(TapLists& L, const float* off, int n, int ty0, int tx0, int wy0, int wx0, int k) {
  const int tid = threadIdx.x;
  if (tid < T * T) {
    const Corner s = sample(off, n, ty0, tx0, tid, k);
    const float wt[4] = {(1 - s.ly) * (1 - s.lx), (1 - s.ly) * s.lx, s.ly * (1 - s.lx), s.ly * s.lx};
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int e = tid * 4 + q, yy = s.y0 + (q >> 1), xx = s.x0 + (q & 1);
      const bool ok = yy >= 0 && yy < H && xx >= 0 && xx < W;
      const int wy = yy - wy0, wx = xx - wx0;
      const bool in = ok && wy >= 0 && wy < WIN && wx >= 0 && wx < WIN;
      L.gidx[e] = ok ? (n * H + yy) * W + xx : -1;
      L.w[e] = wt[q];
      L.wpos[e] = in ? wy * WIN + wx : -1;
      if (in) L.next[e] = atomicExch(&L.head[wy * WIN + wx], e);
    }
  }
  __syncthreads();
  for (int pos = tid; pos < WPOS; pos += 128)
    if (L.head[pos] >= 0) L.leaders[atomicAdd(&L.nleaders, 1)] = pos;
  __syncthreads();
}

// Sum of one list's payloads for channels [c, c + 4).
__device__ __forceinline__ float4 list_sum(const TapLists& L, int e, int c) {
  float4 v = make_float4(0.f, 0.f, 0.f, 0.f);
  for (; e >= 0; e = L.next[e]) {
    const int r = e / 4;
    v.x += payload(r, c) * L.w[e];
    v.y += payload(r, c + 1) * L.w[e];
    v.z += payload(r, c + 2) * L.w[e];
    v.w += payload(r, c + 3) * L.w[e];
  }
  return v;
}

// Corners outside the window (or the image) of channels [c0, c0 + CH): direct global atomics.
template <int CH>
__device__ void scatter_outside(const TapLists& L, float* dx, int c0) {
  constexpr int VPC = CH / 4;
  for (int it = threadIdx.x; it < 4 * T * T * VPC; it += 128) {
    const int e = it / VPC, c = c0 + (it % VPC) * 4;
    if (L.wpos[e] >= 0 || L.gidx[e] < 0) continue;
    const int r = e / 4;
    red4(dx + size_t(L.gidx[e]) * C + c, make_float4(payload(r, c) * L.w[e], payload(r, c + 1) * L.w[e],
                                                     payload(r, c + 2) * L.w[e], payload(r, c + 3) * L.w[e]));
  }
}

__global__ void __launch_bounds__(128) scatter_merged(const float* off, float* dx) {
  __shared__ TapLists L;
  const int tile = blockIdx.x % TILES, n = blockIdx.x / TILES, k = blockIdx.y;
  const int ty0 = (tile / (W / T)) * T, tx0 = (tile % (W / T)) * T;
  for (int i = threadIdx.x; i < WPOS; i += 128) L.head[i] = -1;
  if (threadIdx.x == 0) L.nleaders = 0;
  __syncthreads();
  build_lists(L, off, n, ty0, tx0, ty0 - MARGIN, tx0 - MARGIN, k);
  constexpr int VPC = C / 4;  // adjacent lanes: adjacent vectors of one position
  for (int it = threadIdx.x; it < L.nleaders * VPC; it += 128) {
    const int pos = L.leaders[it / VPC], c = (it % VPC) * 4;
    red4(dx + size_t(L.gidx[L.head[pos]]) * C + c, list_sum(L, L.head[pos], c));
  }
  scatter_outside<C>(L, dx, 0);
}

constexpr int CW = 32;  // channels per window block
constexpr size_t kWinBytes = size_t(WPOS) * CW * sizeof(float);  // 72 KiB

__global__ void __launch_bounds__(128) scatter_window(const float* off, float* dx) {
  extern __shared__ __align__(16) float win[];  // WPOS x CW
  __shared__ TapLists L;
  const int chunks = C / CW, q = blockIdx.x % chunks, tile = (blockIdx.x / chunks) % TILES;
  const int n = blockIdx.x / chunks / TILES, c0 = q * CW;
  const int ty0 = (tile / (W / T)) * T, tx0 = (tile % (W / T)) * T, wy0 = ty0 - MARGIN, wx0 = tx0 - MARGIN;
  for (int i = threadIdx.x; i < WPOS * CW / 4; i += 128)
    reinterpret_cast<float4*>(win)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  for (int i = threadIdx.x; i < WPOS; i += 128) L.head[i] = -1;
  if (threadIdx.x == 0) L.nleaders = 0;
  __syncthreads();
  constexpr int VPC = CW / 4;
  for (int k = 0; k < TAPS; ++k) {
    build_lists(L, off, n, ty0, tx0, wy0, wx0, k);
    for (int it = threadIdx.x; it < L.nleaders * VPC; it += 128) {
      const int pos = L.leaders[it / VPC], c = (it % VPC) * 4;
      const float4 v = list_sum(L, L.head[pos], c0 + c);
      float4* w = reinterpret_cast<float4*>(win + pos * CW + c);  // the only writer this tap
      float4 a = *w;
      a.x += v.x, a.y += v.y, a.z += v.z, a.w += v.w;
      *w = a;
    }
    scatter_outside<CW>(L, dx, c0);
    __syncthreads();
    for (int i = threadIdx.x; i < L.nleaders; i += 128) L.head[L.leaders[i]] = -1;
    __syncthreads();
    if (threadIdx.x == 0) L.nleaders = 0;
    __syncthreads();
  }
  for (int i = threadIdx.x; i < WPOS * VPC; i += 128) {
    const int pos = i / VPC, c = (i % VPC) * 4;
    const int yy = wy0 + pos / WIN, xx = wx0 + pos % WIN;
    if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
    const float4 v = *reinterpret_cast<const float4*>(win + pos * CW + c);
    if (v.x == 0.f && v.y == 0.f && v.z == 0.f && v.w == 0.f) continue;
    red4(dx + ((size_t(n) * H + yy) * W + xx) * C + c0 + c, v);
  }
}

template <typename F>
float median_ms(F&& launch, float* dx, size_t bytes) {
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  std::vector<float> t;
  for (int rep = 0; rep < 23; ++rep) {
    CK(cudaMemset(dx, 0, bytes));
    CK(cudaEventRecord(a));
    launch();
    CK(cudaEventRecord(b));
    CK(cudaEventSynchronize(b));
    float ms;
    CK(cudaEventElapsedTime(&ms, a, b));
    if (rep >= 3) t.push_back(ms);
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

int main() {
  const size_t nx = size_t(N) * H * W * C, no = size_t(N) * H * W * 18;
  std::vector<float> hoff(no);
  std::mt19937 rng(0);
  std::normal_distribution<float> nd(0.f, 2.f);
  for (auto& v : hoff) v = nd(rng);
  float *off, *dx;
  CK(cudaMalloc(&off, no * 4));
  CK(cudaMalloc(&dx, nx * 4));
  CK(cudaMemcpy(off, hoff.data(), no * 4, cudaMemcpyHostToDevice));
  std::vector<float> ref(nx), got(nx);

  auto g = [&] { scatter_global<<<dim3(N * TILES, TAPS), 128>>>(off, dx); };
  const float tg = median_ms(g, dx, nx * 4);
  CK(cudaGetLastError());
  CK(cudaMemcpy(ref.data(), dx, nx * 4, cudaMemcpyDeviceToHost));
  double amax = 0;
  for (float v : ref) amax = std::max<double>(amax, std::fabs(v));
  std::printf("global  : %8.1f us  (%d blocks, max|dx| %.3g)\n", tg * 1e3, N * TILES * TAPS, amax);

  auto cluster_launch = [&](auto kern) {
    CK(cudaFuncSetAttribute(kern, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
    return [=] {
      cudaLaunchConfig_t cfg = {};
      cfg.gridDim = dim3(N * TILES * TAPS);
      cfg.blockDim = dim3(128);
      cudaLaunchAttribute at[1];
      at[0].id = cudaLaunchAttributeClusterDimension;
      at[0].val.clusterDim.x = TAPS;
      at[0].val.clusterDim.y = 1;
      at[0].val.clusterDim.z = 1;
      cfg.attrs = at;
      cfg.numAttrs = 1;
      CK(cudaLaunchKernelEx(&cfg, kern, (const float*)off, dx));
    };
  };
  auto report = [&](const char* name, auto&& launch) {
    const float t = median_ms(launch, dx, nx * 4);
    CK(cudaGetLastError());
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(got.data(), dx, nx * 4, cudaMemcpyDeviceToHost));
    double d = 0;
    for (size_t i = 0; i < nx; ++i) d = std::max<double>(d, std::fabs(got[i] - ref[i]));
    std::printf("%s: %8.1f us  (%.2fx of global; max|diff| %.3g)\n", name, t * 1e3, tg / t, d);
  };
  report("dsmem   ", cluster_launch(scatter_dsmem<false>));
  report("dsmem4  ", cluster_launch(scatter_dsmem<true>));
  report("merged  ", [&] { scatter_merged<<<dim3(N * TILES, TAPS), 128>>>(off, dx); });
  CK(cudaFuncSetAttribute(scatter_window, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kWinBytes)));
  report("window  ", [&] { scatter_window<<<N * TILES * (C / CW), 128, kWinBytes>>>(off, dx); });
  return 0;
}
