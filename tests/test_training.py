import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.data import make_dataset
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics import accuracy_from_logits, margins_from_logits
from jaxunlearn.training import RECIPES, EnsembleFns, make_trainer, random_subset_masks, retain_masks, train_ensemble
from jaxunlearn.training.ensemble import model_keys
from jaxunlearn.training.loop import train_one_by_one

from conftest import default_jit
from jaxunlearn.training.recipe import triangle_schedule
from jaxunlearn.training.subsets import subset_batches, steps_per_epoch


def test_subset_masks_are_seeded_and_exact():
    m = random_subset_masks(100, 5, 0.3, seed=1)
    assert m.shape == (5, 100) and (m.sum(1) == 30).all()
    np.testing.assert_array_equal(m, random_subset_masks(100, 5, 0.3, seed=1))
    assert not np.array_equal(m[0], m[1])
    # model i's mask depends on (seed, i) only, not on how many models are drawn together
    np.testing.assert_array_equal(m[3:], random_subset_masks(100, 2, 0.3, seed=1, first_model=3))
    with pytest.raises(JaxUnlearnError, match="alpha must lie in"):
        random_subset_masks(10, 2, 0.0, 0)


def test_retain_masks_and_bad_forget_sets():
    m = retain_masks(10, 3, [2, 7])
    assert m.shape == (3, 10) and not m[:, [2, 7]].any() and m.sum() == 24
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        retain_masks(10, 3, [])
    with pytest.raises(JaxUnlearnError, match=r"out of range \[0, 10\): \[10\]"):
        retain_masks(10, 3, [1, 10])
    with pytest.raises(JaxUnlearnError, match="whole training set"):
        retain_masks(3, 1, [0, 1, 2])


def test_subset_batches_cover_subset_and_never_leave_it():
    mask = jnp.asarray(random_subset_masks(50, 1, 0.4, 0)[0])
    idx = subset_batches(mask, jax.random.key(0), batch_size=7, steps=3)  # 20 points, 21 slots: wraps once
    assert idx.shape == (3, 7)
    assert bool(mask[idx].all())
    assert set(np.asarray(idx).ravel().tolist()) == set(np.flatnonzero(mask).tolist())


def test_removing_points_keeps_the_order_of_the_others():
    """'The same run without F': dropping F from a subset deletes F from the order, nothing else."""
    mask = np.ones(40, bool)
    without = mask.copy()
    without[[3, 17, 25]] = False
    key = jax.random.key(5)
    full = np.asarray(subset_batches(jnp.asarray(mask), key, 40, 1)).ravel()
    kept = np.asarray(subset_batches(jnp.asarray(without), key, 37, 1)).ravel()
    np.testing.assert_array_equal(kept, full[~np.isin(full, [3, 17, 25])])


def test_with_epochs_keeps_the_peak_fraction():
    r = RECIPES["cifar10-resnet9"].with_epochs(12)
    assert (r.epochs, r.peak_epoch) == (12, 2.5)


def test_schedule_is_a_triangle():
    s = triangle_schedule(0.4, 5, 24)
    np.testing.assert_allclose([s(0), s(2.5), s(5), s(14.5), s(24)], [0, 0.2, 0.4, 0.2, 0], atol=1e-6)


def _trainer(ds, recipe, masks, impl="im2col"):
    return make_trainer(recipe, ds.num_classes, ds.image_shape, ds.mean, ds.std,
                        steps_per_epoch(masks, recipe.batch_size), impl)


def test_masks_are_respected_outside_points_poisoned_with_nan(digits):
    """Points outside every model's subset are NaN images: one of them in any batch (forward,
    gradient or BatchNorm statistics) would turn that model's parameters into NaN."""
    masks = random_subset_masks(digits.n_train, 8, 0.5, seed=0)
    x = digits.train_images.astype(np.float32)
    ds = make_dataset("digits", x, digits.train_labels, digits.test_images.astype(np.float32),
                      digits.test_labels, 10)
    # per model: poison everything that model must not see
    recipe = RECIPES["digits-cnn"].with_epochs(2)
    tr = _trainer(ds, recipe, masks)
    for m in range(2):
        xm = np.where(masks[m][:, None, None, None], x, np.nan)
        states, _ = train_ensemble(tr, jnp.asarray(xm), jnp.asarray(ds.train_labels), masks[m:m + 1],
                                   [m], seed=0, epochs=1)
        assert all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves((states.params, states.batch_stats)))
    # the check can fail: a model whose mask covers a poisoned point does go NaN
    xm = np.where(masks[0][:, None, None, None], x, np.nan)
    states, _ = train_ensemble(tr, jnp.asarray(xm), jnp.asarray(ds.train_labels), masks[1:2], [1], 0, 1)
    assert not all(bool(jnp.isfinite(l).all()) for l in jax.tree.leaves(states.params))


