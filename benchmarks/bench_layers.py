"""Layer benchmark: deft_jax native vs its pure-JAX gather reference vs a dense conv.

Runs on whatever device JAX finds (CPU works). It follows the project's performance protocol
(docs/kernels.md, "Measurements"): for each layer shape and dtype, the forward and the forward+backward of the
implementations in LEGEND are timed side by side in one process. The headline is the ratios
xla/deft (speed-up of the native op) and deft/conv (what deformability costs over a dense conv). On GPU the
forward+backward also runs as ``deft_det`` (``deterministic=True``, the bitwise reproducible mode;
columns "det us", "det/deft" and "det repro": two calls gave bitwise identical outputs).

Usage:
  python benchmarks/bench_layers.py                       # --quick (default); on CPU every suite
                                                          # shape at a CPU-sized batch (CPU_BATCH)
  python benchmarks/bench_layers.py --full --dtypes float32 --out out/bench
  python benchmarks/bench_layers.py --shapes S1,S3 --batch 2
  python benchmarks/bench_layers.py --markdown out/bench/results.json   # table for RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import textwrap
import time
from statistics import median

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

import deft_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("deft", "xla", "conv")  # always measured; "torch" too on CPU where torchvision imports
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

# What every column of the table means; printed once at the top of a run, in --help and under the
# markdown table.
LEGEND = """\
Columns (times are per call; ratios are time ratios):
  deft us      deft_jax.deform_conv2d(..., implementation=None): the native op of the platform
               (CPU: C++ column sampler + XLA's dot + C++ col2im; GPU: the route
               deft_jax.tiling.choose_route picks for the shape)
  fused us, columns us   (GPU) the two GPU routes forced: implementation="fused" (the fused CUDA
               kernels) and "columns" (CUDA sampler + cuBLAS via XLA's dot + CUDA col2im);
               (CPU, where OpenBLAS is installed) fused us only: implementation="fused", the CPU
               fused forward (sampler + OpenBLAS GEMM per tile; its backward is deft's)
  xla us       deft_jax.deform_conv2d(..., implementation="xla"): the pure-JAX gather reference
  conv us      lax.conv_general_dilated of the same shape: the dense floor (offset 0, no mask)
  torch us     torchvision.ops.deform_conv2d on the CPU (CPU runs where torch imports; NCHW; torch
               uses as many threads as JAX may)
  xla/deft     > 1: the native op beats the reference      deft/conv  cost over the dense conv
  torch/deft   > 1: the native op beats torchvision
  temp MiB     XLA's temporary buffers for one call: jit(f).lower(...).compile().memory_analysis()
               .temp_size_in_bytes, for deft / xla / conv (torch: not measured); deft's include its
               column chunk (CPU) or workspace (GPU): its native handlers allocate nothing sizable
               (the CPU fused forward: a tile's scratch per thread, ~0.5-1 MiB, not counted)
  deft/floor, conv/floor   time over max(bytes moved / copy bandwidth, FLOPs / matmul rate), both
               rates measured in the same run
  deft err, torch err      max over the outputs (y; and dx, doffset, dmask, dkernel for fwdbwd) of
               max|a - b| / max|b| against the xla reference
  fwd = forward; fwdbwd = forward and the gradients wrt every input (x, offset, mask, kernel; x and
  kernel for conv) through jax.vjp with a random cotangent.
Method: device time = R iterations inside one jitted program, (t(2R) - t(R)) / R, median over
runs, after compile and warm-up (torch: wall time of R calls / R, median over runs); dispatch = host
cost per call (trivial jitted call; eager and jitted forward of each implementation on a tiny layer).
"""
OFFSET_STD = 2.0  # pixels: the suite's offsets ~ N(0, 2^2)
# A probe of the outputs is scaled by this before it is added to one element of each input:
# nonzero as far as XLA can tell, so no iteration can be dropped or hoisted, yet x + 1e-30 * p
# rounds back to x for every |x| > 1e-23, so the values keep their scale (float32 and bfloat16
# share the exponent range; float16 would flush it to 0 and must not be used here).
PROBE_SCALE = 1e-30


@dataclasses.dataclass(frozen=True)
class Layer:
    """One deformable conv layer: NHWC input, HWIO kernel kh x kw, symmetric padding."""

    name: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    stride: int = 1
    kh: int = 3
    kw: int = 3
    pad: int = 1

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.h + 2 * self.pad - self.kh) // self.stride + 1,
                (self.w + 2 * self.pad - self.kw) // self.stride + 1)

    @property
    def flops(self) -> int:
        """Multiply-adds x 2 of the forward GEMM (the bilinear sampling is not counted)."""
        ho, wo = self.out_hw
        return 2 * self.n * ho * wo * self.cout * self.cin * self.kh * self.kw

    def label(self) -> str:
        s = f" s{self.stride}" if self.stride != 1 else ""
        return f"{self.n}x{self.h}x{self.w}x{self.cin}->{self.cout}{s}"


SUITE = {
    "S1": Layer("S1", 8, 64, 64, 64, 64),  # DefT's "realistic layer"
    "S2": Layer("S2", 32, 64, 64, 64, 64),
    "S3": Layer("S3", 32, 28, 28, 128, 128),
    "S4": Layer("S4", 32, 14, 14, 256, 256),
    "S5": Layer("S5", 32, 7, 7, 512, 512),
    "S6": Layer("S6", 32, 56, 56, 64, 128, stride=2),
}
# CPU-sized suite (the default on CPU): the suite's H, W and channels at 1/8 of its batch, so one
# run of every shape, both dtypes and both modes takes a few minutes on a 2-core CPU.
CPU_BATCH = {name: max(1, layer.n // 8) for name, layer in SUITE.items()}
DISPATCH_LAYER = Layer("tiny", 1, 8, 8, 8, 8)  # device time negligible next to the host's


@dataclasses.dataclass(frozen=True)
class Settings:
    """How hard to measure. iters=None picks R per case so one run lasts about target_s."""

    runs: int = 5
    iters: int | None = None
    target_s: float = 0.2
    min_iters: int = 1
    max_iters: int = 200
    copy_mib: int = 256
    matmul_n: int = 8192


def settings_for(quick: bool, on_cpu: bool) -> Settings:
    """--quick: three short runs, --full: five longer ones. On CPU the machine-rate probes are
    smaller (an 8192 matmul takes over 10 s on a 2-core CPU)."""
    settings = Settings(runs=3, target_s=0.05) if quick else Settings()
    return dataclasses.replace(settings, copy_mib=64, matmul_n=1024) if on_cpu else settings


# ----------------------------------------------------------------------------- the timed programs


def make_inputs(layer: Layer, dtype, rng: np.random.Generator) -> dict[str, jax.Array]:
    """Fresh random inputs: x ~ N(0,1), offsets ~ N(0, 2^2) px, mask ~ U(0,1), kernel scaled so
    y ~ N(0,1)-ish, and a N(0,1) cotangent for the backward. Drawn by numpy: jax.random would
    compile threefry for every shape (11 s on this CPU for a tiny layer)."""
    ho, wo = layer.out_hw
    taps = layer.kh * layer.kw
    normal = functools.partial(rng.standard_normal, dtype=np.float32)
    arrays = {
        "x": normal((layer.n, layer.h, layer.w, layer.cin)),
        "offset": OFFSET_STD * normal((layer.n, ho, wo, 2 * taps)),
        "mask": rng.random((layer.n, ho, wo, taps), dtype=np.float32),
        "kernel": normal((layer.kh, layer.kw, layer.cin, layer.cout)) / math.sqrt(taps * layer.cin),
        "cotangent": normal((layer.n, ho, wo, layer.cout)),
    }
    return {k: jax.device_put(v.astype(dtype)) for k, v in arrays.items()}


def forward_fn(impl: str, layer: Layer):
    """(f, names): f maps the differentiable inputs `names`, in order, to the layer output."""
    if impl == "conv":
        def conv(x, kernel):
            return lax.conv_general_dilated(
                x, kernel, (layer.stride,) * 2, ((layer.pad,) * 2,) * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv, ("x", "kernel")

    implementation = {"deft": None, "xla": "xla", DET_IMPL: None, **ROUTE_IMPLS}[impl]
    extra = {"deterministic": True} if impl == DET_IMPL else {}

    def deform(x, offset, mask, kernel):
        return deft_jax.deform_conv2d(x, offset, kernel, mask, strides=layer.stride,
                                      padding=layer.pad, implementation=implementation, **extra)
    return deform, ("x", "offset", "mask", "kernel")


def case_fn(impl: str, mode: str, layer: Layer):
    """(f, names): what one benchmark iteration computes, as a function of the inputs `names`.

    fwd: y.  fwdbwd: y and the gradients wrt every differentiable input (x, offset, mask and
    kernel; x and kernel for the dense conv) through jax.vjp with a random cotangent.
    """
    fwd, names = forward_fn(impl, layer)
    if mode == "fwd":
        return fwd, names

    def fwd_bwd(*args):
        *primals, cotangent = args
        y, vjp = jax.vjp(fwd, *primals)
        return (y, *vjp(cotangent))
    return fwd_bwd, names + ("cotangent",)


def probe(outputs) -> jax.Array:
    """A float32 scalar that depends on every output (one element of each)."""
    return sum(o.reshape(-1)[0].astype(jnp.float32) for o in jax.tree.leaves(outputs))


def nudge(a: jax.Array, first: jax.Array, p: jax.Array) -> jax.Array:
    """a with its first element set to first + PROBE_SCALE * p, where first is a's first element
    as it was before the loop: O(1) work, in place. (Reading the element from a itself made
    XLA:GPU copy a whole every iteration: the copy probe read 1.4 TB/s on an H100 instead of 2.7.)
    """
    return lax.dynamic_update_slice(a, first + (PROBE_SCALE * p).astype(a.dtype), (0,) * a.ndim)


def make_loop(f, unroll: bool):
    """jit(args, iters) -> scalar, running f(*args) `iters` times in one program.

    Each iteration's outputs pass an optimization barrier (so XLA neither drops nor slices into
    the computation) and a probe of them nudges every input of the next iteration, so nothing in
    f is loop-invariant and every iteration really runs. (A barrier alone is not enough: XLA:CPU
    expands barriers before CSE and loop-invariant code motion, which then dropped iterations.)
    A while loop (iters traced: one compile for every R) unless `unroll`: then iters is static
    and the R calls are straight-line code (lax.fori_loop(unroll=True) of one iteration still
    leaves a loop behind).
    """
    def body(_, carry):
        args, firsts = carry
        p = probe(lax.optimization_barrier(f(*args)))
        return tuple(nudge(a, first, p) for a, first in zip(args, firsts)), firsts

    def loop(args, iters):
        carry = (tuple(args), tuple(a[(slice(0, 1),) * a.ndim] for a in args))
        if unroll:
            for i in range(iters):
                carry = body(i, carry)
        else:
            carry = lax.fori_loop(0, iters, body, carry)
        return probe(carry[0])
    return jax.jit(loop, static_argnums=1 if unroll else ())


def time_loop(f, args, settings: Settings, once_s: float, unroll: bool = False) -> dict:
    """Device seconds per call of f.

    Each run times the whole program at R and at 2R iterations; (t(2R) - t(R)) / R cancels what
    every execution pays once (copying the inputs into the loop carry, first touch of freshly
    allocated buffers, dispatch), which would otherwise be charged to the op when R is small, as
    on CPU. The figure is the median over settings.runs runs, after compile and warm-up;
    time_min_s, from the fastest run of each length, resists other processes on a shared machine.
    R is settings.iters, or sized from once_s (a rough time of one call) to last target_s.
    """
    loop = make_loop(f, unroll)

    def wall(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(args, iters))
        return time.perf_counter() - t0

    iters = settings.iters or int(min(settings.max_iters,
                                      max(settings.min_iters, round(settings.target_s / once_s))))
    # A non-positive estimate means noise (other processes) exceeded R calls' worth of work: the
    # run is repeated at 4R, at most twice, rather than reporting a time that cannot be right.
    for attempt in range(3):
        wall(iters)  # compile + warm-up
        if unroll:  # one program per R
            wall(2 * iters)
        walls = [(wall(iters), wall(2 * iters)) for _ in range(settings.runs)]
        per_call = [(t_long - t_short) / iters for t_short, t_long in walls]
        shortest, longest = (min(w[i] for w in walls) for i in (0, 1))
        time_min = (longest - shortest) / iters
        if (median(per_call) > 0 and time_min > 0) or attempt == 2:
            break
        iters *= 4
    return {"time_s": median(per_call), "run_times_s": per_call, "iters": iters,
            "time_min_s": time_min, "walls_s": walls, "remeasured": attempt}


def single_call(f, args) -> tuple[object, float, int | None]:
    """(outputs of one call of jit(f), its wall seconds after compile, XLA's temporary bytes for it
    or None where the backend does not report them)."""
    compiled = jax.jit(f).lower(*args).compile()
    analysis = compiled.memory_analysis()
    temp = None if analysis is None else int(analysis.temp_size_in_bytes)
    t0 = time.perf_counter()
    outputs = jax.block_until_ready(compiled(*args))
    return outputs, time.perf_counter() - t0, temp


# ----------------------------------------------------------------------------- deterministic mode
# "deft det": the native op with deterministic=True, forward+backward, on GPU only (on CPU the
# flag changes nothing). Kept apart from the rest so the CPU parts of this file need not know it.

DET_IMPL = "deft_det"
DET_HEADER = ["det us", "det/deft", "det repro"]


def det_impls(mode: str) -> tuple[str, ...]:
    return (DET_IMPL,) if mode == "fwdbwd" and jax.default_backend() == "gpu" else ()


# On GPU each route of the native op also runs on its own (implementation="fused" / "columns"):
# the measurements behind deft_jax/routes.json (benchmarks/make_routes.py). On CPU the fused
# forward where its BLAS loads, forward only (deft is the column route there, and the fused
# forward's backward is deft's).
ROUTE_IMPLS = {"deft_fused": "fused", "deft_columns": "columns"}
ROUTE_HEADER = {"deft_fused": "fused us", "deft_columns": "columns us"}


def route_impls(mode: str) -> tuple[str, ...]:
    if jax.default_backend() == "gpu":
        return tuple(ROUTE_IMPLS)
    return ("deft_fused",) if mode == "fwd" and deft_jax._ffi.load_blas() == "" else ()


def _routes_run(data: dict) -> list[str]:
    """The forced routes a results.json has (both on GPU; on CPU the fused forward at most)."""
    ran = {r["impl"] for r in data["results"]}
    return [i for i in ROUTE_IMPLS if i in ran]


def route_cells(data: dict, entries: dict) -> list[str]:
    return [_time(entries[i]) if i in entries else "-" for i in _routes_run(data)]


def det_repro(layer, mode, inputs, outputs) -> bool:
    """Whether one more call of the deterministic case gives bitwise the outputs it gave first."""
    f, names = case_fn(DET_IMPL, mode, layer)
    again = jax.jit(f)(*(inputs[k] for k in names))
    return all(np.asarray(a).tobytes() == np.asarray(b).tobytes()
               for a, b in zip(jax.tree.leaves(outputs), jax.tree.leaves(again)))


def det_header(data: dict) -> list[str]:
    """The deterministic columns, where the results have any (GPU runs)."""
    return DET_HEADER if any(r["impl"] == DET_IMPL for r in data["results"]) else []


def det_cells(data: dict, entries: dict, ratio: dict) -> list[str]:
    if not det_header(data):
        return []
    e = entries.get(DET_IMPL)
    if e is None:
        return ["-"] * len(DET_HEADER)
    repro = e.get("bitwise_repro")
    return [_time(e), _fmt(ratio.get("det_over_deft"), "{:.2f}x"),
            "-" if repro is None else "yes" if repro else "NO"]


# ----------------------------------------------------------------------------- machine rates


def device_seconds(f, args, settings: Settings) -> float:
    """Device time of one call of f (see time_loop)."""
    _, once_s, _ = single_call(f, args)
    return time_loop(f, args, settings, once_s)["time_s"]


def measure_machine(dtypes: list[str], settings: Settings) -> dict:
    """Copy bandwidth (read + write of a big array) and matmul rate per dtype, on this device."""
    # Worth longer runs than the cases get, and R >= 4: the first call, which sizes R, also pays
    # for first-touching its output (64 MiB copy on CPU: 90 ms first, 17 ms per loop iteration).
    settings = dataclasses.replace(settings, iters=None, min_iters=4,
                                   target_s=max(settings.target_s, 0.2))
    rng = np.random.default_rng(1)
    big = jax.device_put(rng.standard_normal(settings.copy_mib * 2**20 // 4, dtype=np.float32))
    copy_s = device_seconds(lambda a: a + 1, (big,), settings)
    rates = {}
    for name in dtypes:
        m = settings.matmul_n
        a, b = (jax.device_put(rng.standard_normal((m, m), dtype=np.float32).astype(DTYPES[name]))
                for _ in range(2))
        rates[name] = 2 * m**3 / device_seconds(jnp.dot, (a, b), settings)
    return {"copy_bytes_per_s": 2 * big.nbytes / copy_s, "copy_mib": settings.copy_mib,
            "matmul_flops_per_s": rates, "matmul_n": settings.matmul_n,
            "dispatch_us": measure_dispatch()}


def wall_median(call, n: int = 20) -> float:
    """Median wall seconds of a blocked call(), after one warm-up call."""
    jax.block_until_ready(call())
    walls = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        walls.append(time.perf_counter() - t0)
    return median(walls)


def measure_dispatch() -> dict:
    """Host cost per call, on a layer so small that its device time is negligible: a trivial
    jitted call (JAX's dispatch), a jitted forward call of each implementation, and an eager one
    of deft and conv (eager minus jitted = the op's own Python work per call: validation,
    custom_vjp, binding; the eager reference would only count its dozens of primitives)."""
    scalar = jnp.float32(0)
    trivial = jax.jit(lambda s: s + 1)
    out = {"trivial_jit_call": wall_median(lambda: trivial(scalar)) * 1e6}
    inputs = make_inputs(DISPATCH_LAYER, jnp.float32, np.random.default_rng(3))
    for impl in IMPLS:
        f, names = forward_fn(impl, DISPATCH_LAYER)
        args = tuple(inputs[k] for k in names)
        jitted = jax.jit(f)
        try:
            out[f"{impl}_jit_call"] = wall_median(lambda: jitted(*args)) * 1e6
            if impl != "xla":
                out[f"{impl}_eager_call"] = wall_median(lambda: f(*args)) * 1e6
        except Exception:  # noqa: BLE001 - an unavailable native path shows up in the cases
            out[f"{impl}_jit_call"] = out[f"{impl}_eager_call"] = None
    return out


# ----------------------------------------------------------------------------- torchvision (CPU)


def torch_unavailable() -> str | None:
    """None where torchvision's deform_conv2d can run here, else why not."""
    try:
        import torch  # noqa: F401
        import torchvision.ops  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return f"{type(e).__name__}: {e}"
    return None


def _torch_threads() -> int:
    """As many threads as JAX's CPU client may use: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def run_torch_case(mode, layer, dtype_name, inputs, settings) -> tuple[dict, object]:
    """torchvision.ops.deform_conv2d on the CPU, on the same inputs (NCHW / OIHW, offsets and mask
    with their channel axis moved first, as the public contract says) -> (entry, outputs in
    the layout and order of the JAX cases, for the error check)."""
    import torch
    import torchvision.ops

    torch.set_num_threads(_torch_threads())
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]

    def tensor(a, perm, grad):
        t = torch.from_numpy(np.ascontiguousarray(np.asarray(a, np.float32).transpose(perm)))
        return t.to(tdtype).requires_grad_(grad)

    grad = mode == "fwdbwd"
    nchw, oihw = (0, 3, 1, 2), (3, 2, 0, 1)
    x, off, mask = (tensor(inputs[k], nchw, grad) for k in ("x", "offset", "mask"))
    w = tensor(inputs["kernel"], oihw, grad)
    dy = tensor(inputs["cotangent"], nchw, False)

    def call():
        y = torchvision.ops.deform_conv2d(x, off, w, stride=layer.stride, padding=layer.pad,
                                          mask=mask)
        if grad:
            for t in (x, off, mask, w):
                t.grad = None
            y.backward(dy)
        return y

    def wall(iters):
        t0 = time.perf_counter()
        for _ in range(iters):
            call()
        return time.perf_counter() - t0

    with torch.set_grad_enabled(grad):
        y = call()  # warm-up, and the outputs
        once = wall(1)
        iters = settings.iters or int(min(settings.max_iters,
                                          max(settings.min_iters, round(settings.target_s / once))))
        per_call = [wall(iters) / iters for _ in range(settings.runs)]
    to_nhwc, to_hwio = (0, 2, 3, 1), (2, 3, 1, 0)
    back = lambda t, perm: jnp.asarray(t.detach().float().numpy().transpose(perm))  # noqa: E731
    outputs = [back(y, to_nhwc)]
    if grad:
        outputs += [back(x.grad, to_nhwc), back(off.grad, to_nhwc), back(mask.grad, to_nhwc),
                    back(w.grad, to_hwio)]
    entry = {"status": "ok", "time_us": median(per_call) * 1e6,
             "run_times_us": [t * 1e6 for t in per_call], "time_min_us": min(per_call) * 1e6,
             "iters": iters, "threads": torch.get_num_threads(), "temp_bytes": None,
             "torch": torch.__version__}
    return entry, tuple(outputs)


# ----------------------------------------------------------------------------- one case


def rel_err(outputs, reference) -> float:
    """max over outputs of max|a - b| / max|b|, in float32."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(outputs), jax.tree.leaves(reference)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst


def run_case(impl, mode, layer, dtype_name, inputs, machine, settings) -> tuple[dict, object]:
    """Measure one (implementation, mode) on prepared inputs -> (results.json entry, outputs)."""
    f, names = case_fn(impl, mode, layer)
    args = tuple(inputs[k] for k in names)
    outputs, once_s, temp = single_call(f, args)
    # XLA:CPU leaves the backward convolutions inside a while loop in a form its fast (Eigen)
    # path does not take: measured 20x slower (310 vs 16 ms fwd+bwd at 1x64x64x64->64), so on
    # CPU the dense conv's R calls are unrolled instead.
    unroll = impl == "conv" and jax.default_backend() == "cpu"
    timing = time_loop(f, args, settings, once_s, unroll)
    moved = sum(a.nbytes for a in args) + sum(o.nbytes for o in jax.tree.leaves(outputs))
    flops = layer.flops * (3 if mode == "fwdbwd" else 1)
    floor_s = max(moved / machine["copy_bytes_per_s"],
                  flops / machine["matmul_flops_per_s"][dtype_name])
    entry = {
        "status": "ok",
        "time_us": timing["time_s"] * 1e6,
        "run_times_us": [t * 1e6 for t in timing["run_times_s"]],
        "time_min_us": timing["time_min_s"] * 1e6,
        "program_walls_us": [[t * 1e6 for t in pair] for pair in timing["walls_s"]],
        "iters": timing["iters"],
        "remeasured": timing["remeasured"],  # times R was raised 4x because noise made it <= 0
        "unrolled": unroll,
        "temp_bytes": temp,
        "bytes": moved,
        "flops": flops,
        "floor_us": floor_s * 1e6,
        "over_floor": timing["time_s"] / floor_s,
    }
    return entry, outputs


def benchmark(layers: list[Layer], dtypes: list[str], settings: Settings, seed: int = 0,
              torch: bool = True) -> dict:
    """Run every (layer, dtype, mode, implementation); returns the results.json dictionary.

    The native implementation may be missing on this platform: the op then raises, and its entries
    are marked "unavailable" with the error. Nothing is ever substituted for it. On CPU,
    torchvision's deform_conv2d runs too where it imports (marked "unavailable" where it cannot
    run a case, e.g. a dtype its CPU kernel lacks), unless ``torch`` is False.
    """
    meta = metadata(settings)
    machine = measure_machine(dtypes, settings)
    results = []
    rng = np.random.default_rng(seed)
    impls = ["xla", "deft", "conv"]  # the reference runs first in each group: its outputs check the others'
    torch_why = ("not asked for (--no-torch)" if not torch else
                 torch_unavailable() if jax.default_backend() == "cpu" else "not a CPU run")
    meta["torch"] = torch_why or "torchvision.ops.deform_conv2d on the CPU"
    if jax.default_backend() == "cpu":  # the CPU fused forward's GEMMs: which OpenBLAS kernels
        meta["cpu_fused_blas"] = deft_jax._ffi.load_blas() or f"OpenBLAS {deft_jax._ffi.blas_core()}"
    if torch_why is None:
        impls.append("torch")
    cases = [(layer, dtype, mode, impl) for layer in layers for dtype in dtypes for mode in MODES
             for impl in impls + list(route_impls(mode)) + list(det_impls(mode))]
    inputs, reference = None, None
    for layer, dtype_name, mode, impl in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        if impl == "xla" and mode == MODES[0]:
            inputs = make_inputs(layer, DTYPES[dtype_name], rng)
        base = {"shape": layer.name, "layer": dataclasses.asdict(layer), "dtype": dtype_name,
                "mode": mode, "impl": impl}
        if impl in ("deft", DET_IMPL, "torch", *ROUTE_IMPLS):
            try:
                if impl == "torch":
                    entry, outputs = run_torch_case(mode, layer, dtype_name, inputs, settings)
                else:
                    entry, outputs = run_case(impl, mode, layer, dtype_name, inputs, machine, settings)
            except Exception as e:  # noqa: BLE001 - any failure of the native path is reported
                entry = {"status": "unavailable", "error": f"{type(e).__name__}: {e}"}
            else:
                entry["max_rel_err_vs_xla"] = rel_err(outputs, reference)
                if impl == DET_IMPL:
                    entry["bitwise_repro"] = det_repro(layer, mode, inputs, outputs)
        else:
            entry, outputs = run_case(impl, mode, layer, dtype_name, inputs, machine, settings)
            if impl == "xla":
                reference = outputs
        results.append(base | entry)
    meta["load_average_end"] = os.getloadavg()
    return {"meta": meta, "machine": machine, "results": results, "ratios": ratios(results)}


def ratios(results: list[dict]) -> list[dict]:
    """Per (shape, dtype, mode): xla/deft (speed-up), deft/conv (deformable overhead), and
    torch/deft where torchvision ran."""
    table = {}
    for r in results:
        table.setdefault((r["shape"], r["dtype"], r["mode"]), {})[r["impl"]] = r.get("time_us")
    out = []
    for (shape, dtype, mode), t in table.items():
        deft, xla, conv, torch = t.get("deft"), t.get("xla"), t.get("conv"), t.get("torch")
        det = t.get(DET_IMPL)
        out.append({"shape": shape, "dtype": dtype, "mode": mode,
                    "det_over_deft": det / deft if det and deft else None,
                    "xla_over_deft": xla / deft if deft and xla else None,
                    "deft_over_conv": deft / conv if deft and conv else None,
                    "xla_over_conv": xla / conv if xla and conv else None,
                    "torch_over_deft": torch / deft if deft and torch else None})
    return out


def metadata(settings: Settings) -> dict:
    """Device, versions, date and commit for results.json."""
    def git(*cmd):
        try:
            return subprocess.run(["git", "-C", REPO, *cmd], capture_output=True, text=True,
                                  check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None
    device = jax.devices()[0]
    return {
        "device": device.device_kind, "platform": device.platform,
        "device_count": jax.device_count(), "host": platform.node(),
        "cpu_count": os.cpu_count(), "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"), "python": platform.python_version(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        # DEFT_GIT_COMMIT: the commit of a copied tree whose .git is stale (the GPU machine's).
        "git_commit": os.environ.get("DEFT_GIT_COMMIT") or git("rev-parse", "HEAD"),
        "git_dirty": (False if os.environ.get("DEFT_GIT_COMMIT")
                      else bool(git("status", "--porcelain", "--untracked-files=no"))),
        "load_average_start": os.getloadavg(),
        "settings": dataclasses.asdict(settings), "offset_std_px": OFFSET_STD,
        "argv": sys.argv[1:],
    }


# ----------------------------------------------------------------------------- reporting


def _impls(data: dict) -> list[str]:
    """The implementations in a results.json, in the table's order (torch only where it ran)."""
    present = {r["impl"] for r in data["results"]}
    return [i for i in (*IMPLS, "torch") if i in present]


def _fmt(v, spec="{:.1f}", missing="-") -> str:
    return missing if v is None else spec.format(v)


def _rows(data: dict):
    """Yield (shape, label, dtype, mode, {impl: entry}, ratio) per table row, in run order."""
    groups = {}
    for r in data["results"]:
        groups.setdefault((r["shape"], r["dtype"], r["mode"]), {})[r["impl"]] = r
    ratio = {(q["shape"], q["dtype"], q["mode"]): q for q in data["ratios"]}
    for key, entries in groups.items():
        layer = Layer(**next(iter(entries.values()))["layer"])
        yield key[0], layer.label(), key[1], key[2], entries, ratio[key]


def _time(entry: dict) -> str:
    return "UNAVAILABLE" if entry["status"] != "ok" else _fmt(entry["time_us"])


def _mb(entry: dict) -> str:
    return _fmt(entry.get("temp_bytes") and entry["temp_bytes"] / 2**20, "{:.2f}")


def table_rows(data: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the summary table (shared by the console and the markdown output)."""
    torch = "torch" in _impls(data)
    header = ["shape", "layer", "dtype", "mode", "deft us", "xla us", "conv us"]
    header += ["torch us"] if torch else []
    header += ["xla/deft", "deft/conv"] + (["torch/deft"] if torch else [])
    header += ["temp MiB deft", "xla", "conv", "deft/floor", "conv/floor", "deft err"]
    header += ["torch err"] if torch else []
    rows = []
    for shape, label, dtype, mode, e, q in _rows(data):
        t = e.get("torch")
        row = [shape, label, dtype, mode, _time(e["deft"]), _time(e["xla"]), _time(e["conv"])]
        row += [_time(t) if t else "-"] if torch else []
        row += [_fmt(q["xla_over_deft"], "{:.2f}x"), _fmt(q["deft_over_conv"], "{:.2f}x")]
        row += [_fmt(q.get("torch_over_deft"), "{:.2f}x")] if torch else []
        row += [_mb(e["deft"]), _mb(e["xla"]), _mb(e["conv"]),
                _fmt(e["deft"].get("over_floor"), "{:.1f}"),
                _fmt(e["conv"].get("over_floor"), "{:.1f}"),
                _fmt(e["deft"].get("max_rel_err_vs_xla"), "{:.1e}")]
        row += [_fmt((t or {}).get("max_rel_err_vs_xla"), "{:.1e}")] if torch else []
        rows.append(row + route_cells(data, e) + det_cells(data, e, q))
    routes = [ROUTE_HEADER[i] for i in _routes_run(data)]
    return header + routes + det_header(data), rows


def machine_line(data: dict) -> str:
    m, meta = data["machine"], data["meta"]
    rates = ", ".join(f"{k} {v / 1e12:.1f} TFLOP/s" if v >= 1e12 else f"{k} {v / 1e9:.1f} GFLOP/s"
                      for k, v in m["matmul_flops_per_s"].items())
    dispatch = ", ".join(f"{k.removesuffix('_call')} {_fmt(v)}"
                         for k, v in m["dispatch_us"].items())
    return (f"{meta['device']} ({meta['platform']}), jax {meta['jax']}, {meta['date_utc']}, "
            f"commit {(meta['git_commit'] or '?')[:10]}{' (dirty)' if meta['git_dirty'] else ''}; "
            f"load {meta['load_average_start'][0]:.1f} on {meta['cpu_count']} CPUs; "
            f"copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {rates}, "
            f"dispatch (us): {dispatch}"
            + (f"; fused us: {meta['cpu_fused_blas']}" if meta.get("cpu_fused_blas") else ""))


def unavailable_notes(data: dict) -> list[str]:
    """One loud line per distinct (implementation, failure)."""
    errors = sorted({(r["impl"], r["error"]) for r in data["results"] if r["status"] != "ok"})
    what = {"deft": "deft native implementation", "torch": "torchvision deform_conv2d"}
    return [f"!!! {what.get(impl, impl)} UNAVAILABLE on {data['meta']['platform']}: {e} "
            "(entries marked unavailable; nothing substituted)" for impl, e in errors]


def print_table(data: dict) -> None:
    """The machine line, the table and the failure notes (the legend and the batch note were
    printed once at the start of the run)."""
    header, rows = table_rows(data)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(machine_line(data))
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for line in unavailable_notes(data):
        print(line)


def markdown(data: dict) -> str:
    """The results as a markdown section for benchmarks/RESULTS.md: each note once, then the
    legend."""
    header, rows = table_rows(data)
    lines = [f"### {data['meta']['device']} — {data['meta']['date_utc']}", "",
             machine_line(data) + ".", ""]
    if data["meta"].get("note"):
        lines += [data["meta"]["note"], ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"**{line}**" for line in unavailable_notes(data)]
    lines += ["```", LEGEND.rstrip("\n"), "```", ""]
    return "\n".join(lines)


def plot(data: dict, path: str) -> None:
    """One PNG, a column per mode: device time per shape/dtype (top) and each implementation's
    time over the dense conv's (bottom, the table's deft/conv and what the gather costs), log
    scales."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(MODES), figsize=(14, 8), squeeze=False)
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16", "float64": "f64"}
    impls = _impls(data)
    for col, mode in enumerate(MODES):
        groups = [(s, label, d, e) for s, label, d, m, e, _ in _rows(data) if m == mode]
        xs = np.arange(len(groups))

        def time_of(e, impl):
            return e[impl]["time_us"] if impl in e and e[impl]["status"] == "ok" else np.nan
        for row, shown in enumerate((impls, [i for i in impls if i != "conv"])):
            ax = axes[row][col]
            width = 0.8 / len(shown)
            for k, impl in enumerate(shown):
                ys = [time_of(e, impl) / (time_of(e, "conv") if row else 1.0) for *_, e in groups]
                ax.bar(xs + (k - (len(shown) - 1) / 2) * width, ys, width, label=impl,
                       color=f"C{impls.index(impl)}")
            ax.set_xticks(xs, [f"{s}\n{short.get(d, d)}" for s, _, d, _ in groups], fontsize=8)
            ax.set_yscale("log")
            title = {"fwd": "forward", "fwdbwd": "forward + backward"}[mode]
            if row:
                ax.axhline(1.0, color="C2", linewidth=1)
                ax.set_ylabel("time / dense conv's time")
                ax.set_title(f"{title}: over the dense conv (1 = conv)")
            else:
                ax.set_ylabel("device time per call (us)")
                ax.set_title(title)
            ax.legend()
    layers = dict((s, label) for s, label, *_ in _rows(data))
    title = [textwrap.fill(machine_line(data), 190), textwrap.fill(data["meta"].get("note") or "", 190),
             "  ".join(f"{s}: {label}" for s, label in layers.items())]
    fig.suptitle("\n".join(filter(None, title)), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(data: dict, out_dir: str) -> None:
    """results.json, results.md and bench_layers.png in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "results.json"), "w") as fh:
        json.dump(data, fh, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as fh:
        fh.write(markdown(data))
    plot(data, os.path.join(out_dir, "bench_layers.png"))


# ----------------------------------------------------------------------------- command line


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog=LEGEND,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=True,
                      help="default: short runs; on CPU every suite shape at a CPU-sized batch "
                      "(%s)" % ", ".join(f"{k} {v}" for k, v in CPU_BATCH.items()))
    size.add_argument("--full", action="store_true", help="the whole suite at its real batch sizes")
    p.add_argument("--shapes", help="comma-separated suite names (%s)" % ",".join(SUITE))
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument("--batch", type=int, help="override every shape's batch size")
    p.add_argument("--iters", type=int, help="fixed R per run (default: sized to the target time)")
    p.add_argument("--runs", type=int, help="runs per median")
    p.add_argument("--column-chunk-images", type=int, metavar="N",
                   help="GPU column route: N images per chunk in both directions (default: "
                   "deft_jax.tiling.cuda_chunk_images, the 48 MiB budget)")
    p.add_argument("--no-torch", action="store_true",
                   help="CPU: leave torchvision's deform_conv2d out (its forward+backward takes "
                   "0.1-0.3 s a call)")
    p.add_argument("--out", help="directory for results.json, results.md and bench_layers.png")
    p.add_argument("--markdown", metavar="RESULTS_JSON",
                   help="print an existing results.json as markdown and exit")
    p.add_argument("--plot", nargs=2, metavar=("RESULTS_JSON", "PNG"),
                   help="draw an existing results.json as a bar chart and exit")
    return p.parse_args(argv)


def choose_layers(names: list[str], batch: int | None, cpu_sized: bool) -> tuple[list[Layer], str | None]:
    """The layers to run and the note that says how their batch differs from the suite's."""
    if batch:
        layers = [dataclasses.replace(SUITE[n], n=batch) for n in names]
        return layers, f"NOTE: batch set to N={batch} (suite: " + ", ".join(
            f"{n} {SUITE[n].n}" for n in names) + ")"
    if cpu_sized:
        layers = [dataclasses.replace(SUITE[n], n=CPU_BATCH[n]) for n in names]
        return layers, "NOTE: CPU-sized batches, 1/8 of the suite's: " + ", ".join(
            f"{n} {CPU_BATCH[n]} (suite {SUITE[n].n})" for n in names)
    return [SUITE[n] for n in names], None


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.markdown:
        with open(args.markdown) as fh:
            print(markdown(json.load(fh)))
        return None
    if args.plot:
        with open(args.plot[0]) as fh:
            plot(json.load(fh), args.plot[1])
        return None
    on_cpu = jax.default_backend() == "cpu"
    quick = not args.full
    settings = settings_for(quick, on_cpu)
    settings = dataclasses.replace(settings, **{k: v for k, v in
                                                (("iters", args.iters), ("runs", args.runs)) if v})
    names = args.shapes.split(",") if args.shapes else list(SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; the suite is {list(SUITE)}")
    dtypes = args.dtypes.split(",")
    if set(dtypes) - set(DTYPES):
        raise SystemExit(f"unknown dtypes {sorted(set(dtypes) - set(DTYPES))}; use {list(DTYPES)}")
    layers, note = choose_layers(names, args.batch, quick and on_cpu)
    if args.column_chunk_images:
        chunk = args.column_chunk_images
        deft_jax.tiling.cuda_chunk_images = lambda shape: chunk  # read at trace time
        note = "; ".join(filter(None, [note, f"NOTE: GPU column route in chunks of {chunk} images"]))
    print(LEGEND)
    if note:
        print(note)
    sys.stdout.flush()
    data = benchmark(layers, dtypes, settings, torch=not args.no_torch)
    data["meta"].update(quick=quick, note=note)
    print_table(data)
    if args.out:
        write_outputs(data, args.out)
        print(f"wrote {args.out}/results.json, results.md, bench_layers.png")
    return data


if __name__ == "__main__":
    main()
