"""`jaxunlearn unrolling`: the Unrolling SGD study (Thudi et al. 2022) over a grid of training settings.

For every (learning rate, batch size, SD-loss λ) the trainer trains K full models and their K
"same run without F" twins (same model keys: same w_0 and the same data order, F's points skipped,
:mod:`jaxunlearn.training.subsets`) in one ensemble, constant learning rate as in the authors' code.
With a constant lr the first m epochs of a longer run ARE the m-epoch run, so the epochs axis of
the grid is read off checkpoints of one run. At every checkpoint (one grid cell):

* verification error ‖w_u − w_retrain‖ of (a) doing nothing, (b) single-gradient unlearning,
  (c) baselines (fine-tuning on the retain set, gradient ascent), per model;
* the unlearning-error proxy (η²/2)·t·‖w_t − w_0‖·σ of every full model (σ: power iteration on the
  first ``hessian_points`` training points), w_0 recomputed from each model's key;
* test accuracy of every model.

Output (``--out``): ``cells/*.json`` (one per training setting, reused when its settings match:
the command resumes), ``results.json`` (every cell, correlations of unlearning error with
verification error, the SD-loss summary), ``unlearning_vs_verification.png``, ``sd_loss.png``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics.unrolling import top_hessian_eigenvalue, unlearning_error, verification_error
from jaxunlearn.pipeline.config import _setting_value, read_json_fields, set_item
from jaxunlearn.progress import Progress
from jaxunlearn.training.ensemble import EnsembleFns, model_keys
from jaxunlearn.training.recipe import load_recipe, recipe_from_fields
from jaxunlearn.training.step import smoothed_cross_entropy, std_logit_penalty, make_trainer
from jaxunlearn.training.strategy import ensemble_layout
from jaxunlearn.training.subsets import steps_per_epoch
from jaxunlearn.unlearning.base import UnlearnData, unlearn_ensemble
from jaxunlearn.unlearning.registry import METHODS, NEEDS_INIT, get_method, make_config
from jaxunlearn.unlearning.single_gradient import SingleGradientConfig, single_gradient
from jaxunlearn.utils import make_folder, save_figure_atomic, write_json_atomic

DEFAULT_RECIPES = {"digits": "digits-mlp", "cifar10": "cifar10-resnet9"}


@dataclasses.dataclass(frozen=True)
class UnrollingConfig:
    """The study; every field can be set in a JSON file (``--config``) and by ``--set KEY=VALUE``."""

    dataset: str = "digits"
    data_dir: str | None = None
    recipe: str | dict | None = None  # model, width, dtype, augmentation (None: the data set's default)
    seed: int = 0
    models: int = 4  # models per grid cell (each with its "without F" twin)
    forget_size: int = 32  # |F|, random training points (the authors' code: one batch of 32)
    # the grid; the authors' fine-tuning: lr 0.1, batch 32, SD loss λ in {0, 0.1, 1, 5, ..., 250}
    lrs: tuple[float, ...] = (0.05, 0.1)
    epochs: tuple[int, ...] = (1, 2, 3, 4)
    batch_sizes: tuple[int, ...] = (32, 64)
    std_losses: tuple[float, ...] = (0.0, 1.0, 10.0, 100.0)
    momentum: float = 0.9  # the authors' fine-tuning SGD: momentum 0.9, weight decay 5e-4, constant lr
    weight_decay: float = 5e-4
    hessian_points: int = 512  # the authors' code: first 512 training points, PyHessian's 100 iterations, tol 1e-3
    hessian_iters: int = 100
    hessian_tol: float = 1e-3
    baselines: tuple[str, ...] = ("gd", "ga")
    # per-baseline hyperparameters over the cell's values (gd: the cell's lr, batch, momentum, weight
    # decay and λ, 1 epoch; ga: the library's defaults), e.g. {"ga": {"lr": 0.01}}
    method_overrides: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_json(cls, path: str) -> "UnrollingConfig":
        d = read_json_fields(cls, path, "unrolling", path_fields=("data_dir", "recipe"))
        cfg = cls()
        return cfg.with_overrides([], {k: _setting_value(k, v, getattr(cfg, k)) for k, v in d.items()})

    def with_overrides(self, items, changes: dict | None = None) -> "UnrollingConfig":
        """``["std_losses=[0, 5]", "models=8", "methods.ga.lr=0.01", "recipe.width=0.5"]`` (``--set``)."""
        fields = {f.name for f in dataclasses.fields(self)}
        changes = dict(changes or {})
        overrides = {m: dict(h) for m, h in changes.pop("method_overrides", self.method_overrides).items()}
        for item in items or ():
            key, value = set_item(item, "std_losses=[0,5] or methods.ga.lr=0.01")
            parts = key.split(".")
            if len(parts) == 3 and parts[0] in ("methods", "method_overrides"):
                overrides.setdefault(parts[1], {})[parts[2]] = value
            elif len(parts) == 2 and parts[0] == "recipe":
                recipe = self.base_recipe(changes.get("recipe", self.recipe), changes.get("dataset", self.dataset))
                changes["recipe"] = recipe_from_fields({**recipe.to_dict(), parts[1]: value}, f"--set {key}").to_dict()
            elif len(parts) == 1 and key in fields and key != "method_overrides":
                changes[key] = _setting_value(key, value, getattr(self, key))
            else:
                raise JaxUnlearnError(f"--set {key!r}: not an unrolling setting; choose from "
                                      f"{', '.join(sorted(fields - {'method_overrides'}))}, methods.METHOD.HYPERPARAMETER "
                                      "or recipe.FIELD")
        return dataclasses.replace(self, **changes, method_overrides=overrides).validate()

    @staticmethod
    def base_recipe(recipe, dataset):
        if recipe is None:
            if dataset not in DEFAULT_RECIPES:
                raise JaxUnlearnError(f"unrolling supports datasets {', '.join(DEFAULT_RECIPES)}, got {dataset!r}")
            recipe = DEFAULT_RECIPES[dataset]
        return load_recipe(recipe)

    def validate(self) -> "UnrollingConfig":
        if self.dataset not in DEFAULT_RECIPES:
            raise JaxUnlearnError(f"unrolling supports datasets {', '.join(DEFAULT_RECIPES)}, got {self.dataset!r}")
        self.base_recipe(self.recipe, self.dataset)

        def check(name, values, ok, what):
            if not values or not all(ok(v) for v in values):
                raise JaxUnlearnError(f"{name} must be a non-empty list of {what}, got {list(values)}")
            if len(set(values)) != len(values):
                raise JaxUnlearnError(f"{name} has repeated values: {list(values)}")

        num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
        posint = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
        check("lrs", self.lrs, lambda v: num(v) and v > 0, "learning rates > 0")
        check("epochs", self.epochs, posint, "integers >= 1")
        check("batch_sizes", self.batch_sizes, posint, "integers >= 1")
        check("std_losses", self.std_losses, lambda v: num(v) and v >= 0, "SD loss weights λ >= 0")
        for name in ("models", "forget_size", "hessian_points", "hessian_iters"):
            if not posint(getattr(self, name)):
                raise JaxUnlearnError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("momentum", "weight_decay", "hessian_tol"):
            v = getattr(self, name)
            if not num(v) or v < 0:
                raise JaxUnlearnError(f"{name} must be a finite number >= 0, got {v!r}")
        for m in self.baselines:
            if m not in METHODS or m in NEEDS_INIT or get_method(m).targets is not None:
                ok = [m for m in METHODS if m not in NEEDS_INIT and METHODS[m].targets is None]
                raise JaxUnlearnError(f"unknown baseline {m!r}; choose from {', '.join(ok)}")
        for m in self.method_overrides:
            if m not in self.baselines:
                raise JaxUnlearnError(f"method_overrides names {m!r}, which is not among the baselines {list(self.baselines)}")
        for lr, b, lam in itertools.product(self.lrs, self.batch_sizes, self.std_losses):
            for m in self.baselines:
                self.baseline_config(m, lr, b, lam)  # bad hyperparameters fail here, before any training
        return self

    def cell_recipe(self, lr: float, batch_size: int, std_loss: float):
        return self.base_recipe(self.recipe, self.dataset).replace(
            epochs=max(self.epochs), peak_lr=float(lr), peak_epoch=0.0, batch_size=int(batch_size),
            momentum=float(self.momentum), nesterov=False, weight_decay=float(self.weight_decay),
            std_loss=float(std_loss), lr_schedule="constant").validate()

    def baseline_config(self, method: str, lr: float, batch_size: int, std_loss: float):
        base = {}
        if method == "gd":  # the paper's fine-tuning recipe at this cell's values, one epoch over the retain set
            base = {"lr": lr, "batch_size": batch_size, "momentum": self.momentum, "weight_decay": self.weight_decay,
                    "std_loss": std_loss, "epochs": 1}
        return make_config(method, **{**base, **self.method_overrides.get(method, {})})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d


def pick_forget(n_train: int, size: int, seed: int) -> np.ndarray:
    if size >= n_train:
        raise JaxUnlearnError(f"forget_size {size} must be smaller than the training set ({n_train} points)")
    return np.sort(np.random.default_rng([seed, 14]).choice(n_train, size, replace=False)).astype(np.int64)


def _correlations(x, y) -> dict:
    from scipy import stats

    x, y = np.asarray(x, float), np.asarray(y, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"pearson": None, "spearman": None, "n": int(x.size)}
    return {"pearson": float(stats.pearsonr(x, y)[0]), "spearman": float(stats.spearmanr(x, y)[0]), "n": int(x.size)}


def _cell_digest(what: dict) -> str:
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


class Evaluator:
    """The functions every grid cell shares, compiled once per study: they depend on the model (its
    apply and init), not on the optimizer's lr / batch size, and take λ as a traced number."""

    def __init__(self, cfg: UnrollingConfig, ds, k: int):
        base = cfg.base_recipe(cfg.recipe, cfg.dataset)
        tr = make_trainer(base, ds.num_classes, ds.image_shape, ds.mean, ds.std, 1)
        self.k, self.n_cls = k, ds.num_classes
        self.width = ensemble_layout(base.model, k, jax.local_devices())[1].vmap_width  # per device
        self.init_params = lambda kk: tr.init(kk).params  # noqa: E731  (w_0 from a model key)
        self.data = UnlearnData(jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels), tr.apply_images,
                                init=lambda kk: tuple(tr.init(kk)[:2]))
        self.w0 = jax.jit(jax.vmap(self.init_params))
        self.test = (jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels))
        self.hessian_batch = (self.data.images[:cfg.hessian_points], self.data.labels[:cfg.hessian_points])
        n_cls = ds.num_classes

        def hessian_loss(params, stats, batch):  # the training loss in eval mode, as PyHessian sees the model
            x, y, lam = batch
            logits = tr.apply_images(params, stats, x, False)[0].astype(jnp.float32)
            return smoothed_cross_entropy(logits, y, n_cls) + lam * std_logit_penalty(logits)

        self.hessian_loss = hessian_loss

        def accuracy(params, stats, x, y):
            logits = jax.vmap(lambda p, s: tr.logits(p, s, x))(params, stats)
            return jnp.mean(logits.argmax(-1) == y, axis=-1)

        self._accuracy = jax.jit(accuracy)

    def accuracy(self, params, stats) -> list:
        return np.asarray(self._accuracy(params, stats, *self.test)).tolist()


