// CPU deformable convolution. Work is split into tasks of `pixels_per_task` output pixels of one
// image; each task samples its columns [pixels, taps, C_in] into a thread-local buffer (never the
// whole column tensor) and reduces them against the kernel. The backward recomputes the samples,
// forms grad_col = dY W^T per task, and scatters into thread-private dx / dkernel accumulators
// whose shared slices are reduced in a fixed order after the threads join (deterministic).
#include "cpu/deform_conv_cpu.h"

#include <algorithm>
#include <cstdlib>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include "deft/host_half.h"

namespace deft::cpu {
namespace {

int64_t NumThreads() {
  if (const char* env = std::getenv("DEFT_CPU_THREADS")) {
    const long v = std::strtol(env, nullptr, 10);
    if (v > 0) return v;
  }
  return std::max<int64_t>(1, std::thread::hardware_concurrency());
}

// Splits [0, n) into one contiguous range per thread. Contiguous ranges keep a thread on few
// images, so only the first and last image of a range can be shared with another thread.
std::vector<std::pair<int64_t, int64_t>> Chunks(int64_t n, int64_t threads) {
  std::vector<std::pair<int64_t, int64_t>> r;
  const int64_t chunk = (n + threads - 1) / threads;
  for (int64_t b = 0; b < n; b += chunk) r.emplace_back(b, std::min(n, b + chunk));
  return r;
}

// fn(begin, end, thread) for each chunk, the first on the calling thread.
template <typename F>
void ParallelFor(const std::vector<std::pair<int64_t, int64_t>>& chunks, F&& fn) {
  std::vector<std::thread> pool;
  for (size_t t = 1; t < chunks.size(); ++t)
    pool.emplace_back([&fn, &chunks, t] { fn(chunks[t].first, chunks[t].second, int64_t(t)); });
  if (!chunks.empty()) fn(chunks[0].first, chunks[0].second, int64_t{0});
  for (auto& th : pool) th.join();
}

// Reads of x/offset/mask and the bilinear blend, shared by forward and backward.
template <typename T, typename A>
struct Sampler {
  const ConvParams& p;
  const T* x;
  const T* offset;
  const T* mask;

  // Sample point and modulation of tap k, offset group g, at output pixel `pix` of image `img`
  // (img runs over batch * n).
  Bilinear<A> point(int64_t img, int64_t pix, int64_t g, int64_t k, A* m) const {
    const int64_t K = p.taps();
    const T* off = offset + (img * p.pixels_out() + pix) * p.offset_channels() + (g * K + k) * 2;
    *m = p.with_mask ? load_as<A>(mask[(img * p.pixels_out() + pix) * p.mask_channels() + g * K + k])
                     : A(1);
    const int64_t ho = pix / p.w_out, wo = pix % p.w_out, i = k / p.kw, j = k % p.kw;
    const A y = A(p.base_y(ho, i)) + load_as<A>(off[0]);
    const A xx = A(p.base_x(wo, j)) + load_as<A>(off[1]);
    return make_bilinear<A>(y, xx, p.h, p.w);
  }

  // Pointer to channel 0 of offset group g at pixel (yy, xx) of image img.
  const T* at(int64_t img, int64_t yy, int64_t xx, int64_t g) const {
    return x + ((img * p.h + yy) * p.w + xx) * p.c_in + g * p.c_per_offset_group();
  }

  // out[c] = scale * sample of channel c of group g, c in [0, C/G). Starts from fill() * scale:
  // NaN for a NaN point, and for a non-finite scale (mask) even where the sample is 0.
  void blend(const Bilinear<A>& b, int64_t img, int64_t g, A scale, A* out) const {
    const int64_t cg = p.c_per_offset_group();
    std::fill(out, out + cg, b.fill() * scale);
    if (!b.inside) return;
    auto add = [&](bool valid, int64_t dy, int64_t dx, A w) {
      if (!valid) return;
      const T* src = at(img, b.y0 + dy, b.x0 + dx, g);
      const A ws = w * scale;
      for (int64_t c = 0; c < cg; ++c) out[c] += ws * load_as<A>(src[c]);
    };
    add(b.v00, 0, 0, b.w00());
    add(b.v01, 0, 1, b.w01());
    add(b.v10, 1, 0, b.w10());
    add(b.v11, 1, 1, b.w11());
  }
};

// Kernel converted to the accumulation type once per call: [batch][K][C_in/fg][C_out].
template <typename T, typename A>
std::vector<A> KernelAsAcc(const ConvParams& p, const T* kernel) {
  std::vector<A> wk(p.batch * p.kernel_size());
  for (size_t i = 0; i < wk.size(); ++i) wk[i] = load_as<A>(kernel[i]);
  return wk;
}

// Deterministic accumulation of a thread's contributions to keyed slices of `global` (images for
// dx, problems for dkernel). A thread owns the interior keys of its range exclusively and adds into
// them directly; its first and last keys may be shared, so it accumulates those privately and
// Reduce() adds the private copies in thread order after the join. No result depends on timing.
template <typename A>
struct KeyedPartials {
  int64_t first = -1, last = -1;
  std::vector<A> first_buf, last_buf;

