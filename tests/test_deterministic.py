"""deterministic=True where no GPU is needed: the argument is validated, refused with the
reference implementation, changes nothing on CPU (whose handler is always deterministic), reaches
the Flax modules, steers the GPU tiling away from the split forward and sizes the CUDA workspace.
The GPU behaviour itself is tested in test_gpu_deterministic.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deft_jax
from deft_jax import _ffi, ops, tiling
from helpers import Case, make_inputs

CPU = jax.devices("cpu")[0]


def _grads(case, args, dy, **kw):
    """y and the cotangents of (x, offset, kernel[, mask])."""
    f = lambda *a: deft_jax.deform_conv2d(*a, **case.kwargs(), **kw)
    y, vjp = jax.vjp(f, *args)
    return [np.asarray(a) for a in (y, *vjp(dy))]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64, jnp.bfloat16])
@pytest.mark.parametrize("case", [Case(), Case(with_mask=False, offset_groups=2, c_in=6, c_out=4),
                                  Case(n=2, h=10, w=9, c_in=24, c_out=16, feature_groups=2)],
                         ids=["default", "dcnv1-groups", "feature-groups"])
def test_cpu_unchanged(case, dtype, rng):
    """On CPU deterministic=True runs the same handler with the same attributes: bitwise equal."""
    x, off, kernel, mask = make_inputs(case, rng, np.float64)
    args = [a.astype(dtype) for a in (x, off, kernel, mask) if a is not None]
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)), dtype)
    with jax.default_device(CPU):
        base = _grads(case, args, dy)
        det = _grads(case, args, dy, deterministic=True)
        again = _grads(case, args, dy, deterministic=True)
    for a, b, c in zip(base, det, again):
        assert a.tobytes() == b.tobytes() == c.tobytes()


def test_cpu_calls_do_not_depend_on_the_flag():
    """The CPU route is deterministic either way, so its calls (and compiled programs) are the
    same for both settings; the CUDA calls carry the flag."""
    x, kernel = jnp.zeros((1, 6, 6, 4)), jnp.zeros((3, 3, 4, 8))
    geo = ops.validate(x, jnp.zeros((1, 6, 6, 18)), kernel, None, strides=1, padding=1,
                       kernel_dilation=1, feature_group_count=1)
    a = ops.native_call(x, kernel, geo, False, None, False, "cpu")
    b = ops.native_call(x, kernel, geo, False, None, True, "cpu")
    assert a == b and dict(a.attrs)["deterministic"] == 0
    if deft_jax.cuda_available():
        for route in ("fused", "columns"):
            c = ops.native_call(x, kernel, geo, False, None, True, "cuda", route)
            assert dict(c.attrs)["deterministic"] == 1 and c.route == route


def test_linen_modules_pass_it_on(rng):
    from deft_jax import linen
    # (Shapes of their own: test_validation's check that validation precedes the native call
    # would find this one's compiled call in ops._native_jit's cache.)
    x = jnp.asarray(rng.normal(size=(2, 7, 5, 4)), jnp.float32)
    off = jnp.asarray(rng.normal(size=(2, 7, 5, 18)), jnp.float32)
    for cls, call in ((linen.DeformConv, lambda m, p: m.apply(p, x, off)),
                      (linen.DeformConvPack, lambda m, p: m.apply(p, x))):
        m0, m1 = cls(6, 3), cls(6, 3, deterministic=True)
        assert m1.deterministic and not m0.deterministic
        params = m0.init(jax.random.PRNGKey(0), x, off) if cls is linen.DeformConv else \
            m0.init(jax.random.PRNGKey(0), x)
        with jax.default_device(CPU):
            assert np.asarray(call(m0, params)).tobytes() == np.asarray(call(m1, params)).tobytes()
        bad = cls(6, 3, deterministic=True, implementation="xla")
        with pytest.raises(ValueError, match="deterministic"):
            call(bad, params)


def test_reference_with_deterministic_is_refused():
    x, off, k = jnp.zeros((1, 6, 6, 4)), jnp.zeros((1, 6, 6, 18)), jnp.zeros((3, 3, 4, 8))
    with pytest.raises(ValueError, match=r"^deterministic: .*native implementation"):
        deft_jax.deform_conv2d(x, off, k, padding=1, implementation="xla", deterministic=True)
    # deterministic=False with the reference is fine.
    deft_jax.deform_conv2d(x, off, k, padding=1, implementation="xla", deterministic=False)


@pytest.mark.parametrize("value", [1, "yes", None, jnp.array(True)], ids=["int", "str", "None", "array"])
def test_non_bool_is_refused(value):
    x, off, k = jnp.zeros((1, 6, 6, 4)), jnp.zeros((1, 6, 6, 18)), jnp.zeros((3, 3, 4, 8))
    with pytest.raises(ValueError, match=r"^deterministic: expected a bool"):
        deft_jax.deform_conv2d(x, off, k, padding=1, deterministic=value)


SUITE = {"S1": (8, 64, 64, 64, 64, 1), "S2": (32, 64, 64, 64, 64, 1), "S3": (32, 28, 28, 128, 128, 1),
         "S4": (32, 14, 14, 256, 256, 1), "S5": (32, 7, 7, 512, 512, 1), "S6": (32, 56, 56, 64, 128, 2)}


def _shape(name, dtype, **over):
    n, h, w, c, co, s = SUITE[name]
    ho = (h + 2 - 3) // s + 1
    base = tiling.LayerShape(n=n, h_out=ho, w_out=ho, c_in=c, c_out=co, taps=9, offset_groups=1,
                             feature_groups=1, dtype=dtype)
    return dataclasses.replace(base, **over)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16", "float64"])
@pytest.mark.parametrize("name", list(SUITE))
def test_tiling_never_splits(name, dtype):
    """deterministic: never the split forward (tile_k > 32); the tile is instantiated; layers the
    split forward does not take keep exactly their default tile."""
    for sm, cc in ((0, 0), (132, 9), (108, 8)):
        shape = _shape(name, dtype)
        det = tiling.choose_tiling("cuda", shape, sm, cc, deterministic=True)
        base = tiling.choose_tiling("cuda", shape, sm, cc)
        tiling.check_gpu_tile(det, dtype, cc)
        assert det.tile_k == 32
        if base.tile_k == 32:
            assert det == base
    if name == "S5" and dtype in ("float32", "bfloat16"):
        assert tiling.choose_tiling("cuda", _shape(name, dtype), 132, 9).tile_k > 32  # the default splits


@pytest.mark.skipif(not _ffi.cuda_available(), reason="needs the CUDA module (built, not run)")
@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_cuda_workspace_sizes(dtype):
    """Deterministic workspace: int64 accumulators (8 bytes) + flag nibbles of every cotangent."""
    counts = (1000, 360, 180, 4321)
    det = _ffi._deft_cuda.backward_workspace_bytes(dtype, *counts, deterministic=True)
    assert det >= sum(8 * c + (c + 7) // 8 * 4 for c in counts)
    assert det <= sum(8 * c + (c + 7) // 8 * 4 for c in counts) + 12 * 256 + 64
    base = _ffi._deft_cuda.backward_workspace_bytes(dtype, *counts)
    assert base == _ffi._deft_cuda.backward_workspace_bytes(dtype, *counts, deterministic=False)
    if dtype in ("float32", "float64"):
        assert base == 0  # the default accumulates into the outputs themselves


def test_nnx_modules_pass_it_on(rng):
    from flax import nnx
    from deft_jax import nnx as dnnx
    x = jnp.asarray(rng.normal(size=(2, 7, 5, 4)), jnp.float32)
    off = jnp.asarray(rng.normal(size=(2, 7, 5, 18)), jnp.float32)
    for cls, call in ((dnnx.DeformConv, lambda m: m(x, off)), (dnnx.DeformConvPack, lambda m: m(x))):
        m0 = cls(4, 6, 3, rngs=nnx.Rngs(0))
        m1 = cls(4, 6, 3, deterministic=True, rngs=nnx.Rngs(0))
        assert m1.deterministic and not m0.deterministic
        with jax.default_device(CPU):
            assert np.asarray(call(m0)).tobytes() == np.asarray(call(m1)).tobytes()
        with pytest.raises(ValueError, match="^deterministic"):
            cls(4, 6, 3, deterministic=True, implementation="xla", rngs=nnx.Rngs(0))
        with pytest.raises(ValueError, match="^deterministic: expected a bool"):
            cls(4, 6, 3, deterministic="yes", rngs=nnx.Rngs(0))
