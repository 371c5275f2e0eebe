"""Pipeline configuration: what `jaxunlearn pipeline --config FILE` and `jaxunlearn demo` run."""
from __future__ import annotations

import dataclasses
import json
import os

from jaxunlearn.attribution.effects import ESTIMATORS
from jaxunlearn.attribution.influence import DEFAULT_THRESHOLDS
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.unlearning.registry import ALL_METHODS, get_method, make_config
from jaxunlearn.utils import check_field_types, is_integer


def _setting_value(key: str, value, current):
    """``value`` (parsed from --set) checked against the kind of setting ``key`` is."""
    if isinstance(current, tuple):  # a list setting; a lone string is a one-item list
        if isinstance(value, str) and value.strip().startswith("["):  # [a, b] without JSON's quotes
            raise JaxUnlearnError(f"--set {key}={value}: a list of strings is written as JSON, "
                                  f"{key}='[\"a\", \"b\"]' (quoted for the shell), or one item bare: {key}=a")
        value = [value] if isinstance(value, str) else value
        if not isinstance(value, list) or not all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                                  for v in value):
            raise JaxUnlearnError(f"--set {key}: expected a list such as [\"a\", \"b\"] or [1, 2], got {value!r}")
        return tuple(value)
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise JaxUnlearnError(f"--set {key}: expected true or false, got {value!r}")
    elif isinstance(current, int) and key != "epochs" and key != "chunk":
        if not isinstance(value, int) or isinstance(value, bool):
            raise JaxUnlearnError(f"--set {key}: expected an integer, got {value!r}")
    elif isinstance(current, float):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise JaxUnlearnError(f"--set {key}: expected a number, got {value!r}")
        return float(value)
    elif key in ("epochs", "chunk") and value is not None and (not isinstance(value, int) or isinstance(value, bool)):
        raise JaxUnlearnError(f"--set {key}: expected an integer or null, got {value!r}")
    elif isinstance(current, str) and key != "recipe" and not isinstance(value, str):
        raise JaxUnlearnError(f"--set {key}: expected a string, got {value!r}")
    return value


def set_item(item: str, example: str = "") -> tuple[str, object]:
    """One ``--set KEY=VALUE`` item -> (key, value): the value read as JSON where it parses (numbers,
    lists, null, booleans), else kept as the string. No "=" or no key: one clear error."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise JaxUnlearnError(f"--set {item!r}: write KEY=VALUE" + (f", e.g. {example}" if example else ""))
    try:
        return key, json.loads(raw)
    except json.JSONDecodeError:
        return key, raw


def read_json_config(cls, path: str, what: str, tuple_fields=(), path_fields=()):
    """A frozen dataclass ``cls`` from JSON file ``path`` (see :func:`read_json_fields`). Shared by
    every subcommand's config."""
    d = read_json_fields(cls, path, what, tuple_fields, path_fields)
    try:
        return cls(**d)
    except TypeError as e:
        raise JaxUnlearnError(f"{what} config {path}: {e}") from None


def read_json_fields(cls, path: str, what: str, tuple_fields=(), path_fields=()) -> dict:
    """The fields of dataclass ``cls`` in JSON file ``path``: keys starting with "_" are comments,
    unknown keys are one clear error, ``tuple_fields`` become tuples and relative ``path_fields``
    (strings; ``recipe`` only when it names a .json file) are relative to the file."""
    try:
        with open(path) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise JaxUnlearnError(f"cannot read {what} config {path!r}: {e}") from None
    if not isinstance(d, dict):
        raise JaxUnlearnError(f"{what} config {path}: expected a JSON object")
    d = {k: v for k, v in d.items() if not k.startswith("_")}
    unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise JaxUnlearnError(f"{what} config {path}: unknown keys {sorted(unknown)}")
    for k in tuple_fields:
        if isinstance(d.get(k), list):
            d[k] = tuple(d[k])
    base = os.path.dirname(os.path.abspath(path))
    for k in path_fields:
        v = d.get(k)
        if isinstance(v, str) and (k != "recipe" or v.endswith(".json")) and not os.path.isabs(v):
            d[k] = os.path.normpath(os.path.join(base, v))
    return d


