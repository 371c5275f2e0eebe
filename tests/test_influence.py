"""Subsampling influence, forget-set effects by every estimator, DM-Direct from arrays, and the fixed
retain pool of the matching recipe."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from jaxunlearn.attribution import (forget_set_effects, influence_estimates, influence_forget_effects, influence_lds,
                                    select_influence_threshold)
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.models import flax_apply
from jaxunlearn.unlearning import DMMConfig, UnlearnData, dm_direct_targets, oracle_matching, unlearn_ensemble
from jaxunlearn.unlearning.oracle_matching import fixed_retain_pool


def planted(m=400, n=60, t=12, seed=0, noise=1.0):
    """Subset masks and outputs from a sparse linear model plus noise: y = x w + ε."""
    rng = np.random.default_rng(seed)
    x = rng.random((m, n)) < 0.5
    w = np.where(rng.random((n, t)) < 0.15, rng.normal(0, 3, (n, t)), 0.0)
    y = x @ w + rng.normal(0, noise, (m, t))
    return x, y.astype(np.float32), w


def test_influence_is_the_difference_of_means():
    x, y, _ = planted()
    ref = np.stack([y[x[:, i]].mean(0) - y[~x[:, i]].mean(0) for i in range(x.shape[1])])  # [n, T]
    dm = influence_estimates(x, y)
    np.testing.assert_allclose(np.asarray(dm.weights).T, ref, rtol=1e-4, atol=1e-4)
    # denoised: every estimate soft-thresholded at tau standard errors of its own
    se = y.std(0)[None] * np.sqrt(1 / x.sum(0) + 1 / (~x).sum(0))[:, None]
    soft = np.sign(ref) * np.maximum(np.abs(ref) - 2.0 * se, 0)
    np.testing.assert_allclose(np.asarray(influence_estimates(x, y, threshold=2.0).weights).T, soft, atol=1e-4)
    # the bias makes predict reproduce the mean output at the mean mask
    np.testing.assert_allclose(dm.predict(x.mean(0, keepdims=True))[0], y.mean(0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("threshold", [0.0, 1.5])
def test_forget_set_sums_equal_summed_full_weights(threshold):
    x, y, _ = planted(t=30)
    full = np.asarray(influence_estimates(x, y, threshold).weights)  # [T, n]
    sets = [np.array([3, 17, 40]), np.arange(10, 30), np.array([59])]
    eff = influence_forget_effects(x, y, sets, threshold, chunk=7)  # chunks that do not divide T
    np.testing.assert_allclose(eff, np.stack([full[:, f].sum(1) for f in sets]), rtol=1e-4, atol=1e-4)


def test_denoising_is_chosen_by_heldout_lds_and_recovers_the_planted_effects():
    x, y, w = planted(m=600, noise=3.0)
    tau, table = select_influence_threshold(x, y)
    assert tau > 0 and table[tau] == max(table.values()) and table[tau] > table[0.0]
    raw, den = np.asarray(influence_estimates(x, y).weights).T, np.asarray(influence_estimates(x, y, tau).weights).T
    assert np.abs(den - w).mean() < 0.7 * np.abs(raw - w).mean()  # closer to the truth than raw means
    lds = influence_lds(x[:500], y[:500], x[500:], y[500:], (0.0, tau))
    assert lds.shape == (2,) and lds[1] > lds[0]


def test_influence_bad_inputs():
    x, y, _ = planted()
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        influence_forget_effects(x, y, [np.array([], np.int64)])
    with pytest.raises(JaxUnlearnError, match="masks have 400 models but outputs"):
        influence_forget_effects(x, y[:10], [np.array([1])])
    with pytest.raises(JaxUnlearnError, match="masks have 400 models but outputs 10"):
        influence_estimates(x, y[:10])
    with pytest.raises(JaxUnlearnError, match="outputs contain NaN"):
        influence_forget_effects(x, np.where(np.arange(12) == 3, np.nan, y), [np.array([1])])
    with pytest.raises(JaxUnlearnError, match="out of range"):
        influence_forget_effects(x, y, [np.array([60])])
    always = x.copy()
    always[:, 5] = True
    with pytest.raises(JaxUnlearnError, match="training point 5 is in 400 of 400 models"):
        influence_forget_effects(always, y, [np.array([1])])
    with pytest.raises(JaxUnlearnError, match="threshold must be"):
        influence_forget_effects(x, y, [np.array([1])], threshold=-1.0)
    with pytest.raises(JaxUnlearnError, match="threshold must be"):
        influence_estimates(x, y, threshold=float("nan"))


def test_dm_direct_targets_from_arrays_by_every_estimator():
    x, y, _ = planted(m=300, n=40, t=50 * 3)
    subset = y.reshape(300, 50, 3)  # [M, P, C]: 40 training points, then 10 more
    full = np.random.default_rng(1).normal(size=(4, 50, 3)).astype(np.float32)
    f = np.array([2, 7, 30])
    for est in ("influence", "ridge", "lasso"):
        out = dm_direct_targets(x, subset, full, f, estimator=est, threshold=1.0)
        eff = forget_set_effects(x, subset, [f], est, threshold=1.0)[0]
        assert out.shape == (4, 50, 3)
        np.testing.assert_allclose(out, full - eff[None], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(forget_set_effects(x, subset, [f], "influence", 0.0)[0],
                               influence_forget_effects(x, y, [f], 0.0)[0].reshape(50, 3), rtol=1e-5, atol=1e-5)
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        dm_direct_targets(x, subset, full, np.array([], np.int64))
    with pytest.raises(JaxUnlearnError, match="masks have 300 models but outputs 299"):
        dm_direct_targets(x, subset[:299], full, f)
    with pytest.raises(JaxUnlearnError, match="outputs contain NaN"):
        dm_direct_targets(x, np.where(np.arange(3) == 1, np.nan, subset), full, f)
    with pytest.raises(JaxUnlearnError, match="do not match"):
        dm_direct_targets(x, subset, full[:, :49], f)
    with pytest.raises(JaxUnlearnError, match="unknown forget-effect estimator 'ols'"):
        dm_direct_targets(x, subset, full, f, estimator="ols")


class TinyNet(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
        x = nn.BatchNorm(use_running_average=not train)(nn.Dense(16)(x.reshape(len(x), -1)))
        return nn.Dense(3)(nn.relu(x))


def test_the_retain_pool_is_fixed_and_shared_by_every_model():
    n, f = 120, np.arange(6)
    retain = np.arange(6, n)
    cfg = DMMConfig(lr=1e-2, epochs=2, batch_size=16, forget_multiplier=2, retain_multiplier=3.0)
    pool = np.asarray(fixed_retain_pool(jnp.asarray(retain), len(f), cfg))
    assert pool.shape == (18,) and set(pool) <= set(retain) and len(set(pool)) == 18
    np.testing.assert_array_equal(pool, fixed_retain_pool(jnp.asarray(retain), len(f), cfg))
    assert not np.array_equal(pool, fixed_retain_pool(jnp.asarray(retain), len(f), cfg.replace(pool_seed=7)))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.normal(size=(n, 4, 4, 1)), jnp.float32)
    data = UnlearnData(images, jnp.asarray(rng.integers(0, 3, n), jnp.int32), flax_apply(TinyNet()))
    model = TinyNet()
    v = jax.vmap(lambda k: model.init(k, images[:1]))(jax.random.split(jax.random.key(0), 3))
    targets = jnp.asarray(rng.normal(size=(3, n, 3)), jnp.float32)
    keys = jax.random.split(jax.random.key(1), 3)
    run = lambda t: unlearn_ensemble(oracle_matching, v["params"], v["batch_stats"], data, f, retain, t, keys, cfg)  # noqa: E731
    p0, s0, cost = run(targets)
    assert np.all(np.asarray(cost) == 2 * 2 * 16)  # (2·6 + 18 = 30 points -> 2 batches of 16) × 2 epochs
    outside = np.setdiff1d(retain, pool)
    p1, _, _ = run(targets.at[:, outside].add(100.0))  # targets no model's pool holds: no effect on any model
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), p0, p1)
    p2, _, _ = run(targets.at[:, pool[:1]].add(100.0))  # one pooled point: every model moves
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).reshape(3, -1).max(1), p0, p2)
    assert np.all(np.max(np.stack(jax.tree.leaves(moved)), 0) > 1e-4)
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(v["batch_stats"])))
    # (BatchNorm statistics move: the matching steps run in train mode)
