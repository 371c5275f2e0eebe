"""The unlearning pipeline end to end, as pure steps (each resumed from its files)::

    data     = prepare_data(cfg)                          # 1. data set + recipe; forget specs checked
    dm, full = train_base_ensembles(cfg, data, out)       # 2. datamodels/ (α-subsets) and full/
    forget   = make_forget_sets(cfg, ...)                 # 3. {spec: indices}
    fits     = fit_attribution(cfg, dm, forget, out)      # 4. LDS + forget-set effects (datamodel-fits/)
    oracles  = train_oracles(cfg, data, forget, out)      # 5. oracle-<spec>/
    rows     = run_method(exp, spec, method)              # 6. unlearn + evaluate, per forget set and method
    write_results(out, ...)                               # 7. results.json, pareto.png, the table

:func:`prepare` runs steps 1-5 into an :class:`Experiment` (everything steps 6-7 read);
:func:`run_pipeline` and :func:`run_sweep` are the two jobs built from them. A new method is one
file in ``jaxunlearn/unlearning`` and one registry line; a new kind of target is one branch of
:func:`method_targets`.

Folder layout of ``out/``: ``datamodels/`` (subset run), ``full/`` (K models on S),
``oracle-<spec>/`` (K models on S∖F, same seeds: oracle k is "full model k without F"),
``datamodel-fits/`` (datamodel fits, keyed by what they read), ``results.json``, ``pareto.png``.
Every run folder resumes, and a later run or sweep on the folder reuses the datamodel fit.

Methods unlearn full models 0..K/2-1; OM takes its targets from oracles 0..K/2-1, full model k from
oracle (k + 1) mod K/2, never its own twin (the reference draws an oracle trained independently of the
model it targets; a twin shares its init and data order, an easier target); KLoM compares
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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.attribution import fit_lasso, fit_ridge, forget_set_effects, influence_lds, lds
from jaxunlearn.compile_cache import CompileCounter, compile_summary
from jaxunlearn.data import load_dataset
from jaxunlearn.data.forget_sets import NEEDS_MODELS, make_forget_set, parse_forget_spec
from jaxunlearn.metrics.klom import klom, klom_groups, klom_summary
from jaxunlearn.metrics.margins import margins_from_logits
from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.progress import Progress
from jaxunlearn.training import RunConfig, load_chunk_variables, load_recipe, load_run, train_run
from jaxunlearn.utils import make_folder, save_npy_atomic, write_json_atomic
from jaxunlearn.training.ensemble import EnsembleFns
from jaxunlearn.training.run import read_run_config, run_trainer
from jaxunlearn.training.strategy import ensemble_layout
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics.memorization import accuracy_gaps, memorization, tug_of_war
from jaxunlearn.metrics.mia import mia
from jaxunlearn.unlearning import UnlearnData, config_dict, get_method, unlearn_grid


def load_models(run_dir: str):
    """All models of a finished run, stacked: {"params", "batch_stats"} (device arrays)."""
    names = sorted(n for n in os.listdir(os.path.join(run_dir, "chunks")) if not n.startswith("."))
    parts = [load_chunk_variables(run_dir, int(n)) for n in names]
    return jax.tree.map(lambda *xs: jnp.concatenate([jnp.asarray(x) for x in xs]), *parts)


def training_cost(run: dict) -> float:
    """Per-example gradient evaluations of training ONE model of a run."""
    cfg = run["config"]
    r = cfg["run"]["recipe"]
    return float(r["epochs"] * cfg["steps_per_epoch"] * r["batch_size"])


def safe_name(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", spec)


def train_with_progress(cfg: RunConfig, dataset, out: str, desc: str, progress: bool, worker=None) -> dict:
    bar = Progress(cfg.models, desc, progress)
    try:
        return train_run(cfg, dataset, out, progress=bar, worker=worker)
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
    base = {"run": read_run_config(dm_dir), "seed": cfg.seed}
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
            save_npy_atomic(paths[s], np.asarray(e, np.float32))
    info = {**info, "forget_effects": cfg.forget_effects, "forget_effects_seconds": time.time() - t,
            "forget_effects_cached": [s for s in forget if s not in missing]}
    return {s: jnp.asarray(np.load(paths[s])) for s in forget}, info


def cached_memorization(dm_dir: str, train_labels, cache_dir: str) -> np.ndarray:
    """Feldman-Zhang memorization of every training point from the α-subset ensemble, f32[n_train]
    (correct = the argmax of a model's logits is the label), stored under ``cache_dir`` keyed by the
    datamodel run's config. The logits are read memory-mapped, a block of models at a time."""
    path = _cache_path(cache_dir, {"run": read_run_config(dm_dir), "memorization": 2}) + ".npy"
    if not os.path.isfile(path):
        labels = np.asarray(train_labels)
        n = labels.shape[0]
        masks = np.load(os.path.join(dm_dir, "masks.npy"))
        logits = np.load(os.path.join(dm_dir, "logits.npy"), mmap_mode="r")
        correct = np.concatenate([np.asarray(logits[i:i + 256, :n]).argmax(-1) == labels
                                  for i in range(0, logits.shape[0], 256)])
        os.makedirs(cache_dir, exist_ok=True)
        save_npy_atomic(path, np.asarray(memorization(masks, correct), np.float32))
    return np.load(path)


class Data(NamedTuple):
    """Step 1's output: the data set and the training recipe."""

    dataset: Any
    recipe: Any


class Experiment(NamedTuple):
    """Everything the unlearning and evaluation steps read, built by :func:`prepare` from the
    earlier steps' outputs. K = ``cfg.full_models``; k2 = K/2 models are unlearned."""

    cfg: PipelineConfig
    dataset: Any
    trainer: Any
    full: dict  # the full-model run (load_run): margins, logits f32[K, P, C], config
    unlearned: dict  # {"params", "batch_stats"} of full models 0..k2-1, stacked
    forget: dict  # {spec: i64[f]}
    groups: dict  # {spec: {"forget", "retain", "val"} point indices}
    oracles: dict  # {spec: oracle run}
    oracle_accuracy: dict  # {spec: {"forget", "retain", "test"} argmax accuracy of the held-out oracle half}
    effects: dict  # {spec: f32[P, C]} each forget set's summed datamodel effect
    attribution: dict  # LDS of every estimator and the fit details
    memorization: np.ndarray  # f32[n_train] Feldman-Zhang memorization from the datamodel ensemble
    data: UnlearnData
    keys: jax.Array  # key[k2], one per unlearned model
    vmap_width: int  # the measured ensemble layout (training.strategy) for k2 models: unlearning and evaluation
    logits_of: Any  # (params, batch_stats, images) -> f32[k2, P, C]: EnsembleFns' logits, training's layout
    t0: float
    compiles: CompileCounter  # counts this job's compiles from the start of prepare

    @property
    def k2(self) -> int:
        return self.cfg.full_models // 2


# ---- the steps -------------------------------------------------------------------------------

def prepare_data(cfg: PipelineConfig) -> Data:
    """Loads the data set and the recipe; every forget spec that does not need a trained model is
    checked here, before any training."""
    cfg.validate()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    for spec in cfg.forget_sets:
        if parse_forget_spec(spec, dataset.n_train)[0] not in NEEDS_MODELS:
            make_forget_set(spec, dataset.train_labels, seed=cfg.seed)
    return Data(dataset, load_recipe(cfg.recipe).with_epochs(cfg.epochs))


def train_base_ensembles(cfg: PipelineConfig, data: Data, out: str, progress: bool, worker=None) -> tuple[str, str]:
    """The datamodel ensemble (``datamodels/``, α-subsets) and the full models (``full/``)."""
    return train_base_share(cfg, data, out, progress, worker)[:2]


def train_base_share(cfg: PipelineConfig, data: Data, out: str, progress: bool, worker=None) -> tuple[str, str, bool]:
    """:func:`train_base_ensembles` for worker ``(I, N)`` of a job array (None: all of it); also
    whether both runs are complete."""
    make_folder(out)
    dm_dir, full_dir = os.path.join(out, "datamodels"), os.path.join(out, "full")
    a = train_with_progress(RunConfig(cfg.dataset, cfg.datamodel_models, data.recipe, cfg.seed, cfg.alpha,
                                      chunk=cfg.chunk), data.dataset, dm_dir, "datamodel ensemble", progress, worker)
    b = train_with_progress(RunConfig(cfg.dataset, cfg.full_models, data.recipe, cfg.seed, 1.0, chunk=cfg.chunk),
                            data.dataset, full_dir, "full models", progress, worker)
    return dm_dir, full_dir, a.get("complete", True) and b.get("complete", True)


def make_forget_sets(cfg: PipelineConfig, dataset, trainer, full_vars, memorization=None) -> dict:
    """{spec: sorted train indices}; ``cluster:K:J`` clusters full model 0's penultimate features,
    ``memorized:N`` reads ``memorization`` f32[n_train]."""
    embeddings = None
    if any(parse_forget_spec(s, dataset.n_train)[0] == "cluster" for s in cfg.forget_sets):
        first = jax.tree.map(lambda t: t[0], full_vars)
        embeddings = np.asarray(jax.jit(trainer.embed)(first["params"], first["batch_stats"],
                                                       jnp.asarray(dataset.train_images)))
    return {s: make_forget_set(s, dataset.train_labels, embeddings, cfg.seed, memorization) for s in cfg.forget_sets}


def train_oracles(cfg: PipelineConfig, data: Data, forget: dict, out: str, progress: bool, worker=None) -> dict:
    """K oracles per forget set (``oracle-<spec>/``): oracle k is full model k trained without F.
    A worker ``(I, N)`` of a job array trains its chunks only and returns {spec: complete?}."""
    oracles = {}
    for spec, f_idx in forget.items():
        o_dir = os.path.join(out, "oracle-" + safe_name(spec))
        r = train_with_progress(RunConfig(cfg.dataset, cfg.full_models, data.recipe, cfg.seed, 1.0,
                                          forget=tuple(int(i) for i in f_idx), chunk=cfg.chunk), data.dataset, o_dir,
                                f"oracles {spec} (|F|={len(f_idx)})", progress, worker)
        oracles[spec] = r.get("complete", True) if worker else load_run(o_dir)
    return oracles


def train_share(cfg: PipelineConfig, out: str, worker: tuple[int, int], progress: bool = True, log=print) -> bool:
    """The pipeline's training as worker ``(I, N)`` of a scheduler job array: this worker's chunks of
    the datamodel ensemble, the full models and every forget set's oracles, in one shared folder.
    Forget sets that need trained models (``cluster``, ``memorized``) are made only once both base
    ensembles are complete (run the array again after that, or let the final step train the rest).
    Returns whether every ensemble is complete; then ``pipeline`` without ``--worker`` goes on from
    the finished folders (and trains whatever is still missing)."""
    data = prepare_data(cfg)
    dm_dir, full_dir, base_done = train_base_share(cfg, data, out, progress, worker)
    needs = [s for s in cfg.forget_sets if parse_forget_spec(s, data.dataset.n_train)[0] in NEEDS_MODELS]
    if needs and not base_done:  # the others may have finished meanwhile (this trains nothing: checks, assembles)
        base_done = train_base_share(cfg, data, out, False, worker)[2]
    if needs and not base_done:
        log(f"worker {worker[0]}/{worker[1]}: forget sets {', '.join(needs)} need the finished base ensembles; "
            "their oracles come in a later stage (this command again once every worker is done, or `pipeline`)")
        return False
    if needs:
        full = load_run(full_dir)
        mem = cached_memorization(dm_dir, data.dataset.train_labels, os.path.join(out, "datamodel-fits"))
        trainer = run_trainer(full["config"], data.dataset)
        forget = make_forget_sets(cfg, data.dataset, trainer, load_models(full_dir), mem)
    else:  # none of them needs a trained model
        forget = make_forget_sets(cfg, data.dataset, None, None)
    done = train_oracles(cfg, data, forget, out, progress, worker)
    if base_done and all(done.values()):
        return True
    # each ensemble was checked when this worker finished its share of it; the others may have finished
    # theirs since. Checked again now (nothing left to train here: checks and assembles), so the worker
    # that finishes last sees every ensemble complete, whichever ensemble each worker finished last
    base_done = train_base_share(cfg, data, out, False, worker)[2]
    return base_done and all(train_oracles(cfg, data, forget, out, False, worker).values())


def fit_attribution(cfg: PipelineConfig, dm_dir: str, forget: dict, out: str) -> tuple[dict, dict]:
    """LDS of every estimator and each forget set's effects ({spec: f32[P, C]}), cached in
    ``datamodel-fits/``."""
    return cached_datamodels(dm_dir, cfg, forget, os.path.join(out, "datamodel-fits"))


def prepare(cfg: PipelineConfig, out: str, progress: bool = True, log=print) -> Experiment:
    """Steps 1-5, each resumed from its files: data, ensembles, forget sets, oracles, attribution."""
    t0, compiles = time.time(), CompileCounter()
    data = prepare_data(cfg)
    dm_dir, full_dir = train_base_ensembles(cfg, data, out, progress)
    full = load_run(full_dir)
    trainer = run_trainer(full["config"], data.dataset)
    full_vars = load_models(full_dir)
    mem = cached_memorization(dm_dir, data.dataset.train_labels, os.path.join(out, "datamodel-fits"))
    forget = make_forget_sets(cfg, data.dataset, trainer, full_vars, mem)
    effects, attribution = fit_attribution(cfg, dm_dir, forget, out)
    log(f"datamodels: LDS influence {attribution['influence']:.3f} (threshold "
        f"{attribution['influence_threshold']:g}), ridge {attribution['ridge']:.3f}, lasso {attribution['lasso']:.3f} "
        f"({attribution['models_fit']} models fit, {attribution['models_heldout']} held out)")
    oracles = train_oracles(cfg, data, forget, out, progress)
    k2, ds = cfg.full_models // 2, data.dataset
    devs, strat = ensemble_layout(data.recipe.model, k2, jax.local_devices())
    vmap_width = strat.vmap_width
    groups = {s: klom_groups(f, ds.n_train, ds.n_test) for s, f in forget.items()}
    return Experiment(
        cfg=cfg, dataset=ds, trainer=trainer, full=full,
        unlearned=jax.tree.map(lambda t: t[:k2], full_vars), forget=forget, groups=groups, oracles=oracles,
        oracle_accuracy={s: oracle_accuracy(oracles[s]["logits"][k2:], groups[s], ds) for s in forget},
        effects=effects, attribution=attribution, memorization=mem,
        data=UnlearnData(jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels), trainer.apply_images,
                         init=lambda key: tuple(trainer.init(key)[:2]), memorization=jnp.asarray(mem)),
        keys=jax.random.split(jax.random.key(cfg.seed + 1), k2),
        vmap_width=vmap_width, logits_of=EnsembleFns(trainer, k2, vmap_width, devs).logits, t0=t0,
        compiles=compiles)