  void Init(int64_t first_key, int64_t last_key, int64_t size) {
    first = first_key;
    last = last_key == first_key ? -1 : last_key;
    first_buf.assign(size, A(0));
    if (last >= 0) last_buf.assign(size, A(0));
  }
  A* Target(int64_t key, A* global) {
    if (key == first) return first_buf.data();
    if (key == last) return last_buf.data();
    return global + key * static_cast<int64_t>(first_buf.size());
  }
  void Reduce(A* global) const {
    auto add = [&](int64_t key, const std::vector<A>& buf) {
      if (key < 0) return;
      A* dst = global + key * static_cast<int64_t>(buf.size());
      for (size_t i = 0; i < buf.size(); ++i) dst[i] += buf[i];
    };
    add(first, first_buf);
    add(last, last_buf);
  }
};

// Dot product with kLanes independent partial sums: without -ffast-math the compiler may not
// reorder a single running sum, so this spelling is what lets it vectorise (fixed order: the
// result is still deterministic).
constexpr int64_t kLanes = 8;
template <typename A>
A Dot(const A* a, const A* b, int64_t n) {
  A part[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) part[l] += a[i + l] * b[i + l];
  A sum = 0;
  for (; i < n; ++i) sum += a[i] * b[i];
  for (int64_t l = 0; l < kLanes; ++l) sum += part[l];
  return sum;
}

// Output pixels processed together in the GEMM so each kernel row loaded is used this often.
constexpr int64_t kPixelBlock = 16;

}  // namespace

template <typename T>
void Forward(const ConvParams& p, int64_t pixels_per_task, const T* x, const T* offset,
             const T* mask, const T* kernel, T* y) {
  using A = typename Acc<T>::type;
  const int64_t K = p.taps(), C = p.c_in, Co = p.c_out, G = p.offset_groups;
  const int64_t fg = p.feature_groups, Cig = p.c_in_per_group(), Cog = p.c_out_per_group();
  const int64_t P = p.pixels_out(), blocks = (P + pixels_per_task - 1) / pixels_per_task;
  const int64_t tasks = p.batch * p.n * blocks;
  const int64_t threads = std::min(NumThreads(), tasks);

  const std::vector<A> wk = KernelAsAcc<T, A>(p, kernel);
  std::vector<std::vector<A>> cols(threads, std::vector<A>(pixels_per_task * K * C));
  std::vector<std::vector<A>> accs(threads, std::vector<A>(kPixelBlock * Co));
  const Sampler<T, A> s{p, x, offset, mask};

  ParallelFor(Chunks(tasks, threads), [&](int64_t t0, int64_t t1, int64_t th) {
    A* col = cols[th].data();  // [pixels][K][C]
    A* acc = accs[th].data();  // [kPixelBlock][Co]
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t img = t / blocks, q0 = (t % blocks) * pixels_per_task;
      const int64_t nq = std::min(P, q0 + pixels_per_task) - q0;
      const A* w = wk.data() + (img / p.n) * p.kernel_size();
      for (int64_t q = 0; q < nq; ++q)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t k = 0; k < K; ++k) {
            A m;
            const Bilinear<A> b = s.point(img, q0 + q, g, k, &m);
            s.blend(b, img, g, m, col + (q * K + k) * C + g * p.c_per_offset_group());
          }
      for (int64_t q = 0; q < nq; q += kPixelBlock) {
        const int64_t qb = std::min(kPixelBlock, nq - q);
        std::fill(acc, acc + qb * Co, A(0));
        for (int64_t f = 0; f < fg; ++f)
          for (int64_t k = 0; k < K; ++k)
            for (int64_t ci = 0; ci < Cig; ++ci) {
              const A* wrow = w + (k * Cig + ci) * Co + f * Cog;
              for (int64_t r = 0; r < qb; ++r) {
                const A a = col[((q + r) * K + k) * C + f * Cig + ci];
                A* out = acc + r * Co + f * Cog;
                for (int64_t o = 0; o < Cog; ++o) out[o] += a * wrow[o];
              }
            }
        T* dst = y + (img * P + q0 + q) * Co;
        for (int64_t i = 0; i < qb * Co; ++i) dst[i] = store_as<T>(acc[i]);
      }
    }
  });
}

