"""ResNet (v1.5) in Flax linen, with deformable (DCNv2) 3x3 convolutions in chosen stages.

``ResNet18`` (BasicBlock, stages [2, 2, 2, 2]) and ``ResNet50`` (Bottleneck, stages [3, 4, 6, 3])
have torchvision's widths at ``num_filters=64``; smaller ``num_filters`` scale every width.
``deformable_stages`` picks, per stage, whether its 3x3 convolutions are ``DeformConvPack``
(offsets and sigmoid mask predicted by a zero-initialised conv, as in DCNv2 / mmdet's
``dcn=dict(type='DCNv2')``) instead of ``nn.Conv``; "all" makes every 3x3 conv of every stage
deformable ("fully deformable"). The stem and the 1x1 convolutions stay dense.

Example code to copy: it uses deft_jax's public API only (``deft_jax.linen``; needs the ``flax``
extra). examples/train.py trains it.

Example:
    >>> model = ResNet18(num_classes=10, num_filters=16, stem="small", deformable_stages="all")
    >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
    >>> logits = model.apply(variables, images, train=False)  # [N, 10] float32
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn
from flax.typing import Dtype

from deft_jax.linen import DeformConvPack

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "ResNet", "ResNet18", "ResNet50"]

ModuleDef = Callable[..., nn.Module]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions + identity (or 1x1 projection) shortcut: [N, H, W, C] ->
    [N, H/s, W/s, filters].

    Attributes:
      filters: output channels.
      conv: 1x1 dense convolution factory (``nn.Conv`` with the model's dtype).
      conv3x3: 3x3 convolution factory (``nn.Conv`` or ``DeformConvPack``).
      norm: batch-norm factory.
      strides: stride s of the first 3x3 convolution and of the projection.
    """

    filters: int
    conv: ModuleDef
    conv3x3: ModuleDef
    norm: ModuleDef
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv3x3(self.filters, strides=self.strides, name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv3x3(self.filters, name="conv2")(y)
        # Zero-initialised last scale: each block starts as the identity (Goyal et al. 2017).
        y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn2")(y)
        if x.shape != y.shape:
            x = self.conv(self.filters, (1, 1), strides=self.strides, name="proj_conv")(x)
            x = self.norm(name="proj_bn")(x)
        return nn.relu(x + y)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (strided, v1.5), 1x1 expand x4, + shortcut: [N, H, W, C] ->
    [N, H/s, W/s, 4 * filters]. Attributes as ``BasicBlock``."""

    filters: int
    conv: ModuleDef
    conv3x3: ModuleDef
    norm: ModuleDef
    strides: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = self.conv(self.filters, (1, 1), name="conv1")(x)
        y = nn.relu(self.norm(name="bn1")(y))
        y = self.conv3x3(self.filters, strides=self.strides, name="conv2")(y)
        y = nn.relu(self.norm(name="bn2")(y))
        y = self.conv(self.filters * 4, (1, 1), name="conv3")(y)
        y = self.norm(scale_init=nn.initializers.zeros_init(), name="bn3")(y)
        if x.shape != y.shape:
            x = self.conv(self.filters * 4, (1, 1), strides=self.strides, name="proj_conv")(x)
            x = self.norm(name="proj_bn")(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """ResNet classifier, NHWC.

    Attributes:
      stage_sizes: blocks per stage; stage i has width num_filters * 2**i and (after the first)
        starts with stride 2.
      block_cls: ``BasicBlock`` or ``Bottleneck``.
      num_classes: logits per image.
      num_filters: width of the stem and the first stage (64 for the standard models).
      stem: "imagenet" (7x7/2 conv + 3x3/2 max-pool, for >= 128 px) or "small" (3x3/1 conv, no
        pool: for 32-64 px images, as CIFAR ResNets).
      deformable_stages: one bool per stage, or "all": which stages use ``DeformConvPack`` for
        their 3x3 convolutions.
      offset_groups: offset groups G of the deformable convolutions.
      deform_implementation: passed to ``DeformConvPack``: None (native kernel) or "xla".
      dtype: computation dtype (e.g. bfloat16); logits are returned in float32.
      param_dtype: parameter dtype (float32 for mixed precision).
    """

    stage_sizes: Sequence[int]
    block_cls: type[nn.Module]
    num_classes: int
    num_filters: int = 64
    stem: str = "imagenet"
    deformable_stages: Sequence[bool] | str = (False, False, False, False)
    offset_groups: int = 1
    deform_implementation: str | None = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _deformable(self) -> tuple[bool, ...]:
        if isinstance(self.deformable_stages, str):
            if self.deformable_stages != "all":
                raise ValueError(f"deformable_stages: expected 'all' or one bool per stage, "
                                 f"got {self.deformable_stages!r}")
            return (True,) * len(self.stage_sizes)
        flags = tuple(bool(f) for f in self.deformable_stages)
        if len(flags) != len(self.stage_sizes):
            raise ValueError(f"deformable_stages: expected {len(self.stage_sizes)} flags (one per "
                             f"stage), got {self.deformable_stages!r}")
        return flags

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
        """Logits float32 [N, num_classes] of images x [N, H, W, C].

        ``train`` selects batch statistics (and updates 'batch_stats', which must then be mutable)
        or the running averages.
        """
        conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                                 param_dtype=self.param_dtype)
        deform_conv = functools.partial(
            DeformConvPack, kernel_size=(3, 3), padding=1, use_bias=False,
            offset_groups=self.offset_groups, implementation=self.deform_implementation,
            dtype=self.dtype, param_dtype=self.param_dtype)
        dense_conv = functools.partial(conv, kernel_size=(3, 3), padding=1)
        norm = functools.partial(nn.BatchNorm, use_running_average=not train, momentum=0.9,
                                 epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype)

        if self.stem == "imagenet":
            x = conv(self.num_filters, (7, 7), strides=2, padding=3, name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        elif self.stem == "small":
            x = conv(self.num_filters, (3, 3), padding=1, name="conv_init")(x)
            x = nn.relu(norm(name="bn_init")(x))
        else:
            raise ValueError(f"stem: expected 'imagenet' or 'small', got {self.stem!r}")

        for i, (num_blocks, deformable) in enumerate(zip(self.stage_sizes, self._deformable())):
            for j in range(num_blocks):
                x = self.block_cls(self.num_filters * 2 ** i, conv=conv,
                                   conv3x3=deform_conv if deformable else dense_conv, norm=norm,
                                   strides=2 if i > 0 and j == 0 else 1,
                                   name=f"stage{i + 1}_block{j + 1}")(x)
        x = jnp.mean(x, axis=(1, 2))
        x = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=self.param_dtype,
                     name="head")(x)
        return x.astype(jnp.float32)


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ARCHS: dict[str, Callable[..., ResNet]] = {"resnet18": ResNet18, "resnet50": ResNet50}
