"""Training recipes (hyperparameters) and the optimizer they define."""
from __future__ import annotations

import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import optax

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import check_field_types, is_integer


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that defines how one model is trained (not which data it sees)."""

    model: str = "cnn"
    width: float = 1.0
    epochs: int = 24
    batch_size: int = 512
    peak_lr: float = 0.4
    peak_epoch: float = 5.0
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    crop_pad: int = 0
    flip: bool = False
    dtype: str = "float32"
    # Unrolling SGD (Thudi et al.): the SD loss weight λ (CE + λ · Σ_i std(z_i) / (B·C)); 0 = plain CE
    std_loss: float = 0.0
    # "triangle" (0 -> peak_lr at peak_epoch -> 0) or "constant" (peak_lr every step, the Unrolling SGD code's SGD)
    lr_schedule: str = "triangle"

    def replace(self, **kw) -> "Recipe":
        return dataclasses.replace(self, **{k: v for k, v in kw.items() if v is not None})

    def with_epochs(self, epochs: int | None) -> "Recipe":
        """Same recipe over ``epochs`` epochs, the lr peak moved to the same fraction of training."""
        if epochs is None or epochs == self.epochs:
            return self
        check_field_types(self, "recipe")
        if not is_integer(epochs) or epochs < 1:
            raise JaxUnlearnError(f"epochs must be >= 1 (an integer), got {epochs!r}")
        return dataclasses.replace(self, epochs=epochs, peak_epoch=self.peak_epoch * epochs / self.epochs)

    def to_dict(self) -> dict:
        """The fields as a dict; fields added later (std_loss, lr_schedule) are left out at their defaults,
        so run folders written before they existed still match their config.json and resume."""
        d = dataclasses.asdict(self)
        for name, default in LATER_FIELDS.items():
            if d[name] == default:
                del d[name]
        return d

    def validate(self) -> "Recipe":
        from jaxunlearn.models import DTYPES, MODELS

        check_field_types(self, "recipe")
        for name in ("width", "peak_lr", "momentum", "weight_decay"):
            v = getattr(self, name)
            if not math.isfinite(v) or v < 0 or (name == "width" and v == 0):
                raise JaxUnlearnError(f"recipe: {name} must be a finite number {'> 0' if name == 'width' else '>= 0'}, "
                                      f"got {v!r}")
        if self.crop_pad < 0:
            raise JaxUnlearnError(f"recipe: crop_pad must be >= 0, got {self.crop_pad}")
        if self.model not in MODELS:
            raise JaxUnlearnError(f"unknown model {self.model!r}; choose one of {', '.join(MODELS)}")
        if self.dtype not in DTYPES:
            raise JaxUnlearnError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.epochs < 1:
            raise JaxUnlearnError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise JaxUnlearnError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= self.peak_epoch <= self.epochs:
            raise JaxUnlearnError(f"peak_epoch must lie in [0, epochs], got {self.peak_epoch}")
        if not 0 <= self.label_smoothing < 1:
            raise JaxUnlearnError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if not isinstance(self.std_loss, (int, float)) or isinstance(self.std_loss, bool) \
                or not math.isfinite(self.std_loss) or self.std_loss < 0:
            raise JaxUnlearnError(f"std_loss (the SD loss weight λ) must be a finite number >= 0, got {self.std_loss!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise JaxUnlearnError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")
        return self


LR_SCHEDULES = ("triangle", "constant")
LATER_FIELDS = {"std_loss": 0.0, "lr_schedule": "triangle"}


# The paper recipe (CIFAR-10 ResNet-9, as in datamodels / KLoM) and fast digits recipes.
RECIPES: dict[str, Recipe] = {
    "cifar10-resnet9": Recipe(model="resnet9", width=1.0, epochs=24, batch_size=512, peak_lr=0.4, peak_epoch=5,
                              momentum=0.9, nesterov=True, weight_decay=5e-4, crop_pad=2, flip=True),
    "digits-mlp": Recipe(model="mlp", width=1.0, epochs=16, batch_size=64, peak_lr=0.1, peak_epoch=3,
                         weight_decay=5e-4),
    "digits-cnn": Recipe(model="cnn", width=1.0, epochs=12, batch_size=64, peak_lr=0.2, peak_epoch=2,
                         weight_decay=5e-4, crop_pad=1),
}
DEFAULT_RECIPE = {"digits": "digits-mlp", "cifar10": "cifar10-resnet9", "cifar100": "cifar10-resnet9",
                  "svhn": "cifar10-resnet9"}


def default_recipe(dataset: str, model: str | None = None) -> str:
    """The built-in recipe ``train`` uses without ``--recipe``: ``<dataset>-<model>`` when there is one
    (``--model cnn`` on digits: ``digits-cnn``), else the data set's default (its model then replaced)."""
    if model is not None and f"{dataset}-{model}" in RECIPES:
        return f"{dataset}-{model}"
    if dataset not in DEFAULT_RECIPE:
        raise JaxUnlearnError(f"no default recipe for data set {dataset!r}; name one with --recipe")
    return DEFAULT_RECIPE[dataset]


