"""Train plain and fully deformable ResNets on the synthetic glyphs; compare speed and accuracy.

One run trains each model of ``--models`` on the same data, in the same order, for the same number
of steps, from the same initial weights where the models share parameters:

  plain       ResNet with dense 3x3 convolutions (the floor).
  deform      every 3x3 convolution a DCNv2 ``DeformConvPack`` on deft_jax's native kernel.
  deform_xla  the same model on the pure-JAX gather reference (``implementation="xla"``).
  deform_fused  the same model with ``implementation="fused"``: the fused CUDA kernels on a GPU,
              the CPU fused forward on a CPU (needs OpenBLAS, ``pip install "deft_jax[blas]"``).

``deform``, ``deform_fused`` and ``deform_xla`` compute the same function from the same initial
parameters on the same batches, so their loss curves may differ by rounding only. With ``--check``
(the default) the run fails (exit status 1, a FAIL line saying why) when any model's train loss is
not finite or when a native model's curve leaves ``deform_xla``'s by more than the tolerance of the
dtype (``CHECK_TOLERANCES``); it prints PASS otherwise.

Step time is device time: after training (compilation and warm-up long done), ``--timing-windows``
windows of ``--timing-steps`` chained steps on one device-resident batch, each window closed by
``block_until_ready``; the figure is the median window over its step count. Outputs: a loss and
accuracy plot (PNG) and every number as JSON in ``--out``.

Example code to copy, next to resnet.py (the model) and data.py (the synthetic glyphs); needs the
``examples`` extra (``pip install "deft_jax[examples]"``).

CPU default (2 cores: about 3.5 min, most of it the deformable models; accuracy after 30 steps is
near chance, use --steps 300 --batch 32 for a learning curve):
  python examples/train.py
GPU, full size:
  python examples/train.py --arch resnet50 --width 64 --batch 128 --image-size 64 --channels 3 \
      --dtype bfloat16 --steps 2000 --num-train 50000 --eval-every 250
Data parallel over N local devices (on CPU, fake them with
XLA_FLAGS=--xla_force_host_platform_device_count=N):
  python examples/train.py --devices 2
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax.training import train_state
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

import data  # noqa: E402  (examples/data.py, beside this script)
from resnet import ARCHS  # noqa: E402  (examples/resnet.py)

MODELS = {"plain": (False, None), "deform": (True, None), "deform_xla": (True, "xla"),
          "deform_fused": (True, "fused")}
NATIVE = ("deform", "deform_fused")  # checked against deform_xla


@dataclasses.dataclass(frozen=True)
class Tolerance:
    """How far deform's train-loss curve may leave deform_xla's (``ref``).

    Attributes:
      step: |loss - ref| <= step * (1 + |ref|) at each of ...
      steps: ... the first ``steps`` steps.
      final: the mean loss of the last FINAL_WINDOW steps within final * (1 + |its reference|).
    """
    step: float
    steps: int
    final: float


FINAL_WINDOW = 10
# deform and deform_xla round differently (summation order; TF32 or bf16 products on GPU), and
# training amplifies any difference about tenfold every 5-10 steps once the learning rate has
# warmed up, in float32 as in bfloat16. Measured |loss - ref| / (1 + |ref|), ResNet-18, SGD at
# lr 0.1 ("small": this script's defaults; "big": width 32, 64 px x 3 channels, batch 128):
#
#   dtype     device  model  steps   max over the first 5 / 10 / 20 / 30 steps   final
#   float32   CPU     small     60   0       / 3.0e-7 / 1.1e-3 / 9.7e-3         0.12%
#   float32   H100    small    300   1.3e-6  / 1.1e-4 / 3.3e-3 / 5.3e-3         1.95%
#   float32   H100    big      200   2.1e-7  / 1.9e-5 / 1.4e-4 / 2.4e-4         3.92%
#   bfloat16  CPU     small     60   3.5e-5  / 1.6e-3 / 4.0e-3 / 2.3e-2         0.04%
#   bfloat16  H100    small    300   7.3e-5  / 8.8e-4 / 6.2e-3 / 1.2e-2         0.67%
#   bfloat16  H100    big      200   4.7e-6  / 4.6e-5 / 2.4e-4 / 4.9e-4         1.47%
#
# ("final": the mean of the last 10 steps.) A per-step bound therefore holds only over the first
# steps, before the amplification: 10 steps, at about 10x the worst measured deviation there
# (float32 1e-3, bfloat16 1e-2); a wrong forward or gradient shows as a difference of the order of
# the loss's own change per step. After that the curves are two equally good training runs, so
# only the end is compared, at 2.5x the worst measured difference (0.1 of 1 + |loss|): it catches
# a run that diverges or stops learning.
CHECK_TOLERANCES = {
    "float32": Tolerance(step=1e-3, steps=10, final=0.1),
    "bfloat16": Tolerance(step=1e-2, steps=10, final=0.1),
}


def check(results: dict, dtype: str) -> tuple[list[str], dict]:
    """(failures, stats) of the --check: every model's train loss finite, and each native model's
    curve (NATIVE) within CHECK_TOLERANCES[dtype] of deform_xla's where both ran. An empty list
    passes. stats: deform's deviations, deform_fused's under keys prefixed "deform_fused_"."""
    failures, stats = [], {}
    for name, r in results.items():
        loss = np.asarray(r["train_loss"], np.float64)
        bad = np.flatnonzero(~np.isfinite(loss))
        if bad.size:
            failures.append(f"{name}: train loss is not finite from step {bad[0] + 1} "
                            f"({loss[bad[0]]}; {bad.size} of {loss.size} steps)")
    if "deform_xla" not in results or failures:
        return failures, stats
    for name in NATIVE:
        if name in results:
            f, st = _check_curve(name, results, dtype)
            failures += f
            stats.update({(k if name == "deform" else f"{name}_{k}"): v for k, v in st.items()})
    return failures, stats


def _check_curve(name: str, results: dict, dtype: str) -> tuple[list[str], dict]:
    """(failures, stats) of one native model's curve against deform_xla's."""
    failures, stats = [], {}
    tol = CHECK_TOLERANCES[dtype]
    got = np.asarray(results[name]["train_loss"], np.float64)
    ref = np.asarray(results["deform_xla"]["train_loss"], np.float64)
    n = min(tol.steps, len(ref))
    dev = np.abs(got[:n] - ref[:n]) / (1.0 + np.abs(ref[:n]))
    worst = int(np.argmax(dev))
    stats["max_step_deviation"] = float(dev[worst])
    stats["max_step_deviation_all_steps"] = float(np.max(np.abs(got - ref) / (1.0 + np.abs(ref))))
    if dev[worst] > tol.step:
        failures.append(
            f"{name}'s train loss left deform_xla's at step {worst + 1}: {got[worst]:.6g} against "
            f"{ref[worst]:.6g}, |diff| / (1 + |ref|) = {dev[worst]:.3g} > {tol.step:g} "
            f"({dtype}, first {n} steps)")
    window = min(FINAL_WINDOW, len(ref))
    final_got, final_ref = got[-window:].mean(), ref[-window:].mean()
    final_dev = abs(final_got - final_ref) / (1.0 + abs(final_ref))
    stats["final_deviation"] = float(final_dev)
    if final_dev > tol.final:
        failures.append(
            f"{name}'s final train loss (mean of the last {window} steps) {final_got:.6g} left "
            f"deform_xla's {final_ref:.6g}: |diff| / (1 + |ref|) = {final_dev:.3g} > "
            f"{tol.final:g} ({dtype})")
    return failures, stats


class TrainState(train_state.TrainState):
    """Parameters, optimizer state and BatchNorm running statistics."""

    batch_stats: Any


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default="plain,deform,deform_xla",
                   help=f"comma-separated subset of {','.join(MODELS)}")
    p.add_argument("--arch", default="resnet18", choices=sorted(ARCHS))
    p.add_argument("--width", type=int, default=8, help="ResNet num_filters (64 = standard)")
    p.add_argument("--stem", default="auto", choices=("auto", "small", "imagenet"),
                   help="auto: 'small' up to 64 px, 'imagenet' above")
    p.add_argument("--offset-groups", type=int, default=1)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1, choices=(1, 3))
    p.add_argument("--num-train", type=int, default=2048)
    p.add_argument("--num-test", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="global batch size")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-every", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--offset-lr-mult", type=float, default=0.1,
                   help="learning-rate multiplier of the offset/mask predictors (conv_offset)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="computation dtype; parameters stay float32")
    p.add_argument("--devices", type=int, default=1, help="data-parallel over this many devices")
    p.add_argument("--timing-windows", type=int, default=3)
    p.add_argument("--timing-steps", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out/train", help="output directory")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="exit with status 1 if a train loss is not finite or a native model's "
                        "loss curve leaves deform_xla's (CHECK_TOLERANCES)")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown or not args.models:
        p.error(f"--models: unknown {sorted(unknown)}; choose from {list(MODELS)}")
    if args.batch % args.devices:
        p.error(f"--batch {args.batch} must be divisible by --devices {args.devices}")
    if args.stem == "auto":
        args.stem = "small" if args.image_size <= 64 else "imagenet"
    return args


def make_model(args, name: str):
    deformable, implementation = MODELS[name]
    return ARCHS[args.arch](num_classes=data.NUM_CLASSES, num_filters=args.width, stem=args.stem,
                            deformable_stages="all" if deformable else (False,) * 4,
                            offset_groups=args.offset_groups,
                            deform_implementation=implementation, dtype=jnp.dtype(args.dtype))


def normalize(images: jax.Array) -> jax.Array:
    """[N, H, W, C] in [0, 1] -> roughly zero mean, unit variance."""
    return (images - 0.5) * 4.0


def cross_entropy(logits, labels):
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def train_step(state: TrainState, images: jax.Array, labels: jax.Array):
    """One SGD step on a batch images [B, H, W, C], labels [B]; returns (state, metrics) where
    metrics holds the batch's loss and accuracy as device scalars (nothing leaves the device)."""

    def loss_fn(params):
        logits, updates = state.apply_fn({"params": params, "batch_stats": state.batch_stats},
                                         normalize(images), train=True, mutable=["batch_stats"])
        return cross_entropy(logits, labels).mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
    return state, {"loss": loss, "accuracy": accuracy}


