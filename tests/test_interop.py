"""deft_jax.interop: torchvision layouts, mmcv Pack state dicts (with torch where installed)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from deft_jax import deform_conv2d, interop
from deft_jax import linen as deft_linen


def _tv_arrays(rng, n=2, c_in=4, c_out=6, kh=3, kw=2, groups=2, g=2, ho=5, wo=4):
    """Random torchvision-layout arrays: weight OIHW, offset/mask NCHW, bias."""
    return dict(weight=rng.normal(size=(c_out, c_in // groups, kh, kw)),
                offset=rng.normal(size=(n, 2 * g * kh * kw, ho, wo)),
                mask=rng.uniform(size=(n, g * kh * kw, ho, wo)),
                bias=rng.normal(size=(c_out,)))


# --- torchvision layouts, arrays only ---------------------------------------------------------


def test_from_torchvision_layout(rng):
    tv = _tv_arrays(rng)
    d = interop.from_torchvision(**tv)
    assert set(d) == {"kernel", "offset", "mask", "bias"}
    assert d["kernel"].shape == (3, 2, 2, 6)
    assert d["offset"].shape == (2, 5, 4, 24) and d["mask"].shape == (2, 5, 4, 12)
    # Element by element: kernel[y, x, i, o] = weight[o, i, y, x]; offset[n, h, w, c] =
    # offset_nchw[n, c, h, w] (same channel order: per group, per tap, (dy, dx)).
    for _ in range(20):
        o, i, y, x = (rng.integers(s) for s in tv["weight"].shape)
        assert d["kernel"][y, x, i, o] == tv["weight"][o, i, y, x]
        n, c, h, w = (rng.integers(s) for s in tv["offset"].shape)
        assert d["offset"][n, h, w, c] == tv["offset"][n, c, h, w]
        n, c, h, w = (rng.integers(s) for s in tv["mask"].shape)
        assert d["mask"][n, h, w, c] == tv["mask"][n, c, h, w]
    np.testing.assert_array_equal(d["bias"], tv["bias"])
    # Copies, not views: changing the result leaves the argument alone.
    d["kernel"][...] = 0
    d["bias"][...] = 0
    assert np.all(tv["weight"] != 0) and np.all(tv["bias"] != 0)


def test_round_trips(rng):
    tv = _tv_arrays(rng, kh=2, kw=3, groups=1, g=3)
    back = interop.to_torchvision(**interop.from_torchvision(**tv))
    assert set(back) == {"weight", "offset", "mask", "bias"}
    for k in tv:
        assert back[k].shape == tv[k].shape
        np.testing.assert_array_equal(back[k], tv[k])
    deft = dict(kernel=rng.normal(size=(3, 3, 2, 5)), offset=rng.normal(size=(1, 4, 6, 18)),
                mask=rng.uniform(size=(1, 4, 6, 9)), bias=rng.normal(size=(5,)))
    again = interop.from_torchvision(**interop.to_torchvision(**deft))
    for k in deft:
        np.testing.assert_array_equal(again[k], deft[k])


def test_none_stays_none_and_inputs_convert(rng):
    w = rng.normal(size=(4, 2, 3, 3)).astype(np.float32)
    d = interop.from_torchvision(weight=w)
    assert d["offset"] is None and d["mask"] is None and d["bias"] is None
    assert d["kernel"].dtype == np.float32
    t = interop.to_torchvision(kernel=jnp.asarray(d["kernel"]), bias=[1.0, 2.0, 3.0, 4.0])
    assert isinstance(t["weight"], np.ndarray) and t["offset"] is None and t["mask"] is None
    np.testing.assert_array_equal(t["weight"], w)
    np.testing.assert_array_equal(t["bias"], [1, 2, 3, 4])

    class TensorLike:  # what the conversion expects of a torch tensor, without torch
        def __init__(self, a):
            self.a = a

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    d = interop.from_torchvision(weight=TensorLike(w), offset=TensorLike(np.zeros((1, 18, 2, 2))))
    np.testing.assert_array_equal(d["kernel"], w.transpose(2, 3, 1, 0))
    assert d["offset"].shape == (1, 2, 2, 18)


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight=np.zeros((4, 2, 3))), "weight: expected a rank-4"),
    (dict(weight=np.zeros((4, 2, 3, 3)), offset=np.zeros((1, 17, 5, 5))), "offset"),
    (dict(weight=np.zeros((4, 2, 3, 3)), mask=np.zeros((1, 8, 5, 5))), "mask"),
    (dict(weight=np.zeros((4, 2, 3, 3)), offset=np.zeros((1, 36, 5, 5)),
          mask=np.zeros((1, 9, 5, 5))), "mask"),
    (dict(weight=np.zeros((4, 2, 3, 3)), offset=np.zeros((1, 18, 5, 5)),
          mask=np.zeros((1, 9, 5, 4))), "mask"),
    (dict(weight=np.zeros((4, 2, 3, 3)), bias=np.zeros((3,))), "bias"),
    (dict(weight=np.zeros((4, 2, 3, 3)), bias=np.zeros((4, 1))), "bias"),
])
def test_from_torchvision_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        interop.from_torchvision(**kwargs)


def test_to_torchvision_errors():
    with pytest.raises(ValueError, match="kernel"):
        interop.to_torchvision(kernel=np.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="offset"):
        interop.to_torchvision(kernel=np.zeros((3, 3, 2, 4)), offset=np.zeros((1, 5, 5, 10)))


# --- mmcv ModulatedDeformConv2dPack state dicts, without torch -------------------------------

# (in, out, kernel, stride, padding, dilation, groups, deform_groups) as mmcv's constructor.
MMCV_LAYERS = [
    dict(c_in=4, c_out=6, k=(3, 3), stride=1, pad=1, dil=1, groups=1, g=1),
    dict(c_in=4, c_out=4, k=(3, 3), stride=2, pad=1, dil=1, groups=2, g=2),
    dict(c_in=6, c_out=3, k=(3, 2), stride=(1, 2), pad=(2, 1), dil=(2, 1), groups=1, g=3),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _mmcv_state_dict(rng, layer, prefix="", use_mask=True, bias=True):
    kh, kw = layer["k"]
    parts = 3 if use_mask else 2
    sd = {prefix + "weight": rng.normal(size=(layer["c_out"], layer["c_in"] // layer["groups"],
                                              kh, kw)) / np.sqrt(kh * kw * layer["c_in"]),
          # Large enough that offsets of a few pixels (some out of the image) and a mask far
          # from 0.5 come out.
          prefix + "conv_offset.weight": rng.normal(size=(parts * layer["g"] * kh * kw,
                                                          layer["c_in"], kh, kw)) * 0.5,
          prefix + "conv_offset.bias": rng.normal(size=(parts * layer["g"] * kh * kw,))}
    if bias:
        sd[prefix + "bias"] = rng.normal(size=(layer["c_out"],))
    return sd


def _mmcv_forward_nchw(sd, x_nchw, layer, prefix="", use_mask=True):
    """mmcv's ModulatedDeformConv2dPack.forward (or DeformConv2dPack's), written out in JAX with
    torch's NCHW / OIHW layouts; the deformable step is deft_jax's pure-JAX reference after
    moving channels last (torchvision's = mmcv's arithmetic)."""
    stride, pad, dil = _pair(layer["stride"]), _pair(layer["pad"]), _pair(layer["dil"])
    conv = lambda x, w, groups=1: lax.conv_general_dilated(
        x, w, stride, [(p, p) for p in pad], rhs_dilation=dil, feature_group_count=groups,
        dimension_numbers=("NCHW", "OIHW", "NCHW"), precision="highest")
    out = conv(x_nchw, sd[prefix + "conv_offset.weight"])
    out = out + sd[prefix + "conv_offset.bias"][None, :, None, None]
    if use_mask:
        o1, o2, m = jnp.split(out, 3, axis=1)           # torch.chunk(out, 3, dim=1)
        offset, mask = jnp.concatenate([o1, o2], axis=1), jax.nn.sigmoid(m)
    else:
        offset, mask = out, None
    nhwc = lambda a: None if a is None else a.transpose(0, 2, 3, 1)
    y = deform_conv2d(nhwc(x_nchw), nhwc(offset), sd[prefix + "weight"].transpose(2, 3, 1, 0),
                      nhwc(mask), strides=stride, padding=pad, kernel_dilation=dil,
                      feature_group_count=layer["groups"], implementation="xla")
    if prefix + "bias" in sd:
        y = y + sd[prefix + "bias"]
    return y, offset


def _linen_pack(layer, use_mask=True, use_bias=True, implementation=None):
    return deft_linen.DeformConvPack(
        features=layer["c_out"], kernel_size=layer["k"], strides=layer["stride"],
        padding=_pair(layer["pad"]), kernel_dilation=layer["dil"],
        feature_group_count=layer["groups"], offset_groups=layer["g"], use_bias=use_bias,
        use_mask=use_mask, param_dtype=jnp.float64, implementation=implementation)


@pytest.mark.parametrize("use_mask", [True, False])
@pytest.mark.parametrize("layer", MMCV_LAYERS)
def test_linen_params_from_mmcv(layer, use_mask, rng):
    sd = _mmcv_state_dict(rng, layer, prefix="neck.dcn.", use_mask=use_mask)
    sd["neck.other.weight"] = np.zeros((1,))  # unrelated keys are ignored
    # One offset channel pushed out by its bias, so some samples leave the 9 x 8 image whatever
    # the draw (the random weights alone reached 9 px for most seeds, not all).
    sd["neck.dcn.conv_offset.bias"][0] += 12.0
    x = rng.normal(size=(2, layer["c_in"], 9, 8))
    expected, offset = _mmcv_forward_nchw(sd, x, layer, "neck.dcn.", use_mask)
    # The test is only meaningful if the offsets really move the samples (beyond the image too).
    assert np.abs(np.asarray(offset)).max() > 9

    params = interop.linen_params_from_mmcv(sd, "neck.dcn", use_mask=use_mask)
    kh, kw = layer["k"]
    parts = 3 if use_mask else 2
    assert jax.tree.map(np.shape, params) == {
        "kernel": (kh, kw, layer["c_in"] // layer["groups"], layer["c_out"]),
        "bias": (layer["c_out"],),
        "conv_offset": {"kernel": (kh, kw, layer["c_in"], parts * layer["g"] * kh * kw),
                        "bias": (parts * layer["g"] * kh * kw,)}}
    for implementation in (None, "xla"):
        y = _linen_pack(layer, use_mask, implementation=implementation).apply(
            {"params": params}, x.transpose(0, 2, 3, 1))
        np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


def test_linen_params_from_mmcv_without_bias(rng):
    layer = MMCV_LAYERS[1]
    sd = _mmcv_state_dict(rng, layer, bias=False)
    params = interop.linen_params_from_mmcv(sd)
    assert "bias" not in params
    x = rng.normal(size=(1, layer["c_in"], 7, 7))
    expected, _ = _mmcv_forward_nchw(sd, x, layer)
    y = _linen_pack(layer, use_bias=False).apply({"params": params}, x.transpose(0, 2, 3, 1))
    np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-10)


def test_linen_params_from_mmcv_errors(rng):
    layer = MMCV_LAYERS[0]
    sd = _mmcv_state_dict(rng, layer, prefix="a.")
    with pytest.raises(ValueError, match="missing key 'b.weight'"):
        interop.linen_params_from_mmcv(sd, "b.")
    # A DCNv1 state dict (2*G*kh*kw = 18 offset channels) is not a DCNv2 one (27*G).
    v1 = _mmcv_state_dict(rng, layer, use_mask=False)
    with pytest.raises(ValueError, match="conv_offset.weight"):
        interop.linen_params_from_mmcv(v1)
    bad = dict(sd, **{"a.conv_offset.bias": np.zeros(26)})
    with pytest.raises(ValueError, match="conv_offset.bias"):
        interop.linen_params_from_mmcv(bad, "a.")


@pytest.mark.parametrize("use_mask", [True, False])
def test_nnx_params_from_mmcv(use_mask, rng):
    nnx = pytest.importorskip("flax.nnx")
    from deft_jax.nnx import DeformConvPack

    layer = MMCV_LAYERS[2]
    sd = _mmcv_state_dict(rng, layer, prefix="dcn.", use_mask=use_mask)
    x = rng.normal(size=(2, layer["c_in"], 8, 9))
    expected, _ = _mmcv_forward_nchw(sd, x, layer, "dcn.", use_mask)

    def pack(**kwargs):
        return DeformConvPack(layer["c_in"], layer["c_out"], layer["k"], layer["stride"],
                              padding=_pair(layer["pad"]), kernel_dilation=layer["dil"],
                              feature_group_count=layer["groups"], offset_groups=layer["g"],
                              use_mask=use_mask, **kwargs, rngs=nnx.Rngs(0))

    module = pack(param_dtype=jnp.float64)
    assert interop.nnx_params_from_mmcv(module, sd, "dcn.") is module
    np.testing.assert_allclose(module(jnp.asarray(x.transpose(0, 2, 3, 1))), expected,
                               rtol=1e-10, atol=1e-10)
    # Cast to the module's parameter dtype.
    module32 = interop.nnx_params_from_mmcv(pack(), sd, "dcn.")
    assert module32.kernel.dtype == module32.conv_offset.kernel.dtype == jnp.float32
    np.testing.assert_allclose(module32.kernel[...], sd["dcn.weight"].transpose(2, 3, 1, 0),
                               rtol=1e-6)
    # Mismatches are named, and the module is left unchanged.
    wrong_groups = DeformConvPack(layer["c_in"], layer["c_out"], layer["k"], offset_groups=1,
                                  use_mask=use_mask, rngs=nnx.Rngs(0))
    before = np.asarray(wrong_groups.kernel[...]).copy()
    with pytest.raises(ValueError, match="conv_offset"):
        interop.nnx_params_from_mmcv(wrong_groups, sd, "dcn.")
    np.testing.assert_array_equal(wrong_groups.kernel[...], before)
    with pytest.raises(ValueError, match="use_bias"):
        interop.nnx_params_from_mmcv(pack(use_bias=False), sd, "dcn.")


# --- against torchvision and an mmcv-style torch module, where torch is installed --------------

TV_GEOMETRIES = [
    dict(n=2, h=7, w=6, c_in=4, c_out=6, k=(3, 3), stride=1, pad=1, dil=1, groups=1, g=1),
    dict(n=2, h=8, w=9, c_in=4, c_out=4, k=(3, 2), stride=(2, 1), pad=(1, 0), dil=(1, 2),
         groups=2, g=2),
    dict(n=1, h=6, w=7, c_in=6, c_out=3, k=(2, 3), stride=2, pad=(0, 2), dil=2, groups=3, g=3),
]


def _out_hw(geo):
    (sh, sw), (ph, pw), (dh, dw) = _pair(geo["stride"]), _pair(geo["pad"]), _pair(geo["dil"])
    kh, kw = geo["k"]
    return ((geo["h"] + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (geo["w"] + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


def _sample_at_minus_one(offset, geo):
    """[N, 2*G*kh*kw, Ho, Wo] bool: the offset entry whose sample coordinate (y for a dy entry,
    x for a dx entry) is exactly -1."""
    kh, kw = geo["k"]
    (sh, sw), (ph, pw), (dh, dw) = _pair(geo["stride"]), _pair(geo["pad"]), _pair(geo["dil"])
    _, channels, ho, wo = offset.shape
    c = np.arange(channels)
    tap, is_x = (c % (2 * kh * kw)) // 2, c % 2 == 1
    base_y = np.arange(ho)[None, :] * sh - ph + (tap // kw)[:, None] * dh      # [C, Ho]
    base_x = np.arange(wo)[None, :] * sw - pw + (tap % kw)[:, None] * dw      # [C, Wo]
    y = base_y[None, :, :, None] + offset
    x = base_x[None, :, None, :] + offset
    return np.where(is_x[None, :, None, None], x == -1.0, y == -1.0)


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("geo", TV_GEOMETRIES)
def test_against_torchvision(geo, with_mask, rng):
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    kh, kw = geo["k"]
    ho, wo = _out_hw(geo)
    x = rng.normal(size=(geo["n"], geo["c_in"], geo["h"], geo["w"]))
    weight = rng.normal(size=(geo["c_out"], geo["c_in"] // geo["groups"], kh, kw))
    offset = rng.normal(size=(geo["n"], 2 * geo["g"] * kh * kw, ho, wo)) * 3
    # Some sample points far outside the image, some exactly on an integer -1 pixel step.
    offset.flat[rng.choice(offset.size, offset.size // 10)] = 1.5 * geo["h"] + 0.25
    offset.flat[rng.choice(offset.size, offset.size // 10)] = -1.5 * geo["w"] - 0.25
    offset.flat[rng.choice(offset.size, offset.size // 10)] = -1.0
    offset[:, :, 0, 0] = -1.0  # first output pixel: some taps then sample exactly at y or x = -1
    mask = rng.uniform(size=(geo["n"], geo["g"] * kh * kw, ho, wo)) if with_mask else None
    bias = rng.normal(size=(geo["c_out"],))
    cotangent = rng.normal(size=(geo["n"], geo["c_out"], ho, wo))

    t = lambda a: None if a is None else torch.tensor(a, dtype=torch.float64, requires_grad=True)
    tx, toff, tw, tmask, tb = map(t, (x, offset, weight, mask, bias))
    ty = tv_ops.deform_conv2d(tx, toff, tw, tb, stride=_pair(geo["stride"]),
                              padding=_pair(geo["pad"]), dilation=_pair(geo["dil"]), mask=tmask)
    (ty * torch.tensor(cotangent)).sum().backward()

    d = interop.from_torchvision(weight=tw, offset=toff, mask=tmask, bias=tb)  # torch tensors in
    assert d["kernel"].dtype == np.float64
    args = [jnp.asarray(x.transpose(0, 2, 3, 1)), jnp.asarray(d["offset"]),
            jnp.asarray(d["kernel"])] + ([jnp.asarray(d["mask"])] if with_mask else [])
    # torch's gradients, moved to deft's layouts through the same conversion. One known
    # difference, on a set of measure zero: a sample coordinate of exactly -1 is outside the
    # image (value 0) for both, but torchvision's backward still returns the one-sided
    # derivative from inside there, where deft_jax (like mmcv and DCNv2) returns 0.
    at_minus_one = _sample_at_minus_one(offset, geo)
    assert at_minus_one.any()
    grad_offset = np.where(at_minus_one, 0.0, toff.grad.numpy())
    want = interop.from_torchvision(weight=tw.grad, offset=grad_offset,
                                    mask=None if tmask is None else tmask.grad)

    for implementation in (None, "xla"):
        def f(x, offset, kernel, mask=None, bias=d["bias"]):
            return deform_conv2d(x, offset, kernel, mask, strides=geo["stride"],
                                 padding=_pair(geo["pad"]), kernel_dilation=geo["dil"],
                                 feature_group_count=geo["groups"],
                                 implementation=implementation) + bias

        y, vjp = jax.vjp(f, *args)
        np.testing.assert_allclose(y, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-10,
                                   atol=1e-10)
        grads = vjp(jnp.asarray(cotangent.transpose(0, 2, 3, 1)))
        np.testing.assert_allclose(grads[0], tx.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-9,
                                   atol=1e-9)
        np.testing.assert_allclose(grads[1], want["offset"], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(grads[2], want["kernel"], rtol=1e-9, atol=1e-9)
        if with_mask:
            np.testing.assert_allclose(grads[3], want["mask"], rtol=1e-9, atol=1e-9)


def test_to_torchvision_runs_in_torchvision(rng):
    # The other direction: deft-layout arrays converted for torchvision give deft's result.
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    x = rng.normal(size=(2, 7, 8, 4))
    kernel = rng.normal(size=(3, 3, 2, 6))
    offset = rng.normal(size=(2, 4, 4, 36)) * 4
    mask = rng.uniform(size=(2, 4, 4, 18))
    bias = rng.normal(size=(6,))
    expected = deform_conv2d(jnp.asarray(x), jnp.asarray(offset), jnp.asarray(kernel),
                             jnp.asarray(mask), strides=2, padding=1,
                             feature_group_count=2) + bias
    tv = {k: torch.from_numpy(v) for k, v in
          interop.to_torchvision(kernel=kernel, offset=offset, mask=mask, bias=bias).items()}
    y = tv_ops.deform_conv2d(torch.from_numpy(x.transpose(0, 3, 1, 2).copy()), tv["offset"],
                             tv["weight"], tv["bias"], stride=2, padding=1, mask=tv["mask"])
    np.testing.assert_allclose(y.numpy().transpose(0, 2, 3, 1), expected, rtol=1e-10,
                               atol=1e-10)


def test_torch_bfloat16_tensor_converts(rng):
    torch = pytest.importorskip("torch")
    w = torch.randn(4, 2, 3, 3, dtype=torch.bfloat16)
    d = interop.from_torchvision(weight=w)
    assert d["kernel"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(d["kernel"].astype(np.float32),
                                  w.float().numpy().transpose(2, 3, 1, 0))


@pytest.mark.parametrize("use_mask", [True, False])
def test_mmcv_style_torch_module(use_mask, rng):
    # A torch module with mmcv's ModulatedDeformConv2dPack (DeformConv2dPack without the mask)
    # parameters and forward, on torchvision's op (mmcv's arithmetic); its real state_dict()
    # (torch tensors, nested prefix) loaded into the linen and NNX Packs.
    torch = pytest.importorskip("torch")
    tv_ops = pytest.importorskip("torchvision.ops")
    nnx = pytest.importorskip("flax.nnx")
    from deft_jax.nnx import DeformConvPack

    c_in, c_out, k, stride, pad, dil, groups, g = 4, 6, (3, 3), 2, 1, 1, 2, 2
    parts = 3 if use_mask else 2

    class MMCVPack(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(c_out, c_in // groups, *k) * 0.3)
            self.bias = torch.nn.Parameter(torch.randn(c_out))
            self.conv_offset = torch.nn.Conv2d(c_in, g * parts * k[0] * k[1], k, stride, pad,
                                               dil, bias=True)
            torch.nn.init.normal_(self.conv_offset.weight, std=0.5)  # mmcv zeroes it; we don't
            torch.nn.init.normal_(self.conv_offset.bias, std=1.0)

        def forward(self, x):
            out = self.conv_offset(x)
            if use_mask:
                o1, o2, mask = torch.chunk(out, 3, dim=1)
                offset, mask = torch.cat((o1, o2), dim=1), torch.sigmoid(mask)
            else:
                offset, mask = out, None
            return tv_ops.deform_conv2d(x, offset, self.weight, self.bias, stride=stride,
                                        padding=pad, dilation=dil, mask=mask)

    torch.manual_seed(int(rng.integers(2**31)))
    model = torch.nn.Sequential(torch.nn.Identity(), MMCVPack()).double()
    x = rng.normal(size=(2, c_in, 9, 10))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy().transpose(0, 2, 3, 1)
    sd = model.state_dict()
    x_nhwc = jnp.asarray(x.transpose(0, 2, 3, 1))

    params = interop.linen_params_from_mmcv(sd, "1.", use_mask=use_mask)
    linen_pack = deft_linen.DeformConvPack(c_out, k, strides=stride, padding=pad,
                                           kernel_dilation=dil, feature_group_count=groups,
                                           offset_groups=g, use_mask=use_mask,
                                           param_dtype=jnp.float64)
    np.testing.assert_allclose(linen_pack.apply({"params": params}, x_nhwc), expected,
                               rtol=1e-10, atol=1e-10)

    module = DeformConvPack(c_in, c_out, k, stride, padding=pad, kernel_dilation=dil,
                            feature_group_count=groups, offset_groups=g, use_mask=use_mask,
                            param_dtype=jnp.float64, rngs=nnx.Rngs(0))
    interop.nnx_params_from_mmcv(module, sd, "1.")
    np.testing.assert_allclose(module(x_nhwc), expected, rtol=1e-10, atol=1e-10)
