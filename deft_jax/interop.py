"""Conversions between PyTorch layouts (torchvision, mmcv) and deft_jax's.

deft_jax computes exactly ``torchvision.ops.deform_conv2d``'s arithmetic with the channel axis last,
so converting is a transpose per array, with no reordering of channels:

| array  | torchvision / mmcv                       | deft_jax                                  |
|--------|------------------------------------------|-------------------------------------------|
| weight | OIHW [C_out, C_in / groups, kh, kw]      | HWIO [kh, kw, C_in / groups, C_out]       |
| offset | NCHW [N, 2*G*kh*kw, H_out, W_out]        | NHWC [N, H_out, W_out, 2*G*kh*kw]         |
| mask   | NCHW [N, G*kh*kw, H_out, W_out]          | NHWC [N, H_out, W_out, G*kh*kw]           |
| bias   | [C_out]                                  | [C_out]                                   |

The offset channels are, in both, per offset group, per tap (row-major, k = i*kw + j), (dy, dx).

Arrays may be numpy arrays, JAX arrays, nested lists, or torch tensors (read through
``.detach().cpu().numpy()``; nothing here imports torch). Results are numpy arrays (copies, never
views of the argument). This module imports numpy only; flax is imported inside
``nnx_params_from_mmcv``.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

__all__ = ["from_torchvision", "to_torchvision", "linen_params_from_mmcv", "nnx_params_from_mmcv"]

_OIHW_TO_HWIO = (2, 3, 1, 0)
_HWIO_TO_OIHW = (3, 2, 0, 1)
_NCHW_TO_NHWC = (0, 2, 3, 1)
_NHWC_TO_NCHW = (0, 3, 1, 2)


def _to_numpy(a: Any, name: str, ndim: int) -> np.ndarray:
    """`a` as a numpy array of rank `ndim` (a torch tensor through .detach().cpu().numpy())."""
    if hasattr(a, "detach") and hasattr(a, "cpu"):
        a = a.detach().cpu()
        if str(getattr(a, "dtype", "")) == "torch.bfloat16":
            # numpy has no bfloat16: reinterpret the bits as ml_dtypes' (JAX's) bfloat16.
            import ml_dtypes
            import torch
            a = a.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            a = a.numpy()
    try:
        a = np.asarray(a)
    except Exception as e:
        raise ValueError(f"{name}: cannot convert {type(a).__name__} to an array ({e})") from None
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected a rank-{ndim} array, got shape {a.shape}")
    return a


def _transpose(a, name, axes):
    if a is None:
        return None
    return np.ascontiguousarray(np.transpose(_to_numpy(a, name, 4), axes))


def _check_offset_mask(offset, mask, kh, kw, offset_name, mask_name, channel_axis):
    """Offset channels are 2*G*kh*kw and the mask's G*kh*kw, same N and spatial size."""
    taps = kh * kw
    if offset is not None:
        oc = offset.shape[channel_axis]
        if oc == 0 or oc % (2 * taps):
            raise ValueError(f"{offset_name}: expected 2*G*kh*kw = G*{2 * taps} channels for a "
                             f"{kh}x{kw} kernel, got shape {offset.shape}")
    if mask is not None:
        if mask.shape[channel_axis] % taps or mask.shape[channel_axis] == 0:
            raise ValueError(f"{mask_name}: expected G*kh*kw = G*{taps} channels for a {kh}x{kw} "
                             f"kernel, got shape {mask.shape}")
        if offset is not None:
            spatial = [a for a in range(4) if a != channel_axis]
            if (mask.shape[channel_axis] * 2 != offset.shape[channel_axis]
                    or [mask.shape[a] for a in spatial] != [offset.shape[a] for a in spatial]):
                raise ValueError(f"{mask_name}: shape {mask.shape} does not match {offset_name} "
                                 f"{offset.shape} (half its channels, same other axes)")


