"""Accuracy oracle shared by tests/test_fuzz.py, tests/test_half_accuracy.py and benchmarks/fuzz_gpu.py.

What is compared
----------------
Inputs are drawn in float64, rounded to the dtype under test, and then every party sees exactly the
same rounded values: the native op and the same-dtype reference (``implementation="xla"``) get them
in the dtype, the oracle gets them widened to float64 (exact). The oracle is the reference run in
float64 (``precision=HIGHEST``) -- forward and the four cotangents of ``jax.vjp`` for a random
(dtype-rounded) cotangent ``dy``.

One adjustment, for dtypes that compute in float32 (float32, bfloat16, float16): the sample point
is part of the op's definition, and both implementations form it as ``p = fl32(base + offset)``
(``base`` the undeformed integer position; ``geometry.h``: ``A(base_y) + load_as<A>(off)``;
``reference.py``: ``base.astype(acc) + off``). The oracle is given ``offset' = p - base`` (exact in
float64), whose float64 sample point is that same ``p``. So the oracle, the native op and the
reference agree on every floor() (integer positions, image borders), and the bounds below only have
to cover the arithmetic, not a moved sample point (a rounded position is not an arithmetic error
proportional to the terms: at ``ly ~ 0`` it changes a small weight by a large relative amount).

Error bound (per output element)
--------------------------------
Notation: ``u(T)`` the unit roundoff of format T: 2^-53 (float64), 2^-24 (float32), 2^-11
(float16), 2^-8 (bfloat16); TF32 operands: 2^-10 -- TF32 keeps float16's 10 explicit mantissa
bits, so 2^-11 when rounded to nearest (the kernels' cvt.rna.tf32), but tensor cores fed unrounded
float32 (wgmma from shared memory, cuBLAS's TF32 dot) truncate, with relative error < 2^-10.
``u_acc`` that of the accumulation type (float64 for float64, float32 otherwise; DESIGN.md:
"accumulation in float32"), ``u_st`` that of the storage / operand type (the dtype, or TF32 for
float32 at DEFAULT precision on the GPU).

Every output is a sum of products of nonnegative bilinear weights with signed data. For y:
``y = sum_{k,c} W[k,c,o] * m_k * sum_corners w_corner * x[corner, c]``. Rounding a product term
``t`` to a format with unit roundoff u changes it by at most ``u |t|``, so a rounding anywhere on a
term's path, or of the final result, is bounded by ``u * S``, where ``S = sum |terms|``. Because
the bilinear weights are nonnegative, ``S`` is the float64 reference evaluated on the absolute
values: ``B_y = ref(|x|, offset', |W|, |m|)``. The same holds for the cotangents that are linear
in nonnegative weights: ``(B_dx, B_dW, B_dm) = vjp of the abs problem with |dy|`` (dx = sum of
``w * m * (dy . W)``, dW = sum of ``m * sample * dy``, dm = sum of ``(dy . W) * sample``).

The offset cotangent has signed coefficients (d sample / dy = sum_corners (+-)(1 - lx or lx) x_c), and
implementations legitimately form the blend in other algebraic forms (a lerp ``v0 + l (v1 - v0)``,
corner differences: csrc/cuda/backward.cuh), whose rounding errors are proportional to the
corner magnitudes, not to the weighted ones. Both are covered by the *corner bound*: the abs problem
evaluated with the sample point moved to each of its four integer corners (weight 1 there) and
summed, ``C_o = sum_{corner} abs_problem_o(offset -> corner)``. It bounds ``B_o``
(``sum_corner w_corner |x_c| <= sum_corner |x_c|``), and for the offset cotangent
``|m| * sum_c |dy . W|_c * sum_corner |d w_corner / d p| |x_c| <= |m| * C_dm`` (``|d w / d p| <= 1``),
so ``B_doffset := |m| * C_dm`` (repeated for dy and dx).

The tolerance of output o with reduction length n_o (terms summed into one element) is

    tol_o = c_st * u_st * B_o  +  (lambda * sqrt(n_o) + c_acc) * u_acc * C_o  +  atol

* ``c_st`` = roundings to the storage / operand type on one term's path (the model of each
  implementation, ``MODELS``), counted from the code:
  - native CPU route (csrc/cpu + XLA's dot): the sampled column is stored in the dtype (the dot's
    operand), the dot accumulates in float32, then the store: c_st = 2 (the same count as the GPU
    kernels); the column cotangent and dx stay in float32.
  - native GPU kernels (csrc/cuda): the sampled column is rounded to the MMA operand type (the
    forward's A operand, the weight pass's cols), grad_col stays in float32 (shared memory ``Cs`` of
    type A), then the store: c_st = 2. For float32 at DEFAULT precision both MMA operands are
    rounded to TF32 (column and kernel; dY and kernel; column and dY): c_st = 2 with u = 2^-10,
    the float32 store is in the c_acc term.
  - reference (deft_jax/reference.py) in a 16-bit dtype: its column is returned in the dtype, the
    einsum's transpose returns the column cotangent in the dtype, the corner cotangents are cast
    back to the dtype, then the store: c_st = 3; and its dx is JAX's transpose of the gather, a
    scatter-add *in the dtype* (``acc_in_storage``: the lambda sqrt(n) term uses u_st for dx).
* the float32 accumulation: n_o rounded additions. The worst case is gamma_n = n u / (1 - n u);
  we use the probabilistic bound of Higham & Mary (SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4):
  ``|error| <= lambda sqrt(n) u sum|terms|`` with probability >= 1 - 2n exp(-lambda^2 (1-u)^2 / 2)
  for independent rounding errors -- with lambda = 8 that fails with probability < 3e-14 n per
  element. ``c_acc`` = 8 covers the fixed number of float32 roundings per term (the weight products
  (1-ly)(1-lx), w * x, * m, * W, the blend's 3 additions).
* ``atol`` covers underflow: a rounding in the subnormal range is an absolute error of at most half
  the smallest subnormal (float16: 2^-25); (c_st + n_o) of them per element.

The constants are counts read off the algorithms, not fitted to observed errors. n_o: y:
4 K C_in/fg; dx: C_out/fg + 4 K H_out W_out (every tap of every pixel on one input pixel, worst case);
doffset, dmask: C_out/fg + 4 C_in/G; dW: N H_out W_out + 4.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import deft_jax
from deft_jax import reference

NAMES = ("y", "dx", "doffset", "dkernel", "dmask")
# Unit roundoffs: half the spacing of 1 and the next number (the task's "eps").
UNIT = {"float64": 2.0**-53, "float32": 2.0**-24, "tf32": 2.0**-10, "float16": 2.0**-11,
        "bfloat16": 2.0**-8}
SMALLEST_SUBNORMAL = {"float64": 2.0**-1074, "float32": 2.0**-149, "bfloat16": 2.0**-133,
                      "float16": 2.0**-24}
LAMBDA = 8.0
C_ACC = 8.0


@dataclasses.dataclass(frozen=True)
class Model:
    """How an implementation rounds: c_st roundings to the storage type per term; acc_in_storage
    names the outputs that accumulate in the storage type (the lambda sqrt(n) term uses u_st)."""
    c_st: float
    acc_in_storage: tuple = ()


MODELS = {
    "native-cpu": Model(c_st=2),
    "native-gpu": Model(c_st=2),
    "reference": Model(c_st=3, acc_in_storage=("dx",)),
}


def native_model() -> str:
    """The rounding model of the native op on jax's default backend."""
    return "native-gpu" if jax.default_backend() in ("gpu", "cuda") else "native-cpu"