def noise_floor(exp: Experiment, spec: str) -> dict:
    """KLoM between the two oracle halves: what a perfect unlearner scores."""
    o = exp.oracles[spec]["margins"]
    return klom_summary(exp_klom(exp, o[exp.k2:], o[:exp.k2]), exp.groups[spec])


def exp_klom(exp: Experiment, oracle_margins, unlearned_margins):
    """Per-point KLoM with the experiment's binning and direction. f32[K, P], f32[K, P] -> [P]."""
    return klom(oracle_margins, unlearned_margins, binning=exp.cfg.klom_binning, direction=exp.cfg.klom_direction)


def dm_direct_logits(exp: Experiment, spec: str):
    """DM-Direct's predicted oracle logits of the unlearned models: f32[k2, n_train + n_test, C]."""
    return jnp.asarray(exp.full["logits"][:exp.k2]) - exp.effects[spec][None]


def oracle_targets(oracle_logits, k2: int):
    """Oracle Matching's targets for full models 0..k2-1: f32[k2, ...] of oracles 0..k2-1, model k
    getting oracle (k + 1) mod k2, an oracle that shares neither its init nor its data order (oracle k
    is model k's twin); one model (k2 = 1) can only get its twin."""
    return jnp.roll(jnp.asarray(oracle_logits[:k2]), -1, axis=0)


