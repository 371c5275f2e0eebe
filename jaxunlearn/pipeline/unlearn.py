"""The unlearning pipeline end to end: ensembles -> datamodels -> methods -> KLoM, accuracy, compute.

Folder layout of ``out/``: ``datamodels/`` (subset run), ``full/`` (K models on S),
``oracle-<spec>/`` (K models on S∖F, same seeds: oracle k is "full model k without F"),
``results.json``, ``pareto.png``. Every run folder resumes.

Methods unlearn full models 0..K/2-1; OM takes its targets from oracles 0..K/2-1; KLoM compares
against oracles K/2..K-1, and the noise floor is KLoM between the two oracle halves.
"""
from __future__ import annotations

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.attribution import fit_lasso, fit_ridge, lds
from jaxunlearn.data import load_dataset
from jaxunlearn.data.forget_sets import make_forget_set, parse_forget_spec
from jaxunlearn.metrics.klom import klom, klom_summary
from jaxunlearn.metrics.margins import accuracy_from_logits, margins_from_logits
from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.training import RunConfig, load_chunk_variables, load_recipe, load_run, train_run
from jaxunlearn.training.step import make_trainer
from jaxunlearn.unlearning import MatchingConfig, UnlearnData, dm_direct, oracle_matching, unlearn_ensemble


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


class _Stage:
    def __init__(self, progress: bool):
        self.progress = progress

    def train(self, cfg: RunConfig, dataset, out: str, desc: str):
        from jaxunlearn.cli import Progress

        bar = Progress(cfg.models, desc, self.progress)
        try:
            return train_run(cfg, dataset, out, progress=bar)
        finally:
            bar.close()


def fit_datamodels(dm_run: dict, dataset, cfg: PipelineConfig):
    """Ridge datamodels of every logit of every point (for DM-Direct/DMM) and LDS on margins."""
    masks = dm_run["masks"].astype(np.float32)
    m = masks.shape[0]
    n_fit = int(round(0.8 * m))
    logits = dm_run["logits"]  # [M, P, C]
    p, c = logits.shape[1:]
    margins = dm_run["margins"]
    t = time.time()
    dm_logits = fit_ridge(masks[:n_fit], logits[:n_fit].reshape(n_fit, p * c), seed=cfg.seed)
    ridge_margins = fit_ridge(masks[:n_fit], margins[:n_fit], seed=cfg.seed)
    lds_ridge = lds(ridge_margins, masks[n_fit:], margins[n_fit:])
    fit_s = time.time() - t
    pts = np.random.default_rng(cfg.seed).choice(p, min(cfg.lasso_targets, p), replace=False)
    lasso = fit_lasso(masks[:n_fit], margins[:n_fit][:, pts], seed=cfg.seed)
    lds_lasso = lds(lasso, masks[n_fit:], margins[n_fit:][:, pts])
    lds_ridge_same = lds(ridge_margins._replace(weights=ridge_margins.weights[pts], bias=ridge_margins.bias[pts],
                                                lam=ridge_margins.lam[pts]), masks[n_fit:], margins[n_fit:][:, pts])
    weights = dm_logits.weights.reshape(p, c, -1)
    info = {"ridge": lds_ridge, "lasso": lds_lasso, "ridge_on_lasso_points": lds_ridge_same,
            "models_fit": n_fit, "models_heldout": m - n_fit, "ridge_fit_seconds": fit_s}
    return weights, info


