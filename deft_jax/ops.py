"""The public op: normalise and validate arguments, then pick the implementation."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from . import _autodiff, _ffi, reference, tiling

_FLOAT_DTYPES = tuple(jnp.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64))
_IMPLEMENTATIONS = (None, "xla", "fused", "columns")

PaddingLike = str | int | Sequence[int] | Sequence[tuple[int, int]]


@dataclasses.dataclass(frozen=True)
class Geometry:
    """Normalised, validated arguments of one call."""

    kernel_size: tuple[int, int]
    strides: tuple[int, int]
    padding: tuple[tuple[int, int], tuple[int, int]]
    kernel_dilation: tuple[int, int]
    feature_group_count: int
    offset_groups: int
    out_hw: tuple[int, int]


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, (int, np.integer)):
        pair = (int(value), int(value))
    else:
        try:
            pair = tuple(int(v) for v in value)
        except TypeError:
            raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}") from None
        if len(pair) != 2:
            raise ValueError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if min(pair) < 1:
        raise ValueError(f"{name}: must be positive, got {value!r}")
    return pair


def _padding(padding: PaddingLike, in_hw, kernel_size, strides, dilation):
    if isinstance(padding, str):
        if padding.upper() not in ("SAME", "VALID"):
            raise ValueError(f"padding: expected 'SAME', 'VALID', an int or pairs, got {padding!r}")
        dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, dilation)]
        return tuple(lax.padtype_to_pads(in_hw, dilated, strides, padding.upper()))
    if isinstance(padding, (int, np.integer)):
        padding = (int(padding), int(padding))
    try:
        items = list(padding)
        if len(items) == 2 and all(isinstance(p, (int, np.integer)) for p in items):
            pads = ((int(items[0]),) * 2, (int(items[1]),) * 2)
        elif len(items) == 2 and all(len(p) == 2 for p in items):
            pads = tuple((int(a), int(b)) for a, b in items)
        else:
            raise TypeError
    except TypeError:
        raise ValueError(
            "padding: expected 'SAME', 'VALID', an int, (ph, pw) or ((top, bottom), (left, right)), "
            f"got {padding!r}") from None
    if min(min(p) for p in pads) < 0:
        raise ValueError(f"padding: must be non-negative, got {padding!r}")
    return pads


def _check_array(a, name: str, expected: str):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
        raise ValueError(f"{name}: expected an array of shape {expected}, got {type(a).__name__}")
    if a.ndim != 4:
        raise ValueError(f"{name}: expected rank 4 {expected}, got shape {tuple(a.shape)}")
    if jnp.dtype(a.dtype) not in _FLOAT_DTYPES:
        raise ValueError(f"{name}: expected a floating dtype (float16, bfloat16, float32, float64), "
                         f"got {a.dtype}")


def validate(x, offset, kernel, mask, *, strides, padding, kernel_dilation,
             feature_group_count) -> Geometry:
    """Check every argument; raise ValueError naming the argument and the expected shape."""
    _check_array(x, "x", "[N, H, W, C_in]")
    _check_array(kernel, "kernel", "[kh, kw, C_in / feature_group_count, C_out]")
    _check_array(offset, "offset", "[N, H_out, W_out, G*kh*kw*2]")
    if mask is not None:
        _check_array(mask, "mask", "[N, H_out, W_out, G*kh*kw]")
    for name, a in (("offset", offset), ("kernel", kernel), ("mask", mask)):
        if a is not None and a.dtype != x.dtype:
            raise ValueError(f"{name}: dtype {a.dtype} differs from x's {x.dtype}; "
                             "cast all arrays to one dtype")
    if 0 in x.shape or 0 in kernel.shape:
        raise ValueError(f"x {tuple(x.shape)} and kernel {tuple(kernel.shape)} must have no zero-size axis")

    n, h, w, c_in = x.shape
    kh, kw, cig, c_out = kernel.shape
    strides = _pair(strides, "strides")
    dilation = _pair(kernel_dilation, "kernel_dilation")
    fg = int(feature_group_count)
    if fg < 1 or c_in % fg or c_out % fg:
        raise ValueError(f"feature_group_count: {feature_group_count} must be >= 1 and divide "
                         f"C_in={c_in} and C_out={c_out}")
    if cig != c_in // fg:
        raise ValueError(f"kernel: expected shape ({kh}, {kw}, {c_in // fg}, C_out) for C_in={c_in} "
                         f"and feature_group_count={fg}, got {tuple(kernel.shape)}")
    pads = _padding(padding, (h, w), (kh, kw), strides, dilation)
    spans = [size + lo + hi - d * (k - 1) - 1
             for size, (lo, hi), k, d in zip((h, w), pads, (kh, kw), dilation)]
    out_hw = tuple(span // s + 1 if span >= 0 else 0 for span, s in zip(spans, strides))
    if min(out_hw) < 1:
        raise ValueError(f"x: spatial size {(h, w)} with kernel {(kh, kw)}, dilation {dilation} and "
                         f"padding {pads} gives an empty output {out_hw}")
    ho, wo = out_hw
    taps = kh * kw
    oc = offset.shape[3]
    if offset.shape[:3] != (n, ho, wo) or oc % (2 * taps) or oc == 0:
        raise ValueError(f"offset: expected shape ({n}, {ho}, {wo}, G*{2 * taps}) for G offset groups, "
                         f"got {tuple(offset.shape)}")
    groups = oc // (2 * taps)
    if c_in % groups:
        raise ValueError(f"offset: {groups} offset groups (from {oc} channels) must divide C_in={c_in}")
    if mask is not None and tuple(mask.shape) != (n, ho, wo, groups * taps):
        raise ValueError(f"mask: expected shape ({n}, {ho}, {wo}, {groups * taps}) for {groups} offset "
                         f"group(s), got {tuple(mask.shape)}")
    return Geometry((kh, kw), strides, pads, dilation, fg, groups, out_hw)


# jax_default_matmul_precision values that let float32 dots use TF32 (or less), as XLA reads them.
_TF32_CONFIG = {"default", "fastest", "bfloat16", "tensorfloat32"}


def _allow_tf32(precision) -> bool:
    """TF32 only at DEFAULT precision (as lax.Precision means for float32 dots); precision=None
    follows jax.default_matmul_precision as lax.conv and jnp.dot do (e.g. "highest": exact float32)."""
    if precision is None:
        config = jax.config.jax_default_matmul_precision
        return config is None or str(config).lower() in _TF32_CONFIG
    ps = precision if isinstance(precision, (tuple, list)) else (precision,)
    return all(lax.Precision(p) == lax.Precision.DEFAULT for p in ps)


def _native_platforms() -> tuple[str, ...]:
    """The platforms a native call is traced for: the default backend's first, then every other
    platform whose module is built (CPU always, CUDA where nvcc was found), so that one
    ``jax.export`` for ("cpu", "cuda") lowers each platform's own call. Lowering for one platform
    keeps only its branch (lax.platform_dependent), so the extra trace costs no device work."""
    backend = jax.default_backend()
    if backend in ("gpu", "cuda") and not _ffi.cuda_available():
        raise RuntimeError(
            "deft_jax: the default backend is a GPU but the CUDA module was not built "
            "(no nvcc at install time). Reinstall with nvcc on PATH (DEFT_CUDA=ON pip install .), "
            "or pass implementation='xla' to use the pure-JAX reference explicitly.")
    if backend not in ("cpu", "gpu", "cuda"):
        raise RuntimeError(f"deft_jax: no native kernels for backend {backend!r}; "
                           "pass implementation='xla' to use the pure-JAX reference explicitly")
    built = ("cpu", "cuda") if _ffi.cuda_available() else ("cpu",)
    first = "cpu" if backend == "cpu" else "cuda"
    return (first, *(p for p in built if p != first))


# The GPU a CUDA call is tiled for when the tracing process has none (jax.export on a CPU host):
# an H100 (132 SMs, compute capability 9.0), the device the tiling rules were measured on.
_EXPORT_GPU = (132, 9)


def _gpu_model() -> tuple[int, int]:
    """(SM count, compute capability major) of the default GPU, or _EXPORT_GPU without one."""
    if jax.default_backend() not in ("gpu", "cuda"):
        return _EXPORT_GPU
    dev = jax.devices()[0]
    cc = str(getattr(dev, "compute_capability", "") or "")
    try:
        major = int(cc.split(".")[0])
    except ValueError:
        major = 0
    return int(getattr(dev, "core_count", 0) or 0), major


def native_op(x, kernel, geo: Geometry, with_mask: bool, precision, deterministic: bool = False,
              platform: str = "cpu", route: str | None = None) -> _autodiff.NativeOp:
    """The native calls of the forward and of the backward on `platform`, each on the route
    tiling.choose_route picks for its direction ("columns": sampler + XLA's dot + col2im, CPU and
    CUDA; "fused": the fused CUDA kernels, which also take ``deterministic``, or the CPU fused
    forward); one call serves both directions when they share a route. ``route``: the one the
    caller asked for (implementation="fused" / "columns"), or None."""
    n, _, _, c_in = x.shape
    shape = tiling.LayerShape(n=n, h_out=geo.out_hw[0], w_out=geo.out_hw[1], c_in=c_in,
                              c_out=kernel.shape[3], taps=geo.kernel_size[0] * geo.kernel_size[1],
                              offset_groups=geo.offset_groups,
                              feature_groups=geo.feature_group_count,
                              dtype=jnp.dtype(x.dtype).name)
    # The CPU forward's default route depends on the kernels OpenBLAS runs ("" if not loaded).
    blas_core = _ffi.blas_core() if platform == "cpu" and route is None else ""
    routes = [tiling.choose_route(platform, shape, bool(deterministic), route, d, blas_core)
              for d in tiling.DIRECTIONS]
    calls = {r: _route_call(r, platform, shape, geo, with_mask, precision, deterministic)
             for r in set(routes)}
    return _autodiff.NativeOp(*(calls[r] for r in routes))


def native_call(x, kernel, geo: Geometry, with_mask: bool, precision, deterministic: bool = False,
                platform: str = "cpu", route: str | None = None) -> _autodiff.NativeCall:
    """The forward's native call (see native_op): FFI attributes and output shape."""
    return native_op(x, kernel, geo, with_mask, precision, deterministic, platform, route).forward