template <typename T>
void Backward(const ConvParams& p, int64_t pixels_per_task, const T* x, const T* offset,
              const T* mask, const T* kernel, const T* dy, T* dx, T* doffset, T* dmask,
              T* dkernel) {
  using A = typename Acc<T>::type;
  constexpr bool kDirect = std::is_same_v<T, A>;  // accumulate straight into the outputs
  const int64_t K = p.taps(), C = p.c_in, Co = p.c_out, G = p.offset_groups;
  const int64_t Cg = p.c_per_offset_group();
  const int64_t fg = p.feature_groups, Cig = p.c_in_per_group(), Cog = p.c_out_per_group();
  const int64_t P = p.pixels_out(), blocks = (P + pixels_per_task - 1) / pixels_per_task;
  const int64_t images = p.batch * p.n, tasks = images * blocks;
  const int64_t image_size = p.h * p.w * C;
  const int64_t threads = std::min(NumThreads(), tasks);

  const std::vector<A> wk = KernelAsAcc<T, A>(p, kernel);
  std::vector<A> dx_acc(kDirect ? 0 : images * image_size);
  std::vector<A> dw_acc(kDirect ? 0 : p.batch * p.kernel_size());
  A* dx_global = kDirect ? reinterpret_cast<A*>(dx) : dx_acc.data();
  A* dw_global = kDirect ? reinterpret_cast<A*>(dkernel) : dw_acc.data();
  std::fill(dx_global, dx_global + images * image_size, A(0));
  std::fill(dw_global, dw_global + p.batch * p.kernel_size(), A(0));

  struct Scratch {
    std::vector<A> samp, gcol, mod, dyv, cval;
    KeyedPartials<A> dxp, dwp;
  };
  const auto chunks = Chunks(tasks, threads);
  std::vector<Scratch> scratch(chunks.size());
  for (size_t th = 0; th < chunks.size(); ++th) {
    Scratch& sc = scratch[th];
    sc.samp.resize(pixels_per_task * K * C);  // unmodulated samples [pixels][K][C]
    sc.gcol.resize(pixels_per_task * K * C);  // grad_col [pixels][K][C]
    sc.mod.resize(pixels_per_task * G * K);   // modulation [pixels][G][K]
    sc.dyv.resize(Co);
    sc.cval.resize(Cg);
    const int64_t img0 = chunks[th].first / blocks, img1 = (chunks[th].second - 1) / blocks;
    sc.dxp.Init(img0, img1, image_size);
    sc.dwp.Init(img0 / p.n, img1 / p.n, p.kernel_size());
  }
  const Sampler<T, A> s{p, x, offset, mask};

  ParallelFor(chunks, [&](int64_t t0, int64_t t1, int64_t th) {
    Scratch& sc = scratch[th];
    A *samp = sc.samp.data(), *gcol = sc.gcol.data(), *mod = sc.mod.data(), *dyv = sc.dyv.data();
    A* cval = sc.cval.data();
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t img = t / blocks, b = img / p.n, q0 = (t % blocks) * pixels_per_task;
      const int64_t nq = std::min(P, q0 + pixels_per_task) - q0;
      const A* w = wk.data() + b * p.kernel_size();
      A* dxp = sc.dxp.Target(img, dx_global);
      A* dwp = sc.dwp.Target(b, dw_global);

      for (int64_t q = 0; q < nq; ++q)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t k = 0; k < K; ++k) {
            const Bilinear<A> bl = s.point(img, q0 + q, g, k, &mod[(q * G + g) * K + k]);
            s.blend(bl, img, g, A(1), samp + (q * K + k) * C + g * Cg);
          }

      // grad_col = dY W^T and dW += (mask * samples)^T dY, one pixel at a time.
      for (int64_t q = 0; q < nq; ++q) {
        const T* dyq = dy + (img * P + q0 + q) * Co;
        for (int64_t o = 0; o < Co; ++o) dyv[o] = load_as<A>(dyq[o]);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t f = 0; f < fg; ++f)
            for (int64_t ci = 0; ci < Cig; ++ci) {
              const int64_t c = f * Cig + ci, row = (k * Cig + ci) * Co + f * Cog;
              const A* wrow = w + row;
              const A* d = dyv + f * Cog;
              gcol[(q * K + k) * C + c] = Dot(d, wrow, Cog);
              const A a = samp[(q * K + k) * C + c] * mod[(q * G + c / Cg) * K + k];
              A* dwrow = dwp + row;
              for (int64_t o = 0; o < Cog; ++o) dwrow[o] += a * d[o];
            }
      }

      // dmask, doffset (reductions over the group's channels) and the dx scatter.
      for (int64_t q = 0; q < nq; ++q)
        for (int64_t g = 0; g < G; ++g)
          for (int64_t k = 0; k < K; ++k) {
            A m;
            const Bilinear<A> bl = s.point(img, q0 + q, g, k, &m);
            const A* gc = gcol + (q * K + k) * C + g * Cg;
            const A* sp = samp + (q * K + k) * C + g * Cg;
            const A gm = Dot(gc, sp, Cg);
            A gy = bl.fill(), gx = bl.fill();  // a NaN point's derivatives are NaN (else 0)
            if (bl.inside) {
              const A ly = bl.ly, lx = bl.lx;
              // (d sample / dy, d sample / dx) coefficient of each corner, as torchvision.
              auto corner = [&](bool valid, int64_t oy, int64_t ox, A wgt, A cy, A cx) {
                if (!valid) return;
                const T* src = s.at(img, bl.y0 + oy, bl.x0 + ox, g);
                A* dst = dxp + ((bl.y0 + oy) * p.w + (bl.x0 + ox)) * C + g * Cg;
                const A wm = wgt * m;
                A* v = cval;  // the corner's values in the accumulation type
                for (int64_t c = 0; c < Cg; ++c) v[c] = load_as<A>(src[c]);
                for (int64_t c = 0; c < Cg; ++c) dst[c] += wm * gc[c];
                const A dot = Dot(gc, v, Cg);
                gy += cy * dot;
                gx += cx * dot;
              };
              corner(bl.v00, 0, 0, bl.w00(), -(A(1) - lx), -(A(1) - ly));
              corner(bl.v01, 0, 1, bl.w01(), -lx, A(1) - ly);
              corner(bl.v10, 1, 0, bl.w10(), A(1) - lx, -ly);
              corner(bl.v11, 1, 1, bl.w11(), lx, ly);
            }
            const int64_t pix = img * P + q0 + q;
            T* doff = doffset + pix * p.offset_channels() + (g * K + k) * 2;
            doff[0] = store_as<T>(A(m * gy));
            doff[1] = store_as<T>(A(m * gx));
            if (p.with_mask) dmask[pix * p.mask_channels() + g * K + k] = store_as<T>(gm);
          }
    }
  });
  for (const Scratch& sc : scratch) {
    sc.dxp.Reduce(dx_global);
    sc.dwp.Reduce(dw_global);
  }

  if constexpr (!kDirect) {
    for (int64_t i = 0; i < images * image_size; ++i) dx[i] = store_as<T>(dx_acc[i]);
    for (int64_t i = 0; i < p.batch * p.kernel_size(); ++i) dkernel[i] = store_as<T>(dw_acc[i]);
  }
}

#define DEFT_INSTANTIATE(T)                                                                    \
  template void Forward<T>(const ConvParams&, int64_t, const T*, const T*, const T*, const T*, \
                           T*);                                                                \
  template void Backward<T>(const ConvParams&, int64_t, const T*, const T*, const T*, const T*, \
                            const T*, T*, T*, T*, T*);
DEFT_INSTANTIATE(float)
DEFT_INSTANTIATE(double)
DEFT_INSTANTIATE(bf16_t)
DEFT_INSTANTIATE(f16_t)
#undef DEFT_INSTANTIATE

}  // namespace deft::cpu
