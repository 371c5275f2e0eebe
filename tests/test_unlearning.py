import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.training import RECIPES, EnsembleFns, make_trainer, train_ensemble
from jaxunlearn.training.subsets import steps_per_epoch
from jaxunlearn.unlearning import MatchingConfig, UnlearnData, dm_direct, forget_effect, oracle_matching, unlearn_ensemble
from jaxunlearn.unlearning.finetune import SGDConfig
from jaxunlearn.unlearning.gd import GDConfig

K = 8


@pytest.fixture(scope="module")
def ensemble(digits):
    recipe = RECIPES["digits-cnn"].with_epochs(3)
    masks = np.ones((K, digits.n_train), bool)
    tr = make_trainer(recipe, 10, digits.image_shape, digits.mean, digits.std, steps_per_epoch(masks, 64))
    fns = EnsembleFns(tr, K, 1)
    states, _ = train_ensemble(tr, jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels), masks,
                               np.arange(K), 0, recipe.epochs, fns=fns)
    data = UnlearnData(jnp.asarray(digits.train_images), jnp.asarray(digits.train_labels), tr.apply_images)
    logits = fns.logits(states.params, states.batch_stats, jnp.asarray(digits.train_images))
    return tr, fns, states, data, logits


def test_oracle_matching_moves_all_models_toward_their_targets_in_one_call(ensemble, digits):
    tr, fns, states, data, logits = ensemble
    forget = np.arange(40)
    retain = np.arange(40, digits.n_train)
    # targets: every model's own logits, except forget points pushed to "class 0"
    targets = logits.at[:, forget].set(jnp.where(jnp.arange(10) == 0, 8.0, -2.0))
    cfg = MatchingConfig(optimizer="sgd", lr=0.02, epochs=8, batch_size=64, forget_multiplier=1, retain_per_epoch=128,
                         weight_decay=5e-4)
    keys = jax.random.split(jax.random.key(0), K)
    p, s, cost = unlearn_ensemble(oracle_matching, states.params, states.batch_stats, data, forget, retain,
                                  targets, keys, cfg)
    new = fns.logits(p, s, jnp.asarray(digits.train_images))
    before = jnp.mean((logits[:, forget] - targets[:, forget]) ** 2, axis=(1, 2))
    after = jnp.mean((new[:, forget] - targets[:, forget]) ** 2, axis=(1, 2))
    assert new.shape == logits.shape and cost.shape == (K,)
    assert bool(jnp.all(after < 0.5 * before)), (before, after)
    keep = jnp.mean(new[:, retain].argmax(-1) == logits[:, retain].argmax(-1))
    assert float(keep) > 0.9  # retain predictions survive
    steps = -(-(40 + 128) // 64)
    assert np.all(np.asarray(cost) == cfg.epochs * steps * 64)
    # models are unlearned independently: model 0's result does not depend on the other models' inputs (the
    # same program, models 1..K-1 given in reverse order with their targets and keys: model 0's bits unchanged)
    order = np.r_[0, np.arange(K - 1, 0, -1)]
    p1, s1, _ = unlearn_ensemble(oracle_matching, jax.tree.map(lambda t: t[order], states.params),
                                 jax.tree.map(lambda t: t[order], states.batch_stats), data, forget, retain,
                                 targets[order], keys[order], cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a[order], b), (p, s), (p1, s1))


