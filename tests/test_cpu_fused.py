"""The CPU fused forward (implementation="fused" on CPU: csrc/cpu/forward.h, the sampler and an
OpenBLAS GEMM per tile of output pixels; the backward is the column route's): float64 parity with
the reference over a grid of geometries, tiles that cut images and cross them, vmap over layers,
half types, bitwise determinism across thread counts, and its errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deft_jax
from deft_jax import _ffi, tiling
from helpers import Case, case_grads, make_inputs, rel_err

pytestmark = [
    pytest.mark.usefixtures("on_cpu"),
    pytest.mark.skipif(_ffi.load_blas() != "", reason=f"no BLAS for the CPU fused forward: {_ffi.load_blas()}"),
]


@pytest.fixture
def tile(monkeypatch):
    """Set the fused forward's pixels per tile."""
    def set_tile(pixels):
        monkeypatch.setattr(tiling, "cpu_tile_pixels", lambda shape: pixels)
    return set_tile


@pytest.mark.parametrize("case", [
    Case(),
    Case(n=3, h=9, w=7, c_in=6, c_out=5, with_mask=False),
    Case(c_in=6, c_out=4, offset_groups=3, strides=(2, 1), padding=((1, 0), (2, 1))),
    Case(n=2, c_in=8, c_out=6, feature_groups=2, offset_groups=2, dilation=(2, 1)),
    Case(n=1, h=8, w=9, c_in=4, c_out=8, feature_groups=4, kernel_size=(2, 3), padding="SAME"),
    Case(n=2, h=5, w=5, c_in=3, c_out=7, kernel_size=(1, 1), padding=0),
    Case(offset_scale=1e4),  # every tap outside: zeros
])
@pytest.mark.parametrize("pixels", [None, 1, 5, 64], ids=["rule", "1px", "5px", "64px"])
def test_float64_matches_reference(case, pixels, tile, rng):
    """y and all four gradients (the backward is the column route's) equal the reference's in
    float64, with tiles from the rule, of one pixel, cutting rows and crossing images."""
    if pixels is not None:
        tile(pixels)
    x, off, kernel, mask = make_inputs(case, rng, jnp.float64)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    got = case_grads(case, x, off, kernel, mask, dy, "fused")
    want = case_grads(case, x, off, kernel, mask, dy, "xla")
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2), (jnp.float16, 2e-3)],
                         ids=["f32", "bf16", "f16"])
def test_low_precision_matches_the_column_route(dtype, tol, rng):
    """In float32 and the half types the fused forward computes what the column route does (the
    columns rounded to the dtype, float32 sums) up to the order of the sums and y's rounding."""
    case = Case(n=3, h=10, w=9, c_in=16, c_out=12, offset_groups=2)
    x, off, kernel, mask = make_inputs(case, rng, dtype)
    f = lambda impl: deft_jax.deform_conv2d(x, off, kernel, mask, implementation=impl, **case.kwargs())
    got, want = f("fused"), f("columns")
    assert got.dtype == want.dtype
    assert rel_err(got, want) < tol


def test_vmap_over_layers(rng):
    """A stack of independent layers (each with its own kernel) is one call."""
    case = Case(n=2, c_in=4, c_out=6)
    layers = [make_inputs(case, rng, jnp.float64) for _ in range(3)]
    x, off, kernel, mask = (jnp.stack([layer[i] for layer in layers]) for i in range(4))
    f = lambda impl: jax.vmap(lambda x, o, k, m: deft_jax.deform_conv2d(
        x, o, k, m, implementation=impl, **case.kwargs()))(x, off, kernel, mask)
    assert rel_err(f("fused"), f("xla")) < 1e-10


def test_repeatable_bits(rng):
    case = Case(n=3, h=9, w=8, c_in=8, c_out=8)
    x, off, kernel, mask = make_inputs(case, rng, jnp.float32)
    f = jax.jit(lambda x, o, k, m: deft_jax.deform_conv2d(x, o, k, m, implementation="fused", **case.kwargs()))
    assert np.asarray(f(x, off, kernel, mask)).tobytes() == np.asarray(f(x, off, kernel, mask)).tobytes()


def test_without_blas_it_says_so(monkeypatch):
    """No BLAS: implementation="fused" on CPU is a ValueError that says what to install."""
    monkeypatch.setattr(_ffi, "_blas_error", "no OpenBLAS here: pip install \"deft_jax[blas]\"")
    x, off, kernel = jnp.zeros((1, 5, 5, 2)), jnp.zeros((1, 5, 5, 18)), jnp.zeros((3, 3, 2, 2))
    with pytest.raises(ValueError, match=r"'fused' on CPU: no OpenBLAS here"):
        deft_jax.deform_conv2d(x, off, kernel, padding=1, implementation="fused")
    assert deft_jax.deform_conv2d(x, off, kernel, padding=1).shape == (1, 5, 5, 2)


def test_handler_refuses_a_bad_tile():
    """The handler checks its attributes itself (an XLA error, not a crash)."""
    x, off, kernel = jnp.zeros((1, 5, 5, 2)), jnp.zeros((1, 5, 5, 18)), jnp.zeros((3, 3, 2, 2))
    attrs = {k: np.int64(v) for k, v in dict(stride_h=1, stride_w=1, pad_top=1, pad_bottom=1,
                                              pad_left=1, pad_right=1, dil_h=1, dil_w=1,
                                              offset_groups=1, feature_groups=1, with_mask=0,
                                              tile_pixels=0).items()}
    with pytest.raises(Exception, match="tile_pixels must be >= 1"):
        jax.block_until_ready(_ffi.cpu_fused_forward(x, off, _ffi.mask_placeholder(x.dtype), kernel,
                                                     attrs, (1, 5, 5, 2)))
    attrs["tile_pixels"] = np.int64(8)
    with pytest.raises(Exception, match="output shape"):
        jax.block_until_ready(_ffi.cpu_fused_forward(x, off, _ffi.mask_placeholder(x.dtype), kernel,
                                                     attrs, (1, 4, 5, 2)))


def test_export_round_trip(rng):
    """jax.export of a program on the CPU fused forward: serialized, deserialized and run, the same
    bits as the direct call; its gradient (the column route's backward) survives too."""
    case = Case(n=2, h=7, w=6, c_in=4, c_out=5)
    args = make_inputs(case, rng, jnp.float32)

    def layer(x, off, kernel, mask):
        return deft_jax.deform_conv2d(x, off, kernel, mask, padding=1, implementation="fused")
    exp = jax.export.export(jax.jit(layer), platforms=("cpu",),
                            disabled_checks=deft_jax.export.disabled_safety_checks())(*args)
    assert f"@{_ffi.target_names('cpu', 'fused')[0]}(" in exp.mlir_module()
    restored = jax.export.deserialize(exp.serialize(vjp_order=1))
    assert np.asarray(restored.call(*args)).tobytes() == np.asarray(jax.jit(layer)(*args)).tobytes()
    g = jax.grad(lambda *a: jnp.sum(restored.call(*a) ** 2), argnums=(0, 1, 2, 3))(*args)
    want = jax.grad(lambda *a: jnp.sum(layer(*a) ** 2), argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(g, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
