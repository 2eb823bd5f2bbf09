"""Per-kernel durations from `ncu --csv --metrics gpu__time_duration.sum` of profile_bwd.py runs,
grouped per run (a run starts at its forward kernel, streaming, warp-specialized or split, or its backward
data-pass kernel, or the deterministic backward's scale kernel before it), as a markdown table:
  python benchmarks/ktime_table.py ncu.log SPEC [SPEC ...]
Two such tables side by side (runs present in both; after / before per kernel):
  python benchmarks/ktime_table.py --compare BEFORE.md AFTER.md"""
import csv
import sys


def kernels(path):
    rows = []
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            name = r["Kernel Name"].split("<")[0].replace("void ", "").split("::")[-1]
            if not name.startswith(("deform_", "convert_kernel", "det_")):
                continue  # XLA's own kernels that the name filter let through
            rows.append((name, float(r["Metric Value"].replace(",", "")) / 1e3))  # ns -> us
    return rows


COLUMNS = ("fwd", "data", "weight", "other", "total")


def read_table(path):
    """{run: {column: us}} from a table this script printed."""
    out = {}
    with open(path) as f:
        for line in f:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if len(cells) != 1 + len(COLUMNS) or cells[0] in ("run", "") or cells[0].startswith("---"):
                continue
            out[cells[0]] = {k: float(v) for k, v in zip(COLUMNS, cells[1:]) if v}
    return out


def compare(before_path, after_path):
    before, after = read_table(before_path), read_table(after_path)
    print("| run | " + " | ".join(f"{k} us" for k in COLUMNS) + " |")
    print("|---|" + "---|" * len(COLUMNS))
    for run, a in after.items():
        if run not in before:
            continue
        b = before[run]
        cells = [f"{b[k]:.1f} -> {a[k]:.1f} ({a[k] / b[k]:.2f}x)" if k in a and k in b else "" for k in COLUMNS]
        print(f"| {run} | " + " | ".join(cells) + " |")


def main(path, specs):
    runs, cur, scales_only = [], None, False
    for name, us in kernels(path):
        # The deterministic backward computes its scales (det_max_kernel) before its data pass: that
        # opens the run, and the data pass that follows stays in it.
        opens = name in ("deform_fwd_kernel", "deform_fwd_ws_kernel", "deform_fwd_split_kernel",
                         "deform_bwd_data_kernel", "det_max_kernel")
        if opens and not (scales_only and name == "deform_bwd_data_kernel"):
            cur = {}
            runs.append(cur)
        scales_only = name.startswith("det_") and (scales_only or name == "det_max_kernel")
        if cur is not None:
            key = {"deform_fwd_kernel": "fwd", "deform_fwd_ws_kernel": "fwd", "deform_fwd_split_kernel": "fwd", "deform_bwd_data_kernel": "data",
                   "deform_bwd_weight_kernel": "weight"}.get(name, "other")
            cur[key] = cur.get(key, 0.0) + us
    print("| run | fwd us | data us | weight us | other us | total us |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(runs):
        label = specs[i] if i < len(specs) else f"run {i}"
        cells = [f"{r[k]:.1f}" if k in r else "" for k in ("fwd", "data", "weight", "other")]
        print(f"| {label} | " + " | ".join(cells) + f" | {sum(r.values()):.1f} |")
    if len(runs) != len(specs):
        print(f"\nWARNING: {len(runs)} runs found for {len(specs)} specs")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--compare"] and len(sys.argv) == 4:
        compare(sys.argv[2], sys.argv[3])
    else:
        main(sys.argv[1], sys.argv[2:])