def test_unlearn_ensemble_rejects_bad_inputs(ensemble, digits):
    tr, fns, states, data, logits = ensemble
    keys = jax.random.split(jax.random.key(0), K)
    cfg = MatchingConfig(epochs=1)
    call = lambda f, r, t: unlearn_ensemble(oracle_matching, states.params, states.batch_stats, data, f, r, t,  # noqa: E731
                                            keys, cfg)
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        call(np.array([], np.int32), np.arange(10), logits)
    with pytest.raises(JaxUnlearnError, match=r"targets must be \[K=8, n_train=1437, C=10\]"):
        call(np.arange(3), np.arange(3, 10), logits[:, :100])
    with pytest.raises(JaxUnlearnError, match=r"targets must be \[K=8, n_train=1437, C=10\], got \(8, 1437, 9\)"):
        call(np.arange(3), np.arange(3, 10), logits[..., :9])
    with pytest.raises(JaxUnlearnError, match="targets contain NaN"):
        call(np.arange(3), np.arange(3, 10), logits.at[0, 0, 0].set(jnp.nan))
    with pytest.raises(JaxUnlearnError, match="need targets"):
        call(np.arange(3), np.arange(3, 10), None)
    # indices: integers only (no silent cast of 1.5 or wrap-round of 2**32 + 3), and the two sets disjoint
    with pytest.raises(JaxUnlearnError, match="must be integers"):
        call(np.array([1.5, 2.7]), np.arange(3, 10), logits)
    with pytest.raises(JaxUnlearnError, match="out of range"):
        call(np.array([2**32 + 3]), np.arange(3, 10), logits)
    with pytest.raises(JaxUnlearnError, match="overlap in 2 points"):
        call(np.arange(3), np.arange(1, 10), logits)
    # the data and the stacked models
    with pytest.raises(JaxUnlearnError, match=r"labels must lie in \[0, 10\)"):
        unlearn_ensemble(oracle_matching, states.params, states.batch_stats, data.replace(labels=data.labels + 5),
                         np.arange(3), np.arange(3, 10), logits, keys, cfg)
    with pytest.raises(JaxUnlearnError, match="150 images but 1437 labels"):
        unlearn_ensemble(oracle_matching, states.params, states.batch_stats, data.replace(images=data.images[:150]),
                         np.arange(3), np.arange(3, 10), logits, keys, cfg)
    with pytest.raises(JaxUnlearnError, match=r"leading \(models\) axis; got sizes \[4, 8\]"):
        unlearn_ensemble(oracle_matching, states.params, states.batch_stats, data, np.arange(3), np.arange(3, 10),
                         logits, keys[:4], cfg)
    # a config built directly is held to make_config's rules, and must be the method's
    for bad, msg in [(MatchingConfig(lr=float("nan")), "lr must be a finite number >= 0, got nan"),
                     (MatchingConfig(epochs=0), "epochs must be positive"),
                     (MatchingConfig(batch_size=-1), "batch_size must be positive"),
                     (GDConfig(), "GDConfig is not a config of this method; it takes OracleMatchingConfig or DMMConfig"),
                     (SGDConfig(), "SGDConfig is not a config of this method"),  # a base lacking the fields
                     (None, "config must be a method's config instance")]:
        with pytest.raises(JaxUnlearnError, match=msg):
            unlearn_ensemble(oracle_matching, states.params, states.batch_stats, data, np.arange(3),
                             np.arange(3, 10), logits, keys, bad)

    class MyMatching(MatchingConfig):  # a user's own config: the method's fields plus one of theirs
        note: str | None = struct.field(pytree_node=False, default=None)

    p, _, cost = unlearn_ensemble(oracle_matching, states.params, states.batch_stats, data, np.arange(3),
                                  np.arange(3, 10), logits, keys, MyMatching(epochs=1, note="mine"))
    assert cost.shape == (K,)


def test_dm_direct_subtracts_the_forget_weights():
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(6, 3, 20)), jnp.float32)  # [P, C, n_train]
    full = jnp.asarray(rng.normal(size=(4, 6, 3)), jnp.float32)
    f = np.array([2, 5, 11])
    out = dm_direct(full, w, f)
    np.testing.assert_allclose(out, np.asarray(full) - np.asarray(w)[:, :, f].sum(-1)[None], rtol=1e-5)
    np.testing.assert_allclose(forget_effect(w, f), np.asarray(w)[:, :, f].sum(-1), rtol=1e-5)
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        dm_direct(full, w, np.array([], int))
    with pytest.raises(JaxUnlearnError, match="out of range"):
        dm_direct(full, w, np.array([20]))
    with pytest.raises(JaxUnlearnError, match="do not match the datamodels"):
        dm_direct(full[:, :5], w, f)


