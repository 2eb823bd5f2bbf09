"""One poisoned forward + backward per CUDA kernel family, for compute-sanitizer (memcheck).

NaN, +-inf and +-1e30 in offset entries (dy and dx components) and NaN / inf in mask entries, at
pixels spread over the image (tile borders, image borders), through every kernel family: the
streaming forward (simple loop and register-prefetch pipeline, 2D and flat tiles), the split
forward, the warp-specialized ring (plain and k-split clusters on sm_90), the backward data and
weight passes (simple, pipelined, the wide weight tile), in float32 (TF32 and HIGHEST) and
bfloat16, with 16-byte vector and scalar channel counts. Each run also checks that the
non-finite values stayed where deform_conv2d's "Non-finite values" policy allows: y non-finite
only at poisoned pixels, dx non-finite nowhere for offset poisons.
Run: XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck python nonfinite_sanitize.py
(the platform allocator gives every buffer its own allocation, so an overrun is seen).
"""
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import deft_jax
from deft_jax import tiling

jax.config.update("jax_enable_x64", True)

OFFSET_POISONS = (np.nan, np.inf, -np.inf, 1e30, -1e30)
MASK_POISONS = (np.nan, np.inf, -np.inf)


def _cc_major():
    cc = str(getattr(jax.devices()[0], "compute_capability", "") or "0")
    return int(cc.split(".")[0] or 0)


def run(family, tile, dtype, n, h, w, c, co, g, fg, precision=None, strides=1):
    """Poisoned offsets (then masks) of one layer through the forced tile `tile` (None: the chosen one)."""
    rng = np.random.default_rng(0)
    ho = (h + 2 - 3) // strides + 1
    wo = (w + 2 - 3) // strides + 1
    x = rng.normal(size=(n, h, w, c))
    off = rng.normal(size=(n, ho, wo, g * 18)) * 2.0
    k = rng.normal(size=(3, 3, c // fg, co)) * 0.1
    m = rng.uniform(size=(n, ho, wo, g * 9))
    dy = rng.normal(size=(n, ho, wo, co))
    # Poisoned pixels: corners of the output image, the middle, and a random spread.
    pix = [(0, 0, 0), (n - 1, ho - 1, wo - 1), (0, ho // 2, wo // 2), (n - 1, 0, wo - 1)]
    pix += [tuple(int(v) for v in rng.integers((n, ho, wo))) for _ in range(6)]
    off_p, m_p = off.copy(), m.copy()
    for idx, (b, i, j) in enumerate(pix):
        ch = int(rng.integers(g * 18))
        off_p[b, i, j, ch] = OFFSET_POISONS[idx % len(OFFSET_POISONS)]
    nan_pixels = {p for p in zip(*np.nonzero(np.isnan(off_p).any(-1)))}
    mask_pix = []
    for idx, (b, i, j) in enumerate(pix[::2]):
        m_p[b, i, j, int(rng.integers(g * 9))] = MASK_POISONS[idx % len(MASK_POISONS)]
        mask_pix.append((b, i, j))

    _choose = tiling.choose_tiling
    if tile is not None:
        tc = tiling.TileConfig(*tile)
        tiling.choose_tiling = lambda *a, **kw: tc
    try:
        impl = "columns" if family == "columns" else None
        f = lambda *a: deft_jax.deform_conv2d(*a, padding=1, strides=strides, feature_group_count=fg,
                                              precision=precision, implementation=impl)
        for o_, m_, allowed_y, dx_finite in ((off_p, m, nan_pixels, True),
                                             (off, m_p, set(mask_pix), False)):
            args = [jnp.asarray(a, dtype) for a in (x, o_, k, m_)]
            y, vjp = jax.vjp(f, *args)
            outs = (y, *vjp(jnp.asarray(dy, dtype)))
            jax.block_until_ready(outs)
            y = np.asarray(y, np.float64)
            bad_y = {p for p in zip(*np.nonzero(~np.isfinite(y).all(-1)))}
            assert bad_y <= allowed_y, (family, "y non-finite at unpoisoned pixels", bad_y - allowed_y)
            if dx_finite:
                assert np.isfinite(np.asarray(outs[1], np.float64)).all(), (family, "dx non-finite")
            # NaN coordinates must make their pixels NaN (at least one output channel reads them).
            if o_ is off_p:
                assert bad_y == nan_pixels, (family, "NaN offsets did not make y NaN", nan_pixels - bad_y)
    finally:
        tiling.choose_tiling = _choose
    print(f"{family} {jnp.dtype(dtype).name}{'' if precision is None else ' HIGHEST'}: ok")


# (family, tile) with a shape that makes it run: 16-byte vector channels (72 = 2 offset groups of
# 36 for fp32; 64 / 32 for bf16) unless the family is the scalar fallback.
FAMILIES = [
    ("chosen", None),
    ("stream-simple", (8, 8, 64, 32, 4, 1)),
    ("stream-pipelined", (8, 8, 64, 32, 4, 2)),
    ("stream-flat-128x128", (1, 128, 128, 32, 8, 2)),
    ("split-fwd-128", (8, 8, 64, 128, 4, 2)),
    ("split-fwd-256", (8, 8, 64, 256, 4, 2)),
    ("ws-64x64", (8, 8, 64, 32, 8, 3)),
    ("ws-flat-128x128", (1, 128, 128, 32, 8, 3)),
    ("ws-flat-64x128", (1, 64, 128, 32, 8, 3)),
    ("ws-ksplit-2", (1, 128, 128, 32, 8, 3, 128, 2)),
    ("ws-ksplit-4", (1, 128, 128, 32, 8, 3, 128, 4)),
    ("wide-weight", (8, 8, 64, 32, 4, 2, 128)),
    ("columns", None),  # the column route: CUDA sampler, cuBLAS, CUDA col2im
]

for dtype in (jnp.float32, jnp.bfloat16):
    for family, tile in FAMILIES:
        if tile is not None and len(tile) > 7 and tile[7] > 1 and _cc_major() < 9:
            print(f"{family}: skipped (clusters need sm_90)")
            continue
        run(family, tile, dtype, 2, 11, 13, 64, 136, 2, 1)
    run("scalar-channels", (8, 8, 64, 32, 4, 2), dtype, 2, 9, 7, 6, 9, 2, 3)
    run("stride-2-vector", (8, 8, 64, 32, 4, 2), dtype, 1, 12, 10, 32, 64, 1, 2, strides=2)
for family, tile in (("chosen", None), ("stream-pipelined", (8, 8, 64, 32, 4, 2)), ("ws-64x64", (8, 8, 64, 32, 8, 3)),
                     ("columns", None)):
    run(family, tile, jnp.float32, 2, 11, 13, 64, 136, 2, 1, precision=lax.Precision.HIGHEST)
print("nonfinite sanitize workload done")
