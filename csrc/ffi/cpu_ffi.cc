// XLA typed-FFI handlers for platform "cpu" (the column sampler and its col2im, the fused forward)
// and the nanobind module `_deft_cpu` that hands their capsules to Python. Decoding, checking,
// dtype dispatch and the task runner on XLA's intra-op thread pool only; the arithmetic is in
// csrc/cpu/.
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <new>
#include <string>

#include "cpu/columns.h"
#include "cpu/forward.h"
#include "cpu/task_runner.h"
#include "deft/host_half.h"
#include "ffi/column_attrs.h"
#include "ffi/conv_attrs.h"
#include "nanobind/nanobind.h"
#include "nanobind/stl/string.h"
#include "xla/ffi/api/ffi.h"

namespace nb = nanobind;
namespace ffi = xla::ffi;

namespace deft_ffi {
namespace {

template <typename F>
ffi::Error DispatchDtype(deft::DType t, F&& f) {
  switch (t) {
    case deft::DType::kF32: f(float{}); break;
    case deft::DType::kF64: f(double{}); break;
    case deft::DType::kBF16: f(deft::bf16_t{}); break;
    case deft::DType::kF16: f(deft::f16_t{}); break;
  }
  return ffi::Error::Success();
}

// The CPU kernels allocate a little (a row of zeros); an allocation failure is an error, not a crash.
template <typename F>
ffi::Error Guarded(F&& f) {
  try {
    return f();
  } catch (const std::bad_alloc&) {
    return ffi::Error(ffi::ErrorCode::kResourceExhausted, "deft_jax: out of host memory");
  } catch (const std::exception& e) {
    return ffi::Error(ffi::ErrorCode::kInternal, std::string("deft_jax: ") + e.what());
  }
}

template <typename T>
const T* ptr(const ffi::AnyBuffer& b) { return static_cast<const T*>(b.untyped_data()); }
template <typename T>
T* ptr(ffi::Result<ffi::AnyBuffer>& b) { return static_cast<T*>(b->untyped_data()); }

// TaskRunner on XLA's intra-op thread pool (the one the FFI hands a CPU handler), never on threads
// of our own. The calling thread takes tasks too, and waits only for tasks already taken: a helper
// that starts late (the pool busy elsewhere, or the handler itself running on a pool thread) finds
// nothing left and returns, so waiting never depends on a pool thread becoming free (no deadlock).
class PoolRunner final : public deft::cpu::TaskRunner {
 public:
  explicit PoolRunner(ffi::ThreadPool& pool)
      : pool_(pool), threads_(std::max<int64_t>(1, pool.num_threads())) {}

  int64_t threads() const override { return threads_; }

  void Run(int64_t n, const std::function<void(int64_t)>& body) override {
    if (n <= 0) return;
    const int64_t helpers = std::min(threads_, n) - 1;
    if (helpers == 0) {
      for (int64_t i = 0; i < n; ++i) body(i);
      return;
    }
    // Shared with the helpers, which may outlive this call (they then run no task).
    struct State {
      std::atomic<int64_t> next{0}, done{0};
      int64_t n = 0;
      std::function<void(int64_t)> body;
      std::mutex mu;
      std::condition_variable cv;
    };
    auto st = std::make_shared<State>();
    st->n = n;
    st->body = body;
    auto work = [](State& s) {
      for (;;) {
        const int64_t i = s.next.fetch_add(1);
        if (i >= s.n) return;
        s.body(i);
        if (s.done.fetch_add(1) + 1 == s.n) {
          std::lock_guard<std::mutex> lock(s.mu);
          s.cv.notify_all();
        }
      }
    };
    // A helper that cannot be scheduled (out of memory) is simply not there: the calling thread
    // and the helpers already scheduled take its tasks.
    try {
      for (int64_t h = 0; h < helpers; ++h) pool_.Schedule([st, work] { work(*st); });
    } catch (...) {
    }
    work(*st);
    std::unique_lock<std::mutex> lock(st->mu);
    st->cv.wait(lock, [&] { return st->done.load() == n; });
  }

