"""The CPU column route (deft_jax/_columns.py around the C++ sampler and col2im): chunking over
images, extra memory independent of the batch, bitwise determinism across runs, processes and
thread counts, and every instruction-set build of the kernels."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import deft_jax
from deft_jax import _columns, _ffi, tiling
from helpers import Case, case_grads, make_inputs, rel_err, temp_bytes

PROBE = Path(__file__).with_name("cpu_columns_probe.py")
# The CPU route, also on a GPU machine (conftest.on_cpu).
pytestmark = pytest.mark.usefixtures("on_cpu")


def _assert_matches_reference(case, x, off, kernel, mask, dy):
    """The native op's output and gradients equal the reference's (float64)."""
    got = case_grads(case, x, off, kernel, mask, dy)
    want = case_grads(case, x, off, kernel, mask, dy, impl="xla")
    for a, b in zip(got, want):
        assert a.shape == b.shape and a.dtype == b.dtype
        assert rel_err(a, b) < 1e-10


@pytest.fixture
def chunk(monkeypatch):
    """Set the images per chunk of the CPU route (the forward's chunk: as many whole images'
    rows, unless ``rows`` is given; the backward in runs of ``bwd_rows`` rows if > 0)."""
    def set_chunk(images, rows=None, bwd_rows=0):
        monkeypatch.setattr(tiling, "cpu_chunk_images", lambda shape: images)
        monkeypatch.setattr(tiling, "cpu_forward_chunk_rows",
                            lambda shape: images * shape.h_out if rows is None else rows)
        monkeypatch.setattr(tiling, "cpu_backward_chunk_rows", lambda shape: bwd_rows)
    return set_chunk


@pytest.fixture
def unroll(monkeypatch):
    """Run the CPU route's chunks as the GPU does: a chain of steps instead of a loop."""
    def set_unrolled():
        loop = _columns._for_chunks
        monkeypatch.setattr(_columns, "_for_chunks", lambda n, b, step, carry, ins, unroll:
                            loop(n, b, step, carry, ins, True))
        jax.clear_caches()  # traces of the op made before the patch would be reused
    yield set_unrolled
    jax.clear_caches()

@pytest.mark.parametrize("case", [
    Case(n=5),  # two full chunks of 2 and a remainder of 1
    Case(n=5, with_mask=False, offset_groups=2, c_in=6, c_out=4),
    Case(n=4, feature_groups=2, c_in=4, c_out=6, strides=(2, 1), padding=((1, 0), (2, 1))),
])
@pytest.mark.parametrize("unrolled", [False, True])
def test_chunked_equals_reference(case, unrolled, chunk, unroll, rng):
    chunk(2)
    if unrolled:
        unroll()
    x, off, kernel, mask = make_inputs(case, rng)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    _assert_matches_reference(case, x, off, kernel, mask, dy)
    # The chunks are a loop in the program (or a chain of steps), each sampling 2 images.
    f = lambda *a: deft_jax.deform_conv2d(*a, **case.kwargs())  # noqa: E731
    hlo = jax.jit(f).lower(x, off, kernel, mask).as_text()
    assert ("while" in hlo) != unrolled and f"tensor<1x2x{case.out_hw()[0]}x" in hlo


@pytest.mark.parametrize("rows", [1, 3, 5, 12])
@pytest.mark.parametrize("unrolled", [False, True])
def test_forward_row_chunks(rows, unrolled, chunk, unroll, rng):
    """The forward's chunks as runs of output rows, within an image or across images (1, 3, 5
    rows of 7-row images: 35 rows in runs of 1, 3 (+ 2 first) or 5), or whole images (12 rows
    hold one 7-row image): y equals the reference's, and the gradients (whole-image chunks) are
    unaffected."""
    chunk(2, rows=rows)
    if unrolled:
        unroll()
    case = Case(n=5)  # 7 x 6 output pixels per image
    assert case.out_hw() == (7, 6)
    x, off, kernel, mask = make_inputs(case, rng)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    _assert_matches_reference(case, x, off, kernel, mask, dy)
    f = lambda *a: deft_jax.deform_conv2d(*a, **case.kwargs())  # noqa: E731
    hlo = jax.jit(f).lower(x, off, kernel, mask).as_text()
    cols = "1x1x7" if rows >= 7 else f"1x1x{_columns._chunk_size(35, 1, rows)}"
    assert f"tensor<{cols}x6x9x" in hlo


