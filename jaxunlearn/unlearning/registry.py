"""Every unlearning method by name, with its config class and where its targets come from.

Adding a method = one file with ``method(params, model_state, data, forget_idx, retain_idx,
targets, key, config)`` and a config class, plus one line here.

``METHOD@MASK`` names any method restricted to a localization mask (``neggrad+@del``,
``random-labels@saliency``, ``gd@random``; masks in :mod:`jaxunlearn.localization`): its config is
the method's plus the mask fields, and it runs wherever a method name is accepted.
"""
from __future__ import annotations

import dataclasses
import math
import itertools
from typing import Callable, NamedTuple

import numpy as np

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.localization.masks import CHANNEL_REDUCES, MASKS
from jaxunlearn.unlearning.del_unlearning import DELConfig, del_unlearning
from jaxunlearn.unlearning.ga import GAConfig, gradient_ascent
from jaxunlearn.unlearning.gd import GDConfig, finetune_retain
from jaxunlearn.unlearning.l1_sparse import L1SparseConfig, l1_sparse
from jaxunlearn.unlearning.neggrad_plus import NegGradPlusConfig, neggrad_plus
from jaxunlearn.unlearning.oracle_matching import OPTIMIZERS, DMMConfig, OracleMatchingConfig, oracle_matching
from jaxunlearn.unlearning.random_labels import RandomLabelsConfig, random_labels
from jaxunlearn.unlearning.restricted import restricted_config, restricted_fn
from jaxunlearn.unlearning.salun import SalUnConfig, salun
from jaxunlearn.unlearning.scrub import SCRUBConfig, scrub
from jaxunlearn.unlearning.single_gradient import SingleGradientConfig, single_gradient


class Method(NamedTuple):
    fn: Callable
    config: type
    targets: str | None  # "oracle" (oracle logits), "datamodel" (DM-Direct's predicted logits) or None


METHODS: dict[str, Method] = {
    "oracle-matching": Method(oracle_matching, OracleMatchingConfig, "oracle"),
    "dmm": Method(oracle_matching, DMMConfig, "datamodel"),
    "ga": Method(gradient_ascent, GAConfig, None),
    "gd": Method(finetune_retain, GDConfig, None),
    "neggrad+": Method(neggrad_plus, NegGradPlusConfig, None),
    "scrub": Method(scrub, SCRUBConfig, None),
    "random-labels": Method(random_labels, RandomLabelsConfig, None),
    "salun": Method(salun, SalUnConfig, None),
    "l1-sparse": Method(l1_sparse, L1SparseConfig, None),
    "del": Method(del_unlearning, DELConfig, None),
    "single-gradient": Method(single_gradient, SingleGradientConfig, None),
}
# methods that need the training run's initial weights w_0 (UnlearnData.init and the models' own keys):
# run by `jaxunlearn unrolling`, not by the pipeline (whose models train on a triangle schedule)
NEEDS_INIT = ("single-gradient",)
# every name a pipeline can run, in table order: METHODS plus "none" (the full models unchanged) and
# "dm-direct" (DM-Direct's predictions: no parameter update, so no entry in METHODS)
ALL_METHODS = ("none", "oracle-matching", "dm-direct",
               *(m for m in METHODS if m != "oracle-matching" and m not in NEEDS_INIT))


_UNIT = ("(0, 1]", lambda v: 0 < v <= 1)
UNIT_INTERVAL = {"saliency_fraction": _UNIT, "beta": ("[0, 1]", lambda v: 0 <= v <= 1), "lr_decay": _UNIT,
                 "mask_fraction": _UNIT, "mask_channel_topk": _UNIT, "lr_floor": ("[0, 1]", lambda v: 0 <= v <= 1)}


def get_method(name: str) -> Method:
    """A registered method by name, or ``METHOD@MASK``: that method restricted to a localization mask."""
    if "@" in name:
        base, _, mask = name.partition("@")
        if base not in METHODS:
            raise JaxUnlearnError(f"{name!r}: unknown method {base!r} before '@'; choose from {', '.join(METHODS)}")
        if mask not in MASKS:
            raise JaxUnlearnError(f"{name!r}: unknown mask {mask!r} after '@'; choose from {', '.join(MASKS)}")
        m = METHODS[base]
        return Method(restricted_fn(m.fn, mask), restricted_config(m.config, mask), m.targets)
    if name not in METHODS:
        raise JaxUnlearnError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (or METHOD@MASK, "
                              f"MASK one of {', '.join(MASKS)})")
    return METHODS[name]


def hyperparameters(name: str) -> dict[str, type]:
    """Hyperparameter names of a method and their types (int, float or str)."""
    return {f.name: type(f.default) for f in dataclasses.fields(get_method(name).config)}


ZERO_ALLOWED = {"max_steps", "pool_seed", "retain_per_epoch", "train_head",  # integers that may be 0
                "batch_size@single-gradient"}  # (KEY@METHOD: only for that method)