def exact_precision():
    """precision for float32 runs that must not use TF32 (only the GPU has it; HIGHEST is
    harmless on the CPU, which ignores it)."""
    return lax.Precision.HIGHEST


OFFSET_KINDS = ("zero", "normal", "integer", "near_integer", "border", "huge")


# ------------------------------------------------------------------------------------ configs

@dataclasses.dataclass(frozen=True)
class Config:
    n: int = 2
    h: int = 7
    w: int = 6
    c_in: int = 3
    c_out: int = 5
    kernel_size: tuple = (3, 3)
    strides: tuple = (1, 1)
    padding: Any = ((1, 1), (1, 1))  # ((top, bottom), (left, right)), 'SAME' or 'VALID'
    dilation: tuple = (1, 1)
    offset_groups: int = 1
    feature_groups: int = 1
    with_mask: bool = True
    offset_mix: tuple = (0.0, 1.0, 0.0, 0.0, 0.0, 0.0)  # weights of OFFSET_KINDS
    offset_scale: float = 2.0  # std of the "normal" kind, px
    mask_kind: str = "unit"  # unit U(0,1), wide U(-0.5,1.5), binary {0, 0.5, 1}
    seed: int = 0

    def pads(self):
        if isinstance(self.padding, str):
            dil = [(k - 1) * d + 1 for k, d in zip(self.kernel_size, self.dilation)]
            return tuple(tuple(p) for p in lax.padtype_to_pads((self.h, self.w), dil, self.strides,
                                                                self.padding))
        return tuple(tuple(int(v) for v in p) for p in self.padding)

    def out_hw(self):
        return tuple(
            (s + lo + hi - d * (k - 1) - 1) // st + 1 if s + lo + hi - d * (k - 1) - 1 >= 0 else 0
            for s, (lo, hi), k, st, d in zip((self.h, self.w), self.pads(), self.kernel_size,
                                             self.strides, self.dilation))

    def kwargs(self):
        return dict(strides=self.strides, padding=self.padding, kernel_dilation=self.dilation,
                    feature_group_count=self.feature_groups)

    def taps(self):
        return self.kernel_size[0] * self.kernel_size[1]

    def short(self) -> str:
        mix = ",".join(f"{k}:{v:.2f}" for k, v in zip(OFFSET_KINDS, self.offset_mix) if v)
        return (f"x=({self.n},{self.h},{self.w},{self.c_in}) co={self.c_out} k={self.kernel_size} "
                f"s={self.strides} p={self.padding} d={self.dilation} G={self.offset_groups} "
                f"fg={self.feature_groups} mask={self.mask_kind if self.with_mask else None} "
                f"off=[{mix}]x{self.offset_scale:g} seed={self.seed}")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}

    @classmethod
    def from_json(cls, d: dict) -> "Config":
        """Inverse of to_json (a fuzz_gpu.py record's "config" -> the same inputs)."""
        tup = lambda v: tuple(tup(a) for a in v) if isinstance(v, list) else v
        return cls(**{k: tup(v) for k, v in d.items()})