def run_setting(cfg: UnrollingConfig, ds, ev: Evaluator, forget, lr, batch_size, std_loss, methods) -> list[dict]:
    """Trains one (lr, batch size, λ) ensemble of K full models + K twins; one record per checkpoint epoch."""
    n, k = ds.n_train, cfg.models
    recipe = cfg.cell_recipe(lr, batch_size, std_loss)
    masks = np.ones((2 * k, n), bool)
    masks[k:, forget] = False  # the twins: same keys, F skipped
    spe = steps_per_epoch(masks, batch_size)
    trainer = make_trainer(recipe, ds.num_classes, ds.image_shape, ds.mean, ds.std, spe)
    devs, strat = ensemble_layout(recipe.model, 2 * k, jax.local_devices())
    fns = EnsembleFns(trainer, 2 * k, strat.vmap_width, devs)
    keys = model_keys(cfg.seed, np.concatenate([np.arange(k), np.arange(k)]))
    half = lambda tree, s: jax.tree.map(lambda t: t[s], tree)  # noqa: E731
    full_keys = keys[:k]
    w0 = ev.w0(full_keys)  # recomputed from the keys, never stored
    retain = np.setdiff1d(np.arange(n), forget)
    masks = jnp.asarray(masks)
    states = fns.init(keys)
    records = []
    for e in range(max(cfg.epochs)):
        states, _ = fns.epoch(states, ev.data.images, ev.data.labels, masks, keys, jnp.int32(e))
        m = e + 1
        if m not in cfg.epochs:
            continue
        full_p, full_s = half(states.params, slice(0, k)), half(states.batch_stats, slice(0, k))
        twin_p, twin_s = half(states.params, slice(k, None)), half(states.batch_stats, slice(k, None))
        out = {"none": (full_p, full_s, np.zeros(k))}
        sg_cfg = SingleGradientConfig(lr=float(lr), std_loss=float(std_loss), epochs=m, batch_size=int(batch_size))
        out["single-gradient"] = unlearn_ensemble(single_gradient, full_p, full_s, ev.data, forget, retain, None,
                                                  full_keys, sg_cfg, ev.width)
        for j, name in enumerate(methods):
            mcfg = cfg.baseline_config(name, lr, batch_size, std_loss)
            mkeys = jax.vmap(lambda kk: jax.random.fold_in(kk, 1000 + j))(full_keys)
            out[name] = unlearn_ensemble(get_method(name).fn, full_p, full_s, ev.data, forget, retain, None, mkeys,
                                         mcfg, ev.width)
        t = m * spe - 1  # the authors' step index: steps taken - 1
        eig = top_hessian_eigenvalue(ev.hessian_loss, full_p, (*ev.hessian_batch, jnp.float32(std_loss)),
                                     state=full_s, key=jax.random.key(cfg.seed), iters=cfg.hessian_iters,
                                     tol=cfg.hessian_tol)
        ue = unlearning_error(float(lr), t, full_p, w0, eig)
        records.append({
            "lr": float(lr), "batch_size": int(batch_size), "std_loss": float(std_loss), "epochs": m,
            "steps": m * spe, "t": t,
            "top_eigenvalue": np.asarray(eig).tolist(),
            "weight_distance": np.asarray(verification_error(full_p, w0)).tolist(),
            "unlearning_error": np.asarray(ue).tolist(),
            "verification_error": {name: np.asarray(verification_error(v[0], twin_p)).tolist()
                                   for name, v in out.items()},
            "test_accuracy": {"retrain": ev.accuracy(twin_p, twin_s),
                              **{name: ev.accuracy(v[0], v[1]) for name, v in out.items()}},
            "cost": {name: float(np.mean(v[2])) for name, v in out.items()},
        })
    return records


