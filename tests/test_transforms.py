"""jit, vmap, grad, checkpoint, and that the CPU op lowers to its custom calls (on the CPU, also on
a GPU machine)."""

import jax
import jax.numpy as jnp
import pytest

import deft_jax
from deft_jax import _ffi
from helpers import Case, make_inputs, rel_err

CASE = Case(n=2, h=6, w=5, c_in=4, c_out=3, offset_groups=2)
# The CPU route, also on a GPU machine (conftest.on_cpu).
pytestmark = pytest.mark.usefixtures("on_cpu")


def f(x, off, kernel, mask, impl=None):
    return deft_jax.deform_conv2d(x, off, kernel, mask, **CASE.kwargs(), implementation=impl)


def loss(*a):
    return jnp.sum(jnp.sin(f(*a)))


def test_jit_grad_value_and_grad(rng):
    args = make_inputs(CASE, rng)
    v, g = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
    vr, gr = jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(f(*a, impl="xla"))), argnums=(0, 1, 2, 3))(*args)
    assert abs(float(v - vr)) < 1e-10
    for a, b in zip(g, gr):
        assert rel_err(a, b) < 1e-10


def test_checkpoint(rng):
    args = make_inputs(CASE, rng)
    g1 = jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2, 3))(*args)
    g2 = jax.grad(loss, argnums=(0, 1, 2, 3))(*args)
    for a, b in zip(g1, g2):
        assert rel_err(a, b) < 1e-12


def test_vmap_over_data_and_over_layers(rng):
    """vmap over inputs with a shared kernel, and over independent layers, equals a Python loop."""
    batches = [make_inputs(CASE, rng) for _ in range(3)]
    xs, offs, ks, ms = (jnp.stack(a) for a in zip(*batches))
    loop = jnp.stack([f(*b) for b in batches])
    assert rel_err(jax.vmap(f)(xs, offs, ks, ms), loop) < 1e-12  # independent layers
    shared = jnp.stack([f(b[0], b[1], ks[0], b[3]) for b in batches])
    assert rel_err(jax.vmap(f, in_axes=(0, 0, None, 0))(xs, offs, ks[0], ms), shared) < 1e-12
    # Gradients through vmap, DCNv1 included.
    gv = jax.vmap(jax.grad(lambda x, o, k: jnp.sum(f(x, o, k, None) ** 2), argnums=(0, 1, 2)))(xs, offs, ks)
    for i, b in enumerate(batches):
        gl = jax.grad(lambda x, o, k: jnp.sum(f(x, o, k, None) ** 2), argnums=(0, 1, 2))(*b[:3])
        for a, c in zip(gv, gl):
            assert rel_err(a[i], c) < 1e-12


def test_dcnv1_has_no_mask_gradient(rng):
    x, off, kernel, _ = make_inputs(CASE, rng)
    hlo = jax.jit(jax.grad(lambda x, o, k: jnp.sum(f(x, o, k, None)), argnums=(0, 1, 2))).lower(
        x, off, kernel).as_text()
    assert _ffi.target_names("cpu")[1] in hlo
    y, vjp = jax.vjp(lambda x, o, k: f(x, o, k, None), x, off, kernel)
    assert len(vjp(jnp.ones_like(y))) == 3


def test_lowers_to_custom_call_not_gathers(rng):
    args = make_inputs(CASE, rng)
    fwd = jax.jit(f).lower(*args).as_text()
    bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).as_text()
    assert _ffi.target_names("cpu")[0] in fwd and "gather" not in fwd
    assert _ffi.target_names("cpu")[1] in bwd and "gather" not in bwd and "scatter" not in bwd
    vm = jax.jit(jax.vmap(f)).lower(*(jnp.stack([a, a]) for a in args)).as_text()
    # Batched in the handler (one call for both problems, the batch fits one chunk), not a loop.
    assert vm.count(_ffi.target_names("cpu")[0]) == 1 and "while" not in vm
    ref = jax.jit(lambda *a: f(*a, impl="xla")).lower(*args).as_text()
    assert _ffi.target_names("cpu")[0] not in ref and "gather" in ref


def test_geometry_is_an_attribute(rng):
    args = make_inputs(CASE, rng)
    hlo = jax.jit(f).lower(*args).as_text()
    for name in ("kh", "kw", "stride_h", "pad_top", "dil_w", "offset_groups", "with_mask"):
        assert name in hlo
