"""Model registry: ``make_model(name, num_classes, width, impl, dtype)``."""
from __future__ import annotations

import jax.numpy as jnp

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.models.adapter import flax_apply
from jaxunlearn.models.layers import CONV_FNS, CONV_IMPLS, Conv, ConvBN, im2col_conv, max_pool_2x2, xla_conv
from jaxunlearn.models.nets import MLP, ResNet9, ResNet18, SmallCNN
from jaxunlearn.models.vit import ViT

MODELS = {"resnet9": ResNet9, "resnet18": ResNet18, "cnn": SmallCNN, "mlp": MLP, "vit": ViT}
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def make_model(name: str, num_classes: int, width: float = 1.0, impl: str = "im2col", dtype: str = "float32"):
    """A flax module by name (resnet9, resnet18, cnn, mlp, vit)."""
    if name not in MODELS:
        raise JaxUnlearnError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    if impl not in CONV_IMPLS:
        raise JaxUnlearnError(f"unknown conv implementation {impl!r}; choose one of {', '.join(CONV_IMPLS)}")
    if dtype not in DTYPES:
        raise JaxUnlearnError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if not width > 0:
        raise JaxUnlearnError(f"model width must be > 0, got {width}")
    return MODELS[name](num_classes=num_classes, width=width, impl=impl, dtype=DTYPES[dtype])


__all__ = ["flax_apply", "MODELS", "make_model", "Conv", "ConvBN", "im2col_conv", "xla_conv", "ResNet9", "ResNet18",
           "SmallCNN", "MLP", "ViT", "CONV_IMPLS", "CONV_FNS", "max_pool_2x2"]