def eval_step(state: TrainState, images, labels, weights):
    """Summed loss and correct count over a padded test batch; weights [B] is 0 on padding."""
    logits = state.apply_fn({"params": state.params, "batch_stats": state.batch_stats},
                            normalize(images), train=False)
    correct = (jnp.argmax(logits, -1) == labels) * weights
    return jnp.sum(cross_entropy(logits, labels) * weights), jnp.sum(correct)


def make_optimizer(args) -> optax.GradientTransformation:
    """SGD with Nesterov momentum, linear warm-up then cosine decay, weight decay on kernels.

    The offset/mask predictors ('conv_offset') learn at ``--offset-lr-mult`` times the rate, as in
    DCN's and mmdet's recipes (``dcn_offset_lr_mult=0.1``): at the full rate of 0.1 the fully
    deformable ResNet-18 learned faster than the plain one for ~120 steps, then diverged (test
    accuracy 0.56 at step 100, 0.13 at step 200; measured on CPU, batch 32).
    """
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, warmup_steps=max(1, args.steps // 20), decay_steps=args.steps)
    kernels_only = lambda params: jax.tree.map(lambda p: p.ndim > 1, params)
    offset_params = lambda params: jax.tree_util.tree_map_with_path(
        lambda path, _: any(getattr(k, "key", None) == "conv_offset" for k in path), params)
    return optax.chain(optax.add_decayed_weights(args.weight_decay, mask=kernels_only),
                       optax.sgd(schedule, momentum=0.9, nesterov=True),
                       optax.masked(optax.scale(args.offset_lr_mult), offset_params))


def batches(images: np.ndarray, labels: np.ndarray, batch: int, seed: int):
    """Endless shuffled epochs of (images [B, H, W, C], labels [B]); the last partial batch of an
    epoch is dropped. The order depends only on the seed: every model sees the same batches."""
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(labels))
        for start in range(0, len(order) - batch + 1, batch):
            idx = order[start:start + batch]
            yield images[idx], labels[idx]


