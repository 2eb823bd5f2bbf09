"""deterministic=True on the GPU: the forward and all four cotangents are bitwise identical from run
to run, as accurate as the default mode against the float64 reference (test_gpu.py's tolerances),
and non-finite inputs give the default mode's non-finite pattern. Skipped without a GPU or the
CUDA module.

Without the flag, S4 (32x14x14x256->256) float32 gave 10 different dx, doffset, dkernel and dmask
in 10 runs of fwd+bwd, and S5 (32x7x7x512->512) 10 different y (the split forward).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import deft_jax
from deft_jax import tiling
from helpers import GPU, Case, make_inputs, needs_gpu, oracle_vjp, rel_err, worst_at
from test_gpu import TOL


pytestmark = [pytest.mark.gpu, needs_gpu]

RUNS = 5
DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16, jnp.float64]
DTYPE_IDS = ["f32", "bf16", "f16", "f64"]


def _suite(n, h, w, c, co, s):
    return Case(n=n, h=h, w=w, c_in=c, c_out=co, strides=(s, s), padding=1)


# The benchmark suite (DESIGN.md) at full batch: reproducibility only (no reference).
SUITE = {
    "S1": _suite(8, 64, 64, 64, 64, 1),
    "S2": _suite(32, 64, 64, 64, 64, 1),
    "S3": _suite(32, 28, 28, 128, 128, 1),
    "S4": _suite(32, 14, 14, 256, 256, 1),
    "S5": _suite(32, 7, 7, 512, 512, 1),
    "S6": _suite(32, 56, 56, 64, 128, 2),
}
# Reduced batch (the float64 reference runs on the CPU) plus odd shapes: scalar channel paths,
# offset and feature groups, DCNv1, chunks meeting per offset group, a 5x5 kernel.
ACCURACY = {
    "S1": _suite(2, 64, 64, 64, 64, 1),
    "S2": _suite(3, 64, 64, 64, 64, 1),
    "S3": _suite(4, 28, 28, 128, 128, 1),
    "S4": _suite(4, 14, 14, 256, 256, 1),
    "S5": _suite(8, 7, 7, 512, 512, 1),
    "S6": _suite(2, 56, 56, 64, 128, 2),
    "odd-channels": Case(n=3, h=11, w=10, c_in=5, c_out=7, strides=(3, 2), dilation=(1, 2),
                         padding=((0, 2), (1, 3))),
    "vector-chunks": Case(n=2, h=13, w=11, c_in=72, c_out=80),
    "groups-dcnv1": Case(n=1, h=17, w=9, c_in=64, c_out=136, offset_groups=4, feature_groups=2,
                         with_mask=False),
    "offset-groups": Case(n=2, h=10, w=12, c_in=48, c_out=32, offset_groups=3, strides=(2, 2),
                          padding=((2, 1), (1, 2))),
    "groups-5x5": Case(n=1, h=9, w=9, c_in=24, c_out=24, offset_groups=2, feature_groups=3,
                       kernel_size=(5, 5), padding=2),
    "dcnv1": Case(n=2, h=12, w=12, c_in=32, c_out=48, with_mask=False, offset_scale=0.3),
}
NAMES = ["y", "dx", "doffset", "dkernel", "dmask"]


def _op(case, impl=None, **kw):
    def f(x, off, k, *m):
        return deft_jax.deform_conv2d(x, off, k, m[0] if m else None, implementation=impl,
                                      **case.kwargs(), **kw)
    return f


def _inputs(case, rng, dtype):
    x, off, kernel, mask = make_inputs(case, rng, np.float64)
    args = [a.astype(dtype) for a in (x, off, kernel, mask) if a is not None]
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out))).astype(dtype)
    return args, dy


def _vjp_fn(case, **kw):
    f = _op(case, **kw)

    def run(args, dy):
        y, vjp = jax.vjp(f, *args)
        return (y, *vjp(dy))
    return jax.jit(run)


def _runs(case, args, dy, runs=RUNS, **kw):
    """`runs` evaluations of (y, dx, doffset, dkernel[, dmask]) on the GPU, as numpy arrays."""
    fn = _vjp_fn(case, **kw)
    args, dy = jax.device_put(args, GPU), jax.device_put(dy, GPU)
    return [[np.asarray(o) for o in fn(args, dy)] for _ in range(runs)]


def _assert_identical(outs):
    first = outs[0]
    for k, other in enumerate(outs[1:], 1):
        for name, a, b in zip(NAMES, first, other):
            assert a.tobytes() == b.tobytes(), f"{name} differs between run 0 and run {k}"


def _tol(dtype):
    name = jnp.dtype(dtype).name
    return TOL["float32-tf32" if name == "float32" else name]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(SUITE))
def test_suite_reproducible(name, dtype, rng):
    """Full batch: RUNS x fwd+bwd give bitwise identical y, dx, doffset, dkernel, dmask."""
    args, dy = _inputs(SUITE[name], rng, dtype)
    _assert_identical(_runs(SUITE[name], args, dy, deterministic=True))


# Both GPU routes have a deterministic mode (fused: fixed-point backward; columns: fixed-point
# col2im around XLA's dots): each is checked on every case, whatever the route table picks.
ROUTES = ["fused", "columns"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(ACCURACY))
def test_reproducible_and_accurate(name, dtype, route, rng):
    """RUNS x fwd+bwd bitwise identical, and within test_gpu.py's tolerance of the float64
    reference (on the CPU, same rounded inputs); the default mode is checked alongside, so a
    failure says which of the two is off."""
    case = ACCURACY[name]
    args, dy = _inputs(case, rng, dtype)
    outs = _runs(case, args, dy, deterministic=True, impl=route)
    _assert_identical(outs)
    want = oracle_vjp(case, args, dy, dtype)
    default = _runs(case, args, dy, runs=1, impl=route)[0]
    tol = _tol(dtype)
    errs = {n: rel_err(np.asarray(a, np.float64), b) for n, a, b in zip(NAMES, outs[0], want)}
    errs_default = {n: rel_err(np.asarray(a, np.float64), b) for n, a, b in zip(NAMES, default, want)}
    for o in outs[0]:
        assert np.all(np.isfinite(np.asarray(o, np.float64)))
    where = {n: worst_at(a, b) for n, a, b in zip(NAMES, outs[0], want)}
    assert max(errs.values()) < tol, (errs, errs_default, where)


@pytest.mark.parametrize("dtype,precision", [(jnp.float32, lax.Precision.HIGHEST), (jnp.float32, None),
                                             (jnp.bfloat16, None), (jnp.float16, None)],
                         ids=["f32-highest", "f32-tf32", "bf16", "f16"])
def test_fixed_point_adds_no_visible_error(dtype, precision, rng):
    """The deterministic outputs are as close to the float64 reference as the default mode's (their
    rounding error, at most 1.5x + 2 ulp of the dtype): the fixed point's is far below float32's.
    S4 shape (channel chunks meeting in atomics), reduced batch. (float64 is not in this list: its
    fixed point is coarser than float64's own rounding; test_reproducible_and_accurate holds it
    to test_gpu.py's float64 tolerance.)"""
    case = ACCURACY["S4"]
    args, dy = _inputs(case, rng, dtype)
    det = _runs(case, args, dy, runs=1, deterministic=True, precision=precision)[0]
    default = _runs(case, args, dy, runs=1, precision=precision)[0]
    want = oracle_vjp(case, args, dy, dtype)
    eps = float(jnp.finfo(dtype).eps)
    for name, a, b, w in zip(NAMES, det, default, want):
        e_det, e_def = rel_err(np.asarray(a, np.float64), w), rel_err(np.asarray(b, np.float64), w)
        assert e_det <= 1.5 * e_def + 2 * eps, (name, e_det, e_def)


POISON_CASES = {
    "small": Case(n=2, h=9, w=11, c_in=32, c_out=16, offset_scale=3.0),
    "chunks": Case(n=2, h=10, w=10, c_in=128, c_out=64, offset_scale=2.0),
    "dcnv1-groups": Case(n=2, h=9, w=8, c_in=24, c_out=12, offset_groups=2, with_mask=False),
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(POISON_CASES))
def test_non_finite_pattern_matches_default(name, dtype, route, rng):
    """NaN / +inf / -inf in x, offset, mask and dy: every output element is NaN, +inf or -inf
    exactly where the default mode's is, finite elsewhere and close to it; still reproducible."""
    case = POISON_CASES[name]
    args, dy = _inputs(case, rng, dtype)
    x, off, kernel = (np.array(a) for a in args[:3])
    x[0, 0, 0, 3] = np.inf          # a corner pixel: samples straddle the border there
    x[1, 4, 5, :] = -np.inf         # a whole pixel inside
    x[1, 2, 2, 1] = np.nan
    off[0, 3, 4, 5] = np.nan        # one (pixel, tap) coordinate
    off[1, 1, 1, 0] = np.inf
    dy = np.array(dy)
    dy[0, 5, 5, 2] = np.inf
    dy[1, 6, 2, :] = -np.inf
    poisoned = [jnp.asarray(x), jnp.asarray(off), jnp.asarray(kernel)]
    if case.with_mask:
        m = np.array(args[3])
        m[0, 2, 6, 4] = np.inf
        poisoned.append(jnp.asarray(m))
    dy = jnp.asarray(dy)
    outs = _runs(case, poisoned, dy, runs=3, deterministic=True, impl=route)
    _assert_identical(outs)
    default = _runs(case, poisoned, dy, runs=1, impl=route)[0]
    some = False
    for n, a, b in zip(NAMES, outs[0], default):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b), err_msg=f"{n}: NaN pattern")
        np.testing.assert_array_equal(np.isposinf(a), np.isposinf(b), err_msg=f"{n}: +inf pattern")
        np.testing.assert_array_equal(np.isneginf(a), np.isneginf(b), err_msg=f"{n}: -inf pattern")
        fin = np.isfinite(b)
        some |= not np.all(fin)
        if np.any(fin):
            assert rel_err(a[fin], b[fin]) < 2 * _tol(dtype), n
    assert some  # the test has teeth


