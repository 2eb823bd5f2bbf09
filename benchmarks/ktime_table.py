"""Per-kernel durations from `ncu --csv --metrics gpu__time_duration.sum` of profile_bwd.py runs,
grouped per run (a run starts at its forward kernel, streaming or split, or its backward
data-pass kernel), as a
markdown table: python benchmarks/ktime_table.py ncu.log SPEC [SPEC ...]"""
import csv
import sys


def kernels(path):
    rows = []
    with open(path) as f:
        lines = [l for l in f if l.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") == "gpu__time_duration.sum":
            name = r["Kernel Name"].split("<")[0].replace("void ", "").split("::")[-1]
            if not name.startswith(("deform_", "convert_kernel")):
                continue  # XLA's own kernels that the name filter let through
            rows.append((name, float(r["Metric Value"].replace(",", "")) / 1e3))  # ns -> us
    return rows


def main(path, specs):
    runs, cur = [], None
    for name, us in kernels(path):
        if name in ("deform_fwd_kernel", "deform_fwd_split_kernel", "deform_bwd_data_kernel"):
            cur = {}
            runs.append(cur)
        if cur is not None:
            key = {"deform_fwd_kernel": "fwd", "deform_fwd_split_kernel": "fwd", "deform_bwd_data_kernel": "data",
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
    main(sys.argv[1], sys.argv[2:])
