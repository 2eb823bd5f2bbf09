// CPU sampler and col2im (columns.h). Work is split into tasks that own disjoint output elements:
//   sampler          (block of the call's output pixels): cols of those pixels
//   col2im, pass 1   (block of the call's output pixels): doffset and dmask of those pixels, each a
//                    reduction over its offset group's channels of its own (pixel, tap), and
//                    the table of corners and weights that pass 2 scatters with
//   col2im, buckets  (block of the call's output pixels): each table entry's index, appended to
//                    the list of every (offset group, band of dx rows) its corners fall in
//   col2im, pass 2   (image, offset group, block of channels, band of rows): dx of those
//                    channels and rows, scattered from the entries of its band's list, in order
// No atomics, no per-thread partial buffers: each element's sum has one fixed order, so the
// result does not depend on the thread count or the schedule. The bilinear math is
// deft/geometry.h's make_bilinear, the same as the CUDA kernels'. A corner outside the image reads
// a row of zeros (never the image), so it contributes 0 as in the reference.
//
// This file is compiled once per instruction set (CMakeLists.txt: baseline x86-64 or the host
// architecture, AVX2 + FMA, AVX-512) into namespace deft::cpu::DEFT_CPU_ISA; columns_dispatch.cc
// picks one at run time. Each build is deterministic; builds for different instruction sets may
// differ in the last bits (vector width of the tails, FMA contraction).
#include "cpu/columns_isa.h"

#include <algorithm>
#include <memory>
#include <vector>

#ifndef DEFT_CPU_ISA
#error "compile with -DDEFT_CPU_ISA=<namespace> (see CMakeLists.txt)"
#endif

namespace deft::cpu::DEFT_CPU_ISA {
namespace {

// Output pixels per task: about 8 tasks per thread for balance, at least 8 pixels each.
int64_t PixelBlock(int64_t images, int64_t pixels, int64_t threads) {
  const int64_t want_tasks = 8 * std::max<int64_t>(1, threads);
  const int64_t block = (images * pixels + want_tasks - 1) / want_tasks;
  return std::clamp<int64_t>(block, 8, std::max<int64_t>(1, pixels));
}

// One (image, output pixel, offset group, tap): its bilinear sample point and modulation, and the
// four corners' channel rows of the group in x (zeros for a corner outside the image).
template <typename T, typename A>
struct Tap {
  Bilinear<A> b;
  A m;
  const T* src[4];
  A w[4];
};

// An output pixel: its row in the inputs offset / mask (input image * pixels_out + pixel) and in
// the chunk's outputs cols / dcols / doffset / dmask (output image * pixels_out + pixel), its input
// image and its undeformed position (tap (i, j) adds i * dil_h, j * dil_w).
struct Pixel {
  int64_t row, out, img, y, x;
};

template <typename T, typename A>
struct Sampler {
  const ConvParams& p;
  const T* x;
  const T* offset;
  const T* mask;
  const T* zeros;  // c_per_offset_group() zeros

  // The pixel in row `row` of offset / mask and row `out` of the outputs.
  Pixel at(int64_t row, int64_t out) const {
    const int64_t img = row / p.pixels_out(), pix = row - img * p.pixels_out();
    const int64_t ho = pix / p.w_out, wo = pix - ho * p.w_out;
    return Pixel{row, out, img, p.base_y(ho, 0), p.base_x(wo, 0)};
  }

  // Tap k = i * kw + j of offset group g.
  Bilinear<A> point(const Pixel& q, int64_t g, int64_t i, int64_t j, A* m) const {
    const int64_t k = g * p.taps() + i * p.kw + j;
    const T* off = offset + q.row * p.offset_channels() + k * 2;
    *m = p.with_mask ? load_as<A>(mask[q.row * p.mask_channels() + k]) : A(1);
    return make_bilinear<A>(A(q.y + i * p.dil_h) + load_as<A>(off[0]),
                            A(q.x + j * p.dil_w) + load_as<A>(off[1]), p.h, p.w);
  }

