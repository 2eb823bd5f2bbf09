"""What the issue's speed targets demand, in units of the dense convolution of the same shape.

For each suite shape, the target time (the pure-JAX gather's time divided by the required
speed-up) is printed next to lax.conv's time from the same results.json, and next to deft_jax's
own. A ratio below 1x means the target asks the deformable layer to beat XLA's dense
convolution (cuDNN) of the same shape, which does the same GEMM without sampling.

  python benchmarks/target_floor.py benchmarks/results/h200_s12/results_52c503a.json
"""
import json
import sys

SHAPES = ("S1", "S2", "S3", "S4", "S5", "S6")
# (dtype, mode) -> required speed-up over the pure-JAX gather (issue 3's targets)
TARGETS = {("float32", "fwdbwd"): 4, ("bfloat16", "fwdbwd"): 15, ("float32", "fwd"): 2, ("bfloat16", "fwd"): 2}


def table(path: str) -> str:
    with open(path) as fh:
        data = json.load(fh)
    t = {(r["shape"], r["dtype"], r["mode"], r["impl"]): r["time_us"]
         for r in data["results"] if r.get("status") == "ok"}
    lines = ["| target | " + " | ".join(SHAPES) + " |", "|---" * (len(SHAPES) + 1) + "|"]
    for (dt, mode), k in TARGETS.items():
        cells = []
        for s in SHAPES:
            xla, conv, deft = (t.get((s, dt, mode, i)) for i in ("xla", "conv", "deft"))
            if None in (xla, conv, deft):
                cells.append("-")
                continue
            need = xla / k
            cells.append(f"{need:.0f} us = {need / conv:.2f}x conv (deft {deft / conv:.2f}x)")
        lines.append(f"| {mode} {dt}: xla / {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(table(p))