def evaluate(step_fn, state, test, batch: int, data_sharding):
    """(mean loss, accuracy) over the whole test split."""
    images, labels = test
    n = len(labels)
    pad = -n % batch
    images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros((pad,), labels.dtype)])
    weights = np.concatenate([np.ones((n,), np.float32), np.zeros((pad,), np.float32)])
    loss = correct = 0.0
    for start in range(0, n + pad, batch):
        sl = slice(start, start + batch)
        batch_loss, batch_correct = step_fn(
            state, *jax.device_put((images[sl], labels[sl], weights[sl]), data_sharding))
        loss, correct = loss + batch_loss, correct + batch_correct
    return float(loss) / n, float(correct) / n


def run_model(args, name: str, ds: data.Dataset, mesh: Mesh) -> dict:
    """Trains model `name`, evaluates it periodically, then times its step."""
    data_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    model = make_model(args, name)
    sample = jnp.zeros((1, *ds.train_images.shape[1:]), jnp.float32)
    # An "rbg" key: compiling a ResNet init with the default threefry PRNG takes ~30 s on CPU.
    variables = jax.jit(functools.partial(model.init, train=False))(
        jax.random.key(args.seed, impl="rbg"), sample)
    state = TrainState.create(apply_fn=model.apply, params=variables["params"],
                              batch_stats=variables["batch_stats"], tx=make_optimizer(args))
    state = jax.device_put(state, replicated)
    num_params = sum(p.size for p in jax.tree.leaves(state.params))

    stream = batches(ds.train_images, ds.train_labels, args.batch, args.seed)
    first = jax.device_put(next(stream), data_sharding)
    t0 = time.perf_counter()
    step = jax.jit(train_step, donate_argnums=0, out_shardings=(replicated, replicated)).lower(
        state, *first).compile()
    compile_s = time.perf_counter() - t0
    memory = step.memory_analysis()
    eval_fn = jax.jit(eval_step)
    test_batch = args.batch

    history: list[dict[str, jax.Array]] = []
    evals = []
    bar = tqdm(range(args.steps), desc=f"{name:>10}", dynamic_ncols=True)
    batch = first
    for i in bar:
        state, metrics = step(state, *batch)
        history.append(metrics)
        if i + 1 < args.steps:
            batch = jax.device_put(next(stream), data_sharding)
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            loss, acc = evaluate(eval_fn, state, (ds.test_images, ds.test_labels), test_batch,
                                 data_sharding)
            evals.append({"step": i + 1, "loss": loss, "accuracy": acc})
            bar.set_postfix(train_loss=f"{float(metrics['loss']):.3f}", test_acc=f"{acc:.3f}")
    bar.close()
    history = jax.device_get(history)

    # Device time of the step: chained steps on one resident batch, compiled and warmed up.
    for _ in range(2):
        state, _ = step(state, *batch)
    jax.block_until_ready(state)
    windows = []
    for _ in range(args.timing_windows):
        t0 = time.perf_counter()
        for _ in range(args.timing_steps):
            state, _ = step(state, *batch)
        jax.block_until_ready(state)
        windows.append((time.perf_counter() - t0) / args.timing_steps)
    step_s = statistics.median(windows)

    return {
        "num_params": int(num_params),
        "compile_s": compile_s,
        "temp_bytes": getattr(memory, "temp_size_in_bytes", None),
        "step_s": step_s,
        "step_s_windows": windows,
        "images_per_s": args.batch / step_s,
        "train_loss": [float(m["loss"]) for m in history],
        "train_accuracy": [float(m["accuracy"]) for m in history],
        "eval": evals,
        "final_test_accuracy": evals[-1]["accuracy"],
    }


