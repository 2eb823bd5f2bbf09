"""Native modules: load them, register their FFI targets with XLA at import, and wrap the calls.

The CPU module is always built; the CUDA module only where nvcc was found at build time.
Target names and the attribute schema carry a version (``_v3``): a change to either gets a new name.
v2 added the attribute ``bwd_tile_n`` (the weight pass's tile), v3 ``k_splits`` (the
warp-specialized forward's blocks per tile); programs exported with older targets need the
deft_jax that wrote them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

FWD_TARGET = "deft_deform_conv2d_fwd_v3"
BWD_TARGET = "deft_deform_conv2d_bwd_v3"
TARGETS = (FWD_TARGET, BWD_TARGET)

try:
    from . import _deft_cpu
except ImportError as e:  # pragma: no cover - a broken install, not a supported configuration
    raise ImportError(
        "deft_jax: the native CPU module _deft_cpu is missing; reinstall with `pip install .`"
    ) from e

try:
    from . import _deft_cuda
except ImportError:
    _deft_cuda = None

for _name, _capsule in _deft_cpu.registrations().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")
if _deft_cuda is not None:
    for _name, _capsule in _deft_cuda.registrations().items():
        jax.ffi.register_ffi_target(_name, _capsule, platform="CUDA")


def cuda_available() -> bool:
    """Whether the CUDA module was built and registered."""
    return _deft_cuda is not None


def mask_placeholder(dtype):
    """DCNv1: the handlers take a (0,)-shaped mask and the with_mask=0 attribute."""
    return jnp.zeros((0,), dtype)


def forward(x, offset, mask, kernel, attrs: dict[str, np.int64], out_shape):
    """y [..., N, Ho, Wo, C_out] of the native forward; leading dims are independent problems."""
    call = jax.ffi.ffi_call(FWD_TARGET, jax.ShapeDtypeStruct(out_shape, x.dtype),
                            vmap_method="broadcast_all")
    return call(x, offset, mask, kernel, **attrs)


def backward(x, offset, mask, kernel, dy, attrs: dict[str, np.int64]):
    """(dx, doffset, dmask, dkernel) of the native backward for cotangent dy."""
    out = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, offset, mask, kernel))
    call = jax.ffi.ffi_call(BWD_TARGET, out, vmap_method="broadcast_all")
    return tuple(call(x, offset, mask, kernel, dy, **attrs))