def geometry_key(cfg: Config):
    """What a compilation depends on: everything but the data (offset mix, mask kind, seed)."""
    return dataclasses.replace(cfg, offset_mix=(), offset_scale=0.0, mask_kind="", seed=0)


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def min_extent(k, d, lo, hi):
    """Smallest input extent giving a non-empty output for explicit padding."""
    return max(1, d * (k - 1) + 1 - lo - hi)


def random_config(rng: np.random.Generator, *, max_c=9, max_hw=9, max_n=2, seed=None) -> Config:
    """One config of the fuzz space, from a numpy generator (benchmarks/fuzz_gpu.py; the pytest
    fuzzer draws the same space through hypothesis strategies)."""
    ks = [(1, 1), (1, 3), (3, 1), (3, 3), (2, 2), (3, 3), (2, 3), (5, 5)]
    kernel_size = ks[rng.integers(len(ks))]
    if kernel_size == (5, 5) and rng.uniform() < 0.5:
        kernel_size = (3, 3)  # 5x5 sparingly
    strides = tuple(int(v) for v in rng.integers(1, 4, 2))
    dilation = tuple(int(v) for v in rng.integers(1, 4, 2)) if rng.uniform() < 0.5 else (1, 1)
    r = rng.uniform()
    if r < 0.15:
        padding = "SAME"
    elif r < 0.25:
        padding = "VALID"
    else:
        padding = tuple(tuple(int(v) for v in rng.integers(0, 4, 2)) for _ in range(2))
    chans = [c for c in (1, 2, 3, 5, 6, 9, 16, 24, 32, 64, 72, 128, 256) if c <= max_c]
    c_in = int(rng.choice(chans))

    def group_count():  # 1 often; else small counts or the largest ones (c_in: one channel each)
        divs = divisors(c_in)
        return 1 if rng.uniform() < 0.4 else int(rng.choice(sorted(set(divs[:4] + divs[-2:]))))

    feature_groups = group_count()
    per_group = [1, 2, 3, 5, 7] + [c // feature_groups for c in chans
                                   if c % feature_groups == 0 and c >= 8 * feature_groups]
    per_group = [m for m in per_group if m * feature_groups <= max_c]
    c_out = feature_groups * int(rng.choice(per_group))
    offset_groups = group_count()
    hw = []
    for axis in range(2):
        k, d = kernel_size[axis], dilation[axis]
        lo, hi = (0, 0) if isinstance(padding, str) else padding[axis]
        m = 1 if padding == "SAME" else min_extent(k, d, lo, hi)
        hw.append(int(rng.integers(m, max(m, max_hw) + 1)))
    mix = np.zeros(len(OFFSET_KINDS))
    if rng.uniform() < 0.35:
        mix[rng.integers(len(OFFSET_KINDS))] = 1.0
    else:
        mix = rng.dirichlet(np.ones(len(OFFSET_KINDS)))
    return Config(n=int(rng.integers(1, max_n + 1)), h=hw[0], w=hw[1], c_in=c_in, c_out=c_out,
                  kernel_size=kernel_size, strides=strides, padding=padding, dilation=dilation,
                  offset_groups=offset_groups, feature_groups=feature_groups,
                  with_mask=bool(rng.uniform() < 0.7), offset_mix=tuple(float(v) for v in mix),
                  offset_scale=float(rng.choice([0.25, 1.0, 2.0, 4.0])),
                  mask_kind=str(rng.choice(["unit", "unit", "wide", "binary"])),
                  seed=int(rng.integers(2**31) if seed is None else seed))


