"""examples/resnet.py (ResNet with deformable stages) and jax.export of programs using the op."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import data  # examples/data.py (conftest puts examples/ on sys.path)
import deft_jax.export
from deft_jax import _ffi, tiling
from deft_jax.linen import DeformConvPack
from resnet import BasicBlock, ResNet, ResNet18, ResNet50  # examples/resnet.py


def _deformable_paths(params) -> list[str]:
    """Paths 'stageI_blockJ/convK' of the DeformConvPack layers in a ResNet parameter tree."""
    paths = jax.tree_util.tree_flatten_with_path(params)[0]
    return sorted({"/".join(k.key for k in path[:2]) for path, _ in paths
                   if any(k.key == "conv_offset" for k in path)})


def _param_shapes(model, image_shape):
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros(image_shape),
                                                  train=False))
    return variables["params"]


@pytest.mark.parametrize("model,expected", [
    (ResNet18(num_classes=10, num_filters=4), []),
    (ResNet18(num_classes=10, num_filters=4, deformable_stages=(False, False, True, True)),
     [f"stage{s}_block{b}/conv{c}" for s in (3, 4) for b in (1, 2) for c in (1, 2)]),
    (ResNet18(num_classes=10, num_filters=4, deformable_stages="all"),
     [f"stage{s}_block{b}/conv{c}" for s in (1, 2, 3, 4) for b in (1, 2) for c in (1, 2)]),
    (ResNet50(num_classes=10, num_filters=4, deformable_stages="all"),
     [f"stage{s}_block{b}/conv2" for s, n in zip((1, 2, 3, 4), (3, 4, 6, 3))
      for b in range(1, n + 1)]),
])
def test_deformable_stages_choose_3x3_convs(model, expected):
    params = _param_shapes(model, (1, 32, 32, 3))
    assert _deformable_paths(params) == sorted(expected)
    # A deformable 3x3 conv keeps nn.Conv's 'kernel', so dense checkpoints map onto it.
    for path in expected:
        stage, conv = path.split("/")
        assert params[stage][conv]["kernel"].shape[:2] == (3, 3)


def test_deformable_stages_rejects_bad_values():
    with pytest.raises(ValueError, match="deformable_stages"):
        _param_shapes(ResNet18(num_classes=10, deformable_stages=(True, False)), (1, 32, 32, 3))
    with pytest.raises(ValueError, match="deformable_stages"):
        _param_shapes(ResNet18(num_classes=10, deformable_stages="some"), (1, 32, 32, 3))


def test_resnet50_widths_and_imagenet_stem():
    params = _param_shapes(ResNet50(num_classes=7, num_filters=8), (2, 64, 64, 3))
    assert params["conv_init"]["kernel"].shape == (7, 7, 3, 8)
    assert params["stage1_block1"]["conv3"]["kernel"].shape == (1, 1, 8, 32)
    assert params["stage4_block3"]["conv3"]["kernel"].shape == (1, 1, 64, 256)
    assert params["head"]["kernel"].shape == (256, 7)


# XLA's backend optimisations halve a ResNet-18 compile on CPU (9 -> 5 s); these programs run
# once or twice, so compile time is the test's time.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


# flax initialises through jax.random; with the default threefry PRNG, compiling the init of a
# ResNet-18 takes ~30 s on 2 CPU cores, with "rbg" ~5 s. The values do not matter here.
def _init_key(seed=0):
    return jax.random.key(seed, impl="rbg")


def _small_resnet18(dtype=jnp.float32):
    return ResNet18(num_classes=data.NUM_CLASSES, num_filters=4, stem="small",
                    deformable_stages="all", dtype=dtype)


@functools.cache
def _grad_fn(dtype):
    """jit(value_and_grad) of the cross-entropy of `_small_resnet18(dtype)` in training mode:
    (params, batch_stats, images, labels) -> ((loss, (logits, batch_stats)), grads)."""
    model = _small_resnet18(dtype)

    def loss(params, batch_stats, images, labels):
        logits, updates = model.apply({"params": params, "batch_stats": batch_stats}, images,
                                      train=True, mutable=["batch_stats"])
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce, (logits, updates["batch_stats"])

    return jax.jit(jax.value_and_grad(loss, has_aux=True), compiler_options=FAST_COMPILE)


@pytest.fixture(scope="module")
def glyphs():
    """8 normalised glyph images [8, 16, 16, 1] and their labels [8]."""
    images, labels = data.generate(8, image_size=16, channels=1, seed=3)
    return jnp.asarray(images) * 4.0 - 2.0, jnp.asarray(labels)


@pytest.fixture(scope="module")
def variables(glyphs):
    """float32 variables of `_small_resnet18`, for every compute dtype (param_dtype is float32)."""
    model = _small_resnet18()
    return jax.jit(lambda: model.init(_init_key(), glyphs[0], train=False),
                   compiler_options=FAST_COMPILE)()


def test_resnet18_forward_and_grad_fp32_and_bf16(glyphs, variables):
    images, labels = glyphs
    params, batch_stats = variables["params"], variables["batch_stats"]
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
    results = {}
    for dtype in (jnp.float32, jnp.bfloat16):
        (loss, (logits, new_stats)), grads = _grad_fn(dtype)(params, batch_stats, images, labels)
        assert logits.shape == (8, data.NUM_CLASSES) and logits.dtype == jnp.float32
        assert jax.tree.map(lambda a: (a.shape, a.dtype), grads) == jax.tree.map(
            lambda a: (a.shape, a.dtype), params)
        assert jax.tree.map(jnp.shape, new_stats) == jax.tree.map(jnp.shape, batch_stats)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
        results[dtype] = logits, jnp.concatenate([g.ravel() for g in jax.tree.leaves(grads)])
    (logits32, grads32), (logits16, grads16) = results[jnp.float32], results[jnp.bfloat16]
    # bfloat16 really computes in bfloat16 (the logits differ) but tracks float32.
    assert float(jnp.max(jnp.abs(logits16 - logits32))) > 0
    np.testing.assert_allclose(logits16, logits32, atol=0.1 * float(jnp.max(jnp.abs(logits32))))
    cosine = jnp.vdot(grads32, grads16) / (jnp.linalg.norm(grads32) * jnp.linalg.norm(grads16))
    assert float(cosine) > 0.95


def test_training_steps_decrease_loss(glyphs, variables):
    images, labels = glyphs
    params, batch_stats = variables["params"], variables["batch_stats"]
    sgd = jax.jit(lambda params, grads: jax.tree.map(lambda p, g: p - 0.1 * g, params, grads))
    losses = []
    for _ in range(3):
        (loss, (_, batch_stats)), grads = _grad_fn(jnp.float32)(params, batch_stats, images,
                                                                 labels)
        params = sgd(params, grads)
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05, losses
    # The offset predictors are trained too: their weights left the zero init.
    assert float(jnp.abs(params["stage4_block2"]["conv2"]["conv_offset"]["kernel"]).max()) > 0


def _targets() -> tuple[str, str]:
    """(forward, backward) FFI targets that programs lowered for the default backend call for the
    tests' small float32 layers (on GPU the fused route: tiling.route_heuristic; on CPU the
    forward's route depends on the kernels OpenBLAS runs: tiling.cpu_fused_by_default)."""
    if jax.default_backend() == "gpu":
        return _ffi.target_names("cuda", "fused")
    small = tiling.LayerShape(n=1, h_out=5, w_out=5, c_in=2, c_out=2, taps=9, offset_groups=1,
                              feature_groups=1, dtype="float32")
    fused = tiling.cpu_fused_by_default(small, _ffi.blas_core())
    return _ffi.target_names("cpu", "fused" if fused else "columns")[0], _ffi.target_names("cpu")[1]