  Tap<T, A> tap(const Pixel& q, int64_t g, int64_t i, int64_t j) const {
    Tap<T, A> t;
    t.b = point(q, g, i, j, &t.m);
    const T* base = x + q.img * p.h * p.w * p.c_in + g * p.c_per_offset_group();
    auto row = [&](bool valid, int64_t dy, int64_t dx) {
      return valid ? base + ((t.b.y0 + dy) * p.w + (t.b.x0 + dx)) * p.c_in : zeros;
    };
    t.src[0] = row(t.b.v00, 0, 0);
    t.src[1] = row(t.b.v01, 0, 1);
    t.src[2] = row(t.b.v10, 1, 0);
    t.src[3] = row(t.b.v11, 1, 1);
    t.w[0] = t.b.w00();
    t.w[1] = t.b.w01();
    t.w[2] = t.b.w10();
    t.w[3] = t.b.w11();
    return t;
  }
};

// What the dx scatter needs of one (pixel, group, tap), written by col2im's first pass: each
// corner's pixel in the image (y * w + x; -1 outside), its weight times the modulation, where
// the entry's row of dcols starts (its group's first channel) and the <= 2 bands of dx rows its
// corners lie in (two adjacent rows), increasing, -1 for none. The index arithmetic is done once,
// here: the later passes visit an entry up to 2 x (channel blocks) times.
template <typename A>
struct Scatter {
  int64_t at[4];
  A wm[4];
  int64_t src;
  int32_t band[2];
};

// dst[c] = (sum over corners of x * w) * m, corners in the reference's order; NaN for every
// channel of a NaN sample point (geometry.h's non-finite policy).
template <typename T, typename A>
void Blend(const Tap<T, A>& t, T* __restrict dst, int64_t n) {
  if (t.b.nan_point) {
    std::fill(dst, dst + n, store_as<T>(t.b.fill()));
    return;
  }
  const T* __restrict s0 = t.src[0];
  const T* __restrict s1 = t.src[1];
  const T* __restrict s2 = t.src[2];
  const T* __restrict s3 = t.src[3];
  const A w0 = t.w[0], w1 = t.w[1], w2 = t.w[2], w3 = t.w[3], m = t.m;
  for (int64_t c = 0; c < n; ++c) {
    const A v = load_as<A>(s0[c]) * w0 + load_as<A>(s1[c]) * w1 + load_as<A>(s2[c]) * w2 +
                load_as<A>(s3[c]) * w3;
    dst[c] = store_as<T>(v * m);
  }
}

// out[j] = sum_c g[c] * src[j][c] for the four corners, in kLanes fixed partial sums (so the
// compiler may vectorise without reassociating: the order, and so the result, is fixed).
constexpr int64_t kLanes = 16;
template <typename T, typename A>
void Dot4(const A* __restrict g, const T* const src[4], int64_t n, A out[4]) {
  const T* __restrict s0 = src[0];
  const T* __restrict s1 = src[1];
  const T* __restrict s2 = src[2];
  const T* __restrict s3 = src[3];
  A a0[kLanes] = {}, a1[kLanes] = {}, a2[kLanes] = {}, a3[kLanes] = {};
  int64_t c = 0;
  for (; c + kLanes <= n; c += kLanes)
    for (int64_t l = 0; l < kLanes; ++l) {
      const A gl = g[c + l];
      a0[l] += gl * load_as<A>(s0[c + l]);
      a1[l] += gl * load_as<A>(s1[c + l]);
      a2[l] += gl * load_as<A>(s2[c + l]);
      a3[l] += gl * load_as<A>(s3[c + l]);
    }
  A t0 = 0, t1 = 0, t2 = 0, t3 = 0;
  for (; c < n; ++c) {
    t0 += g[c] * load_as<A>(s0[c]);
    t1 += g[c] * load_as<A>(s1[c]);
    t2 += g[c] * load_as<A>(s2[c]);
    t3 += g[c] * load_as<A>(s3[c]);
  }
  // The lanes summed as a tree (a fixed order, log2(kLanes) dependent steps instead of kLanes).
  for (int64_t w = kLanes / 2; w > 0; w /= 2)
    for (int64_t l = 0; l < w; ++l) {
      a0[l] += a0[l + w];
      a1[l] += a1[l + w];
      a2[l] += a2[l + w];
      a3[l] += a3[l + w];
    }
  out[0] = a0[0] + t0, out[1] = a1[0] + t1, out[2] = a2[0] + t2, out[3] = a3[0] + t3;
}

// dst[j][c] += w[j] * g[c] for the four corners in one pass over the channels. A corner outside
// the image has its own row of `trash` instead of a row of dx (so the four rows never alias).
template <typename A>
void Scatter4(const A w[4], const A* __restrict g, A* __restrict d0, A* __restrict d1,
              A* __restrict d2, A* __restrict d3, int64_t n) {
  const A w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];
  for (int64_t c = 0; c < n; ++c) {
    const A gc = g[c];
    d0[c] += w0 * gc;
    d1[c] += w1 * gc;
    d2[c] += w2 * gc;
    d3[c] += w3 * gc;
  }
}

// col2im's pass 2 tasks are (dx image, offset group, channel block, band of dx rows). Bands first,
// of >= 2 rows, until there are two tasks per thread: an entry's corners span two rows, so it is
// in <= 2 bands' lists, and more bands add tasks at almost no cost. Then channel blocks of >= 16
// (a 64-byte line of float), at most kMaxBlock (the trash rows are on the stack): each block
// reads all its bands' entries again. No result depends on the split.
constexpr int64_t kMaxBlock = 256;
struct DxSplit {
  int64_t bands, band_rows, block, blocks;
};
inline DxSplit SplitDx(int64_t image_groups, int64_t h, int64_t cg, int64_t threads) {
  const int64_t want = 2 * threads;
  DxSplit d;
  d.bands = std::clamp<int64_t>((want + image_groups - 1) / image_groups, 1, std::max<int64_t>(1, h / 2));
  d.band_rows = (h + d.bands - 1) / d.bands;
  const int64_t per_block = image_groups * d.bands;
  const int64_t nb = std::clamp<int64_t>(std::max((want + per_block - 1) / per_block, (cg + kMaxBlock - 1) / kMaxBlock),
                                         1, std::max<int64_t>(1, cg / 16));
  d.block = std::min(kMaxBlock, (cg + nb - 1) / nb);
  d.blocks = (cg + d.block - 1) / d.block;
  return d;
}

// Lists of table entries per bucket (group g, band b: bucket g * bands + b), each in table order:
// bucket j is items[start[j], start[j + 1]).
struct BucketLists {
  std::vector<int64_t> start;
  std::unique_ptr<int64_t[]> items;
};

// counts[task * buckets + j]: entries of pass-1 task `task` (table entries [task, task + 1) *
// per_task) in bucket j. Appends every entry to its <= 2 bands' lists of its group, the tasks'
// entries in task order, the tasks in parallel.
template <typename A>
BucketLists ListByBucket(const Scatter<A>* table, int64_t entries, int64_t per_task, int64_t G, int64_t K,
                         int64_t bands, std::vector<int64_t>& counts, TaskRunner& runner) {
  const int64_t buckets = G * bands, tasks = (entries + per_task - 1) / per_task;
  BucketLists out;
  out.start.assign(buckets + 1, 0);
  for (int64_t j = 0, at = 0; j < buckets; ++j) {  // counts become each task's first slot
    out.start[j] = at;
    for (int64_t t = 0; t < tasks; ++t) {
      const int64_t c = counts[t * buckets + j];
      counts[t * buckets + j] = at;
      at += c;
    }
    out.start[j + 1] = at;
  }
  out.items.reset(new int64_t[out.start[buckets]]);
  runner.Run(tasks, [&](int64_t task) {
    const int64_t e0 = task * per_task, e1 = std::min(entries, e0 + per_task);
    int64_t* next = counts.data() + task * buckets;
    for (int64_t idx = e0, g = 0, k = 0; idx < e1; ++idx) {  // g, k: idx's group and tap
      const Scatter<A>& e = table[idx];
      for (int m = 0; m < 2 && e.band[m] >= 0; ++m) out.items[next[g * bands + e.band[m]]++] = idx;
      if (++k == K) k = 0, g = g + 1 == G ? 0 : g + 1;
    }
  });
  return out;
}

}  // namespace

