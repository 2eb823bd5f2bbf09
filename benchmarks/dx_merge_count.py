"""How many global dx atomics the data pass issues per dx element, by how widely a block merges.

The fused backward's data pass (csrc/cuda/backward.cuh) runs one block per (pixel tile, tap,
channel chunk) and merges on chip the (pixel, corner) entries of its tap that land on the same
input position, then adds each merged position to dx with one atomic per channel vector. This
counts, on the CPU, the distinct positions per block (= atomics per channel vector) for blocks
that merge over one tap (today), over a kernel row's taps, and over all taps, for a 3x3 kernel,
pad 1, stride 1 on 64x64 images with offsets ~N(0, sigma^2) (the benchmark's sigma is 2).

Run: python benchmarks/dx_merge_count.py [--sigmas 0.5,2,8] [--images 4]
"""
import argparse

import numpy as np


def corner_positions(y0, x0, th, tw, tap, off, h, w):
    """Input positions (flattened) of the in-image bilinear corners of one tap over one tile."""
    i, j = divmod(tap, 3)
    ys = np.arange(y0, y0 + th)[:, None] - 1 + i + off[y0:y0 + th, x0:x0 + tw, tap, 0]
    xs = np.arange(x0, x0 + tw)[None, :] - 1 + j + off[y0:y0 + th, x0:x0 + tw, tap, 1]
    ys, xs = ys.ravel(), xs.ravel()
    inside = (ys > -1) & (ys < h) & (xs > -1) & (xs < w)
    fy, fx = np.floor(ys).astype(int), np.floor(xs).astype(int)
    out = []
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = fy + dy, fx + dx
            ok = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
            out.append((yy * w + xx)[ok])
    return np.concatenate(out)


def count(th, tw, sigma, images, rng, h=64, w=64):
    """(corner entries, atomics merging per tap, per kernel row, over all taps) per dx position."""
    entries = per_tap = per_row = all_taps = 0
    for _ in range(images):
        off = rng.normal(0.0, sigma, size=(h, w, 9, 2))
        for y0 in range(0, h, th):
            for x0 in range(0, w, tw):
                pos = [corner_positions(y0, x0, th, tw, t, off, h, w) for t in range(9)]
                entries += sum(p.size for p in pos)
                per_tap += sum(np.unique(p).size for p in pos)
                per_row += sum(np.unique(np.concatenate(pos[3 * r:3 * r + 3])).size for r in range(3))
                all_taps += np.unique(np.concatenate(pos)).size
    n = images * h * w
    return entries / n, per_tap / n, per_row / n, all_taps / n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sigmas", default="0.5,2,8")
    ap.add_argument("--images", type=int, default=4)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    print("tile   sigma  entries  atomics per dx position (per channel vector): per tap / per row of 3 / all 9 taps")
    for sigma in (float(s) for s in a.sigmas.split(",")):
        for th, tw in ((8, 8), (1, 64), (16, 16)):
            e, t, r, k = count(th, tw, sigma, a.images, rng)
            print(f"{th:2d}x{tw:<3d} {sigma:5.1f}  {e:7.1f}  {t:6.2f} / {r:6.2f} ({t / r:.1f}x fewer) / {k:6.2f} ({t / k:.1f}x fewer)")


if __name__ == "__main__":
    main()