def method_targets(exp: Experiment, spec: str, kind: str | None):
    """The target logits f32[k2, n_train, C] a method matches: oracles' ("oracle", :func:`oracle_targets`),
    DM-Direct's ("datamodel"), or None."""
    n = exp.dataset.n_train
    if kind == "oracle":
        return oracle_targets(exp.oracles[spec]["logits"][:, :n], exp.k2)  # a view: only k2 models go to the device
    if kind == "datamodel":
        return dm_direct_logits(exp, spec)[:, :n]
    return None


def ensemble_logits(exp: Experiment, params, batch_stats):
    """Logits of the k2 unlearned models on every point: f32[k2, n_train + n_test, C]."""
    return exp.logits_of(params, batch_stats, jnp.asarray(exp.dataset.all_images))


def group_accuracy(correct, g: dict, n_train: int) -> dict:
    """Mean accuracy on the forget, retain and test points; correct: bool[models, n_train + n_test]."""
    return {"forget": float(correct[:, g["forget"]].mean()), "retain": float(correct[:, g["retain"]].mean()),
            "test": float(correct[:, n_train:].mean())}


def oracle_accuracy(oracle_logits, g: dict, dataset) -> dict:
    """Accuracies (argmax) of the held-out oracle half (the models KLoM compares with): ToW's reference.
    oracle_logits: f32[k2, n_train + n_test, C] of that half."""
    correct = oracle_logits.argmax(-1) == np.asarray(dataset.all_labels)
    return group_accuracy(correct, g, dataset.n_train)


