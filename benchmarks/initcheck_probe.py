"""Which buffer does an initcheck "uninitialized __global__ read" fall in? One fused forward per
forced tile (the warp-specialized ring that initcheck flagged, and the streaming kernel beside it),
fp32 and bf16, with each input's device address range printed before the launch, so a report's
address can be matched to x, offset, mask or kernel (or to none of them).
Run: XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool initcheck python initcheck_probe.py
"""
import jax
import jax.numpy as jnp
import numpy as np

import deft_jax
from deft_jax import tiling

TILES = {"ws-64x64": (8, 8, 64, 32, 8, 3), "stream-pipelined": (8, 8, 64, 32, 4, 2)}


def probe(name, tile, dtype, n=1, h=11, w=10, c=72, co=80, g=2, fg=2):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), dtype)
    off = jnp.asarray(rng.normal(size=(n, h, w, g * 18)) * 3, dtype)
    k = jnp.asarray(rng.normal(size=(3, 3, c // fg, co)) * 0.1, dtype)
    m = jnp.asarray(rng.uniform(size=(n, h, w, g * 9)), dtype)
    jax.block_until_ready((x, off, k, m))
    for nm, a in (("x", x), ("offset", off), ("kernel", k), ("mask", m)):
        p = a.unsafe_buffer_pointer()
        print(f"  {nm:7s} [{p:#x}, {p + a.nbytes:#x}) {a.nbytes} bytes", flush=True)
    _choose = tiling.choose_tiling
    tc = tiling.TileConfig(*tile)
    tiling.choose_tiling = lambda *a, **kw: tc
    try:
        f = jax.jit(lambda *a: deft_jax.deform_conv2d(*a, padding=1, feature_group_count=fg, implementation="fused"))
        print(f"{name} {jnp.dtype(dtype).name}: launching", flush=True)
        y = jax.block_until_ready(f(x, off, k, m))
    finally:
        tiling.choose_tiling = _choose
    print(f"{name} {jnp.dtype(dtype).name}: done, finite {bool(jnp.all(jnp.isfinite(y.astype(jnp.float32))))}",
          flush=True)


for dtype in (jnp.float32, jnp.bfloat16):
    for name, tile in TILES.items():
        probe(name, tile, dtype)
