"""CUDA kernels (GPU FFI targets) vs the pure-JAX reference: forward and all four cotangents.

The oracle is the reference in float64 on the CPU, fed the same (dtype-rounded) inputs, so the
tolerances below measure the kernels' arithmetic only. Skipped without a GPU or the CUDA module.
"""

import dataclasses
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import deft_jax
from deft_jax import tiling
from helpers import (GPU, Case, make_inputs, needs_gpu, oracle_vjp, rel_err, temp_bytes,
                     worst_at)


CPU = jax.devices("cpu")[0]
pytestmark = [pytest.mark.gpu, needs_gpu]

GRID = [
    Case(),
    Case(with_mask=False),
    Case(strides=(2, 1), padding=((1, 0), (2, 1))),
    Case(strides=(2, 2), padding="SAME", h=9, w=8),
    Case(dilation=(2, 3), padding=((2, 2), (3, 3))),
    Case(kernel_size=(1, 1), padding=0),
    Case(kernel_size=(3, 1), padding=((1, 1), (0, 0))),
    Case(kernel_size=(5, 5), padding=2, h=6, w=5),
    Case(offset_groups=2, c_in=6, c_out=4),
    Case(feature_groups=2, c_in=4, c_out=6),
    Case(offset_groups=4, feature_groups=2, c_in=8, c_out=6, strides=(1, 2), padding=((0, 2), (1, 0))),
    Case(offset_scale=0.1),
    Case(offset_scale=50.0),
    Case(n=3, h=11, w=10, c_in=5, c_out=7, strides=(3, 2), dilation=(1, 2), padding=((0, 2), (1, 3))),
    # 16-byte vector paths, several channel chunks / output blocks, partial tiles, >64 pixels.
    Case(n=2, h=13, w=11, c_in=72, c_out=80),
    Case(n=1, h=17, w=9, c_in=64, c_out=136, offset_groups=4, feature_groups=2, with_mask=False),
    Case(n=2, h=10, w=12, c_in=48, c_out=32, offset_groups=3, strides=(2, 2), padding=((2, 1), (1, 2))),
    Case(n=1, h=9, w=9, c_in=24, c_out=24, offset_groups=2, feature_groups=3, kernel_size=(5, 5), padding=2),
    # The data pass merges dx entries per position in a window around each tile: interior tiles,
    # vector channels, small offsets (long lists) and larger ones (entries outside the window).
    Case(n=1, h=30, w=27, c_in=40, c_out=16, offset_scale=0.3),
    Case(n=1, h=30, w=27, c_in=40, c_out=16, offset_scale=8.0, strides=(2, 2)),
]

# Relative max error vs the float64 oracle (max |a - b| / max |b|), per dtype / precision.
TOL = {
    "float64": 1e-10,
    "float32-highest": 2e-5,  # exact FMA path
    "float32-tf32": 1e-2,     # TF32 operands (10-bit mantissa), fp32 accumulation
    "float16": 1e-2,
    "bfloat16": 5e-2,
}


def _ids(c):
    return "-".join(f"{k}={v}" for k, v in vars(c).items() if v != getattr(Case(), k)) or "default"


def _op(case, impl, precision=None):
    def f(x, off, k, *m):
        return deft_jax.deform_conv2d(x, off, k, m[0] if m else None, implementation=impl,
                                      precision=precision, **case.kwargs())
    return f


def _vjp_on(device, f, args, dy):
    args = jax.device_put(args, device)
    dy = jax.device_put(dy, device)
    y, vjp = jax.vjp(f, *args)
    return [np.asarray(a, np.float64) for a in (y, *vjp(dy))]


# Both GPU routes of the native op: the fused kernels and the column route (sampler + cuBLAS + col2im).
ROUTES = pytest.mark.parametrize("route", ["fused", "columns"])


def _compare(case, rng, dtype, precision=None, tol_key=None, route=None, integer_offsets=False):
    """The GPU op in ``dtype`` against the float64 reference of the same rounded inputs on the
    CPU, whose offsets put each sample point where the dtype's arithmetic does (oracle_offset).
    integer_offsets: every sample point exactly on the integer grid (where bilinear gradients
    jump; exact in every dtype), so both sides must take the same side of each kink."""
    x, off, kernel, mask = make_inputs(case, rng, np.float64)
    if integer_offsets:
        off = jnp.round(off)
    args = [a for a in (x, off, kernel, mask) if a is not None]
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    low = [a.astype(dtype) for a in args]
    want = oracle_vjp(case, low, dy, dtype)
    got = _vjp_on(GPU, _op(case, route, precision), low, dy.astype(dtype))
    names = ["y", "dx", "doffset", "dkernel", "dmask"][: len(got)]
    tol = TOL[tol_key or jnp.dtype(dtype).name]
    errs, where = {}, {}
    for name, a, b in zip(names, got, want):
        assert a.shape == b.shape, name
        assert np.all(np.isfinite(a)), f"{name} has non-finite values"
        errs[name] = rel_err(a, b)
        where[name] = worst_at(a, b)
    assert max(errs.values()) < tol, (errs, where)


