// XLA typed-FFI handlers for platform "cpu" and the nanobind module `_deft_cpu` that hands their
// capsules to Python. Decoding, checking and dtype dispatch only; the arithmetic is in csrc/cpu/.
#include <exception>
#include <new>
#include <string>

#include "cpu/deform_conv_cpu.h"
#include "deft/host_half.h"
#include "ffi/conv_attrs.h"
#include "nanobind/nanobind.h"
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

// The CPU code allocates its scratch; turn an allocation failure into an error, not a crash.
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

ffi::Error ForwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                       ffi::AnyBuffer kernel, ffi::Result<ffi::AnyBuffer> y, ConvAttrs attrs) {
  deft::ConvParams p;
  if (auto err = BuildParams(x, offset, mask, kernel, y->dimensions(), attrs, &p); !err.success())
    return err;
  auto dtype = to_dtype(x.element_type());
  if (dtype.has_error()) return dtype.error();
  if (y->element_type() != x.element_type()) return invalid("output dtype differs from x's");
  if (y->element_count() == 0) return ffi::Error::Success();
  const int64_t pixels = tile_of(attrs).pixels();
  return Guarded([&] {
    return DispatchDtype(*dtype, [&](auto tag) {
      using T = decltype(tag);
      deft::cpu::Forward<T>(p, pixels, ptr<T>(x), ptr<T>(offset), ptr<T>(mask), ptr<T>(kernel),
                            ptr<T>(y));
    });
  });
}

ffi::Error BackwardImpl(ffi::AnyBuffer x, ffi::AnyBuffer offset, ffi::AnyBuffer mask,
                        ffi::AnyBuffer kernel, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dx,
                        ffi::Result<ffi::AnyBuffer> doffset, ffi::Result<ffi::AnyBuffer> dmask,
                        ffi::Result<ffi::AnyBuffer> dkernel, ConvAttrs attrs) {
  deft::ConvParams p;
  if (auto err = BuildParams(x, offset, mask, kernel, dy.dimensions(), attrs, &p); !err.success())
    return err;
  auto dtype = CheckBackwardBuffers(x, offset, mask, kernel, dy, *dx, *doffset, *dmask, *dkernel);
  if (dtype.has_error()) return dtype.error();
  if (x.element_count() == 0 || dy.element_count() == 0) return ffi::Error::Success();
  const int64_t pixels = tile_of(attrs).pixels();
  return Guarded([&] {
    return DispatchDtype(*dtype, [&](auto tag) {
      using T = decltype(tag);
      deft::cpu::Backward<T>(p, pixels, ptr<T>(x), ptr<T>(offset), ptr<T>(mask), ptr<T>(kernel),
                             ptr<T>(dy), ptr<T>(dx), ptr<T>(doffset), ptr<T>(dmask),
                             ptr<T>(dkernel));
    });
  });
}

}  // namespace
}  // namespace deft_ffi

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftDeformConv2dFwdCpu, deft_ffi::ForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Arg<ffi::AnyBuffer>()  // mask, (0,) without mask
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Ret<ffi::AnyBuffer>()  // y
                                  .Attrs<deft_ffi::ConvAttrs>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DeftDeformConv2dBwdCpu, deft_ffi::BackwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()  // x
                                  .Arg<ffi::AnyBuffer>()  // offset
                                  .Arg<ffi::AnyBuffer>()  // mask, (0,) without mask
                                  .Arg<ffi::AnyBuffer>()  // kernel
                                  .Arg<ffi::AnyBuffer>()  // dy
                                  .Ret<ffi::AnyBuffer>()  // dx
                                  .Ret<ffi::AnyBuffer>()  // doffset
                                  .Ret<ffi::AnyBuffer>()  // dmask, (0,) without mask
                                  .Ret<ffi::AnyBuffer>()  // dkernel
                                  .Attrs<deft_ffi::ConvAttrs>());

NB_MODULE(_deft_cpu, m) {
  m.def("registrations", []() {
    nb::dict d;
    d["deft_deform_conv2d_fwd_v3"] = nb::capsule(reinterpret_cast<void*>(DeftDeformConv2dFwdCpu));
    d["deft_deform_conv2d_bwd_v3"] = nb::capsule(reinterpret_cast<void*>(DeftDeformConv2dBwdCpu));
    return d;
  });
}
