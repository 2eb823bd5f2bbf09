"""What the linen and NNX modules share: checking a layer's inputs and applying the op to any
number of leading batch axes. No Flax in here (the modules own parameters and dtype promotion)."""

from __future__ import annotations

from .ops import deform_conv2d


def batch_shape(inputs, offset, mask, kernel_size: tuple[int, int], offset_groups: int | None):
    """The leading batch axes of inputs [*batch, H, W, C_in]; ValueError naming the argument when
    offset / mask do not share them or offset's last axis does not fit offset_groups."""
    taps = kernel_size[0] * kernel_size[1]
    if inputs.ndim < 3:
        raise ValueError(f"inputs: expected [*batch, H, W, C_in], got shape {inputs.shape}")
    if offset_groups is not None and offset.shape[-1] != 2 * offset_groups * taps:
        raise ValueError(
            "offset: expected last axis 2*offset_groups*kh*kw = "
            f"{2 * offset_groups * taps} for offset_groups={offset_groups} and "
            f"kernel {tuple(kernel_size)}, got shape {tuple(offset.shape)}")
    lead = inputs.shape[:-3]
    for name, a in (("offset", offset), ("mask", mask)):
        if a is not None and (a.ndim < 3 or a.shape[:-3] != lead):
            raise ValueError(f"{name}: leading batch axes of shape {tuple(a.shape)} differ "
                             f"from the inputs' {lead}")
    return lead


def apply(inputs, offset, mask, kernel, bias, lead, **op_kwargs):
    """deform_conv2d over the flattened batch axes `lead`, plus bias: [*lead, H_out, W_out, C_out]."""
    def flat(a):  # the op takes exactly one batch axis
        return None if a is None else a.reshape((-1, *a.shape[-3:]))

    y = deform_conv2d(flat(inputs), flat(offset), kernel, flat(mask), **op_kwargs)
    if bias is not None:
        y = y + bias
    return y.reshape(lead + y.shape[1:])
