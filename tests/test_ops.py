"""Native CPU handler vs the pure-JAX reference: forward and all four cotangents."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.test_util import check_grads

import deft_jax
from helpers import Case, make_inputs, oracle_offset, rel_err

# The CPU handler's tests: on a GPU machine too (where the default device would test the GPU route,
# at TF32 and without determinism by default: tests/test_gpu*.py cover that route).
pytestmark = pytest.mark.usefixtures("on_cpu")

GRID = [
    Case(),
    Case(with_mask=False),
    Case(strides=(2, 1), padding=((1, 0), (2, 1))),
    Case(strides=(2, 2), padding="SAME", h=9, w=8),
    Case(padding="VALID", h=8, w=9),
    Case(dilation=(2, 3), padding=((2, 2), (3, 3))),
    Case(kernel_size=(1, 1), padding=0),
    Case(kernel_size=(3, 1), padding=((1, 1), (0, 0))),
    Case(kernel_size=(5, 5), padding=2, h=6, w=5),
    Case(offset_groups=2, c_in=6, c_out=4),
    Case(feature_groups=2, c_in=4, c_out=6),
    Case(offset_groups=2, feature_groups=2, c_in=8, c_out=4, with_mask=False),
    Case(offset_groups=4, feature_groups=2, c_in=8, c_out=6, strides=(1, 2), padding=((0, 2), (1, 0))),
    Case(offset_scale=0.1),
    Case(offset_scale=50.0),
    Case(n=1, h=3, w=3, c_in=3, c_out=5, offset_scale=1.5),
    Case(n=3, h=11, w=10, c_in=5, c_out=7, strides=(3, 2), dilation=(1, 2), padding=((0, 2), (1, 3))),
]


def _ids(c):
    return "-".join(f"{k}={v}" for k, v in vars(c).items() if v != getattr(Case(), k)) or "default"


def _both(case, x, off, kernel, mask, dy):
    out = {}
    for impl in (None, "xla"):
        f = lambda *a, impl=impl: deft_jax.deform_conv2d(a[0], a[1], a[2], a[3] if len(a) > 3 else None,
                                                         implementation=impl, **case.kwargs())
        args = (x, off, kernel) + ((mask,) if mask is not None else ())
        y, vjp = jax.vjp(f, *args)
        out[impl] = (y, *vjp(dy))
    return out


@pytest.mark.parametrize("case", GRID, ids=_ids)
def test_float64_parity(case, rng):
    x, off, kernel, mask = make_inputs(case, rng)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    out = _both(case, x, off, kernel, mask, dy)
    names = ["y", "dx", "doffset", "dkernel", "dmask"][: len(out[None])]
    for name, a, b in zip(names, out[None], out["xla"]):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.all(np.isfinite(np.asarray(a))), name
        assert rel_err(a, b) < 1e-10, (name, rel_err(a, b))


@pytest.mark.parametrize("case", GRID[::3], ids=_ids)
def test_integer_coordinates_parity(case, rng):
    """Offsets of whole pixels: every sample point on the integer grid (where bilinear gradients
    jump) and some on the image border; the native op takes the reference's side of each kink."""
    x, off, kernel, mask = make_inputs(case, rng)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    out = _both(case, x, jnp.round(off), kernel, mask, dy)
    for a, b in zip(out[None], out["xla"]):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[9], GRID[10]], ids=_ids)
def test_float32_parity(case, rng):
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)), jnp.float32)
    ref = _both(case, *(None if a is None else a.astype(jnp.float64) for a in (x, off, kernel, mask)),
                dy.astype(jnp.float64))["xla"]
    out = _both(case, x, off, kernel, mask, dy)[None]
    for a, b in zip(out, ref):
        assert a.dtype == jnp.float32
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision(dtype, rng):
    """Native half-type error is of the order of the same-dtype reference's own error."""
    case = Case(c_in=8, c_out=8, offset_groups=2)
    x, off, kernel, mask = make_inputs(case, rng, np.float64)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    exact = _both(case, x, off, kernel, mask, dy)["xla"]
    lo = [a.astype(dtype) for a in (x, off, kernel, mask, dy)]
    native = _both(case, *lo[:4], lo[4])[None]
    ref_lo = _both(case, *lo[:4], lo[4])["xla"]
    for a, r, e in zip(native, ref_lo, exact):
        assert a.dtype == dtype
        assert rel_err(a, e) <= 2.0 * rel_err(r, e) + 2e-2


@pytest.mark.parametrize("case", [Case(n=1, h=4, w=5, c_in=2, c_out=3),
                                  Case(n=1, h=5, w=4, c_in=4, c_out=2, offset_groups=2,
                                       feature_groups=2, strides=(2, 1), with_mask=False)], ids=_ids)
def test_check_grads(case, rng):
    x, off, kernel, mask = make_inputs(case, rng, off_grid=True)
    args = (x, off, kernel) + ((mask,) if mask is not None else ())
    f = lambda *a: deft_jax.deform_conv2d(a[0], a[1], a[2], a[3] if len(a) > 3 else None, **case.kwargs())
    check_grads(f, args, order=1, modes=["rev"], eps=1e-6, atol=1e-6, rtol=1e-6)


def test_zero_offset_unit_mask_is_dense_conv(rng):
    case = Case(strides=(2, 1), dilation=(1, 2), padding=((1, 2), (2, 1)), feature_groups=2)
    x, off, kernel, mask = make_inputs(case, rng)
    y = deft_jax.deform_conv2d(x, jnp.zeros_like(off), kernel, jnp.ones_like(mask), **case.kwargs())
    yc = jax.lax.conv_general_dilated(x, kernel, case.strides, case.padding, rhs_dilation=case.dilation,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=case.feature_groups)
    assert rel_err(y, yc) < 1e-12