def evaluate(exp: Experiment, spec: str, method: str, logits, compute: float, config=None) -> dict:
    """KLoM vs the held-out oracle half, accuracies (and their gaps to those oracles' and the DEL
    paper's tug-of-war), MIA and compute for k2 models' logits
    (f32[k2, n_train + n_test, C]); if any model's logits are NaN/inf, the row says how many
    diverged and carries no scores."""
    g, n = exp.groups[spec], exp.dataset.n_train
    oracle, full = exp.oracles[spec]["margins"], exp.full["margins"]
    labels = jnp.asarray(exp.dataset.all_labels)
    logits = jnp.asarray(logits)
    r = {"forget_set": spec, "forget_size": int(len(g["forget"])), "method": method,
         "compute_fraction": float(compute)}
    diverged = int((~jnp.isfinite(logits).all(axis=(1, 2))).sum())
    if diverged:  # a grid point that blew up is a result too: recorded, not fatal to the sweep
        r.update(diverged_models=diverged, klom=None, accuracy=None, accuracy_gap=None, tow=None, mia=None)
    else:
        m = np.asarray(margins_from_logits(logits, labels))
        correct = np.asarray(logits.argmax(-1) == labels)
        acc = group_accuracy(correct, g, n)
        ref = exp.oracle_accuracy[spec]
        r.update(klom=klom_summary(exp_klom(exp, oracle[exp.k2:], m), g), accuracy=acc,
                 accuracy_gap=accuracy_gaps(acc, ref), tow=tug_of_war(acc, ref),
                 mia=mia(m, oracle[exp.k2:], full[exp.k2:], oracle[:exp.k2], g["forget"]))
    if method in ("dm-direct", "dmm"):
        r["estimator"] = exp.cfg.forget_effects
    if config is not None:
        r["config"] = config_dict(config)
    return r


