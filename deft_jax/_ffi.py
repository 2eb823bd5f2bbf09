"""Native modules: load them, register their FFI targets with XLA at import, and wrap the calls.

The CPU module is always built; the CUDA module only where nvcc was found at build time.
Each platform has its own target names, and a name carries a version: any change of operands,
results or attribute schema gets a new name, so a serialized program either finds the handler it
was written for or fails to load (never runs a handler with another contract). The CUDA targets
return their workspace as an extra output, sized here from the C++ module's own rule. The CUDA
targets take one attribute more than the CPU ones, ``deterministic`` (0/1; see ops.deform_conv2d).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_TARGETS = {
    "cpu": ("deft_deform_conv2d_fwd_v3", "deft_deform_conv2d_bwd_v3"),
    "cuda": ("deft_deform_conv2d_fwd_cuda_v5", "deft_deform_conv2d_bwd_cuda_v5"),
}
TARGETS = tuple(t for pair in _TARGETS.values() for t in pair)
_TILE_KEYS = ("tile_h", "tile_w", "tile_n", "tile_k", "warps", "stages", "bwd_tile_n", "k_splits")

try:
    from . import _deft_cpu
except ImportError as e:
    import pathlib

    _here = pathlib.Path(__file__).resolve().parent
    _source_tree = (_here.parent / "CMakeLists.txt").is_file()
    raise ImportError(
        f"deft_jax: imported from {_here}, which has no compiled native module (_deft_cpu). "
        + ("This is a source checkout that was never built (or Python picked it up from the "
           "current directory instead of the installed package). Build and install it with "
           "`pip install .` (or `pip install -e .` for development; add -v to watch the "
           "compiler), or run Python from another directory so the installed deft_jax is used."
           if _source_tree else "The installation is incomplete; reinstall with `pip install deft_jax`.")
        + f" (Python said: {e})"
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


def target_names(platform: str) -> tuple[str, str]:
    """(forward, backward) FFI target names of a platform ("cpu" or "cuda")."""
    return _TARGETS[platform]


def cuda_available() -> bool:
    """Whether the CUDA module was built and registered."""
    return _deft_cuda is not None


def mask_placeholder(dtype):
    """DCNv1: the handlers take a (0,)-shaped mask and the with_mask=0 attribute."""
    return jnp.zeros((0,), dtype)


def _workspace(nbytes: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((int(nbytes),), jnp.uint8)


def forward(x, offset, mask, kernel, attrs: dict[str, np.int64], out_shape, platform: str):
    """y [..., N, Ho, Wo, C_out] of the native forward; leading dims are independent problems."""
    y = jax.ShapeDtypeStruct(out_shape, x.dtype)
    if platform == "cuda":
        nbytes = _deft_cuda.forward_workspace_bytes(
            jnp.dtype(x.dtype).name, int(np.prod(out_shape)), **{k: int(attrs[k]) for k in _TILE_KEYS})
        call = jax.ffi.ffi_call(_TARGETS["cuda"][0], (y, _workspace(nbytes)), vmap_method="broadcast_all")
        return call(x, offset, mask, kernel, **attrs)[0]
    return jax.ffi.ffi_call(_TARGETS["cpu"][0], y, vmap_method="broadcast_all")(x, offset, mask, kernel, **attrs)


def backward(x, offset, mask, kernel, dy, attrs: dict[str, np.int64], platform: str):
    """(dx, doffset, dmask, dkernel) of the native backward for cotangent dy."""
    grads = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, offset, mask, kernel))
    if platform == "cuda":
        nbytes = _deft_cuda.backward_workspace_bytes(jnp.dtype(x.dtype).name,
                                                     *(int(np.prod(g.shape)) for g in grads),
                                                     deterministic=bool(attrs["deterministic"]))
        call = jax.ffi.ffi_call(_TARGETS["cuda"][1], (*grads, _workspace(nbytes)), vmap_method="broadcast_all")
        return tuple(call(x, offset, mask, kernel, dy, **attrs)[:4])
    call = jax.ffi.ffi_call(_TARGETS["cpu"][1], grads, vmap_method="broadcast_all")
    return tuple(call(x, offset, mask, kernel, dy, **attrs))
