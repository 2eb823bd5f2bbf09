"""Native modules: load them, register their FFI targets with XLA at import, and wrap the calls.

The CPU module is always built; the CUDA module only where nvcc was found at build time. The CUDA
targets are the fused forward and backward; the CPU targets are the column sampler and its
col2im, around which deft_jax/_columns.py puts XLA's dot, and a fused forward (sampler and a BLAS
GEMM per tile of pixels, csrc/cpu/forward.h) whose BLAS is loaded at run time (load_blas). Each
platform has its own target names, and a name carries a version: any change of operands, results
or attribute schema gets a new name, so a serialized program either finds the handler it was written for or fails to load (never
runs a handler with another contract). The fused targets return their workspace as an extra
output, sized here from the C++ module's own rule, as does the CUDA col2im; every target takes
the attribute ``deterministic`` (0/1; see ops.deform_conv2d).
"""

from __future__ import annotations

import ctypes
import os
import threading

import jax
import jax.numpy as jnp
import numpy as np

# The fused forward and backward (CUDA only).
_FUSED_TARGETS = ("deft_deform_conv2d_fwd_cuda_v6", "deft_deform_conv2d_bwd_cuda_v6")
# The column route's sampler and col2im, per platform (one contract: csrc/ffi/column_attrs.h).
_COLUMN_TARGETS = {
    "cpu": ("deft_sample_columns_cpu_v3", "deft_col2im_cpu_v3"),
    "cuda": ("deft_sample_columns_cuda_v2", "deft_col2im_cuda_v2"),
}
# The CPU fused forward (its backward is the column route's).
_CPU_FUSED_TARGET = "deft_deform_conv2d_fwd_cpu_v1"
TARGETS = (*_FUSED_TARGETS, *(t for pair in _COLUMN_TARGETS.values() for t in pair), _CPU_FUSED_TARGET)
_TILE_KEYS = ("tile_h", "tile_w", "tile_n", "tile_k", "warps", "stages", "bwd_tile_n", "k_splits", "family")

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


def target_names(platform: str, route: str = "columns") -> tuple[str, ...]:
    """The FFI targets of a route on a platform: "columns": the column sampler (forward and
    backward) and the col2im (backward); "fused": on CUDA the fused forward and backward, on CPU
    the fused forward alone (its backward is the column route's)."""
    if route == "fused":
        return (_CPU_FUSED_TARGET,) if platform == "cpu" else _FUSED_TARGETS
    return _COLUMN_TARGETS[platform]


def cuda_available() -> bool:
    """Whether the CUDA module was built and registered."""
    return _deft_cuda is not None


def compiled_tile_error(tile_attrs: dict[str, int], dtype: str) -> str | None:
    """The CUDA module's answer to whether it instantiates a tile for ``dtype`` (the check its
    handlers run): "" if so, else why not; None when the module is not built."""
    if _deft_cuda is None:
        return None
    return _deft_cuda.tile_error(dtype, **{k: int(tile_attrs[k]) for k in _TILE_KEYS})


_blas_lock = threading.Lock()
_blas_error: str | None = None  # None: not tried yet; "": loaded; else why not
_blas_core = ""  # the kernels OpenBLAS runs (e.g. "SkylakeX", "Haswell")
_blas_lib: ctypes.CDLL | None = None  # the loaded library (benchmarks/cpu_gemm_probe.py calls it)