 private:
  ffi::ThreadPool& pool_;
  int64_t threads_;
};

// `start` of a host (CPU) call: its host copy times `unit`, checked to put [first, first + count)
// within [0, limit) (rows or images).
inline ffi::ErrorOr<int64_t> ReadChunkStart(const ffi::AnyBuffer& start, int64_t unit, int64_t count,
                                            int64_t limit, const char* what) {
  const int64_t first = int64_t{*static_cast<const int32_t*>(start.untyped_data())} * unit;
  if (first < 0 || first + count > limit)
    return ffi::Unexpected(invalid(std::string(what) + " [" + std::to_string(first) + ", " +
                                   std::to_string(first + count) + ") are not within the " +
                                   std::to_string(limit) + " " + what + " of x"));
  return first;
}

ffi::Error SampleColumnsImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer offset,
                             ffi::AnyBuffer mask, ffi::AnyBuffer start,
                             ffi::Result<ffi::AnyBuffer> cols, ColumnAttrs attrs) {
  deft::ConvParams p;
  int64_t rows = 0, unit = 1;
  if (auto err = BuildColumnParams(x, offset, mask, start, cols->dimensions(), attrs, ChunkUnit::kRows, &p, &rows,
                                   &unit);
      !err.success())
    return err;
  auto first = ReadChunkStart(start, unit, rows, p.n * p.h_out, "output rows");
  if (first.has_error()) return first.error();
  const deft::cpu::PixelRange px{p.batch, p.n * p.pixels_out(), rows * p.w_out, *first * p.w_out};
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype.error();
  if (cols->element_type() != x.element_type()) return invalid("columns dtype differs from x's");
  if (cols->element_count() == 0) return ffi::Error::Success();
  PoolRunner runner(pool);
  return Guarded([&] {
    return DispatchDtype(*dtype, [&](auto tag) {
      using T = decltype(tag);
      deft::cpu::SampleColumns<T>(p, px, ptr<T>(x), ptr<T>(offset), ptr<T>(mask), ptr<T>(cols),
                                  runner);
    });
  });
}

// A run of rows (the sampler's chunk): dx = dx_in + its scatter, doffset and dmask of its rows
// (CheckCol2ImRunBuffers gives the layouts; dx_in is aliased to dx by the caller, so a run
// adds into the previous runs' dx in place).
ffi::Error Col2ImImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                      ffi::AnyBuffer start, ffi::AnyBuffer dcols, ffi::AnyBuffer dx_in,
                      ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> doffset,
                      ffi::Result<ffi::AnyBuffer> dmask, ColumnAttrs attrs) {
  deft::ConvParams p;
  int64_t rows = 0, unit = 1;
  if (auto err = BuildColumnParams(x, offset, mask, start, dcols.dimensions(), attrs, ChunkUnit::kRows, &p, &rows,
                                   &unit);
      !err.success())
    return err;
  auto first = ReadChunkStart(start, unit, rows, p.n * p.h_out, "output rows");
  if (first.has_error()) return first.error();
  auto dtype = CheckCol2ImRunBuffers(p, x, mask, dcols, dx_in, *dx, *doffset, *dmask, *first, rows);
  if (dtype.has_error()) return dtype.error();
  if (rows == 0 || p.w_out == 0) return ffi::Error::Success();
  const int64_t first_image = *first / p.h_out;
  const int64_t dx_images = dx->dimensions()[dx->dimensions().size() - 4];
  const size_t acc_bytes = ffi::ByteWidth(dx->element_type());
  if (dx->untyped_data() != dx_in.untyped_data() && dx->element_count() > 0)  // not aliased: start from dx_in
    std::memcpy(dx->untyped_data(), dx_in.untyped_data(), dx->element_count() * acc_bytes);
  const deft::cpu::PixelRange px{p.batch, p.n * p.pixels_out(), rows * p.w_out, *first * p.w_out};
  const deft::cpu::DxImages di{first_image, dx_images};
  PoolRunner runner(pool);
  return Guarded([&] {
    return DispatchDtype(*dtype, [&](auto tag) {
      using T = decltype(tag);
      using A = typename deft::Acc<T>::type;
      deft::cpu::Col2Im<T>(p, px, di, ptr<T>(x), ptr<T>(offset), ptr<T>(mask), ptr<A>(dcols),
                           ptr<A>(dx), ptr<T>(doffset), ptr<T>(dmask), runner);
    });
  });
}

// The GEMMs of the fused forward: set once from Python (deft_jax/_ffi.py loads the BLAS), read by
// every call.
std::atomic<deft::cpu::SgemmFn> g_sgemm{nullptr};
std::atomic<deft::cpu::DgemmFn> g_dgemm{nullptr};

