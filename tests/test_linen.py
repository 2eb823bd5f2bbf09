"""deft_jax.linen: DeformConv against nn.Conv, DeformConvPack's initial identity, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from deft_jax.linen import DeformConv, DeformConvPack

IMPLEMENTATIONS = [None, "xla"]

# nn.Conv geometries the zero-offset identity must hold for: (kwargs, input shape [N, H, W, C]).
GEOMETRIES = [
    (dict(features=6, kernel_size=(3, 3), padding="SAME"), (2, 9, 11, 4)),
    (dict(features=5, kernel_size=(3, 2), strides=2, padding=((1, 2), (0, 1))), (2, 9, 11, 4)),
    (dict(features=6, kernel_size=(3, 3), padding=2, kernel_dilation=2, feature_group_count=2),
     (1, 8, 7, 4)),
    (dict(features=4, kernel_size=(3, 3), strides=(2, 1), padding="SAME", kernel_dilation=(1, 2)),
     (2, 10, 9, 3)),
    (dict(features=6, kernel_size=(5, 5), padding="VALID", use_bias=False), (1, 9, 8, 2)),
]


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 as exact float32 on both sides (GPUs run float32 convs, dots and the native kernels
    on TF32 at the default precision; these tests compare with nn.Conv to 1e-5)."""
    with jax.default_matmul_precision("highest"):
        yield