def run_method(exp: Experiment, spec: str, method: str, configs=None) -> list[dict]:
    """Step 6: rows for ``method`` on one forget set, one per config (default: the experiment's).
    Configs sharing their static fields are unlearned in one vmapped call."""
    t = time.time()
    full_cost = training_cost(exp.full)
    if method == "none":
        rows = [evaluate(exp, spec, "none", exp.full["logits"][:exp.k2], 0.0)]
    elif method == "dm-direct":
        rows = [evaluate(exp, spec, method, dm_direct_logits(exp, spec), 0.0)]
    else:
        m = get_method(method)
        configs = configs or [exp.cfg.method_config(method)]
        g = exp.groups[spec]
        outs = unlearn_grid(m.fn, exp.unlearned["params"], exp.unlearned["batch_stats"], exp.data, g["forget"],
                            g["retain"], method_targets(exp, spec, m.targets), exp.keys, configs, exp.vmap_width)
        rows = [evaluate(exp, spec, method, ensemble_logits(exp, p, s), float(cost.mean()) / full_cost, c)
                for c, (p, s, cost) in zip(configs, outs)]
    for r in rows:
        r["seconds"] = (time.time() - t) / len(rows)
    return rows


def config_json(cfg: PipelineConfig) -> dict:
    """The config as it reads back from a results file (tuples as lists)."""
    return json.loads(json.dumps({k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.__dict__.items()}))


def forget_memorization(mem: np.ndarray, forget) -> dict:
    """How memorized a forget set is: its mean memorization, and the training set's for scale."""
    return {"mean": float(mem[np.asarray(forget)].mean()), "train_mean": float(mem.mean()),
            "top_decile_share": float((mem[np.asarray(forget)] >= np.quantile(mem, 0.9)).mean())}


