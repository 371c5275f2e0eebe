"""Discrete Key-Value Bottleneck heads (Träuble et al., ICML 2023) over any feature function.

A head maps backbone features f32[N, D] to logits f32[N, V]:

1. every codebook c has its own fixed random projection ``projection[c]`` f32[D, k] (Gaussian, each
   column normalised to unit length over D, as ``RandomDownProjection`` of the authors' code) to the
   key dimension k (14);
2. in each of the C codebooks the nearest key (top-1, squared Euclidean distance) among K keys is
   selected; pairs with ``key_mask`` True are excluded (their distance is +inf, so the next-nearest
   unmasked key is selected), and so are pairs no training point selected (``used`` False): the
   authors' bottleneck, outside training, never fetches a pair whose selection count is 0;
3. the selected value vectors (dimension V = number of classes, initialised to 0) are averaged over
   the codebooks (the non-parametric "codebook-voting-logits" decoder) and are the logits.

Keys are initialised by EMA vector quantisation of the projected training features (decay 0.95,
random normal start, Laplace-smoothed cluster sizes, dead keys re-seeded from the batch) and then
frozen; only the values are trained (SGD lr 0.3, batch 256, global-norm clipping 1.0, label smoothing
0.1: the defaults of the authors' experiment code). Everything here is a pure function of arrays; a
head is a ``flax.struct`` pytree, so an ensemble of heads is a stacked head and every function vmaps.
"""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from jax import lax

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.utils import all_finite
from jaxunlearn.training.subsets import subset_batches


class DKVBHead(struct.PyTreeNode):
    """One DKVB head (stack every leaf over a leading axis for an ensemble).

    projection: f32[C, D, k]; keys: f32[C, K, k]; values: f32[C, K, V]; key_mask: bool[C, K]
    (True: the pair is masked by unlearning, i.e. never selected); used: bool[C, K] or None (True:
    some training point selected the pair while the values were trained; only those are ever
    selected, as the authors' ``cluster_size_counter > 0`` at evaluation; None: every pair).
    """

    projection: jax.Array
    keys: jax.Array
    values: jax.Array
    key_mask: jax.Array
    used: jax.Array | None = None

    @property
    def excluded(self) -> jax.Array:
        """bool[C, K]: pairs never selected, masked or unused."""
        return self.key_mask if self.used is None else self.key_mask | ~self.used

    @property
    def feature_dim(self) -> int:
        return self.projection.shape[-2]


