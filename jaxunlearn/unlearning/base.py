"""The shared signature of every unlearning method, and how one is applied to a whole ensemble.

A method is a pure function for ONE model::

    method(params, model_state, data, forget_idx, retain_idx, targets, key, config)
        -> (params, model_state, cost)

params / model_state: one model's pytrees (model_state = BatchNorm statistics, maybe {});
data: :class:`UnlearnData` (training images/labels on device + the model's apply function);
forget_idx: i32[f], retain_idx: i32[r] (training indices); targets: f32[n_train, C] target
logits or None; key: PRNG key; config: the method's ``flax.struct`` config (float fields are
traced leaves, integer shape/length fields static). cost: f32[] per-example gradient
evaluations (a forward pass counts 1/3), so compute can be reported as a fraction of
re-training. :func:`unlearn_ensemble` maps a method over K models in one jit (vmapped groups, the
ensemble layout of training);
:func:`unlearn_grid` also vmaps it over a grid of configs that share their static fields.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxunlearn.compile_cache import Program
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.training.ensemble import map_models, over_devices, unlearning_compiler_options
from jaxunlearn.training.strategy import split_devices
from jaxunlearn.utils import all_finite, check_indices


class UnlearnData(struct.PyTreeNode):
    images: jax.Array  # u8|f32[n_train, H, W, C]
    labels: jax.Array  # i32[n_train]
    apply: Callable = struct.field(pytree_node=False)  # (params, state, images, train) -> (logits, state)
    # (key) -> (params, model_state): the model's initialisation from a key. DEL resets its mask to a
    # fresh draw; single-gradient reads w_0 = init(model key)[0] (it is given each model's own key)
    init: Callable | None = struct.field(pytree_node=False, default=None)
    memorization: jax.Array | None = None  # f32[n_train] per-point memorization (the memorization mask reads it)
    # pytree of bool like params, or None: weights a method may change (``METHOD@MASK`` sets it per model);
    # every SGD step keeps the others' exact bits
    update_mask: Any = None


FORWARD_COST = 1.0 / 3.0  # a forward pass is about a third of a forward+backward


def num_classes(data: UnlearnData, params, model_state) -> int:
    """C of ``data.apply``'s logits for ONE model's params / model_state (arrays, tracers or shapes:
    the apply is traced for its output shape, not run)."""
    image = jax.ShapeDtypeStruct((1, *data.images.shape[1:]), data.images.dtype)
    return int(jax.eval_shape(lambda p, s, x: data.apply(p, s, x, False)[0], params, model_state, image).shape[-1])


def _one_model(tree):
    """The shapes of one model of a pytree stacked over K (the leading axis dropped)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), tree)


def _check_optional_data(params, model_state, data: UnlearnData, n: int) -> None:
    """``init`` returns (params, model_state) of one model; ``memorization`` is f32[n_train], finite;
    ``update_mask`` has one bool per weight of one model (every model gets it)."""
    shapes = lambda t: jax.tree.map(lambda x: tuple(x.shape), t)  # noqa: E731
    if data.init is not None:
        want = "init must be key -> (params, model_state) of ONE model, e.g. lambda k: (lambda v: (v['params'], " \
               "v.get('batch_stats', {})))(module.init(k, x))"
        try:
            got = jax.eval_shape(data.init, jax.random.key(0))
        except Exception as e:  # noqa: BLE001 (whatever the user's function raises, said with what it must be)
            raise JaxUnlearnError(f"UnlearnData.init failed on a key ({type(e).__name__}: {e}); {want}") from None
        if not (isinstance(got, tuple) and len(got) == 2):
            raise JaxUnlearnError(f"UnlearnData.init returned {type(got).__name__}, not a pair; {want}")
        if shapes(got[0]) != shapes(_one_model(params)):
            raise JaxUnlearnError(f"UnlearnData.init's params do not match the models' (one model: their leaves "
                                  f"without the K axis); {want}")
    if data.memorization is not None:
        if np.shape(data.memorization) != (n,):
            raise JaxUnlearnError(f"UnlearnData.memorization must be f32[n_train={n}], got shape "
                                  f"{np.shape(data.memorization)}")
        if not all_finite(data.memorization):
            raise JaxUnlearnError("UnlearnData.memorization contains NaN or inf")
    if data.update_mask is not None:
        if jax.tree.structure(data.update_mask) != jax.tree.structure(params) or \
                shapes(data.update_mask) != shapes(_one_model(params)):
            raise JaxUnlearnError("UnlearnData.update_mask must be a pytree of bools like one model's params "
                                  "(without the K axis)")


