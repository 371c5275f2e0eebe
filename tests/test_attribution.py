import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxunlearn.attribution import fit_lasso, fit_ridge, lasso_forget_effect, lds, ridge_forget_effects, spearman
from jaxunlearn.errors import JaxUnlearnError


def _planted(m, n, t, seed=0, sparse=False):
    rng = np.random.default_rng(seed)
    x = rng.random((m, n)) < 0.5
    w = rng.normal(size=(t, n)) * ((rng.random((t, n)) < 0.1) if sparse else 1)
    b = rng.normal(size=t)
    return x, w, b, x @ w.T + b


def test_ridge_recovers_a_planted_linear_model_exactly():
    x, w, b, y = _planted(300, 80, 7)  # primal form (M > n)
    dm = fit_ridge(x, y, lambdas=[1e-6])
    np.testing.assert_allclose(dm.weights, w, atol=1e-4)
    np.testing.assert_allclose(dm.bias, b, atol=1e-4)
    dm = fit_ridge(x, y)  # λ chosen on held-out models: noiseless data picks the smallest
    np.testing.assert_allclose(dm.weights, w, atol=1e-2)


def test_ridge_dual_form_equals_closed_form():
    x, _, _, y = _planted(40, 120, 5, seed=1)  # dual form (M < n)
    lam = 3.0
    dm = fit_ridge(x, y, lambdas=[lam])
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    ref = np.linalg.solve(xc.T @ xc + lam * np.eye(120), xc.T @ yc).T
    np.testing.assert_allclose(dm.weights, ref, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(dm.predict(x), x @ ref.T + (y.mean(0) - ref @ x.mean(0)), atol=1e-3)


def test_lasso_finds_the_sparse_support():
    x, w, b, y = _planted(400, 60, 4, seed=2, sparse=True)
    y = y + 0.1 * np.random.default_rng(0).normal(size=y.shape)
    dm, ridge = fit_lasso(x, y), fit_ridge(x, y)
    nonzero = np.abs(np.asarray(dm.weights)) > 1e-6
    assert nonzero[w != 0].all()  # every true effect found
    assert nonzero.mean() < 0.5  # and most null weights exactly zero (ridge: none are)
    rmse = lambda d: np.sqrt(np.mean((np.asarray(d.weights) - w) ** 2))  # noqa: E731
    assert rmse(dm) < 0.75 * rmse(ridge)  # sparse truth: lasso estimates it better than ridge
    xt, _, _, _ = _planted(200, 60, 4, seed=3)
    assert lds(dm, xt, xt @ w.T + b) > 0.95


def test_spearman_matches_scipy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 3)), rng.normal(size=(50, 3))
    b[:, 0] = a[:, 0] ** 3  # monotone: 1
    ours = np.asarray(spearman(jnp.asarray(a), jnp.asarray(b)))
    ref = [stats.spearmanr(a[:, i], b[:, i]).statistic for i in range(3)]
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ours[0] == pytest.approx(1.0, abs=1e-6)


def test_bad_datamodel_inputs():
    x, _, _, y = _planted(30, 10, 2)
    with pytest.raises(JaxUnlearnError, match="masks have 30 models but outputs 29"):
        fit_ridge(x, y[:29])
    bad = y.copy()
    bad[3, 1] = np.nan
    with pytest.raises(JaxUnlearnError, match="NaN"):
        fit_ridge(x, bad)
    masks = x.astype(np.float32)
    masks[0, 0] = np.nan  # the masks are checked too: 0/1 only
    with pytest.raises(JaxUnlearnError, match="masks must be 0/1"):
        fit_ridge(masks, y)
    for lambdas in ([np.nan], [-1.0], []):
        with pytest.raises(JaxUnlearnError, match="lambdas must be finite numbers >= 0"):
            fit_ridge(x, y, lambdas=lambdas)
    with pytest.raises(JaxUnlearnError, match="val_fraction must lie in"):
        fit_ridge(x, y, val_fraction=-0.5)
    with pytest.raises(JaxUnlearnError, match="iters must be a positive integer"):
        fit_lasso(x, y, iters=0)
    with pytest.raises(JaxUnlearnError, match="num_lambdas must be a positive integer"):
        fit_lasso(x, y, num_lambdas=0)
    with pytest.raises(JaxUnlearnError, match="outputs 1 targets"):
        lds(fit_ridge(x, y), x, y[:, :1])


