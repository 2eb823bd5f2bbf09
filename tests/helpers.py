"""Input factories and error metrics shared by the tests."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import accuracy
import deft_jax
from deft_jax import _ffi


@dataclasses.dataclass(frozen=True)
class Case:
    n: int = 2
    h: int = 7
    w: int = 6
    c_in: int = 4
    c_out: int = 6
    kernel_size: tuple = (3, 3)
    strides: tuple = (1, 1)
    padding: object = 1
    dilation: tuple = (1, 1)
    offset_groups: int = 1
    feature_groups: int = 1
    with_mask: bool = True
    offset_scale: float = 2.0

    def out_hw(self):
        if isinstance(self.padding, int):
            pads = ((self.padding,) * 2,) * 2
        elif self.padding == "SAME":
            return tuple(-(-s // st) for s, st in zip((self.h, self.w), self.strides))
        elif self.padding == "VALID":
            pads = ((0, 0), (0, 0))
        else:
            pads = self.padding
        return tuple((s + lo + hi - d * (k - 1) - 1) // st + 1 for s, (lo, hi), k, st, d in
                     zip((self.h, self.w), pads, self.kernel_size, self.strides, self.dilation))

    def kwargs(self):
        return dict(strides=self.strides, padding=self.padding, kernel_dilation=self.dilation,
                    feature_group_count=self.feature_groups)


def make_inputs(case: Case, rng, dtype=np.float64, off_grid=False):
    """(x, offset, kernel, mask) for `case`; offsets ~ N(0, scale^2), kept >= 0.05 px off the
    integer grid when `off_grid` (finite differences across a bilinear kink are meaningless)."""
    kh, kw = case.kernel_size
    taps = kh * kw
    ho, wo = case.out_hw()
    x = rng.normal(size=(case.n, case.h, case.w, case.c_in))
    off = rng.normal(size=(case.n, ho, wo, case.offset_groups * taps * 2)) * case.offset_scale
    if off_grid:
        off = np.floor(off) + rng.uniform(0.1, 0.9, size=off.shape)
    kernel = rng.normal(size=(kh, kw, case.c_in // case.feature_groups, case.c_out))
    kernel /= np.sqrt(taps * case.c_in / case.feature_groups)
    mask = rng.uniform(size=(case.n, ho, wo, case.offset_groups * taps)) if case.with_mask else None
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)
    return cast(x), cast(off), cast(kernel), cast(mask)


def oracle_offset(case: Case, off, dtype) -> jnp.ndarray:
    """float64 offsets for a float64 oracle of an op run in ``dtype``: the sample point the dtype's
    implementations form, fl32(base + offset) below float64, minus base (exact). A float32
    sample point within an ulp of an integer can round across it, where the bilinear gradient
    jumps: with this the oracle takes the same side (tests/accuracy.py, module docstring)."""
    pads = case.padding
    if isinstance(pads, int):
        pads = ((pads, pads), (pads, pads))
    cfg = accuracy.Config(n=case.n, h=case.h, w=case.w, c_in=case.c_in, c_out=case.c_out,
                          kernel_size=case.kernel_size, strides=case.strides, padding=pads,
                          dilation=case.dilation, offset_groups=case.offset_groups,
                          feature_groups=case.feature_groups, with_mask=case.with_mask)
    return jnp.asarray(accuracy.oracle_offsets(cfg, np.asarray(off, np.float64), dtype)[0])


@functools.lru_cache(maxsize=None)
def _oracle_program(case: Case):
    def run(args, dy):
        f = lambda x, off, k, *m: deft_jax.deform_conv2d(x, off, k, m[0] if m else None,
                                                         implementation="xla", **case.kwargs())
        y, vjp = jax.vjp(f, *args)
        return (y, *vjp(dy))
    return jax.jit(run)


def oracle_vjp(case: Case, args, dy, dtype) -> list[np.ndarray]:
    """The float64 oracle of an op run in ``dtype`` on ``args`` (x, offset, kernel[, mask], in
    ``dtype``) with cotangent ``dy``: (y, dx, doffset, dkernel[, dmask]) of the pure-JAX reference
    on the CPU, fed the same rounded inputs upcast and the dtype's sample points
    (oracle_offset), as float64 numpy arrays. One jitted program per case, compiled once per
    process: run op by op, the reference compiled each primitive anew for every new shape, ~8 s
    per case on 2 cores against ~1.7 s for the whole program, and the GPU tests take each case in
    three or more dtypes of the same float64 oracle shape. Only the reference is cached so: the
    native op reads tiling.choose_tiling at trace time, which tests monkeypatch."""
    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        up = [jax.device_put(jnp.asarray(a).astype(jnp.float64), cpu) for a in args]
        up[1] = jax.device_put(oracle_offset(case, up[1], dtype), cpu)
        dy64 = jax.device_put(jnp.asarray(dy).astype(dtype).astype(jnp.float64), cpu)
        return [np.asarray(o, np.float64) for o in _oracle_program(case)(up, dy64)]


def case_grads(case: Case, x, off, kernel, mask, dy, impl=None):
    """(y, dx, doffset, dkernel[, dmask]) of deform_conv2d on ``case``'s geometry for cotangent
    dy, with ``implementation=impl`` (mask None: DCNv1, no dmask)."""
    def f(*a):
        return deft_jax.deform_conv2d(a[0], a[1], a[2], a[3] if len(a) > 3 else None,
                                      implementation=impl, **case.kwargs())
    args = (x, off, kernel) + ((mask,) if mask is not None else ())
    y, vjp = jax.vjp(f, *args)
    return (y, *vjp(dy))


def rel_err(a, b):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def temp_bytes(f, *args) -> int:
    """XLA's temporary memory of jit(f) compiled for args on their device."""
    return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes


def worst_at(a, b) -> str:
    """Where rel_err's worst element is, and its values: for failure messages."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.size == 0:
        return "empty"
    i = np.unravel_index(np.argmax(np.abs(a - b)), a.shape)
    return f"at {tuple(int(v) for v in i)}: got {a[i]:.6g}, want {b[i]:.6g}, max|want| {np.max(np.abs(b)):.6g}"


def _gpu_device():
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        return None


GPU = _gpu_device()  # the first GPU, or None
HAS_GPU = GPU is not None and _ffi.cuda_available()
# For tests of the CUDA kernels: skipped without a GPU or the CUDA module (add pytest.mark.gpu).
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU and the deft_jax CUDA module")