def plot(results: dict, args, path: pathlib.Path) -> None:
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    window = max(1, args.steps // 30)
    for name, r in results.items():
        loss = np.convolve(r["train_loss"], np.ones(window) / window, mode="valid")
        label = f"{name} ({r['step_s'] * 1e3:.1f} ms/step)"
        ax_loss.plot(np.arange(window, window + len(loss)), loss, label=label)
        ax_acc.plot([e["step"] for e in r["eval"]], [e["accuracy"] for e in r["eval"]], "o-",
                    label=f"{name} ({r['final_test_accuracy']:.3f})")
    ax_loss.set(xlabel="step", ylabel=f"train loss (mean of {window} steps)")
    ax_acc.set(xlabel="step", ylabel="test accuracy", ylim=(0, 1))
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"{args.arch} width {args.width}, {args.image_size}px x{args.channels}, "
                 f"batch {args.batch}, {args.dtype}, "
                 f"{args.devices} x {jax.devices()[0].device_kind}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    devices = jax.local_devices()
    if args.devices > len(devices):
        raise SystemExit(f"--devices {args.devices}: only {len(devices)} local device(s); on CPU "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={args.devices}")
    mesh = Mesh(np.array(devices[:args.devices]), ("data",))

    t0 = time.perf_counter()
    ds = data.make_dataset(args.num_train, args.num_test, image_size=args.image_size,
                           channels=args.channels, seed=args.seed)
    print(f"data: {args.num_train} train + {args.num_test} test images "
          f"{ds.train_images.shape[1:]} in {time.perf_counter() - t0:.1f} s")

    results = {name: run_model(args, name, ds, mesh) for name in args.models}

    summary = {name: {k: r[k] for k in ("step_s", "images_per_s", "compile_s", "temp_bytes",
                                         "final_test_accuracy", "num_params")}
               for name, r in results.items()}
    ratios = {}
    if "deform" in results and "plain" in results:
        ratios["deform/plain"] = results["deform"]["step_s"] / results["plain"]["step_s"]
    if "deform_xla" in results and "deform" in results:
        ratios["deform_xla/deform"] = results["deform_xla"]["step_s"] / results["deform"]["step_s"]
        ratios["max_train_loss_diff(deform, deform_xla)"] = float(np.max(np.abs(
            np.subtract(results["deform"]["train_loss"], results["deform_xla"]["train_loss"]))))
    failures, check_stats = check(results, args.dtype)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = (f"train_{args.arch}_w{args.width}_{args.image_size}px_{args.dtype}_b{args.batch}"
           f"_d{args.devices}")
    record = {
        "config": vars(args),
        "device": {"platform": devices[0].platform, "kind": devices[0].device_kind,
                   "count": args.devices},
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "summary": summary,
        "ratios": ratios,
        "check": {"enabled": args.check, "passed": not failures, "failures": failures,
                  **check_stats},
        "results": results,
    }
    (out / f"{tag}.json").write_text(json.dumps(record, indent=1))
    plot(results, args, out / f"{tag}.png")

    print(f"\n{'model':>10} {'ms/step':>9} {'img/s':>9} {'compile s':>9} {'temp MB':>8} "
          f"{'test acc':>8}")
    for name, s in summary.items():
        temp = f"{s['temp_bytes'] / 2**20:8.1f}" if s["temp_bytes"] is not None else f"{'-':>8}"
        print(f"{name:>10} {s['step_s'] * 1e3:9.2f} {s['images_per_s']:9.1f} "
              f"{s['compile_s']:9.1f} {temp} {s['final_test_accuracy']:8.3f}")
    for k, v in ratios.items():
        print(f"{k}: {v:.3g}")
    print(f"wrote {out / tag}.json and .png")
    if failures:
        print(("FAIL: " if args.check else "check (disabled) would fail: ")
              + "; ".join(failures))
    elif args.check:
        ran = [n for n in NATIVE if n in results]
        compared = (f"{' and '.join(ran)} match deform_xla" if ran and "deform_xla" in results
                    else "no native model beside deform_xla: curves not compared")
        print(f"PASS: train losses finite; {compared}")
    return record


if __name__ == "__main__":
    record = main()
    sys.exit(1 if record["config"]["check"] and not record["check"]["passed"] else 0)