def test_lds_on_a_digits_subset_ensemble_is_positive(digits):
    from jaxunlearn.metrics import margins_from_logits
    from jaxunlearn.training import RECIPES, EnsembleFns, make_trainer, random_subset_masks, train_ensemble
    from jaxunlearn.training.subsets import steps_per_epoch

    m = 240
    recipe = RECIPES["digits-mlp"].with_epochs(8)
    masks = random_subset_masks(digits.n_train, m, 0.5, seed=0)
    tr = make_trainer(recipe, 10, digits.image_shape, digits.mean, digits.std, steps_per_epoch(masks, 64))
    fns = EnsembleFns(tr, m, 16)
    states, _ = train_ensemble(tr, jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels), masks,
                               np.arange(m), 0, recipe.epochs, fns=fns)
    logits = fns.logits(states.params, states.batch_stats, jnp.asarray(digits.test_images))
    margins = np.asarray(margins_from_logits(logits, jnp.asarray(digits.test_labels)))
    dm = fit_ridge(masks[:200], margins[:200])
    score = lds(dm, masks[200:], margins[200:])
    print(f"LDS of ridge datamodels, digits, {m} subset models: {score:.3f}")
    assert 0.05 < score < 1.0
    shuffled = lds(dm, masks[200:][np.random.default_rng(0).permutation(40)], margins[200:])
    assert score > shuffled + 0.05  # the masks carry the signal


@pytest.mark.parametrize("m,n", [(120, 300), (300, 80)])  # dual (M < n) and primal (M > n) forms
def test_forget_effects_equal_summed_ridge_weights_without_materialising_them(m, n):
    rng = np.random.default_rng(0)
    x = (rng.random((m, n)) < 0.5).astype(np.float32)
    y = (x @ rng.normal(size=(n, 50)) + rng.normal(size=(m, 50))).astype(np.float32)
    sets = [np.arange(5), np.array([3, 17, 40, 41])]
    dm = fit_ridge(x, y)
    effects, lam = ridge_forget_effects(x, y, sets, chunk=16)  # 4 chunks of targets
    np.testing.assert_array_equal(lam, np.asarray(dm.lam))
    for k, f in enumerate(sets):
        np.testing.assert_allclose(effects[k], np.asarray(dm.weights)[:, f].sum(-1), rtol=2e-3, atol=2e-3)
    with pytest.raises(JaxUnlearnError, match="out of range"):
        ridge_forget_effects(x, y, [np.array([n])])
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        ridge_forget_effects(x, y, [np.array([], int)])


def test_lasso_forget_effect_sums_lasso_weights_and_keeps_large_self_effects_whole():
    # each target t is "point t's own output": a large weight on itself, small noise elsewhere (the
    # shape of a training point's margin as a function of the training set), observed with noise
    rng = np.random.default_rng(4)
    m, n, t = 200, 600, 24  # fewer models than points, as with real datamodels
    x = (rng.random((m, n)) < 0.5).astype(np.float32)
    w = np.zeros((t, n), np.float32)
    w[np.arange(t), np.arange(t)] = rng.uniform(2.0, 4.0, t)
    y = (x @ w.T + 0.5 * rng.normal(size=(m, t))).astype(np.float32)
    f = np.arange(t)  # forget the points the targets belong to: true effect = each self-weight
    got = lasso_forget_effect(x, y, f, iters=100, chunk=10)  # 3 chunks of targets
    whole = fit_lasso(x, y, iters=100)
    np.testing.assert_allclose(got, np.asarray(whole.weights)[:, f].sum(1), rtol=1e-4, atol=1e-4)
    truth = w[:, f].sum(1)
    ridge = np.asarray(fit_ridge(x, y).weights)[:, f].sum(1)
    slope = lambda est: float(np.dot(est, truth) / np.dot(truth, truth))  # noqa: E731
    print("slope of predicted on true effect: lasso", slope(got), "ridge", slope(ridge))
    assert 0.85 < slope(got) < 1.05  # the few large weights survive nearly whole
    assert slope(ridge) < 0.5 * slope(got)  # ridge: every weight shrunk and spread over the null ones
    with pytest.raises(JaxUnlearnError, match="out of range"):
        lasso_forget_effect(x, y, np.array([n]))