def _tiny_model():
    """One deformable BasicBlock stage: small enough to export quickly; uses the native op."""
    return ResNet(stage_sizes=(1,), block_cls=BasicBlock, num_classes=3, num_filters=4,
                  stem="small", deformable_stages="all")


def test_export_round_trip_with_native_op():
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs flatbuffers")
    model = _tiny_model()
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 1)), jnp.float32)
    variables = jax.jit(lambda: model.init(_init_key(), x, train=False),
                        compiler_options=FAST_COMPILE)()
    # Move the offsets off zero so the exported program samples off the grid.
    variables = jax.tree_util.tree_map_with_path(
        lambda path, a: a + 0.3 if any(getattr(k, "key", None) == "conv_offset" for k in path)
        else a, variables)

    def forward(variables, x):
        return model.apply(variables, x, train=False)

    def loss(variables, x):
        return jnp.sum(forward(variables, x) ** 2)

    expected = jax.jit(forward, compiler_options=FAST_COMPILE)(variables, x)
    expected_grad = jax.jit(jax.grad(loss), compiler_options=FAST_COMPILE)(variables, x)

    exported = jax.export.export(jax.jit(forward),
                                 disabled_checks=deft_jax.export.disabled_safety_checks())(
        variables, x)
    text = exported.mlir_module()
    assert _targets()[0] in text
    restored = jax.export.deserialize(exported.serialize(vjp_order=1))
    np.testing.assert_allclose(restored.call(variables, x), expected, rtol=1e-6, atol=1e-6)
    # The serialized VJP calls the backward target.
    grad = jax.grad(lambda v, x: jnp.sum(restored.call(v, x) ** 2))(variables, x)
    for got, want in zip(jax.tree.leaves(grad), jax.tree.leaves(expected_grad), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_export_refuses_our_targets_without_the_disabled_checks():
    layer = DeformConvPack(2, (3, 3))
    x = jnp.ones((1, 5, 5, 2), jnp.float32)
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    with pytest.raises(ValueError, match=_targets()[0]):
        jax.export.export(jax.jit(layer.apply))(variables, x)
    # is_custom_call() returns the target name of a custom-call check.
    assert {c.is_custom_call() for c in deft_jax.export.disabled_safety_checks()} == {
        *_ffi.target_names("cpu"), *_ffi.target_names("cpu", "fused"), *_ffi.target_names("cuda"),
        *_ffi.target_names("cuda", "fused")}
