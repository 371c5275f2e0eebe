"""One model: init, the pure ``train_step``, one epoch as a ``lax.scan``, and logits.

``make_trainer`` closes over the (static) model, recipe and normalisation constants and
returns pure functions of arrays only, ready to be ``vmap``ped over a stacked ensemble.
Keys are derived from a per-model key: init ``fold_in(k, 0)``, epoch order
``fold_in(fold_in(k, 1), epoch)``, augmentation ``fold_in(fold_in(k, 2), step)``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from jaxunlearn.data.augment import augment, normalize
from jaxunlearn.models import make_model
from jaxunlearn.training.recipe import Recipe, make_optimizer
from jaxunlearn.training.subsets import subset_batches


class ModelState(NamedTuple):
    """One model's training state (stack it over a leading axis for an ensemble)."""

    params: Any
    batch_stats: Any
    opt_state: Any
    step: jax.Array  # i32[]


class Trainer(NamedTuple):
    """Pure functions for one (model, recipe, data set). All arrays in, arrays out."""

    init: Callable  # (model_key) -> ModelState
    train_step: Callable  # (state, images u8[B,...], labels i32[B], key) -> (state, metrics)
    batch_indices: Callable  # (mask bool[n], model_key, epoch) -> i32[steps, B]
    run_epoch: Callable  # (state, images, labels, mask, model_key, epoch) -> (state, metrics)
    logits: Callable  # (params, batch_stats, images u8[n,...]) -> f32[n, C]
    embed: Callable  # (params, batch_stats, images u8[n,...]) -> f32[n, D] penultimate features
    apply_images: Callable  # (params, batch_stats, images u8[B,...], train) -> (logits f32[B, C], batch_stats)
    # make_trainer's arguments (JSON-able): everything these functions close over, so a program built
    # from them can be stored and found again by it (compile_cache.Program); None: not known.
    # :func:`trainer_spec` checks that the functions are still the ones it describes
    spec: dict | None = None


def trainer_spec(trainer: Trainer) -> dict | None:
    """``trainer.spec`` if every function of ``trainer`` is one ``make_trainer`` made with it (a
    function swapped in by ``_replace`` is not described by it); else None."""
    spec = trainer.spec
    fns = (getattr(trainer, name) for name in Trainer._fields if name != "spec")
    if spec is None or any(getattr(fn, "_jaxunlearn_spec", None) is not spec for fn in fns):
        return None
    return spec


def smoothed_cross_entropy(logits, labels, num_classes: int, label_smoothing: float = 0.0):
    """Mean softmax cross-entropy. logits: f32[B, C], labels: i32[B] -> f32[]."""
    targets = jax.nn.one_hot(labels, num_classes)
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets).mean()


def std_logit_penalty(logits):
    """The SD loss term of Unrolling SGD: Σ_i std(z_i) / (B·C), the unbiased standard deviation of each
    example's logits across classes, summed over the batch. logits: f32[B, C] -> f32[].

    The gradient at an example whose logits are all equal (std 0) is taken as 0 (sqrt's subgradient),
    not NaN."""
    b, c = logits.shape
    logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # bf16 -> f32; f64 stays
    var = jnp.var(logits, axis=-1, ddof=1)
    pos = var > 0
    std = jnp.where(pos, jnp.sqrt(jnp.where(pos, var, 1.0)), 0.0)
    return std.sum() / (b * c)


def training_loss(logits, labels, num_classes: int, label_smoothing: float = 0.0, std_loss: float = 0.0):
    """The loss a recipe trains with: (smoothed) cross-entropy, plus ``std_loss`` · :func:`std_logit_penalty`
    when ``std_loss`` > 0 (Python-level branch: at 0 the program is the plain cross-entropy's)."""
    loss = smoothed_cross_entropy(logits, labels, num_classes, label_smoothing)
    if std_loss:
        loss = loss + std_loss * std_logit_penalty(logits)
    return loss


