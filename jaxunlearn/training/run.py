"""A training run on disk: config.json, masks.npy, finished chunks, margins.npy.

Layout of ``out/``::

    config.json            everything needed to reproduce the run
    masks.npy              bool[M, n_train]
    chunks/00000/          one finished chunk: ckpt/ (orbax: params, batch_stats), outputs.npz
                           (logits, margins, correct flags, model_ids), meta.json, and checksums.json
                           (sha256 of every other file)
    margins.npy            f32[M, n_train + n_test] (train points first, then test points)
    logits.npy             f32[M, n_train + n_test, C]
    accuracy.json          per-model train/test accuracy
    summary.json           mean accuracies, wall time, models/hour
    checksums.json         sha256 of masks.npy, margins.npy, logits.npy; written last when assembling

A chunk is written to ``chunks/.tmp-XXXXX`` and renamed when complete, so a killed run
never leaves a chunk that looks finished; re-running the same command skips finished chunks.
Run folders check themselves: re-running verifies every finished chunk against its checksums.json
and re-trains a damaged one (training is deterministic, so the results come out bit-identical);
:func:`load_run` and :func:`load_chunk_variables` refuse damaged chunks or results with a clear error.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np

from jaxunlearn.compile_cache import CompileCounter, compile_summary, remembered
from jaxunlearn.data.datasets import Dataset
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.training.ensemble import EnsembleFns, margins_and_correct, train_ensemble
from jaxunlearn.training.recipe import Recipe
from jaxunlearn.training.step import make_trainer
from jaxunlearn.training.strategy import ensemble_layout, split_devices
from jaxunlearn.utils import make_folder, save_npy_atomic, write_json_atomic
from jaxunlearn.training.subsets import random_subset_masks, retain_masks, steps_per_epoch

FORMAT_VERSION = 1
CHECKSUMS = "checksums.json"
ASSEMBLED = ("masks.npy", "margins.npy", "logits.npy")  # the run-level files load_run reads, checksummed
RETRAIN_HINT = "re-run the same `jaxunlearn train` command to"


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
    dev = jax.local_devices()[0]
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


def _itemsize(dtype) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:  # an extended dtype (PRNG keys): two uint32 words
        return 8


def _tree_bytes(tree) -> int:
    return int(sum(np.prod(x.shape, dtype=np.int64) * _itemsize(x.dtype) for x in jax.tree.leaves(tree)))


def _jaxpr_value_bytes(jaxpr) -> int:
    """Bytes of every value a jaxpr (and the jaxprs nested in it) creates: an upper bound on what one
    call keeps alive at once."""
    total = 0
    for eqn in jaxpr.eqns:
        total += sum(_tree_bytes(v.aval) for v in eqn.outvars if hasattr(v.aval, "shape"))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _jaxpr_value_bytes(sub)
    return total


def memory_estimate(trainer, image_shape, image_dtype, batch_size: int) -> dict:
    """Bytes one model needs while training, counted without compiling anything: ``state`` (params,
    batch statistics, optimiser state: exact, from ``jax.eval_shape``) and ``step`` (every value one
    train step creates, from its jaxpr: an upper bound on its temporaries)."""
    key = jax.eval_shape(lambda: jax.random.key(0))  # shapes only: a concrete key would compile
    state = jax.eval_shape(trainer.init, key)
    images = jax.ShapeDtypeStruct((batch_size, *image_shape), image_dtype)
    labels = jax.ShapeDtypeStruct((batch_size,), jnp.int32)
    jaxpr = jax.make_jaxpr(trainer.train_step)(state, images, labels, key)
    return {"state": _tree_bytes(state), "step": _jaxpr_value_bytes(jaxpr.jaxpr)}


def auto_chunk(estimate: dict, n_train: int, vmap_width: int, max_models: int, budget: int | None = None) -> int:
    """Models per chunk (per device) from free memory and :func:`memory_estimate`: each model of a
    chunk holds its state three times (in, out, gradients) and its subset mask; the temporaries of a
    train step exist for the ``vmap_width`` models of one group at a time."""
    budget = int(0.5 * available_memory_bytes()) if budget is None else budget
    per_model = 3 * estimate["state"] + n_train + 64
    group = estimate["step"]
    fit_wide = budget // (per_model + group)  # every model of the chunk vmapped together
    if min(max_models, fit_wide) <= vmap_width:
        return int(max(1, min(max_models, fit_wide)))
    return int(max(1, min(max_models, (budget - vmap_width * group) // per_model)))


def balanced_chunk(models: int, chunk: int, multiple: int = 1) -> int:
    """The smallest chunk size (a multiple of ``multiple``) that trains ``models`` in as many chunks as
    ``chunk`` does: the chunks come out (nearly) equal, so padding the last one costs little."""
    n_chunks = -(-models // chunk)
    per = -(-models // n_chunks)
    return min(chunk, -(-per // multiple) * multiple)


def _drop_untrained_run(out: str, chunks_dir: str, created_out: bool, run_dict: dict) -> None:
    """Removes the run this process created (its config.json, masks.npy, an empty chunks/, and ``out``
    itself if this process made it) when nothing else is in it yet, so that the same ``--out`` can
    take a corrected config. Anything another process may have added (a chunk, finished or half
    written, or another config.json) keeps the run as it is."""
    try:
        with open(os.path.join(out, "config.json")) as f:
            if json.load(f) != json.loads(json.dumps(run_dict)):
                return
        os.rmdir(chunks_dir)  # fails unless empty: another process's chunk, even a half-written one, stays
    except (OSError, ValueError):
        return
    for name in ("config.json", "masks.npy"):
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out, name))
    if created_out:
        with contextlib.suppress(OSError):
            os.rmdir(out)  # only if empty


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


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: str) -> dict[str, str]:
    """{relative path ("/"-separated): sha256} of every file under ``folder`` but its checksums.json."""
    rels = [os.path.relpath(os.path.join(root, f), folder).replace(os.sep, "/")
            for root, _, files in os.walk(folder) for f in files]
    return {r: sha256_file(os.path.join(folder, r)) for r in sorted(rels) if not r.startswith(CHECKSUMS)}


def verify_folder(folder: str, skip: str | None = None) -> str | None:
    """What is wrong with ``folder`` against its checksums.json, in a few words; None when every
    recorded file is there and intact (files added later are not looked at; recorded files under
    the sub-folder ``skip`` are not read either)."""
    try:
        with open(os.path.join(folder, CHECKSUMS)) as f:
            want = json.load(f)
    except FileNotFoundError:
        return f"no {CHECKSUMS}" if os.path.isdir(folder) else "missing"
    except (OSError, ValueError):
        want = None
    if not isinstance(want, dict) or not want:
        return f"{CHECKSUMS} unreadable"
    for rel, digest in sorted(want.items()):
        if skip and rel.startswith(skip + "/"):
            continue
        path = os.path.join(folder, rel)
        if not os.path.isfile(path):
            return f"{rel}: missing"
        try:
            if sha256_file(path) != digest:
                return f"{rel}: checksum mismatch"
        except OSError as e:
            return f"{rel}: unreadable ({e.strerror})"
    return None


def damaged_chunks(out: str, skip: str | None = None, only=None) -> dict[str, str]:
    """{chunk name: problem} of the finished chunks of run ``out`` that fail their checksums
    (``skip="ckpt"``: all but the checkpoints, which :func:`load_chunk_variables` verifies when read;
    ``only``: these chunk numbers)."""
    chunks_dir = os.path.join(out, "chunks")
    names = sorted(n for n in os.listdir(chunks_dir) if not n.startswith(".") and (only is None or int(n) in only))
    with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:  # hashlib hashes outside the GIL
        problems = pool.map(lambda n: verify_folder(os.path.join(chunks_dir, n), skip), names)
    return {n: p for n, p in zip(names, problems) if p}


def adopt_legacy_chunks(out: str, log: Callable[[str], None], only=None) -> None:
    """Chunks written before checksums existed (no checksums.json) whose outputs load and whose
    checkpoint is there get their checksums recorded now, instead of being re-trained (``only``:
    these chunk numbers, a worker's own)."""
    chunks_dir = os.path.join(out, "chunks")
    legacy = [n for n in sorted(os.listdir(chunks_dir)) if not n.startswith(".")
              and (only is None or int(n) in only) and not os.path.exists(os.path.join(chunks_dir, n, CHECKSUMS))]
    adopted = []
    for name in legacy:
        folder = os.path.join(chunks_dir, name)
        try:
            with np.load(os.path.join(folder, "outputs.npz")) as z:
                ok = np.isfinite(z["logits"]).all() and len(z["model_ids"]) == len(z["logits"])
        except Exception:  # noqa: BLE001 - unreadable outputs: leave it to the damaged-chunk path
            ok = False
        if ok and os.path.isdir(os.path.join(folder, "ckpt")):
            write_json_atomic(os.path.join(folder, CHECKSUMS), file_digests(folder))
            adopted.append(name)
    if adopted:
        log(f"{len(adopted)} chunk(s) of {out} written by an older jaxunlearn had no checksums; recorded them now")


def _chunk_error(out: str, name: str, problem: str) -> JaxUnlearnError:
    return JaxUnlearnError(f"chunk {name} of {out!r} is damaged ({problem}); {RETRAIN_HINT} re-train it")


def _raise_if_damaged(out: str, skip: str | None = None) -> None:
    damaged = damaged_chunks(out, skip)
    if damaged:
        raise _chunk_error(out, *next(iter(damaged.items())))


def _tmp_name(chunk_name: str) -> str:
    """A temporary folder name no other process uses: ``.tmp-NNNNN-<pid>-<random>``."""
    return f".tmp-{chunk_name}-{os.getpid()}-{os.urandom(4).hex()}"


def _new_chunk_folder(final_dir: str) -> str:
    """A new folder, beside ``final_dir``, under a temporary name no other process uses."""
    tmp = os.path.join(os.path.dirname(final_dir), _tmp_name(os.path.basename(final_dir)))
    os.makedirs(tmp)
    return tmp


def _write_checkpoint(folder: str, variables: dict) -> None:
    """The chunk's ``variables`` ({"params", "batch_stats"} of host arrays f32[k, ...]) as an orbax
    checkpoint in ``folder``/ckpt."""
    import orbax.checkpoint as ocp

    with ocp.PyTreeCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(os.path.join(folder, "ckpt")), variables)