@pytest.mark.parametrize("bwd_rows", [1, 3, 5])
@pytest.mark.parametrize("case", [
    Case(n=3),
    Case(n=2, with_mask=False, offset_groups=2, c_in=6, c_out=4),
    Case(n=2, feature_groups=2, c_in=4, c_out=6, strides=(2, 1), padding=((1, 0), (2, 1))),
])
def test_backward_row_runs(bwd_rows, case, chunk, rng):
    """The backward in runs of rows of each image (an image over the budget): every gradient
    equals the reference's, and in float32 those of whole-image chunks to rounding (col2im adds
    the runs' terms in the whole image's order, but XLA's dots round the column cotangent and
    dkernel differently for another number of rows)."""
    x, off, kernel, mask = make_inputs(case, rng)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    chunk(1, bwd_rows=bwd_rows)
    _assert_matches_reference(case, x, off, kernel, mask, dy)
    f32 = [a.astype(jnp.float32) if a is not None else None for a in (x, off, kernel, mask, dy)]
    runs = case_grads(case, *f32)
    jax.clear_caches()
    chunk(1)
    whole = case_grads(case, *f32)
    jax.clear_caches()
    assert bool(jnp.all(runs[0] == whole[0]))  # y: the forward is not affected
    for a, b in zip(runs[1:], whole[1:]):
        assert rel_err(a, b) < 1e-5


def test_unrolled_chain_with_nan_first_elements(chunk, unroll, rng):
    """The chain reads each chunk's first result element to order the chunks: a NaN there (x[0]
    NaN makes y[0] and dkernel NaN) changes no other result."""
    chunk(2)
    unroll()
    case = Case(n=5)
    x, off, kernel, mask = make_inputs(case, rng)
    x = x.at[0, 0, 0, 0].set(jnp.nan)
    dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)))
    got = case_grads(case, x, off, kernel, mask, dy)
    want = case_grads(case, x, off, kernel, mask, dy, impl="xla")
    for a, b in zip(got, want):
        assert bool(jnp.all(jnp.isnan(a) == jnp.isnan(b)))
        fin = ~jnp.isnan(b)
        assert rel_err(jnp.where(fin, a, 0), jnp.where(fin, b, 0)) < 1e-10