ffi::Error FusedForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                            ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, CpuForwardAttrs attrs) {
  deft::ConvParams p;
  if (auto err = BuildGeometry(x, offset, mask, kernel, y->dimensions(), attrs, &p); !err.success()) return err;
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype.error();
  if (y->element_type() != x.element_type()) return invalid("y dtype differs from x's");
  if (attrs.tile_pixels < 1) return invalid("tile_pixels must be >= 1");
  const deft::cpu::Gemm gemm{g_sgemm.load(), g_dgemm.load()};
  if ((*dtype == deft::DType::kF64 ? gemm.dgemm == nullptr : gemm.sgemm == nullptr))
    return ffi::Error(ffi::ErrorCode::kFailedPrecondition,
                      "deft_jax: the CPU fused forward has no BLAS loaded (deft_jax._ffi.load_blas)");
  // The GEMMs take int dimensions: rows of a tile, K*C, C_out.
  constexpr int64_t kIntMax = 2147483647;
  if (p.taps() * p.c_in > kIntMax || p.c_out > kIntMax ||
      std::min(attrs.tile_pixels, p.n * p.pixels_out()) > kIntMax)
    return invalid("the CPU fused forward needs kh*kw*C_in, C_out and tile_pixels below 2^31");
  if (y->element_count() == 0) return ffi::Error::Success();
  PoolRunner runner(pool);
  return Guarded([&] {
    return DispatchDtype(*dtype, [&](auto tag) {
      using T = decltype(tag);
      deft::cpu::FusedForward<T>(p, attrs.tile_pixels, ptr<T>(x), ptr<T>(offset),
                                 p.with_mask ? ptr<T>(mask) : nullptr, ptr<T>(kernel), ptr<T>(y), gemm,
                                 runner);
    });
  });
}

}  // namespace

// XLA's intra-op pool and the operands both CPU targets start with: x, offset, mask ((0,) without
// mask) and start (int32 scalar: the first output row, in units of the chunk's R rows).
inline auto ColumnBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>();
}

}  // namespace deft_ffi

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftSampleColumnsCpu, deft_ffi::SampleColumnsImpl,
                              deft_ffi::ColumnBinding()
                                  .Ret<ffi::AnyBuffer>()  // cols [..., b, R, Wo, K, C]
                                  .Attrs<deft_ffi::ColumnAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftCol2ImCpu, deft_ffi::Col2ImImpl,
                              deft_ffi::ColumnBinding()
                                  .Arg<ffi::AnyBuffer>()  // dcols [..., b, R, Wo, K, C]
                                  .Arg<ffi::AnyBuffer>()  // dx_in [..., m, H, W, C]
                                  .Ret<ffi::AnyBuffer>()  // dx [..., m, H, W, C] (aliases dx_in)
                                  .Ret<ffi::AnyBuffer>()  // doffset [..., b, R, Wo, G*K*2]
                                  .Ret<ffi::AnyBuffer>()  // dmask, (0,) without mask
                                  .Attrs<deft_ffi::ColumnAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftFusedForwardCpu, deft_ffi::FusedForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [..., N, H, W, C]
                                  .Arg<ffi::AnyBuffer>()  // offset [..., N, Ho, Wo, G*K*2]
                                  .Arg<ffi::AnyBuffer>()  // mask, (0,) without mask
                                  .Arg<ffi::AnyBuffer>()  // kernel [..., kh, kw, C/fg, Co]
                                  .Ret<ffi::AnyBuffer>()  // y [..., N, Ho, Wo, Co]
                                  .Attrs<deft_ffi::CpuForwardAttrs>());

NB_MODULE(_deft_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["deft_sample_columns_cpu_v3"] = nb::capsule(reinterpret_cast<void*>(DeftSampleColumnsCpu));
    d["deft_col2im_cpu_v3"] = nb::capsule(reinterpret_cast<void*>(DeftCol2ImCpu));
    d["deft_deform_conv2d_fwd_cpu_v1"] = nb::capsule(reinterpret_cast<void*>(DeftFusedForwardCpu));
    return d;
  });
  // The instruction-set build of the CPU kernels this process runs (csrc/cpu/columns_dispatch.cc).
  m.def("cpu_isa", []() { return std::string(deft::cpu::CpuIsaName()); });
  // The fused forward's GEMMs: addresses of row-major cblas_sgemm / cblas_dgemm with 32-bit ints
  // (deft_jax/_ffi.py passes OpenBLAS's); 0 clears one.
  m.def("set_gemm", [](uintptr_t sgemm, uintptr_t dgemm) {
    deft_ffi::g_sgemm.store(reinterpret_cast<deft::cpu::SgemmFn>(sgemm));
    deft_ffi::g_dgemm.store(reinterpret_cast<deft::cpu::DgemmFn>(dgemm));
  });
}