def test_ensemble_equals_one_by_one_training(digits):
    """Same models whichever way they are laid out (up to float reassociation of vmap vs scan)."""
    recipe = RECIPES["digits-cnn"].with_epochs(1)
    masks = random_subset_masks(digits.n_train, 3, 0.5, 0)
    tr = _trainer(digits, recipe, masks)
    X, Y = jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels)
    ens, _ = train_ensemble(tr, X, Y, masks, [0, 1, 2], seed=4, epochs=1, vmap_width=3)
    loop = train_one_by_one(tr, X, Y, masks, [0, 1, 2], seed=4, epochs=1, mode="per_step")
    other_seed, _ = train_ensemble(tr, X, Y, masks, [0, 1, 2], seed=5, epochs=1, vmap_width=3)
    logits = jax.jit(tr.logits)
    xt = jnp.asarray(digits.test_images)
    pick = lambda st, i: logits(jax.tree.map(lambda t: t[i], st.params), jax.tree.map(lambda t: t[i], st.batch_stats), xt)  # noqa: E731
    for i in range(3):
        a = pick(ens, i)
        for b in (logits(loop[i].params, loop[i].batch_stats, xt),):
            assert float(jnp.abs(a - b).max()) < 0.05
            assert float(jnp.mean(a.argmax(-1) == b.argmax(-1))) > 0.99
        assert float(jnp.abs(a - pick(other_seed, i)).max()) > 0.3  # another seed: 6x the tolerance away


def test_flat_optimizer_trains_the_same_models(digits, tmp_path):
    """``make_trainer(flat_optimizer=True)`` (``train``'s choice on a GPU) runs the recipe's SGD-Nesterov with
    weight decay on one raveled vector: the same parameters as the per-array update, with a momentum trace that
    is one vector (on the digits MLP: the optimizer's code is the same whatever the model). With the persistent
    compile cache on, so that the two trainers' programs must be stored under different keys (they once shared
    one, and the flat trainer ran the other's)."""
    from jaxunlearn.compile_cache import enable_compile_cache

    recipe = RECIPES["digits-mlp"].with_epochs(1)
    masks = random_subset_masks(digits.n_train, 2, 0.5, 0)
    X, Y = jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels)
    tree = make_trainer(recipe, 10, digits.image_shape, digits.mean, digits.std,
                        steps_per_epoch(masks, recipe.batch_size), "im2col")
    flat = make_trainer(recipe, 10, digits.image_shape, digits.mean, digits.std,
                        steps_per_epoch(masks, recipe.batch_size), "im2col", flat_optimizer=True)
    before = jax.config.jax_compilation_cache_dir
    programs = tmp_path / "cache" / "jaxunlearn" / "programs"
    enable_compile_cache(str(tmp_path / "cache"))
    try:
        a, _ = train_ensemble(tree, X, Y, masks, [0, 1], seed=3, epochs=1, vmap_width=2)
        stored = set(os.listdir(programs))
        assert {n.split("-")[0] for n in stored} >= {"init_models", "epoch"}  # the keys are really exercised
        b, _ = train_ensemble(flat, X, Y, masks, [0, 1], seed=3, epochs=1, vmap_width=2)
        assert len(set(os.listdir(programs)) - stored) >= 2  # the flat trainer's own init and epoch programs
    finally:
        enable_compile_cache(before)
    for x, y in zip(jax.tree.leaves((a.params, a.batch_stats)), jax.tree.leaves((b.params, b.batch_stats))):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6)
    n_params = sum(x[0].size for x in jax.tree.leaves(a.params))
    traces = [x for x in jax.tree.leaves(b.opt_state) if x.ndim == 2]
    assert [x.shape for x in traces] == [(2, n_params)]  # one momentum vector per model
    initial = jax.vmap(flat.init)(model_keys(3, [0, 1])).params  # trained: far from where both started
    assert float(jnp.abs(b.params["Dense_0"]["kernel"] - initial["Dense_0"]["kernel"]).max()) > 0.01


