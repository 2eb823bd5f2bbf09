"""Layer benchmark: deft_jax native vs its pure-JAX gather reference vs a dense conv.

Runs on whatever device JAX finds (CPU works). It follows the "Performance protocol" of
DESIGN.md: for each layer shape and dtype, the forward and the forward+backward of

  deft  deft_jax.deform_conv2d(..., implementation=None)   the native kernel of the platform
  xla   deft_jax.deform_conv2d(..., implementation="xla")  the pure-JAX gather reference
  conv  lax.conv_general_dilated of the same shape          the dense floor

are timed side by side in one process. The headline is the ratios xla/deft (speed-up of the fused
kernel) and deft/conv (what deformability costs over a dense conv).

  device time  R iterations inside one jitted program (a while loop whose every iteration feeds a
               probe of its outputs back into all of its inputs), median over several runs, / R
  dispatch     wall time of one jitted call minus the device time (the host cost per call)
  temp bytes   jit(f).lower(...).compile().memory_analysis().temp_size_in_bytes
  floor        max(bytes / copy bandwidth, FLOPs / matmul rate), both measured in the same run

Usage:
  python benchmarks/bench_layers.py                       # --quick (default)
  python benchmarks/bench_layers.py --full --dtypes float32 --out out/bench
  python benchmarks/bench_layers.py --shapes S1,S3 --batch 2
  python benchmarks/bench_layers.py --markdown out/bench/results.json   # table for RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from statistics import median

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from tqdm import tqdm

import deft_jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMPLS = ("deft", "xla", "conv")
MODES = ("fwd", "fwdbwd")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
OFFSET_STD = 2.0  # pixels, DESIGN.md: offsets ~ N(0, 2^2)
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


@dataclasses.dataclass(frozen=True)
class Settings:
    """How hard to measure. iters=None picks R per case so one run lasts about target_s."""

    runs: int = 5
    iters: int | None = None
    target_s: float = 0.2
    max_iters: int = 200
    copy_mib: int = 256
    matmul_n: int = 4096


def quick_settings(on_cpu: bool) -> Settings:
    """--quick: few short runs; on CPU also a smaller copy and matmul for the machine rates."""
    if on_cpu:
        return Settings(runs=3, target_s=0.05, max_iters=50, copy_mib=64, matmul_n=1024)
    return Settings(runs=3, target_s=0.05)


# ----------------------------------------------------------------------------- the timed programs


def make_inputs(layer: Layer, dtype, key) -> dict[str, jax.Array]:
    """Fresh random inputs: x ~ N(0,1), offsets ~ N(0, 2^2) px, mask ~ U(0,1), kernel scaled so
    y ~ N(0,1)-ish, and a N(0,1) cotangent for the backward."""
    ho, wo = layer.out_hw
    taps = layer.kh * layer.kw
    kx, ko, km, kk, kc = jax.random.split(key, 5)
    arrays = {
        "x": jax.random.normal(kx, (layer.n, layer.h, layer.w, layer.cin)),
        "offset": OFFSET_STD * jax.random.normal(ko, (layer.n, ho, wo, 2 * taps)),
        "mask": jax.random.uniform(km, (layer.n, ho, wo, taps)),
        "kernel": jax.random.normal(kk, (layer.kh, layer.kw, layer.cin, layer.cout))
        / math.sqrt(taps * layer.cin),
        "cotangent": jax.random.normal(kc, (layer.n, ho, wo, layer.cout)),
    }
    return {k: v.astype(dtype) for k, v in arrays.items()}


def forward_fn(impl: str, layer: Layer):
    """(f, names): f maps the differentiable inputs `names`, in order, to the layer output."""
    if impl == "conv":
        def conv(x, kernel):
            return lax.conv_general_dilated(
                x, kernel, (layer.stride,) * 2, ((layer.pad,) * 2,) * 2,
                dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return conv, ("x", "kernel")

    implementation = {"deft": None, "xla": "xla"}[impl]

    def deform(x, offset, mask, kernel):
        return deft_jax.deform_conv2d(x, offset, kernel, mask, strides=layer.stride,
                                      padding=layer.pad, implementation=implementation)
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


def nudge(a: jax.Array, p: jax.Array) -> jax.Array:
    """a with PROBE_SCALE * p added to its first element: O(1) work, in place in a loop carry."""
    corner = (0,) * a.ndim
    first = lax.dynamic_slice(a, corner, (1,) * a.ndim)
    return lax.dynamic_update_slice(a, first + (PROBE_SCALE * p).astype(a.dtype), corner)


def make_loop(f):
    """jit(args, iters) -> scalar, running f(*args) `iters` times (iters is traced: one compile).

    Each iteration's outputs pass an optimization barrier (so XLA neither drops nor slices into
    the computation) and a probe of them nudges every input of the next iteration, so nothing in
    f is loop-invariant and every iteration really runs.
    """
    def body(_, args):
        p = probe(lax.optimization_barrier(f(*args)))
        return tuple(nudge(a, p) for a in args)

    @jax.jit
    def loop(args, iters):
        return probe(lax.fori_loop(0, iters, body, tuple(args)))
    return loop


def time_loop(f, args, settings: Settings) -> dict:
    """Device seconds per call of f: median over settings.runs runs of R calls in one program."""
    loop = make_loop(f)
    jax.block_until_ready(loop(args, 1))  # compile + warm-up
    iters = settings.iters
    if iters is None:
        t0 = time.perf_counter()
        jax.block_until_ready(loop(args, 1))
        once = time.perf_counter() - t0
        iters = int(min(settings.max_iters, max(2, round(settings.target_s / once))))
    runs = []
    for _ in range(settings.runs):
        t0 = time.perf_counter()
        jax.block_until_ready(loop(args, iters))
        runs.append((time.perf_counter() - t0) / iters)
    return {"time_s": median(runs), "run_times_s": runs, "iters": iters}


def time_call(f, args, runs: int) -> tuple[float, object]:
    """(median wall seconds of one blocked call of jit(f), its outputs), after a warm-up call."""
    jitted = jax.jit(f)
    outputs = jax.block_until_ready(jitted(*args))
    walls = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(jitted(*args))
        walls.append(time.perf_counter() - t0)
    return median(walls), outputs


def temp_bytes(f, args) -> int | None:
    """XLA's temporary buffer bytes for one call of f (None where the backend does not say)."""
    analysis = jax.jit(f).lower(*args).compile().memory_analysis()
    return None if analysis is None else int(analysis.temp_size_in_bytes)