def _finish_chunk(tmp: str, final_dir: str, outputs: dict, model_ids: np.ndarray, meta: dict) -> bool:
    """Adds ``outputs`` (logits f32[k, n, C], margins f32[k, n], correct bool[k, n]), ``meta`` and the
    checksums to the chunk written in ``tmp`` (its checkpoint there already) and renames it into place
    as ``final_dir``; False (and ``tmp`` removed) when another process finished the same chunk first."""
    np.savez(os.path.join(tmp, "outputs.npz"), model_ids=model_ids, **outputs)
    write_json_atomic(os.path.join(tmp, "meta.json"), meta)
    write_json_atomic(os.path.join(tmp, CHECKSUMS), file_digests(tmp))
    try:
        os.rename(tmp, final_dir)  # atomic: the chunk is finished exactly when this name exists
    except OSError:  # another worker renamed the same chunk into place first: keep theirs
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    return True


def stored_layout(config: dict) -> tuple[str, bool, int]:
    """The layout a run's config.json stores: (conv formulation, optimizer flattened, chunk size). Runs written
    before the optimizer's formulation was stored ran it on the parameter tree."""
    return config["conv_impl"], bool(config.get("flat_optimizer", False)), int(config["chunk_resolved"])


def run_trainer(config: dict, dataset: Dataset):
    """The trainer a run's models were made with, from its config.json: its recipe, steps per epoch and stored
    layout (so its programs are the training run's, under the same stored-program keys)."""
    conv_impl, flat_optimizer, _ = stored_layout(config)
    return make_trainer(Recipe(**config["run"]["recipe"]), dataset.num_classes, dataset.image_shape, dataset.mean,
                        dataset.std, config["steps_per_epoch"], conv_impl, flat_optimizer=flat_optimizer)


