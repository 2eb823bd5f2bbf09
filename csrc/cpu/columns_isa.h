// The per-instruction-set builds of columns.cc (one namespace each) and the dispatch between them.
// Internal to csrc/cpu/; callers use columns.h.
#pragma once

#include <cstdint>

#include "cpu/columns.h"

#define DEFT_DECLARE_COLUMNS(ISA)                                                               \
  namespace deft::cpu::ISA {                                                                    \
  template <typename T>                                                                         \
  void SampleColumns(const ConvParams& p, const PixelRange& px, const T* x, const T* offset,   \
                     const T* mask, T* cols, TaskRunner& runner);                               \
  template <typename T>                                                                         \
  void Col2Im(const ConvParams& p, const PixelRange& px, const DxImages& di, const T* x,         \
              const T* offset, const T* mask,                                                    \
              const typename Acc<T>::type* dcols, typename Acc<T>::type* dx, T* doffset,        \
              T* dmask, TaskRunner& runner);                                                    \
  }

// Always built: the compiler's default target. DEFT_CPU_X86_ISAS (set by CMakeLists.txt for the
// dispatcher on x86-64): the AVX2 and AVX-512 builds exist too.
DEFT_DECLARE_COLUMNS(generic)
DEFT_DECLARE_COLUMNS(avx2)
DEFT_DECLARE_COLUMNS(avx512)

// Explicit instantiations of SampleColumns and Col2Im for every element type, in the namespace
// where the macro is expanded (each ISA build and the dispatcher).
#define DEFT_INSTANTIATE_COLUMNS_FOR(T)                                                        \
  template void SampleColumns<T>(const ConvParams&, const PixelRange&, const T*, const T*,     \
                                 const T*, T*, TaskRunner&);                                   \
  template void Col2Im<T>(const ConvParams&, const PixelRange&, const DxImages&, const T*,      \
                          const T*, const T*,                                                  \
                          const typename Acc<T>::type*, typename Acc<T>::type*, T*, T*,        \
                          TaskRunner&);
#define DEFT_INSTANTIATE_COLUMNS    \
  DEFT_INSTANTIATE_COLUMNS_FOR(float)  \
  DEFT_INSTANTIATE_COLUMNS_FOR(double) \
  DEFT_INSTANTIATE_COLUMNS_FOR(bf16_t) \
  DEFT_INSTANTIATE_COLUMNS_FOR(f16_t)