template <typename T>
void SampleColumns(const ConvParams& p, const PixelRange& px, const T* x, const T* offset, const T* mask,
                   T* cols, TaskRunner& runner) {
  using A = typename Acc<T>::type;
  const int64_t total = px.total(), K = p.taps(), C = p.c_in;
  const int64_t G = p.offset_groups, Cg = p.c_per_offset_group();
  if (total == 0 || K == 0 || C == 0) return;
  const std::vector<T> zeros(Cg, store_as<T>(A(0)));
  const Sampler<T, A> s{p, x, offset, mask, zeros.data()};
  const int64_t block = PixelBlock(1, total, runner.threads());
  runner.Run((total + block - 1) / block, [&](int64_t task) {
    const int64_t t0 = task * block, t1 = std::min(total, t0 + block);
    for (int64_t t = t0; t < t1; ++t) {
      const Pixel q = s.at(px.row(t), t);
      T* out = cols + q.out * K * C;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < p.kh; ++i)
          for (int64_t j = 0; j < p.kw; ++j)
            Blend(s.tap(q, g, i, j), out + (i * p.kw + j) * C + g * Cg, Cg);
    }
  });
}

template <typename T>
void Col2Im(const ConvParams& p, const PixelRange& px, const DxImages& di, const T* x, const T* offset,
            const T* mask, const typename Acc<T>::type* dcols, typename Acc<T>::type* dx, T* doffset,
            T* dmask, TaskRunner& runner) {
  using A = typename Acc<T>::type;
  const int64_t total = px.total(), images = p.batch * di.count, P = p.pixels_out(), K = p.taps();
  const int64_t C = p.c_in, G = p.offset_groups, Cg = p.c_per_offset_group(), HW = p.h * p.w;
  if (total == 0 || C == 0) return;
  const std::vector<T> zeros(Cg, store_as<T>(A(0)));
  const Sampler<T, A> s{p, x, offset, mask, zeros.data()};
  const int64_t threads = runner.threads();
  const DxSplit split = SplitDx(images * G, p.h, Cg, threads);
  const int64_t bands = split.bands;
  std::vector<int32_t> band_of_row(p.h);
  for (int64_t r = 0; r < p.h; ++r) band_of_row[r] = static_cast<int32_t>(r / split.band_rows);

  // Per (pixel of the call, group, tap), in that order: pass 1 writes every entry (so no zeroing),
  // the bucket lists and pass 2 read it.
  const int64_t entries = total * G * K;
  std::unique_ptr<Scatter<A>[]> scatter(new Scatter<A>[entries]);
  const int64_t block = PixelBlock(1, total, threads);
  const int64_t tasks1 = (total + block - 1) / block;
  std::vector<int64_t> counts(tasks1 * G * bands, 0);  // pass-1 task x bucket

  // Pass 1, (block of the call's pixels) tasks: doffset and dmask, the scatter table and the
  // bucket counts.
  runner.Run(tasks1, [&](int64_t task) {
    const int64_t u0 = task * block, u1 = std::min(total, u0 + block);
    int64_t* cnt = counts.data() + task * G * bands;
    for (int64_t u = u0; u < u1; ++u) {
      const Pixel q = s.at(px.row(u), u);
      Scatter<A>* sc = scatter.get() + q.out * G * K;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t i = 0; i < p.kh; ++i)
          for (int64_t j = 0; j < p.kw; ++j) {
            const int64_t k = i * p.kw + j;
            const Tap<T, A> t = s.tap(q, g, i, j);
            A d[4];
            Dot4(dcols + (q.out * K + k) * C + g * Cg, t.src, Cg, d);
            const A ly = t.b.ly, lx = t.b.lx, f = t.b.fill();  // f: NaN for a NaN point, else 0
            // d sample / d(y, x) of each corner's weight, as torchvision.
            const A gy = f - (A(1) - lx) * d[0] - lx * d[1] + (A(1) - lx) * d[2] + lx * d[3];
            const A gx = f - (A(1) - ly) * d[0] + (A(1) - ly) * d[1] - ly * d[2] + ly * d[3];
            T* doff = doffset + q.out * p.offset_channels() + (g * K + k) * 2;
            doff[0] = store_as<T>(A(t.m * gy));
            doff[1] = store_as<T>(A(t.m * gx));
            if (p.with_mask) {
              const A gm = f + t.w[0] * d[0] + t.w[1] * d[1] + t.w[2] * d[2] + t.w[3] * d[3];
              dmask[q.out * p.mask_channels() + g * K + k] = store_as<T>(gm);
            }
            Scatter<A>& e = sc[g * K + k];
            const bool valid[4] = {t.b.v00, t.b.v01, t.b.v10, t.b.v11};
            for (int c = 0; c < 4; ++c) {
              e.at[c] = valid[c] ? (t.b.y0 + c / 2) * p.w + (t.b.x0 + c % 2) : -1;
              e.wm[c] = t.m * t.w[c];
            }
            e.src = (q.out * K + k) * C + g * Cg;
            const int32_t top = valid[0] || valid[1] ? band_of_row[t.b.y0] : -1;
            const int32_t bottom = valid[2] || valid[3] ? band_of_row[t.b.y0 + 1] : -1;
            e.band[0] = top >= 0 ? top : bottom;
            e.band[1] = top >= 0 && bottom > top ? bottom : -1;
            for (int m = 0; m < 2 && e.band[m] >= 0; ++m) ++cnt[g * bands + e.band[m]];
          }
    }
  });

  const BucketLists lists = ListByBucket(scatter.get(), entries, block * G * K, G, K, bands, counts, runner);

  // Pass 2, (dx image, offset group, channel block, band of dx rows) tasks: dx += the scatter of
  // every entry of the call's pixels in that image with a corner in the band, in table order.
  // Corners outside the band (or the image) go to `trash`.
  const int64_t blocks = split.blocks, cb = split.block;
  runner.Run(images * G * blocks * bands, [&](int64_t task) {
    const int64_t band = task % bands, tk = task / bands;
    const int64_t o = tk / (G * blocks), g = (tk / blocks) % G, c0 = (tk % blocks) * cb;
    const int64_t n = std::min(Cg, c0 + cb) - c0, ch = g * Cg + c0;
    // dx pixels [lo, hi) (rows [band * band_rows, ...)) are this task's.
    const int64_t rows = split.band_rows;
    const int64_t lo = std::min(HW, band * rows * p.w), hi = std::min(HW, lo + rows * p.w);
    A* dxi = dx + o * HW * C + ch;
    A trash[4][kMaxBlock] = {};
    // The call's pixels of dx image o: those of its problem whose offset row is in the image;
    // their entries are the table's [t_lo, t_hi) * G * K, a run of the bucket's sorted list.
    const int64_t problem = o / di.count, first = (di.first + o % di.count) * P - px.start;
    const int64_t t_lo = problem * px.count + std::clamp<int64_t>(first, 0, px.count);
    const int64_t t_hi = problem * px.count + std::clamp<int64_t>(first + P, 0, px.count);
    const int64_t* list_begin = lists.items.get() + lists.start[g * bands + band];
    const int64_t* list_end = lists.items.get() + lists.start[g * bands + band + 1];
    const int64_t* it = std::lower_bound(list_begin, list_end, t_lo * G * K);
    const int64_t* stop = std::lower_bound(it, list_end, t_hi * G * K);
    for (; it != stop; ++it) {
      const Scatter<A>& e = scatter[*it];
      A* d[4];
      for (int c = 0; c < 4; ++c) {
        const int64_t at = e.at[c];
        d[c] = at >= lo && at < hi ? dxi + at * C : trash[c];  // at = -1 outside the image
      }
      Scatter4(e.wm, dcols + e.src + c0, d[0], d[1], d[2], d[3], n);
    }
  });
}

DEFT_INSTANTIATE_COLUMNS

}  // namespace deft::cpu::DEFT_CPU_ISA