def read_run_config(out: str) -> dict:
    """A run folder's ``config.json`` (what :func:`train_run` wrote: the run, its data and its layout)."""
    with open(os.path.join(out, "config.json")) as f:
        return json.load(f)


def _create_json_once(path: str, obj) -> bool:
    """Writes ``path`` only if it does not exist yet (atomically, across processes): True if this
    call created it."""
    folder = os.path.dirname(os.path.abspath(path))
    # the temporary file lives beside the run folder: inside it, a worker starting now would see a
    # non-empty folder without config.json
    tmp = os.path.join(os.path.dirname(folder), f".{os.path.basename(folder)}.config.{os.getpid()}.{os.urandom(4).hex()}")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    try:
        os.link(tmp, path)  # fails if path exists: exactly one creator
        return True
    except FileExistsError:
        return False
    finally:
        os.remove(tmp)


def parse_worker(spec: str | None) -> tuple[int, int] | None:
    """"I/N" -> (I, N): worker I of N (0 <= I < N) trains chunks c with c % N == I."""
    if spec is None:
        return None
    try:
        i, n = (int(x) for x in spec.split("/"))
    except ValueError:
        raise JaxUnlearnError(f"--worker {spec!r}: write I/N, e.g. 0/4 for the first of 4 workers") from None
    if not (n >= 1 and 0 <= i < n):
        raise JaxUnlearnError(f"--worker {spec!r}: need 0 <= I < N")
    return i, n