def test_integer_offsets_shift_the_input(rng):
    """An offset of exactly (1, -2) px for every tap equals the dense conv of the shifted image."""
    case = Case(kernel_size=(1, 1), padding=0, h=6, w=7, offset_scale=0.0)
    x, off, kernel, _ = make_inputs(case, rng)
    off = jnp.broadcast_to(jnp.asarray([1.0, -2.0]), off.shape)
    y = deft_jax.deform_conv2d(x, off, kernel)
    shifted = jnp.zeros_like(x).at[:, :-1, 2:, :].set(x[:, 1:, :-2, :])
    assert rel_err(y, jnp.einsum("nhwc,co->nhwo", shifted, kernel[0, 0])) < 1e-12


def test_deterministic(rng):
    case = Case(n=2, h=9, w=9, c_in=8, c_out=8)
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    f = jax.jit(jax.grad(lambda *a: jnp.sum(deft_jax.deform_conv2d(*a, padding=1) ** 2), argnums=(0, 1, 2, 3)))
    a, b = f(x, off, kernel, mask), f(x, off, kernel, mask)
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)


def test_infinite_input_reads_no_outside_corner(rng):
    """+inf in x: a corner outside the image reads nothing (torchvision), so the reference and the
    CPU handler turn the same outputs inf or NaN. (The reference once multiplied the stand-in
    pixel 0 by a zero weight: 0 x inf made 1584 of 3168 outputs NaN from one corner pixel.)"""
    case = Case(n=2, h=9, w=11, c_in=32, c_out=16, offset_scale=3.0)
    x, off, kernel, mask = make_inputs(case, rng, np.float32)
    x = np.array(x)
    x[0, 0, 0, 3] = np.inf
    x[1, 4, 5, :] = np.inf
    f = lambda impl: np.asarray(deft_jax.deform_conv2d(jnp.asarray(x), off, kernel, mask,
                                                       implementation=impl, **case.kwargs()))
    want, got = f("xla"), f(None)
    assert np.isinf(want).any() and np.isnan(want).any() and np.isfinite(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
    fin = np.isfinite(want)
    assert rel_err(got[fin], want[fin]) < 1e-5

    def grads(impl):  # the offset and mask cotangents too: no 0 x inf in the backward either
        op = lambda *a: deft_jax.deform_conv2d(*a, implementation=impl, **case.kwargs())
        y, vjp = jax.vjp(op, jnp.asarray(x), off, kernel, mask)
        return [np.asarray(g) for g in vjp(jnp.ones_like(y))]
    for name, g_want, g_got in zip(("dx", "doffset", "dkernel", "dmask"), grads("xla"), grads(None)):
        np.testing.assert_array_equal(np.isfinite(g_got), np.isfinite(g_want), err_msg=name)
    assert not np.isfinite(grads("xla")[1]).all() and np.isfinite(grads("xla")[1]).any()


@pytest.mark.parametrize("config,precision,tf32", [
    (None, None, True), ("highest", None, False), ("float32", None, False),
    ("tensorfloat32", None, True), ("default", None, True),
    (None, lax.Precision.HIGHEST, False), ("highest", lax.Precision.DEFAULT, True),
])
def test_tf32_follows_precision_and_the_jax_default(config, precision, tf32):
    """The fused kernels take TF32 for float32 where lax would: precision=None follows
    jax.default_matmul_precision, an explicit precision wins over it."""
    from deft_jax import ops
    with jax.default_matmul_precision(config):
        assert ops._allow_tf32(precision) is tf32


def test_float32_sample_point_rounds_across_a_kink(rng):
    """base 39 + offset (1 - 2^-24) is 39.99999994 in float64 but 40.0 in float32 (spacing 2^-18
    there): the float32 op samples from row 40, where the bilinear gradient has jumped. Its doffset
    there is far from the naive float64 oracle's and equal to the oracle of oracle_offset (which
    moves the float64 sample point to float32's), which the GPU accuracy tests use."""
    case = Case(n=1, h=48, w=12, c_in=4, c_out=3, padding=1)
    x, _, kernel, mask = make_inputs(case, rng, np.float32)
    off = np.zeros((1, 48, 12, 18), np.float32)
    off[0, 40, 5, 0] = np.float32(1 - 2.0**-24)  # tap (0, 0): base row 40 - 1 + 0 = 39
    off = jnp.asarray(off)
    dy = jnp.asarray(rng.normal(size=(1, 48, 12, 3)), jnp.float32)

    def doffset(args, impl):
        f = lambda *a: deft_jax.deform_conv2d(*a, implementation=impl, **case.kwargs())  # noqa: E731
        return float(jax.vjp(f, *args)[1](dy.astype(args[0].dtype))[1][0, 40, 5, 0])

    got = doffset((x, off, kernel, mask), None)
    up = [a.astype(jnp.float64) for a in (x, off, kernel, mask)]
    naive = doffset(up, "xla")
    moved = doffset([up[0], oracle_offset(case, up[1], jnp.float32), *up[2:]], "xla")
    assert abs(got - moved) < 1e-5 * max(abs(moved), 1)
    assert abs(got - naive) > 1e-2 * max(abs(naive), 1e-3), (got, naive, moved)
