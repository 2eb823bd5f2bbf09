"""Reference models built on deft_jax's Flax modules."""

from .resnet import ARCHS, BasicBlock, Bottleneck, ResNet, ResNet18, ResNet50

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "ResNet", "ResNet18", "ResNet50"]
