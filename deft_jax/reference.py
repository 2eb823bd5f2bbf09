"""Pure-JAX deformable convolution: the test oracle and the baseline every benchmark compares to.

A vectorised gather implementation (no Python loops over pixels), differentiable by JAX's own
autodiff. It materialises the sampled "column" tensor [N, H_out, W_out, K, C_in] and reduces it
with one grouped einsum — the im2col algorithm written as well as plain JAX allows.

Arguments are already normalised (see ``deft_jax.ops``): ``strides``, ``padding`` and
``kernel_dilation`` are pairs, ``padding`` is ((top, bottom), (left, right)).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def _accum_dtype(dtype) -> jnp.dtype:
    return jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32


def sample_columns(x, offset, mask, *, kernel_size, strides, padding, kernel_dilation):
    """Bilinearly sampled columns.

    Args:
      x: [N, H, W, C] input.
      offset: [N, Ho, Wo, G*K*2], per group, taps row-major, per tap (dy, dx).
      mask: [N, Ho, Wo, G*K] or None.
    Returns:
      [N, Ho, Wo, K, C] in x's dtype (blended in float32, float64 for float64 inputs).
    """
    n, h, w, c = x.shape
    kh, kw = kernel_size
    k = kh * kw
    _, ho, wo, oc = offset.shape
    g = oc // (2 * k)
    acc = _accum_dtype(x.dtype)

    off = offset.astype(acc).reshape(n, ho, wo, g, k, 2)
    (pt, _), (pl, _) = padding
    base_y = (jnp.arange(ho) * strides[0] - pt)[:, None] + (jnp.arange(kh) * kernel_dilation[0])[None, :]
    base_x = (jnp.arange(wo) * strides[1] - pl)[:, None] + (jnp.arange(kw) * kernel_dilation[1])[None, :]
    # [Ho, Wo, K] undeformed positions, taps k = i*kw + j.
    base_y = jnp.broadcast_to(base_y[:, None, :, None], (ho, wo, kh, kw)).reshape(ho, wo, 1, k)
    base_x = jnp.broadcast_to(base_x[None, :, None, :], (ho, wo, kh, kw)).reshape(ho, wo, 1, k)
    py = base_y.astype(acc) + off[..., 0]  # [N, Ho, Wo, G, K]
    px = base_x.astype(acc) + off[..., 1]

    # Ordered comparisons are false for NaN: a NaN point is not inside. Positions, fractions and
    # indices are computed only from inside points (others take 0), so an infinite or huge
    # coordinate makes no inf - inf = NaN, no integer is ever cast from NaN, and such a point gets
    # exactly zero gradient (where's gradient is a select, not a product).
    inside = (py > -1) & (py < h) & (px > -1) & (px < w)
    py_in = jnp.where(inside, py, 0)
    px_in = jnp.where(inside, px, 0)
    y0 = jnp.floor(py_in)
    x0 = jnp.floor(px_in)
    ly, lx = py_in - y0, px_in - x0
    y0 = y0.astype(jnp.int32)
    x0 = x0.astype(jnp.int32)

    xg = x.reshape(n, h * w, g, c // g)
    n_idx = jnp.arange(n)[:, None, None, None, None]
    g_idx = jnp.arange(g)[None, None, None, :, None]

    def corner(dy, dx, weight):
        yy, xx = y0 + dy, x0 + dx
        valid = inside & (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        flat = jnp.where(valid, yy * w + xx, 0)
        vals = xg[n_idx, flat, g_idx]  # [N, Ho, Wo, G, K, C/G]
        # Select the value, not a zero weight: a corner outside the image reads nothing
        # (torchvision), so a non-finite x at the stand-in pixel 0 must not become 0 * inf = NaN,
        # in the forward or in the weight's (offset's) gradient.
        return jnp.where(valid[..., None], vals, 0).astype(acc) * weight[..., None]

    cols = (corner(0, 0, (1 - ly) * (1 - lx)) + corner(0, 1, (1 - ly) * lx)
            + corner(1, 0, ly * (1 - lx)) + corner(1, 1, ly * lx))
    # A NaN coordinate has no sample point: its sample is NaN in every channel of the group, and
    # so are its derivatives by both offset components (t * t: value NaN, d/dt = 2t = NaN), while
    # x gets nothing from it. The inner where keeps t (and its gradient) 0 at every other point.
    nan_point = jnp.isnan(py) | jnp.isnan(px)
    t = jnp.where(nan_point, py + px, 0)
    cols = jnp.where(nan_point[..., None], (t * t)[..., None], cols)
    if mask is not None:
        cols = cols * mask.astype(acc).reshape(n, ho, wo, g, k)[..., None]
    # [N, Ho, Wo, G, K, C/G] -> [N, Ho, Wo, K, C]
    cols = jnp.moveaxis(cols, 3, 4).reshape(n, ho, wo, k, c)
    return cols.astype(x.dtype)


def deform_conv2d(x, offset, kernel, mask=None, *, strides, padding, kernel_dilation,
                  feature_group_count, precision=None):
    """Deformable convolution by gather + grouped einsum; shapes as ``deft_jax.deform_conv2d``."""
    kh, kw, cig, cout = kernel.shape
    fg = feature_group_count
    cols = sample_columns(x, offset, mask, kernel_size=(kh, kw), strides=strides, padding=padding,
                          kernel_dilation=kernel_dilation)
    n, ho, wo, k, c = cols.shape
    cols = cols.reshape(n, ho, wo, k, fg, cig)
    wk = kernel.reshape(k, cig, fg, cout // fg)
    y = jnp.einsum("nhwkfc,kcfo->nhwfo", cols, wk, precision=precision,
                   preferred_element_type=_accum_dtype(x.dtype))
    return y.reshape(n, ho, wo, cout).astype(x.dtype)


def dense_conv2d(x, kernel, *, strides, padding, kernel_dilation, feature_group_count,
                 precision=None):
    """The dense convolution of the same geometry (the deformable conv at zero offset, unit mask)."""
    return lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, rhs_dilation=kernel_dilation,
        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=feature_group_count,
        precision=precision)


__all__ = ["deform_conv2d", "dense_conv2d", "sample_columns"]
