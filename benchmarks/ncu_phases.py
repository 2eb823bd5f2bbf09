"""Where a kernel's instructions and stall samples go, by phase, from Nsight Compute's SASS page.

Input: the CSV of `ncu -i REPORT.ncu-rep --page source --csv --print-source sass` (a report taken
with `--section SourceCounters`; gzip accepted). For each kernel in it, prints the running share of
executed warp instructions and of warp-stall samples at every barrier, atomic, reduction, exit and
executed branch, so the phases between them can be read off (prologue, GEMM loop, merge, scatter).
  python benchmarks/ncu_phases.py sass.csv.gz [--kernel data]   (gpu_check.sh PHASES=sass writes it)
"""
import argparse
import csv
import gzip

MARKS = ("BAR.SYNC", "EXIT", "ATOMS", "RED", "SHFL", "CALL", "LDGSTS", "HMMA")


def kernels(path):
    """(name, header, rows) per kernel of the CSV; repeated launches of one kernel are kept once."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as fh:
        out, seen, cur = [], set(), None
        for row in csv.reader(fh):
            if row and row[0] == "Kernel Name":
                cur = None if row[1] in seen else [row[1], None, []]
                seen.add(row[1])
                if cur is not None:
                    out.append(cur)
            elif cur is not None:
                if cur[1] is None:
                    cur[1] = row
                else:
                    cur[2].append(row)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv")
    ap.add_argument("--kernel", default="", help="substring of the kernel name")
    args = ap.parse_args()
    for name, hdr, rows in kernels(args.csv):
        if args.kernel not in name:
            continue
        src, ex, st = hdr.index("Source"), hdr.index("Instructions Executed"), \
            hdr.index("Warp Stall Sampling (All Samples)")
        num = lambda v: float(v or 0)
        tot_ex = sum(num(r[ex]) for r in rows) or 1.0
        tot_st = sum(num(r[st]) for r in rows) or 1.0
        print(f"{name[:110]}\n  {tot_ex:.4g} warp instructions, {tot_st:.0f} stall samples")
        print(f"  {'line':>8} {'instr %':>8} {'stall %':>8} {'executed':>10}  instruction")
        cum_ex = cum_st = 0.0
        for i, r in enumerate(rows):
            cum_ex += num(r[ex])
            cum_st += num(r[st])
            text = r[src].strip()
            is_branch = "BRA" in text.split(";")[0].split()[:3] and num(r[ex]) > 0
            if any(m in text for m in MARKS) or is_branch:
                print(f"  {i:>8} {100 * cum_ex / tot_ex:8.1f} {100 * cum_st / tot_st:8.1f} "
                      f"{num(r[ex]):10.0f}  {text[:70]}")


if __name__ == "__main__":
    main()