def header(exp: Experiment) -> dict:
    """What every results file says about the experiment (before its rows)."""
    cfg = exp.cfg
    return {"dataset": cfg.dataset, "lds": {k: exp.attribution[k] for k in ("influence", "ridge", "lasso")},
            "lds_detail": exp.attribution, "noise_floor": {s: noise_floor(exp, s) for s in exp.forget},
            "forget_sets": {s: [int(i) for i in f] for s, f in exp.forget.items()},
            "forget_memorization": {s: forget_memorization(exp.memorization, f) for s, f in exp.forget.items()},
            "oracle_accuracy": exp.oracle_accuracy,
            "ensemble": {"full_models": cfg.full_models, "unlearned": exp.k2, "eval_oracles": exp.k2,
                         "datamodel_models": cfg.datamodel_models},
            "config": config_json(cfg)}


def write_results(out: str, json_name: str, png_name: str, res: dict, log, table_fn) -> dict:
    """Step 7: the results as JSON and as a KLoM-vs-compute plot, and the table on the log."""
    from jaxunlearn.pipeline.report import pareto_plot

    write_json_atomic(os.path.join(out, json_name), res)
    pareto_plot(res, os.path.join(out, png_name))
    log(table_fn(res))
    return res


def run_pipeline(cfg: PipelineConfig, out: str, progress: bool = True, log=print) -> dict:
    """The whole job: prepare (steps 1-5), every method on every forget set (6), results (7)."""
    from jaxunlearn.pipeline.report import table

    exp = prepare(cfg, out, progress, log)
    rows = [row for spec in exp.forget for method in cfg.methods for row in run_method(exp, spec, method)]
    res = {**header(exp), "results": rows, "wall_seconds": time.time() - exp.t0,
           "compile": compile_summary(exp.compiles, name_counts=True)}
    return write_results(out, "results.json", "pareto.png", res, log, table)


def _earlier_rows(out: str, exp: Experiment) -> dict:
    """Rows of an earlier ``results.json`` in ``out`` made with the same ensembles and forget sets."""
    try:
        with open(os.path.join(out, "results.json")) as f:
            res = json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}
    # the reference rows (none, OM, DMM) depend on every setting but which methods and forget sets run
    ours = config_json(exp.cfg)
    skip = ("methods", "forget_sets", "data_dir", "chunk")
    if {k: v for k, v in res["config"].items() if k not in skip} != {k: v for k, v in ours.items() if k not in skip}:
        return {}
    rows: dict = {}
    for r in res["results"]:
        s = r["forget_set"]
        if s in exp.forget and res["forget_sets"].get(s) == [int(i) for i in exp.forget[s]]:
            rows.setdefault((s, r["method"]), []).append(r)
    return rows


def run_sweep(cfg: PipelineConfig, out: str, method: str, configs: list, progress: bool = True, log=print) -> dict:
    """Every config of a grid for one method, on every forget set of ``cfg``: ``out/sweep-<method>.json``
    and ``.png`` (the whole frontier, with the pipeline's default rows for reference)."""
    get_method(method)
    if not configs:
        raise JaxUnlearnError("empty grid")
    return sweep_experiment(prepare(cfg, out, progress, log), out, method, configs, progress, log)


def sweep_experiment(exp: Experiment, out: str, method: str, configs: list, progress: bool = True, log=print) -> dict:
    """:func:`run_sweep` on an already prepared experiment (many sweeps, one :func:`prepare`)."""
    from jaxunlearn.pipeline.report import sweep_table

    rows = []
    earlier = _earlier_rows(out, exp)
    bar = Progress(len(exp.forget), f"sweep {method} ({len(configs)} configs)", progress, unit="forget set")
    try:
        for i, spec in enumerate(exp.forget):
            rows.extend(run_method(exp, spec, method, configs))
            for ref in ("none", "oracle-matching", "dmm"):  # references for the plot: reuse the pipeline's rows
                rows.extend(earlier.get((spec, ref)) or run_method(exp, spec, ref))
            bar(i + 1)
    finally:
        bar.close()
    res = {**header(exp), "sweep": {"method": method, "configs": [config_dict(c) for c in configs]},
           "results": rows, "wall_seconds": time.time() - exp.t0,
           "compile": compile_summary(exp.compiles, name_counts=True)}
    name = "sweep-" + safe_name(method)
    return write_results(out, name + ".json", name + ".png", res, log, sweep_table)
