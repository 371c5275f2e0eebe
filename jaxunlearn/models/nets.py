"""Networks: the data-attribution ResNet-9, a CIFAR ResNet-18, a small CNN and an MLP.

Every model maps images f32[B, H, W, C] to logits f32[B, num_classes] and takes ``train``;
with ``features=True`` it returns the penultimate-layer embedding f32[B, D] instead.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxunlearn.models.layers import Conv, ConvBN, global_max_pool, max_pool_2x2, torch_default_init


def _dense(features, dtype=jnp.float32, use_bias=True):
    return nn.Dense(features, use_bias=use_bias, kernel_init=torch_default_init, dtype=dtype)


class Classifier(nn.Module):
    """Fields every model shares (one constructor signature: ``impl`` is unused by the MLP)."""

    num_classes: int = 10
    width: float = 1.0
    impl: str = "im2col"
    dtype: jnp.dtype = jnp.float32


class ResNet9(Classifier):
    """The FFCV / DAWNBench ResNet-9 used by datamodels, TRAK and KLoM on CIFAR-10.

    conv-BN-ReLU 64 -> 128 (5x5, stride 2) -> residual(128) -> 256 -> max-pool ->
    residual(256) -> 128 (no padding) -> global max pool -> linear (no bias) -> x0.2.
    ``width`` scales every channel count (width 1.0 is the paper model).
    """

    output_scale: float = 0.2

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        c = lambda n: max(1, int(round(n * self.width)))  # noqa: E731
        cbn = lambda f, **kw: ConvBN(f, impl=self.impl, dtype=self.dtype, **kw)  # noqa: E731
        x = cbn(c(64))(x, train)
        x = cbn(c(128), kernel_size=5, stride=2, padding=2)(x, train)
        x = x + cbn(c(128))(cbn(c(128))(x, train), train)
        x = cbn(c(256))(x, train)
        x = max_pool_2x2(x)
        x = x + cbn(c(256))(cbn(c(256))(x, train), train)
        x = cbn(c(128), padding=0)(x, train)
        x = global_max_pool(x)
        if features:
            return x.astype(jnp.float32)
        x = _dense(self.num_classes, self.dtype, use_bias=False)(x)
        return (x * self.output_scale).astype(jnp.float32)


class BasicBlock(nn.Module):
    features: int
    stride: int
    impl: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x, train: bool):
        bn = lambda: nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)  # noqa: E731
        y = ConvBN(self.features, stride=self.stride, impl=self.impl, dtype=self.dtype)(x, train)
        y = bn()(Conv(self.features, impl=self.impl, dtype=self.dtype)(y))
        if self.stride != 1 or x.shape[-1] != self.features:
            x = bn()(Conv(self.features, 1, self.stride, 0, self.impl, self.dtype)(x))
        return nn.relu(x + y)


class ResNet18(Classifier):
    """CIFAR ResNet-18 (3x3 stem, four stages of two BasicBlocks, 64·width base channels)."""


    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        base = max(1, int(round(64 * self.width)))
        x = ConvBN(base, impl=self.impl, dtype=self.dtype)(x, train)
        for i, mult in enumerate((1, 2, 4, 8)):
            for j in range(2):
                x = BasicBlock(base * mult, 2 if (i > 0 and j == 0) else 1, self.impl, self.dtype)(x, train)
        return _pooled_head(x, features, self.num_classes, self.dtype)


def _pooled_head(x, features: bool, num_classes: int, dtype):
    """Global average pool, then the penultimate features (``features=True``) or the linear head."""
    x = jnp.mean(x, axis=(1, 2))
    if features:
        return x.astype(jnp.float32)
    return _dense(num_classes, dtype)(x).astype(jnp.float32)


class SmallCNN(Classifier):
    """For 8x8 digits: conv(w)-conv(2w)-maxpool-conv(4w)-global avg pool-linear."""


    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        c = lambda n: max(1, int(round(n * self.width)))  # noqa: E731
        x = ConvBN(c(16), impl=self.impl, dtype=self.dtype)(x, train)
        x = ConvBN(c(32), impl=self.impl, dtype=self.dtype)(x, train)
        x = max_pool_2x2(x)
        x = ConvBN(c(64), impl=self.impl, dtype=self.dtype)(x, train)
        return _pooled_head(x, features, self.num_classes, self.dtype)


class MLP(Classifier):
    """Flatten -> two hidden ReLU layers of 128·width units -> linear. No BatchNorm."""


    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        h = max(1, int(round(128 * self.width)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(_dense(h, self.dtype)(x))
        x = nn.relu(_dense(h, self.dtype)(x))
        if features:
            return x.astype(jnp.float32)
        return _dense(self.num_classes, self.dtype)(x).astype(jnp.float32)
