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
// what racecheck reports for one. Mode "mbarrier" is the same ring on mbarrier objects
// (csrc/cuda/barriers.cuh: mbarrier.arrive / try_wait.parity), one arrive per thread, as the
// forward's ring; mode "mbarrier_warp" arrives once per warp after a __syncwarp (a correct protocol
// by the PTX memory model that racecheck flags: H100, 4 hazards; so the ring arrives per thread,
// which measured as fast, docs/kernels.md).
// Build: nvcc -O2 -arch=sm_90 -o barrier_racecheck barrier_racecheck.cu
// Run:   compute-sanitizer --tool racecheck ./barrier_racecheck arrive   (then: sync)
#include <cstdio>
#include <cstdint>
#include <cstring>

#include "../csrc/cuda/barriers.cuh"  // the helpers the forward's ring uses

constexpr int kSlots = 3, kWidth = 32 * 4, kChunks = 16, kThreads = 64;

using deft::kern::mbar_arrive;
using deft::kern::mbar_init;
using deft::kern::mbar_wait;
using deft::kern::named_arrive;
using deft::kern::named_sync;

// One arrival per warp (barrier count = warps): __syncwarp orders the lanes' prior writes before
// lane 0's releasing arrive.
__device__ __forceinline__ void mbar_arrive_warp(uint64_t* bar) {
  __syncwarp();
  if ((threadIdx.x & 31) == 0) mbar_arrive(bar);
}

enum Mode { kArriveMode, kSyncMode, kRacyMode, kMbarrierMode, kMbarrierWarpMode };

template <Mode M>
__global__ void ring(float* out) {
  __shared__ float slot[kSlots][kWidth];
  __shared__ uint64_t full_mb[kSlots], empty_mb[kSlots];
  constexpr bool kWarp = M == kMbarrierWarpMode, kMb = M == kMbarrierMode || kWarp, kArrive = M != kSyncMode;
  constexpr int S = kArrive ? kSlots : 1, kFull = 1, kEmpty = 1 + kSlots;
  const int lane = threadIdx.x % 32;
  if (kMb) {
    if (threadIdx.x == 0)
      for (int s = 0; s < kSlots; ++s) mbar_init(&full_mb[s], kWarp ? 1 : 32), mbar_init(&empty_mb[s], kWarp ? 1 : 32);
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncthreads();
  }
  if (threadIdx.x >= 32) {  // producer warp
    for (int i = 0, s = 0; i < kChunks; ++i, s = (s + 1) % S) {
      if (i >= S) {  // the consumer is done with this slot
        if (kMb) mbar_wait(&empty_mb[s], (i / S - 1) & 1); else named_sync(kEmpty + s, kThreads);
      }
      for (int e = lane; e < kWidth; e += 32) slot[s][e] = float(i * kWidth + e);
      if (kWarp) mbar_arrive_warp(&full_mb[s]);
      else if (kMb) mbar_arrive(&full_mb[s]);
      else if (kArrive) named_arrive(kFull + s, kThreads);
      else named_sync(kFull + s, kThreads);
      if (M == kRacyMode) slot[s][lane] = float(i * kWidth + lane);
    }
  } else {  // consumer warp
    float acc = 0.f;
    for (int i = 0, s = 0; i < kChunks; ++i, s = (s + 1) % S) {
      if (kMb) mbar_wait(&full_mb[s], (i / S) & 1); else named_sync(kFull + s, kThreads);
      for (int e = lane; e < kWidth; e += 32) acc += slot[s][(e + 7) % kWidth];  // another lane's element
      if (i + S < kChunks) {
        if (kWarp) mbar_arrive_warp(&empty_mb[s]);
        else if (kMb) mbar_arrive(&empty_mb[s]);
        else if (kArrive) named_arrive(kEmpty + s, kThreads);
        else named_sync(kEmpty + s, kThreads);
      }
    }
    out[lane] = acc;
  }
}

int main(int argc, char** argv) {
  const char* mode = argc < 2 ? "arrive" : argv[1];
  float* d = nullptr;
  cudaMalloc(&d, 32 * sizeof(float));
  if (std::strcmp(mode, "sync") == 0) ring<kSyncMode><<<1, kThreads>>>(d);
  else if (std::strcmp(mode, "racy") == 0) ring<kRacyMode><<<1, kThreads>>>(d);
  else if (std::strcmp(mode, "mbarrier") == 0) ring<kMbarrierMode><<<1, kThreads>>>(d);
  else if (std::strcmp(mode, "mbarrier_warp") == 0) ring<kMbarrierWarpMode><<<1, kThreads>>>(d);
  else ring<kArriveMode><<<1, kThreads>>>(d);
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