def from_torchvision(*, weight: Any, offset: Any = None, mask: Any = None,
                     bias: Any = None) -> dict[str, np.ndarray | None]:
    """torchvision.ops.deform_conv2d's arrays -> deft_jax.deform_conv2d's.

    Args:
      weight: [C_out, C_in / groups, kh, kw] (OIHW).
      offset: [N, 2*G*kh*kw, H_out, W_out] (NCHW) or None.
      mask: [N, G*kh*kw, H_out, W_out] (NCHW) or None.
      bias: [C_out] or None.

    Returns:
      {'kernel': [kh, kw, C_in / groups, C_out], 'offset': [N, H_out, W_out, 2*G*kh*kw] or None,
       'mask': [N, H_out, W_out, G*kh*kw] or None, 'bias': [C_out] or None}: every key is always
      present, None where the argument was None. Then, with d the result,
      ``deform_conv2d(x_nhwc, d['offset'], d['kernel'], d['mask'], ...) + d['bias']`` equals
      torchvision's result transposed to NHWC.
    """
    kernel = _transpose(weight, "weight", _OIHW_TO_HWIO)
    offset = _transpose(offset, "offset", _NCHW_TO_NHWC)
    mask = _transpose(mask, "mask", _NCHW_TO_NHWC)
    _check_offset_mask(offset, mask, *kernel.shape[:2], "offset", "mask", channel_axis=3)
    bias = None if bias is None else _to_numpy(bias, "bias", 1).copy()
    if bias is not None and bias.shape[0] != kernel.shape[3]:
        raise ValueError(f"bias: expected shape ({kernel.shape[3]},) for weight's C_out, "
                         f"got {bias.shape}")
    return {"kernel": kernel, "offset": offset, "mask": mask, "bias": bias}


def to_torchvision(*, kernel: Any, offset: Any = None, mask: Any = None,
                   bias: Any = None) -> dict[str, np.ndarray | None]:
    """deft_jax.deform_conv2d's arrays -> torchvision.ops.deform_conv2d's (inverse of
    ``from_torchvision``).

    Args:
      kernel: [kh, kw, C_in / groups, C_out] (HWIO).
      offset: [N, H_out, W_out, 2*G*kh*kw] (NHWC) or None.
      mask: [N, H_out, W_out, G*kh*kw] (NHWC) or None.
      bias: [C_out] or None.

    Returns:
      {'weight': [C_out, C_in / groups, kh, kw], 'offset': [N, 2*G*kh*kw, H_out, W_out] or None,
       'mask': [N, G*kh*kw, H_out, W_out] or None, 'bias': [C_out] or None} as numpy arrays; every
      key is always present, None where the argument was None (``torch.from_numpy`` each one).
    """
    weight = _transpose(kernel, "kernel", _HWIO_TO_OIHW)
    offset = _transpose(offset, "offset", _NHWC_TO_NCHW)
    mask = _transpose(mask, "mask", _NHWC_TO_NCHW)
    _check_offset_mask(offset, mask, *weight.shape[2:], "offset", "mask", channel_axis=1)
    bias = None if bias is None else _to_numpy(bias, "bias", 1).copy()
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias: expected shape ({weight.shape[0]},) for kernel's C_out, "
                         f"got {bias.shape}")
    return {"weight": weight, "offset": offset, "mask": mask, "bias": bias}