def summarize(cfg: UnrollingConfig, cells: list[dict]) -> dict:
    methods = list(cells[0]["verification_error"])
    ue = [u for c in cells for u in c["unlearning_error"]]
    corr = {m: _correlations(ue, [v for c in cells for v in c["verification_error"][m]]) for m in methods}
    # within one training loss (λ fixed): the pooled correlation mixes regimes (a collapsed large-λ model has
    # a large Hessian but a small weight change)
    corr_lam = {}
    for lam in cfg.std_losses:
        cs = [c for c in cells if c["std_loss"] == float(lam)]
        u = [x for c in cs for x in c["unlearning_error"]]
        corr_lam[str(float(lam))] = {m: _correlations(u, [v for c in cs for v in c["verification_error"][m]])
                                     for m in methods}
    by_lam = {}
    for lam in cfg.std_losses:
        cs = [c for c in cells if c["std_loss"] == float(lam)]
        by_lam[str(float(lam))] = {
            "verification_error": {m: float(np.mean([c["verification_error"][m] for c in cs])) for m in methods},
            "test_accuracy": {m: float(np.mean([c["test_accuracy"][m] for c in cs]))
                              for m in cs[0]["test_accuracy"]},
            "unlearning_error": float(np.mean([c["unlearning_error"] for c in cs])),
            "weight_distance": float(np.mean([c["weight_distance"] for c in cs])),
        }
    none = np.array([v for c in cells for v in c["verification_error"]["none"]])
    sg = np.array([v for c in cells for v in c["verification_error"]["single-gradient"]])
    return {
        "correlation_unlearning_vs_verification": corr,
        "correlation_by_std_loss": corr_lam,
        "sd_loss": by_lam,
        "single_gradient_vs_none": {"fraction_of_models_lower": float(np.mean(sg < none)),
                                    "median_ratio": float(np.median(sg / none)),
                                    "mean_none": float(none.mean()), "mean_single_gradient": float(sg.mean())},
        "cells": len(cells), "models_per_cell": cfg.models,
    }