def test_map_models_pads_a_short_last_group_and_keeps_model_order():
    from jaxunlearn.training.ensemble import map_models

    xs = {"a": jnp.arange(5.0)[:, None] * jnp.ones((5, 3)), "b": jnp.arange(5)}
    fn = lambda m: {"y": m["a"] * 2 + m["b"], "z": m["b"]}  # noqa: E731
    want = jax.vmap(fn)(xs)
    for width in (1, 2, 3, 5, 8):
        got = jax.jit(lambda xs: map_models(fn, xs, width, 5))(xs)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"width {width}")


@pytest.mark.parametrize("model,width", [("cnn", 2), ("mlp", 4)])
def test_ensemble_init_compiled_unoptimised_is_bit_identical(digits, model, width):
    """EnsembleFns.init skips backend optimisation (a compile-time saving): every model's initial state
    must still equal, bit for bit, the plain jitted single-model init of the same key."""
    recipe = RECIPES[f"digits-{model}"]
    tr = _trainer(digits, recipe, np.ones((4, digits.n_train), bool))
    keys = model_keys(3, np.arange(4))
    fns = EnsembleFns(tr, 4, width)
    stacked = fns.init(keys)
    # keys and init in one program (what train_ensemble runs): the same keys, the same states
    both, both_keys = fns.init_models(np.int32(3), np.arange(4, dtype=np.uint32))
    np.testing.assert_array_equal(jax.random.key_data(both_keys), jax.random.key_data(keys))
    single = default_jit(tr.init)  # XLA's own defaults, not the suite's faster-compiling flags (conftest)
    for i in range(4):
        want = jax.tree.leaves(single(keys[i]))
        for a, b, c in zip(jax.tree.leaves(stacked), jax.tree.leaves(both), want):
            np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(c))
            np.testing.assert_array_equal(np.asarray(b[i]), np.asarray(c))


def test_ensemble_outputs_are_logits_margins_and_correct_flags(digits):
    """EnsembleFns.outputs (what a run keeps of each chunk, one program) equals the logits program and
    the metrics computed from its logits."""
    recipe = RECIPES["digits-mlp"]
    tr = _trainer(digits, recipe, np.ones((3, digits.n_train), bool))
    fns = EnsembleFns(tr, 3, 2)
    states = fns.init(model_keys(0, np.arange(3)))
    x, y = jnp.asarray(digits.test_images), jnp.asarray(digits.test_labels)
    logits, margins, correct = fns.outputs(states.params, states.batch_stats, x, y)
    want = fns.logits(states.params, states.batch_stats, x)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(margins), np.asarray(margins_from_logits(logits, y)), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(correct), np.asarray(logits).argmax(-1) == digits.test_labels)
    assert logits.shape == (3, len(y), 10) and margins.shape == correct.shape == (3, len(y))


def test_outputs_program_uses_older_cpu_emitters_only_for_small_inputs(digits):
    """The outputs program compiles with XLA's older CPU fusion emitters for 8x8 digits (faster there) and
    with the default for 32x32x3 images, where they ran it 20 % slower (ResNet-9, benchmarks/RESULTS.md), for
    flat inputs as large, and for a Trainer whose inputs are not known."""
    recipe = RECIPES["digits-cnn"]
    masks = np.ones((2, digits.n_train), bool)
    small = _trainer(digits, recipe, masks)
    assert EnsembleFns(small, 2, 2).outputs.options == {"xla_cpu_use_fusion_emitters": False}
    cifar = make_trainer(recipe, 10, (32, 32, 3), np.zeros(3), np.ones(3), steps_per_epoch(masks, 64), "im2col")
    assert EnsembleFns(cifar, 2, 2).outputs.options is None
    flat = make_trainer(RECIPES["digits-mlp"], 10, (3072,), np.zeros(1), np.ones(1), steps_per_epoch(masks, 64), "im2col")
    assert EnsembleFns(flat, 2, 2).outputs.options is None
    patched = small._replace(logits=lambda p, s, x: small.logits(p, s, x))  # not make_trainer's: no spec
    assert EnsembleFns(patched, 2, 2).outputs.options is None