@ROUTES
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_float64(case, route, rng):
    _compare(case, rng, jnp.float64, route=route)


@ROUTES
@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_float32_exact(case, route, rng):
    _compare(case, rng, jnp.float32, precision=lax.Precision.HIGHEST, tol_key="float32-highest",
             route=route)


@ROUTES
@pytest.mark.parametrize("case", GRID[::2], ids=_ids)
def test_float32_tf32(case, route, rng):
    _compare(case, rng, jnp.float32, precision=None, tol_key="float32-tf32", route=route)


@ROUTES
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("case", GRID[::3] + GRID[14:], ids=_ids)
def test_half(case, dtype, route, rng):
    _compare(case, rng, dtype, route=route)


# Coordinates exactly on the integer grid, at the image borders too (offsets up to ~+-6 px).
INTEGER_CASES = [Case(n=2, h=9, w=11, c_in=8, c_out=8, offset_scale=3.0),
                 Case(n=3, h=64, w=64, c_in=64, c_out=64, padding=1),
                 Case(n=2, h=10, w=12, c_in=48, c_out=32, offset_groups=3, strides=(2, 2),
                      padding=((2, 1), (1, 2)))]


@ROUTES
@pytest.mark.parametrize("dtype,precision,tol_key", [
    (jnp.float64, None, None), (jnp.float32, lax.Precision.HIGHEST, "float32-highest"),
    (jnp.float32, None, "float32-tf32"), (jnp.bfloat16, None, None), (jnp.float16, None, None)],
    ids=["f64", "f32-highest", "f32-tf32", "bf16", "f16"])
@pytest.mark.parametrize("case", INTEGER_CASES, ids=_ids)
def test_integer_coordinates(case, dtype, precision, tol_key, route, rng):
    _compare(case, rng, dtype, precision=precision, tol_key=tol_key, route=route, integer_offsets=True)


def test_jit_grad_vmap(rng):
    case = Case(n=2, h=9, w=8, c_in=16, c_out=8)
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    f = _op(case, None, lax.Precision.HIGHEST)
    loss = lambda *a: jnp.sum(jnp.sin(f(*a)))
    g_native = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, off, kernel, mask)
    g_ref = jax.grad(lambda *a: jnp.sum(jnp.sin(_op(case, "xla", lax.Precision.HIGHEST)(*a))),
                     argnums=(0, 1, 2, 3))(x, off, kernel, mask)
    for a, b in zip(g_native, g_ref):
        assert rel_err(a, b) < 1e-4
    # vmap over a leading axis: every problem of the stack has its own kernel.
    xs = jnp.stack([x, x * 0.5, -x])
    offs = jnp.stack([off, -off, off * 0.3])
    ks = jnp.stack([kernel, kernel * 2.0, -kernel])
    ms = jnp.stack([mask, 1 - mask, mask])
    yv = jax.jit(jax.vmap(f))(xs, offs, ks, ms)
    for i in range(3):
        assert rel_err(yv[i], f(xs[i], offs[i], ks[i], ms[i])) < 1e-6
    gv = jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)))(xs, offs, ks, ms)
    for i in range(3):
        gi = jax.grad(loss, argnums=(0, 1, 2, 3))(xs[i], offs[i], ks[i], ms[i])
        for a, b in zip(gv, gi):
            assert rel_err(a[i], b) < 1e-5


def test_forward_deterministic(rng):
    case = Case(n=2, h=16, w=16, c_in=32, c_out=32)
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    f = jax.jit(_op(case, None))
    a, b = np.asarray(f(x, off, kernel, mask)), np.asarray(f(x, off, kernel, mask))
    assert np.array_equal(a, b)


def test_outputs_fully_written(rng):
    """Fill the allocator's free memory with NaN first: an unwritten output element shows up."""
    case = Case(n=2, h=12, w=12, c_in=40, c_out=24, offset_groups=2)
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float64):
        poison = [jnp.full((1 << 20,), jnp.nan, dtype) for _ in range(8)]
        jax.block_until_ready(poison)
        del poison
        args = [a.astype(dtype) for a in (x, off, kernel, mask)]
        f = _op(case, None)
        y, vjp = jax.vjp(f, *args)
        outs = (y, *vjp(jnp.ones_like(y)))
        for o in outs:
            assert np.all(np.isfinite(np.asarray(o, np.float64)))


SUITE = {
    "S1": (8, 64, 64, 64, 64, 1),
    "S2": (32, 64, 64, 64, 64, 1),
    "S3": (32, 28, 28, 128, 128, 1),
    "S4": (32, 14, 14, 256, 256, 1),
    "S5": (32, 7, 7, 512, 512, 1),
    "S6": (32, 56, 56, 64, 128, 2),
}


