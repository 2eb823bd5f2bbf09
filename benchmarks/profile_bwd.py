"""Forward or backward runs of suite layers, for Nsight Compute (per-kernel durations, stalls).
Each argument is SHAPE,DTYPE[,MODE[,TILE]], MODE one of fwd, bwd (default), fwd-det, bwd-det (the
deterministic mode, deterministic=True: its kernels beside the default's, for its cost per kernel);
the old form `S2 bfloat16 [fwd]` also works. TILE "fused" or "columns" forces that GPU route, "xla"
the gather reference (implementation=...; e.g. S4,float32,bwd,columns: the column route's sampler,
dots and col2im; profile it with ncu --kernel-name regex:. to see XLA's kernels too);
otherwise it overrides deft_jax.tiling's choice for that run: TileConfig fields joined by ':'
(e.g. S6,bfloat16,fwd,1:128:128:32:8:2; an 8th field is k_splits: 1:128:128:32:8:3:128:4), for a
per-kernel A/B of two tiles in one process.
Runs execute in argument order, one jit call each (compiled and warmed up first, so the profiled
launches are exactly one per run, in order).
  ncu --kernel-name regex:deform --section SpeedOfLight python benchmarks/profile_bwd.py S2,bfloat16
  ncu --metrics gpu__time_duration.sum python benchmarks/profile_bwd.py S2,float32 S5,bfloat16,fwd
  ncu --metrics gpu__time_duration.sum python benchmarks/profile_bwd.py S2,float32 S2,float32,bwd-det
"""
import sys

import jax
import jax.numpy as jnp
import numpy as np

import deft_jax
from deft_jax import tiling

SUITE = {"S1": (8, 64, 64, 64, 64, 1), "S2": (32, 64, 64, 64, 64, 1), "S3": (32, 28, 28, 128, 128, 1),
         "S4": (32, 14, 14, 256, 256, 1), "S5": (32, 7, 7, 512, 512, 1), "S6": (32, 56, 56, 64, 128, 2)}


def suite_inputs(name, dtype):
    """(x, offset, kernel, mask, dy, strides) of suite layer `name` (3x3, padding 1): offsets ~ N(0,
    2^2) px, mask U(0, 1), fixed seed."""
    n, h, w, c, co, s = SUITE[name]
    dt = jnp.dtype(dtype)
    ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
    k = jax.random.split(jax.random.PRNGKey(0), 5)
    x = jax.random.normal(k[0], (n, h, w, c), dt)
    off = (2 * jax.random.normal(k[1], (n, ho, wo, 18))).astype(dt)
    m = jax.random.uniform(k[2], (n, ho, wo, 9)).astype(dt)
    kern = (jax.random.normal(k[3], (3, 3, c, co)) / np.sqrt(9 * c)).astype(dt)
    dy = jax.random.normal(k[4], (n, ho, wo, co), dt)
    return x, off, kern, m, dy, s


def make_run(name, dtype, mode, tile=None):
    impl = tile if tile in ("fused", "columns", "xla") else None
    tile = None if impl else tile
    x, off, kern, m, dy, s = suite_inputs(name, dtype)
    det = mode.endswith("-det")
    mode = mode.removesuffix("-det")
    if mode not in ("fwd", "bwd"):
        raise SystemExit(f"mode: expected fwd, bwd, fwd-det or bwd-det, got {mode!r}")
    conv = lambda *q: deft_jax.deform_conv2d(*q, strides=s, padding=1, deterministic=det,  # noqa: E731
                                      implementation=impl)
    if mode == "fwd":
        f = jax.jit(conv)
    else:
        f = jax.jit(lambda *a: jax.vjp(conv, *a)[1](dy))
    args = (x, off, kern, m)
    orig = tiling.choose_tiling
    if tile is not None:  # the tile is read at trace time: compile under the override
        tc = tiling.TileConfig(*(int(v) for v in tile.split(":")))
        tiling.choose_tiling = lambda *a, **kw: tc
    try:
        f.lower(*args).compile()
    finally:
        tiling.choose_tiling = orig
    return lambda: jax.block_until_ready(f(*args))


def main(argv):
    if argv and "," not in argv[0]:
        argv = [",".join(argv)]
    runs = []
    for a in argv:
        parts = a.split(",")
        name, dtype, mode = parts[0], parts[1], parts[2] if len(parts) > 2 else "bwd"
        runs.append((a, make_run(name, dtype, mode, parts[3] if len(parts) > 3 else None)))
    for label, run in runs:
        print("run", label, flush=True)
        run()


if __name__ == "__main__":
    main(sys.argv[1:])
