// CPU fused forward (forward.h). A task is (problem, tile of output pixels): its sampler writes
// the tile's columns [pixels, K, C] into this thread's scratch, and the GEMM reads them from
// cache. feature_groups == 1 is one GEMM per tile ([pixels, K C] x [K C, C_out]); with groups,
// K GEMMs per group over strided views (columns of tap k, group g: [pixels, C_g] with leading
// dimension K C; the kernel's rows of tap k, its columns of group g).
#include "cpu/forward.h"

#include <algorithm>
#include <atomic>
#include <new>
#include <type_traits>
#include <vector>

#include "cpu/columns.h"

namespace deft::cpu {
namespace {

constexpr int kRowMajor = 101, kNoTrans = 111;  // CBLAS_ORDER / CBLAS_TRANSPOSE values

// This thread's scratch, kept across tasks and calls (a tile's buffers take a few hundred KiB;
// allocating them per task would map and fault in fresh pages every time). Bounded by the
// largest tile a thread has run.
unsigned char* ThreadScratch(size_t bytes) {
  thread_local std::vector<unsigned char> buf;
  if (buf.size() < bytes) buf.resize(bytes);
  return buf.data();
}

size_t Align64(size_t bytes) { return (bytes + 63) / 64 * 64; }

template <typename G>
void Gemm2D(const Gemm& gemm, int64_t m, int64_t n, int64_t k, const G* a, int64_t lda, const G* b,
            int64_t ldb, G beta, G* c, int64_t ldc) {
  if constexpr (std::is_same_v<G, double>)
    gemm.dgemm(kRowMajor, kNoTrans, kNoTrans, int(m), int(n), int(k), 1.0, a, int(lda), b, int(ldb), beta, c,
               int(ldc));
  else
    gemm.sgemm(kRowMajor, kNoTrans, kNoTrans, int(m), int(n), int(k), 1.0f, a, int(lda), b, int(ldb), beta, c,
               int(ldc));
}

}  // namespace

template <typename T>
void FusedForward(const ConvParams& p, int64_t tile_pixels, const T* x, const T* offset, const T* mask,
                  const T* kernel, T* y, const Gemm& gemm, TaskRunner& runner) {
  using G = typename Acc<T>::type;  // the GEMM's type
  constexpr bool kSame = std::is_same_v<T, G>;
  const int64_t K = p.taps(), C = p.c_in, O = p.c_out, KC = K * C;
  const int64_t fg = p.feature_groups, Cg = p.c_in_per_group(), Og = p.c_out_per_group();
  const int64_t P = p.n * p.pixels_out();
  if (p.batch == 0 || P == 0 || O == 0) return;
  const int64_t tile = std::max<int64_t>(1, tile_pixels), tiles = (P + tile - 1) / tile;

  // The kernel in G (half types: converted once per call, not per tile).
  std::vector<G> converted;
  const G* w = nullptr;
  if constexpr (kSame) {
    w = kernel;
  } else {
    converted.resize(p.batch * p.kernel_size());
    for (size_t i = 0; i < converted.size(); ++i) converted[i] = load_as<G>(kernel[i]);
    w = converted.data();
  }

  ConvParams one = p;  // one problem at a time: the task offsets the pointers
  one.batch = 1;
  // A task allocates (its thread's scratch, the sampler's row of zeros) and TaskRunner bodies must
  // not throw: a failed allocation is recorded and rethrown here, on the calling thread.
  std::atomic<bool> out_of_memory{false};
  auto task_body = [&](int64_t task) {
    const int64_t b = task / tiles, r0 = (task % tiles) * tile, count = std::min(tile, P - r0);
    const size_t cols_bytes = Align64(count * KC * sizeof(T));
    const size_t a_bytes = kSame ? 0 : Align64(count * KC * sizeof(G));
    unsigned char* scratch = ThreadScratch(cols_bytes + a_bytes + (kSame ? 0 : count * O * sizeof(G)));
    T* cols = reinterpret_cast<T*>(scratch);
    SerialRunner serial;
    SampleColumns<T>(one, PixelRange{1, P, count, r0}, x + b * p.x_size(), offset + b * p.offset_size(),
                     mask == nullptr ? nullptr : mask + b * p.mask_size(), cols, serial);
    const G* a;
    G* out;
    if constexpr (kSame) {
      a = cols;
      out = y + b * p.y_size() + r0 * O;
    } else {
      G* wide = reinterpret_cast<G*>(scratch + cols_bytes);
      for (int64_t i = 0; i < count * KC; ++i) wide[i] = load_as<G>(cols[i]);
      a = wide;
      out = reinterpret_cast<G*>(scratch + cols_bytes + a_bytes);
    }
    const G* wb = w + b * p.kernel_size();
    if (fg == 1) {
      Gemm2D<G>(gemm, count, O, KC, a, KC, wb, O, G(0), out, O);
    } else {
      for (int64_t g = 0; g < fg; ++g)
        for (int64_t k = 0; k < K; ++k)
          Gemm2D<G>(gemm, count, Og, Cg, a + k * C + g * Cg, KC, wb + k * Cg * O + g * Og, O, G(k == 0 ? 0 : 1),
                    out + g * Og, O);
    }
    if constexpr (!kSame) {
      T* yb = y + b * p.y_size() + r0 * O;
      for (int64_t i = 0; i < count * O; ++i) yb[i] = store_as<T>(out[i]);
    }
  };
  runner.Run(p.batch * tiles, [&](int64_t task) {
    try {
      task_body(task);
    } catch (const std::bad_alloc&) {
      out_of_memory.store(true);
    }
  });
  if (out_of_memory.load()) throw std::bad_alloc();
}

template void FusedForward<float>(const ConvParams&, int64_t, const float*, const float*, const float*,
                                  const float*, float*, const Gemm&, TaskRunner&);
template void FusedForward<double>(const ConvParams&, int64_t, const double*, const double*, const double*,
                                   const double*, double*, const Gemm&, TaskRunner&);
template void FusedForward<bf16_t>(const ConvParams&, int64_t, const bf16_t*, const bf16_t*, const bf16_t*,
                                   const bf16_t*, bf16_t*, const Gemm&, TaskRunner&);
template void FusedForward<f16_t>(const ConvParams&, int64_t, const f16_t*, const f16_t*, const f16_t*,
                                  const f16_t*, f16_t*, const Gemm&, TaskRunner&);

}  // namespace deft::cpu
