"""Unrolling SGD: verification error, the Hessian's top eigenvalue, the unlearning-error proxy,
single-gradient unlearning, the SD loss, and the `jaxunlearn unrolling` command."""
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from jaxunlearn.cli import main
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics import top_hessian_eigenvalue, unlearning_error, verification_error
from jaxunlearn.pipeline.unrolling import UnrollingConfig
from jaxunlearn.training import RECIPES, EnsembleFns, Recipe, make_trainer, model_keys, train_ensemble
from jaxunlearn.training.step import std_logit_penalty, training_loss
from jaxunlearn.training.subsets import steps_per_epoch
from jaxunlearn.unlearning import SingleGradientConfig, UnlearnData, make_config, single_gradient, unlearn_ensemble
from conftest import check_jit


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


def _tiny_loss(params, state, batch):
    x, y = batch
    return jnp.mean(-jax.nn.log_softmax(Tiny().apply({"params": params}, x))[jnp.arange(y.shape[0]), y])


def test_top_hessian_eigenvalue_matches_eigvalsh_of_the_explicit_hessian():
    rng = np.random.default_rng(0)
    batch = (jnp.asarray(rng.normal(size=(16, 4)), jnp.float32), jnp.asarray(rng.integers(0, 3, 16)))
    models = [Tiny().init(jax.random.key(i), batch[0])["params"] for i in range(2)]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *models)
    got = np.asarray(top_hessian_eigenvalue(_tiny_loss, stacked, batch, iters=1000, tol=0.0))
    assert got.shape == (2,)
    flat, unravel = ravel_pytree(models[0])
    hess = check_jit(jax.vmap(jax.hessian(lambda f: _tiny_loss(unravel(f), None, batch))))
    for h, g in zip(np.asarray(hess(jnp.stack([ravel_pytree(p)[0] for p in models])), np.float64), got):
        ev = np.linalg.eigvalsh((h + h.T) / 2)
        top = ev[np.argmax(np.abs(ev))]  # power iteration finds the eigenvalue of largest magnitude
        np.testing.assert_allclose(g, top, rtol=2e-3)
    assert abs(got[0] - got[1]) > 1e-3 * abs(got[0])  # each model its own eigenvalue (vmapped, not shared)
    # PyHessian's stopping rule stops early but lands close
    early = np.asarray(top_hessian_eigenvalue(_tiny_loss, stacked, batch))
    np.testing.assert_allclose(early, got, rtol=0.05)


@pytest.fixture(scope="module")
def twins(digits):
    """K=2 full digits MLPs and their "same run without F" twins (same keys), one epoch."""
    k, forget = 2, np.arange(0, 40, 5)
    recipe = RECIPES["digits-mlp"].replace(epochs=1, lr_schedule="constant", peak_lr=0.1, peak_epoch=0.0,
                                           nesterov=False, batch_size=32)
    masks = np.ones((2 * k, digits.n_train), bool)
    masks[k:, forget] = False
    tr = make_trainer(recipe, 10, digits.image_shape, digits.mean, digits.std, steps_per_epoch(masks, 32))
    fns = EnsembleFns(tr, 2 * k, 2 * k)
    ids = np.array([0, 1, 0, 1])
    init = fns.init(model_keys(0, ids))
    states, _ = train_ensemble(tr, jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels), masks, ids, 0,
                               1, fns=fns)
    return tr, init, states, forget, k


def test_verification_error_zero_with_itself_positive_with_the_twin(twins):
    tr, init, states, forget, k = twins
    full = jax.tree.map(lambda t: t[:k], states.params)
    twin = jax.tree.map(lambda t: t[k:], states.params)
    np.testing.assert_array_equal(np.asarray(verification_error(full, full)), 0.0)
    # same keys: the twins start from exactly the full models' w_0
    np.testing.assert_array_equal(np.asarray(verification_error(jax.tree.map(lambda t: t[:k], init.params),
                                                                jax.tree.map(lambda t: t[k:], init.params))), 0.0)
    ve = np.asarray(verification_error(full, twin))
    assert ve.shape == (k,) and np.all(ve > 0)
    want = [np.sqrt(sum(np.sum((np.asarray(a[i], np.float64) - np.asarray(b[i])) ** 2)
                        for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(twin)))) for i in range(k)]
    np.testing.assert_allclose(ve, want, rtol=1e-5)
    # the proxy: (η²/2)·t·‖w_t − w_0‖·σ
    w0 = jax.tree.map(lambda t: t[:k], init.params)
    ue = np.asarray(unlearning_error(0.1, 44, full, w0, jnp.array([4.0, 9.0])))
    np.testing.assert_allclose(ue, 0.5 * 0.01 * 44 * np.asarray(verification_error(full, w0)) * np.array([2.0, 3.0]),
                               rtol=1e-6)