def run_pipeline(cfg: PipelineConfig, out: str, progress: bool = True, log=print) -> dict:
    cfg.validate()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    recipe = load_recipe(cfg.recipe).with_epochs(cfg.epochs)
    forget_kinds = [parse_forget_spec(s, dataset.n_train)[0] for s in cfg.forget_sets]  # fail before training
    for spec, kind in zip(cfg.forget_sets, forget_kinds):
        if kind != "cluster":
            make_forget_set(spec, dataset.train_labels, seed=cfg.seed)
    stage = _Stage(progress)
    t0 = time.time()
    os.makedirs(out, exist_ok=True)

    dm_dir, full_dir = os.path.join(out, "datamodels"), os.path.join(out, "full")
    stage.train(RunConfig(cfg.dataset, cfg.datamodel_models, recipe, cfg.seed, cfg.alpha, chunk=cfg.chunk),
                dataset, dm_dir, "datamodel ensemble")
    stage.train(RunConfig(cfg.dataset, cfg.full_models, recipe, cfg.seed, 1.0, chunk=cfg.chunk),
                dataset, full_dir, "full models")
    dm_run, full = load_run(dm_dir), load_run(full_dir)
    trainer = trainer_for_run(full, dataset)
    full_vars = load_models(full_dir)
    n, k2 = dataset.n_train, cfg.full_models // 2

    embeddings = None
    if "cluster" in forget_kinds:
        first = jax.tree.map(lambda t: t[0], full_vars)
        embeddings = np.asarray(jax.jit(trainer.embed)(first["params"], first["batch_stats"],
                                                       jnp.asarray(dataset.train_images)))
    forget = {s: make_forget_set(s, dataset.train_labels, embeddings, cfg.seed) for s in cfg.forget_sets}

    weights, lds_info = fit_datamodels(dm_run, dataset, cfg)
    log(f"datamodels: LDS ridge {lds_info['ridge']:.3f}, lasso {lds_info['lasso']:.3f} "
        f"({lds_info['models_fit']} models fit, {lds_info['models_heldout']} held out)")

    labels = jnp.asarray(dataset.all_labels)
    data = UnlearnData(jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels), trainer.apply)
    all_images = jnp.asarray(dataset.all_images)
    logits_of = jax.jit(jax.vmap(trainer.logits, in_axes=(0, 0, None)))
    full_cost = training_cost(full)
    om_cfg = MatchingConfig(epochs=cfg.om_epochs, lr=cfg.om_lr, batch_size=cfg.om_batch_size,
                            retain_per_epoch=cfg.om_retain_per_epoch)
    half = jax.tree.map(lambda t: t[:k2], full_vars)
    results, noise = [], {}
    for spec, f_idx in forget.items():
        o_dir = os.path.join(out, "oracle-" + safe_name(spec))
        stage.train(RunConfig(cfg.dataset, cfg.full_models, recipe, cfg.seed, 1.0,
                              forget=tuple(int(i) for i in f_idx), chunk=cfg.chunk), dataset, o_dir,
                    f"oracles {spec} (|F|={len(f_idx)})")
        oracle = load_run(o_dir)
        r_idx = np.setdiff1d(np.arange(n), f_idx)
        groups = {"forget": f_idx, "retain": r_idx, "val": n + np.arange(dataset.n_test)}
        eval_oracles = oracle["margins"][k2:]
        noise[spec] = klom_summary(klom(eval_oracles, oracle["margins"][:k2]), groups)

        def row(method, logits, compute):
            m = margins_from_logits(jnp.asarray(logits), labels)
            acc = np.asarray(accuracy_from_logits(jnp.asarray(logits), labels)[..., None])  # noqa: F841
            correct = np.asarray(jnp.asarray(logits).argmax(-1) == labels)
            return {"forget_set": spec, "forget_size": int(len(f_idx)), "method": method,
                    "klom": klom_summary(klom(eval_oracles, m), groups),
                    "accuracy": {"forget": float(correct[:, f_idx].mean()), "retain": float(correct[:, r_idx].mean()),
                                 "test": float(correct[:, n:].mean())},
                    "compute_fraction": float(compute)}

        full_logits = full["logits"][:k2]
        keys = jax.random.split(jax.random.key(cfg.seed + 1), k2)
        predicted = None
        for method in cfg.methods:
            t = time.time()
            if method == "none":
                results.append(row("none", full_logits, 0.0))
            elif method == "oracle-matching":
                targets = jnp.asarray(oracle["logits"][:k2, :n])
                p, s, cost = unlearn_ensemble(oracle_matching, half["params"], half["batch_stats"], data, f_idx,
                                              r_idx, targets, keys, om_cfg)
                results.append(row(method, logits_of(p, s, all_images), float(cost.mean()) / full_cost))
            elif method in ("dm-direct", "dmm"):
                if predicted is None:
                    predicted = dm_direct(jnp.asarray(full_logits), weights, f_idx)
                if method == "dm-direct":
                    results.append(row(method, predicted, 0.0))
                else:
                    p, s, cost = unlearn_ensemble(oracle_matching, half["params"], half["batch_stats"], data,
                                                  f_idx, r_idx, predicted[:, :n], keys, om_cfg)
                    results.append(row(method, logits_of(p, s, all_images), float(cost.mean()) / full_cost))
            results[-1]["seconds"] = time.time() - t

    out_json = {"dataset": cfg.dataset, "lds": {"ridge": lds_info["ridge"], "lasso": lds_info["lasso"]},
                "lds_detail": lds_info, "noise_floor": noise, "results": results,
                "forget_sets": {s: [int(i) for i in f] for s, f in forget.items()},
                "ensemble": {"full_models": cfg.full_models, "unlearned": k2, "eval_oracles": k2,
                             "datamodel_models": cfg.datamodel_models},
                "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()},
                "wall_seconds": time.time() - t0}
    tmp = os.path.join(out, "results.json.tmp")
    with open(tmp, "w") as f:
        json.dump(out_json, f, indent=2)
    os.replace(tmp, os.path.join(out, "results.json"))
    from jaxunlearn.pipeline.report import pareto_plot, table

    pareto_plot(out_json, os.path.join(out, "pareto.png"))
    log(table(out_json))
    return out_json