@pytest.mark.parametrize("name", list(SUITE))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_suite_shapes(name, dtype):
    """Forward of the benchmark layers vs the reference on the GPU in float32 HIGHEST."""
    n, h, w, c, co, s = SUITE[name]
    ho, wo = (h + 2 - 3) // s + 1, (w + 2 - 3) // s + 1
    ks = jax.random.split(jax.random.PRNGKey(hash(name) % 1000), 5)
    x = jax.random.normal(ks[0], (n, h, w, c), jnp.float32).astype(dtype)
    off = (2.0 * jax.random.normal(ks[1], (n, ho, wo, 18), jnp.float32)).astype(dtype)
    mask = jax.random.uniform(ks[2], (n, ho, wo, 9), jnp.float32).astype(dtype)
    kernel = (jax.random.normal(ks[3], (3, 3, c, co), jnp.float32) / np.sqrt(9 * c)).astype(dtype)
    kw = dict(strides=s, padding=1)
    y = deft_jax.deform_conv2d(x, off, kernel, mask, **kw)
    up = [a.astype(jnp.float32) for a in (x, off, kernel, mask)]
    y_ref = deft_jax.deform_conv2d(up[0], up[1], up[2], up[3], implementation="xla",
                                   precision=lax.Precision.HIGHEST, **kw)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-2  # fp32 input: TF32 at default precision
    assert rel_err(y, y_ref) < tol


# ~25 GiB of device memory each: under pytest-xdist --dist loadgroup the three run on one worker
# (whose allocator then reuses its pool) instead of three workers holding ~25 GiB apiece.
@pytest.mark.xdist_group("large_index")
@pytest.mark.parametrize("impl", ["fused", "columns"])
@pytest.mark.parametrize("c,h", [(1, 46341), (4, 23171), (4, 23170)],
                         ids=["scalar-highest", "vector-tf32", "vector-tf32-below-2-31"])
def test_large_index_over_2_31(c, h, impl, monkeypatch):
    """x with about 2^31 elements, sampled near its end (bottom/right edge): indexing in every
    kernel of both routes.

    c = 1 at Precision.HIGHEST: the scalar SIMT paths, 64-bit. c = 4 at default precision: the
    tensor-core vector path with stages=2, whose pipelined forward and weight loops keep 32-bit
    element offsets into x: above 2^31 elements (h = 23171) the launcher must hand x to the simple
    loops (Geo::x32), just below (h = 23170: 2^31 - 88048 elements) the pipelined loops run with
    offsets at the top of the int32 range. The column route's tiled sampler keeps 32-bit corner
    positions within an image: h = 23170 runs it at the top of the int32 range, the larger images
    take the per-tap sampler's 64-bit positions.
    The oracle is bilinear interpolation written out in numpy on the 2x2 neighbourhoods (the
    pure-JAX reference itself cannot index past 2^31 elements)."""
    w = h
    assert (h * w * c > 2**31) == (h != 23170)
    if c == 4:  # the pipelined configuration, whatever the tiling rules pick for this shape
        tc = tiling.TileConfig(8, 8, 64, 32, 4, 2)
        monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)
    x = jax.random.normal(jax.random.PRNGKey(0), (1, h, w, c), jnp.float32)
    # 1x1 kernel, C_in = c -> C_out = 2 (scalar) or 4 (a whole 16-byte vector).
    k_np = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (c, 2 if c == 1 else 4)), np.float32)
    kernel = jnp.asarray(k_np[None, None])
    precision = lax.Precision.HIGHEST if c == 1 else None
    # TF32 rounds x and the kernel to 10-bit mantissas (2^-11 relative each).
    rtol, atol = (1e-5, 1e-6) if c == 1 else (2e-3, 2e-3)
    kw = dict(strides=h - 1, padding=0, precision=precision, implementation=impl)  # output 2x2
    # Sample points strictly inside the image, both corners valid: (dy, dx) per output pixel.
    off_np = np.array([[[[0.3, 0.6], [0.2, -0.4]], [[-0.7, 0.1], [-0.25, -0.75]]]], np.float32)
    mask_np = np.array([[[[0.8], [0.6]], [[0.9], [0.4]]]], np.float32)
    dy_np = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (1, 2, 2, k_np.shape[1])), np.float32)
    f = lambda *a: deft_jax.deform_conv2d(*a, **kw)
    y, vjp = jax.vjp(f, x, jnp.asarray(off_np), kernel, jnp.asarray(mask_np))
    dx, doff, dk, dm = vjp(jnp.asarray(dy_np))
    del vjp  # its residuals hold another copy of x
    # A 2 x 2 window as one slice: eager x[0, a:b, c:d] materialised x[0] (8 GiB) first.
    window = lambda a, y0, x0: lax.slice(a, (0, y0, x0, 0), (1, y0 + 2, x0 + 2, c))[0]
    k = k_np.astype(np.float64)  # (c, C_out)
    y_want = np.zeros((2, 2, k.shape[1])); doff_want = np.zeros((2, 2, 2)); dm_want = np.zeros((2, 2))
    dk_want = np.zeros_like(k)
    dx_checked = 0.0
    for i in range(2):
        for j in range(2):
            # Positions in float32, as the kernel (and torchvision) computes them: near 46340 the
            # float32 spacing is 4e-3 px, far above the tolerance.
            py = float(np.float32(i * (h - 1)) + off_np[0, i, j, 0])
            px = float(np.float32(j * (w - 1)) + off_np[0, i, j, 1])
            y0, x0 = int(np.floor(py)), int(np.floor(px))
            ly, lx = py - y0, px - x0
            v = np.asarray(window(x, y0, x0), np.float64)  # (2, 2, c)
            wts = np.array([[(1 - ly) * (1 - lx), (1 - ly) * lx], [ly * (1 - lx), ly * lx]])
            val = np.einsum("ab,abc->c", wts, v)  # sampled column, per channel
            m = float(mask_np[0, i, j, 0])
            g = k @ dy_np[0, i, j].astype(np.float64)  # grad of the column, per channel
            y_want[i, j] = m * val @ k
            dk_want += np.outer(m * val, dy_np[0, i, j])
            dm_want[i, j] = float(g @ val)
            dvy = -(1 - lx) * v[0, 0] - lx * v[0, 1] + (1 - lx) * v[1, 0] + lx * v[1, 1]
            dvx = -(1 - ly) * v[0, 0] + (1 - ly) * v[0, 1] - ly * v[1, 0] + ly * v[1, 1]
            doff_want[i, j] = m * float(g @ dvy), m * float(g @ dvx)
            got = np.asarray(window(dx, y0, x0), np.float64)
            want = m * wts[:, :, None] * g[None, None, :]
            np.testing.assert_allclose(got, want, rtol=rtol, atol=atol)
            dx_checked += float(np.sum(np.abs(got)))  # the four windows are far apart
    np.testing.assert_allclose(np.asarray(y, np.float64)[0], y_want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(doff, np.float64)[0], doff_want, rtol=10 * rtol, atol=10 * atol)
    np.testing.assert_allclose(np.asarray(dm, np.float64)[0, ..., 0], dm_want, rtol=rtol, atol=atol)
    np.testing.assert_allclose(np.asarray(dk, np.float64)[0, 0], dk_want, rtol=rtol, atol=atol)
    # Nothing written anywhere else in dx.
    l1 = jax.jit(lambda a: jnp.sum(jnp.abs(a)))  # fused: eager jnp.abs(dx) would be another 8 GiB
    assert float(l1(dx)) == pytest.approx(dx_checked, rel=1e-5)


