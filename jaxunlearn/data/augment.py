"""On-device augmentation, run inside the jitted step from the step's PRNG key."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(images, mean, std):
    """u8|f32[B, H, W, C] -> f32[B, H, W, C], per-channel standardised."""
    x = images.astype(jnp.float32)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def random_translate(images, key, pad: int):
    """Random crop of a zero-padded image (a translation of up to ``pad`` pixels), per example.

    images: f32[B, H, W, C] -> f32[B, H, W, C]
    """
    if pad == 0:
        return images
    b, h, w, _ = images.shape
    padded = jnp.pad(images, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    offsets = jax.random.randint(key, (b, 2), 0, 2 * pad + 1)

    def crop(img, off):
        return jax.lax.dynamic_slice(img, (off[0], off[1], 0), (h, w, img.shape[-1]))

    return jax.vmap(crop)(padded, offsets)


def random_flip(images, key):
    """Horizontal flip with probability 1/2, per example. f32[B, H, W, C] -> same."""
    flip = jax.random.bernoulli(key, 0.5, (images.shape[0], 1, 1, 1))
    return jnp.where(flip, images[:, :, ::-1, :], images)


def augment(images, key, crop_pad: int = 0, flip: bool = False):
    """Translate then flip. f32[B, H, W, C] -> f32[B, H, W, C]."""
    k1, k2 = jax.random.split(key)
    images = random_translate(images, k1, crop_pad)
    return random_flip(images, k2) if flip else images