class DKVBConfig(struct.PyTreeNode):
    """The head's shape and training recipe. Defaults: the DKVB / unlearning papers' CIFAR-10 setting
    (256 codebooks × 4,096 pairs, keys of dimension 14) and the authors' experiment code (EMA decay
    0.95, 10 key-initialisation epochs, dead-key threshold factor 0.1; values: zeros, plain SGD
    lr 0.3 without momentum or weight decay, batch 256, global-norm clip 1.0, label smoothing 0.1,
    2,000 epochs: ``cl_epochs``, the loop their ``scripts/train.py`` runs)."""

    num_codebooks: int = struct.field(pytree_node=False, default=256)
    pairs: int = struct.field(pytree_node=False, default=4096)
    dim_key: int = struct.field(pytree_node=False, default=14)
    decay: float = struct.field(pytree_node=False, default=0.95)
    eps: float = struct.field(pytree_node=False, default=1e-5)
    threshold_factor: float = struct.field(pytree_node=False, default=0.1)
    init_epochs: int = struct.field(pytree_node=False, default=10)
    lr: float = struct.field(pytree_node=False, default=0.3)
    batch_size: int = struct.field(pytree_node=False, default=256)
    clip: float = struct.field(pytree_node=False, default=1.0)
    label_smoothing: float = struct.field(pytree_node=False, default=0.1)
    epochs: int = struct.field(pytree_node=False, default=2000)  # their scripts/train.py: cl_epochs
    point_batch: int = struct.field(pytree_node=False, default=512)  # points per nearest-key block (memory)

    def validate(self) -> "DKVBConfig":
        for name in ("num_codebooks", "pairs", "dim_key", "init_epochs", "batch_size", "point_batch"):
            if getattr(self, name) < 1:
                raise JaxUnlearnError(f"DKVB {name} must be >= 1, got {getattr(self, name)}")
        if self.epochs < 0:
            raise JaxUnlearnError(f"DKVB epochs must be >= 0, got {self.epochs}")
        if not 0 < self.decay < 1:
            raise JaxUnlearnError(f"DKVB decay must lie in (0, 1), got {self.decay}")
        if not (self.lr > 0 and self.clip > 0 and self.eps > 0 and self.threshold_factor >= 0):
            raise JaxUnlearnError("DKVB lr, clip and eps must be > 0 and threshold_factor >= 0")
        if not 0 <= self.label_smoothing < 1:
            raise JaxUnlearnError(f"DKVB label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        return self


def check_features(head: DKVBHead, features, what: str = "features") -> None:
    """One clear error for features that do not fit ``head``: f32[N, D] with N >= 1, finite."""
    shape = getattr(features, "shape", None)
    if shape is None or len(shape) != 2:
        raise JaxUnlearnError(f"{what} must be a 2-D array [N, D], got shape {shape}")
    if shape[0] < 1:
        raise JaxUnlearnError(f"{what} is empty")
    if shape[1] != head.feature_dim:
        raise JaxUnlearnError(f"{what} have width {shape[1]}, but the DKVB head projects from {head.feature_dim}")
    if not all_finite(features):
        raise JaxUnlearnError(f"{what} contain NaN or inf")


def random_projection(key, num_codebooks: int, dim_in: int, dim_key: int):
    """f32[C, D, k]: Gaussian, every column normalised to unit length over D."""
    p = jax.random.normal(key, (num_codebooks, dim_in, dim_key), jnp.float32)
    return p / jnp.linalg.norm(p, axis=1, keepdims=True)


def project(projection, features):
    """projection f32[C, D, k], features f32[N, D] -> f32[C, N, k]."""
    return jnp.einsum("nd,cdk->cnk", features, projection)


def sq_distances(z, keys):
    """z f32[C, N, k], keys f32[C, K, k] -> f32[C, N, K] = ||z||² - 2 z·key + ||key||² (one matmul per codebook)."""
    return (jnp.sum(z * z, -1)[..., None] - 2.0 * jnp.einsum("cnk,cjk->cnj", z, keys)
            + jnp.sum(keys * keys, -1)[:, None, :])


def nearest_keys(z, keys, key_mask=None):
    """Top-1 key per codebook: z f32[C, N, k] -> i32[C, N]; masked pairs (bool[C, K] True) are never chosen."""
    d = sq_distances(z, keys)
    if key_mask is not None:
        d = jnp.where(key_mask[:, None, :], jnp.inf, d)
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def pair_counts(idx, pairs: int, weights=None):
    """How often each pair is selected: idx i32[C, N] (every codebook's selected pair per point), weights
    f32[N] (default 1) -> f32[C, K] (K = ``pairs``), one scatter-add per codebook."""
    w = jnp.ones(idx.shape[1], jnp.float32) if weights is None else weights
    return jax.vmap(lambda i: jnp.zeros(pairs, jnp.float32).at[i].add(w))(idx)


def _blocked(fn, features, block: int):
    """fn(f32[b, ...]) -> f32|i32[C, b, ...] over point blocks of ``features`` f32[N, ...]; -> [C, N, ...]."""
    n = features.shape[0]
    b = max(1, min(block, n))
    pad = (-n) % b
    x = jnp.concatenate([features, jnp.zeros((pad, *features.shape[1:]), features.dtype)]) if pad else features
    out = lax.map(fn, x.reshape(-1, b, *x.shape[1:]))  # [blocks, C, b, ...]
    out = jnp.moveaxis(out, 0, 1)
    return out.reshape(out.shape[0], -1, *out.shape[3:])[:, :n]


def select(head: DKVBHead, features, block: int = 512):
    """Indices of the selected pair in every codebook: features f32[N, D] -> i32[C, N]."""
    return _blocked(lambda f: nearest_keys(project(head.projection, f), head.keys, head.excluded), features, block)


def usable_codebooks(head: DKVBHead):
    """bool[C]: codebooks with at least one selectable pair (one with none votes 0)."""
    return jnp.any(~head.excluded, axis=-1)


def decode(values, idx, usable=None):
    """Mean over codebooks of the selected values: values f32[C, K, V], idx i32[C, N] -> logits f32[N, V]."""
    v = jnp.take_along_axis(values, idx[:, :, None], axis=1)  # [C, N, V]
    if usable is not None:
        v = jnp.where(usable[:, None, None], v, 0.0)
    return jnp.mean(v, axis=0)


def dkvb_logits(head: DKVBHead, features, block: int = 512):
    """Logits f32[N, V] of one head for features f32[N, D]."""
    return decode(head.values, select(head, features, block), usable_codebooks(head))


def init_keys(key, z, batch_idx, pairs: int, decay: float = 0.95, eps: float = 1e-5, threshold: float = 0.0):
    """EMA vector quantisation of projected features, one ``lax.scan`` over batches; returns keys f32[C, K, k].

    z: f32[C, N, k] (projected training features); batch_idx: i32[steps, B] (every init epoch's
    shuffled batches, concatenated). As the authors' ``KeyValueBottleneck`` (init_mode "random"):
    keys and their running sums start N(0, 1) and the cluster sizes at 0; per batch the nearest
    keys' counts and feature sums are EMA-updated with ``decay``, keys = sums / (Laplace-smoothed
    cluster size); keys whose EMA cluster size is below ``threshold`` are replaced by random
    vectors of the batch (dead-key expiry).
    """
    c, _, k = z.shape
    k_init, k_run = jax.random.split(key)
    keys = jax.random.normal(k_init, (c, pairs, k), jnp.float32)
    state = (keys, keys, jnp.zeros((c, pairs), jnp.float32))

    def step(state, inp):
        keys, keys_avg, size = state
        idx, kk = inp
        x = z[:, idx]  # [C, B, k]
        sel = nearest_keys(x, keys)  # [C, B]
        # per-key counts and feature sums by scatter-add (the one-hot einsum of the reference, O(C·B·k))
        counts = pair_counts(sel, pairs)
        sums = jax.vmap(lambda i, xc: jnp.zeros((pairs, k), jnp.float32).at[i].add(xc))(sel, x)
        size = decay * size + (1 - decay) * counts
        keys_avg = decay * keys_avg + (1 - decay) * sums
        smoothed = (size + eps) / (size.sum(-1, keepdims=True) + pairs * eps) * size.sum(-1, keepdims=True)
        keys = keys_avg / smoothed[..., None]
        if threshold > 0:
            pick = jax.random.randint(kk, (c, pairs), 0, x.shape[1])
            samples = jnp.take_along_axis(x, pick[..., None], axis=1)
            keys = jnp.where((size < threshold)[..., None], samples, keys)
        return (keys, keys_avg, size), None

    (keys, _, _), _ = lax.scan(step, state, (batch_idx, jax.random.split(k_run, batch_idx.shape[0])))
    return keys


def shuffled_batches(key, weights, batch: int, epochs: int, points: int | None = None):
    """i32[epochs * steps, batch]: per epoch a shuffle of the points with weight > 0 (bool/0-1 f32[N]),
    cut into batches (the last one wraps around): ``subset_batches`` of those points, one key per
    epoch, with as many steps as ``points`` (static; default N, the whole set) need."""
    steps = max(1, -(-(weights.shape[0] if points is None else points) // batch))
    one = lambda k: subset_batches(weights > 0, k, batch, steps)  # noqa: E731
    return jax.vmap(one)(jax.random.split(key, epochs)).reshape(-1, batch), steps


def train_values(values, idx, labels, weights, key, config: DKVBConfig, points: int | None = None):
    """Trains the values only, over precomputed selections (keys and projection are frozen, so each
    training point's selected pairs never change): idx i32[C, N], labels i32[N], weights f32[N]
    (1: the point is in the training set). Plain SGD, global-norm clipping, label smoothing; epochs
    of ``ceil(points / batch)`` steps (``points``: the training set's size, static; default N).
    Returns values f32[C, K, V]."""
    num_classes = values.shape[-1]
    tx = optax.chain(optax.clip_by_global_norm(config.clip), optax.sgd(config.lr))
    batches, _ = shuffled_batches(key, weights, config.batch_size, config.epochs, points)

    def loss(v, b):
        logits = decode(v, idx[:, b])
        target = optax.smooth_labels(jax.nn.one_hot(labels[b], num_classes), config.label_smoothing)
        return optax.softmax_cross_entropy(logits, target).mean()

    def step(carry, b):
        v, opt = carry
        g = jax.grad(loss)(v, b)
        upd, opt = tx.update(g, opt, v)
        return (optax.apply_updates(v, upd), opt), None

    if config.epochs == 0:
        return values
    (values, _), _ = lax.scan(step, (values, tx.init(values)), batches)
    return values


def train_head(key, features, labels, weights, num_classes: int, config: DKVBConfig, points: int | None = None):
    """One DKVB head trained from scratch on the points with weight 1.

    features f32[N, D], labels i32[N], weights f32[N] (0/1 mask of the training subset: the oracle
    is the same key with the forget points' weights 0); ``points``: the subset's size (static; its
    epochs take ceil(points / batch) steps; default N). Keys: projection ``fold_in(key, 0)``, key
    init ``fold_in(key, 1)``, value training ``fold_in(key, 2)``. Returns a :class:`DKVBHead` whose
    ``used`` marks the pairs the subset's points select.
    """
    c, kdim = config.num_codebooks, config.dim_key
    proj = random_projection(jax.random.fold_in(key, 0), c, features.shape[1], kdim)
    z = _blocked(lambda f: project(proj, f), features, config.point_batch)  # [C, N, k]
    kb, ke = jax.random.split(jax.random.fold_in(key, 1))
    init_idx, _ = shuffled_batches(kb, weights, config.batch_size, config.init_epochs, points)
    threshold = config.threshold_factor * config.batch_size / config.pairs
    keys = init_keys(ke, z, init_idx, config.pairs, config.decay, config.eps, threshold)
    mask = jnp.zeros((c, config.pairs), bool)
    # the projections z again, not recomputed: points first for _blocked, codebooks first for nearest_keys
    idx = _blocked(lambda zb: nearest_keys(jnp.swapaxes(zb, 0, 1), keys), jnp.swapaxes(z, 0, 1), config.point_batch)
    values = jnp.zeros((c, config.pairs, num_classes), jnp.float32)
    values = train_values(values, idx, labels, weights, jax.random.fold_in(key, 2), config, points)
    used = pair_counts(idx, config.pairs, (weights > 0).astype(jnp.float32)) > 0  # [C, K]
    return DKVBHead(proj, keys, values, mask, used)


def train_heads(keys, features, labels, weights, num_classes: int, config: DKVBConfig, vmap_width: int = 1):
    """An ensemble of heads, one per key (key[S]) and weight row (f32[S, N]), mapped with
    :func:`jaxunlearn.training.ensemble.map_models`; each epoch has as many steps as the largest row's
    points need (a row of N - |F| points, an oracle, takes the steps of N - |F|, not of N).
    Returns a stacked :class:`DKVBHead`."""
    config.validate()
    chex.assert_rank(features, 2)
    points = int(np.max(np.sum(np.asarray(weights) > 0, axis=-1)))
    if points < 1:
        raise JaxUnlearnError("DKVB heads: a weight row has no training point")
    return _train_heads_jit(keys, features, labels, weights, num_classes, config, vmap_width, points)


def _train_heads(keys, features, labels, weights, num_classes, config, vmap_width, points):
    from jaxunlearn.training.ensemble import map_models

    return map_models(lambda a: train_head(a[0], features, labels, a[1], num_classes, config, points),
                      (keys, weights), vmap_width, keys.shape[0])


_train_heads_jit = jax.jit(_train_heads, static_argnums=(4, 5, 6, 7))


def head_flops(head: DKVBHead) -> float:
    """Multiply-adds ×2 of one head's forward pass for one example: projection C·D·k, distances C·K·k."""
    c, kk, k = head.keys.shape[-3:]
    return float(2 * c * head.feature_dim * k + 2 * c * kk * k + c * kk)