def linen_params_from_mmcv(state_dict: Mapping[str, Any], prefix: str = "", *,
                           use_mask: bool = True) -> dict[str, Any]:
    """An mmcv ``ModulatedDeformConv2dPack`` state dict -> ``deft_jax.linen.DeformConvPack`` params.

    mmcv's forward is ``out = conv_offset(x); o1, o2, m = chunk(out, 3, dim=1);
    offset = cat((o1, o2)); mask = sigmoid(m)``: the first 2*G*kh*kw output channels of
    ``conv_offset`` are the offsets (torchvision's order, which is deft_jax's) and the last G*kh*kw
    the mask logits. DeformConvPack splits its ``conv_offset`` the same way (offsets first, mask
    last), so only the axes are transposed; no channel is reordered.

    Args:
      state_dict: mapping with ``{prefix}weight`` [C_out, C_in / groups, kh, kw],
        ``{prefix}conv_offset.weight`` [3*G*kh*kw, C_in, kh, kw], ``{prefix}conv_offset.bias``
        and, if the layer has one, ``{prefix}bias`` [C_out]. Other keys are ignored; values may be
        torch tensors or anything numpy converts.
      prefix: the layer's key prefix, e.g. ``"backbone.layer2.0.conv2."`` (a missing trailing '.'
        is added).
      use_mask: True for ``ModulatedDeformConv2dPack`` (DCNv2); False for mmcv's
        ``DeformConv2dPack`` (DCNv1: ``conv_offset`` has 2*G*kh*kw channels, all offsets), to be
        loaded into ``DeformConvPack(..., use_mask=False)``.

    Returns:
      {'kernel': [kh, kw, C_in / groups, C_out], 'bias': [C_out] (only if in the state dict),
       'conv_offset': {'kernel': [kh, kw, C_in, (3 or 2)*G*kh*kw], 'bias': [(3 or 2)*G*kh*kw]}}
      as numpy arrays: ``DeformConvPack(features=C_out, kernel_size=(kh, kw), strides=stride,
      padding=padding, kernel_dilation=dilation, feature_group_count=groups, offset_groups=G,
      use_bias=<'bias' in it>).apply({'params': params}, x_nhwc)`` equals mmcv's output in NHWC.
      Build the module with mmcv's integer padding, not the default 'SAME' (the two differ for
      strided layers).
    """
    if prefix and not prefix.endswith("."):
        prefix += "."

    def get(key, ndim):
        if prefix + key not in state_dict:
            raise ValueError(f"state_dict: missing key {prefix + key!r} (prefix={prefix!r})")
        return _to_numpy(state_dict[prefix + key], f"state_dict[{prefix + key!r}]", ndim)

    weight = get("weight", 4)
    offset_weight = get("conv_offset.weight", 4)
    offset_bias = get("conv_offset.bias", 1)
    c_out, _, kh, kw = weight.shape
    parts = 3 if use_mask else 2
    oc = offset_weight.shape[0]
    if oc % (parts * kh * kw) or offset_weight.shape[2:] != (kh, kw):
        raise ValueError(
            f"state_dict[{prefix + 'conv_offset.weight'!r}]: expected shape "
            f"(G*{parts * kh * kw}, C_in, {kh}, {kw}) for a {kh}x{kw} kernel"
            f"{' with a mask' if use_mask else ' without a mask'}, got {offset_weight.shape}")
    if offset_bias.shape != (oc,):
        raise ValueError(f"state_dict[{prefix + 'conv_offset.bias'!r}]: expected shape ({oc},), "
                         f"got {offset_bias.shape}")

    params: dict[str, Any] = {"kernel": np.ascontiguousarray(weight.transpose(_OIHW_TO_HWIO))}
    if prefix + "bias" in state_dict:
        bias = get("bias", 1)
        if bias.shape != (c_out,):
            raise ValueError(f"state_dict[{prefix + 'bias'!r}]: expected shape ({c_out},), "
                             f"got {bias.shape}")
        params["bias"] = bias.copy()
    # Same channel order on both sides (see the docstring): a transpose, no permutation.
    params["conv_offset"] = {
        "kernel": np.ascontiguousarray(offset_weight.transpose(_OIHW_TO_HWIO)),
        "bias": offset_bias.copy(),
    }
    return params


def nnx_params_from_mmcv(module, state_dict: Mapping[str, Any], prefix: str = ""):
    """Load an mmcv ``ModulatedDeformConv2dPack`` (or, for a module with ``use_mask=False``,
    ``DeformConv2dPack``) state dict into a ``deft_jax.nnx.DeformConvPack`` in place.

    The parameters are those of ``linen_params_from_mmcv`` (same names in NNX), cast to the
    module's parameter dtypes and written with ``nnx.update``. Shapes and names must match the
    module exactly (a ValueError says which does not): construct it with mmcv's in/out channels,
    kernel size, stride, integer padding, dilation, groups, ``offset_groups=deform_groups`` and
    ``use_bias`` as the state dict has a bias.

    Returns:
      ``module`` (updated in place).
    """
    from flax import nnx

    if not hasattr(module, "conv_offset") or not hasattr(module, "use_mask"):
        raise ValueError(f"module: expected a deft_jax.nnx.DeformConvPack, "
                         f"got {type(module).__name__}")
    params = linen_params_from_mmcv(state_dict, prefix, use_mask=module.use_mask)
    state = nnx.state(module, nnx.Param)
    current = nnx.to_pure_dict(state)

    flat_new = _flatten(params)
    flat_cur = _flatten(current)
    if flat_new.keys() != flat_cur.keys():
        raise ValueError(f"state_dict: parameters {sorted(flat_new)} do not match the module's "
                         f"{sorted(flat_cur)} (use_bias must match whether the state dict has "
                         f"{prefix + 'bias'!r})")
    for key, value in flat_new.items():
        if value.shape != flat_cur[key].shape:
            raise ValueError(f"state_dict: {'.'.join(key)} has shape {value.shape}, the module "
                             f"expects {tuple(flat_cur[key].shape)}; check the module's "
                             "arguments (channels, kernel_size, feature_group_count, "
                             "offset_groups)")
    import jax.numpy as jnp
    cast = {k: jnp.asarray(v, flat_cur[k].dtype) for k, v in flat_new.items()}
    nnx.replace_by_pure_dict(state, _unflatten(cast))
    nnx.update(module, state)
    return module


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _unflatten(flat):
    out: dict = {}
    for key, v in flat.items():
        node = out
        for k in key[:-1]:
            node = node.setdefault(k, {})
        node[key[-1]] = v
    return out