def test_single_gradient_is_the_closed_form_update_on_a_linear_model():
    rng = np.random.default_rng(1)
    n, d, c, k = 40, 6, 4, 3
    x = jnp.asarray(rng.normal(size=(n, d)), jnp.float32)
    y = jnp.asarray(rng.integers(0, c, n), jnp.int32)

    def init(key):
        return {"W": jax.random.normal(jax.random.fold_in(key, 0), (d, c)), "b": jax.random.normal(key, (c,)) * 0.1}

    data = UnlearnData(x, y, lambda p, s, xb, train: (xb @ p["W"] + p["b"], s), init=lambda key: (init(key), {}))
    keys = jax.random.split(jax.random.key(7), k)
    wt = jax.tree.map(lambda t: t + 1.0, jax.vmap(init)(jax.random.split(jax.random.key(8), k)))  # any w_t
    forget, retain = np.array([3, 9, 11, 20, 31]), np.setdiff1d(np.arange(n), [3, 9, 11, 20, 31])
    cfg = make_config("single-gradient", lr=0.3, epochs=3, batch_size=8)
    p, s, cost = unlearn_ensemble(single_gradient, wt, {}, data, forget, retain, None, keys, cfg)
    np.testing.assert_array_equal(np.asarray(cost), float(forget.size))  # one gradient per forget point
    xf, yf = np.asarray(x)[forget], np.eye(c)[np.asarray(y)[forget]]
    for i in range(k):
        w0 = init(keys[i])
        z = xf @ np.asarray(w0["W"]) + np.asarray(w0["b"])
        pr = np.exp(z - z.max(1, keepdims=True))
        pr /= pr.sum(1, keepdims=True)
        gw, gb = xf.T @ (pr - yf) / forget.size, (pr - yf).mean(0)
        scale = 3 * 0.3 * forget.size / 8  # m · η · |F| / B
        np.testing.assert_allclose(p["W"][i], np.asarray(wt["W"][i]) + scale * gw, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p["b"][i], np.asarray(wt["b"][i]) + scale * gb, rtol=1e-5, atol=1e-6)
    # batch_size 0: B = |F| (the authors' setting, F is one batch): w_t + m·η·∇L̄(w_0)
    p1, _, _ = unlearn_ensemble(single_gradient, wt, {}, data, forget, retain, None, keys,
                                SingleGradientConfig(lr=0.3, epochs=3))
    np.testing.assert_allclose(np.asarray(p1["b"] - wt["b"]), np.asarray(p["b"] - wt["b"]) * 8 / forget.size,
                               rtol=1e-5, atol=1e-7)


def test_sd_loss_value_and_gradient_match_numpy_and_finite_differences():
    rng = np.random.default_rng(2)
    with jax.enable_x64(True):
        z = jnp.asarray(rng.normal(size=(5, 4)) * 2, jnp.float64)
        y = jnp.asarray(rng.integers(0, 4, 5))
        lam = 2.5
        f = jax.jit(lambda z: training_loss(z, y, 4, 0.0, lam))  # one program for the 41 evaluations below
        zn = np.asarray(z)
        lse = np.log(np.exp(zn).sum(1))
        want = np.mean(lse - zn[np.arange(5), np.asarray(y)]) + lam * np.std(zn, axis=1, ddof=1).sum() / 20
        np.testing.assert_allclose(float(f(z)), want, rtol=1e-12)
        g = np.asarray(jax.grad(f)(z))
        fd = np.zeros_like(zn)
        eps = 1e-6
        for i in np.ndindex(zn.shape):
            e = np.zeros_like(zn)
            e[i] = eps
            fd[i] = (float(f(z + e)) - float(f(z - e))) / (2 * eps)
        np.testing.assert_allclose(g, fd, rtol=1e-6, atol=1e-9)
    # equal logits (std 0): a finite zero subgradient, not NaN
    g0 = jax.grad(lambda z: std_logit_penalty(z))(jnp.ones((2, 3)))
    assert bool(jnp.all(g0 == 0))
    # λ = 0 is exactly the cross-entropy
    zz = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
    import optax

    plain = float(optax.softmax_cross_entropy_with_integer_labels(zz, jnp.array([0, 1, 2])).mean())
    assert float(training_loss(zz, jnp.array([0, 1, 2]), 4, 0.0, 0.0)) == pytest.approx(plain, rel=1e-6)
    assert float(training_loss(zz, jnp.array([0, 1, 2]), 4, 0.0, 1.0)) > plain  # λ > 0 adds the penalty


def test_sd_loss_in_training_shrinks_the_logit_spread(digits):
    def spread(lam):
        r = RECIPES["digits-mlp"].replace(epochs=1, std_loss=lam)
        masks = np.ones((1, digits.n_train), bool)
        tr = make_trainer(r, 10, digits.image_shape, digits.mean, digits.std, steps_per_epoch(masks, r.batch_size))
        st, _ = train_ensemble(tr, jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels), masks, [0], 0, 1)
        z = tr.logits(jax.tree.map(lambda t: t[0], st.params), {}, jnp.asarray(digits.test_images))
        return float(jnp.std(z, axis=1).mean())

    assert spread(50.0) < 0.5 * spread(0.0)


