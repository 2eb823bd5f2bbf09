"""custom_vjp around the native forward and backward targets."""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np

from . import _ffi


@dataclasses.dataclass(frozen=True)
class NativeCall:
    """Static part of a native call: the FFI attributes and the output shape (hashable)."""

    attrs: tuple[tuple[str, int], ...]
    out_shape: tuple[int, ...]

    def attr_dict(self) -> dict[str, np.int64]:
        return {k: np.int64(v) for k, v in self.attrs}


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def deform_conv2d(x, offset, mask, kernel, call: NativeCall):
    """The native op; differentiable in x, offset, mask (when given) and kernel."""
    return _ffi.forward(x, offset, mask, kernel, call.attr_dict(), call.out_shape)


def _fwd(x, offset, mask, kernel, call):
    y = _ffi.forward(x, offset, mask, kernel, call.attr_dict(), call.out_shape)
    return y, (x, offset, mask, kernel)


def _bwd(call, residuals, dy):
    x, offset, mask, kernel = residuals
    return _ffi.backward(x, offset, mask, kernel, dy, call.attr_dict())


deform_conv2d.defvjp(_fwd, _bwd)