def recipe_from_fields(fields: dict, where: str = "recipe") -> Recipe:
    kinds = {f.name: type(f.default) for f in dataclasses.fields(Recipe)}
    unknown = set(fields) - set(kinds)
    if unknown:
        raise JaxUnlearnError(f"{where}: unknown fields {sorted(unknown)}")
    # JSON's 24.0 for an integer field is 24 (as make_config reads method hyperparameters); 24.5 stays an error
    fields = {k: int(v) if kinds[k] is int and isinstance(v, float) and v.is_integer() else v for k, v in fields.items()}
    return Recipe(**fields).validate()


def load_recipe(name_or_path: str | dict) -> Recipe:
    """A built-in recipe by name, a JSON file of Recipe fields (e.g. experiments/recipes/*.json), or
    the fields themselves (a dict: a recipe written inline in an experiment config)."""
    if isinstance(name_or_path, dict):
        return recipe_from_fields(name_or_path)
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    if name_or_path.endswith(".json") and os.path.isfile(name_or_path):
        try:
            with open(name_or_path) as f:
                fields = json.load(f)
        except (OSError, ValueError) as e:
            raise JaxUnlearnError(f"cannot read recipe {name_or_path!r}: {e}") from None
        if not isinstance(fields, dict):
            raise JaxUnlearnError(f"recipe {name_or_path}: expected a JSON object of recipe fields")
        return recipe_from_fields(fields, f"recipe {name_or_path}")
    raise JaxUnlearnError(f"unknown recipe {name_or_path!r}; choose one of {', '.join(RECIPES)} or a .json file")


def triangle_schedule(peak_lr: float, peak_step: float, total_steps: int):
    """Single-peak linear schedule: 0 at step 0, ``peak_lr`` at ``peak_step``, 0 at ``total_steps``."""
    # host constants (np, float32 as jnp would make them): jnp.array would compile a program here
    xp = np.array([0.0, float(peak_step), float(total_steps)], np.float32)
    fp = np.array([0.0, 1.0, 0.0], np.float32)
    return lambda step: peak_lr * jnp.interp(step, xp, fp)


def make_optimizer(recipe: Recipe, steps_per_epoch: int) -> optax.GradientTransformation:
    """SGD with (Nesterov) momentum, coupled weight decay, triangle (or constant) schedule."""
    if recipe.lr_schedule == "constant":
        schedule = optax.constant_schedule(recipe.peak_lr)
    else:
        schedule = triangle_schedule(recipe.peak_lr, recipe.peak_epoch * steps_per_epoch,
                                     recipe.epochs * steps_per_epoch)
    return optax.chain(optax.add_decayed_weights(recipe.weight_decay),
                       optax.sgd(schedule, momentum=recipe.momentum or None, nesterov=recipe.nesterov))
