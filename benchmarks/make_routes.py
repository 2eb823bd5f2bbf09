"""Write deft_jax/routes.json, the GPU's per-shape route table, from a bench_layers.py run.

bench_layers.py on a GPU times both routes of the native op side by side (implementation="fused"
and "columns", entries deft_fused / deft_columns), forward and forward+backward. For every
(shape, dtype) measured the table takes, per direction, the faster route:
  fwd  by the forward's time;
  bwd  by the backward's, forward+backward minus forward of the same route, where both routes'
       forward+backward ran; else by forward+backward; else as the forward ("basis" says which).
It keeps the times as the evidence and records the device and commit.
deft_jax.tiling.choose_route reads it; shapes it lacks take tiling.route_heuristic.

Usage:
  python benchmarks/make_routes.py out/bench/results.json            # writes deft_jax/routes.json
  python benchmarks/make_routes.py results.json --out /tmp/routes.json
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
ROUTES = {"deft_fused": "fused", "deft_columns": "columns"}


def table(results: dict) -> dict:
    times: dict[tuple, dict] = {}
    layers: dict[str, dict] = {}
    for r in results["results"]:
        if r["impl"] in ROUTES and r["status"] == "ok":
            times.setdefault((r["shape"], r["dtype"]), {})[(ROUTES[r["impl"]], r["mode"])] = r["time_us"]
            layers[r["shape"]] = r["layer"]
    rows = []
    for (shape, dtype), t in sorted(times.items()):
        both = {m: all((r, m) in t for r in ("fused", "columns")) for m in ("fwd", "fwdbwd")}
        if not both["fwd"]:
            continue
        layer = layers[shape]
        ho = (layer["h"] + 2 * layer["pad"] - layer["kh"]) // layer["stride"] + 1
        wo = (layer["w"] + 2 * layer["pad"] - layer["kw"]) // layer["stride"] + 1
        fwd = {r: t[(r, "fwd")] for r in ("fused", "columns")}
        route = {"fwd": min(fwd, key=fwd.get)}
        if both["fwdbwd"]:
            bwd = {r: t[(r, "fwdbwd")] - t[(r, "fwd")] for r in ("fused", "columns")}
            route["bwd"], basis = min(bwd, key=bwd.get), "fwdbwd-fwd"
        else:
            bwd, basis = None, "fwd"
            route["bwd"] = route["fwd"]
        rows.append({
            "shape": shape, "n": layer["n"], "h_out": ho, "w_out": wo, "c_in": layer["cin"],
            "c_out": layer["cout"], "taps": layer["kh"] * layer["kw"], "offset_groups": 1,
            "feature_groups": 1, "dtype": dtype,
            "fwd_us": {k: round(v, 1) for k, v in fwd.items()},
            "fwdbwd_us": {r: round(t[(r, "fwdbwd")], 1) for r in ("fused", "columns") if (r, "fwdbwd") in t},
            "bwd_us": bwd and {k: round(v, 1) for k, v in bwd.items()},
            "bwd_basis": basis, "route": route,
        })
    meta = results["meta"]
    return {
        "about": "GPU route per layer shape and direction (deft_jax.tiling.choose_route): the "
                 "faster route of the forward, and of the backward (forward+backward minus "
                 "forward; the forward's route where 'bwd_basis' is fwd), measured side by side by "
                 "benchmarks/bench_layers.py; written by benchmarks/make_routes.py",
        "device": meta["device"], "jax": meta["jax"], "commit": meta["git_commit"],
        "date_utc": meta["date_utc"], "routes": rows,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", help="results.json of a GPU bench_layers.py run")
    p.add_argument("--out", default=str(ROOT / "deft_jax" / "routes.json"))
    args = p.parse_args(argv)
    data = table(json.loads(pathlib.Path(args.results).read_text()))
    if not data["routes"]:
        print("no shape has both routes measured in that file (a GPU run?)", file=sys.stderr)
        return 1
    pathlib.Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    for r in data["routes"]:
        f, b = r["fwd_us"], r["bwd_us"]
        bwd = f"bwd {b['fused']:8.1f} / {b['columns']:8.1f}" if b else "bwd (as fwd)         "
        print(f"{r['shape']} {r['dtype']:9s} fwd {f['fused']:8.1f} / {f['columns']:8.1f} us  {bwd}"
              f"  (fused / columns)  -> fwd {r['route']['fwd']}, bwd {r['route']['bwd']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