# ----------------------------------------------------------------------------- machine rates


def measure_machine(dtypes: list[str], settings: Settings) -> dict:
    """Copy bandwidth (read + write of a big array) and matmul rate per dtype, on this device."""
    settings = dataclasses.replace(settings, iters=None)
    n_copy = settings.copy_mib * 2**20 // 4
    big = jax.random.normal(jax.random.key(1), (n_copy,), jnp.float32)
    copy_s = time_loop(lambda a: a + 1, (big,), settings)["time_s"]
    rates = {}
    for name in dtypes:
        m = settings.matmul_n
        a, b = (jax.random.normal(k, (m, m), DTYPES[name]) for k in jax.random.split(jax.random.key(2)))
        rates[name] = 2 * m**3 / time_loop(jnp.dot, (a, b), settings)["time_s"]
    trivial, _ = time_call(lambda s: s + 1, (jnp.float32(0),), 50)
    return {"copy_bytes_per_s": 2 * big.nbytes / copy_s, "copy_mib": settings.copy_mib,
            "matmul_flops_per_s": rates, "matmul_n": settings.matmul_n,
            "trivial_jit_call_us": trivial * 1e6}


# ----------------------------------------------------------------------------- one case


def rel_err(outputs, reference) -> float:
    """max over outputs of max|a - b| / max|b|, in float32."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(outputs), jax.tree.leaves(reference)):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        worst = max(worst, float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30)))
    return worst


def run_case(impl, mode, layer, dtype_name, inputs, machine, settings) -> tuple[dict, object]:
    """Measure one (implementation, mode) on prepared inputs -> (entry for results.json, outputs)."""
    f, names = case_fn(impl, mode, layer)
    args = tuple(inputs[k] for k in names)
    call_s, outputs = time_call(f, args, settings.runs)
    timing = time_loop(f, args, settings)
    moved = sum(a.nbytes for a in args) + sum(o.nbytes for o in jax.tree.leaves(outputs))
    flops = layer.flops * (3 if mode == "fwdbwd" else 1)
    floor_s = max(moved / machine["copy_bytes_per_s"],
                  flops / machine["matmul_flops_per_s"][dtype_name])
    entry = {
        "status": "ok",
        "time_us": timing["time_s"] * 1e6,
        "run_times_us": [t * 1e6 for t in timing["run_times_s"]],
        "iters": timing["iters"],
        "call_us": call_s * 1e6,
        "dispatch_us": (call_s - timing["time_s"]) * 1e6,
        "temp_bytes": temp_bytes(f, args),
        "bytes": moved,
        "flops": flops,
        "floor_us": floor_s * 1e6,
        "over_floor": timing["time_s"] / floor_s,
    }
    return entry, outputs


def benchmark(layers: list[Layer], dtypes: list[str], settings: Settings, seed: int = 0) -> dict:
    """Run every (layer, dtype, mode, implementation); returns the results.json dictionary.

    The native implementation may be missing on this platform: the op then raises, and its entries
    are marked "unavailable" with the error. Nothing is ever substituted for it.
    """
    machine = measure_machine(dtypes, settings)
    results = []
    key = jax.random.key(seed)
    cases = [(l, d, m, i) for l in layers for d in dtypes for m in MODES for i in ("xla", "deft", "conv")]
    inputs, reference = None, None
    for layer, dtype_name, mode, impl in tqdm(cases, desc="bench", unit="case", file=sys.stderr):
        if impl == "xla":  # first of its (layer, dtype, mode) group
            if mode == MODES[0]:
                key, sub = jax.random.split(key)
                inputs = make_inputs(layer, DTYPES[dtype_name], sub)
        base = {"shape": layer.name, "layer": dataclasses.asdict(layer), "dtype": dtype_name,
                "mode": mode, "impl": impl}
        if impl == "deft":
            try:
                entry, outputs = run_case(impl, mode, layer, dtype_name, inputs, machine, settings)
            except Exception as e:  # noqa: BLE001 - any failure of the native path is reported
                entry = {"status": "unavailable", "error": f"{type(e).__name__}: {e}"}
            else:
                entry["max_rel_err_vs_xla"] = rel_err(outputs, reference)
        else:
            entry, outputs = run_case(impl, mode, layer, dtype_name, inputs, machine, settings)
            if impl == "xla":
                reference = outputs
        results.append(base | entry)
    return {"meta": metadata(settings), "machine": machine, "results": results,
            "ratios": ratios(results)}


def ratios(results: list[dict]) -> list[dict]:
    """Per (shape, dtype, mode): xla/deft (speed-up) and deft/conv (deformable overhead)."""
    table = {}
    for r in results:
        table.setdefault((r["shape"], r["dtype"], r["mode"]), {})[r["impl"]] = r.get("time_us")
    out = []
    for (shape, dtype, mode), t in table.items():
        deft, xla, conv = t.get("deft"), t.get("xla"), t.get("conv")
        out.append({"shape": shape, "dtype": dtype, "mode": mode,
                    "xla_over_deft": xla / deft if deft and xla else None,
                    "deft_over_conv": deft / conv if deft and conv else None,
                    "xla_over_conv": xla / conv if xla and conv else None})
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
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "settings": dataclasses.asdict(settings), "offset_std_px": OFFSET_STD,
        "argv": sys.argv[1:],
    }


# ----------------------------------------------------------------------------- reporting


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
    header = ["shape", "layer", "dtype", "mode", "deft us", "xla us", "conv us", "xla/deft",
              "deft/conv", "temp MiB deft", "xla", "conv", "deft/floor", "conv/floor",
              "dispatch us deft", "deft err"]
    rows = []
    for shape, label, dtype, mode, e, q in _rows(data):
        rows.append([shape, label, dtype, mode, _time(e["deft"]), _time(e["xla"]), _time(e["conv"]),
                     _fmt(q["xla_over_deft"], "{:.2f}x"), _fmt(q["deft_over_conv"], "{:.2f}x"),
                     _mb(e["deft"]), _mb(e["xla"]), _mb(e["conv"]),
                     _fmt(e["deft"].get("over_floor"), "{:.1f}"),
                     _fmt(e["conv"].get("over_floor"), "{:.1f}"),
                     _fmt(e["deft"].get("dispatch_us")),
                     _fmt(e["deft"].get("max_rel_err_vs_xla"), "{:.1e}")])
    return header, rows


def machine_line(data: dict) -> str:
    m, meta = data["machine"], data["meta"]
    rates = ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in m["matmul_flops_per_s"].items())
    return (f"{meta['device']} ({meta['platform']}), jax {meta['jax']}, {meta['date_utc']}, "
            f"commit {(meta['git_commit'] or '?')[:10]}{' (dirty)' if meta['git_dirty'] else ''}; "
            f"copy {m['copy_bytes_per_s'] / 1e9:.1f} GB/s, matmul {rates}, "
            f"trivial jit call {m['trivial_jit_call_us']:.1f} us")


def unavailable_notes(data: dict) -> list[str]:
    """One loud line per distinct native failure."""
    errors = sorted({r["error"] for r in data["results"] if r["status"] != "ok"})
    return [f"!!! deft native implementation UNAVAILABLE on {data['meta']['platform']}: {e} "
            "(entries marked unavailable; nothing substituted)" for e in errors]


def print_table(data: dict) -> None:
    header, rows = table_rows(data)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    print(machine_line(data))
    if data["meta"].get("note"):
        print(data["meta"]["note"])
    print("  ".join(h.rjust(w) for h, w in zip(header, widths)))
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for line in unavailable_notes(data):
        print(line)


def markdown(data: dict) -> str:
    """The results as a markdown section for benchmarks/RESULTS.md."""
    header, rows = table_rows(data)
    lines = [f"### {data['meta']['device']} — {data['meta']['date_utc']}", "",
             machine_line(data) + ".", ""]
    if data["meta"].get("note"):
        lines += [data["meta"]["note"], ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    lines += [""] + [f"**{line}**" for line in unavailable_notes(data)]
    lines += ["Times are device time per call (us); `x/y` are time ratios; floor = max(bytes / copy "
              "bandwidth, FLOPs / matmul rate); dispatch = one jitted call's wall time minus device time; "
              "deft err = max relative difference to the xla reference over all outputs.", ""]
    return "\n".join(lines)


def plot(data: dict, path: str) -> None:
    """Bar chart of device time per shape/dtype, one panel per mode, log scale; one PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(MODES), figsize=(14, 4.5), squeeze=False)
    for ax, mode in zip(axes[0], MODES):
        groups = [(s, d, e) for s, _, d, m, e, _ in _rows(data) if m == mode]
        xs = np.arange(len(groups))
        for k, impl in enumerate(IMPLS):
            ys = [e[impl]["time_us"] if e[impl]["status"] == "ok" else np.nan for _, _, e in groups]
            ax.bar(xs + (k - 1) * 0.27, ys, 0.27, label=impl)
        ax.set_xticks(xs, [f"{s}\n{d}" for s, d, _ in groups], fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("device time per call (us)")
        ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward"}[mode])
        ax.legend()
    fig.suptitle(machine_line(data), fontsize=7)
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


CPU_QUICK_SHAPES = ("S1", "S3", "S6")
CPU_QUICK_BATCH = 1


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", default=True,
                      help="default: short runs; on CPU batch %d and shapes %s"
                      % (CPU_QUICK_BATCH, ",".join(CPU_QUICK_SHAPES)))
    size.add_argument("--full", action="store_true", help="the whole suite at its real batch sizes")
    p.add_argument("--shapes", help="comma-separated suite names, e.g. S1,S3 (%s)" % ",".join(SUITE))
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma-separated: float32,bfloat16")
    p.add_argument("--batch", type=int, help="override every shape's batch size")
    p.add_argument("--iters", type=int, help="fixed R per run (default: sized to the target time)")
    p.add_argument("--runs", type=int, help="runs per median")
    p.add_argument("--out", help="directory for results.json, results.md and bench_layers.png")
    p.add_argument("--markdown", metavar="RESULTS_JSON",
                   help="print an existing results.json as markdown and exit")
    return p.parse_args(argv)


