"""custom_vjp around the native forward and backward calls."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import numpy as np

from . import _ffi, _partition


@dataclasses.dataclass(frozen=True)
class NativeCall:
    """Static part of a native call (hashable): the platform whose targets it calls ("cpu" or
    "cuda"), the route ("columns": sampler + XLA's dot + col2im, deft_jax/_columns.py; "fused":
    the fused CUDA kernels, or the CPU fused forward), the FFI attributes and the output shape;
    for the column route also the backward's images per chunk, the forward's output rows per
    chunk, the CPU backward's rows per run where an image exceeds its budget (0: whole images)
    and the dots' precision."""

    platform: str
    attrs: tuple[tuple[str, int], ...]
    out_shape: tuple[int, ...]
    route: str = "columns"
    chunk: int = 0
    chunk_rows: int = 0
    bwd_rows: int = 0
    precision: Any = None

    def attr_dict(self) -> dict[str, np.int64]:
        return {k: np.int64(v) for k, v in self.attrs}


@dataclasses.dataclass(frozen=True)
class NativeOp:
    """The native call of each direction on one platform: the forward's and the backward's (their
    routes may differ, tiling.choose_route)."""

    forward: NativeCall
    backward: NativeCall

    @property
    def platform(self) -> str:
        return self.forward.platform


def _mask_or_placeholder(mask, dtype):
    return _ffi.mask_placeholder(dtype) if mask is None else mask


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def deform_conv2d(x, offset, mask, kernel, op: NativeOp):
    """The native op; differentiable in x, offset, mask (when given) and kernel."""
    return _partition.forward(x, offset, _mask_or_placeholder(mask, x.dtype), kernel, op.forward)


def _fwd(x, offset, mask, kernel, op):
    return deform_conv2d(x, offset, mask, kernel, op), (x, offset, mask, kernel)


def _bwd(op, residuals, dy):
    x, offset, mask, kernel = residuals
    dx, doffset, dmask, dkernel = _partition.backward(
        x, offset, _mask_or_placeholder(mask, x.dtype), kernel, dy, op.backward)
    return dx, doffset, (None if mask is None else dmask), dkernel


deform_conv2d.defvjp(_fwd, _bwd)