CHOICES = {"optimizer": OPTIMIZERS, "mask_channel_reduce": CHANNEL_REDUCES}


def _checked_value(name: str, k: str, kind: type, v):
    """One hyperparameter value by the rules every config obeys; returns it as ``kind``."""
    if kind is str:
        if v not in CHOICES.get(k, (v,)):
            raise JaxUnlearnError(f"{name}: {k} must be one of {', '.join(CHOICES[k])}, got {v!r}")
        return v
    if kind is int:
        try:
            ok = float(v) == int(float(v))
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise JaxUnlearnError(f"{name}: {k} must be an integer, got {v!r}")
        v = int(float(v))
        base = name.split("@")[0]  # METHOD@MASK: the method's own rules
        if v < 0 or (k not in ZERO_ALLOWED and f"{k}@{base}" not in ZERO_ALLOWED and v == 0):
            raise JaxUnlearnError(f"{name}: {k} must be positive, got {v}")
        return v
    try:
        v = float(v)
    except (TypeError, ValueError):
        raise JaxUnlearnError(f"{name}: {k} must be a number, got {v!r}") from None
    if not math.isfinite(v) or v < 0:
        raise JaxUnlearnError(f"{name}: {k} must be a finite number >= 0, got {v}")
    if k in UNIT_INTERVAL and not UNIT_INTERVAL[k][1](v):
        raise JaxUnlearnError(f"{name}: {k} must lie in {UNIT_INTERVAL[k][0]}, got {v}")
    return v


def make_config(name: str, **overrides):
    """The method's config with ``overrides``; unknown names and wrong types are clear errors."""
    kinds = hyperparameters(name)
    clean = {}
    for k, v in overrides.items():
        if k not in kinds:
            raise JaxUnlearnError(f"{name} has no hyperparameter {k!r}; it has {', '.join(kinds)}")
        clean[k] = _checked_value(name, k, kinds[k], v)
    return get_method(name).config(**clean)


def check_config(config, method: Callable | None = None) -> None:
    """A config however it was built (:func:`make_config`, or its class called directly as in the
    README's example) obeys :func:`make_config`'s rules: finite non-negative numbers, positive
    integers where a size or count, fractions in their interval. With ``method``, a registered
    method's function, the config must be of (a base of) that method's config class."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise JaxUnlearnError(f"config must be a method's config instance (e.g. GDConfig(...) or "
                              f"make_config('gd', ...)), got {type(config).__name__}")
    cls = type(config)
    names = {f.name for f in dataclasses.fields(config)}
    expected = [m.config for m in METHODS.values() if m.fn is method]
    # a config of the method's class, a subclass, or any class with all of its fields (MatchingConfig for OM)
    if expected and not any({f.name for f in dataclasses.fields(c)} <= names for c in expected):
        raise JaxUnlearnError(f"{cls.__name__} is not a config of this method; it takes "
                              f"{' or '.join(c.__name__ for c in expected)}")
    registered = {m.config: n for n, m in METHODS.items()}
    name = next((registered[c] for c in cls.__mro__ if c in registered), cls.__name__)  # whose rules apply
    for f in dataclasses.fields(config):
        if f.default is dataclasses.MISSING or f.default is None:
            continue  # no kind to hold it to (a field of a user's own config class)
        kind = type(f.default)
        value = getattr(config, f.name)
        for v in (np.ravel(np.asarray(value)) if kind is not str else [value]):
            _checked_value(name, f.name, kind, v.item() if hasattr(v, "item") else v)


def grid_axes(items) -> dict:
    """``["lr=0.01,0.02", "epochs=2,4"]`` -> ``{"lr": [0.01, 0.02], "epochs": [2.0, 4.0]}`` (in order);
    a malformed, repeated or non-numeric entry is one clear error."""
    axes = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise JaxUnlearnError(f"bad grid entry {item!r}; write NAME=V1,V2,...")
        if key in axes:
            raise JaxUnlearnError(f"grid names {key!r} twice")
        try:
            axes[key] = [float(v) for v in values.split(",")]
        except ValueError:
            raise JaxUnlearnError(f"bad grid entry {item!r}: values must be numbers") from None
    if not axes:
        raise JaxUnlearnError("empty grid; give at least one NAME=V1,V2,...")
    return axes


def parse_grid(name: str, items, base: dict | None = None) -> list:
    """``["lr=0.01,0.02", "epochs=2,4"]`` -> the configs of the Cartesian product, in order; fields
    the grid does not name come from ``base`` (e.g. a pipeline's overrides), then the defaults."""
    axes = grid_axes(items)
    names = list(axes)
    return [make_config(name, **{**(base or {}), **dict(zip(names, combo))})
            for combo in itertools.product(*axes.values())]


def config_dict(config) -> dict:
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
