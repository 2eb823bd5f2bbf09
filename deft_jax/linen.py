"""Flax linen modules for deformable convolution.

``DeformConv`` is ``flax.linen.Conv`` with sampling offsets (and an optional DCNv2 modulation mask)
passed in as call arguments; it has the same attributes, parameter names ('kernel' HWIO, 'bias')
and shapes, so a checkpoint of one loads into the other, and with zero offsets and a unit mask it
computes exactly what ``nn.Conv`` computes.

``DeformConvPack`` is the self-contained DCNv2 layer (mmcv's ``ModulatedDeformConv2dPack``): it
predicts the offsets and the sigmoid mask from its own input with a zero-initialised conv, so at
initialisation it is an ordinary convolution scaled by sigmoid(0) = 0.5 (plus bias).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from ._extras import check_installed

check_installed("flax", __name__, "flax")

from flax import linen as nn  # noqa: E402  (after the check, which names the extra)
from flax.linen.dtypes import promote_dtype  # noqa: E402
from flax.linen.linear import PaddingLike, canonicalize_padding, default_kernel_init  # noqa: E402
from flax.typing import Dtype, Initializer, PrecisionLike  # noqa: E402

from . import _layer  # noqa: E402

__all__ = ["DeformConv", "DeformConvPack"]


def _pair(value: int | Sequence[int] | None, name: str) -> tuple[int, int]:
    """An int or a pair of ints -> (a, b); None means 1 for strides and dilations, as nn.Conv."""
    if value is None and name != "kernel_size":
        value = 1
    if isinstance(value, (int, np.integer)):
        return (int(value), int(value))
    try:
        pair = tuple(int(v) for v in value)
    except TypeError:
        pair = ()
    if len(pair) != 2:
        raise ValueError(f"{name}: expected an int or a pair of ints for a 2D convolution, "
                         f"got {value!r}")
    return pair


class DeformConv(nn.Module):
    """Deformable 2D convolution, offsets (and mask) given as inputs: DCNv1, or DCNv2 with a mask.

    Attributes mirror ``flax.linen.Conv`` (2D, NHWC, HWIO kernel); the parameters are 'kernel'
    [kh, kw, C_in / feature_group_count, features] and, with ``use_bias``, 'bias' [features].

    Attributes:
      features: number of output channels C_out.
      kernel_size: (kh, kw), or an int for a square kernel.
      strides: int or (sh, sw).
      padding: 'SAME', 'VALID', an int, (ph, pw) or ((top, bottom), (left, right)), as in
        ``nn.Conv`` ('CIRCULAR', 'REFLECT' and 'CAUSAL' are not supported).
      kernel_dilation: int or (dh, dw).
      feature_group_count: grouped convolution; divides C_in and features.
      use_bias: add a learned bias.
      dtype: computation dtype (default: promoted from input, offset, mask and params).
      param_dtype: parameter dtype.
      precision: ``lax.Precision`` of the float32 computation.
      kernel_init: initializer of 'kernel' (``nn.Conv``'s default).
      bias_init: initializer of 'bias'.
      offset_groups: G, the number of offset groups; None infers it from the offset's size, an int
        is checked against it. Input channel c follows the offsets of group c // (C_in / G).
      implementation: None for the native op (its route chosen per shape), "fused" or "columns"
        to ask for one route (on CPU "fused" is the CPU fused forward; see
        deft_jax.deform_conv2d), "xla" for the pure-JAX reference.
      deterministic: bitwise reproducible forward and gradients on GPU (``deform_conv2d``'s
        ``deterministic``; numerics only, unrelated to dropout-style ``deterministic`` flags).
        Native implementation only: with implementation="xla" it raises ValueError. No effect
        on CPU, whose kernels are always deterministic.
    """

    features: int
    kernel_size: int | Sequence[int]
    strides: int | Sequence[int] = 1
    padding: PaddingLike = "SAME"
    kernel_dilation: int | Sequence[int] = 1
    feature_group_count: int = 1
    use_bias: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    precision: PrecisionLike = None
    kernel_init: Initializer = default_kernel_init
    bias_init: Initializer = nn.initializers.zeros_init()
    offset_groups: int | None = None
    implementation: str | None = None
    deterministic: bool = False

    @nn.compact
    def __call__(self, inputs: jax.Array, offset: jax.Array,
                 mask: jax.Array | None = None) -> jax.Array:
        """Applies the deformable convolution.

        Args:
          inputs: [*batch, H, W, C_in]; any number of leading batch axes (none for one image).
          offset: [*batch, H_out, W_out, G*kh*kw*2] offsets in pixels; per group, taps row-major
            (k = i*kw + j), per tap (dy, dx).
          mask: [*batch, H_out, W_out, G*kh*kw] modulation applied as given, or None (DCNv1).

        Returns:
          [*batch, H_out, W_out, features].
        """
        return self._deform(inputs, offset, mask)

    def _deform(self, inputs, offset, mask):
        """The layer (shapes as ``__call__``), shared with ``DeformConvPack``: it declares
        'kernel' and 'bias' inside the calling compact method's scope."""
        kh, kw = _pair(self.kernel_size, "kernel_size")
        lead = _layer.batch_shape(inputs, offset, mask, (kh, kw), self.offset_groups)
        in_features = inputs.shape[-1]
        if in_features % self.feature_group_count:
            raise ValueError(f"feature_group_count: {self.feature_group_count} must divide the "
                             f"input features {in_features}")
        kernel = self.param("kernel", self.kernel_init,
                            (kh, kw, in_features // self.feature_group_count, self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        inputs, offset, mask, kernel, bias = promote_dtype(
            inputs, offset, mask, kernel, bias, dtype=self.dtype)
        return _layer.apply(inputs, offset, mask, kernel, bias, lead,
                            strides=_pair(self.strides, "strides"),
                            padding=canonicalize_padding(self.padding, 2),
                            kernel_dilation=_pair(self.kernel_dilation, "kernel_dilation"),
                            feature_group_count=self.feature_group_count,
                            precision=self.precision, implementation=self.implementation,
                            deterministic=self.deterministic)


class DeformConvPack(DeformConv):
    """Self-contained deformable convolution that predicts its own offsets (and mask): DCNv2.

    A submodule 'conv_offset' (an ``nn.Conv`` with this layer's kernel_size, strides, padding and
    kernel_dilation, zero-initialised kernel and bias) maps the input to G*kh*kw*3 channels: the
    first G*kh*kw*2 are the offsets (layout as ``deform_conv2d``), the last G*kh*kw go through a
    sigmoid to give the mask. Offsets therefore start at 0 and the mask at sigmoid(0) = 0.5: at
    initialisation the output is 0.5 * conv(inputs, kernel) + bias, like mmcv's
    ``ModulatedDeformConv2dPack``. With ``use_mask=False`` the layer is DCNv1 (G*kh*kw*2 offset
    channels, no mask; the output starts equal to the plain conv).

    Parameters: 'kernel' and 'bias' exactly as ``nn.Conv`` / ``DeformConv``, plus
    'conv_offset': {'kernel' [kh, kw, C_in, G*kh*kw*(3 or 2)], 'bias'}.

    Attributes: those of ``DeformConv`` (``offset_groups`` None means 1), and
      use_mask: predict a modulation mask (DCNv2, default) or not (DCNv1).
    """

    use_mask: bool = True

    @nn.compact
    def __call__(self, inputs: jax.Array) -> jax.Array:
        """Applies the layer.

        Args:
          inputs: [*batch, H, W, C_in].

        Returns:
          [*batch, H_out, W_out, features].
        """
        kh, kw = _pair(self.kernel_size, "kernel_size")
        offset_channels = (self.offset_groups or 1) * kh * kw * 2
        zeros = nn.initializers.zeros_init()
        predicted = nn.Conv(
            offset_channels * 3 // 2 if self.use_mask else offset_channels,
            kernel_size=(kh, kw), strides=self.strides, padding=self.padding,
            kernel_dilation=self.kernel_dilation, dtype=self.dtype, param_dtype=self.param_dtype,
            precision=self.precision, kernel_init=zeros, bias_init=zeros,
            name="conv_offset")(inputs)
        offset = predicted[..., :offset_channels]
        mask = nn.sigmoid(predicted[..., offset_channels:]) if self.use_mask else None
        return self._deform(inputs, offset, mask)
