"""deft_jax.nnx: DeformConv against nnx.Conv, DeformConvPack against linen's, NNX transforms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

nnx = pytest.importorskip("flax.nnx")

from deft_jax import deform_conv2d, linen as deft_linen  # noqa: E402
from deft_jax.nnx import DeformConv, DeformConvPack  # noqa: E402

IMPLEMENTATIONS = [None, "xla"]

# nnx.Conv geometries the zero-offset identity must hold for: (kwargs, input shape [N, H, W, C]).
GEOMETRIES = [
    (dict(in_features=4, out_features=6, kernel_size=(3, 3), padding="SAME"), (2, 9, 11, 4)),
    (dict(in_features=4, out_features=5, kernel_size=(3, 2), strides=2,
          padding=((1, 2), (0, 1))), (2, 9, 11, 4)),
    (dict(in_features=4, out_features=6, kernel_size=(3, 3), padding=2, kernel_dilation=2,
          feature_group_count=2), (1, 8, 7, 4)),
    (dict(in_features=3, out_features=4, kernel_size=(3, 3), strides=(2, 1), padding="SAME",
          kernel_dilation=(1, 2)), (2, 10, 9, 3)),
    (dict(in_features=2, out_features=6, kernel_size=(5, 5), padding="VALID", use_bias=False),
     (1, 9, 8, 2)),
]


@pytest.fixture(autouse=True)
def _exact_float32():
    """float32 as exact float32 on both sides (GPUs run float32 convs, dots and the native kernels
    on TF32 at the default precision; these tests compare with nn.Conv to 1e-5)."""
    with jax.default_matmul_precision("highest"):
        yield


def _normal(rng, shape, dtype=jnp.float32, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, dtype)


def _randomise(module, rng, scale=0.3):
    """Overwrite every nnx.Param of `module` with N(0, scale^2) draws (no trivially zero bias or
    conv_offset), in place; returns the new parameters as a pure dict."""
    state = nnx.state(module, nnx.Param)
    pure = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * scale, a.dtype),
                        nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(module, state)
    return pure


def _zero_offset_mask(y_shape, taps, groups=1, dtype=jnp.float32):
    n, ho, wo = y_shape[:3]
    return (jnp.zeros((n, ho, wo, 2 * groups * taps), dtype),
            jnp.ones((n, ho, wo, groups * taps), dtype))


def test_parameters_and_output_shapes():
    m = DeformConv(4, 6, (3, 2), strides=2, padding=1, feature_group_count=2, rngs=nnx.Rngs(0))
    assert m.kernel.shape == (3, 2, 2, 6) and m.bias.shape == (6,)
    assert isinstance(m.kernel, nnx.Param) and isinstance(m.bias, nnx.Param)
    assert m.kernel.dtype == m.bias.dtype == jnp.float32
    # Same parameter tree as nnx.Conv's (so states load across).
    conv = nnx.Conv(4, 6, (3, 2), strides=2, padding=1, feature_group_count=2, rngs=nnx.Rngs(0))
    shapes = lambda mod: jax.tree.map(jnp.shape, nnx.to_pure_dict(nnx.state(mod, nnx.Param)))
    assert shapes(m) == shapes(conv)
    # lecun_normal like nnx.Conv (std 1/sqrt(fan_in)), zero bias.
    big = DeformConv(16, 64, 3, rngs=nnx.Rngs(1))
    assert 0.8 < float(jnp.std(big.kernel[...])) * np.sqrt(9 * 16) < 1.2
    assert not np.any(np.asarray(big.bias[...]))

    x = jnp.zeros((2, 9, 7, 4))
    y = m(x, jnp.zeros((2, 5, 4, 2 * 6)))
    assert y.shape == (2, 5, 4, 6)

    no_bias = DeformConv(4, 6, 3, use_bias=False, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    assert no_bias.bias is None and no_bias.kernel.dtype == jnp.float64
    assert set(nnx.to_pure_dict(nnx.state(no_bias, nnx.Param))) == {"kernel"}

    # nnx.Conv's leniencies: None strides / dilation mean 1, numpy ints are ints.
    lenient = DeformConv(np.int64(4), 6, (np.int64(3), 3), None, kernel_dilation=None,
                         rngs=nnx.Rngs(0))
    assert lenient.strides == lenient.kernel_dilation == (1, 1)
    assert lenient.kernel.shape == (3, 3, 4, 6)


def test_pack_parameters():
    pack = DeformConvPack(4, 6, (3, 3), offset_groups=2, rngs=nnx.Rngs(0))
    params = nnx.to_pure_dict(nnx.state(pack, nnx.Param))
    assert jax.tree.map(jnp.shape, params) == {
        "kernel": (3, 3, 4, 6), "bias": (6,),
        "conv_offset": {"kernel": (3, 3, 4, 2 * 9 * 3), "bias": (2 * 9 * 3,)}}
    assert isinstance(pack.conv_offset, nnx.Conv)
    # The offset/mask predictor starts at exactly zero, the main kernel as nnx.Conv's.
    assert not any(np.any(a) for a in jax.tree.leaves(params["conv_offset"]))
    assert np.std(np.asarray(params["kernel"])) > 0.1
    v1 = DeformConvPack(4, 6, 3, use_mask=False, use_bias=False, rngs=nnx.Rngs(0))
    assert v1.conv_offset.kernel.shape == (3, 3, 4, 18) and v1.bias is None
    # nnx.Conv's default init is the same as the linen module's.
    linen_shapes = jax.eval_shape(
        deft_linen.DeformConvPack(6, (3, 3), offset_groups=2).init, jax.random.key(0),
        jnp.zeros((1, 5, 5, 4)))["params"]
    assert jax.tree.map(jnp.shape, linen_shapes) == jax.tree.map(jnp.shape, params)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("kwargs,shape", GEOMETRIES)
def test_equals_conv_at_zero_offset_unit_mask(kwargs, shape, implementation, dtype, rng):
    # tests/conftest.py enables x64 for the whole session, so float64 is float64 here.
    x = _normal(rng, shape, dtype)
    conv = nnx.Conv(**kwargs, param_dtype=dtype, rngs=nnx.Rngs(0))
    _randomise(conv, rng)
    expected = conv(x)
    assert expected.dtype == dtype

    deform = DeformConv(**kwargs, param_dtype=dtype, implementation=implementation,
                        rngs=nnx.Rngs(1))
    # nnx.Conv's parameter state loads into DeformConv as is (same names and shapes).
    nnx.update(deform, nnx.state(conv, nnx.Param))
    offset, mask = _zero_offset_mask(expected.shape, int(np.prod(kwargs["kernel_size"])),
                                     dtype=dtype)
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    for y in (deform(x, offset, mask), deform(x, offset)):
        assert y.dtype == dtype and y.shape == expected.shape
        np.testing.assert_allclose(y, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_op_with_random_offsets(implementation, rng):
    # Numerics: the module is the op plus bias, with random offsets (incl. out of image).
    kwargs = dict(strides=(2, 1), padding=((1, 0), (2, 1)), kernel_dilation=(1, 2),
                  feature_group_count=2)
    m = DeformConv(4, 6, (3, 2), **kwargs, offset_groups=2, param_dtype=jnp.float64,
                   implementation=implementation, rngs=nnx.Rngs(0))
    params = _randomise(m, rng)
    x = _normal(rng, (2, 7, 6, 4), jnp.float64)
    y_shape = (2, 3, 7)  # H: (7 + 1 - 3) // 2 + 1; W: 6 + 3 - 2 - 1 + 1
    offset = _normal(rng, (*y_shape, 2 * 2 * 6), jnp.float64, scale=3.0)
    mask = jnp.asarray(rng.uniform(size=(*y_shape, 2 * 6)))
    expected = deform_conv2d(x, offset, params["kernel"], mask, implementation="xla",
                             **kwargs) + params["bias"]
    np.testing.assert_allclose(m(x, offset, mask), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_mask,scale", [(True, 0.5), (False, 1.0)])
@pytest.mark.parametrize("kwargs", [
    dict(in_features=4, out_features=6, kernel_size=(3, 3)),
    dict(in_features=4, out_features=4, kernel_size=(3, 3), strides=2, padding=1,
         offset_groups=2, feature_group_count=2),
])
def test_pack_starts_as_scaled_conv(kwargs, use_mask, scale, rng):
    # Fresh module: conv_offset is zero, so offsets are 0 and the mask sigmoid(0) = 0.5:
    # y = 0.5 * conv(x, kernel) + bias for DCNv2 and conv(x, kernel) + bias for DCNv1.
    pack = DeformConvPack(**kwargs, use_mask=use_mask, bias_init=nnx.initializers.normal(0.5),
                          rngs=nnx.Rngs(0))
    x = _normal(rng, (2, 8, 7, 4))
    conv_kwargs = {k: v for k, v in kwargs.items() if k != "offset_groups"}
    conv = nnx.Conv(**conv_kwargs, use_bias=False, rngs=nnx.Rngs(1))
    conv.kernel[...] = pack.kernel[...]
    assert np.abs(np.asarray(pack.bias[...])).max() > 0.05
    expected = scale * conv(x) + pack.bias[...]
    np.testing.assert_allclose(pack(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_pack_equals_linen_pack(implementation, use_mask, rng):
    kwargs = dict(kernel_size=(3, 3), strides=2, padding=1, offset_groups=2,
                  feature_group_count=2, param_dtype=jnp.float64, use_mask=use_mask,
                  implementation=implementation)
    x = _normal(rng, (2, 9, 8, 4), jnp.float64)
    linen_pack = deft_linen.DeformConvPack(features=6, **kwargs)
    shapes = jax.eval_shape(linen_pack.init, jax.random.key(0), x)["params"]
    # Random conv_offset too, so that the offsets (std ~ 0.3 * sqrt(36) ~ 2 px) and mask matter.
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.3, a.dtype), shapes)
    expected = jax.jit(linen_pack.apply)({"params": params}, x)

    pack = DeformConvPack(4, 6, **kwargs, rngs=nnx.Rngs(0))
    state = nnx.state(pack, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(pack, state)
    np.testing.assert_allclose(pack(x), expected, rtol=1e-10, atol=1e-10)
    # ... and it is not the initial scaled conv: the random conv_offset moved the samples.
    fresh = DeformConvPack(4, 6, **kwargs, rngs=nnx.Rngs(0))
    fresh.kernel[...], fresh.bias[...] = params["kernel"], params["bias"]
    assert np.abs(np.asarray(fresh(x) - expected)).max() > 1e-2


def test_jit_and_grad_match_linen(rng):
    kwargs = dict(kernel_size=(3, 3), padding=1, offset_groups=1, param_dtype=jnp.float64)
    x = _normal(rng, (2, 7, 7, 3), jnp.float64)
    target = _normal(rng, (2, 7, 7, 5), jnp.float64)
    linen_pack = deft_linen.DeformConvPack(features=5, **kwargs)
    shapes = jax.eval_shape(linen_pack.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape) * 0.2, a.dtype), shapes)

    def linen_loss(p):
        return jnp.mean((linen_pack.apply({"params": p}, x) - target) ** 2)

    want_loss, want_grads = jax.jit(jax.value_and_grad(linen_loss))(params)

    pack = DeformConvPack(3, 5, **kwargs, rngs=nnx.Rngs(0))
    state = nnx.state(pack, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(pack, state)

    @nnx.jit
    def loss_and_grads(model):
        return nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)

    loss, grads = loss_and_grads(pack)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-12)
    got = nnx.to_pure_dict(grads)
    assert jax.tree.structure(got) == jax.tree.structure(want_grads)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want_grads), strict=True):
        assert np.abs(np.asarray(w)).max() > 1e-6  # every parameter gets a gradient
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-12)

    # A plain SGD step through nnx.grad lowers the loss.
    @nnx.jit
    def step(model):
        g = nnx.grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        params = nnx.state(model, nnx.Param)
        nnx.update(model, jax.tree.map(lambda p, d: p - 0.1 * d, params, g))

    step(pack)
    assert float(jnp.mean((pack(x) - target) ** 2)) < float(loss)


def test_implementations_agree_forward_and_grad(rng):
    # The native op and the pure-JAX reference, through the module, for every input.
    def make(implementation):
        return DeformConv(4, 6, (3, 3), strides=2, padding=1, offset_groups=2,
                          param_dtype=jnp.float64, implementation=implementation,
                          rngs=nnx.Rngs(0))

    native, reference = make(None), make("xla")
    params = _randomise(native, rng)
    state = nnx.state(reference, nnx.Param)
    nnx.replace_by_pure_dict(state, params)
    nnx.update(reference, state)
    x = _normal(rng, (2, 7, 6, 4), jnp.float64)
    offset = _normal(rng, (2, 4, 3, 36), jnp.float64, scale=2.0)
    mask = jnp.asarray(rng.uniform(size=(2, 4, 3, 18)))

    def grads(module):
        loss = lambda m, *a: jnp.sum(jnp.sin(m(*a)))
        return nnx.jit(nnx.grad(loss, argnums=(0, 1, 2, 3)))(module, x, offset, mask)

    np.testing.assert_allclose(native(x, offset, mask), reference(x, offset, mask), rtol=1e-10,
                               atol=1e-10)
    got, want = grads(native), grads(reference)
    got = (nnx.to_pure_dict(got[0]), *got[1:])
    want = (nnx.to_pure_dict(want[0]), *want[1:])
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9)


def test_batch_axes(rng):
    m = DeformConv(2, 3, (3, 3), rngs=nnx.Rngs(0))
    _randomise(m, rng)
    x = _normal(rng, (2, 3, 6, 5, 2))
    offset = _normal(rng, (2, 3, 6, 5, 18))
    y = nnx.jit(lambda m, x, o: m(x, o))(m, x, offset)
    assert y.shape == (2, 3, 6, 5, 3)
    np.testing.assert_allclose(m(x[1, 2], offset[1, 2]), y[1, 2], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(m(x[1], offset[1]), y[1], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="offset: leading batch axes"):
        m(x, offset[0])

    pack = DeformConvPack(2, 3, (3, 3), rngs=nnx.Rngs(0))
    _randomise(pack, rng, scale=0.2)
    yp = pack(x)
    assert yp.shape == (2, 3, 6, 5, 3)
    np.testing.assert_allclose(pack(x[0, 1]), yp[0, 1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype,param_dtype,input_dtype,expected", [
    (None, jnp.float32, jnp.float32, jnp.float32),
    (None, jnp.float32, jnp.bfloat16, jnp.float32),      # promoted with the float32 params
    (jnp.bfloat16, jnp.float32, jnp.float32, jnp.bfloat16),
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
])
def test_dtypes_like_conv(dtype, param_dtype, input_dtype, expected, rng):
    kwargs = dict(in_features=2, out_features=4, kernel_size=(3, 3), dtype=dtype,
                  param_dtype=param_dtype)
    x = _normal(rng, (1, 6, 6, 2), input_dtype)
    conv = nnx.Conv(**kwargs, rngs=nnx.Rngs(0))
    deform = DeformConv(**kwargs, rngs=nnx.Rngs(0))
    _randomise(conv, rng)
    nnx.update(deform, nnx.state(conv, nnx.Param))
    assert deform.kernel.dtype == param_dtype
    y = deform(x, jnp.zeros((1, 6, 6, 18), input_dtype))
    y_conv = conv(x)
    assert y.dtype == y_conv.dtype == expected
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(y_conv, np.float32),
                               rtol=2e-2, atol=2e-2)
    pack = DeformConvPack(**kwargs, rngs=nnx.Rngs(0))
    assert pack.conv_offset.kernel.dtype == param_dtype
    assert pack(x).dtype == expected


@pytest.mark.parametrize("kwargs,match", [
    (dict(in_features=0), "in_features"),
    (dict(out_features=2.5), "out_features"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(strides=(1, 0)), "strides"),
    (dict(kernel_dilation="2"), "kernel_dilation"),
    (dict(padding="CIRCULAR"), "padding"),
    (dict(padding="FULL"), "padding"),
    (dict(padding=((1, 1), (1, 1), (1, 1))), "padding"),
    (dict(feature_group_count=3), "feature_group_count"),
    (dict(offset_groups=3), "offset_groups"),
    (dict(offset_groups=0), "offset_groups"),
    (dict(implementation="cuda"), "implementation"),
])
@pytest.mark.parametrize("cls", [DeformConv, DeformConvPack])
def test_constructor_errors(cls, kwargs, match):
    args = dict(in_features=4, out_features=6, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=match):
        cls(**args, rngs=nnx.Rngs(0))


def test_call_errors():
    m = DeformConv(4, 6, 3, offset_groups=2, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 5, 5, 4))
    with pytest.raises(ValueError, match="offset_groups=2"):
        m(x, jnp.zeros((1, 5, 5, 18)))
    with pytest.raises(ValueError, match="inputs: expected 4 channels"):
        m(jnp.zeros((1, 5, 5, 3)), jnp.zeros((1, 5, 5, 36)))
    with pytest.raises(ValueError, match="inputs"):
        m(jnp.zeros((5, 4)), jnp.zeros((1, 5, 5, 36)))
    with pytest.raises(ValueError, match="mask"):  # from the op: G*kh*kw = 18 channels
        m(x, jnp.zeros((1, 5, 5, 36)), jnp.ones((1, 5, 5, 9)))
    assert m(x, jnp.zeros((1, 5, 5, 36))).shape == (1, 5, 5, 6)
    with pytest.raises(ValueError, match="inputs"):
        DeformConvPack(4, 6, 3, rngs=nnx.Rngs(0))(jnp.zeros((1, 5, 5, 3)))