def test_every_instantiated_tile(rng, monkeypatch):
    """Each GPU tile configuration the kernels instantiate, both pipeline depths, vector + scalar paths."""
    from deft_jax import tiling
    configs = [(8, 8, 64, 32, 4, 1), (8, 8, 64, 32, 4, 2), (4, 16, 64, 32, 4, 2), (8, 16, 64, 32, 4, 1),
               (16, 8, 64, 32, 4, 2), (8, 16, 128, 32, 8, 2), (2, 64, 128, 32, 8, 1),
               (8, 16, 128, 32, 16, 2), (16, 8, 128, 32, 16, 1)]
    cases = [Case(n=2, h=13, w=11, c_in=72, c_out=136, offset_groups=2),
             Case(n=1, h=9, w=10, c_in=6, c_out=9, feature_groups=3, offset_groups=2)]
    for cfg in configs:
        tc = tiling.TileConfig(*cfg)
        monkeypatch.setattr(tiling, "choose_tiling", lambda *a, tc=tc, **k: tc)
        for case in cases:
            _compare(case, rng, jnp.bfloat16)
            _compare(case, rng, jnp.float32, precision=None, tol_key="float32-tf32")


def test_wide_weight_tile(rng, monkeypatch):
    """bwd_tile_n=128: the weight pass's 64 x 128 tile on its pipelined path (stages 2, tensor
    cores, vector channels); exact fp32, stages 1 and scalar channels take the 64-wide simple loop.
    Partial output-channel blocks (136 = 128 + 8; 104 per feature group), offset groups, all
    cotangents; vmap with a kernel per problem (each problem's dkernel block)."""
    from deft_jax import tiling
    cases = [Case(n=2, h=13, w=11, c_in=72, c_out=136, offset_groups=2),
             Case(n=2, h=9, w=7, c_in=160, c_out=208, offset_groups=2, feature_groups=2),
             Case(n=1, h=6, w=5, c_in=12, c_out=10, offset_groups=2),
             # 16-bit vectors throughout (32 channels per offset group) and three output blocks
             # (264 = 128 + 128 + 8).
             Case(n=2, h=9, w=8, c_in=64, c_out=264, offset_groups=2)]
    for cfg in [(8, 8, 64, 32, 4, 2, 128), (8, 16, 128, 32, 16, 2, 128), (8, 8, 64, 32, 4, 1, 128),
                (8, 8, 64, 256, 4, 2, 128)]:
        tc = tiling.TileConfig(*cfg)
        monkeypatch.setattr(tiling, "choose_tiling", lambda *a, tc=tc, **k: tc)
        for case in cases:
            _compare(case, rng, jnp.bfloat16)
            _compare(case, rng, jnp.float16)
            _compare(case, rng, jnp.float32, precision=None, tol_key="float32-tf32")
        _compare(cases[0], rng, jnp.float32, precision=lax.Precision.HIGHEST, tol_key="float32-highest")
    case = cases[0]
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    f = _op(case, None, None)
    loss = lambda *a: jnp.sum(f(*a) ** 2)
    xs, offs = jnp.stack([x, -x]), jnp.stack([off, off * 0.5])
    ks, ms = jnp.stack([kernel, kernel * 2.0]), jnp.stack([mask, 1 - mask])
    gv = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3))))(xs, offs, ks, ms)
    for i in range(2):
        gi = jax.grad(loss, argnums=(0, 1, 2, 3))(xs[i], offs[i], ks[i], ms[i])
        for a, b in zip(gv, gi):
            assert rel_err(a[i], b) < 1e-4


