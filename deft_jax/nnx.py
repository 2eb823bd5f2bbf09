"""Flax NNX modules for deformable convolution.

``DeformConv`` is ``flax.nnx.Conv`` (2D, NHWC, HWIO kernel) with the sampling offsets (and an
optional DCNv2 modulation mask) passed in as call arguments. Its constructor mirrors
``nnx.Conv``'s, its parameters are ``kernel`` [kh, kw, C_in / feature_group_count, C_out] and
``bias`` [C_out] (or None), exactly as ``nnx.Conv``, so ``nnx.state(conv, nnx.Param)`` loads into it
with ``nnx.update``; with zero offsets and a unit mask it computes what ``nnx.Conv`` computes.

``DeformConvPack`` is the self-contained DCNv2 layer (mmcv's ``ModulatedDeformConv2dPack``): a
zero-initialised ``nnx.Conv`` named ``conv_offset`` predicts the offsets and the sigmoid mask, so at
initialisation the layer is 0.5 * conv(x) + bias. Numerics and parameter layout are those of
``deft_jax.linen`` (same names and shapes, so linen params load into these modules unchanged).

This module imports flax; ``import deft_jax`` does not import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral

import jax
import jax.numpy as jnp
import numpy as np

from ._extras import check_installed

check_installed("flax", __name__, "flax")

from flax import nnx  # noqa: E402  (after the check, which names the extra)
from flax.nnx.nn import initializers  # noqa: E402
from flax.nnx.nn.dtypes import promote_dtype  # noqa: E402
from flax.nnx.nn.linear import canonicalize_padding, default_kernel_init  # noqa: E402
from flax.typing import Dtype, Initializer, PaddingLike, PrecisionLike  # noqa: E402

from . import _layer  # noqa: E402
from .ops import _IMPLEMENTATIONS  # noqa: E402  (one list for the op and the modules)

__all__ = ["DeformConv", "DeformConvPack"]


def _positive_int(value, name: str) -> int:
    # bool is an int subclass; True as a channel count is a bug, not 1.
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value!r}")
    return int(value)


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int]:
    """An int or a pair of positive ints -> (a, b); ValueError naming `name` otherwise. None is
    1, as nnx.Conv reads None strides and dilations."""
    if value is None and name != "kernel_size":
        value = 1
    if isinstance(value, Integral) and not isinstance(value, bool):
        pair = (value, value)
    else:
        try:
            pair = tuple(value)
        except TypeError:
            pair = ()
    if (len(pair) != 2
            or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in pair)
            or min(pair) < 1):
        raise ValueError(f"{name}: expected a positive int or a pair of positive ints for a 2D "
                         f"convolution, got {value!r}")
    return int(pair[0]), int(pair[1])


def _check_padding(padding) -> None:
    # nnx.Conv also takes 'CIRCULAR', 'REFLECT' and 'CAUSAL'; the op pads with zeros only.
    try:
        lax_padding = canonicalize_padding(padding, 2)
    except Exception as e:  # flax raises ValueError or TypeError depending on the shape
        raise ValueError(f"padding: expected 'SAME', 'VALID', an int, (ph, pw) or "
                         f"((top, bottom), (left, right)), got {padding!r} ({e})") from None
    if isinstance(lax_padding, str) and lax_padding not in ("SAME", "VALID"):
        raise ValueError(f"padding: {padding!r} is not supported by a deformable convolution "
                         "(zero padding only: 'SAME', 'VALID', an int or pairs)")


class DeformConv(nnx.Module):
    """Deformable 2D convolution, offsets (and mask) given as inputs: DCNv1, or DCNv2 with a mask.

    Args:
      in_features: C_in, the number of input channels.
      out_features: C_out, the number of output channels.
      kernel_size: (kh, kw), or an int for a square kernel.
      strides: int or (sh, sw) (None means 1, as in ``nnx.Conv``).
      padding: 'SAME', 'VALID', an int, (ph, pw) or ((top, bottom), (left, right)), as in
        ``nnx.Conv`` ('CIRCULAR', 'REFLECT' and 'CAUSAL' are not supported).
      kernel_dilation: int or (dh, dw) (None means 1).
      feature_group_count: grouped convolution; divides in_features and out_features.
      use_bias: add a learned bias.
      dtype: computation dtype (default: promoted from inputs, offset, mask and parameters).
      param_dtype: parameter dtype.
      precision: ``lax.Precision`` of the float32 computation.
      kernel_init: initializer of ``kernel`` (``nnx.Conv``'s default, lecun_normal).
      bias_init: initializer of ``bias`` (zeros).
      offset_groups: G, the number of offset groups; None infers it from the offset's size at call
        time, an int is checked against it. Input channel c follows group c // (C_in / G).
      implementation: None for the native op (its route chosen per shape), "fused" or "columns"
        to ask for one route (on CPU "fused" is the CPU fused forward; see
        deft_jax.deform_conv2d), "xla" for the pure-JAX reference.
      deterministic: bitwise reproducible forward and gradients on GPU (``deform_conv2d``'s
        ``deterministic``; numerics only, unrelated to dropout-style flags). Native implementation
        only: with implementation="xla" it is a ValueError. No effect on CPU.
      rngs: ``nnx.Rngs`` providing the ``params`` stream.

    Attributes:
      kernel: ``nnx.Param`` [kh, kw, in_features / feature_group_count, out_features].
      bias: ``nnx.Param`` [out_features], or None without ``use_bias``.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] | None = 1, *, padding: PaddingLike = "SAME",
                 kernel_dilation: int | Sequence[int] | None = 1, feature_group_count: int = 1,
                 use_bias: bool = True, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
                 kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = initializers.zeros_init(),
                 offset_groups: int | None = None, implementation: str | None = None,
                 deterministic: bool = False, rngs: nnx.Rngs):
        self.in_features = in_features = _positive_int(in_features, "in_features")
        self.out_features = out_features = _positive_int(out_features, "out_features")
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.strides = _pair(strides, "strides")
        self.kernel_dilation = _pair(kernel_dilation, "kernel_dilation")
        _check_padding(padding)
        self.padding = padding
        fg = _positive_int(feature_group_count, "feature_group_count")
        if in_features % fg or out_features % fg:
            raise ValueError(f"feature_group_count: {fg} must divide in_features={in_features} "
                             f"and out_features={out_features}")
        self.feature_group_count = fg
        if offset_groups is not None:
            offset_groups = _positive_int(offset_groups, "offset_groups")
            if in_features % offset_groups:
                raise ValueError(f"offset_groups: {offset_groups} must divide "
                                 f"in_features={in_features}")
        self.offset_groups = offset_groups
        if implementation not in _IMPLEMENTATIONS:
            raise ValueError(f"implementation: expected one of {_IMPLEMENTATIONS}, "
                             f"got {implementation!r}")
        self.implementation = implementation
        if not isinstance(deterministic, (bool, np.bool_)):
            raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
        if deterministic and implementation == "xla":
            raise ValueError("deterministic: True applies to the native implementation only, not "
                             "implementation='xla' (see deft_jax.deform_conv2d)")
        self.deterministic = bool(deterministic)
        self.use_bias = bool(use_bias)
        self.dtype = dtype
        self.param_dtype = param_dtype
        self.precision = precision

        kh, kw = self.kernel_size
        self.kernel = nnx.Param(
            kernel_init(rngs.params(), (kh, kw, in_features // fg, out_features), param_dtype))
        # nnx.data(None) as nnx.Conv does: `bias` is a data attribute whether or not it is set.
        self.bias = (nnx.Param(bias_init(rngs.params(), (out_features,), param_dtype))
                     if self.use_bias else nnx.data(None))

    def __call__(self, inputs: jax.Array, offset: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
        """Applies the deformable convolution.

        Args:
          inputs: [*batch, H, W, C_in]; any number of leading batch axes (none for one image).
          offset: [*batch, H_out, W_out, G*kh*kw*2] offsets in pixels; per group, taps row-major
            (k = i*kw + j), per tap (dy, dx).
          mask: [*batch, H_out, W_out, G*kh*kw] modulation applied as given, or None (DCNv1).

        Returns:
          [*batch, H_out, W_out, out_features].
        """
        return self._deform(inputs, offset, mask)

    def _deform(self, inputs, offset, mask):
        """The layer (shapes as ``__call__``), shared with ``DeformConvPack``."""
        if inputs.ndim >= 1 and inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs: expected {self.in_features} channels (in_features) on the "
                             f"last axis, got shape {inputs.shape}")
        lead = _layer.batch_shape(inputs, offset, mask, self.kernel_size, self.offset_groups)

        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, offset, mask, kernel, bias = promote_dtype(
            (inputs, offset, mask, kernel, bias), dtype=self.dtype)
        return _layer.apply(inputs, offset, mask, kernel, bias, lead, strides=self.strides,
                            padding=canonicalize_padding(self.padding, 2),
                            kernel_dilation=self.kernel_dilation,
                            feature_group_count=self.feature_group_count,
                            precision=self.precision, implementation=self.implementation,
                            deterministic=self.deterministic)


class DeformConvPack(DeformConv):
    """Self-contained deformable convolution that predicts its own offsets (and mask): DCNv2.

    ``conv_offset`` (an ``nnx.Conv`` with this layer's kernel_size, strides, padding and
    kernel_dilation, zero-initialised kernel and bias, no feature groups) maps the input to
    G*kh*kw*3 channels: the first G*kh*kw*2 are the offsets (layout as ``deform_conv2d``), the last
    G*kh*kw go through a sigmoid to give the mask. At initialisation the offsets are 0 and the mask
    sigmoid(0) = 0.5, so the output is 0.5 * conv(inputs, kernel) + bias (mmcv's
    ``ModulatedDeformConv2dPack``). With ``use_mask=False`` the layer is DCNv1: G*kh*kw*2 offset
    channels, no mask, and it starts equal to the plain conv.

    Args: those of ``DeformConv`` (``offset_groups`` None means 1), and
      use_mask: predict a modulation mask (DCNv2, default) or not (DCNv1).

    Attributes:
      kernel, bias: as ``DeformConv``.
      conv_offset: ``nnx.Conv`` with kernel [kh, kw, C_in, G*kh*kw*(3 or 2)] and bias
        [G*kh*kw*(3 or 2)].
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int | Sequence[int],
                 strides: int | Sequence[int] | None = 1, *, padding: PaddingLike = "SAME",
                 kernel_dilation: int | Sequence[int] | None = 1, feature_group_count: int = 1,
                 use_bias: bool = True, dtype: Dtype | None = None,
                 param_dtype: Dtype = jnp.float32, precision: PrecisionLike = None,
                 kernel_init: Initializer = default_kernel_init,
                 bias_init: Initializer = initializers.zeros_init(),
                 offset_groups: int | None = None, implementation: str | None = None,
                 deterministic: bool = False, use_mask: bool = True, rngs: nnx.Rngs):
        super().__init__(in_features, out_features, kernel_size, strides, padding=padding,
                         kernel_dilation=kernel_dilation,
                         feature_group_count=feature_group_count, use_bias=use_bias, dtype=dtype,
                         param_dtype=param_dtype, precision=precision, kernel_init=kernel_init,
                         bias_init=bias_init, offset_groups=offset_groups,
                         implementation=implementation, deterministic=deterministic, rngs=rngs)
        self.use_mask = bool(use_mask)
        kh, kw = self.kernel_size
        self.offset_channels = (offset_groups or 1) * kh * kw * 2
        zeros = initializers.zeros_init()
        self.conv_offset = nnx.Conv(
            in_features, self.offset_channels * 3 // 2 if self.use_mask else self.offset_channels,
            kernel_size=(kh, kw), strides=self.strides, padding=padding,
            kernel_dilation=self.kernel_dilation, dtype=dtype, param_dtype=param_dtype,
            precision=precision, kernel_init=zeros, bias_init=zeros, rngs=rngs)

    def __call__(self, inputs: jax.Array) -> jax.Array:  # type: ignore[override]
        """Applies the layer.

        Args:
          inputs: [*batch, H, W, C_in].

        Returns:
          [*batch, H_out, W_out, out_features].
        """
        if inputs.ndim < 3 or inputs.shape[-1] != self.in_features:
            raise ValueError(f"inputs: expected [*batch, H, W, {self.in_features}] "
                             f"(in_features channels last), got shape {inputs.shape}")
        predicted = self.conv_offset(inputs)
        offset = predicted[..., :self.offset_channels]
        mask = jax.nn.sigmoid(predicted[..., self.offset_channels:]) if self.use_mask else None
        return self._deform(inputs, offset, mask)
