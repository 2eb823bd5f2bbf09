"""deft_jax: fused deformable convolution (DCNv1/DCNv2) for JAX.

``deform_conv2d`` is the op (NHWC input, HWIO kernel, torchvision's arithmetic); the native CPU
handler and, where built, the CUDA kernels are XLA typed-FFI custom calls with a custom_vjp;
``implementation="xla"`` selects the pure-JAX gather reference. Flax modules: ``deft_jax.linen``.
"""

from . import export, linen, models, reference
from ._ffi import cuda_available
from .ops import deform_conv2d

__version__ = "0.1.0"
__all__ = ["deform_conv2d", "cuda_available", "export", "linen", "models", "reference", "__version__"]