# ------------------------------------------------------------------------------------ inputs

def base_positions(cfg: Config) -> np.ndarray:
    """[Ho, Wo, K, 2] undeformed sample positions (y, x) of every tap, taps row-major."""
    (pt, _), (pl, _) = cfg.pads()
    ho, wo = cfg.out_hw()
    kh, kw = cfg.kernel_size
    by = np.arange(ho)[:, None] * cfg.strides[0] - pt + np.arange(kh)[None, :] * cfg.dilation[0]
    bx = np.arange(wo)[:, None] * cfg.strides[1] - pl + np.arange(kw)[None, :] * cfg.dilation[1]
    by = np.broadcast_to(by[:, None, :, None], (ho, wo, kh, kw)).reshape(ho, wo, kh * kw)
    bx = np.broadcast_to(bx[None, :, None, :], (ho, wo, kh, kw)).reshape(ho, wo, kh * kw)
    return np.stack([by, bx], -1).astype(np.float64)


def draw_offsets(cfg: Config, rng: np.random.Generator) -> np.ndarray:
    """[N, Ho, Wo, G*K*2] float64 offsets, each entry drawn from the config's mixture of kinds:
    exactly 0; N(0, scale^2); integers (sample points on pixels: the floor's corner case);
    integers +- 2^-(4..21) (just off a pixel); points at or next to the image borders (-1, 0, H-1,
    H, +- 0 or 2^-(1..13)); huge (+-50 .. 1e4 px, far out of the image). Finite only."""
    ho, wo = cfg.out_hw()
    shape = (cfg.n, ho, wo, cfg.offset_groups, cfg.taps(), 2)
    base = base_positions(cfg)[None, :, :, None, :, :]
    size = np.array([cfg.h, cfg.w], np.float64)
    p = np.asarray(cfg.offset_mix, np.float64)
    kind = rng.choice(len(OFFSET_KINDS), size=shape, p=p / p.sum())
    sign = rng.choice([-1.0, 1.0], size=shape)
    integer = np.round(rng.normal(size=shape) * 3.0)
    near = integer + sign * 2.0 ** -rng.integers(4, 22, size=shape).astype(np.float64)
    edges = np.stack([np.full(shape, -1.0), np.zeros(shape), np.broadcast_to(size - 1, shape),
                      np.broadcast_to(size, shape)])
    edge = np.take_along_axis(edges, rng.integers(0, 4, size=shape)[None], 0)[0]
    nudge = rng.choice([-1.0, 0.0, 1.0], size=shape) * 2.0 ** -rng.integers(1, 14, size=shape)
    border = edge + nudge - base
    huge = sign * np.exp(rng.uniform(np.log(50.0), np.log(1e4), size=shape))
    choices = [np.zeros(shape), rng.normal(size=shape) * cfg.offset_scale, integer, near, border,
               huge]
    off = np.choose(kind, choices)
    return off.reshape(cfg.n, ho, wo, -1)


