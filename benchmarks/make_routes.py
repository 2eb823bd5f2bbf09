"""Write deft_jax/routes.json, the GPU's per-shape route table, from a bench_layers.py run.

bench_layers.py on a GPU times both routes of the native op side by side (implementation="fused"
and "columns", entries deft_fused / deft_columns). For every (shape, dtype) measured, the table
takes the route whose forward+backward was faster (training runs both; the route is one choice
per layer) or, where either route's forward+backward did not run, the faster forward ("basis"
says which), keeps the times as the evidence, and records the device and commit.
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
        basis = next((m for m in ("fwdbwd", "fwd") if ("fused", m) in t and ("columns", m) in t), None)
        if basis is None:
            continue
        layer = layers[shape]
        ho = (layer["h"] + 2 * layer["pad"] - layer["kh"]) // layer["stride"] + 1
        wo = (layer["w"] + 2 * layer["pad"] - layer["kw"]) // layer["stride"] + 1
        fused, columns = t[("fused", basis)], t[("columns", basis)]
        rows.append({
            "shape": shape, "n": layer["n"], "h_out": ho, "w_out": wo, "c_in": layer["cin"],
            "c_out": layer["cout"], "taps": layer["kh"] * layer["kw"], "offset_groups": 1,
            "feature_groups": 1, "dtype": dtype,
            "fwdbwd_us": {k: round(t[(k, "fwdbwd")], 1) for k in ("fused", "columns") if (k, "fwdbwd") in t},
            "fwd_us": {k: round(t[(k, "fwd")], 1) for k in ("fused", "columns") if (k, "fwd") in t},
            "basis": basis, "route": "columns" if columns < fused else "fused",
        })
    meta = results["meta"]
    return {
        "about": "GPU route per layer shape (deft_jax.tiling.choose_route): the faster of the two "
                 "routes in forward+backward, or in the forward where 'basis' says fwd, measured "
                 "side by side by benchmarks/bench_layers.py; written by benchmarks/make_routes.py",
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
        t = r[f"{r['basis']}_us"]
        print(f"{r['shape']} {r['dtype']:9s} {r['basis']:6s} fused {t['fused']:8.1f} us  columns "
              f"{t['columns']:8.1f} us  -> {r['route']}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