def set_fields(cfg, items, what: str, dict_fields=()):
    """``cfg`` (a frozen dataclass) with ``--set KEY=VALUE`` items applied: a field, or ``F.K`` for key
    K of a dict field F in ``dict_fields``. Values parse as JSON where they can, else as strings;
    each is checked against the kind of its setting (one clear error)."""
    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes: dict = {}
    for item in items or ():
        key, value = set_item(item)
        parts = key.split(".")
        if len(parts) == 2 and parts[0] in dict_fields:
            d = dict(changes.get(parts[0], getattr(cfg, parts[0])))
            d[parts[1]] = value
            changes[parts[0]] = d
        elif len(parts) == 1 and key in fields and key not in dict_fields:
            current = getattr(cfg, key)
            changes[key] = value if current is None else _setting_value(key, value, current)
        else:
            raise JaxUnlearnError(f"--set {key!r}: not a {what} setting; choose from {', '.join(fields)}"
                                  + "".join(f", {d}.NAME" for d in dict_fields))
    return dataclasses.replace(cfg, **changes)


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    dataset: str = "digits"
    data_dir: str | None = None
    recipe: str | dict = "digits-mlp"  # a built-in name, a .json file, or the recipe's fields inline
    epochs: int | None = None  # override the recipe's epochs
    seed: int = 0
    datamodel_models: int = 1500  # subset models (alpha) for datamodels; 20% held out for LDS
    alpha: float = 0.5
    full_models: int = 64  # K full and K oracle models; methods use the first half, KLoM the second
    forget_sets: tuple[str, ...] = ("random:30", "cluster:10:0")
    methods: tuple[str, ...] = ALL_METHODS
    # per-method hyperparameters over the library defaults (the papers' recipes), e.g.
    # {"dmm": {"lr": 3e-4, "epochs": 2}, "scrub": {"max_steps": 1}}
    method_overrides: dict = dataclasses.field(default_factory=dict)
    # how DM-Direct/DMM estimate the effect of removing F on every logit of every point:
    # "influence" (subsampling influence, denoised; the reference code's estimator), "ridge", or
    # "lasso" (the forget points' own logits from lasso datamodels, every other logit from ridge)
    forget_effects: str = "influence"
    # soft-threshold multiples (of each estimate's standard error) for the influence estimates;
    # the one with the best held-out LDS of margins is used
    influence_thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    lasso_targets: int = 100  # lasso is fitted for this many margin targets (LDS comparison)
    lds_points: int = 20000  # ridge LDS on margins of at most this many points (memory: points × n_train)
    lasso_iters: int = 50  # FISTA iterations per λ (warm-started path; on digits 50 and 200 give the same LDS)
    chunk: int | None = None
    # KLoM's binning: "inclusive" (every sample counted) or "reference" (data-unlearning-bench's run.py /
    # eval.py np.digitize binning, which drops samples equal to the pooled maximum; not its older
    # auditors/direct.py, see README)
    klom_binning: str = "inclusive"
    # "oracle||unlearned" (what data-unlearning-bench's run.py computes) or "unlearned||oracle" (EasyDUB)
    klom_direction: str = "oracle||unlearned"

    @classmethod
    def from_json(cls, path: str) -> "PipelineConfig":
        # "_note" and the like are comments; relative paths are relative to the config file
        return read_json_config(cls, path, "pipeline", tuple_fields=("forget_sets", "methods", "influence_thresholds"),
                                path_fields=("data_dir", "recipe")).validate()

    def validate(self) -> "PipelineConfig":
        """Every setting checked before anything is trained or written (types, ranges, names, the recipe)."""
        check_field_types(self, "pipeline config", skip=("recipe",))  # a name, a .json file or its fields
        for name, v, low in (("seed", self.seed, 0), ("lasso_targets", self.lasso_targets, 1),
                             ("lds_points", self.lds_points, 1), ("lasso_iters", self.lasso_iters, 1),
                             ("epochs", self.epochs, 1), ("chunk", self.chunk, 1)):
            if v is not None and (not is_integer(v) or v < low):
                null = " (or null)" if name in ("epochs", "chunk") else ""
                raise JaxUnlearnError(f"{name} must be an integer >= {low}{null}, got {v!r}")
        if not 0 < self.alpha <= 1:
            raise JaxUnlearnError(f"alpha must lie in (0, 1], got {self.alpha}")
        if self.data_dir is not None and not isinstance(self.data_dir, str):
            raise JaxUnlearnError(f"data_dir must be a folder (a string), got {self.data_dir!r}")
        if not isinstance(self.recipe, (str, dict)):
            raise JaxUnlearnError(f"recipe must be a recipe name, a .json file or its fields, got {self.recipe!r}")
        from jaxunlearn.training.recipe import load_recipe

        load_recipe(self.recipe).with_epochs(self.epochs).validate()
        for m in self.methods:
            if "@" in m:
                get_method(m)  # METHOD@MASK: names the part that is unknown
            elif m not in ALL_METHODS:
                raise JaxUnlearnError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)} or METHOD@MASK")
        if self.full_models < 4 or self.full_models % 2:
            raise JaxUnlearnError(f"full_models must be an even number >= 4, got {self.full_models}")
        if self.datamodel_models < 20:
            raise JaxUnlearnError(f"datamodel_models must be >= 20, got {self.datamodel_models}")
        if self.forget_effects not in ESTIMATORS:
            raise JaxUnlearnError(f"forget_effects must be one of {', '.join(ESTIMATORS)}, got {self.forget_effects!r}")
        if not self.influence_thresholds or any(not (t >= 0) for t in self.influence_thresholds):
            raise JaxUnlearnError(f"influence_thresholds must be numbers >= 0, got {self.influence_thresholds}")
        if not self.forget_sets:
            raise JaxUnlearnError("no forget sets given")
        from jaxunlearn.metrics.klom import BINNINGS, DIRECTIONS

        if self.klom_binning not in BINNINGS:
            raise JaxUnlearnError(f"klom_binning must be one of {', '.join(BINNINGS)}, got {self.klom_binning!r}")
        if self.klom_direction not in DIRECTIONS:
            raise JaxUnlearnError(f"klom_direction must be one of {', '.join(DIRECTIONS)}, got {self.klom_direction!r}")
        for name, over in self.method_overrides.items():
            self.method_config(name, over)  # unknown methods / hyperparameters fail here
        return self

    def with_overrides(self, items) -> "PipelineConfig":
        """``["forget_effects=lasso", "full_models=100", "methods.dmm.lr=0.01"]`` (the CLI's ``--set``):
        a field of this config, ``methods.M.P`` for hyperparameter P of method M, or ``recipe.F`` for
        field F of the training recipe (the recipe is then written inline). Values are read as JSON
        where they parse (numbers, lists, null), else as strings."""
        fields = {f.name: f for f in dataclasses.fields(self)}
        changes: dict = {}
        overrides = {m: dict(h) for m, h in self.method_overrides.items()}
        for item in items or ():
            key, value = set_item(item, "forget_effects=lasso or methods.dmm.lr=0.01")
            parts = key.split(".")
            if len(parts) == 3 and parts[0] in ("methods", "method_overrides"):
                overrides.setdefault(parts[1], {})[parts[2]] = value
            elif len(parts) == 2 and parts[0] == "recipe":
                from jaxunlearn.training.recipe import load_recipe, recipe_from_fields

                recipe = load_recipe(changes.get("recipe", self.recipe)).to_dict()
                recipe[parts[1]] = value
                changes["recipe"] = recipe_from_fields(recipe, f"--set {key}").to_dict()
            elif len(parts) == 1 and parts[0] in fields and key != "method_overrides":
                changes[key] = _setting_value(key, value, getattr(self, key))
            else:
                raise JaxUnlearnError(f"--set {key!r}: not a pipeline setting; choose from "
                                      f"{', '.join(f for f in fields if f != 'method_overrides')}, "
                                      "methods.METHOD.HYPERPARAMETER or recipe.FIELD")
        return dataclasses.replace(self, **changes, method_overrides=overrides).validate()

    def method_kwargs(self, name: str) -> dict:
        """This config's hyperparameters for a method (over the method's defaults). ``METHOD@MASK``
        starts from METHOD's (the same recipe, restricted), then its own."""
        base = self.method_overrides.get(name.partition("@")[0], {}) if "@" in name else {}
        return {**base, **self.method_overrides.get(name, {})}

    def method_config(self, name: str, extra: dict | None = None):
        """The config a method runs with: its defaults, updated by :meth:`method_kwargs` and ``extra``."""
        return make_config(name, **{**self.method_kwargs(name), **(extra or {})})