def test_bad_inputs_give_one_clear_error(twins):
    tr, init, states, forget, k = twins
    full = jax.tree.map(lambda t: t[:k], states.params)
    other = {"a": jnp.zeros((k, 3))}
    with pytest.raises(JaxUnlearnError, match="different parameter structures"):
        verification_error(full, other)
    with pytest.raises(JaxUnlearnError, match="different parameter shapes"):
        verification_error(full, jax.tree.map(lambda t: t[:1], full))
    with pytest.raises(JaxUnlearnError, match="std_loss"):
        Recipe(std_loss=-1.0).validate()
    with pytest.raises(JaxUnlearnError, match="lr_schedule"):
        Recipe(lr_schedule="cosine").validate()
    with pytest.raises(JaxUnlearnError, match="std_losses"):
        UnrollingConfig().with_overrides(["std_losses=[0, -1]"])
    with pytest.raises(JaxUnlearnError, match="must be a finite number >= 0"):
        make_config("single-gradient", std_loss=-0.5)
    with pytest.raises(JaxUnlearnError, match="learning rate"):
        unlearning_error(-0.1, 3, full, full, jnp.ones(k))
    x = jnp.zeros((10, 2))
    data = UnlearnData(x, jnp.zeros(10, jnp.int32), lambda p, s, xb, train: (xb @ p["W"], s))
    params = {"W": jnp.zeros((k, 2, 3))}
    keys = jax.random.split(jax.random.key(0), k)
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        unlearn_ensemble(single_gradient, params, {}, data, np.array([], np.int64), np.arange(10), None, keys,
                         SingleGradientConfig())
    with pytest.raises(JaxUnlearnError, match="initial weights"):
        unlearn_ensemble(single_gradient, params, {}, data, np.array([1]), np.arange(2, 10), None, keys,
                         SingleGradientConfig())


def test_unrolling_command_smoke_and_resume(tmp_path, capsys):
    out = str(tmp_path / "u")
    args = ["unrolling", "--dataset", "digits", "--out", out, "--no-progress", "--set", "lrs=[0.1]", "epochs=[1,2]",
            "batch_sizes=[64]", "std_losses=[20]", "models=2", "forget_size=8", "hessian_iters=5",
            'baselines=["ga"]']
    assert main(args) == 0
    with open(os.path.join(out, "results.json")) as f:
        res = json.load(f)
    cells = res["cells"]
    assert len(cells) == 2 and res["settings_reused"] == 0
    for c in cells:
        assert set(c["verification_error"]) == {"none", "single-gradient", "ga"}
        assert all(len(v) == 2 and all(x > 0 for x in v) for v in c["verification_error"].values())
        assert len(c["unlearning_error"]) == 2 and all(u > 0 for u in c["unlearning_error"])
    corr = res["summary"]["correlation_unlearning_vs_verification"]["single-gradient"]
    assert corr["n"] == 4 and -1 <= corr["pearson"] <= 1 and -1 <= corr["spearman"] <= 1
    # the correlation of exactly those 4 (unlearning error, verification error) pairs, recomputed
    from scipy import stats

    u = np.concatenate([c["unlearning_error"] for c in cells])
    v = np.concatenate([c["verification_error"]["single-gradient"] for c in cells])
    assert corr["pearson"] == pytest.approx(np.corrcoef(u, v)[0, 1], rel=1e-6, abs=1e-9)
    assert corr["spearman"] == pytest.approx(stats.spearmanr(u, v).statistic, rel=1e-6, abs=1e-9)
    assert set(res["summary"]["sd_loss"]) == {"20.0"}
    for png in ("unlearning_vs_verification.png", "sd_loss.png"):
        assert os.path.getsize(os.path.join(out, png)) > 1000
    assert "Pearson" in capsys.readouterr().out
    # resumable: a second run trains nothing and reproduces the cells
    assert main(args) == 0
    with open(os.path.join(out, "results.json")) as f:
        again = json.load(f)
    assert again["settings_reused"] == 1 and again["cells"] == cells
    # bad settings: one clear error, nothing written
    bad = str(tmp_path / "bad")
    assert main(["unrolling", "--out", bad, "--no-progress", "--set", "std_losses=[-1]"]) == 2
    assert "std_losses" in capsys.readouterr().err and not os.path.exists(bad)


def test_new_recipe_fields_stay_out_of_old_configs_at_their_defaults():
    d = Recipe().to_dict()
    assert "std_loss" not in d and "lr_schedule" not in d  # run folders written before them still resume
    r = Recipe(std_loss=2.0, lr_schedule="constant")
    assert r.to_dict()["std_loss"] == 2.0 and Recipe(**r.to_dict()) == r and Recipe(**d) == Recipe()