def test_a_users_own_flax_models_edge_cases(digits):
    """What a JAX user's own module brings: custom module names (DEL's train_head finds the classifier by its
    C-wide output, not by dict order, which JAX sorts), Dropout, another state collection, and an init or
    memorization of the wrong form, each a clear error."""
    from flax import linen as nn

    from jaxunlearn.models import flax_apply
    from jaxunlearn.unlearning import get_method, make_config

    class Named(nn.Module):  # sorted keys put "features" after "classifier": dict order cannot tell the head
        drop: float = 0.0

        @nn.compact
        def __call__(self, x, train=False):
            x = nn.relu(nn.Dense(32, name="features")(x.reshape(len(x), -1)))
            return nn.Dense(10, name="classifier")(nn.Dropout(self.drop, deterministic=not train)(x))

    x, y = jnp.asarray(digits.train_images[:200], jnp.float32) / 16.0, jnp.asarray(digits.train_labels[:200])
    keys = jax.random.split(jax.random.key(0), 2)
    init = lambda k: (Named().init(k, x[:1])["params"], {})  # noqa: E731
    params = jax.vmap(lambda k: init(k)[0])(keys)
    data = UnlearnData(x, y, flax_apply(Named()), init=init)
    forget, retain = np.arange(10), np.arange(10, 200)
    run = lambda d, cfg, m="del": unlearn_ensemble(get_method(m).fn, params, {}, d, forget, retain, None,  # noqa: E731
                                                   keys, cfg)
    cfg = make_config("del", epochs=1, batch_size=32, lr=0.1)  # train_head=1 by default, as the authors' code
    p, _, _ = run(data, cfg)
    moved = lambda q, leaf: float(jnp.mean(q["classifier"][leaf] != params["classifier"][leaf]))  # noqa: E731
    p0, _, _ = run(data, make_config("del", epochs=1, batch_size=32, lr=0.1, train_head=0))  # the mask alone
    assert moved(p, "bias") == 1.0 and moved(p, "kernel") > 0.9  # the head trained whole...
    assert moved(p0, "kernel") < moved(p, "kernel")  # ...where the mask alone leaves some of it fixed
    p2, _, _ = run(data, make_config("del", epochs=1, batch_size=32, train_head=1, lr=0.1, head="classifier"))
    jax.tree.map(np.testing.assert_array_equal, p2, p)  # naming it picks the same module
    with pytest.raises(JaxUnlearnError, match="no top-level module 'head'"):
        run(data, make_config("del", epochs=1, batch_size=32, train_head=1, head="head"))
    # init of the wrong form, memorization of the wrong length: said at the boundary, with the fix
    with pytest.raises(JaxUnlearnError, match=r"init must be key -> \(params, model_state\) of ONE model"):
        run(data.replace(init=lambda k: Named().init(k, x[:1])), cfg)
    with pytest.raises(JaxUnlearnError, match=r"memorization must be f32\[n_train=200\]"):
        run(data.replace(memorization=jnp.ones(5)), make_config("ga@memorization", epochs=1), "ga@memorization")
    # Dropout: the methods' apply has no key; flax_apply draws one per batch when told which stream
    drop = data.replace(apply=flax_apply(Named(0.5)))
    with pytest.raises(JaxUnlearnError, match=r"rng_collections=\('dropout',\)"):
        run(drop, make_config("ga", epochs=1, batch_size=16), "ga")
    p3, _, cost = run(drop.replace(apply=flax_apply(Named(0.5), rng_collections=("dropout",))),
                      make_config("ga", epochs=1, batch_size=16), "ga")
    assert bool(jnp.all(jnp.isfinite(p3["classifier"]["kernel"]))) and np.all(np.asarray(cost) == 10)  # |F| a step


def test_unlearning_programs_compile_with_the_faster_cpu_options_only_for_small_inputs(ensemble):
    """On CPU an unlearning program on digits-sized inputs compiles at LLVM level 2 with XLA's older fusion
    emitters (half the compile, the same run time: benchmarks/unlearning_compile_options.py); on 32x32x3 inputs,
    where the older emitters ran the outputs program 20 % slower, with the default. One program per method,
    layout and options, kept for the process."""
    from jaxunlearn.unlearning import base

    tr, fns, states, data, logits = ensemble
    devs = base.model_devices(jax.devices("cpu")[:1], K, K)  # the CPU rule, whatever the default backend
    small = base._program(base._grid_impl, oracle_matching, K, devs, data)
    assert small.options == {"xla_backend_optimization_level": 2, "xla_cpu_use_fusion_emitters": False}
    assert base._program(base._grid_impl, oracle_matching, K, devs, data) is small
    assert base._program(base._unlearn_impl, oracle_matching, K, devs, data) is not small
    cifar = data.replace(images=jnp.zeros((4, 32, 32, 3), jnp.uint8), labels=jnp.zeros(4, jnp.int32))
    assert base._program(base._grid_impl, oracle_matching, K, devs, cifar).options is None
    if jax.default_backend() != "cpu":  # an accelerator's programs compile with the default
        assert base._program(base._grid_impl, oracle_matching, K, base.model_devices(None, K, K), data).options is None