def _random_variables(module, rng, *args):
    """Variables of `module` drawn from N(0, 0.3^2), so that no bias is trivially zero. Shapes
    come from an abstract init (an eager init compiles every initializer op by op: seconds)."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    return jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), shapes)


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.normal(size=shape), dtype)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kwargs,shape", GEOMETRIES)
def test_deform_conv_equals_conv_at_zero_offset_unit_mask(kwargs, shape, implementation, rng):
    x = _normal(rng, shape)
    conv = nn.Conv(**kwargs)
    variables = _random_variables(conv, rng, x)
    expected = conv.apply(variables, x)
    taps = int(np.prod(kwargs["kernel_size"]))
    offset = jnp.zeros((*expected.shape[:3], 2 * taps), jnp.float32)
    mask = jnp.ones((*expected.shape[:3], taps), jnp.float32)

    deform = DeformConv(**kwargs, implementation=implementation)
    deform_shapes = jax.eval_shape(deform.init, jax.random.key(0), x, offset)
    assert jax.tree.map(jnp.shape, deform_shapes) == jax.tree.map(jnp.shape, variables)
    apply = jax.jit(deform.apply)
    np.testing.assert_allclose(apply(variables, x, offset, mask), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(apply(variables, x, offset), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_deform_conv_moves_with_integer_offsets(implementation, rng):
    # An offset of exactly (+1, +2) px on every tap moves the window: with padding 1, tap (i, j)
    # of output (ho, wo) reads x[ho + i, wo + j + 1], zero outside the image. That is a VALID
    # dense conv of x cropped by one column on the left and zero-padded below and right.
    x = _normal(rng, (1, 8, 9, 3))
    deform = DeformConv(4, (3, 3), padding=1, implementation=implementation)
    offset = jnp.tile(jnp.asarray([1.0, 2.0], jnp.float32), (1, 8, 9, 9))
    variables = _random_variables(deform, rng, x, offset)
    window = jnp.pad(x, ((0, 0), (0, 2), (0, 3), (0, 0)))[:, :, 1:]
    expected = nn.Conv(4, (3, 3), padding="VALID").apply(variables, window)
    np.testing.assert_allclose(jax.jit(deform.apply)(variables, x, offset), expected, rtol=1e-5,
                               atol=1e-5)


def test_deform_conv_gradients_match_reference(rng):
    # float64 (tests/conftest.py enables x64): the native custom_vjp against JAX autodiff of the
    # pure-JAX reference, for the parameters and every input.
    kwargs = dict(features=4, kernel_size=(3, 3), strides=2, padding=1, offset_groups=2,
                  dtype=jnp.float64, param_dtype=jnp.float64)
    x = _normal(rng, (2, 7, 6, 4), jnp.float64)
    offset = _normal(rng, (2, 4, 3, 36), jnp.float64) * 1.5
    mask = jnp.asarray(rng.uniform(size=(2, 4, 3, 18)))
    variables = _random_variables(DeformConv(**kwargs), rng, x, offset, mask)

    def grads(implementation):
        module = DeformConv(**kwargs, implementation=implementation)
        loss = lambda v, *a: jnp.sum(jnp.sin(module.apply(v, *a)))
        return jax.jit(jax.grad(loss, (0, 1, 2, 3)))(variables, x, offset, mask)

    native, reference = grads(None), grads("xla")
    for got, want in zip(jax.tree.leaves(native), jax.tree.leaves(reference), strict=True):
        assert np.abs(np.asarray(want)).max() > 0
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-9)


def test_deform_conv_batch_axes(rng):
    deform = DeformConv(3, (3, 3))
    x = _normal(rng, (2, 3, 6, 5, 2))
    offset = _normal(rng, (2, 3, 6, 5, 18))
    variables = _random_variables(deform, rng, x, offset)
    apply = jax.jit(deform.apply)
    y = apply(variables, x, offset)
    assert y.shape == (2, 3, 6, 5, 3)
    np.testing.assert_allclose(apply(variables, x[1, 2], offset[1, 2]), y[1, 2], rtol=1e-6,
                               atol=1e-6)
    with pytest.raises(ValueError, match="offset: leading batch axes"):
        apply(variables, x, offset[0])


def test_deform_conv_checks_offset_groups():
    deform = DeformConv(4, (3, 3), offset_groups=2)
    x = jnp.zeros((1, 5, 5, 4), jnp.float32)
    with pytest.raises(ValueError, match="offset_groups=2"):
        jax.eval_shape(deform.init, jax.random.key(0), x, jnp.zeros((1, 5, 5, 18), jnp.float32))
    shapes = jax.eval_shape(deform.init, jax.random.key(0), x,
                            jnp.zeros((1, 5, 5, 36), jnp.float32))
    assert shapes["params"]["kernel"].shape == (3, 3, 4, 4)


@pytest.mark.parametrize("dtype,param_dtype,input_dtype,expected", [
    (None, jnp.float32, jnp.float32, jnp.float32),
    (None, jnp.float32, jnp.bfloat16, jnp.float32),      # promoted with the float32 params
    (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
])
def test_deform_conv_dtypes_like_conv(dtype, param_dtype, input_dtype, expected, rng):
    kwargs = dict(features=4, kernel_size=(3, 3), dtype=dtype, param_dtype=param_dtype)
    x = _normal(rng, (1, 6, 6, 2), input_dtype)
    offset = jnp.zeros((1, 6, 6, 18), input_dtype)
    deform = DeformConv(**kwargs)
    variables = _random_variables(deform, rng, x, offset)
    assert all(a.dtype == param_dtype for a in jax.tree.leaves(variables))
    y = jax.jit(deform.apply)(variables, x, offset)
    y_conv = nn.Conv(**kwargs).apply(variables, x)
    assert y.dtype == y_conv.dtype == expected
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_conv, np.float32),
                               rtol=2e-2, atol=2e-2)


def test_pack_init():
    x = jnp.zeros((1, 8, 8, 4), jnp.float32)
    pack = DeformConvPack(6, (3, 3), offset_groups=2)
    params = jax.jit(pack.init)(jax.random.key(0), x)["params"]
    assert jax.tree.map(jnp.shape, params) == {
        "kernel": (3, 3, 4, 6), "bias": (6,),
        "conv_offset": {"kernel": (3, 3, 4, 2 * 9 * 3), "bias": (2 * 9 * 3,)}}
    # The offset/mask predictor starts at exactly zero (offsets 0, mask sigmoid(0) = 0.5) ...
    assert not any(np.any(a) for a in jax.tree.leaves(params["conv_offset"]))
    # ... and the main kernel is initialised as nn.Conv's (lecun_normal: std 1/sqrt(fan_in)).
    assert 0.5 < float(jnp.std(params["kernel"])) * np.sqrt(3 * 3 * 4) < 1.5


@pytest.mark.parametrize("use_mask,scale", [(True, 0.5), (False, 1.0)])
@pytest.mark.parametrize("kwargs", [
    dict(features=6, kernel_size=(3, 3)),
    dict(features=4, kernel_size=(3, 3), strides=2, padding=1, offset_groups=2,
         feature_group_count=2),
])
def test_pack_starts_as_scaled_conv(kwargs, use_mask, scale, rng):
    # With the zero-initialised conv_offset the offsets are 0 and the mask sigmoid(0) = 0.5:
    # y = 0.5 * conv(x, kernel) + bias for DCNv2 and y = conv(x, kernel) + bias for DCNv1.
    x = _normal(rng, (2, 8, 7, 4))
    pack = DeformConvPack(**kwargs, use_mask=use_mask)
    variables = _random_variables(pack, rng, x)
    params = {**variables["params"],
              "conv_offset": jax.tree.map(jnp.zeros_like, variables["params"]["conv_offset"])}
    groups, taps = kwargs.get("offset_groups", 1), int(np.prod(kwargs["kernel_size"]))
    assert params["conv_offset"]["bias"].shape == (groups * taps * (3 if use_mask else 2),)

    conv_kwargs = {k: v for k, v in kwargs.items() if k != "offset_groups"}
    conv = nn.Conv(**conv_kwargs, use_bias=False)
    expected = scale * conv.apply({"params": {"kernel": params["kernel"]}}, x) + params["bias"]
    np.testing.assert_allclose(jax.jit(pack.apply)({"params": params}, x), expected, rtol=1e-5,
                               atol=1e-5)


def test_pack_gradient_reaches_offset_conv(rng):
    x = _normal(rng, (2, 8, 8, 3))
    target = _normal(rng, (2, 8, 8, 5))
    pack = DeformConvPack(5, (3, 3))
    params = _random_variables(pack, rng, x)["params"]
    params["conv_offset"] = jax.tree.map(jnp.zeros_like, params["conv_offset"])

    @jax.jit
    def loss(p):
        return jnp.mean((pack.apply({"params": p}, x) - target) ** 2)

    grads = jax.jit(jax.grad(loss))(params)
    g_kernel = np.asarray(grads["conv_offset"]["kernel"])  # [3, 3, 3, 27]: 18 offset, 9 mask
    assert np.all(np.isfinite(g_kernel))
    assert np.abs(g_kernel[..., :18]).max() > 1e-4
    assert np.abs(g_kernel[..., 18:]).max() > 1e-4
    assert np.abs(np.asarray(grads["conv_offset"]["bias"])).max() > 1e-4
    # A small step along the gradient lowers the loss.
    stepped = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    assert float(loss(stepped)) < float(loss(params))