FLAT_CASES = [
    # 7 x 5 images: a 64- or 128-pixel tile spans rows and several images, the last one partial.
    Case(n=5, h=7, w=5, c_in=72, c_out=136, offset_groups=2),
    # Stride, padding, two feature groups, scalar channels (the simple loop), 1 image of 9 x 10.
    Case(n=1, h=9, w=10, c_in=6, c_out=9, feature_groups=3, offset_groups=2, strides=(2, 1),
         padding=((1, 0), (2, 1))),
    Case(n=3, h=14, w=14, c_in=64, c_out=128),
]


@pytest.mark.parametrize("cfg", [(1, 64, 64, 32, 4, 2), (1, 128, 128, 32, 8, 2), (1, 128, 128, 32, 16, 1),
                                 (1, 128, 64, 32, 4, 2), (1, 64, 64, 256, 4, 2)], ids=str)
def test_flat_tiles(cfg, rng, monkeypatch):
    """Flat tiles (tile_h = 1: tile_w consecutive pixels across rows and images of one problem) in
    the streaming forward, both pipeline depths; the backward passes and the split forward (last
    configuration) take 8 x 8 tiles then. Every dtype; vmap with a kernel per problem, where a
    tile must not run into the next problem."""
    from deft_jax import tiling
    tc = tiling.TileConfig(*cfg)
    monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)
    for case in FLAT_CASES:
        _compare(case, rng, jnp.float32, precision=None, tol_key="float32-tf32")
        _compare(case, rng, jnp.float32, precision=lax.Precision.HIGHEST, tol_key="float32-highest")
        _compare(case, rng, jnp.bfloat16)
        if cfg[:3] == (1, 64, 64) and cfg[3] == 32:  # the one float64 tile
            _compare(case, rng, jnp.float64)
    case = FLAT_CASES[0]
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    # Exact fp32: with TF32 the split forward's atomic order moves y by ~1e-7, and rounding dy = 2y
    # to TF32 turns that into ~1e-4 in the gradients (seen: 1.2e-4).
    f = _op(case, None, lax.Precision.HIGHEST)
    loss = lambda *a: jnp.sum(f(*a) ** 2)
    xs, offs = jnp.stack([x, -x, x]), jnp.stack([off, off * 0.5, -off])
    ks, ms = jnp.stack([kernel, kernel * 2.0, -kernel]), jnp.stack([mask, 1 - mask, mask])
    yv = jax.jit(jax.vmap(f))(xs, offs, ks, ms)
    gv = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3))))(xs, offs, ks, ms)
    for i in range(3):
        assert rel_err(yv[i], f(xs[i], offs[i], ks[i], ms[i])) < 1e-5
        gi = jax.grad(loss, argnums=(0, 1, 2, 3))(xs[i], offs[i], ks[i], ms[i])
        for a, b in zip(gv, gi):
            assert rel_err(a[i], b) < 1e-4


WS_CASES = FLAT_CASES + [
    # Offset-group segments of 48 channels (chunks of 32 and 16) and two feature groups of 40
    # output channels: 16-byte vectors for every dtype, so the ring runs for bf16/fp16 too.
    Case(n=2, h=11, w=13, c_in=96, c_out=80, feature_groups=2, offset_groups=2),
    Case(n=2, h=16, w=16, c_in=64, c_out=64, with_mask=False),
]


@pytest.mark.parametrize("cfg", [(1, 128, 128, 32, 8, 3), (8, 16, 128, 32, 8, 3), (8, 8, 64, 32, 8, 3),
                                 (1, 64, 64, 32, 8, 3), (1, 64, 128, 32, 8, 3), (8, 8, 128, 32, 8, 3)],
                         ids=str)