def _attr_tuple(attrs: dict) -> tuple[tuple[str, int], ...]:
    """FFI attributes as NativeCall keeps them: sorted (name, int) pairs (hashable)."""
    return tuple(sorted((k, int(v)) for k, v in attrs.items()))


def _route_call(route: str, platform: str, shape: tiling.LayerShape, geo: Geometry,
                with_mask: bool, precision, deterministic: bool) -> _autodiff.NativeCall:
    """FFI attributes (geometry + the route's tiling or chunk) and output shape of one call."""
    (pt, pb), (pl, pr) = geo.padding
    attrs = dict(stride_h=geo.strides[0], stride_w=geo.strides[1], pad_top=pt, pad_bottom=pb,
                 pad_left=pl, pad_right=pr, dil_h=geo.kernel_dilation[0],
                 dil_w=geo.kernel_dilation[1], offset_groups=geo.offset_groups,
                 with_mask=int(with_mask))
    out_shape = (shape.n, *geo.out_hw, shape.c_out)
    if platform == "cpu" and route == "fused":
        attrs.update(feature_groups=geo.feature_group_count,
                     tile_pixels=tiling.cpu_tile_pixels(shape))
        return _autodiff.NativeCall(platform=platform,
                                    attrs=_attr_tuple(attrs),
                                    out_shape=out_shape, route="fused")
    if route == "columns":
        # The sampler's geometry; feature groups and precision are the dots'.
        # The CPU route is deterministic either way: one program for both settings there.
        attrs.update(kh=geo.kernel_size[0], kw=geo.kernel_size[1],
                     deterministic=int(bool(deterministic) and platform == "cuda"))
        bwd_rows = 0
        if platform == "cpu":
            chunk, chunk_rows = tiling.cpu_chunk_images(shape), tiling.cpu_forward_chunk_rows(shape)
            bwd_rows = tiling.cpu_backward_chunk_rows(shape)
        else:
            chunk = tiling.cuda_chunk_images(shape)
            chunk_rows = chunk * shape.h_out
        return _autodiff.NativeCall(platform=platform,
                                    attrs=_attr_tuple(attrs),
                                    out_shape=out_shape, route="columns", chunk=chunk,
                                    chunk_rows=chunk_rows, bwd_rows=bwd_rows,
                                    precision=_hashable_precision(precision))
    sm_count, cc = _gpu_model()
    tile = tiling.choose_tiling(platform, shape, sm_count, cc, deterministic=deterministic)
    # A ValueError at trace time (the CUDA module's own check where it is built), not a kernel error.
    tiling.check_gpu_tile(tile, shape.dtype, cc, compiled=_ffi.compiled_tile_error)
    attrs.update(feature_groups=geo.feature_group_count, allow_tf32=int(_allow_tf32(precision)),
                 deterministic=int(deterministic))
    attrs.update(tile.as_attrs())
    return _autodiff.NativeCall(platform=platform, attrs=_attr_tuple(attrs),
                                out_shape=out_shape, route="fused")


