"""Small forward + backward through the CUDA kernels, for compute-sanitizer (memcheck).

Shapes that are not multiples of any tile (odd channels: scalar loads; 72 channels: 16-byte
vectors with partial chunks), DCNv1 and DCNv2, offsets far out of bounds, every dtype, default and
deterministic=True (its fixed-point workspace); the k-split ring forward; the column route's
sampler and col2im (one chunk and several).
Run: XLA_PYTHON_CLIENT_ALLOCATOR=platform compute-sanitizer --tool memcheck python memcheck_small.py
(the platform allocator gives every buffer its own allocation, so an overrun is seen).
"""
import jax
import jax.numpy as jnp
import numpy as np

import deft_jax

jax.config.update("jax_enable_x64", True)


def run(n, h, w, c, co, g, fg, with_mask, dtype, scale, strides=1, padding=1, det=False, impl=None):
    # Named before it runs: a crash under a sanitizer prints no Python traceback.
    print(f"run n={n} h={h} w={w} c={c} co={co} g={g} fg={fg} mask={with_mask} "
          f"{jnp.dtype(dtype).name} det={det} impl={impl}", flush=True)
    rng = np.random.default_rng(0)
    ho = (h + 2 * padding - 3) // strides + 1
    wo = (w + 2 * padding - 3) // strides + 1
    x = jnp.asarray(rng.normal(size=(n, h, w, c)), dtype)
    off = jnp.asarray(rng.normal(size=(n, ho, wo, g * 18)) * scale, dtype)
    k = jnp.asarray(rng.normal(size=(3, 3, c // fg, co)) * 0.1, dtype)
    m = jnp.asarray(rng.uniform(size=(n, ho, wo, g * 9)), dtype) if with_mask else None
    f = lambda *a: deft_jax.deform_conv2d(a[0], a[1], a[2], a[3] if len(a) > 3 else None,
                                          strides=strides, padding=padding, feature_group_count=fg,
                                          deterministic=det, implementation=impl)
    args = (x, off, k) + ((m,) if with_mask else ())
    y, vjp = jax.vjp(f, *args)
    outs = (y, *vjp(jnp.ones_like(y)))
    jax.block_until_ready(outs)
    assert all(bool(jnp.all(jnp.isfinite(o.astype(jnp.float32)))) for o in outs)


# The fused kernels (default and deterministic) and the column route (sampler, col2im; two chunks).
from deft_jax import tiling  # noqa: E402

for det, impl in ((False, "fused"), (True, "fused"), (False, "columns")):
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64):
        run(2, 9, 7, 5, 3, 1, 1, True, dtype, 3.0, det=det, impl=impl)
        run(1, 11, 10, 72, 80, 2, 2, False, dtype, 20.0, strides=2, det=det, impl=impl)
        run(1, 8, 8, 64, 64, 4, 1, True, dtype, 2.0, det=det, impl=impl)
_chunk = tiling.cuda_chunk_images
tiling.cuda_chunk_images = lambda shape: 2
for dtype in (jnp.float32, jnp.bfloat16):
    run(3, 9, 7, 24, 16, 2, 1, True, dtype, 3.0, impl="columns")
tiling.cuda_chunk_images = _chunk
# The warp-specialized forward with k-split clusters (k_splits 2 and 4: ranges starting inside a
# (tap, segment) group, the partial tiles read across the cluster), forced by a tile override.

_choose = tiling.choose_tiling
for ks in (2, 4):
    tc = tiling.TileConfig(1, 128, 128, 32, 8, 3, 64, ks)
    tiling.choose_tiling = lambda *a, tc=tc, **kw: tc
    for dtype in (jnp.float32, jnp.bfloat16):
        run(3, 9, 7, 72, 136, 2, 1, True, dtype, 3.0, impl="fused")
tiling.choose_tiling = _choose
print("memcheck workload done")