def test_warp_specialized_tiles(cfg, rng, monkeypatch):
    """The warp-specialized forward (stages = 3: producer warps fill a ring of shared-memory tiles
    that consumer warps multiply): flat and 2D tiles, partial chunks and channel blocks, feature
    and offset groups, no mask; fp32 at HIGHEST and scalar channel counts take the streaming
    kernel of the same tile. Every dtype; the outputs of the kernel under test start as NaN
    (poisoned pool), and vmap runs a kernel per problem."""
    from deft_jax import tiling
    tc = tiling.TileConfig(*cfg)
    monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)
    poison = [jnp.full((1 << 20,), jnp.nan, jnp.float32) for _ in range(8)]
    jax.block_until_ready(poison)
    del poison
    for case in WS_CASES:
        _compare(case, rng, jnp.float32, precision=None, tol_key="float32-tf32")
        _compare(case, rng, jnp.bfloat16)
        _compare(case, rng, jnp.float16)
    _compare(WS_CASES[0], rng, jnp.float32, precision=lax.Precision.HIGHEST, tol_key="float32-highest")
    case = WS_CASES[-2]
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    f = _op(case, None, None)
    xs, offs = jnp.stack([x, -x, x]), jnp.stack([off, off * 0.5, -off])
    ks, ms = jnp.stack([kernel, kernel * 2.0, -kernel]), jnp.stack([mask, 1 - mask, mask])
    yv = jax.jit(jax.vmap(f))(xs, offs, ks, ms)
    for i in range(3):
        assert rel_err(yv[i], f(xs[i], offs[i], ks[i], ms[i])) < 1e-6


@pytest.mark.parametrize("cfg", [(1, 128, 128, 32, 8, 3, 128, 2), (1, 128, 128, 32, 8, 3, 128, 4),
                                 (8, 8, 64, 32, 8, 3, 64, 4), (1, 64, 64, 32, 8, 3, 64, 2),
                                 (1, 64, 128, 32, 8, 3, 128, 2)], ids=str)
def test_k_split_ring(cfg, rng, monkeypatch):
    """k_splits > 1: a cluster of blocks splits each output tile's (tap, chunk) walk and sums the
    partial tiles in distributed shared memory. Ranges that start inside a (tap, segment) group
    (WS_CASES[0]: groups of 2 chunks, 9 chunks per block at k_splits 4), blocks with no chunk (a
    1 x 1 kernel over 32 channels: one chunk for 4 blocks), every dtype against the reference with
    poisoned outputs; the same result as k_splits = 1 up to summation order, bit-identical from run
    to run (the partial tiles are summed in rank order); the backward (which ignores k_splits)
    under jit."""
    from deft_jax import tiling
    tc = tiling.TileConfig(*cfg)
    one = dataclasses.replace(tc, k_splits=1)
    use = [tc]
    monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: use[0])
    poison = [jnp.full((1 << 20,), jnp.nan, jnp.float32) for _ in range(8)]
    jax.block_until_ready(poison)
    del poison
    cases = WS_CASES + [Case(n=2, h=8, w=12, c_in=32, c_out=64, kernel_size=(1, 1), padding=0)]
    for case in cases:
        _compare(case, rng, jnp.float32, precision=None, tol_key="float32-tf32")
        _compare(case, rng, jnp.bfloat16)
        _compare(case, rng, jnp.float16)
    case = WS_CASES[0]
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    f = jax.jit(_op(case, None, None))
    y1, y2 = np.asarray(f(x, off, kernel, mask)), np.asarray(f(x, off, kernel, mask))
    np.testing.assert_array_equal(y1, y2)
    use[0] = one
    y_one = np.asarray(jax.jit(_op(case, None, None))(x, off, kernel, mask))
    assert rel_err(y1, y_one) < 1e-5
    use[0] = tc
    loss = lambda *a: jnp.sum(_op(case, None, None)(*a) ** 2)
    g = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(x, off, kernel, mask)
    assert all(np.all(np.isfinite(np.asarray(gi))) for gi in g)


@pytest.mark.parametrize("cfg", [None, (1, 128, 128, 32, 8, 3)], ids=str)
def test_infinite_input_propagates_like_the_reference(cfg, rng, monkeypatch):
    """+inf in x at the image border and inside: the outputs that turn inf or NaN are the
    reference's, sample for sample (the ring's producers redirect corners outside the image onto
    valid ones with split weights, which must not create 0 x inf where the reference has none)."""
    from deft_jax import tiling
    if cfg is not None:
        tc = tiling.TileConfig(*cfg)
        monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)
    case = Case(n=2, h=9, w=11, c_in=32, c_out=16, offset_scale=3.0)
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    x = np.array(x)
    x[0, 0, 0, 3] = np.inf      # a corner pixel: many samples straddle the border there
    x[1, 4, 5, :] = np.inf      # a whole pixel inside
    args = [jnp.asarray(a) for a in (x, off, kernel, mask)]
    with jax.default_device(CPU):
        want = np.asarray(_op(case, "xla")(*jax.device_put(args, CPU)))
    got = np.asarray(_op(case, None)(*jax.device_put(args, GPU)))
    assert not np.all(np.isfinite(want))  # the test has teeth
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    assert rel_err(got[fin], want[fin]) < TOL["float32-tf32"]


def _tf32_rna(a):
    """float32 -> TF32 as cvt.rna.tf32.f32 rounds (to nearest, ties away from zero), as float64."""
    a = np.asarray(a, np.float32)
    bits = a.view(np.uint32).astype(np.uint64)
    bits = np.where(np.isfinite(a), (bits + 0x1000) & 0xFFFFE000, bits).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