def check_unlearn_inputs(params, data: UnlearnData, forget_idx, retain_idx, targets, keys=None, model_state=None):
    """The checks every method's inputs pass before anything is compiled: the index sets (integers,
    in range, unique, non-empty, disjoint), the data (one integer label in [0, C) per image), the
    stacked models (every leaf of params / model_state and ``keys`` with the same K) and the
    targets (f32[K, n_train, C], finite). Returns the index sets as i32 device arrays."""
    n = data.labels.shape[0]
    forget = check_indices(forget_idx, n, "forget set")  # empty, out of range or repeated: one clear error
    retain = check_indices(retain_idx, n, "retain set")  # (sorted copies: the sets keep their given order)
    both = np.intersect1d(forget, retain)
    if both.size:
        raise JaxUnlearnError(f"forget and retain sets overlap in {both.size} points (e.g. {both[:5].tolist()})")
    if data.images.shape[0] != n:
        raise JaxUnlearnError(f"data: {data.images.shape[0]} images but {n} labels")
    if not jnp.issubdtype(data.labels.dtype, jnp.integer):
        raise JaxUnlearnError(f"data: labels must be integers, got dtype {data.labels.dtype}")
    leaves = jax.tree.leaves((params, model_state))
    if not leaves or any(np.ndim(x) < 1 for x in leaves):
        raise JaxUnlearnError("params must be stacked over the models: every leaf with a leading K axis")
    k = leaves[0].shape[0]
    if any(x.shape[0] != k for x in leaves) or (keys is not None and keys.shape[0] != k):
        sizes = sorted({x.shape[0] for x in leaves} | ({keys.shape[0]} if keys is not None else set()))
        raise JaxUnlearnError(f"params, model_state and keys must share their leading (models) axis; got sizes {sizes}")
    _check_optional_data(params, model_state, data, n)
    c = num_classes(data, _one_model(params), _one_model(model_state))
    labels = np.asarray(data.labels)
    if labels.min() < 0 or labels.max() >= c:
        raise JaxUnlearnError(f"data: labels must lie in [0, {c}) (the model's classes), got {labels.min()}..{labels.max()}")
    if targets is not None:
        if np.ndim(targets) != 3 or tuple(targets.shape) != (k, n, c):
            raise JaxUnlearnError(f"targets must be [K={k}, n_train={n}, C={c}], got {tuple(np.shape(targets))}")
        if not all_finite(targets):
            raise JaxUnlearnError("targets contain NaN or inf")
    return jnp.asarray(np.asarray(forget_idx), jnp.int32), jnp.asarray(np.asarray(retain_idx), jnp.int32)


def check_config(method, config) -> None:
    """The config's values by the registry's rules (and its class against a registered method's)."""
    from jaxunlearn.unlearning.registry import check_config as check  # the registry imports every method

    check(config, method)


def model_devices(devices, k: int, vmap_width: int | None = None) -> tuple:
    """The devices K models are split across (``training.strategy.split_devices``; default: every
    local device): as many as share K evenly, each at least ``vmap_width`` models (None, all K vmapped
    together: one device)."""
    devices = tuple(jax.local_devices() if devices is None else devices)
    if not devices:
        raise JaxUnlearnError("no devices given")
    return tuple(split_devices(devices, k, vmap_width or k))  # None: all K vmapped together, on one device


