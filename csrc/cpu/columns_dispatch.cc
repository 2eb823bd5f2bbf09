// Run-time choice among the builds of columns.cc: the widest instruction set that this CPU (and
// its operating system) supports. DEFT_CPU_ISA=generic|avx2|avx512 in the environment caps the
// choice (tests compare the builds; benchmarks can measure what the vector width buys).
#include <cstdlib>
#include <cstring>

#include "cpu/columns_isa.h"

namespace deft::cpu {
namespace {

enum class Isa { kGeneric, kAvx2, kAvx512 };

Isa Detect() {
  Isa best = Isa::kGeneric;
#if defined(DEFT_CPU_X86_ISAS)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  if (const char* cap = std::getenv("DEFT_CPU_ISA")) {
    if (std::strcmp(cap, "generic") == 0) best = Isa::kGeneric;
    if (std::strcmp(cap, "avx2") == 0 && best == Isa::kAvx512) best = Isa::kAvx2;
  }
  return best;
}

Isa Chosen() {
  static const Isa isa = Detect();
  return isa;
}

}  // namespace

const char* CpuIsaName() {
  switch (Chosen()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    case Isa::kGeneric: break;
  }
  return "generic";
}

#if defined(DEFT_CPU_X86_ISAS)
#define DEFT_DISPATCH(fn, ...)                                    \
  switch (Chosen()) {                                             \
    case Isa::kAvx512: return avx512::fn<T>(__VA_ARGS__);         \
    case Isa::kAvx2: return avx2::fn<T>(__VA_ARGS__);             \
    case Isa::kGeneric: break;                                    \
  }                                                               \
  return generic::fn<T>(__VA_ARGS__)
#else
#define DEFT_DISPATCH(fn, ...) return generic::fn<T>(__VA_ARGS__)
#endif

template <typename T>
void SampleColumns(const ConvParams& p, const PixelRange& px, const T* x, const T* offset, const T* mask,
                   T* cols, TaskRunner& runner) {
  DEFT_DISPATCH(SampleColumns, p, px, x, offset, mask, cols, runner);
}

template <typename T>
void Col2Im(const ConvParams& p, const PixelRange& px, const DxImages& di, const T* x, const T* offset,
            const T* mask, const typename Acc<T>::type* dcols, typename Acc<T>::type* dx, T* doffset,
            T* dmask, TaskRunner& runner) {
  DEFT_DISPATCH(Col2Im, p, px, di, x, offset, mask, dcols, dx, doffset, dmask, runner);
}

DEFT_INSTANTIATE_COLUMNS

}  // namespace deft::cpu
