"""The small-data ViT of the DEL paper's SVHN setting (Lee et al., 2021: shifted-patch tokenisation
and locality self-attention), as the DEL authors' ``unlearning_models.ViT``.

Paper defaults: patch 8, width 512, depth 4, 8 heads of 64, MLP 1,536, class-token pooling, no
dropout. ``width`` scales the token width, head width and MLP (``vit`` in the model registry);
``patch_size``, ``depth`` and ``heads`` are module fields. On inputs smaller than two patches a side
(8×8 digits) the patch shrinks to a quarter of the side so there are 16 tokens.
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxunlearn.models.nets import Classifier


def shifted_patches(x, p: int):
    """SPT's input: the image and its four one-pixel shifts (left, right, up, down), as patches.
    x: f32[B, H, W, C] -> f32[B, (H/p)(W/p), p·p·5C]."""
    b, h, w, c = x.shape
    pad = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    shifts = [pad[:, 1:-1, 2:], pad[:, 1:-1, :-2], pad[:, 2:, 1:-1], pad[:, :-2, 1:-1]]  # ±1 in width, ±1 in height
    x = jnp.concatenate([x, *shifts], axis=-1)
    x = x.reshape(b, h // p, p, w // p, p, 5 * c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * 5 * c)


class LocalitySelfAttention(nn.Module):
    """Multi-head self-attention with a learnt temperature and the diagonal (a token attending to
    itself) masked out."""

    heads: int
    head_dim: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, n, d = x.shape
        x = nn.LayerNorm(dtype=self.dtype)(x)
        qkv = nn.Dense(3 * self.heads * self.head_dim, use_bias=False, dtype=self.dtype)(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3 * self.heads, self.head_dim), 3, axis=2)
        log_temp = self.param("temperature", lambda _: jnp.log(jnp.asarray(self.head_dim ** -0.5, jnp.float32)))
        dots = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * jnp.exp(log_temp)
        dots = jnp.where(jnp.eye(n, dtype=bool), jnp.finfo(jnp.float32).min, dots)
        attn = nn.softmax(dots, axis=-1).astype(self.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", attn, v).reshape(b, n, self.heads * self.head_dim)
        return nn.Dense(d, dtype=self.dtype)(out)


class ViT(Classifier):
    patch_size: int = 8
    depth: int = 4
    heads: int = 8

    @nn.compact
    def __call__(self, x, train: bool = False, features: bool = False):
        dim = max(8, int(round(512 * self.width)))
        head_dim = max(4, int(round(64 * self.width)))
        mlp = max(8, int(round(1536 * self.width)))
        h = x.shape[1]
        p = self.patch_size if h >= 2 * self.patch_size else max(1, h // 4)
        tokens = shifted_patches(x.astype(self.dtype), p)
        tokens = nn.Dense(dim, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(tokens))
        b, n, _ = tokens.shape
        cls = self.param("cls_token", nn.initializers.normal(1.0), (1, 1, dim))
        pos = self.param("pos_embedding", nn.initializers.normal(1.0), (1, n + 1, dim))
        z = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, dim)).astype(self.dtype), tokens], axis=1) + pos
        for _ in range(self.depth):
            z = z + LocalitySelfAttention(self.heads, head_dim, self.dtype)(z)
            y = nn.LayerNorm(dtype=self.dtype)(z)
            y = nn.Dense(dim, dtype=self.dtype)(nn.gelu(nn.Dense(mlp, dtype=self.dtype)(y), approximate=False))
            z = z + y
        latent = z[:, 0]
        if features:
            return latent.astype(jnp.float32)
        return nn.Dense(self.num_classes, dtype=self.dtype)(nn.LayerNorm(dtype=self.dtype)(latent)).astype(jnp.float32)