@pytest.mark.parametrize("cfg", [None, (8, 8, 64, 32, 4, 1), (8, 16, 64, 32, 4, 2), (8, 16, 128, 32, 8, 2),
                                 (8, 16, 128, 32, 16, 2, 128), (8, 8, 64, 256, 4, 2, 128)], ids=str)
def test_tf32_operands_round_to_nearest(cfg, rng, monkeypatch):
    """TF32 paths round every MMA operand to nearest (cvt.rna, at the fragment load; rounding once
    at the shared-memory store was measured slower, docs/kernels.md "MMA"): y, dx and dkernel match a float64 computation on TF32-rounded operands to accumulation error.
    Integer (zero) offsets and no mask make the sampled columns exactly x; positive x, kernel and dy
    make truncating instead of rounding one operand a bias of ~3.6e-4 relative (both: 7e-4); the
    tolerance leaves room for the tensor cores' own accumulation (up to ~1.3e-5 simulated with
    truncated alignment over 72 chained k8 MMAs)."""
    from deft_jax import tiling
    if cfg is not None:
        tc = tiling.TileConfig(*cfg)
        monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)
    case = Case(n=2, h=12, w=10, c_in=64, c_out=64, with_mask=False)
    ho, wo = case.out_hw()
    x = rng.uniform(1.0, 2.0, size=(case.n, case.h, case.w, case.c_in)).astype(np.float32)
    off = np.zeros((case.n, ho, wo, 18), np.float32)
    kernel = rng.uniform(1.0, 2.0, size=(3, 3, case.c_in, case.c_out)).astype(np.float32)
    dy = rng.uniform(1.0, 2.0, size=(case.n, ho, wo, case.c_out)).astype(np.float32)
    f = lambda x_, k_: deft_jax.deform_conv2d(x_, jnp.asarray(off, x_.dtype), k_, None, **case.kwargs())
    got = _vjp_on(GPU, f, [jnp.asarray(x), jnp.asarray(kernel)], jnp.asarray(dy))
    with jax.default_device(CPU):
        g = lambda x_, k_: deft_jax.deform_conv2d(x_, jnp.zeros(off.shape, jnp.float64), k_, None,
                                                  implementation="xla", **case.kwargs())
        want = _vjp_on(CPU, g, [jnp.asarray(_tf32_rna(x)), jnp.asarray(_tf32_rna(kernel))],
                       jnp.asarray(_tf32_rna(dy)))
    errs = {name: rel_err(a, b) for name, a, b in zip(["y", "dx", "dkernel"], got, want)}
    assert max(errs.values()) < 5e-5, errs


SPLIT_CASES = [
    # Two offset groups x two feature groups: segments end at offset-group borders (80 channels,
    # a partial last k chunk), 104 output channels per group (a partial output block).
    Case(n=2, h=9, w=7, c_in=160, c_out=208, offset_groups=2, feature_groups=2),
    # 272 input channels: a short last segment for every tile_k; stride + partial 8x8 tiles.
    Case(n=1, h=11, w=10, c_in=272, c_out=96, strides=(2, 1), padding=((1, 0), (2, 1))),
    # Channels that are not whole 16-byte vectors: the streaming kernel of the same tile runs.
    Case(n=1, h=6, w=5, c_in=12, c_out=10, offset_groups=2),
]


@pytest.mark.parametrize("tile_k", [128, 256, 512])
def test_split_forward(tile_k, rng, monkeypatch):
    """The split forward (tile_k > 32): every dtype / precision, forward and all cotangents (the
    backward runs its usual kernels), vmap with a kernel per problem."""
    from deft_jax import tiling
    tc = tiling.TileConfig(8, 8, 64, tile_k, 4, 2)
    monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)
    for case in SPLIT_CASES:
        _compare(case, rng, jnp.float32, precision=lax.Precision.HIGHEST, tol_key="float32-highest")
        _compare(case, rng, jnp.float32, precision=None, tol_key="float32-tf32")
        _compare(case, rng, jnp.bfloat16)
        _compare(case, rng, jnp.float16)
    case = SPLIT_CASES[0]
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    f = _op(case, None, lax.Precision.HIGHEST)
    xs, offs = jnp.stack([x, -x]), jnp.stack([off, off * 0.5])
    ks, ms = jnp.stack([kernel, kernel * 2.0]), jnp.stack([mask, 1 - mask])
    yv = jax.jit(jax.vmap(f))(xs, offs, ks, ms)
    for i in range(2):
        assert rel_err(yv[i], f(xs[i], offs[i], ks[i], ms[i])) < 1e-6