def test_digits_ensemble_reaches_single_model_accuracy(digits):
    """32 models trained at once reach the accuracy of the same recipe trained one model at a time."""
    recipe = RECIPES["digits-mlp"]
    masks = np.ones((32, digits.n_train), bool)
    tr = _trainer(digits, recipe, masks)
    X, Y = jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels)
    Xte, Yte = jnp.asarray(digits.test_images), jnp.asarray(digits.test_labels)
    fns = EnsembleFns(tr, 32, 32)
    states, _ = train_ensemble(tr, X, Y, masks, np.arange(32), seed=0, epochs=recipe.epochs, fns=fns)
    ens_acc = accuracy_from_logits(fns.logits(states.params, states.batch_stats, Xte), Yte)
    singles = train_one_by_one(tr, X, Y, masks[:4], np.arange(100, 104), seed=0, epochs=recipe.epochs)
    single_acc = np.mean([float(accuracy_from_logits(jax.jit(tr.logits)(s.params, s.batch_stats, Xte), Yte))
                          for s in singles])
    assert single_acc > 0.93
    assert abs(float(ens_acc.mean()) - single_acc) <= 0.02, (float(ens_acc.mean()), single_acc)
    assert float(ens_acc.min()) > 0.9


def test_memory_estimate_bounds_what_xla_allocates_and_needs_no_compile(digits):
    """The chunk size comes from a count of bytes (no compile): it must not undercount XLA's own figure
    for a 1-model epoch (temporaries; arguments beyond the data), nor be absurdly above it."""
    from jaxunlearn.compile_cache import CompileCounter
    from jaxunlearn.training.ensemble import EnsembleFns
    from jaxunlearn.training.run import auto_chunk, memory_estimate

    recipe = RECIPES["digits-cnn"]
    masks = random_subset_masks(digits.n_train, 1, 0.5, 0)
    trainer = make_trainer(recipe, 10, digits.image_shape, digits.mean, digits.std,
                           steps_per_epoch(masks, recipe.batch_size), "im2col")
    counter = CompileCounter()
    est = memory_estimate(trainer, digits.image_shape, digits.train_images.dtype, recipe.batch_size)
    assert counter.snapshot()["programs"] == 0
    fns = EnsembleFns(trainer, 1, 1)
    keys = jax.random.split(jax.random.key(0), 1)
    images, labels = jax.device_put(digits.train_images), jax.device_put(digits.train_labels)
    mem = fns.epoch.lower(jax.eval_shape(fns.init, keys), images, labels, jnp.asarray(masks), keys,
                          jnp.int32(0)).compile().memory_analysis()
    args = mem.argument_size_in_bytes - images.nbytes - labels.nbytes
    assert est["state"] <= args <= est["state"] + digits.n_train + 64
    assert mem.temp_size_in_bytes <= est["step"] <= 20 * mem.temp_size_in_bytes, (est, mem.temp_size_in_bytes)
    # 1 GB for a 1437-point data set: the temporaries of one group plus three states per model
    per_model = 3 * est["state"] + digits.n_train + 64
    assert auto_chunk(est, digits.n_train, 1, 10**6, budget=10**9) == (10**9 - est["step"]) // per_model
    assert auto_chunk(est, digits.n_train, 1, 7, budget=10**9) == 7


def test_trainer_spec_describes_only_the_functions_make_trainer_made(digits):
    """A stored program is keyed by the trainer's spec: a function swapped in with ``_replace`` is not
    what the spec describes, so such a trainer has none (its programs are compiled, never stored)."""
    from jaxunlearn.training.step import trainer_spec

    tr = _trainer(digits, RECIPES["digits-mlp"], np.ones((2, digits.n_train), bool))
    assert trainer_spec(tr) is tr.spec and tr.spec["recipe"]["model"] == "mlp"
    assert trainer_spec(tr._replace(logits=lambda p, s, x: tr.logits(p, s, x) * 2)) is None
    assert trainer_spec(tr._replace(spec={**tr.spec, "eval_batch": 7})) is None