def test_split_tile_guard(rng, monkeypatch):
    """A hand-made split-forward tile with deterministic=True: the launcher runs the streaming
    kernel of that tile instead, so the forward is still reproducible."""
    tc = tiling.TileConfig(8, 8, 64, 256, 4, 2, 128)
    monkeypatch.setattr(tiling, "choose_tiling", lambda *a, **k: tc)
    case = _suite(32, 7, 7, 512, 512, 1)
    args, dy = _inputs(case, rng, jnp.bfloat16)
    outs = _runs(case, args, dy, runs=RUNS, deterministic=True)
    _assert_identical(outs)


def test_vmap_and_precision(rng):
    """Leading (vmap) dims and Precision.HIGHEST (the exact SIMT path) are reproducible too."""
    case = Case(n=2, h=14, w=14, c_in=64, c_out=96, offset_scale=1.0)
    args, dy = _inputs(case, rng, jnp.float32)
    stacked = [jnp.stack([a, 0.5 * a]) for a in args]
    dys = jnp.stack([dy, -dy])
    f = _op(case, precision=lax.Precision.HIGHEST, deterministic=True)

    def run(a, g):
        y, vjp = jax.vjp(f, *a)
        return (y, *vjp(g))
    fn = jax.jit(jax.vmap(run))
    outs = [[np.asarray(o) for o in fn(stacked, dys)] for _ in range(3)]
    _assert_identical(outs)
    single = [np.asarray(o) for o in jax.jit(run)(args, dy)]
    for a, b in zip(outs[0], single):
        assert rel_err(a[0], b) < TOL["float32-highest"]