def load_blas() -> str:
    """Load the BLAS of the CPU fused forward once and hand its GEMMs to the CPU module: OpenBLAS
    from the ``scipy-openblas32`` wheel (a dependency of deft_jax), a private copy with
    its own symbols, so NumPy's or another library's BLAS is not touched. Returns "" when it is
    loaded, else why not (the fused CPU route then raises that; nothing falls back silently).

    OpenBLAS runs single-threaded here (the module's tasks run on XLA's pool, one GEMM per task)
    with the kernels it picks for the CPU, or those ``OPENBLAS_CORETYPE`` names when it is set
    before the library loads (``import scipy_openblas32`` loads it): on the project's AMD EPYC VM
    OpenBLAS picks SkylakeX, while its environment sets Haswell, whose sgemm ran 1.8x slower
    there (docs/kernels.md, CPU)."""
    global _blas_error, _blas_core, _blas_lib
    with _blas_lock:
        if _blas_error is not None:
            return _blas_error
        try:
            import scipy_openblas32
        except ImportError:
            _blas_error = ("the CPU fused forward needs OpenBLAS from the scipy-openblas32 package, "
                           "which is not installed: pip install scipy-openblas32")
            return _blas_error
        path = os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(fullname=True))
        try:
            lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
            lib.scipy_openblas_set_num_threads(1)
            lib.scipy_openblas_get_corename.restype = ctypes.c_char_p
            _blas_core = lib.scipy_openblas_get_corename().decode()
            sgemm, dgemm = (ctypes.cast(getattr(lib, f"scipy_cblas_{t}gemm"), ctypes.c_void_p).value
                            for t in "sd")
        except (OSError, AttributeError) as e:
            _blas_error = f"the CPU fused forward could not load OpenBLAS from {path}: {e}"
            return _blas_error
        _deft_cpu.set_gemm(sgemm, dgemm)
        _blas_lib = lib
        _blas_error = ""
        return _blas_error


def blas_core() -> str:
    """The kernels the CPU fused forward's OpenBLAS runs ("" where it is not loaded)."""
    return _blas_core if load_blas() == "" else ""


def cpu_fused_forward(x, offset, mask, kernel, attrs: dict[str, np.int64], out_shape):
    """y [..., N, Ho, Wo, C_out] of the CPU fused forward (load_blas must have succeeded); leading
    dims are independent problems."""
    y = jax.ShapeDtypeStruct(out_shape, x.dtype)
    return jax.ffi.ffi_call(_CPU_FUSED_TARGET, y, vmap_method="broadcast_all")(x, offset, mask, kernel, **attrs)


def mask_placeholder(dtype):
    """DCNv1: the handlers take a (0,)-shaped mask and the with_mask=0 attribute."""
    return jnp.zeros((0,), dtype)


def _workspace(nbytes: int) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((int(nbytes),), jnp.uint8)


def accumulation_dtype(dtype) -> jnp.dtype:
    """float64 for float64, else float32: the native code's arithmetic type."""
    return jnp.dtype(jnp.float64 if jnp.dtype(dtype) == jnp.float64 else jnp.float32)


def forward(x, offset, mask, kernel, attrs: dict[str, np.int64], out_shape):
    """y [..., N, Ho, Wo, C_out] of the fused CUDA forward; leading dims are independent problems."""
    y = jax.ShapeDtypeStruct(out_shape, x.dtype)
    nbytes = _deft_cuda.forward_workspace_bytes(
        jnp.dtype(x.dtype).name, int(np.prod(out_shape)), **{k: int(attrs[k]) for k in _TILE_KEYS})
    call = jax.ffi.ffi_call(_FUSED_TARGETS[0], (y, _workspace(nbytes)), vmap_method="broadcast_all")
    return call(x, offset, mask, kernel, **attrs)[0]


def backward(x, offset, mask, kernel, dy, attrs: dict[str, np.int64]):
    """(dx, doffset, dmask, dkernel) of the fused CUDA backward for cotangent dy."""
    grads = tuple(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in (x, offset, mask, kernel))
    nbytes = _deft_cuda.backward_workspace_bytes(jnp.dtype(x.dtype).name,
                                                 *(int(np.prod(g.shape)) for g in grads),
                                                 deterministic=bool(attrs["deterministic"]))
    call = jax.ffi.ffi_call(_FUSED_TARGETS[1], (*grads, _workspace(nbytes)), vmap_method="broadcast_all")
    return tuple(call(x, offset, mask, kernel, dy, **attrs)[:4])


