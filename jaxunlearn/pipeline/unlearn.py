"""The unlearning pipeline end to end: ensembles -> datamodels -> methods -> KLoM, accuracy, compute.

Folder layout of ``out/``: ``datamodels/`` (subset run), ``full/`` (K models on S),
``oracle-<spec>/`` (K models on S∖F, same seeds: oracle k is "full model k without F"),
``datamodel-fits/`` (datamodel fits, keyed by what they read), ``results.json``, ``pareto.png``.
Every run folder resumes, and a later run or sweep on the folder reuses the datamodel fit.

Methods unlearn full models 0..K/2-1; OM takes its targets from oracles 0..K/2-1; KLoM compares
against oracles K/2..K-1, and the noise floor is KLoM between the two oracle halves. The MIA fits
its "in" Gaussians on full models K/2..K-1, "out" on oracles 0..K/2-1, and uses oracles
K/2..K-1 as its held-out negatives.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.attribution import fit_lasso, fit_ridge, forget_set_effects, influence_lds, lds
from jaxunlearn.data import load_dataset
from jaxunlearn.data.forget_sets import make_forget_set, parse_forget_spec
from jaxunlearn.metrics.klom import klom, klom_groups, klom_summary
from jaxunlearn.metrics.margins import accuracy_from_logits, margins_from_logits
from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.progress import Progress
from jaxunlearn.training import RunConfig, load_chunk_variables, load_recipe, load_run, train_run
from jaxunlearn.utils import write_json_atomic
from jaxunlearn.training.ensemble import map_models
from jaxunlearn.training.step import make_trainer
from jaxunlearn.training.strategy import default_strategy
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics.mia import mia
from jaxunlearn.unlearning import UnlearnData, config_dict, get_method, unlearn_grid


def load_models(run_dir: str):
    """All models of a finished run, stacked: {"params", "batch_stats"} (device arrays)."""
    names = sorted(n for n in os.listdir(os.path.join(run_dir, "chunks")) if not n.startswith("."))
    parts = [load_chunk_variables(run_dir, int(n)) for n in names]
    return jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *parts)


def trainer_for_run(run: dict, dataset):
    cfg = run["config"]
    from jaxunlearn.training.recipe import Recipe
    recipe = Recipe(**cfg["run"]["recipe"])
    return make_trainer(recipe, dataset.num_classes, dataset.image_shape, dataset.mean, dataset.std,
                        cfg["steps_per_epoch"], cfg["conv_impl"])


def training_cost(run: dict) -> float:
    """Per-example gradient evaluations of training ONE model of a run."""
    cfg = run["config"]
    r = cfg["run"]["recipe"]
    return float(r["epochs"] * cfg["steps_per_epoch"] * r["batch_size"])


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", spec)


def train_with_progress(cfg: RunConfig, dataset, out: str, desc: str, progress: bool) -> dict:
    bar = Progress(cfg.models, desc, progress)
    try:
        return train_run(cfg, dataset, out, progress=bar)
    finally:
        bar.close()


def fitting_models(m: int) -> int:
    """How many of ``m`` datamodel models the fits use: the first 80 %; the rest score LDS."""
    return int(round(0.8 * m))


def datamodel_lds(dm_run: dict, cfg: PipelineConfig) -> dict:
    """LDS of influence, ridge and lasso datamodels of margins, on the held-out 20 % of the
    datamodel ensemble; the influence soft-threshold with the best LDS is the one used."""
    masks = dm_run["masks"].astype(np.float32)
    m = masks.shape[0]
    n_fit = fitting_models(m)
    margins = dm_run["margins"]
    p = margins.shape[1]
    t = time.time()
    rng = np.random.default_rng(cfg.seed)
    # LDS of margins on at most lds_points points (all of digits; a sample of CIFAR-10's 60,000)
    lds_pts = np.arange(p) if p <= cfg.lds_points else np.sort(rng.choice(p, cfg.lds_points, replace=False))
    ridge_margins = fit_ridge(masks[:n_fit], margins[:n_fit][:, lds_pts], seed=cfg.seed)
    lds_ridge = lds(ridge_margins, masks[n_fit:], margins[n_fit:][:, lds_pts])
    fit_s = time.time() - t
    sub = rng.choice(len(lds_pts), min(cfg.lasso_targets, len(lds_pts)), replace=False)
    pts = lds_pts[sub]
    lasso = fit_lasso(masks[:n_fit], margins[:n_fit][:, pts], iters=cfg.lasso_iters, seed=cfg.seed)
    lds_lasso = lds(lasso, masks[n_fit:], margins[n_fit:][:, pts])
    lds_ridge_same = lds(ridge_margins._replace(weights=ridge_margins.weights[sub], bias=ridge_margins.bias[sub],
                                                lam=ridge_margins.lam[sub]), masks[n_fit:], margins[n_fit:][:, pts])
    by_tau = influence_lds(masks[:n_fit], margins[:n_fit][:, lds_pts], masks[n_fit:], margins[n_fit:][:, lds_pts],
                           cfg.influence_thresholds)
    best = int(np.nanargmax(by_tau))
    return {"influence": float(by_tau[best]), "ridge": lds_ridge, "lasso": lds_lasso,
            "influence_threshold": float(cfg.influence_thresholds[best]),
            "influence_by_threshold": {str(t): float(v) for t, v in zip(cfg.influence_thresholds, by_tau)},
            "ridge_on_lasso_points": lds_ridge_same,
            "models_fit": n_fit, "models_heldout": m - n_fit, "ridge_fit_seconds": fit_s,
            "lds_points": int(len(lds_pts)), "lasso_points": int(len(pts))}


def forget_effects(dm_run: dict, cfg: PipelineConfig, forget: dict, threshold: float) -> dict:
    """Each forget set's summed datamodel effect on every logit of every point, {spec: f32[P, C]}
    (what DM-Direct/DMM subtract), by ``cfg.forget_effects``. Influence uses every datamodel
    model (its threshold was chosen on the 80/20 split); ridge and lasso are fitted on the 80 %."""
    masks = dm_run["masks"]
    m = masks.shape[0] if cfg.forget_effects == "influence" else fitting_models(masks.shape[0])
    eff = forget_set_effects(masks[:m], dm_run["logits"][:m], list(forget.values()), cfg.forget_effects,
                             threshold, cfg.seed, cfg.lasso_iters)
    return dict(zip(forget, eff))


def _cache_path(cache_dir: str, what: dict) -> str:
    return os.path.join(cache_dir, hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16])


def cached_datamodels(dm_dir: str, cfg: PipelineConfig, forget: dict, cache_dir: str):
    """:func:`datamodel_lds` and :func:`forget_effects`, stored under ``cache_dir`` and reused by later
    runs on the same folder (every sweep starts from the pipeline's fits). Each file is keyed by a
    hash of everything its fit reads: the datamodel run's config, the fit settings, the forget set."""
    with open(os.path.join(dm_dir, "config.json")) as f:
        base = {"run": json.load(f), "seed": cfg.seed}
    lds_path = _cache_path(cache_dir, {**base, "lds": [cfg.lds_points, cfg.lasso_targets, cfg.lasso_iters,
                                                       list(cfg.influence_thresholds)]}) + ".json"
    os.makedirs(cache_dir, exist_ok=True)
    dm_run = None
    if os.path.isfile(lds_path):
        with open(lds_path) as f:
            info = {**json.load(f), "cached": True}
    else:
        dm_run = load_run(dm_dir)
        info = datamodel_lds(dm_run, cfg)
        write_json_atomic(lds_path, info)
        info["cached"] = False
    threshold = info["influence_threshold"]
    paths = {s: _cache_path(cache_dir, {**base, "forget": [int(i) for i in f], "effects": cfg.forget_effects,
                                        "lasso_iters": cfg.lasso_iters,
                                        **({"threshold": threshold} if cfg.forget_effects == "influence" else {})})
             + ".npy" for s, f in forget.items()}
    missing = {s: f for s, f in forget.items() if not os.path.isfile(paths[s])}
    t = time.time()
    if missing:
        dm_run = dm_run or load_run(dm_dir)
        for s, e in forget_effects(dm_run, cfg, missing, threshold).items():
            np.save(paths[s] + ".tmp.npy", np.asarray(e, np.float32))
            os.replace(paths[s] + ".tmp.npy", paths[s])  # whole or not at all
    info = {**info, "forget_effects": cfg.forget_effects, "forget_effects_seconds": time.time() - t,
            "forget_effects_cached": [s for s in forget if s not in missing]}
    return {s: jnp.asarray(np.load(paths[s])) for s in forget}, info


class Prepared:
    """Everything the methods need, trained (or resumed) once: ensembles, datamodels, forget sets."""

    def __init__(self, cfg: PipelineConfig, out: str, progress: bool = True, log=print):
        cfg.validate()
        self.cfg = cfg
        self.t0 = time.time()
        dataset = load_dataset(cfg.dataset, cfg.data_dir)
        recipe = load_recipe(cfg.recipe).with_epochs(cfg.epochs)
        kinds = [parse_forget_spec(s, dataset.n_train)[0] for s in cfg.forget_sets]  # fail before training
        for spec, kind in zip(cfg.forget_sets, kinds):
            if kind != "cluster":
                make_forget_set(spec, dataset.train_labels, seed=cfg.seed)
        os.makedirs(out, exist_ok=True)
        dm_dir, full_dir = os.path.join(out, "datamodels"), os.path.join(out, "full")
        train_with_progress(RunConfig(cfg.dataset, cfg.datamodel_models, recipe, cfg.seed, cfg.alpha, chunk=cfg.chunk),
                            dataset, dm_dir, "datamodel ensemble", progress)
        train_with_progress(RunConfig(cfg.dataset, cfg.full_models, recipe, cfg.seed, 1.0, chunk=cfg.chunk),
                            dataset, full_dir, "full models", progress)
        self.full = load_run(full_dir)
        self.trainer = trainer_for_run(self.full, dataset)
        full_vars = load_models(full_dir)
        self.n, self.k2 = dataset.n_train, cfg.full_models // 2
        embeddings = None
        if "cluster" in kinds:
            first = jax.tree.map(lambda t: t[0], full_vars)
            embeddings = np.asarray(jax.jit(self.trainer.embed)(first["params"], first["batch_stats"],
                                                                jnp.asarray(dataset.train_images)))
        self.forget = {s: make_forget_set(s, dataset.train_labels, embeddings, cfg.seed) for s in cfg.forget_sets}
        self.effects, self.lds_info = cached_datamodels(dm_dir, cfg, self.forget, os.path.join(out, "datamodel-fits"))
        log(f"datamodels: LDS influence {self.lds_info['influence']:.3f} (threshold "
            f"{self.lds_info['influence_threshold']:g}), ridge {self.lds_info['ridge']:.3f}, lasso {self.lds_info['lasso']:.3f} "
            f"({self.lds_info['models_fit']} models fit, {self.lds_info['models_heldout']} held out)")
        self.labels = jnp.asarray(dataset.all_labels)
        self.data = UnlearnData(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels),
                                self.trainer.apply)
        self.all_images = jnp.asarray(dataset.all_images)
        # unlearning and evaluation use the ensemble layout of training (measured per backend and model)
        self.vmap_width = default_strategy(recipe.model, jax.default_backend(), self.k2).vmap_width
        self.logits_of = jax.jit(lambda p, s, x: map_models(lambda a: self.trainer.logits(a[0], a[1], x), (p, s),
                                                            self.vmap_width, self.k2))
        self.full_cost = training_cost(self.full)
        self.half = jax.tree.map(lambda t: t[:self.k2], full_vars)  # the models every method unlearns
        self.keys = jax.random.split(jax.random.key(cfg.seed + 1), self.k2)
        self.oracles = {}
        for spec, f_idx in self.forget.items():
            o_dir = os.path.join(out, "oracle-" + safe_name(spec))
            train_with_progress(RunConfig(cfg.dataset, cfg.full_models, recipe, cfg.seed, 1.0,
                                          forget=tuple(int(i) for i in f_idx), chunk=cfg.chunk), dataset, o_dir,
                                f"oracles {spec} (|F|={len(f_idx)})", progress)
            self.oracles[spec] = load_run(o_dir)
        self.groups = {s: klom_groups(f, self.n, dataset.n_test) for s, f in self.forget.items()}
        self._predicted = {}

    def noise_floor(self, spec):
        o = self.oracles[spec]["margins"]
        return klom_summary(klom(o[self.k2:], o[:self.k2]), self.groups[spec])

    def predicted(self, spec):
        """DM-Direct's predicted oracle logits of the unlearned half: f32[K/2, n_train + n_test, C]."""
        if spec not in self._predicted:
            self._predicted[spec] = jnp.asarray(self.full["logits"][:self.k2]) - self.effects[spec][None]
        return self._predicted[spec]

    def targets(self, spec, kind):
        if kind == "oracle":
            return jnp.asarray(self.oracles[spec]["logits"][:self.k2, :self.n])
        if kind == "datamodel":
            return self.predicted(spec)[:, :self.n]
        return None

    def row(self, spec, method, logits, compute, config=None) -> dict:
        """KLoM vs the held-out oracle half, accuracies, MIA and compute for K/2 models' logits
        (f32[K/2, n_train + n_test, C]); if any model's logits are NaN/inf, the row says how many
        diverged and carries no scores."""
        g = self.groups[spec]
        oracle, full = self.oracles[spec]["margins"], self.full["margins"]
        logits = jnp.asarray(logits)
        r = {"forget_set": spec, "forget_size": int(len(g["forget"])), "method": method,
             "compute_fraction": float(compute)}
        diverged = int((~jnp.isfinite(logits).all(axis=(1, 2))).sum())
        if diverged:  # a grid point that blew up is a result too: recorded, not fatal to the sweep
            r.update(diverged_models=diverged, klom=None, accuracy=None, mia=None)
        else:
            m = np.asarray(margins_from_logits(logits, self.labels))
            correct = np.asarray(logits.argmax(-1) == self.labels)
            r.update(klom=klom_summary(klom(oracle[self.k2:], m), g),
                     accuracy={"forget": float(correct[:, g["forget"]].mean()),
                               "retain": float(correct[:, g["retain"]].mean()),
                               "test": float(correct[:, self.n:].mean())},
                     mia=mia(m, oracle[self.k2:], full[self.k2:], oracle[:self.k2], g["forget"]))
        if method in ("dm-direct", "dmm"):
            r["estimator"] = self.cfg.forget_effects
        if config is not None:
            r["config"] = config_dict(config)
        return r

    def run_method(self, spec, method: str, configs=None) -> list[dict]:
        """Rows for ``method`` on one forget set: one per config (default: the pipeline's config).
        Configs sharing their static fields are unlearned in one vmapped call."""
        t = time.time()
        if method == "none":
            rows = [self.row(spec, "none", self.full["logits"][:self.k2], 0.0)]
        elif method == "dm-direct":
            rows = [self.row(spec, method, self.predicted(spec), 0.0)]
        else:
            spec_m = get_method(method)
            configs = configs or [self.cfg.method_config(method)]
            g = self.groups[spec]
            outs = unlearn_grid(spec_m.fn, self.half["params"], self.half["batch_stats"], self.data, g["forget"],
                                g["retain"], self.targets(spec, spec_m.targets), self.keys, configs, self.vmap_width)
            rows = []
            for c, (p, s, cost) in zip(configs, outs):
                logits = self.logits_of(p, s, self.all_images)
                rows.append(self.row(spec, method, logits, float(cost.mean()) / self.full_cost, c))
        for r in rows:
            r["seconds"] = (time.time() - t) / len(rows)
        return rows

    def header(self) -> dict:
        cfg = self.cfg
        return {"dataset": cfg.dataset, "lds": {k: self.lds_info[k] for k in ("influence", "ridge", "lasso")},
                "lds_detail": self.lds_info, "noise_floor": {s: self.noise_floor(s) for s in self.forget},
                "forget_sets": {s: [int(i) for i in f] for s, f in self.forget.items()},
                "ensemble": {"full_models": cfg.full_models, "unlearned": self.k2, "eval_oracles": self.k2,
                             "datamodel_models": cfg.datamodel_models},
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}}


