"""XLA's temporary memory (compiled memory_analysis) of the column route's forward and
forward+backward, and of the gather reference's, for several batch sizes on the default device:
whether the chunk chain keeps one chunk's columns alive (flat in the batch) with and without a
remainder chunk. Usage: python benchmarks/column_memory.py [--chunk 2] [--batches 8,16,64,63]"""
import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import deft_jax  # noqa: E402
from deft_jax import tiling  # noqa: E402
from helpers import Case, make_inputs, temp_bytes  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--chunk", type=int, default=2, help="images per chunk (cuda_chunk_images)")
    p.add_argument("--batches", default="8,16,64,63")
    a = p.parse_args()
    tiling.cuda_chunk_images = tiling.cpu_chunk_images = lambda shape: a.chunk
    tiling.cpu_forward_chunk_rows = lambda shape: a.chunk * shape.h_out  # CPU: whole images too
    tiling.cpu_backward_chunk_rows = lambda shape: 0
    case = Case(h=12, w=10, c_in=8, c_out=8)
    rng = np.random.default_rng(0)
    cols = case.out_hw()[0] * case.out_hw()[1] * 9 * case.c_in * 4
    print(f"{jax.devices()[0]}: one image's columns {cols} B, chunk {a.chunk}")
    for n in map(int, a.batches.split(",")):
        x, off, k, m = make_inputs(Case(**{**vars(case), "n": n}), rng, np.float32)
        dy = jnp.ones((n, *case.out_hw(), case.c_out), jnp.float32)

        def fwd(x, off, k, m, impl="columns"):
            return deft_jax.deform_conv2d(x, off, k, m, implementation=impl, **case.kwargs())

        def bwd(x, off, k, m, dy, impl="columns"):
            return jax.vjp(lambda *b: fwd(*b, impl=impl), x, off, k, m)[1](dy)
        row = [temp_bytes(fwd, x, off, k, m), temp_bytes(bwd, x, off, k, m, dy),
               temp_bytes(lambda *b: bwd(*b, impl="xla"), x, off, k, m, dy)]
        print(f"n={n:3d} temp bytes: columns fwd {row[0]:>9d}  fwd+bwd {row[1]:>9d}  reference fwd+bwd {row[2]:>9d}")


if __name__ == "__main__":
    main()