def _hashable_precision(precision):
    """precision as a static (hashable) value: a list of two becomes a tuple."""
    return tuple(precision) if isinstance(precision, list) else precision


def _native(x, offset, mask, kernel, ops: tuple[_autodiff.NativeOp, ...]):
    """The native op with one call per platform: lowering picks the platform's own branch."""
    if len(ops) == 1:
        return _autodiff.deform_conv2d(x, offset, mask, kernel, ops[0])
    branches = {op.platform: (lambda x, o, m, k, op=op: _autodiff.deform_conv2d(x, o, m, k, op))
                for op in ops}
    return lax.platform_dependent(x, offset, mask, kernel, **branches)


# Jitted so an eager call costs a cache lookup instead of retracing the custom_vjp / custom_vmap /
# custom_partitioning wrappers (~2.5 ms per call measured); inside an outer jit it is inlined.
_native_jit = jax.jit(_native, static_argnums=(4,))


def deform_conv2d(x: Any, offset: Any, kernel: Any, mask: Any = None, *,
                  strides: int | Sequence[int] = 1, padding: PaddingLike = 0,
                  kernel_dilation: int | Sequence[int] = 1, feature_group_count: int = 1,
                  precision: Any = None, implementation: str | None = None,
                  deterministic: bool = False) -> jax.Array:
    """Deformable 2D convolution (DCNv1, or DCNv2 when ``mask`` is given), NHWC / HWIO.

    Args:
      x: [N, H, W, C_in] input.
      offset: [N, H_out, W_out, G*kh*kw*2] sampling offsets in pixels; G offset groups are inferred
        from the size. Per group, taps are row-major (k = i*kw + j), per tap (dy, dx).
      kernel: [kh, kw, C_in / feature_group_count, C_out] weights (HWIO, as flax.linen.Conv).
      mask: [N, H_out, W_out, G*kh*kw] modulation, applied as given (no sigmoid inside), or None.
      strides: int or (sh, sw).
      padding: int, (ph, pw), ((top, bottom), (left, right)), 'SAME' or 'VALID'.
      kernel_dilation: int or (dh, dw).
      feature_group_count: grouped convolution, as in lax.conv_general_dilated.
      precision: lax.Precision for float32 inputs; TF32 tensor cores only at DEFAULT, or at None
        where jax.default_matmul_precision allows them (as for lax.conv).
      implementation: None for the native op of the platform, its route chosen per shape (CPU:
        the column route, a C++ sampler and col2im around XLA's dot, with the fused forward
        below for float32 layers with small kernels where OpenBLAS runs AVX-512 kernels; GPU:
        that route with CUDA kernels and cuBLAS, or the fused CUDA kernels, per
        tiling.choose_route); "columns" or "fused" to ask for one route: on GPU for both
        directions; on CPU "fused" is the fused forward (the sampler and a BLAS GEMM per tile of
        pixels, the tile's columns never leaving the core's cache; it needs OpenBLAS, the
        scipy-openblas32 dependency, else ValueError) with the column route's backward; or "xla"
        for the pure-JAX gather reference.
      deterministic: bitwise reproducible results on GPU: the forward and all four gradients are
        identical from run to run (same inputs, device model and build). Applies to the native
        implementation only (the reference's XLA scatter is not deterministic on GPU); combined
        with implementation="xla" it raises ValueError. On CPU it changes nothing: the CPU
        route is always deterministic run to run. On GPU either route keeps it (fused kernels:
        fixed-point backward, no split forward; column route: fixed-point col2im around XLA's
        dots). Costs on GPU: see "Determinism" below.

    Returns:
      y: [N, H_out, W_out, C_out] in x's dtype. Tap (i, j) of output (ho, wo) samples
      (ho*sh - pad_top + i*dh + dy, wo*sw - pad_left + j*dw + dx) bilinearly with zero padding,
      exactly as torchvision.ops.deform_conv2d with the channel axis last.

    Non-finite values: a NaN or infinity in an offset or mask entry reaches only what depends on
    it: y at its own output pixel, that tap's own doffset / dmask entries, dkernel, and, for a
    finite sample point, the <= 4 input pixels it samples; never other pixels of dx or y, never
    memory out of range. Precisely, for the sample point of one tap:

    - A NaN coordinate (NaN offset dy or dx): the tap's sampled value is NaN for every channel of
      its offset group, so y at that output pixel is NaN (in the output channels that read those
      input channels), the tap's doffset (both components) and dmask entries are NaN and so is
      dkernel where it multiplies those samples; dx receives nothing from the tap (there is no
      sample point, hence no input pixel). No integer is ever computed from a NaN coordinate.
    - An infinite or finite-but-huge coordinate (y <= -1, y >= H, x <= -1 or x >= W: +-inf,
      +-1e30, ...) is outside the image: the tap contributes exactly 0 to y and gets exactly 0
      gradient for offset, mask and x (torchvision's rule). The comparison comes before any
      float -> int conversion, so huge values never overflow an index.
    - A NaN or +-inf mask entry multiplies the tap's (finite) sample: y at that pixel becomes
      non-finite (inf * 0 = NaN where the sample is 0), and so may dx at the <= 4 input pixels
      the sample point reads, the tap's dmask and doffset entries, and dkernel; nothing else.
    - A non-finite pixel of x: a corner outside the image is selected out, never multiplied by 0,
      so it propagates exactly as in the reference (and torchvision).

    Determinism: on CPU the result is bitwise reproducible from run to run (the C++ sampler and
    col2im for any thread count too; XLA's own dots may round differently when the intra-op
    thread count changes, as in the pure-JAX reference). By default on GPU the gradients are
    accumulated with floating-point atomics, so they can differ in the last bits from run to run;
    so can the forward of layers whose tiling picks the split forward (few pixels, >= 256 output
    channels per group, e.g. 7x7 x 512: partial sums over taps meet in atomics). Other GPU
    forwards are reproducible. With ``deterministic=True`` the tiling never picks the split
    forward, and the backward accumulates every contribution in 64-bit fixed point (integer
    atomics, whose sum does not depend on their order) with one power-of-two scale per gradient
    taken from maxima of |x|, |dy|, |kernel| and |mask| (csrc/cuda/det.cuh): the rounding error
    is far below float32's, and NaN/inf reach exactly the elements they reach by default. On the
    column route only dx needs it (the col2im's scatter; the rest is XLA's dots, which are
    reproducible for one compiled program on one device model, and fixed-order reductions). It
    costs extra device memory in the backward (8 bytes per element of x, offset, mask and kernel
    on the fused route; of the chunk's dx on the column route) and time (the 64-bit atomics, a
    conversion pass). float64
    gradients are then limited to about 2^-61 of a worst-case bound per term, which is coarser
    than float64's own rounding: ~1e-10 to 1e-12 of the gradient's largest element on the
    benchmark layers (float32 and 16-bit gradients lose nothing visible).
    """
    if implementation not in _IMPLEMENTATIONS:
        raise ValueError(f"implementation: expected one of {_IMPLEMENTATIONS}, got {implementation!r}")
    if not isinstance(deterministic, (bool, np.bool_)):
        raise ValueError(f"deterministic: expected a bool, got {deterministic!r}")
    if deterministic and implementation == "xla":
        raise ValueError(
            "deterministic: True applies to the native implementation only; implementation='xla' "
            "(the pure-JAX reference) uses XLA's scatter, which is not deterministic on GPU. Use "
            "implementation=None with deterministic=True, or deterministic=False with 'xla' "
            "(XLA_FLAGS=--xla_gpu_deterministic_ops=true makes XLA's own ops deterministic).")
    if implementation == "fused" and jax.default_backend() == "cpu" and (why := _ffi.load_blas()):
        raise ValueError(f"implementation: 'fused' on CPU: {why}; implementation=None runs the "
                         "CPU's column route, which needs no BLAS")
    geo = validate(x, offset, kernel, mask, strides=strides, padding=padding,
                   kernel_dilation=kernel_dilation, feature_group_count=feature_group_count)
    if implementation == "xla":
        return reference.deform_conv2d(
            x, offset, kernel, mask, strides=geo.strides, padding=geo.padding,
            kernel_dilation=geo.kernel_dilation, feature_group_count=geo.feature_group_count,
            precision=precision)
    ops = tuple(native_op(x, kernel, geo, mask is not None, precision, bool(deterministic), p,
                          implementation)
                for p in _native_platforms())
    return _native_jit(x, offset, mask, kernel, ops)
