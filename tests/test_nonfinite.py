"""Non-finite offsets and masks stay local: deform_conv2d's "Non-finite values" policy.

One entry of the offset (its dy or dx component) or of the mask is set to NaN, +-inf or +-1e30 in
fresh random geometries (strides, paddings, dilations, kernel shapes, offset and feature groups,
DCNv1/v2). From the geometry alone the test knows what may depend on the poisoned entry, and
checks, for the forward and all four cotangents (jax.vjp with a random finite cotangent):

- every entry that cannot depend on the poison is finite and equal (to tolerance) to the same run
  without the poison (or, where the policy says the tap contributes nothing, to the run with that
  tap's mask set to 0);
- the poisoned entries behave as the policy says: a NaN coordinate makes y at its pixel NaN in
  the output channels that read its offset group, the tap's doffset / dmask NaN and dkernel NaN
  exactly where it multiplies those samples, and gives dx nothing; an infinite or huge coordinate
  is outside the image (the tap contributes exactly 0, its doffset / dmask are exactly 0); a
  non-finite mask makes y at its pixel non-finite and may reach only the <= 4 input pixels its
  (finite, inside) sample point reads, the tap's doffset / dmask entries and dkernel.

The native implementation (implementation=None: the C++ CPU handler, or the CUDA kernels when the
default backend is a GPU) and the pure-JAX reference (implementation="xla") go through the same
checks. The GPU tests (marked gpu) repeat them on the GPU for float32 and bfloat16 with every
kernel family forced by a tile override.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import deft_jax
from deft_jax import _ffi, tiling
from helpers import GPU, needs_gpu

# The native op, the CPU fused forward where its BLAS loads (on a GPU backend: the fused CUDA
# kernels) and the reference.
IMPLS = pytest.mark.parametrize("impl", [
    None, pytest.param("fused", marks=pytest.mark.skipif(
        jax.default_backend() == "cpu" and _ffi.load_blas() != "", reason="no BLAS for the CPU fused forward")),
    "xla"], ids=["native", "fused", "xla"])

POISONS = (np.nan, np.inf, -np.inf, 1e30, -1e30)
TARGETS = ("dy", "dx", "mask")
NAMES = ("y", "dx", "doffset", "dkernel", "dmask")


@dataclasses.dataclass(frozen=True)
class Geometry:
    n: int
    h: int
    w: int
    c_in: int
    c_out: int
    kh: int
    kw: int
    strides: tuple
    padding: tuple  # ((top, bottom), (left, right))
    dilation: tuple
    groups: int     # offset groups
    fg: int         # feature groups
    with_mask: bool

    def out_hw(self):
        return tuple((s + lo + hi - d * (k - 1) - 1) // st + 1 for s, (lo, hi), k, st, d in
                     zip((self.h, self.w), self.padding, (self.kh, self.kw), self.strides,
                         self.dilation))

    @property
    def taps(self):
        return self.kh * self.kw

    def kwargs(self):
        return dict(strides=self.strides, padding=self.padding, kernel_dilation=self.dilation,
                    feature_group_count=self.fg)


def random_geometry(rng, vector=False) -> Geometry:
    """A fresh geometry; `vector`: every channel count a multiple of 8 (the GPU's 16-byte paths)."""
    while True:
        kh, kw = [(1, 1), (2, 2), (3, 3), (3, 2), (2, 3)][rng.integers(5)]
        groups, fg = int(rng.choice([1, 2])), int(rng.choice([1, 2]))
        unit = 8 if vector else 1
        c_in = math.lcm(groups, fg) * unit * int(rng.integers(1, 3))
        c_out = fg * unit * int(rng.integers(1, 4))
        geo = Geometry(n=int(rng.integers(1, 3)), h=int(rng.integers(3, 10)),
                       w=int(rng.integers(3, 10)), c_in=c_in, c_out=c_out, kh=kh, kw=kw,
                       strides=tuple(int(s) for s in rng.integers(1, 3, 2)),
                       padding=tuple(tuple(int(p) for p in row) for row in rng.integers(0, 3, (2, 2))),
                       dilation=tuple(int(d) for d in rng.integers(1, 3, 2)), groups=groups, fg=fg,
                       with_mask=bool(rng.random() < 0.6))
        if min(geo.out_hw()) >= 1:
            return geo


def make_args(geo: Geometry, rng, dtype):
    ho, wo = geo.out_hw()
    k = geo.taps
    x = rng.normal(size=(geo.n, geo.h, geo.w, geo.c_in))
    off = rng.normal(size=(geo.n, ho, wo, geo.groups * k * 2)) * 1.5
    kernel = rng.normal(size=(geo.kh, geo.kw, geo.c_in // geo.fg, geo.c_out)) / np.sqrt(k * geo.c_in)
    mask = rng.uniform(0.2, 1.0, size=(geo.n, ho, wo, geo.groups * k))
    dy = rng.normal(size=(geo.n, ho, wo, geo.c_out))
    # Rounded to the dtype once, so the numpy geometry below sees the values the kernels see.
    return [np.asarray(jnp.asarray(a, dtype)) for a in (x, off, kernel, mask, dy)]


def make_runner(geo: Geometry, impl, with_mask: bool, precision=None):
    """jit of (x, offset, kernel, mask, dy) -> (y, dx, doffset, dkernel, dmask); without a mask
    (DCNv1) the mask argument is unused and its cotangent is zero."""
    def run(x, off, kernel, mask, dy):
        def f(x, off, kernel, mask):
            return deft_jax.deform_conv2d(x, off, kernel, mask if with_mask else None,
                                          implementation=impl, precision=precision,
                                          **geo.kwargs())
        y, vjp = jax.vjp(f, x, off, kernel, mask)
        dx, doff, dk, dm = vjp(dy)
        return y, dx, doff, dk, dm
    return jax.jit(run)


def _out_channels_reading(geo: Geometry, g: int) -> np.ndarray:
    """Output channels whose feature group reads an input channel of offset group g."""
    cig, cog, cpog = geo.c_in // geo.fg, geo.c_out // geo.fg, geo.c_in // geo.groups
    o = np.arange(geo.c_out)
    f = o // cog
    return (f * cig < (g + 1) * cpog) & ((f + 1) * cig > g * cpog)


def _kernel_entries_of(geo: Geometry, g: int, tap: int) -> np.ndarray:
    """dkernel entries that multiply samples of offset group g at `tap`: [kh, kw, C_in/fg, C_out]."""
    cig, cog, cpog = geo.c_in // geo.fg, geo.c_out // geo.fg, geo.c_in // geo.groups
    sel = np.zeros((geo.kh, geo.kw, cig, geo.c_out), bool)
    ci = np.arange(cig)[:, None]
    o = np.arange(geo.c_out)[None, :]
    c = (o // cog) * cig + ci
    sel[tap // geo.kw, tap % geo.kw] = (c >= g * cpog) & (c < (g + 1) * cpog)
    return sel


def _corners(geo: Geometry, off: np.ndarray, loc, acc) -> list[tuple[int, int]]:
    """In-image corners of the sample point of tap `tap` at pixel (b, ho, wo), group g, computed in
    the accumulation type as the kernels do; none when the point is not inside (or NaN)."""
    b, ho, wo, g, tap = loc
    i, j = divmod(tap, geo.kw)
    k = geo.taps
    by = ho * geo.strides[0] - geo.padding[0][0] + i * geo.dilation[0]
    bx = wo * geo.strides[1] - geo.padding[1][0] + j * geo.dilation[1]
    with np.errstate(invalid="ignore", over="ignore"):
        py = acc(by) + acc(off[b, ho, wo, (g * k + tap) * 2])
        px = acc(bx) + acc(off[b, ho, wo, (g * k + tap) * 2 + 1])
    if not (-1 < py < geo.h and -1 < px < geo.w):
        return []
    y0, x0 = int(np.floor(py)), int(np.floor(px))
    return [(yy, xx) for yy in (y0, y0 + 1) for xx in (x0, x0 + 1)
            if 0 <= yy < geo.h and 0 <= xx < geo.w]


def _assert_close(name, got, want, check, tol, what):
    """got == want (to tol x the largest |want| compared) and finite wherever `check`."""
    a, b = got[check], want[check]
    assert np.all(np.isfinite(a)), f"{name}: non-finite values outside what the poison may reach ({what})"
    if a.size:
        scale = max(float(np.max(np.abs(b))), 1e-6)
        err = float(np.max(np.abs(a - b)))
        assert err <= tol * scale, f"{name}: differs from the {what} run by {err:.3g} (scale {scale:.3g})"


def check_poison(geo, run, run_masked, args, base, loc, target, value, tol, acc):
    """Poison one entry and check every output against the policy (module docstring)."""
    x, off, kernel, mask, dy = args
    b, ho, wo, g, tap = loc
    k = geo.taps
    pix = (b, ho, wo)
    off_i = pix + ((g * k + tap) * 2 + {"dy": 0, "dx": 1}.get(target, 0),)
    mask_i = pix + (g * k + tap,)
    off_p, mask_p = off.copy(), mask.copy()
    if target == "mask":
        mask_p[mask_i] = value
    else:
        off_p[off_i] = value
    got = [np.asarray(a, np.float64) for a in run(x, off_p, kernel, mask_p, dy)]
    got = dict(zip(NAMES, got))
    what = f"{target}={value} at {loc}"

    free = {n: np.zeros(a.shape, bool) for n, a in got.items()}  # entries not compared
    tap_off = [pix + ((g * k + tap) * 2,), pix + ((g * k + tap) * 2 + 1,)]
    o_read = _out_channels_reading(geo, g)

    if target != "mask":
        # The tap reads nothing in either case: dx, and (outside) y and dkernel, equal the run
        # with the tap's mask set to 0.
        m0 = mask.copy() if geo.with_mask else np.ones_like(mask)  # DCNv1: a unit mask
        m0[mask_i] = 0
        zero = dict(zip(NAMES, [np.asarray(a, np.float64) for a in run_masked(x, off, kernel, m0, dy)]))
        if np.isnan(value):
            y_nan = np.zeros(got["y"].shape, bool)
            y_nan[pix] = o_read
            assert np.all(np.isnan(got["y"][y_nan])), f"y: not NaN where the NaN sample is read ({what})"
            free["y"] |= y_nan
            for t in tap_off:
                assert np.isnan(got["doffset"][t]), f"doffset{t}: not NaN ({what})"
                free["doffset"][t] = True
            if geo.with_mask:
                assert np.isnan(got["dmask"][mask_i]), f"dmask{mask_i}: not NaN ({what})"
                free["dmask"][mask_i] = True
            k_nan = _kernel_entries_of(geo, g, tap)  # NaN exactly where it multiplies the sample
            np.testing.assert_array_equal(np.isnan(got["dkernel"]), k_nan, err_msg=f"dkernel NaN set ({what})")
            free["dkernel"] |= k_nan
            compare = {"y": base, "dx": zero, "doffset": base, "dkernel": zero, "dmask": base}
        else:  # outside the image: exactly nothing
            for t in tap_off:
                assert got["doffset"][t] == 0, f"doffset{t} = {got['doffset'][t]}, not 0 ({what})"
                free["doffset"][t] = True
            if geo.with_mask:
                assert got["dmask"][mask_i] == 0, f"dmask{mask_i} = {got['dmask'][mask_i]}, not 0 ({what})"
                free["dmask"][mask_i] = True
            compare = {"y": zero, "dx": zero, "doffset": base, "dkernel": zero, "dmask": base}
    else:
        y_bad = np.zeros(got["y"].shape, bool)
        y_bad[pix] = o_read
        if not np.isfinite(value):
            assert not np.any(np.isfinite(got["y"][y_bad])), f"y: finite where the non-finite mask multiplies ({what})"
        free["y"] |= y_bad
        for t in tap_off:
            free["doffset"][t] = True
        free["dmask"][mask_i] = True
        cpog = geo.c_in // geo.groups
        for yy, xx in _corners(geo, off, loc, acc):
            free["dx"][b, yy, xx, g * cpog:(g + 1) * cpog] = True
        free["dkernel"][...] = True
        compare = {n: base for n in NAMES}

    for n in NAMES:
        if n == "dmask" and not geo.with_mask:
            continue
        _assert_close(n, got[n], compare[n][n], ~free[n], tol,
                      f"{'unpoisoned' if compare[n] is base else 'tap-masked'}; {what}")


def poison_search(geo, rng, dtype, impl, tol, locations=2, precision=None, device=None):
    """Every poison value in every target at `locations` random (pixel, group, tap) places, on
    `device` (None: the default one)."""
    def runner(with_mask):
        run = make_runner(geo, impl, with_mask, precision)
        return run if device is None else lambda *a: run(*jax.device_put(a, device))

    args = make_args(geo, rng, dtype)
    run = runner(geo.with_mask)
    run_masked = run if geo.with_mask else runner(True)
    base = dict(zip(NAMES, [np.asarray(a, np.float64) for a in run(*args)]))
    for n, a in base.items():
        assert np.all(np.isfinite(a)), f"{n}: the unpoisoned run is not finite"
    acc = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    ho, wo = geo.out_hw()
    for _ in range(locations):
        loc = (int(rng.integers(geo.n)), int(rng.integers(ho)), int(rng.integers(wo)),
               int(rng.integers(geo.groups)), int(rng.integers(geo.taps)))
        for target in TARGETS if geo.with_mask else TARGETS[:2]:
            for value in POISONS:
                check_poison(geo, run, run_masked, args, base, loc, target, value, tol, acc)


# ---------------------------------------------------------------------------------------------
# (a) The default backend (the C++ CPU handler here; the CUDA kernels where the default backend is
# a GPU) and the reference.

TOL = {"float64": 1e-9, "float32": 1e-4}


def _reproducer(impl):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(1, 5, 11, 2)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 2, 2, 1)), jnp.float32)
    off = np.zeros((1, 3, 6, 8), np.float32)
    off[0, 2, 2, 0] = np.nan
    f = lambda x, o, k: deft_jax.deform_conv2d(x, o, k, strides=2, padding=1, implementation=impl)
    y, vjp = jax.vjp(f, x, jnp.asarray(off), kernel)
    dx, doff, dk = vjp(jnp.ones_like(y))
    return [np.asarray(a) for a in (y, dx, doff, dk)]


def _check_reproducer(impl):
    """The issue's case: y is non-finite at output (2, 2) only, and dx was non-finite at input
    pixels (1, 3) and (1, 4) that no tap with a defined sample point touched; now dx is finite."""
    y, dx, doff, dk = _reproducer(impl)
    assert np.argwhere(~np.isfinite(y))[:, 1:3].tolist() == [[2, 2]]
    assert np.all(np.isfinite(dx))
    assert np.argwhere(~np.isfinite(doff)).tolist() == [[0, 2, 2, 0], [0, 2, 2, 1]]
    assert np.all(np.isnan(doff[0, 2, 2, :2]))
    # Tap (0, 0) of the 2 x 2 kernel multiplies the NaN sample: dkernel[0, 0, :, :] only.
    assert np.argwhere(~np.isfinite(dk)).tolist() == [[0, 0, 0, 0], [0, 0, 1, 0]]


@IMPLS
def test_issue_reproducer(impl):
    _check_reproducer(impl)


@pytest.mark.parametrize("value", [np.inf, -np.inf, 1e30, -1e30])
@IMPLS
def test_infinite_offset_is_outside(impl, value):
    """An infinite offset is outside the image (the reference once made ly = inf - inf = NaN)."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.normal(size=(1, 5, 11, 2)), jnp.float32)
    kernel = jnp.asarray(rng.normal(size=(2, 2, 2, 1)), jnp.float32)
    off = np.zeros((1, 3, 6, 8), np.float32)
    off[0, 2, 2, 1] = value
    f = lambda x, o, k: deft_jax.deform_conv2d(x, o, k, strides=2, padding=1, implementation=impl)
    y, vjp = jax.vjp(f, x, jnp.asarray(off), kernel)
    outs = [np.asarray(a) for a in (y, *vjp(jnp.ones_like(y)))]
    assert all(np.all(np.isfinite(a)) for a in outs)
    assert np.all(outs[2][0, 2, 2, :2] == 0)


@pytest.mark.parametrize("seed", range(8))
@IMPLS
def test_random_poisoning_float32(impl, seed):
    rng = np.random.default_rng(1000 + seed)
    poison_search(random_geometry(rng), rng, jnp.float32, impl, TOL["float32"])


@pytest.mark.parametrize("seed", range(4))
@IMPLS
def test_random_poisoning_float64(impl, seed):
    rng = np.random.default_rng(2000 + seed)
    poison_search(random_geometry(rng), rng, jnp.float64, impl, TOL["float64"])


def test_native_matches_reference_on_poisoned_inputs():
    """Where both are finite the native op and the reference agree, and they are non-finite in
    the same places, for NaN and infinite offsets (the mask rules leave inf vs NaN open)."""
    rng = np.random.default_rng(7)
    geo = Geometry(n=2, h=7, w=6, c_in=4, c_out=6, kh=3, kw=3, strides=(1, 1),
                   padding=((1, 1), (1, 1)), dilation=(1, 1), groups=2, fg=2, with_mask=True)
    x, off, kernel, mask, dy = make_args(geo, rng, jnp.float64)
    off = off.copy()
    off[0, 3, 2, 5] = np.nan
    off[1, 0, 0, 10] = np.inf
    off[1, 4, 4, 3] = -1e30
    outs = {impl: [np.asarray(a) for a in make_runner(geo, impl, True)(x, off, kernel, mask, dy)]
            for impl in (None, "xla")}
    for name, a, b in zip(NAMES, outs[None], outs["xla"]):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=name)
        np.testing.assert_array_equal(np.isinf(a), np.isinf(b), err_msg=name)
        fin = np.isfinite(b)
        assert np.max(np.abs(a[fin] - b[fin])) <= 1e-10 * max(np.max(np.abs(b[fin])), 1.0), name


# ---------------------------------------------------------------------------------------------
# (b) The CUDA kernels, every family forced by a tile override (skipped without a GPU).


# TileConfig(tile_h, tile_w, tile_n, tile_k, warps, stages, bwd_tile_n, k_splits) -> the family.
GPU_FAMILIES = {
    "chosen": None,                                               # whatever tiling.py picks
    "stream-simple": (8, 8, 64, 32, 4, 1),                        # simple loops (fwd, data, weight)
    "stream-pipelined": (8, 8, 64, 32, 4, 2),                     # register-prefetch pipelines
    "stream-flat-128": (1, 128, 128, 32, 8, 2),                   # flat tiles across images
    "split-fwd": (8, 8, 64, 128, 4, 2),                           # split forward (fp32 atomics)
    "ws-64x64": (8, 8, 64, 32, 8, 3),                             # warp-specialized ring
    "ws-flat-128x128": (1, 128, 128, 32, 8, 3),
    "ws-ksplit-2": (1, 128, 128, 32, 8, 3, 128, 2),               # k-split clusters (sm_90)
    "wide-weight": (8, 8, 64, 32, 4, 2, 128),                     # 64 x 128 weight pass
    "columns": None,                                              # the column route (its sampler,
}                                                                 # cuBLAS and col2im)


def _gpu_impl(family):
    return "columns" if family == "columns" else None
GPU_TOL = {"float32": 1e-3, "bfloat16": 3e-2}


def _force_tile(monkeypatch, cfg):
    if cfg is None:
        return
    tc = tiling.TileConfig(*cfg)
    if tc.k_splits > 1:
        cc = str(getattr(GPU, "compute_capability", "") or "0").split(".")[0]
        if int(cc or 0) < 9:
            pytest.skip("k-split clusters need compute capability 9.0+")
    monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)


def _gpu_search(geo, rng, dtype, impl, monkeypatch, cfg, precision=None):
    _force_tile(monkeypatch, cfg)
    poison_search(geo, rng, dtype, impl, GPU_TOL[jnp.dtype(dtype).name], precision=precision,
                  device=GPU)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("family", list(GPU_FAMILIES))
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gpu_random_poisoning(dtype, family, seed, monkeypatch):
    # Seeds 0 and 1: 16-byte vector channel counts (the pipelined, split and ring paths); seed 2:
    # scalar channel counts (the simple loops the launchers fall back to).
    rng = np.random.default_rng(3000 + 17 * seed + 7 * len(family))
    geo = random_geometry(rng, vector=seed < 2)
    _gpu_search(geo, rng, dtype, _gpu_impl(family), monkeypatch, GPU_FAMILIES[family])


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("family", ["chosen", "stream-simple", "ws-64x64", "columns"])
def test_gpu_random_poisoning_exact_fp32(family, monkeypatch):
    """float32 at Precision.HIGHEST: the SIMT paths (no tensor cores; the ring falls back)."""
    rng = np.random.default_rng(4000 + len(family))
    _gpu_search(random_geometry(rng, vector=True), rng, jnp.float32, _gpu_impl(family), monkeypatch,
                GPU_FAMILIES[family], precision=lax.Precision.HIGHEST)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_gpu_reference_poisoning(dtype, monkeypatch):
    rng = np.random.default_rng(5000)
    _gpu_search(random_geometry(rng, vector=True), rng, dtype, "xla", monkeypatch, None)


@pytest.mark.gpu
@needs_gpu
@pytest.mark.parametrize("impl", [None, "columns", "xla"], ids=["native", "columns", "xla"])
def test_gpu_issue_reproducer(impl):
    with jax.default_device(GPU):
        _check_reproducer(impl)