def test_vmap_over_layers_with_chunks(chunk, rng):
    """Stacked problems share a chunk: 3 problems x 3 images in chunks of 2 // 3 -> 1 image."""
    chunk(2)
    case = Case(n=3)
    batches = [make_inputs(case, rng) for _ in range(3)]
    xs, offs, ks, ms = (jnp.stack(a) for a in zip(*batches))
    f = lambda x, o, k, m: deft_jax.deform_conv2d(x, o, k, m, **case.kwargs())  # noqa: E731
    loss = lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
    got = jax.vmap(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(xs, offs, ks, ms)
    for i, b in enumerate(batches):
        want = jax.value_and_grad(loss, argnums=(0, 1, 2, 3))(*b)
        for a, c in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert rel_err(a[i], c) < 1e-12


@pytest.mark.parametrize("unrolled", [False, True])
@pytest.mark.parametrize("with_mask", [True, False])
def test_extra_memory_does_not_grow_with_batch(with_mask, unrolled, chunk, unroll, rng, on_cpu):
    """XLA's temporary memory for the op and its gradient is the same for 4, 8 and 32 chunks'
    worth of images (at most twice that with a remainder chunk), while the reference's grows.
    ``unrolled``: the chunks as the GPU runs them (a chain of steps, not a loop), here on CPU."""
    chunk(2)
    if unrolled:
        unroll()
    case = Case(h=12, w=10, c_in=8, c_out=8, with_mask=with_mask)
    temps = {}
    for n in (8, 16, 64, 63):
        x, off, kernel, mask = make_inputs(Case(**{**vars(case), "n": n}), rng, np.float32)
        dy = jnp.zeros((n, *case.out_hw(), case.c_out), jnp.float32)
        args = (x, off, kernel) + ((mask,) if with_mask else ())

        def fwd(*a, impl=None):
            return deft_jax.deform_conv2d(a[0], a[1], a[2], a[3] if with_mask else None,
                                          implementation=impl, **case.kwargs())
        bwd = lambda *a, impl=None: jax.vjp(lambda *b: fwd(*b, impl=impl), *a[:-1])[1](a[-1])  # noqa: E731
        temps[n] = (temp_bytes(fwd, *args), temp_bytes(bwd, *args, dy),
                    temp_bytes(lambda *a: bwd(*a, impl="xla"), *args, dy))
    if unrolled:
        # The chain keeps one chunk's columns alive, not one per chunk: what grows with the batch
        # (a copy of the op's results, y or dx/doffset/dmask, that XLA:CPU makes at the chain's
        # end) stays under half an image's columns per image. Full chunks only: with a remainder
        # chunk (63 images) jax 0.11.2's XLA:CPU copies more of the backward (2.3 MB at 63 images
        # vs 0.85 MB at 64); on the GPU, whose chain this stands for, test_gpu checks 63 too.
        ho, wo = case.out_hw()
        half_columns = ho * wo * 9 * case.c_in * 4 // 2
        for n in (16, 64):
            for d in (0, 1):
                assert temps[n][d] - temps[8][d] < (n - 8) * half_columns, (d, temps)
    else:
        for n in (16, 64):
            assert temps[n][0] == temps[8][0], temps  # forward
            assert temps[n][1] == temps[8][1], temps  # forward + backward
        # With a remainder the program holds a chunk of another size too: at most twice as much.
        assert temps[63][0] <= 2 * temps[8][0] and temps[63][1] <= 2 * temps[8][1], temps
    assert temps[64][2] > 4 * temps[8][2]  # the reference's columns scale with the batch


def test_repeatable_bits_in_process(rng):
    """Forward and every gradient, float32 and bfloat16, twice in one process: the same bits."""
    case = Case(n=3, h=17, w=15, c_in=40, c_out=24, offset_groups=2)
    for dtype in (jnp.float32, jnp.bfloat16):
        x, off, kernel, mask = make_inputs(case, rng, dtype)
        dy = jnp.asarray(rng.normal(size=(case.n, *case.out_hw(), case.c_out)), dtype)
        f = jax.jit(lambda *a: case_grads(case, *a))
        first, second = f(x, off, kernel, mask, dy), f(x, off, kernel, mask, dy)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def _probe(*, cpus=None, isa=None) -> dict[str, str]:
    """Run cpu_columns_probe.py in a fresh process (restricted to `cpus` CPUs, capped at
    instruction set `isa`); its {name: sha256 of the bytes} per output."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("DEFT_CPU_ISA", None)
    if isa:
        env["DEFT_CPU_ISA"] = isa
    if cpus:
        env["PROBE_CPUS"] = ",".join(str(c) for c in cpus)
    r = subprocess.run([sys.executable, str(PROBE)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    return dict(line.split(" ", 1) for line in r.stdout.strip().splitlines() if " " in line)


def test_bitwise_identical_across_processes_and_thread_counts():
    """The same inputs in fresh processes, with XLA's intra-op pool (which the handlers run on)
    at 1 thread and at every CPU: the native sampler and col2im give the same bits at every
    thread count; the whole op (its XLA dots included) the same bits in every process with the
    same thread count. The CPU fused forward (its tiles fixed by the shape, one single-threaded
    GEMM per tile) also the same bits at every thread count."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    one, again = _probe(cpus=cpus[:1] or None), _probe(cpus=cpus[:1] or None)
    assert one == again
    if len(cpus) < 2:
        pytest.skip("one CPU: no second thread count to compare")
    every = _probe(cpus=cpus)
    assert one["threads"] == "1" and every["threads"] == str(len(cpus))
    native = [k for k in one if k.startswith(("cols", "col2im"))]
    assert len(native) == 10
    fused = [k for k in one if k.startswith("fused")]  # the CPU fused forward, where it loads
    assert len(fused) == (2 if _ffi.load_blas() == "" else 0)
    for k in native + fused:
        assert one[k] == every[k], k
    assert every == _probe(cpus=cpus)


def test_every_instruction_set_build_matches_the_reference():
    """Each build of the kernels this CPU can run (generic, AVX2, AVX-512): float64 parity with
    the reference for the forward and all four gradients (the probe checks, 1e-10)."""
    best = _ffi._deft_cpu.cpu_isa()
    builds = {"generic": ["generic"], "avx2": ["generic", "avx2"],
              "avx512": ["generic", "avx2", "avx512"]}[best]
    for isa in builds:
        out = _probe(isa=isa)
        assert out["isa"] == isa
        assert float(out["max_rel_err_f64"]) < 1e-10, (isa, out)
