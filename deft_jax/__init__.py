"""deft_jax: fused deformable convolution (DCNv1/DCNv2) for JAX.

``deform_conv2d`` is the op (NHWC input, HWIO kernel, torchvision's arithmetic); the native CPU
handler and, where built, the CUDA kernels are XLA typed-FFI custom calls with a custom_vjp;
``implementation="xla"`` selects the pure-JAX gather reference.

The op needs jax and numpy only. The Flax modules, ``deft_jax.linen`` and ``deft_jax.nnx``, are
imported on first use and need the ``flax`` extra (``pip install "deft_jax[flax]"``), so
``import deft_jax`` never imports flax.
"""

from __future__ import annotations

import importlib
import importlib.util

from . import export, reference
from ._extras import check_installed as _check_installed
from ._ffi import cuda_available
from .ops import deform_conv2d

__version__ = "0.1.0"
__all__ = ["deform_conv2d", "cuda_available", "export", "reference", "__version__"]

# Submodules imported on first attribute access (``deft_jax.linen``), each with the third-party
# package it needs and the extra that installs it (None: needs nothing beyond jax and numpy).
_LAZY_SUBMODULES = {"linen": ("flax", "flax"), "nnx": ("flax", "flax"), "interop": None}


def __getattr__(name: str):
    if name not in _LAZY_SUBMODULES or importlib.util.find_spec(f"{__name__}.{name}") is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    needs = _LAZY_SUBMODULES[name]
    if needs is not None:
        package, extra = needs
        _check_installed(package, f"{__name__}.{name}", extra)
    # import_module binds the submodule as an attribute of this package: later accesses do not
    # come back here.
    return importlib.import_module(f"{__name__}.{name}")


def __dir__() -> list[str]:
    present = [n for n in _LAZY_SUBMODULES if importlib.util.find_spec(f"{__name__}.{n}")]
    return sorted(set(globals()) | set(present))
