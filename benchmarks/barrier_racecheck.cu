// Does compute-sanitizer's racecheck model the producer -> consumer hand-off of the
// warp-specialized forward (csrc/cuda/forward_ws.cuh)? The same ring protocol on a toy payload:
// one producer warp fills S shared-memory slots, one consumer warp reads them; "full" barriers go
// producer bar.arrive -> consumer bar.sync, "empty" barriers consumer bar.arrive -> producer
// bar.sync, a slot is refilled only after its empty barrier. Mode "arrive" is that protocol;
// mode "sync" replaces each bar.arrive with bar.sync (every side waits: the same accesses under a
// plain two-sided barrier; one slot, since two-sided barriers deadlock a ring of several: the
// consumer would wait on slot 0's empty barrier while the producer waits on slot 1's full one). Both are correct; the program checks the consumer's sums. Mode
// "racy" is "arrive" plus one more store of the same value per lane after the producer's
// bar.arrive (unordered with the consumer's reads: a real race, harmless to the sums), to show
// what racecheck reports for one.
// Build: nvcc -O2 -arch=sm_90 -o barrier_racecheck barrier_racecheck.cu
// Run:   compute-sanitizer --tool racecheck ./barrier_racecheck arrive   (then: sync)
#include <cstdio>
#include <cstring>

constexpr int kSlots = 3, kWidth = 32 * 4, kChunks = 16, kThreads = 64;

__device__ __forceinline__ void bar_sync(int id, int n) { asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(n) : "memory"); }
__device__ __forceinline__ void bar_arrive(int id, int n) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(n) : "memory");
}

template <bool kArrive, bool kRacy = false>
__global__ void ring(float* out) {
  __shared__ float slot[kSlots][kWidth];
  constexpr int S = kArrive ? kSlots : 1, kFull = 1, kEmpty = 1 + kSlots;
  const int lane = threadIdx.x % 32;
  if (threadIdx.x >= 32) {  // producer warp
    for (int i = 0, s = 0; i < kChunks; ++i, s = (s + 1) % S) {
      if (i >= S) bar_sync(kEmpty + s, kThreads);  // the consumer is done with this slot
      for (int e = lane; e < kWidth; e += 32) slot[s][e] = float(i * kWidth + e);
      if (kArrive) bar_arrive(kFull + s, kThreads); else bar_sync(kFull + s, kThreads);
      if (kRacy) slot[s][lane] = float(i * kWidth + lane);
    }
  } else {  // consumer warp
    float acc = 0.f;
    for (int i = 0, s = 0; i < kChunks; ++i, s = (s + 1) % S) {
      bar_sync(kFull + s, kThreads);
      for (int e = lane; e < kWidth; e += 32) acc += slot[s][(e + 7) % kWidth];  // another lane's element
      if (i + S < kChunks) {
        if (kArrive) bar_arrive(kEmpty + s, kThreads); else bar_sync(kEmpty + s, kThreads);
      }
    }
    out[lane] = acc;
  }
}

int main(int argc, char** argv) {
  const char* mode = argc < 2 ? "arrive" : argv[1];
  const bool sync = std::strcmp(mode, "sync") == 0, racy = std::strcmp(mode, "racy") == 0;
  float* d = nullptr;
  cudaMalloc(&d, 32 * sizeof(float));
  if (sync) ring<false><<<1, kThreads>>>(d);
  else if (racy) ring<true, true><<<1, kThreads>>>(d);
  else ring<true><<<1, kThreads>>>(d);
  float h[32];
  cudaMemcpy(h, d, sizeof(h), cudaMemcpyDeviceToHost);
  const cudaError_t err = cudaDeviceSynchronize();
  int bad = err != cudaSuccess;
  for (int lane = 0; lane < 32; ++lane) {
    double want = 0;
    for (int i = 0; i < kChunks; ++i)
      for (int e = lane; e < kWidth; e += 32) want += i * kWidth + (e + 7) % kWidth;
    bad += h[lane] != float(want);
  }
  std::printf("barrier_racecheck %s: %s (%s)\n", mode, bad ? "WRONG" : "sums ok", cudaGetErrorString(err));
  cudaFree(d);
  return bad ? 1 : 0;
}
