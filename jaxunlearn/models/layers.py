"""Layers whose ensemble (vmapped) form is fast on every backend.

``Conv`` has two interchangeable formulations with the same parameters
(kernel f32[kh, kw, c_in, c_out]):

* ``"xla"``: ``lax.conv_general_dilated``. Under ``vmap`` over models the kernel gains
  a batch axis and XLA lowers it to a grouped convolution, slow in the backward pass on CPU.
* ``"im2col"``: patches by strided slicing, then one matmul. Under ``vmap`` it becomes a
  batched matmul, which every backend runs well.

Which one an ensemble uses is measured (``benchmarks/ensemble_throughput.py``), not assumed.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ("xla", "im2col")

# PyTorch's default init (kaiming_uniform with a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_default_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def im2col_conv(x, kernel, stride: int, padding: int):
    """x: f32[B, H, W, C], kernel: f32[k, k, C, F] -> f32[B, Ho, Wo, F] (zero padding)."""
    k = kernel.shape[0]
    b, h, w, c = x.shape
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    ho = (h + 2 * padding - k) // stride + 1
    wo = (w + 2 * padding - k) // stride + 1
    cols = [x[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride, :]
            for i in range(k) for j in range(k)]
    patches = cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # [B, Ho, Wo, k*k*C]
    return patches @ kernel.reshape(k * k * c, -1)


def xla_conv(x, kernel, stride: int, padding: int):
    """Same contract as :func:`im2col_conv`, through lax.conv_general_dilated."""
    return lax.conv_general_dilated(x, kernel, (stride, stride), [(padding, padding)] * 2,
                                    dimension_numbers=("NHWC", "HWIO", "NHWC"))


class _ConvFields(nn.Module):
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: int = 1
    impl: str = "im2col"
    dtype: jnp.dtype = jnp.float32


class Conv(_ConvFields):
    """Square conv without bias (BatchNorm follows). x: f32[B, H, W, C] -> f32[B, Ho, Wo, features]."""

    @nn.compact
    def __call__(self, x):
        k = self.kernel_size
        kernel = self.param("kernel", torch_default_init, (k, k, x.shape[-1], self.features))
        fn = im2col_conv if self.impl == "im2col" else xla_conv
        return fn(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.padding)


class ConvBN(_ConvFields):
    """Conv -> BatchNorm (per-model running statistics) -> ReLU."""

    @nn.compact
    def __call__(self, x, train: bool):
        x = Conv(self.features, self.kernel_size, self.stride, self.padding, self.impl, self.dtype)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
        return nn.relu(x)