def run_pipeline(cfg: PipelineConfig, out: str, progress: bool = True, log=print) -> dict:
    prep = Prepared(cfg, out, progress, log)
    results = []
    for spec in prep.forget:
        for method in cfg.methods:
            results.extend(prep.run_method(spec, method))
    out_json = {**prep.header(), "results": results, "wall_seconds": time.time() - prep.t0}
    write_json_atomic(os.path.join(out, "results.json"), out_json)
    from jaxunlearn.pipeline.report import pareto_plot, table

    pareto_plot(out_json, os.path.join(out, "pareto.png"))
    log(table(out_json))
    return out_json


def _earlier_rows(out: str, prep: Prepared) -> dict:
    """Rows of an earlier ``results.json`` in ``out`` made with the same ensembles and forget sets."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    same = {k: res["config"].get(k) for k in ("dataset", "recipe", "epochs", "seed", "full_models",
                                               "datamodel_models", "alpha", "forget_effects")}
    if same != {k: getattr(prep.cfg, k) for k in same}:
        return {}
    rows: dict = {}
    for r in res["results"]:
        s = r["forget_set"]
        if s in prep.forget and res["forget_sets"].get(s) == [int(i) for i in prep.forget[s]]:
            rows.setdefault((s, r["method"]), []).append(r)
    return rows


def run_sweep(cfg: PipelineConfig, out: str, method: str, configs: list, progress: bool = True, log=print) -> dict:
    """Every config of a grid for one method, on every forget set of ``cfg``: ``out/sweep-<method>.json``
    and ``.png`` (the whole frontier, with the pipeline's default rows for reference)."""
    get_method(method)
    if not configs:
        raise JaxUnlearnError("empty grid")
    prep = Prepared(cfg, out, progress, log)
    from jaxunlearn.pipeline.report import pareto_plot, sweep_table

    rows = []
    earlier = _earlier_rows(out, prep)
    bar = Progress(len(prep.forget), f"sweep {method} ({len(configs)} configs)", progress, unit="forget set")
    try:
        for i, spec in enumerate(prep.forget):
            rows.extend(prep.run_method(spec, method, configs))
            for ref in ("none", "oracle-matching", "dmm"):  # references for the plot: reuse the pipeline's rows
                rows.extend(earlier.get((spec, ref)) or prep.run_method(spec, ref))
            bar(i + 1)
    finally:
        bar.close()
    res = {**prep.header(), "sweep": {"method": method, "configs": [config_dict(c) for c in configs]},
           "results": rows, "wall_seconds": time.time() - prep.t0}
    name = "sweep-" + safe_name(method)
    write_json_atomic(os.path.join(out, name + ".json"), res)
    pareto_plot(res, os.path.join(out, name + ".png"))
    log(sweep_table(res))
    return res