def test_unsupported_tile_is_an_error():
    """A tile configuration the kernels do not instantiate is an error naming it, not a crash.
    The trace-time guard (tiling.check_gpu_tile) raises before any kernel. In a subprocess: an
    ffi::Error returned by the handler once crashed XLA (H100, jax 0.11.2), and a crash must not
    take the test session down."""
    script = textwrap.dedent("""
        import numpy as np, jax, jax.numpy as jnp
        import deft_jax
        from deft_jax import tiling
        tiling.choose_tiling = lambda *a, **k: tiling.TileConfig(8, 8, 48, 32, 4, 2)
        x = jnp.ones((1, 6, 6, 4)); off = jnp.zeros((1, 6, 6, 18)); w = jnp.ones((3, 3, 4, 4))
        try:
            jax.block_until_ready(deft_jax.deform_conv2d(x, off, w, padding=1))
        except Exception as e:
            assert "not instantiated" in str(e), e
            print("RAISED")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(__file__))  # not the root: its deft_jax/ would shadow the install
    assert r.returncode == 0 and "RAISED" in r.stdout, (r.returncode, r.stderr[-3000:])


def test_command_buffers_subprocess(tmp_path):
    """Handlers are declared command-buffer compatible: run them inside CUDA graphs."""
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from jax import lax
        import deft_jax
        k = jax.random.split(jax.random.PRNGKey(0), 4)
        x = jax.random.normal(k[0], (2, 12, 12, 16))
        off = 2 * jax.random.normal(k[1], (2, 12, 12, 18))
        m = jax.random.uniform(k[2], (2, 12, 12, 9))
        w = jax.random.normal(k[3], (3, 3, 16, 8)) / 12
        def loss(impl, x, off, w, m):
            y = deft_jax.deform_conv2d(x, off, w, m, padding=1, implementation=impl,
                                       precision=lax.Precision.HIGHEST)
            return jnp.sum(jnp.tanh(y) * 1.5)
        f = jax.jit(jax.value_and_grad(lambda *a: loss(None, *a), argnums=(0, 1, 2, 3)))
        g = jax.jit(jax.value_and_grad(lambda *a: loss("xla", *a), argnums=(0, 1, 2, 3)))
        for _ in range(3):
            a, b = f(x, off, w, m), g(x, off, w, m)
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            u, v = np.asarray(u), np.asarray(v)
            assert np.max(np.abs(u - v)) <= 1e-4 * max(np.max(np.abs(v)), 1e-6), (u, v)
        print("OK")
    """)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL"
                        " --xla_gpu_graph_min_graph_size=1").strip()
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=600, cwd=tmp_path)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr[-4000:]


@pytest.mark.parametrize("case", [
    Case(n=5),  # chunks of 2: two full ones in a loop (a traced start) and a remainder of 1
    Case(n=5, with_mask=False, offset_groups=2, c_in=6, c_out=4, dilation=(2, 1),
         padding=((2, 1), (1, 1))),
    Case(n=3, h=9, w=7, c_in=24, c_out=16, feature_groups=2, strides=(2, 1)),
], ids=_ids)
def test_columns_in_chunks(case, rng, monkeypatch):
    """The GPU column route over several chunks (the sampler and col2im read the chunk's first
    image from a device scalar) equals the float64 oracle."""
    from deft_jax import tiling
    monkeypatch.setattr(tiling, "cuda_chunk_images", lambda shape: 2)
    _compare(case, rng, jnp.float64, route="columns")
    x, off, kernel, mask = (jnp.asarray(a) if a is not None else None for a in make_inputs(case, rng))
    f = lambda *a: deft_jax.deform_conv2d(*a, implementation="columns", **case.kwargs())  # noqa: E731
    hlo = jax.jit(f).lower(x, off, kernel, mask).as_text()
    # Unrolled on the GPU (deft_jax/_columns.py): one sampler call per chunk.
    assert hlo.count("deft_sample_columns_cuda_v2") == -(-case.n // 2)


def test_column_route_memory_flat_in_batch(monkeypatch):
    """The GPU column route's chunk chain keeps one chunk's columns alive: XLA's temporary memory
    for the forward and for forward+backward grows by less than half an image's columns per image
    from 8 to 16, 64 and 63 images (a remainder chunk), chunks of 2 images."""
    monkeypatch.setattr(tiling, "cuda_chunk_images", lambda shape: 2)
    case = Case(h=12, w=10, c_in=8, c_out=8)
    ho, wo = case.out_hw()
    half_columns = ho * wo * 9 * case.c_in * 4 // 2
    rng = np.random.default_rng(0)

    def fwd(*a):
        return deft_jax.deform_conv2d(*a, implementation="columns", **case.kwargs())

    def bwd(*a):
        return jax.vjp(fwd, *a[:-1])[1](a[-1])

    temps = {}
    for n in (8, 16, 64, 63):
        args = jax.device_put(make_inputs(Case(**{**vars(case), "n": n}), rng, np.float32), GPU)
        dy = jax.device_put(jnp.ones((n, ho, wo, case.c_out), jnp.float32), GPU)
        temps[n] = [temp_bytes(fwd, *args), temp_bytes(bwd, *args, dy)]
    for n in (16, 64, 63):
        for d in (0, 1):
            assert temps[n][d] - temps[8][d] < (n - 8) * half_columns, (d, temps)