def draw_inputs(cfg: Config, dtype) -> dict[str, np.ndarray | None]:
    """float64 arrays already rounded to `dtype` (so the dtype cast of them is exact)."""
    rng = np.random.default_rng(cfg.seed)
    ho, wo = cfg.out_hw()
    kh, kw = cfg.kernel_size
    cig = cfg.c_in // cfg.feature_groups
    x = rng.normal(size=(cfg.n, cfg.h, cfg.w, cfg.c_in))
    off = draw_offsets(cfg, rng)
    kernel = rng.normal(size=(kh, kw, cig, cfg.c_out)) / math.sqrt(kh * kw * cig)
    mshape = (cfg.n, ho, wo, cfg.offset_groups * kh * kw)
    if not cfg.with_mask:
        mask = None
    elif cfg.mask_kind == "wide":
        mask = rng.uniform(-0.5, 1.5, size=mshape)
    elif cfg.mask_kind == "binary":
        mask = rng.choice([0.0, 0.5, 1.0], size=mshape)
    else:
        mask = rng.uniform(size=mshape)
    dy = rng.normal(size=(cfg.n, ho, wo, cfg.c_out))
    rnd = lambda a: None if a is None else np.asarray(jnp.asarray(a, dtype).astype(jnp.float64))
    return dict(x=rnd(x), offset=rnd(off), kernel=rnd(kernel), mask=rnd(mask), dy=rnd(dy))


