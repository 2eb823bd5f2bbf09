"""Random-config fuzzing of the native CUDA op against the float64 reference on the same device.

For each of --configs random configs (a geometry: shapes, kernel size, strides, asymmetric
paddings / SAME / VALID, dilations, offset and feature groups, DCNv1/v2; and data: offsets mixed
from exactly 0, N(0, s^2), integers, integers +- 2^-k, image borders, +-50..1e4 px; masks U(0,1),
U(-0.5,1.5) or {0, 0.5, 1}) the native op runs forward + the four cotangents (jax.vjp with a random
cotangent) in float64, float32 at precision=HIGHEST (no TF32), float32 at DEFAULT precision (TF32
operands: u = 2^-11 rounded to nearest, 2^-10 where tensor cores truncate unrounded float32; the
bound uses 2^-10), bfloat16 and float16. Each is compared elementwise with the
pure-JAX reference in float64 on the same rounded inputs, against the type-derived bound of
tests/accuracy.py (its docstring has the derivation):

    tol = c_st u(operand type) B + (8 sqrt(n) + 8) u(acc) C + underflow allowance

GPU-sized shapes (channels up to 256, images up to 32x32, batch up to 4) are drawn for a fraction
(--big-fraction) of the geometries. Configs share geometries (--configs / --geometries data draws
per geometry) so that the XLA compilations stay a small part of the run, and --batch configs of a
geometry run in one call of the op and one of the oracle (per dtype and route), so that per-call
dispatch and transfers do too.

Never stops on one bad config: an exception is recorded as a crash and the run goes on. Writes a
JSON summary {configs, runs, mismatches: [...], crashes: [...], seconds, worst, ...} to --out and
exits 1 if any mismatch or crash. --max-seconds stops early (recorded as stopped_early, not a
failure) so the run fits the device machine's 10-minute command limit.

Run on the GPU machine from the repository root:
    python benchmarks/fuzz_gpu.py --configs 2000 --seed 0 --out $OUT/fuzz_gpu.json
and locally on the CPU handler (small, to check the script):
    python benchmarks/fuzz_gpu.py --platform cpu --configs 50 --out /tmp/fuzz_cpu.json
Re-run only the failing configs of an earlier summary (each record also holds its full config:
tests/accuracy.py Config.from_json(record["config"]) rebuilds it for a reproducer):
    python benchmarks/fuzz_gpu.py --replay fuzz_gpu.json --out fuzz_replay.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import resource
import sys
import time
import traceback

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the shared oracle and bounds: tests/accuracy.py

# (dtype, precision name, operand format of the bound); float32 twice: HIGHEST and DEFAULT (TF32).
RUNS = {
    "float64": ("float64", "HIGHEST", None),
    "float32-highest": ("float32", "HIGHEST", None),
    "float32-tf32": ("float32", "DEFAULT", "tf32"),
    "bfloat16": ("bfloat16", None, None),
    "float16": ("float16", None, None),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", type=int, default=2000, help="random configs (geometry + data)")
    p.add_argument("--geometries", type=int, default=None,
                   help="distinct geometries (default: configs / 40, at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="fuzz_gpu.json", help="JSON summary path")
    p.add_argument("--platform", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ",".join(RUNS))
    p.add_argument("--big-fraction", type=float, default=None,
                   help="fraction of GPU-sized geometries (default 0.25 on gpu, 0 on cpu)")
    p.add_argument("--big-max", default="256,32,4",
                   help="channels, image side, batch of the GPU-sized geometries (default 256,32,4)")
    p.add_argument("--oracle-device", choices=["same", "cpu"], default="same",
                   help="where the float64 reference runs (default: the native op's device)")
    p.add_argument("--routes", default="fused,columns",
                   help="GPU routes to check on every config (implementation=...); on CPU the "
                        "native op (implementation=None) whatever this says")
    p.add_argument("--check-reference", action="store_true",
                   help="also check the same-dtype reference (implementation='xla') against the bound")
    p.add_argument("--max-seconds", type=float, default=540.0,
                   help="stop drawing new configs after this long (0: no limit)")
    p.add_argument("--max-records", type=int, default=200, help="mismatches/crashes kept in the JSON")
    p.add_argument("--batch", type=int, default=8,
                   help="configs of one geometry evaluated per call (stacked on a leading axis, as "
                        "vmap gives the op); a batch that raises is re-run config by config, so a "
                        "crash names its config (1: one call per config)")
    p.add_argument("--replay", default=None,
                   help="a summary JSON of an earlier run: re-run only its failing configs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.platform == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    if args.platform == "cpu":
        jax.config.update("jax_platforms", "cpu")
    jax.config.update("jax_enable_x64", True)
    import numpy as np
    from jax import lax

    import accuracy as A
    from deft_jax import _ffi

    try:
        from tqdm import tqdm
    except ImportError:  # progress lines without tqdm
        tqdm = None

    if args.platform == "gpu":
        try:
            device = jax.devices("gpu")[0]
        except RuntimeError:
            print("no GPU visible to jax; use --platform cpu", file=sys.stderr)
            return 2
        if not _ffi.cuda_available():
            print("deft_jax was built without its CUDA module", file=sys.stderr)
            return 2
        model = "native-gpu"
        routes = [r for r in args.routes.split(",") if r]
        if any(r not in ("fused", "columns") for r in routes):
            print(f"--routes: expected fused and/or columns, got {args.routes!r}", file=sys.stderr)
            return 2
    else:
        device = jax.devices("cpu")[0]
        model = "native-cpu"
        routes = [None]
    oracle_device = jax.devices("cpu")[0] if args.oracle_device == "cpu" else device
    runs = [r for r in args.runs.split(",") if r]
    unknown = [r for r in runs if r not in RUNS]
    if unknown:
        print(f"unknown runs {unknown}; choose from {list(RUNS)}", file=sys.stderr)
        return 2
    if args.platform == "cpu":  # precision means nothing to the CPU handler (no TF32 there)
        runs = [r for r in runs if r != "float32-tf32"]
    big_fraction = args.big_fraction if args.big_fraction is not None else (
        0.25 if args.platform == "gpu" else 0.0)
    n_geo = max(1, args.geometries or args.configs // 40)
    n_geo = min(n_geo, max(1, args.configs))

    rng = np.random.default_rng(args.seed)
    geometries = []
    for _ in range(n_geo):
        if rng.uniform() < big_fraction:
            big_c, big_hw, big_n = (int(v) for v in args.big_max.split(","))
            geometries.append(A.random_config(rng, max_c=big_c, max_hw=big_hw, max_n=big_n))
        else:
            geometries.append(A.random_config(rng, max_c=9, max_hw=9, max_n=2))
    plan = []
    for i in range(args.configs):  # configs of one geometry are consecutive: compiled once
        geo = geometries[i * n_geo // max(1, args.configs)]
        mix = np.zeros(len(A.OFFSET_KINDS))
        if rng.uniform() < 0.35:
            mix[rng.integers(len(A.OFFSET_KINDS))] = 1.0
        else:
            mix = rng.dirichlet(np.ones(len(A.OFFSET_KINDS)))
        plan.append(dataclasses.replace(
            geo, offset_mix=tuple(float(v) for v in mix),
            offset_scale=float(rng.choice([0.25, 1.0, 2.0, 4.0])),
            mask_kind=str(rng.choice(["unit", "unit", "wide", "binary"])),
            seed=int(rng.integers(2**31))))
    if args.replay:  # only the configs that failed in an earlier summary, in its order
        old = json.loads(pathlib.Path(args.replay).read_text())
        seen, plan = set(), []
        for item in old.get("mismatches", []) + old.get("crashes", []):
            if "config" in item and item["short"] not in seen:
                seen.add(item["short"])
                plan.append(A.Config.from_json(item["config"]))
        n_geo = len(plan)
        print(f"replaying {len(plan)} configs from {args.replay}")

    mismatches, crashes = [], []
    worst: dict[str, dict[str, float]] = {}
    counts = dict(configs=0, runs=0, passed=0)
    state = dict(stopped_early=False, aborted=None)
    t0 = time.time()
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def write_summary(final: bool):
        """The JSON summary; also written every ~30 s, so a hard crash (segfault, device loss,
        the machine's time limit) still leaves the results so far (partial: true)."""
        summary = dict(
            configs=counts["configs"], configs_requested=args.configs, runs=counts["runs"],
            runs_passed=counts["passed"], geometries=n_geo, runs_per_config=runs,
            mismatches=mismatches, crashes=crashes, seconds=round(time.time() - t0, 1),
            partial=not final, stopped_early=state["stopped_early"], aborted=state["aborted"],
            seed=args.seed, batch=args.batch, platform=args.platform, device=str(device),
            oracle_device=str(oracle_device), model=model, check_reference=args.check_reference,
            worst_err_over_tol=worst, max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            jax=jax.__version__, argv=sys.argv[1:],
            bound=("tol = c_st u(operand) B + (8 sqrt(n) + 8) u(acc) C + underflow; "
                   f"c_st={A.MODELS[model].c_st} (tests/accuracy.py)"))
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(json.dumps(summary, indent=1, default=str))
        tmp.replace(out)

    # Off a terminal (the device machine's log) a progress line every 15 s, not every 0.1 s.
    bar = tqdm(total=len(plan), unit="cfg", smoothing=0.05,
               mininterval=0.1 if sys.stderr.isatty() else 15.0) if tqdm else None
    last_write, prev_geo, consecutive_crashes = time.time(), None, 0
    def record_verdicts(cfg, run, impl, verdicts):
        """Fold one config's verdicts into worst / mismatches; whether all passed."""
        key = run + "-" + (impl or "native")
        all_ok = True
        for v in verdicts:
            w = worst.setdefault(key, {})
            w[v.name] = max(w.get(v.name, 0.0), v.max_ratio if np.isfinite(v.max_ratio) else float("inf"))
            if not v.ok:
                all_ok = False
                if len(mismatches) < args.max_records:
                    mismatches.append(dict(config=cfg.to_json(), short=cfg.short(), run=key,
                                           implementation=impl, **dataclasses.asdict(v)))
                else:
                    mismatches.append(dict(run=key, name=v.name, truncated=True))
        return all_ok

    def evaluate(batch, run):
        """Every config of ``batch`` (one geometry) in ``run``: oracle and each implementation in
        one call each; returns per config whether all its checks passed (raises on any error,
        with the stage it was in as the exception's ``deft_stage``)."""
        dtype, prec_name, operand = RUNS[run]
        precision = None if prec_name is None else getattr(lax.Precision, prec_name)
        stage = "inputs"
        n = len(batch)
        if n < args.batch:  # padded to the others' size with copies of its last config: no recompile
            batch = batch + [batch[-1]] * (args.batch - n)
        try:
            inps = [A.draw_inputs(cfg, dtype) for cfg in batch]
            stage = "oracle"
            orcs = A.oracle_batch(batch, inps, dtype, device=oracle_device)
            impls = [(r, model) for r in routes] + ([("xla", "reference")] if args.check_reference else [])
            ok = [True] * len(batch)
            for impl, mdl in impls:
                stage = f"implementation={impl!r}"
                gots = A.run_op_batch(batch, inps, dtype, implementation=impl, precision=precision,
                                      device=device)
                for j, (cfg, got, orc) in enumerate(zip(batch[:n], gots, orcs)):
                    tol = A.tolerances(cfg, orc, dtype, mdl, operand=operand)
                    ok[j] = record_verdicts(cfg, run, impl, A.check(got, orc["want"], tol)) and ok[j]
            return ok[:n]
        except Exception as e:  # noqa: BLE001 - re-raised with its stage
            e.deft_stage = stage
            raise

    def record_crash(cfg, run, e):
        stage = getattr(e, "deft_stage", "?")
        if len(crashes) < args.max_records:
            crashes.append(dict(config=cfg.to_json(), short=cfg.short(), run=run, stage=stage,
                                error=f"{type(e).__name__}: {e}"[:2000],
                                traceback=traceback.format_exc()[-3000:]))
        else:
            crashes.append(dict(run=run, stage=stage, truncated=True, error=f"{type(e).__name__}: {e}"[:200]))

    # Batches: consecutive configs of one geometry, at most --batch of them.
    batches = []
    for cfg in plan:
        if batches and len(batches[-1]) < max(1, args.batch) and \
                A.geometry_key(batches[-1][0]) == A.geometry_key(cfg):
            batches[-1].append(cfg)
        else:
            batches.append([cfg])
    done = 0
    for batch in batches:
        if args.max_seconds and time.time() - t0 > args.max_seconds:
            state["stopped_early"] = True
            break
        geo = A.geometry_key(batch[0])
        if geo != prev_geo:  # the previous geometry's compiled functions are not needed again
            A.clear_caches()
            prev_geo = geo
        counts["configs"] += len(batch)
        crashed = [0] * len(batch)
        for run in runs:
            counts["runs"] += len(batch)
            try:
                ok = evaluate(batch, run)
            except Exception:  # noqa: BLE001 - one bad config must not end the run: find it
                ok = []
                for j, cfg in enumerate(batch):
                    try:
                        ok += evaluate([cfg], run)
                    except Exception as e:  # noqa: BLE001
                        crashed[j] += 1
                        ok.append(False)
                        record_crash(cfg, run, e)
            counts["passed"] += sum(ok)
        for c in crashed:
            consecutive_crashes = consecutive_crashes + 1 if c == len(runs) else 0
        done += len(batch)
        if bar is not None:
            bar.set_postfix_str(f"mism={len(mismatches)} crash={len(crashes)}", refresh=False)
            bar.update(len(batch))
        elif done % 40 < len(batch) or done == len(plan):
            print(f"{done}/{len(plan)} configs, {len(mismatches)} mismatches, "
                  f"{len(crashes)} crashes, {time.time() - t0:.0f}s", flush=True)
        if consecutive_crashes >= 25:  # e.g. a sticky CUDA error: every later call fails too
            state["aborted"] = f"{consecutive_crashes} consecutive configs crashed in every run"
            break
        if time.time() - last_write > 30:
            write_summary(final=False)
            last_write = time.time()
    if bar is not None:
        bar.close()

    seconds = time.time() - t0
    write_summary(final=True)
    print(f"{counts['configs']} configs ({counts['runs']} runs) in {seconds:.0f}s on {device}: "
          f"{len(mismatches)} mismatches, {len(crashes)} crashes"
          + (" (stopped early at --max-seconds)" if state["stopped_early"] else "")
          + (f" (ABORTED: {state['aborted']})" if state["aborted"] else "") + f"; summary: {out}")
    for key, w in sorted(worst.items()):
        print(f"  worst err/tol {key:>22}: " + " ".join(f"{k}={v:.3g}" for k, v in w.items()))
    for m in mismatches[:10]:
        if not m.get("truncated"):
            print(f"  MISMATCH {m['run']} {m['name']} err/tol={m['max_ratio']:.3g} "
                  f"|err|={m['max_abs_err']:.3g} tol={m['tol_at_worst']:.3g} :: {m['short']}")
    for c in crashes[:10]:
        if not c.get("truncated"):
            print(f"  CRASH {c['run']} at {c['stage']}: {c['error'][:300]} :: {c['short']}")
    return 1 if (mismatches or crashes) else 0


if __name__ == "__main__":
    sys.exit(main())