def missing_chunks(out: str, n_chunks: int) -> list[int]:
    return [c for c in range(n_chunks) if not os.path.isdir(os.path.join(out, "chunks", f"{c:05d}"))]


def load_chunk_variables(run_dir: str, chunk: int):
    """Stacked {"params", "batch_stats"} of one finished chunk (numpy leaves), verified first."""
    import warnings

    import orbax.checkpoint as ocp

    chunk_dir = os.path.join(run_dir, "chunks", f"{chunk:05d}")
    problem = verify_folder(chunk_dir)
    if problem is None:
        try:
            path = os.path.abspath(os.path.join(chunk_dir, "ckpt"))
            with ocp.PyTreeCheckpointer() as ckptr, warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sharding info not provided")
                # as host arrays, whatever devices wrote them (older runs saved device arrays)
                leaves = ckptr.metadata(path).item_metadata.tree
                return ckptr.restore(path, restore_args=jax.tree.map(
                    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), leaves))
        except Exception as e:  # noqa: BLE001 - whatever orbax raises, the user needs the chunk and the fix
            first_line = (str(e).strip().splitlines() or [""])[0]
            first_line = first_line if len(first_line) <= 150 else first_line[:150] + "..."
            problem = f"checkpoint does not restore: {type(e).__name__}: {first_line}"
    raise _chunk_error(run_dir, f"{chunk:05d}", problem)


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def train_run(cfg: RunConfig, dataset: Dataset, out: str, progress: Callable | None = None,
              log: Callable[[str], None] = _stderr, worker: tuple[int, int] | None = None,
              assemble_only: bool = False, devices: int | None = None) -> dict:
    """Trains (or resumes) the run ``cfg`` into folder ``out``; returns the summary dict.

    ``progress(models_done: float, total: int)`` is called after every epoch of every chunk.
    On resume, each finished chunk that fails its checksums is reported in one line to ``log``,
    deleted and re-trained.

    ``worker=(I, N)``: one of N processes sharing ``out`` (a scheduler job array): this one trains
    only chunks c with c % N == I. Model m's subset, init and data order depend only on (seed, m),
    and the chunk size is fixed by whichever process creates config.json, so the result does not
    depend on how the run is split. Whichever worker finds every chunk present assembles the run;
    the others return ``{"complete": False, ...}``. ``assemble_only``: train nothing, assemble a
    complete run (an error lists the missing chunks otherwise).

    ``devices``: how many local devices share each chunk (default: all); a chunk's models axis is
    split across them (``shard_map``), each running the measured per-device layout
    (``strategy.ensemble_layout``). The layout (conv formulation, chunk size,
    per-device vmap width) is fixed when the run is created and stored in config.json; every resume
    and worker uses it, whatever its own device count, and its results are bit-identical to one
    device running that layout (a chunk is split across only as many devices as keep each share at
    least the vmap width: ``strategy.split_devices``)."""
    counter = CompileCounter()
    cfg.recipe.validate()
    if cfg.models < 1:
        raise JaxUnlearnError(f"models must be >= 1, got {cfg.models}")
    masks = make_masks(cfg, dataset.n_train)  # validates alpha / forget before anything is written
    largest = int(masks.sum(axis=1).max())
    if cfg.recipe.batch_size > largest:
        raise JaxUnlearnError(f"batch size {cfg.recipe.batch_size} is larger than a model's training set "
                              f"({largest} points at alpha {cfg.alpha})")
    local = jax.local_devices()
    if devices is not None and not 1 <= devices <= len(local):
        raise JaxUnlearnError(f"--devices must lie in [1, {len(local)}] (the local devices), got {devices}")
    devs = local[:devices or len(local)]
    backend = jax.default_backend()
    spe = steps_per_epoch(masks, cfg.recipe.batch_size)
    trainer_for = lambda impl, flat: make_trainer(cfg.recipe, dataset.num_classes, dataset.image_shape,  # noqa: E731
                                                  dataset.mean, dataset.std, spe, impl, flat_optimizer=flat)
    run_dict = {"format": FORMAT_VERSION, "run": cfg.to_dict(), "data_fingerprint": dataset.fingerprint(),
                "n_train": dataset.n_train, "n_test": dataset.n_test, "num_classes": dataset.num_classes,
                "steps_per_epoch": spe}
    resuming = _check_out(out, run_dict)

    # device_put, not jnp.asarray: the latter compiles a small program per shape
    images, labels = jax.device_put(dataset.train_images), jax.device_put(dataset.train_labels)
    all_images, all_labels = jax.device_put(dataset.all_images), jax.device_put(dataset.all_labels)
    # the layout a run was created with (conv formulation, optimizer formulation, chunk, vmap width) is the
    # run's: a resume or a later worker keeps it, whatever its own device count, so every model runs the same
    # program
    stored = {}
    if resuming:
        stored = read_run_config(out)
        conv_impl, flat_optimizer, chunk = stored_layout(stored)
    else:
        # the models rounded up to a multiple of the devices: a short chunk is padded, never put on fewer devices
        padded = -(-cfg.models // len(devs)) * len(devs)
        strat = ensemble_layout(cfg.recipe.model, padded, devs)[1]
        conv_impl, flat_optimizer = cfg.conv_impl or strat.conv_impl, strat.flat_optimizer
        if cfg.chunk:
            chunk = cfg.chunk
        else:  # per device, times the devices; then as even as the same number of chunks allows
            # the estimate traces a train step (0.15 s for a digits MLP): remembered beside the compiled programs
            est = remembered("memory-estimate", {"recipe": cfg.recipe.to_dict(), "classes": dataset.num_classes,
                                                 "image": [*dataset.image_shape, str(dataset.train_images.dtype)],
                                                 "conv_impl": conv_impl, "flat_optimizer": flat_optimizer},
                             lambda: memory_estimate(trainer_for(conv_impl, flat_optimizer), dataset.image_shape,
                                                     dataset.train_images.dtype, cfg.recipe.batch_size))
            budget = int(0.5 * available_memory_bytes()) // (len(devs) if backend == "cpu" else 1)  # CPU: shared
            chunk = len(devs) * auto_chunk(est, dataset.n_train, cfg.vmap_width or strat.vmap_width,
                                           -(-cfg.models // len(devs)), budget)
            chunk = balanced_chunk(cfg.models, chunk, len(devs))
        chunk = max(1, min(int(chunk), padded))
        # the conv and optimizer formulations measured for the devices this chunk size really uses (the
        # estimate above was for the whole ensemble's; for the digits CNN, im2col, the one-device CPU choice,
        # is the larger of the two; ResNet-9 uses Winograd either way, estimated above with it)
        layout = ensemble_layout(cfg.recipe.model, chunk, devs)[1]
        conv_impl, flat_optimizer = cfg.conv_impl or layout.conv_impl, layout.flat_optimizer

    def width_for(c: int) -> int:  # per device; an explicit --vmap-width is kept (on fewer devices if need be)
        return min(cfg.vmap_width, c) if cfg.vmap_width else ensemble_layout(cfg.recipe.model, c, devs)[1].vmap_width

    vmap_width = width_for(chunk)
    run_dict.update(conv_impl=conv_impl, flat_optimizer=flat_optimizer, chunk_resolved=chunk,
                    vmap_width_resolved=vmap_width, backend=backend,
                    devices=len(split_devices(devs, chunk, vmap_width)))

    chunks_dir = os.path.join(out, "chunks")
    created_out = not os.path.exists(out)
    make_folder(out)
    # config.json first: the folder is a run from here on, and its layout is the run's
    created_run = not resuming and _create_json_once(os.path.join(out, "config.json"), run_dict)
    if not resuming and not created_run:
        _check_out(out, run_dict)  # another worker created the run first: same config, and its layout
        stored = read_run_config(out)
        conv_impl, flat_optimizer, chunk = stored_layout(stored)
    trainer = trainer_for(conv_impl, flat_optimizer)
    if stored:  # runs written before the width was stored: the rule, for their chunk
        vmap_width = int(stored.get("vmap_width_resolved") or width_for(chunk))
    os.makedirs(chunks_dir, exist_ok=True)
    save_npy_atomic(os.path.join(out, "masks.npy"), masks)  # on resume too: same bytes; repairs a damaged copy
    n_chunks = -(-cfg.models // chunk)
    if assemble_only:
        missing = missing_chunks(out, n_chunks)
        if missing:
            raise JaxUnlearnError(f"{out!r} is missing {len(missing)} of {n_chunks} chunks "
                                  f"({', '.join(f'{c:05d}' for c in missing[:8])}{' ...' if len(missing) > 8 else ''}); "
                                  "run (or re-run) the workers that train them")
        return assemble_run(out, dataset)
    mine = [c for c in range(n_chunks) if worker is None or c % worker[1] == worker[0]]
    for name in os.listdir(chunks_dir):  # half-written chunks of a killed run (this worker's only)
        if name.startswith(".tmp-") and (worker is None or int(name.split("-")[1]) in mine):
            shutil.rmtree(os.path.join(chunks_dir, name), ignore_errors=True)
    own = None if worker is None else set(mine)
    adopt_legacy_chunks(out, log, own)
    for name, problem in damaged_chunks(out, only=own).items():
        log(f"chunk {name} of {out} is damaged ({problem}); re-training it")
        shutil.rmtree(os.path.join(chunks_dir, name))

    # one program for every chunk: a short last chunk is padded with copies of its last model
    fns = EnsembleFns(trainer, chunk, vmap_width, devs)
    t0 = time.time()
    trained = 0
    for c in mine:
        ids = np.arange(c * chunk, min(cfg.models, (c + 1) * chunk))
        final = os.path.join(chunks_dir, f"{c:05d}")
        if os.path.isdir(final):
            if progress:
                progress(float(ids[-1] + 1), cfg.models)
            continue
        k = len(ids)
        run_ids = np.concatenate([ids, np.full(chunk - k, ids[-1])])
        cb = (lambda e, m: progress(ids[0] + k * (e + 1) / cfg.recipe.epochs, cfg.models)) if progress else None
        tc = time.time()
        states, _ = train_ensemble(trainer, images, labels, masks[run_ids], run_ids, cfg.seed, cfg.recipe.epochs,
                                   on_epoch=cb, fns=fns)
        # what a chunk keeps, as host arrays: a checkpoint must not record which devices held the models
        # (a run trained on 2 devices is read back on 1); the padding dropped there (slicing on the
        # device would compile)
        variables = jax.tree.map(lambda t: np.asarray(t)[:k], {"params": states.params,
                                                              "batch_stats": states.batch_stats})
        tmp = _new_chunk_folder(final)
        try:
            # the checkpoint is written (orbax imported, the first time) while the outputs compile and run
            with ThreadPoolExecutor(1) as pool:
                saving = pool.submit(_write_checkpoint, tmp, variables)
                # logits, margins and correct flags of every point, in one program (the padding dropped on
                # the host: slicing on the device would compile)
                logits, margins, correct = (np.asarray(a)[:k] for a in fns.outputs(
                    states.params, states.batch_stats, all_images, all_labels))
                saving.result()
            if not np.all(np.isfinite(logits)):
                if worker is None and created_run:  # a run this process created alone: no folder to clear by hand
                    shutil.rmtree(tmp, ignore_errors=True)
                    _drop_untrained_run(out, chunks_dir, created_out, run_dict)
                raise JaxUnlearnError(f"chunk {c}: training diverged (NaN/inf logits); lower the learning rate")
            if _finish_chunk(tmp, final, {"logits": logits, "margins": margins, "correct": correct}, ids,
                             {"models": ids.tolist(), "seconds": time.time() - tc}):
                trained += k
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # nothing of this chunk is left behind
            raise
    wall = time.time() - t0
    missing = missing_chunks(out, n_chunks)
    if missing:  # other workers' chunks are still to come; whoever finishes last assembles
        return {"complete": False, "models": cfg.models, "models_trained_now": trained, "wall_seconds": wall,
                "chunks_missing": len(missing), "chunks": n_chunks}
    if not trained and verify_folder(out) is None:
        # assembled already and intact (a re-run, or a job-array worker checking again): nothing is
        # rewritten, so another process reading the run meanwhile never sees it half-written
        try:
            with open(os.path.join(out, "summary.json")) as f:
                done = json.load(f)
            return {**done, "models_trained_now": 0, "wall_seconds": wall, "models_per_hour": None,
                    "compile": compile_summary(counter)}
        except (OSError, ValueError):  # no summary: assembled again below
            pass
    # a lone process just verified every chunk; a worker checks the others' too
    return assemble_run(out, dataset, wall_seconds=wall, models_trained=trained, verify=worker is not None,
                        counter=counter)


# for chunks written before chunks kept margins (new chunks get them from the program of their logits)
_outputs_of_logits = jax.jit(margins_and_correct)


def _chunk_outputs(folder: str, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(logits f32[k, n, C], margins f32[k, n], correct bool[k, n]) of a finished chunk."""
    with np.load(os.path.join(folder, "outputs.npz")) as z:
        if "margins" in z.files:
            return z["logits"], z["margins"], z["correct"]
        logits = z["logits"]
    return (logits, *(np.asarray(a) for a in _outputs_of_logits(logits, labels)))


def assemble_run(out: str, dataset: Dataset, wall_seconds: float = float("nan"), models_trained: int = 0,
                 verify: bool = True, counter: CompileCounter | None = None) -> dict:
    """Concatenates finished chunks (verified first unless ``verify=False``) into margins.npy, logits.npy,
    accuracy.json and summary.json; then records the checksums of the run-level files. summary.json's
    ``compile`` says what this process compiled since ``counter`` started (programs, really compiled,
    persistent-cache hits, seconds), and which compilation cache it used."""
    counter = counter or CompileCounter()
    if verify:
        _raise_if_damaged(out)
    chunks_dir = os.path.join(out, "chunks")
    # each file is replaced whole and the checksums come last: a reader (another worker assembling the
    # same bytes meanwhile) sees old or new files, and a crash in between leaves files that fail the old
    # checksums, so the run is rebuilt
    names = sorted(n for n in os.listdir(chunks_dir) if not n.startswith("."))
    logits, margins, correct = (np.concatenate(a) for a in
                                zip(*(_chunk_outputs(os.path.join(chunks_dir, n), dataset.all_labels) for n in names)))
    margins = margins.astype(np.float32)
    acc_train, acc_test = correct[:, :dataset.n_train].mean(1), correct[:, dataset.n_train:].mean(1)
    save_npy_atomic(os.path.join(out, "logits.npy"), logits)
    save_npy_atomic(os.path.join(out, "margins.npy"), margins)
    write_json_atomic(os.path.join(out, "accuracy.json"), {"train": acc_train.tolist(), "test": acc_test.tolist()})
    summary = {"complete": True, "models": int(logits.shape[0]), "mean_train_accuracy": float(acc_train.mean()),
               "mean_test_accuracy": float(acc_test.mean()), "models_trained_now": models_trained,
               "wall_seconds": wall_seconds,
               "models_per_hour": (3600 * models_trained / wall_seconds) if models_trained else None,
               "compile": compile_summary(counter)}
    write_json_atomic(os.path.join(out, "summary.json"), summary)
    write_json_atomic(os.path.join(out, CHECKSUMS), {f: sha256_file(os.path.join(out, f)) for f in ASSEMBLED})
    return summary


def load_run(out: str) -> dict:
    """config, masks bool[M, n_train], margins f32[M, n_all], logits f32[M, n_all, C] of a finished run.
    Raises JaxUnlearnError when these files or any finished chunk fail their checksums."""
    need = ["config.json", "masks.npy", "margins.npy", "logits.npy", "chunks"]
    missing = [f for f in need if not os.path.exists(os.path.join(out, f))]
    if missing:
        raise JaxUnlearnError(f"{out!r} is not a finished jaxunlearn run (missing {', '.join(missing)})")
    problem = verify_folder(out)
    if problem:
        raise JaxUnlearnError(f"the results of {out!r} are damaged ({problem}); {RETRAIN_HINT} rebuild them")
    # every chunk's outputs; its checkpoint (the bulk: ~26 MB a ResNet-9) is verified when it is loaded
    _raise_if_damaged(out, skip="ckpt")
    return {"config": read_run_config(out), "masks": np.load(os.path.join(out, "masks.npy")),
            "margins": np.load(os.path.join(out, "margins.npy")), "logits": np.load(os.path.join(out, "logits.npy"))}
