"""LRU model of the ring forward's corner-line reuse in L1 (docs/kernels.md, "Why the ring is not
faster still"): one block's output pixels (a flat tile of `--tile` consecutive pixels), 3x3 taps with
offsets ~ N(0, sigma^2), four bilinear corners each (clamped to the image), one cache line per
(pixel, channel chunk). Walks the (tap, chunk) steps in the tap-outer order (every chunk of a tap,
then the next tap: today's ring) and the taps-inner order (every tap of a chunk, then the next
chunk), and prints the fraction of corner loads that find their line in an LRU cache of the given
size. A model, not a measurement: the real L1 is not one block's LRU (sectors, associativity, the
other block of a 2-block SM); Nsight Compute's MemoryWorkloadAnalysis gives the real hit rate.
  python benchmarks/l1_reuse_model.py --shape 14,14,256 --tile 128 --l1-kib 124,92
"""
import argparse
from collections import OrderedDict

import numpy as np


def corners(h, w, tile, start, sigma, rng):
    """[tap][corner] -> array of flat input-pixel indices (image-major) of the tile's samples, -1
    where the sample lies outside the image (it reads nothing)."""
    pix = np.arange(start, start + tile)
    img, rem = pix // (h * w), pix % (h * w)
    ho, wo = rem // w, rem % w
    out = []
    for t in range(9):
        i, j = divmod(t, 3)
        py = ho - 1 + i + sigma * rng.standard_normal(tile)
        px = wo - 1 + j + sigma * rng.standard_normal(tile)
        inside = (py > -1) & (py < h) & (px > -1) & (px < w)
        y0, x0 = np.floor(py).astype(int), np.floor(px).astype(int)
        out.append([np.where(inside, (img * h + np.clip(y0 + dy, 0, h - 1)) * w + np.clip(x0 + dx, 0, w - 1), -1)
                    for dy in (0, 1) for dx in (0, 1)])
    return out


def hit_rate(recs, chunks, order, lines):
    steps = ([(t, c) for t in range(9) for c in range(chunks)] if order == "tap-outer"
             else [(t, c) for c in range(chunks) for t in range(9)])
    cache, hits, total = OrderedDict(), 0, 0
    for t, c in steps:
        for arr in recs[t]:
            for p in arr[arr >= 0]:
                key = (int(p), c)
                total += 1
                if key in cache:
                    hits += 1
                    cache.move_to_end(key)
                else:
                    cache[key] = None
                    if len(cache) > lines:
                        cache.popitem(last=False)
    return hits / max(total, 1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="14,14,256", help="H,W,C_in of the layer (S4: 14,14,256)")
    ap.add_argument("--tile", type=int, default=128, help="output pixels per block")
    ap.add_argument("--chunk-bytes", type=int, default=128, help="bytes of one pixel's channel chunk (a line)")
    ap.add_argument("--chunk-channels", type=int, default=32)
    ap.add_argument("--l1-kib", default="124,92", help="cache sizes to model, KiB")
    ap.add_argument("--sigma", type=float, default=2.0)
    ap.add_argument("--blocks", type=int, default=6, help="tiles averaged (consecutive, fresh offsets)")
    a = ap.parse_args()
    h, w, c = (int(v) for v in a.shape.split(","))
    chunks = c // a.chunk_channels
    for kib in (int(v) for v in a.l1_kib.split(",")):
        lines = kib * 1024 // a.chunk_bytes
        for order in ("tap-outer", "taps-inner"):
            rates = [hit_rate(corners(h, w, a.tile, b * a.tile, a.sigma, np.random.default_rng(b)), chunks, order, lines)
                     for b in range(a.blocks)]
            print(f"{a.shape} tile {a.tile}, {kib} KiB: {order:10s} L1 hit rate {np.mean(rates):.2f}")


if __name__ == "__main__":
    main()