def make_trainer(recipe: Recipe, num_classes: int, image_shape, mean, std, steps_per_epoch: int,
                 conv_impl: str = "im2col", eval_batch: int = 1024, flat_optimizer: bool = False) -> Trainer:
    """One model's pure training functions (a :class:`Trainer`) for ``recipe``.

    ``flat_optimizer``: run the recipe's optimizer on the parameters raveled into one vector (``optax.flatten``):
    the same update, computed in one fused pass instead of one per parameter array (``strategy.default_strategy``
    says where that is faster); its state is then f32[P] vectors (P: the parameter count) instead of a tree."""
    model = make_model(recipe.model, num_classes, recipe.width, conv_impl, recipe.dtype)
    tx = make_optimizer(recipe, steps_per_epoch)
    tx = optax.flatten(tx) if flat_optimizer else tx

    def apply(params, batch_stats, x, train, features=False):
        """x: normalised f32[B, H, W, C]."""
        variables = {"params": params, "batch_stats": batch_stats}
        if train:
            logits, new = model.apply(variables, x, train=True, mutable=["batch_stats"])
            return logits, new.get("batch_stats", batch_stats)
        return model.apply(variables, x, train=False, features=features), batch_stats

    def apply_images(params, batch_stats, images, train):
        return apply(params, batch_stats, normalize(images, mean, std), train)

    def augment_images(images, key):
        return augment(normalize(images, mean, std), key, recipe.crop_pad, recipe.flip)

    def init(model_key):
        variables = model.init(jax.random.fold_in(model_key, 0), jnp.zeros((1, *image_shape)), train=False)
        params = variables["params"]
        batch_stats = variables.get("batch_stats", {})
        return ModelState(params, batch_stats, tx.init(params), jnp.zeros((), jnp.int32))

    def train_step(state, images, labels, key):
        x = augment_images(images, key)

        def loss_fn(params):
            logits, batch_stats = apply(params, state.batch_stats, x, True)
            loss = training_loss(logits, labels, num_classes, recipe.label_smoothing, recipe.std_loss)
            return loss, (logits, batch_stats)

        (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        acc = (logits.argmax(-1) == labels).mean()
        return ModelState(params, batch_stats, opt_state, state.step + 1), {"loss": loss, "accuracy": acc}

    def batches(mask, model_key, epoch):
        key = jax.random.fold_in(jax.random.fold_in(model_key, 1), epoch)
        return subset_batches(mask, key, recipe.batch_size, steps_per_epoch)

    def run_epoch(state, images, labels, mask, model_key, epoch):
        aug_key = jax.random.fold_in(model_key, 2)

        def body(state, idx):
            return train_step(state, images[idx], labels[idx], jax.random.fold_in(aug_key, state.step))

        state, metrics = lax.scan(body, state, batches(mask, model_key, epoch))
        return state, jax.tree.map(jnp.mean, metrics)

    def over_points(images, fn):
        """fn: normalised f32[b, ...] -> f32[b, D], mapped over fixed-size batches of images."""
        n = images.shape[0]
        b = min(eval_batch, n)
        pad = (-n) % b
        x = jnp.concatenate([images, jnp.zeros((pad, *images.shape[1:]), images.dtype)]) if pad else images
        out = lax.map(lambda xb: fn(normalize(xb, mean, std)), x.reshape(-1, b, *images.shape[1:]))
        return out.reshape(-1, out.shape[-1])[:n]

    def logits(params, batch_stats, images):
        return over_points(images, lambda x: apply(params, batch_stats, x, False)[0])

    def embed(params, batch_stats, images):
        return over_points(images, lambda x: apply(params, batch_stats, x, False, features=True)[0])

    fns = (init, train_step, batches, run_epoch, logits, embed, apply_images)
    # a spec only for models defined in this package: the stored-program key covers its source, not a
    # model class registered from elsewhere
    spec = None
    if type(model).__module__.startswith("jaxunlearn."):
        # the model itself (class and fields): MODELS is a registry a user may add to or change
        spec = {"model": f"{type(model).__module__}.{type(model).__qualname__}", "model_repr": repr(model),
                "recipe": recipe.to_dict(), "num_classes": int(num_classes),
                "image_shape": [int(d) for d in image_shape], "mean": [float(v) for v in np.ravel(mean)],
                "std": [float(v) for v in np.ravel(std)], "steps_per_epoch": int(steps_per_epoch),
                "conv_impl": conv_impl, "eval_batch": int(eval_batch), "flat_optimizer": bool(flat_optimizer)}
        for fn in fns:  # which functions the spec describes: a Trainer._replace'd function is not among them
            fn._jaxunlearn_spec = spec
    return Trainer(*fns, spec)