def plot(cells: list[dict], summary: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = sorted({c["std_loss"] for c in cells})
    cmap = plt.get_cmap("viridis", max(2, len(lams)))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, m in zip(axes, ("single-gradient", "none")):
        for i, lam in enumerate(lams):
            cs = [c for c in cells if c["std_loss"] == lam]
            ax.scatter([u for c in cs for u in c["unlearning_error"]],
                       [v for c in cs for v in c["verification_error"][m]], s=10, color=cmap(i), label=f"λ={lam:g}")
        r = summary["correlation_unlearning_vs_verification"][m]
        fmt = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        ax.set(xscale="log", yscale="log", xlabel="unlearning error (η²/2)·t·‖w_t−w_0‖·σ",
               ylabel=f"verification error ({m})",
               title=f"{m}: Pearson {fmt(r['pearson'])}, Spearman {fmt(r['spearman'])}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure_atomic(fig, os.path.join(out, "unlearning_vs_verification.png"))

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    x = [float(v) for v in summary["sd_loss"]]
    xs = [v if v > 0 else min([u for u in x if u > 0] or [1.0]) / 10 for v in x]  # λ = 0 drawn a decade left
    for m in cells[0]["verification_error"]:
        a1.plot(xs, [summary["sd_loss"][k]["verification_error"][m] for k in summary["sd_loss"]], "o-", label=m)
    a1.set(xscale="log", xlabel="SD loss λ (0 drawn at the left end)", ylabel="mean verification error",
           title="verification error vs SD loss λ")
    a1.legend(fontsize=8)
    for m in ("none", "retrain", "single-gradient"):
        a2.plot(xs, [100 * summary["sd_loss"][k]["test_accuracy"][m] for k in summary["sd_loss"]], "o-", label=m)
    a2.set(xscale="log", xlabel="SD loss λ", ylabel="mean test accuracy (%)", title="test accuracy vs SD loss λ")
    a2.legend(fontsize=8)
    fig.tight_layout()
    save_figure_atomic(fig, os.path.join(out, "sd_loss.png"))


def run_unrolling(cfg: UnrollingConfig, out: str, progress: bool = True) -> dict:
    """Runs (or resumes) the study into ``out``; returns results.json's content."""
    from jaxunlearn.data import load_dataset

    cfg = cfg.validate()
    ds = load_dataset(cfg.dataset, cfg.data_dir)
    forget = pick_forget(ds.n_train, cfg.forget_size, cfg.seed)
    for b in cfg.batch_sizes:
        if b > ds.n_train - cfg.forget_size:
            raise JaxUnlearnError(f"batch size {b} is larger than the retain set ({ds.n_train - cfg.forget_size} points)")
    make_folder(out)
    os.makedirs(os.path.join(out, "cells"), exist_ok=True)
    ev = None
    shared = {k: v for k, v in cfg.to_dict().items() if k not in ("lrs", "batch_sizes", "std_losses", "data_dir")}
    shared["recipe"] = cfg.base_recipe(cfg.recipe, cfg.dataset).to_dict()
    shared["data"] = ds.fingerprint()
    settings = list(itertools.product(cfg.lrs, cfg.batch_sizes, cfg.std_losses))
    bar = Progress(len(settings) * len(cfg.epochs), f"unrolling {cfg.dataset}", progress, unit="cell")
    cells, reused = [], 0
    try:
        for i, (lr, b, lam) in enumerate(settings):
            what = {**shared, "lr": float(lr), "batch_size": int(b), "std_loss": float(lam)}
            path = os.path.join(out, "cells", f"lr{float(lr):g}_bs{int(b)}_sd{float(lam):g}.json")
            records = None
            if os.path.isfile(path):
                try:
                    with open(path) as f:
                        old = json.load(f)
                    if old.get("digest") == _cell_digest(what):
                        records, reused = old["records"], reused + 1
                except (OSError, json.JSONDecodeError, KeyError):
                    records = None
            if records is None:
                ev = ev or Evaluator(cfg, ds, cfg.models)
                records = run_setting(cfg, ds, ev, forget, lr, b, lam, cfg.baselines)
                write_json_atomic(path, {"digest": _cell_digest(what), "settings": what, "records": records})
            cells.extend(records)
            bar((i + 1) * len(cfg.epochs))
    finally:
        bar.close()
    summary = summarize(cfg, cells)
    res = {"config": cfg.to_dict(), "recipe": shared["recipe"], "n_train": ds.n_train,
           "forget_idx": forget.tolist(), "summary": summary, "settings_reused": reused, "cells": cells}
    write_json_atomic(os.path.join(out, "results.json"), res)
    plot(cells, summary, out)
    return res


def summary_table(res: dict) -> str:
    s = res["summary"]
    lines = [f"{s['cells']} grid cells x {s['models_per_cell']} models ({res['settings_reused']} training settings reused)",
             "correlation of unlearning error with verification error:"]
    for m, r in s["correlation_unlearning_vs_verification"].items():
        p = "n/a" if r["pearson"] is None else f"{r['pearson']:+.3f}"
        sp = "n/a" if r["spearman"] is None else f"{r['spearman']:+.3f}"
        lines.append(f"  {m:<16} Pearson {p}  Spearman {sp}  (n={r['n']})")
    methods = list(next(iter(s["sd_loss"].values()))["verification_error"])
    lines.append("SD loss λ | mean verification error: " + ", ".join(methods) + " | test acc (full models)"
                 " | Pearson/Spearman of single-gradient within λ")
    for lam, v in s["sd_loss"].items():
        r = s["correlation_by_std_loss"][lam]["single-gradient"]
        rs = "n/a" if r["pearson"] is None else f"{r['pearson']:+.2f}/{r['spearman']:+.2f}"
        lines.append(f"  {float(lam):>7g} | " + "  ".join(f"{v['verification_error'][m]:.4f}" for m in methods)
                     + f" | {100 * v['test_accuracy']['none']:.2f}% | {rs}")
    g = s["single_gradient_vs_none"]
    lines.append(f"single-gradient below doing nothing for {100 * g['fraction_of_models_lower']:.1f}% of models "
                 f"(median ratio {g['median_ratio']:.3f})")
    return "\n".join(lines)
