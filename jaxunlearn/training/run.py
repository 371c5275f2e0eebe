"""A training run on disk: config.json, masks.npy, finished chunks, margins.npy.

Layout of ``out/``::

    config.json            everything needed to reproduce the run
    masks.npy              bool[M, n_train]
    chunks/00000/          one finished chunk: ckpt/ (orbax: params, batch_stats) and outputs.npz
    margins.npy            f32[M, n_train + n_test] (train points first, then test points)
    logits.npy             f32[M, n_train + n_test, C]
    accuracy.json          per-model train/test accuracy
    summary.json           mean accuracies, wall time, models/hour

A chunk is written to ``chunks/.tmp-XXXXX`` and renamed when complete, so a killed run
never leaves a chunk that looks finished; re-running the same command skips finished chunks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.data.datasets import Dataset
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics.margins import accuracy_from_logits, margins_from_logits
from jaxunlearn.training.ensemble import EnsembleFns, train_ensemble
from jaxunlearn.training.recipe import Recipe
from jaxunlearn.training.step import make_trainer
from jaxunlearn.training.strategy import default_strategy
from jaxunlearn.training.subsets import random_subset_masks, retain_masks, steps_per_epoch

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """What a run trains. ``forget`` (sorted train indices) makes every model an oracle on S∖F."""

    dataset: str
    models: int
    recipe: Recipe
    seed: int = 0
    alpha: float = 0.5
    forget: tuple[int, ...] | None = None
    chunk: int | None = None  # models per chunk; None: from free memory
    conv_impl: str | None = None  # None: backend default
    vmap_width: int | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"] = self.recipe.to_dict()
        d["forget"] = None if self.forget is None else list(self.forget)
        return d


def make_masks(cfg: RunConfig, n_train: int) -> np.ndarray:
    if cfg.forget is not None:
        return retain_masks(n_train, cfg.models, np.asarray(cfg.forget))
    return random_subset_masks(n_train, cfg.models, cfg.alpha, cfg.seed)


def available_memory_bytes() -> int:
    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def auto_chunk(fns_factory: Callable[[int], EnsembleFns], images, labels, masks, seed: int, max_models: int) -> int:
    """Models per chunk from free memory and the compiled memory footprint of a 2-model epoch."""
    fns = fns_factory(2)
    keys = jax.random.split(jax.random.key(seed), 2)
    states = jax.eval_shape(fns.init, keys)
    compiled = fns.epoch.lower(states, images, labels, jnp.asarray(masks[:2]), keys, jnp.int32(0)).compile()
    mem = compiled.memory_analysis()
    per_model = max(1, (mem.temp_size_in_bytes + mem.argument_size_in_bytes - images.nbytes - labels.nbytes) // 2)
    return int(max(1, min(max_models, 0.5 * available_memory_bytes() // per_model)))


def _check_out(out: str, cfg_dict: dict) -> bool:
    """True when ``out`` holds this very run (resume). Raises if it holds anything else."""
    if not os.path.exists(out):
        return False
    if not os.path.isdir(out):
        raise JaxUnlearnError(f"--out {out!r} exists and is not a folder")
    cfg_path = os.path.join(out, "config.json")
    if not os.path.isfile(cfg_path):
        if os.listdir(out):
            raise JaxUnlearnError(f"--out {out!r} is not empty and holds no jaxunlearn run")
        return False
    with open(cfg_path) as f:
        old = json.load(f)
    old_cfg, new_cfg = old.get("run", {}), cfg_dict["run"]
    keys = sorted(k for k in set(old_cfg) | set(new_cfg) if k != "chunk" and old_cfg.get(k) != new_cfg.get(k))
    if old.get("data_fingerprint") != cfg_dict["data_fingerprint"]:
        keys.append("data")
    if keys:
        raise JaxUnlearnError(f"--out {out!r} holds a run with a different config (differs in: {', '.join(keys)})")
    return True


def write_json_atomic(path: str, obj) -> None:
    """Writes ``path`` whole or not at all (a temporary file renamed into place)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _save_chunk(final_dir: str, states, logits: np.ndarray, model_ids: np.ndarray, meta: dict) -> None:
    import orbax.checkpoint as ocp

    tmp = os.path.join(os.path.dirname(final_dir), ".tmp-" + os.path.basename(final_dir))
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.path.join(tmp, "ckpt")),
                   {"params": states.params, "batch_stats": states.batch_stats})
    np.savez(os.path.join(tmp, "outputs.npz"), logits=logits, model_ids=model_ids)
    write_json_atomic(os.path.join(tmp, "meta.json"), meta)
    os.rename(tmp, final_dir)  # atomic: the chunk is finished exactly when this name exists


def load_chunk_variables(run_dir: str, chunk: int):
    """Stacked {"params", "batch_stats"} of one finished chunk (numpy leaves)."""
    import warnings

    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sharding info not provided")  # single device: expected
        return ckptr.restore(os.path.abspath(os.path.join(run_dir, "chunks", f"{chunk:05d}", "ckpt")))