def main(argv=None) -> dict | None:
    args = parse_args(argv)
    if args.markdown:
        with open(args.markdown) as fh:
            print(markdown(json.load(fh)))
        return None
    on_cpu = jax.default_backend() == "cpu"
    quick = not args.full
    settings = quick_settings(on_cpu) if quick else Settings()
    settings = dataclasses.replace(settings, **{k: v for k, v in
                                                (("iters", args.iters), ("runs", args.runs)) if v})
    names = args.shapes.split(",") if args.shapes else list(
        CPU_QUICK_SHAPES if quick and on_cpu else SUITE)
    unknown = [n for n in names if n not in SUITE]
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; the suite is {list(SUITE)}")
    dtypes = args.dtypes.split(",")
    if set(dtypes) - set(DTYPES):
        raise SystemExit(f"unknown dtypes {sorted(set(dtypes) - set(DTYPES))}; use {list(DTYPES)}")
    batch = args.batch or (CPU_QUICK_BATCH if quick and on_cpu else None)
    layers = [dataclasses.replace(SUITE[n], n=batch) if batch else SUITE[n] for n in names]
    note = (f"NOTE: batch scaled down to N={batch} (suite batch sizes are 8 and 32)"
            if batch else None)
    if note:
        print(note, file=sys.stderr)
    data = benchmark(layers, dtypes, settings)
    data["meta"].update(quick=quick, note=note)
    print_table(data)
    if args.out:
        write_outputs(data, args.out)
        print(f"wrote {args.out}/results.json, results.md, bench_layers.png")
    return data


if __name__ == "__main__":
    main()