def oracle_offsets(cfg: Config, off: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """(offset', floor position') in float64: offset' moves the float64 sample point to the one the
    dtype's implementations compute, fl_acc(base + offset) (module docstring)."""
    acc = np.float64 if jnp.dtype(dtype) == jnp.float64 else np.float32
    shape = off.shape
    base = base_positions(cfg)[None, :, :, None, :, :]
    o = off.reshape(cfg.n, *cfg.out_hw(), cfg.offset_groups, cfg.taps(), 2)
    pos = (base.astype(acc) + o.astype(acc)).astype(np.float64)
    return (pos - base).reshape(shape), (np.floor(pos) - base).reshape(shape)


# ------------------------------------------------------------------------------------ oracle

def _geometry(cfg: Config):
    return (cfg.strides, cfg.pads(), cfg.dilation, cfg.feature_groups)


@functools.lru_cache(maxsize=None)
def _oracle_fn(geometry):
    strides, pads, dilation, fg = geometry

    def one(x, off, k, m, dy):
        f = lambda x, off, k, m: reference.deform_conv2d(
            x, off, k, m, strides=strides, padding=pads, kernel_dilation=dilation,
            feature_group_count=fg, precision=lax.Precision.HIGHEST)
        y, vjp = jax.vjp(f, x, off, k, m)
        return (y, *vjp(dy))  # y, dx, doffset, dkernel, dmask

    return jax.jit(jax.vmap(one))


def oracle(cfg: Config, inp: dict, dtype, device=None) -> dict[str, dict[str, np.ndarray]]:
    """float64 oracle and the bounds B (abs problem at the sample points) and C (corner bound).

    Returns dict(want={name: array}, B={...}, C={...}); doffset's B is |m| * C_dm (docstring)."""
    return oracle_batch([cfg], [inp], dtype, device)[0]


def oracle_batch(cfgs: list[Config], inps: list[dict], dtype, device=None) -> list[dict]:
    """oracle() of configs of one geometry (geometry_key), in one call: 6 problems per config."""
    copies, masks = [], []
    for cfg, inp in zip(cfgs, inps):
        off_o, floor_o = oracle_offsets(cfg, inp["offset"], dtype)
        mask = inp["mask"] if inp["mask"] is not None else np.ones(
            (cfg.n, *cfg.out_hw(), cfg.offset_groups * cfg.taps()))
        ax, ak, am, ady = (np.abs(inp["x"]), np.abs(inp["kernel"]), np.abs(mask), np.abs(inp["dy"]))
        corners = []
        for cy in (0.0, 1.0):
            for cx in (0.0, 1.0):
                c = floor_o.reshape(*floor_o.shape[:-1], -1, 2) + np.array([cy, cx])
                corners.append(c.reshape(floor_o.shape))
        copies += [(inp["x"], off_o, inp["kernel"], mask, inp["dy"]), (ax, off_o, ak, am, ady)]
        copies += [(ax, c, ak, am, ady) for c in corners]
        masks.append(am)
    stacked = [np.stack(parts) for parts in zip(*copies)]
    fn = _oracle_fn(_geometry(cfgs[0]))
    if device is not None:
        stacked = jax.device_put(stacked, device)
    out = [np.asarray(a, np.float64) for a in fn(*stacked)]
    results = []
    for j, (inp, am) in enumerate(zip(inps, masks)):
        part = [a[6 * j:6 * j + 6] for a in out]
        want = {name: a[0] for name, a in zip(NAMES, part)}
        B = {name: a[1] for name, a in zip(NAMES, part)}
        C = {name: a[2:].sum(0) for name, a in zip(NAMES, part)}
        B["doffset"] = C["doffset"] = np.repeat(am * C["dmask"], 2, axis=-1)
        if inp["mask"] is None:
            for d in (want, B, C):
                d.pop("dmask")
        results.append(dict(want=want, B=B, C=C))
    return results


def reduction_lengths(cfg: Config) -> dict[str, int]:
    ho, wo = cfg.out_hw()
    k = cfg.taps()
    cig, cog = cfg.c_in // cfg.feature_groups, cfg.c_out // cfg.feature_groups
    cg = cfg.c_in // cfg.offset_groups
    return dict(y=4 * k * cig, dx=cog + 4 * k * ho * wo, doffset=cog + 4 * cg,
                dkernel=cfg.n * ho * wo + 4, dmask=cog + 4 * cg)


def tolerances(cfg: Config, orc: dict, dtype, model: str, operand: str | None = None) -> dict:
    """tol_o arrays (module docstring). operand overrides the storage/operand format (e.g. 'tf32')."""
    name = jnp.dtype(dtype).name
    u_st = UNIT[operand or name]
    u_acc = UNIT["float64"] if name == "float64" else UNIT["float32"]
    tiny = SMALLEST_SUBNORMAL[name] / 2
    mod = MODELS[model]
    lens = reduction_lengths(cfg)
    tol = {}
    for o in orc["want"]:
        n = lens[o]
        u_sum = u_st if o in mod.acc_in_storage else u_acc
        tol[o] = (mod.c_st * u_st * orc["B"][o] + LAMBDA * math.sqrt(n) * u_sum * orc["C"][o]
                  + C_ACC * u_acc * orc["C"][o] + (mod.c_st + n) * tiny)
    return tol


# ------------------------------------------------------------------------------------ runs

@functools.lru_cache(maxsize=None)
def _op_fn(kwargs_items, implementation, precision, with_mask, batched=False):
    kwargs = dict(kwargs_items)

    def run(x, off, k, m, dy):
        def f(x, off, k, *m):
            return deft_jax.deform_conv2d(x, off, k, m[0] if m else None, precision=precision,
                                          implementation=implementation, **kwargs)
        args = (x, off, k) + ((m,) if with_mask else ())
        y, vjp = jax.vjp(f, *args)
        g = vjp(dy)
        return (y, g[0], g[1], g[2]) + ((g[3],) if with_mask else ())

    # batched: configs of one geometry stacked on a leading axis (the op maps it to independent
    # problems in one native call).
    return jax.jit(jax.vmap(run) if batched else run)


def clear_caches():
    """Drop the compiled oracle / op functions (long runs over many geometries: bounded memory)."""
    _oracle_fn.cache_clear()
    _op_fn.cache_clear()
    jax.clear_caches()


def _hashable(v):
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(a) for a in v)
    return v