def train_run(cfg: RunConfig, dataset: Dataset, out: str, progress: Callable | None = None) -> dict:
    """Trains (or resumes) the run ``cfg`` into folder ``out``; returns the summary dict.

    ``progress(models_done: float, total: int)`` is called after every epoch of every chunk.
    """
    cfg.recipe.validate()
    if cfg.models < 1:
        raise JaxUnlearnError(f"models must be >= 1, got {cfg.models}")
    masks = make_masks(cfg, dataset.n_train)  # validates alpha / forget before anything is written
    backend = jax.default_backend()
    strat = default_strategy(cfg.recipe.model, backend, cfg.models)
    conv_impl = cfg.conv_impl or strat.conv_impl
    spe = steps_per_epoch(masks, cfg.recipe.batch_size)
    trainer = make_trainer(cfg.recipe, dataset.num_classes, dataset.image_shape, dataset.mean, dataset.std,
                           spe, conv_impl)
    run_dict = {"format": FORMAT_VERSION, "run": cfg.to_dict(), "data_fingerprint": dataset.fingerprint(),
                "n_train": dataset.n_train, "n_test": dataset.n_test, "num_classes": dataset.num_classes,
                "steps_per_epoch": spe, "conv_impl": conv_impl}
    resuming = _check_out(out, run_dict)

    images, labels = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
    all_images = jnp.asarray(dataset.all_images)
    if resuming:
        with open(os.path.join(out, "config.json")) as f:
            chunk = json.load(f)["chunk_resolved"]
    else:
        vw0 = cfg.vmap_width or strat.vmap_width
        chunk = cfg.chunk or auto_chunk(lambda k: EnsembleFns(trainer, k, min(vw0, k)), images, labels, masks,
                                        cfg.seed, cfg.models)
    chunk = max(1, min(int(chunk), cfg.models))
    vmap_width = min(cfg.vmap_width or default_strategy(cfg.recipe.model, backend, chunk).vmap_width, chunk)
    run_dict.update(chunk_resolved=chunk, vmap_width_resolved=vmap_width, backend=backend)

    chunks_dir = os.path.join(out, "chunks")
    os.makedirs(chunks_dir, exist_ok=True)
    if not resuming:
        np.save(os.path.join(out, "masks.npy"), masks)
        write_json_atomic(os.path.join(out, "config.json"), run_dict)  # written last: marks the folder as a run
    for name in os.listdir(chunks_dir):
        if name.startswith(".tmp-"):
            shutil.rmtree(os.path.join(chunks_dir, name))  # a half-written chunk from a killed run

    n_chunks = -(-cfg.models // chunk)
    fns_cache: dict[int, EnsembleFns] = {}
    t0 = time.time()
    trained = 0
    for c in range(n_chunks):
        ids = np.arange(c * chunk, min(cfg.models, (c + 1) * chunk))
        final = os.path.join(chunks_dir, f"{c:05d}")
        if os.path.isdir(final):
            if progress:
                progress(float(ids[-1] + 1), cfg.models)
            continue
        k = len(ids)
        fns = fns_cache.setdefault(k, EnsembleFns(trainer, k, min(vmap_width, k)))
        cb = (lambda e, m: progress(ids[0] + k * (e + 1) / cfg.recipe.epochs, cfg.models)) if progress else None
        tc = time.time()
        states, _ = train_ensemble(trainer, images, labels, masks[ids], ids, cfg.seed, cfg.recipe.epochs,
                                   on_epoch=cb, fns=fns)
        logits = np.asarray(fns.logits(states.params, states.batch_stats, all_images), np.float32)
        if not np.all(np.isfinite(logits)):
            raise JaxUnlearnError(f"chunk {c}: training diverged (NaN/inf logits); lower the learning rate")
        _save_chunk(final, states, logits, ids, {"models": ids.tolist(), "seconds": time.time() - tc})
        trained += k
    wall = time.time() - t0
    return assemble_run(out, dataset, wall_seconds=wall, models_trained=trained)


def assemble_run(out: str, dataset: Dataset, wall_seconds: float = float("nan"), models_trained: int = 0) -> dict:
    """Concatenates finished chunks into margins.npy, logits.npy, accuracy.json and summary.json."""
    chunks_dir = os.path.join(out, "chunks")
    names = sorted(n for n in os.listdir(chunks_dir) if not n.startswith("."))
    logits = np.concatenate([np.load(os.path.join(chunks_dir, n, "outputs.npz"))["logits"] for n in names])
    labels = jnp.asarray(dataset.all_labels)
    margins = np.asarray(margins_from_logits(jnp.asarray(logits), labels), np.float32)
    n = dataset.n_train
    acc_train = np.asarray(accuracy_from_logits(jnp.asarray(logits[:, :n]), labels[:n]))
    acc_test = np.asarray(accuracy_from_logits(jnp.asarray(logits[:, n:]), labels[n:]))
    np.save(os.path.join(out, "logits.npy"), logits)
    np.save(os.path.join(out, "margins.npy"), margins)
    write_json_atomic(os.path.join(out, "accuracy.json"), {"train": acc_train.tolist(), "test": acc_test.tolist()})
    summary = {"models": int(logits.shape[0]), "mean_train_accuracy": float(acc_train.mean()),
               "mean_test_accuracy": float(acc_test.mean()), "models_trained_now": models_trained,
               "wall_seconds": wall_seconds,
               "models_per_hour": (3600 * models_trained / wall_seconds) if models_trained else None}
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    return summary


def load_run(out: str) -> dict:
    """config, masks bool[M, n_train], margins f32[M, n_all], logits f32[M, n_all, C] of a finished run."""
    need = ["config.json", "masks.npy", "margins.npy", "logits.npy"]
    missing = [f for f in need if not os.path.isfile(os.path.join(out, f))]
    if missing:
        raise JaxUnlearnError(f"{out!r} is not a finished jaxunlearn run (missing {', '.join(missing)})")
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    return {"config": config, "masks": np.load(os.path.join(out, "masks.npy")),
            "margins": np.load(os.path.join(out, "margins.npy")), "logits": np.load(os.path.join(out, "logits.npy"))}
