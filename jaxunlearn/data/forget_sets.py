"""Forget sets from a spec string, deterministic given a seed.

* ``random:N``   N training points drawn uniformly.
* ``class:C``    every training point of class C.
* ``cluster:K:J`` a semantically coherent subpopulation: k-means with K clusters on penultimate-layer
  embeddings of a trained model; the points of cluster J that carry that cluster's most common label.
* ``classes:A,B,...:N`` N points drawn uniformly from the classes listed only (the DEL paper's
  non-IID forget set: ``classes:2,5:5000`` on CIFAR-10).
* ``memorized:N`` the N most memorized training points (Feldman-Zhang memorization from the
  α-subset ensemble, :func:`jaxunlearn.metrics.memorization`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import check_indices


def _ints(spec: str, parts: list[str], count: int) -> list[int]:
    if len(parts) != count:
        raise JaxUnlearnError(f"forget set {spec!r}: expected {count} numbers after the kind")
    try:
        return [int(p) for p in parts]
    except ValueError:
        raise JaxUnlearnError(f"forget set {spec!r}: expected integers") from None


@jax.jit
def _kmeans_step(x, centers):
    d = ((x[:, None, :] - centers[None]) ** 2).sum(-1)
    assign = d.argmin(1)
    onehot = jax.nn.one_hot(assign, centers.shape[0])
    counts = onehot.sum(0)
    new = (onehot.T @ x) / jnp.maximum(counts, 1)[:, None]
    return jnp.where(counts[:, None] > 0, new, centers), assign


def kmeans(x, k: int, seed: int = 0, iters: int = 50) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding. x: f32[n, D] -> cluster of each point, i32[n]."""
    x = np.asarray(x, np.float64)
    rng = np.random.default_rng(seed)
    centers = [x[rng.integers(len(x))]]
    for _ in range(1, k):
        d = np.min(((x[:, None] - np.asarray(centers)[None]) ** 2).sum(-1), axis=1)
        centers.append(x[rng.choice(len(x), p=d / d.sum())])
    c = jnp.asarray(np.asarray(centers), jnp.float32)
    xj = jnp.asarray(x, jnp.float32)
    for _ in range(iters):
        c, assign = _kmeans_step(xj, c)
    return np.asarray(assign)


KINDS = {"random": 1, "class": 1, "cluster": 2, "classes": 2, "memorized": 1}
NEEDS_MODELS = {"cluster": "embeddings of a trained model", "memorized": "memorization scores of a subset ensemble"}


def _check_size(spec: str, size: int, n_train: int) -> None:
    if not 0 < size < n_train:
        raise JaxUnlearnError(f"forget set {spec!r}: size must lie in [1, {n_train - 1}] for {n_train} training points")


def parse_forget_spec(spec: str, n_train: int) -> tuple[str, list]:
    """Checks a spec's form and numbers (everything that needs no trained model). ``classes``
    returns [[class, ...], N]."""
    kind, *parts = spec.split(":")
    if kind not in KINDS:
        raise JaxUnlearnError(f"unknown forget set kind {kind!r} in {spec!r}; use random:N, class:C, cluster:K:J, "
                              "classes:A,B:N or memorized:N")
    if kind == "classes":
        if len(parts) != 2:
            raise JaxUnlearnError(f"forget set {spec!r}: write classes:A,B,...:N")
        classes = _ints(spec, parts[0].split(","), len(parts[0].split(",")))
        (size,) = _ints(spec, parts[1:], 1)
        if len(set(classes)) != len(classes):
            raise JaxUnlearnError(f"forget set {spec!r}: a class is listed twice")
        _check_size(spec, size, n_train)
        return kind, [classes, size]
    nums = _ints(spec, parts, KINDS[kind])
    if kind in ("random", "memorized"):
        _check_size(spec, nums[0], n_train)
    if kind == "cluster" and not 0 <= nums[1] < nums[0]:
        raise JaxUnlearnError(f"forget set {spec!r}: cluster index must lie in [0, {nums[0]})")
    return kind, nums


def make_forget_set(spec: str, labels, embeddings=None, seed: int = 0, memorization=None) -> np.ndarray:
    """Sorted train indices i64[f] of the forget set ``spec``. labels: i32[n_train];
    embeddings: f32[n_train, D] (needed for cluster sets); memorization: f32[n_train] (memorized sets)."""
    labels = np.asarray(labels)
    n = labels.shape[0]
    kind, nums = parse_forget_spec(spec, n)
    if kind == "random":
        (size,) = nums
        if not 0 < size < n:
            raise JaxUnlearnError(f"forget set {spec!r}: size must lie in [1, {n - 1}] for {n} training points")
        idx = np.random.default_rng([seed, 7]).choice(n, size, replace=False)
    elif kind == "class":
        (c,) = nums
        idx = np.flatnonzero(labels == c)
        if idx.size == 0:
            raise JaxUnlearnError(f"forget set {spec!r}: no training point has class {c}")
    elif kind == "cluster":
        k, j = nums
        if embeddings is None:
            raise JaxUnlearnError(f"forget set {spec!r} needs embeddings of a trained model")
        emb = np.asarray(embeddings)
        if emb.ndim != 2 or emb.shape[0] != n:
            raise JaxUnlearnError(f"forget set {spec!r}: embeddings must be [{n} training points, D], got {emb.shape}")
        if not np.all(np.isfinite(emb)):
            raise JaxUnlearnError(f"forget set {spec!r}: the embeddings contain NaN or inf")
        if k > n:
            raise JaxUnlearnError(f"forget set {spec!r}: {k} clusters for {n} training points")
        assign = kmeans(emb, k, seed)
        members = np.flatnonzero(assign == j)
        if members.size == 0:
            raise JaxUnlearnError(f"forget set {spec!r}: cluster {j} is empty")
        major = np.bincount(labels[members]).argmax()
        idx = members[labels[members] == major]
    elif kind == "classes":
        classes, size = nums
        pool = np.flatnonzero(np.isin(labels, classes))
        missing = [c for c in classes if not np.any(labels == c)]
        if missing:
            raise JaxUnlearnError(f"forget set {spec!r}: no training point has class {missing[0]}")
        if size > pool.size:
            raise JaxUnlearnError(f"forget set {spec!r}: classes {classes} have only {pool.size} training points")
        idx = np.random.default_rng([seed, 11]).choice(pool, size, replace=False)
    elif kind == "memorized":
        (size,) = nums
        if memorization is None:
            raise JaxUnlearnError(f"forget set {spec!r} needs {NEEDS_MODELS['memorized']}")
        mem = np.asarray(memorization, np.float64)
        if mem.shape != (n,):
            raise JaxUnlearnError(f"forget set {spec!r}: memorization has shape {mem.shape}, expected ({n},)")
        if not np.all(np.isfinite(mem)):
            raise JaxUnlearnError(f"forget set {spec!r}: the memorization scores contain NaN or inf")
        idx = np.argsort(-mem, kind="stable")[:size]
    idx = check_indices(idx, n)
    if idx.size == n:
        raise JaxUnlearnError(f"forget set {spec!r} is the whole training set")
    return idx
