// Block-level barriers for producer / consumer rings, with no other dependency (so that
// benchmarks/barrier_racecheck.cu checks these very helpers under compute-sanitizer).
#pragma once

#include <cstdint>

namespace deft {
namespace kern {

// Named barriers (id 0 is __syncthreads'): `threads` counts the threads that meet there.
__device__ __forceinline__ void named_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
// The arriving threads go on; their prior writes are ordered before the waiters' reads (PTX).
__device__ __forceinline__ void named_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// The ring's hand-offs are mbarriers in shared memory (sm_80): an arrive releases the arriving
// thread's prior shared-memory writes, the wait that sees its phase complete acquires them (PTX
// memory model, CTA scope). compute-sanitizer's racecheck models this hand-off, not a
// bar.arrive -> bar.sync one (benchmarks/barrier_racecheck.cu), so it can check the ring.
// `count`: the arrivals that complete a phase.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("{\n .reg .b64 st;\n mbarrier.arrive.shared.b64 st, [%0];\n}\n" ::"r"(smem_u32(bar)) : "memory");
}
// Returns once the phase with this parity (0 for the barrier's first, 1 for its second, ...) has
// completed. sm_90's try_wait suspends the thread for a while instead of spinning on test_wait.
__device__ __forceinline__ void mbar_wait(uint64_t* bar, unsigned parity) {
  unsigned done = 0;
  do {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{\n .reg .pred p;\n mbarrier.try_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
#else
    asm volatile("{\n .reg .pred p;\n mbarrier.test_wait.parity.shared.b64 p, [%1], %2;\n selp.u32 %0, 1, 0, p;\n}\n"
                 : "=r"(done) : "r"(smem_u32(bar)), "r"(parity) : "memory");
#endif
  } while (!done);
}

}  // namespace kern
}  // namespace deft