def unlearn_ensemble(method: Callable, params, model_state, data: UnlearnData, forget_idx, retain_idx,
                     targets, keys, config, vmap_width: int | None = None, devices=None) -> tuple[Any, Any, jax.Array]:
    """Applies ``method`` to K stacked models in one jitted call.

    params / model_state: stacked over K; targets: f32[K, n_train, C] or None; keys: key[K].
    ``vmap_width``: models vmapped together, groups mapped one after another (the ensemble layout
    of training, :func:`jaxunlearn.training.ensemble.map_models`; None: all K vmapped; 1: one model
    at a time; ``training.strategy.default_strategy`` has the measured choice per model and backend).
    ``devices``: the K models are split across them (``shard_map`` over a "models" mesh, data
    replicated, each device running that layout on its share; default as many local devices as
    share K evenly with at least ``vmap_width`` models each), bit-identical to one device.
    Returns stacked params, model states and cost f32[K].
    """
    forget_idx, retain_idx = check_unlearn_inputs(params, data, forget_idx, retain_idx, targets, keys, model_state)
    check_config(method, config)
    devs = model_devices(devices, keys.shape[0], vmap_width)
    return _program(_unlearn_impl, method, vmap_width, devs, data)(config, params, model_state, data, forget_idx,
                                                                   retain_idx, targets, keys)


def unlearn_grid(method: Callable, params, model_state, data: UnlearnData, forget_idx, retain_idx,
                 targets, keys, configs, vmap_width: int | None = None,
                 devices=None) -> list[tuple[Any, Any, jax.Array]]:
    """Applies ``method`` at every config of ``configs`` to all K models.

    Configs that share their static fields (epochs, batch sizes...) run as ONE compiled call,
    vmapped over the stacked float hyperparameters and over the K models (split across ``devices``
    as in :func:`unlearn_ensemble`). Returns, per config in the given order, (params, model_state,
    cost f32[K]) stacked over K.
    """
    forget_idx, retain_idx = check_unlearn_inputs(params, data, forget_idx, retain_idx, targets, keys, model_state)
    if not len(configs):
        raise JaxUnlearnError("unlearn_grid: no configs given")
    for c in configs:
        check_config(method, c)
    devs = model_devices(devices, keys.shape[0], vmap_width)
    groups: dict = {}
    for i, c in enumerate(configs):
        groups.setdefault(jax.tree.structure(c), []).append(i)
    out: list = [None] * len(configs)
    for idxs in groups.values():
        stacked = jax.tree.map(lambda *xs: jnp.asarray(xs, jnp.float32), *[configs[i] for i in idxs])
        p, s, c = _program(_grid_impl, method, vmap_width, devs, data)(
            stacked, params, model_state, data, forget_idx, retain_idx, targets, keys)
        for j, i in enumerate(idxs):
            out[i] = jax.tree.map(lambda t: t[j], (p, s, c))
    return out


def _unlearn_impl(method, vmap_width, devices, config, params, model_state, data, forget_idx, retain_idx, targets,
                  keys):
    k = keys.shape[0]
    if len(devices) > 1:  # the models axis split across devices; data, indices and config whole on each
        one = lambda p, s, t, key, d, f, r, c: method(p, s, d, f, r, t, key, c)  # noqa: E731
        return over_devices(one, devices, k, vmap_width or k, replicated=(4, 5, 6, 7))(
            params, model_state, targets, keys, data, forget_idx, retain_idx, config)

    def one(a):
        p, s, t, key = a
        return method(p, s, data, forget_idx, retain_idx, t, key, config)

    return map_models(one, (params, model_state, targets, keys), vmap_width or k, k)


def _grid_impl(method, vmap_width, devices, configs, params, model_state, data, forget_idx, retain_idx, targets,
               keys):
    one = lambda c: _unlearn_impl(method, vmap_width, devices, c, params, model_state, data, forget_idx,  # noqa: E731
                                  retain_idx, targets, keys)
    return jax.vmap(one)(configs)


_PROGRAMS: dict = {}


def _program(impl, method, vmap_width, devices, data: UnlearnData) -> Program:
    """``impl`` with its static arguments bound, compiled once per argument signature with
    :func:`~jaxunlearn.training.ensemble.unlearning_compiler_options` for these devices and inputs (kept for
    the process, as ``jax.jit`` keeps its executables)."""
    options = unlearning_compiler_options(devices, tuple(data.images.shape[1:]))
    key = (impl, method, vmap_width, devices, tuple(sorted((options or {}).items())))
    program = _PROGRAMS.get(key)
    if program is None:
        name = "unlearn_grid" if impl is _grid_impl else "unlearn_ensemble"
        program = _PROGRAMS[key] = Program(functools.partial(impl, method, vmap_width, devices), name,
                                           compiler_options=options, devices=devices)
    return program
