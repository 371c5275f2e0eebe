"""Pipeline configuration: what `jaxunlearn pipeline --config FILE` and `jaxunlearn demo` run."""
from __future__ import annotations

import dataclasses
import json
import os

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.unlearning.registry import ALL_METHODS, make_config

METHODS = ALL_METHODS


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    recipe: str = "digits-mlp"
    epochs: int | None = None  # override the recipe's epochs
    seed: int = 0
    datamodel_models: int = 1500  # subset models (alpha) for datamodels; 20% held out for LDS
    alpha: float = 0.5
    full_models: int = 64  # K full and K oracle models; methods use the first half, KLoM the second
    forget_sets: tuple[str, ...] = ("random:30", "cluster:10:0")
    methods: tuple[str, ...] = METHODS
    om_epochs: int = 8  # measured on digits: 8 epochs / lr 0.02 brings OM to the noise floor, 4 / 0.01 does not
    om_lr: float = 0.02
    om_batch_size: int = 64
    om_retain_per_epoch: int = 256
    # per-method hyperparameter overrides, e.g. {"ga": {"lr": 0.001}, "scrub": {"max_steps": 1}}
    method_overrides: dict = dataclasses.field(default_factory=dict)
    # how DM-Direct/DMM estimate the effect of removing F: "ridge" (every logit of every point), or
    # "lasso" (the forget points' own logits from lasso datamodels, every other logit from ridge)
    forget_effects: str = "ridge"
    lasso_targets: int = 100  # lasso is fitted for this many margin targets (LDS comparison)
    lds_points: int = 20000  # ridge LDS on margins of at most this many points (memory: points × n_train)
    lasso_iters: int = 50  # FISTA iterations per λ (warm-started path; on digits 50 and 200 give the same LDS)
    chunk: int | None = None

    @classmethod
    def from_json(cls, path: str) -> "PipelineConfig":
        try:
            with open(path) as f:
                d = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise JaxUnlearnError(f"cannot read pipeline config {path!r}: {e}") from None
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise JaxUnlearnError(f"pipeline config {path}: unknown keys {sorted(unknown)}")
        for k in ("forget_sets", "methods"):
            if k in d:
                d[k] = tuple(d[k])
        base = os.path.dirname(os.path.abspath(path))  # relative paths are relative to the config file
        if d.get("data_dir") and not os.path.isabs(d["data_dir"]):
            d["data_dir"] = os.path.normpath(os.path.join(base, d["data_dir"]))
        if str(d.get("recipe", "")).endswith(".json") and not os.path.isabs(d["recipe"]):
            d["recipe"] = os.path.normpath(os.path.join(base, d["recipe"]))
        return cls(**d).validate()

    def validate(self) -> "PipelineConfig":
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise JaxUnlearnError(f"unknown method {bad[0]!r}; choose from {', '.join(METHODS)}")
        if self.full_models < 4 or self.full_models % 2:
            raise JaxUnlearnError(f"full_models must be an even number >= 4, got {self.full_models}")
        if self.datamodel_models < 20:
            raise JaxUnlearnError(f"datamodel_models must be >= 20, got {self.datamodel_models}")
        if self.forget_effects not in ("ridge", "lasso"):
            raise JaxUnlearnError(f"forget_effects must be 'ridge' or 'lasso', got {self.forget_effects!r}")
        if not self.forget_sets:
            raise JaxUnlearnError("no forget sets given")
        for name, over in self.method_overrides.items():
            self.method_config(name, over)  # unknown methods / hyperparameters fail here
        return self

    def method_kwargs(self, name: str) -> dict:
        """This config's hyperparameters for a method: the om_* fields for OM/DMM, then overrides."""
        base = {}
        if name in ("oracle-matching", "dmm"):
            base = {"epochs": self.om_epochs, "lr": self.om_lr, "batch_size": self.om_batch_size,
                    "retain_per_epoch": self.om_retain_per_epoch}
        return {**base, **self.method_overrides.get(name, {})}

    def method_config(self, name: str, extra: dict | None = None):
        """The config a method runs with: its defaults, updated by :meth:`method_kwargs` and ``extra``."""
        return make_config(name, **{**self.method_kwargs(name), **(extra or {})})