def run_op(cfg: Config, inp: dict, dtype, implementation=None, precision=None,
           device=None) -> dict[str, np.ndarray]:
    """Forward + the four cotangents of one implementation in `dtype`, as float64 numpy."""
    return _run(cfg, [inp], dtype, implementation, precision, device, batched=False)[0]


def run_op_batch(cfgs: list[Config], inps: list[dict], dtype, implementation=None, precision=None,
                 device=None) -> list[dict[str, np.ndarray]]:
    """run_op() of configs of one geometry (geometry_key), in one call."""
    return _run(cfgs[0], inps, dtype, implementation, precision, device, batched=True)


def _run(cfg, inps, dtype, implementation, precision, device, batched):
    items = tuple(sorted((k, _hashable(v)) for k, v in cfg.kwargs().items()))
    fn = _op_fn(items, implementation, precision, cfg.with_mask, batched)
    cast = lambda a: None if a is None else jnp.asarray(a, dtype)  # noqa: E731
    keys = ("x", "offset", "kernel", "mask", "dy")
    if batched:
        args = [None if inps[0][k] is None else cast(np.stack([i[k] for i in inps])) for k in keys]
    else:
        args = [cast(inps[0][k]) for k in keys]
    if device is not None:
        args = jax.device_put(args, device)
    out = fn(*args)
    names = ("y", "dx", "doffset", "dkernel") + (("dmask",) if cfg.with_mask else ())
    res = {}
    for name, a in zip(names, out):
        assert a.dtype == jnp.dtype(dtype), (name, a.dtype)
        res[name] = np.asarray(a.astype(jnp.float64) if a.dtype != jnp.float64 else a)
    if not batched:
        return [res]
    return [{name: a[j] for name, a in res.items()} for j in range(len(inps))]


@dataclasses.dataclass
class Verdict:
    name: str
    ok: bool
    max_ratio: float  # max |got - want| / tol (<= 1 passes)
    max_abs_err: float
    tol_at_worst: float
    want_at_worst: float
    got_at_worst: float
    index: tuple
    nonfinite: int

    def __str__(self):
        return (f"{self.name}: err/tol={self.max_ratio:.3g} |err|={self.max_abs_err:.3g} "
                f"tol={self.tol_at_worst:.3g} want={self.want_at_worst:.6g} "
                f"got={self.got_at_worst:.6g} at {self.index} nonfinite={self.nonfinite}")


def check(got: dict, want: dict, tol: dict) -> list[Verdict]:
    out = []
    for name in want:
        a, b, t = got[name], want[name], tol[name]
        assert a.shape == b.shape, (name, a.shape, b.shape)
        nonfinite = int(np.sum(~np.isfinite(a)))
        err = np.abs(a - b)
        err = np.where(np.isfinite(err), err, np.inf)
        ratio = err / np.maximum(t, np.finfo(np.float64).tiny)
        if ratio.size == 0:
            out.append(Verdict(name, True, 0.0, 0.0, 0.0, 0.0, 0.0, (), 0))
            continue
        i = np.unravel_index(np.argmax(ratio), ratio.shape)
        out.append(Verdict(name, bool(nonfinite == 0 and np.all(ratio <= 1.0)),
                           float(ratio[i]), float(err[i]), float(t[i]), float(b[i]), float(a[i]),
                           tuple(int(v) for v in i), nonfinite))
    return out