def sample_columns(x, offset, mask, start, shape: tuple[int, int], attrs: dict[str, np.int64],
                   platform: str):
    """cols [..., b, R, Wo, kh*kw, C] in x's dtype, shape = (b, R): the b * R output rows
    [start * R, (start + b) * R) of x [..., N, H, W, C], rows counted image-major over N * Ho
    (``start`` counts in units of R rows: with R = Ho, b whole images from image ``start``;
    an int, or a traced int32 scalar); cols[..., k, c] = mask x the bilinear sample of channel c
    at tap k. The chunk is read in place, not sliced out first. CUDA (target v2): whole images
    only."""
    taps = int(attrs["kh"]) * int(attrs["kw"])
    lead = x.shape[:-4]
    if platform == "cuda" and shape[1] != offset.shape[-3]:
        raise ValueError(f"the CUDA sampler takes whole images (R = Ho = {offset.shape[-3]}), got {shape}")
    cols = jax.ShapeDtypeStruct((*lead, *shape, offset.shape[-2], taps, x.shape[-1]), x.dtype)
    return jax.ffi.ffi_call(_COLUMN_TARGETS[platform][0], cols, vmap_method="broadcast_all")(
        x, offset, mask, jnp.asarray(start, jnp.int32), **attrs)


def col2im(x, offset, mask, start, dcols, attrs: dict[str, np.int64], platform: str, dx=None):
    """(dx, doffset, dmask) for the column cotangent dcols [..., b, R, Wo, K, C] of the output rows
    [start * R, (start + b) * R) (as sample_columns counts them). dcols and dx are in the
    accumulation dtype (accumulation_dtype(x.dtype)), doffset [..., b, R, Wo, G*K*2] and dmask in
    x's; dmask is mask's (0,) placeholder without modulation.

    CPU: dx [..., m, H, W, C] of the m images the rows lie in is ``dx`` (zeros if None; donated to
    the call, which adds in place) plus the rows' scatter, so runs of one image can be summed
    call after call. CUDA: whole images only (R = Ho, start an image), dx of those b images."""
    acc = accumulation_dtype(x.dtype)
    b, r = dcols.shape[-5:-3]
    with_mask = int(attrs["with_mask"]) != 0

    def rows_of(a):
        return (*a.shape[:-4], b, r, *a.shape[-2:])
    if platform == "cpu":
        if dx is None:
            ho = offset.shape[-3]
            images = 0 if b * r == 0 else ((start * r + b * r - 1) // ho - (start * r) // ho + 1)
            if not isinstance(images, int):
                raise ValueError("col2im: a traced start needs an explicit dx (its image count)")
            dx = jnp.zeros((*x.shape[:-4], images, *x.shape[-3:]), acc)
        outs = (jax.ShapeDtypeStruct(dx.shape, acc), jax.ShapeDtypeStruct(rows_of(offset), x.dtype),
                jax.ShapeDtypeStruct(rows_of(mask) if with_mask else mask.shape, x.dtype))
        call = jax.ffi.ffi_call(_COLUMN_TARGETS[platform][1], outs, vmap_method="broadcast_all",
                                input_output_aliases={5: 0})
        return tuple(call(x, offset, mask, jnp.asarray(start, jnp.int32), dcols.astype(acc),
                          dx.astype(acc), **attrs))

    def chunk(a):
        return (*a.shape[:-4], b, *a.shape[-3:])
    outs = (jax.ShapeDtypeStruct(chunk(x), acc), jax.ShapeDtypeStruct(chunk(offset), x.dtype),
            jax.ShapeDtypeStruct(chunk(mask) if with_mask else mask.shape, x.dtype),
            # + the workspace of deterministic mode's fixed-point dx
            _workspace(_deft_cuda.col2im_workspace_bytes(
                int(np.prod(chunk(x))), deterministic=bool(attrs["deterministic"]))))
    if r != offset.shape[-3]:
        raise ValueError(f"the CUDA col2im takes whole images: dcols {dcols.shape}")
    call = jax.ffi.ffi_call(_COLUMN_TARGETS[platform][1], outs, vmap_method="broadcast_all")
    return tuple(call(x, offset, mask, jnp.asarray(start, jnp.int32), dcols.astype(acc), **attrs)[:3])
