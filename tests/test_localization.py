"""DEL and localized unlearning: masks, METHOD@MASK, the fresh reset, memorization, ToW, forget specs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.data.forget_sets import make_forget_set
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.localization import MASKS, MaskConfig, channel_scores, del_mask, get_mask, top_fraction
from jaxunlearn.metrics import memorization, tug_of_war
from jaxunlearn.pipeline.config import PipelineConfig
from jaxunlearn.unlearning import METHODS, get_method, make_config, unlearn_ensemble
from jaxunlearn.unlearning.del_unlearning import DELConfig, epoch_cosine, reset_to_fresh

K = 2
FORGET = np.arange(0, 80, 2)  # 40 points
RETAIN = np.setdiff1d(np.arange(1437), FORGET)


@pytest.fixture(scope="module")
def mlps(train_mlps, digits):
    tr, _, states, data, logits = train_mlps(K, 3)
    return tr, states, data.replace(memorization=jnp.linspace(-0.1, 1.0, digits.n_train)), logits


def one(tree, i=0):
    return jax.tree.map(lambda t: t[i], tree)


def count(mask):
    return sum(int(np.asarray(x).sum()) for x in jax.tree.leaves(mask)), sum(x.size for x in jax.tree.leaves(mask))


@pytest.mark.parametrize("fraction", [0.3, 0.05, 1.0, 0.5])
def test_top_fraction_selects_exactly_the_fraction(fraction):
    rng = np.random.default_rng(0)
    scores = {"a": jnp.asarray(rng.random((7, 5))), "b": jnp.asarray(rng.random(13)), "c": jnp.zeros((4, 3))}
    mask = top_fraction(scores, fraction)
    got, n = count(mask)
    assert got == int(fraction * n)
    flat = np.concatenate([np.ravel(scores[k]) for k in "abc"])
    kept = np.concatenate([np.ravel(mask[k]) for k in "abc"])
    if 0 < got < n:
        assert flat[kept].min() >= flat[~kept].max()  # the top scores, nothing else


def test_channel_scores_follow_the_authors_topk_of_output_channels():
    rng = np.random.default_rng(1)
    w = rng.random((3, 3, 4, 30)).astype(np.float32)  # flax conv kernel [h, w, in, out]
    got = np.asarray(channel_scores(jnp.asarray(w), "topk", 0.1))
    # the authors, in torch's layout [out, in, h, w]: view(C_out, -1), topk(int(0.1 * C_out)) per row, mean
    rows = np.transpose(w, (3, 2, 0, 1)).reshape(30, -1)
    h = int(0.1 * 30)
    want = np.sort(rows, 1)[:, -h:].mean(1)
    np.testing.assert_allclose(got, np.broadcast_to(want, w.shape), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(channel_scores(jnp.asarray(w), "mean")),
                               np.broadcast_to(rows.mean(1), w.shape), rtol=1e-6)
    b = rng.random(30).astype(np.float32)
    assert np.array_equal(np.asarray(channel_scores(jnp.asarray(b))), b)  # rank 1: per weight


@pytest.mark.parametrize("mask_name", sorted(MASKS))
def test_every_mask_selects_the_requested_fraction(mlps, mask_name):
    tr, states, data, _ = mlps
    cfg = MaskConfig(mask_fraction=0.3)
    mask, cost = jax.jit(lambda p, s, k: get_mask(mask_name)(p, s, data, jnp.asarray(FORGET), k, cfg))(
        one(states.params), one(states.batch_stats), jax.random.key(0))
    got, n = count(mask)
    assert got == (n if mask_name == "whole" else int(np.float32(0.3) * np.float32(n)))
    assert float(cost) == (len(FORGET) if mask_name in ("del", "saliency", "memorization") else 0.0)


def _reference_mask(params, score_of, fraction=0.3, reduce="topk", topk=0.1):
    """The top ``fraction`` of weights by ``score_of(params)`` (a pytree of per-weight scores), grouped by
    output channel as the DEL authors' code groups them (``reduce``; None: per weight), in plain NumPy:
    (mask, per-weight score, threshold)."""
    grouped = []
    for sc in jax.tree.leaves(score_of(params)):
        sc = np.asarray(sc, np.float64)
        if sc.ndim > 1 and reduce is not None:  # None: per weight (saliency)
            c = sc.shape[-1]
            rows = np.moveaxis(sc, -1, 0).reshape(c, -1)
            h = min(rows.shape[1], max(1, int(topk * c)))
            per = np.sort(rows, axis=1)[:, -h:].mean(1) if reduce == "topk" else rows.mean(1)
            sc = np.broadcast_to(per, sc.shape)
        grouped.append(sc.ravel())
    flat = np.concatenate(grouped)
    k = int(np.float32(fraction) * np.float32(flat.size))
    threshold = np.sort(flat)[::-1][k - 1]
    return flat >= threshold, flat, threshold


@pytest.mark.parametrize("mask_name", ["del", "saliency"])
def test_masks_keep_the_weights_their_definition_scores_highest(mlps, mask_name):
    # DEL: |θ ⊙ Σ_batches ∇ mean-CE(batch)| (eval mode, whole batches: the short remainder dropped, as the
    # authors' drop_last loader; key None drops the last points of the given order), each output channel scored by
    # the mean of its top int(0.1·C) entries; SalUn's saliency: |∇ Σ_i CE(x_i)| per weight. Recomputed here
    # with a Python loop over the batches and NumPy grouping, against the library's scan and lax.top_k.
    import optax

    tr, states, data, _ = mlps
    p, s = one(states.params), one(states.batch_stats)
    cfg = MaskConfig(mask_fraction=0.3, mask_batch_size=16)  # 40 forget points: batches of 16 and 16, 8 dropped

    def ce(params, idx, reduce):
        logits, _ = data.apply(params, s, data.images[idx], False)
        return reduce(optax.softmax_cross_entropy_with_integer_labels(logits, data.labels[idx]))

    if mask_name == "del":
        grad = jax.jit(jax.grad(ce), static_argnums=2)  # one program a batch shape, not one per eager op
        grads = [grad(p, FORGET[i:i + 16], jnp.mean) for i in range(0, 32, 16)]
        g = jax.tree.map(lambda *xs: sum(xs), *grads)
        want, flat, thr = _reference_mask(p, lambda q: jax.tree.map(lambda w, d: jnp.abs(w * d), q, g))
    else:
        g = jax.jit(jax.grad(ce), static_argnums=2)(p, FORGET, jnp.sum)
        want, flat, thr = _reference_mask(p, lambda q: jax.tree.map(jnp.abs, g), reduce=None)
    mask, _ = jax.jit(lambda p, s: get_mask(mask_name)(p, s, data, jnp.asarray(FORGET), None, cfg))(p, s)
    got = np.concatenate([np.asarray(m).ravel() for m in jax.tree.leaves(mask)])
    clear = np.abs(flat - thr) > 1e-4 * thr  # away from the cut, summation order cannot flip a weight
    assert clear.mean() > 0.95
    np.testing.assert_array_equal(got[clear], want[clear])
    assert got.sum() == want.sum() or abs(int(got.sum()) - int(want.sum())) <= int((~clear).sum())


def test_del_scores_whole_batches_dropping_a_random_remainder():
    from jaxunlearn.localization.masks import full_batches

    idx = jnp.arange(100, 140)  # 40 points in batches of 16: 8 dropped
    kept = [np.asarray(full_batches(idx, jax.random.key(k), 16)) for k in range(2)]
    for got in kept:
        assert len(got) == 32 and len(set(got.tolist())) == 32 and set(got.tolist()) <= set(range(100, 140))
    assert set(kept[0].tolist()) != set(kept[1].tolist())  # which points are dropped is drawn per key
    np.testing.assert_array_equal(np.asarray(full_batches(idx, None, 16)), np.arange(100, 132))
    np.testing.assert_array_equal(np.asarray(full_batches(idx, jax.random.key(0), 20)), idx)  # no remainder
    np.testing.assert_array_equal(np.asarray(full_batches(idx, jax.random.key(0), 128)), idx)  # under one batch


def test_memorization_mask_is_dels_weighted_by_memorization(mlps):
    tr, states, data, _ = mlps
    p, s = one(states.params), one(states.batch_stats)
    cfg = MaskConfig()
    mem = get_mask("memorization")
    dels = del_mask(p, s, data, jnp.asarray(FORGET), None, cfg)[0]
    same = mem(p, s, data.replace(memorization=jnp.ones(data.labels.shape[0])), jnp.asarray(FORGET), None, cfg)[0]
    jax.tree.map(np.testing.assert_array_equal, same, dels)  # weights of 1: DEL's mask exactly
    varied = mem(p, s, data, jnp.asarray(FORGET), None, cfg)[0]  # the fixture's memorization varies per point
    assert any(bool(jnp.any(a != b)) for a, b in zip(jax.tree.leaves(varied), jax.tree.leaves(dels)))


def test_random_mask_draws_whole_channels_anew_for_each_key(mlps):
    tr, states, data, _ = mlps
    p, s = one(states.params), one(states.batch_stats)
    draw = lambda k: get_mask("random")(p, s, data, jnp.asarray(FORGET), jax.random.key(k), MaskConfig())[0]  # noqa: E731
    a, b = draw(0), draw(1)
    assert any(bool(jnp.any(x != y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    jax.tree.map(np.testing.assert_array_equal, a, draw(0))  # a key is a draw
    partial = sum(int(((m.mean(0) > 0) & (m.mean(0) < 1)).sum()) for m in map(np.asarray, jax.tree.leaves(a))
                  if m.ndim == 2)
    assert partial <= 1  # whole output channels (but the one the fraction cuts through)


def test_del_mask_groups_whole_output_channels(mlps):
    tr, states, data, _ = mlps
    p = one(states.params)
    mask, _ = del_mask(p, one(states.batch_stats), data, jnp.asarray(FORGET), None, MaskConfig())
    partial = 0
    for m in jax.tree.leaves(mask):
        m = np.asarray(m)
        if m.ndim == 2:  # Dense kernels [in, out]: a channel is in or out as a whole (but the boundary one)
            per_channel = m.mean(0)
            partial += int(((per_channel > 0) & (per_channel < 1)).sum())
    assert partial <= 1


@pytest.mark.parametrize("method", sorted(m for m in METHODS if m != "del"))
def test_method_at_mask_keeps_every_weight_outside_the_mask_bit_identical(mlps, method):
    tr, states, data, logits = mlps
    name = f"{method}@del"
    m = get_method(name)
    cfg = make_config(name, epochs=1, mask_fraction=0.2)
    targets = logits.at[:, FORGET].add(1.0) if m.targets else None
    keys = jax.random.split(jax.random.key(5), K)
    p, _, cost = unlearn_ensemble(m.fn, states.params, states.batch_stats, data, FORGET, RETAIN, targets, keys, cfg)
    if method == "gd":  # the counted compute: the method's + the mask's one gradient per forget point
        _, _, base_cost = unlearn_ensemble(get_method(method).fn, states.params, states.batch_stats, data, FORGET,
                                           RETAIN, targets, keys, make_config(method, epochs=1))
        np.testing.assert_allclose(np.asarray(cost), np.asarray(base_cost) + len(FORGET))
    for i in range(K):
        mask, _ = del_mask(one(states.params, i), one(states.batch_stats, i), data, jnp.asarray(FORGET), None, cfg)
        moved = 0
        for new, old, mk in zip(jax.tree.leaves(one(p, i)), jax.tree.leaves(one(states.params, i)),
                                jax.tree.leaves(mask)):
            same = np.asarray(new).view(np.uint32) == np.asarray(old).view(np.uint32)
            mk = np.asarray(mk)
            assert same[~mk].all(), f"{name}: a weight outside the mask changed"
            moved += int((~same[mk]).sum())
        assert moved > 0, f"{name}: nothing inside the mask moved"


def test_del_resets_the_mask_to_a_fresh_init_of_its_key(mlps):
    tr, states, data, _ = mlps
    p, s = one(states.params), one(states.batch_stats)
    key = jax.random.key(9)
    cfg = DELConfig(epochs=0)  # reset only: no fine-tuning step
    out, _, cost = jax.jit(lambda p, s: METHODS["del"].fn(p, s, data, jnp.asarray(FORGET), jnp.asarray(RETAIN),
                                                          None, key, cfg))(p, s)
    mask, _ = del_mask(p, s, data, jnp.asarray(FORGET), None, cfg)
    fresh, _ = data.init(jax.random.split(key, 3)[1])
    original, _ = data.init(jax.random.key(0))  # model 0's own initialisation (train_ensemble's key 0)
    for new, old, f, o, mk in zip(*(jax.tree.leaves(t) for t in (out, p, fresh, original, mask))):
        mk = np.asarray(mk)
        new, old, f, o = map(np.asarray, (new, old, f, o))
        assert np.array_equal(new[mk], f[mk])  # a fresh draw of the method's key
        assert np.array_equal(new[~mk].view(np.uint32), old[~mk].view(np.uint32))
        if mk.sum() > 8:
            assert not np.allclose(new[mk], old[mk]) and not np.allclose(new[mk], o[mk])
    assert float(cost) == len(FORGET)
    # reset_to_fresh alone: the same
    again = reset_to_fresh(p, mask, data.init, jax.random.split(key, 3)[1])
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(again), jax.tree.leaves(out)))


def test_del_fine_tunes_only_the_mask_and_follows_the_epoch_cosine(mlps):
    tr, states, data, _ = mlps
    cfg = make_config("del", epochs=2, lr=0.05)
    keys = jax.random.split(jax.random.key(1), K)
    p, _, cost = unlearn_ensemble(METHODS["del"].fn, states.params, states.batch_stats, data, FORGET, RETAIN, None,
                                  keys, cfg)
    assert bool(jnp.all(cost == len(FORGET) + 2 * 11 * 128))  # mask + 2 epochs of ceil(1397 / 128) batches
    sched = epoch_cosine(0.1, 0.01, 4, 10)
    lrs = [float(sched(s)) for s in (0, 9, 10, 20, 30, 39)]
    want = [0.001 + 0.099 * 0.5 * (1 + np.cos(np.pi * e / 4)) for e in (0, 0, 1, 2, 3, 3)]
    np.testing.assert_allclose(lrs, want, rtol=1e-5)


def test_del_needs_the_initialiser(mlps):
    tr, states, data, _ = mlps
    with pytest.raises(JaxUnlearnError, match="UnlearnData.init"):
        unlearn_ensemble(METHODS["del"].fn, states.params, states.batch_stats, data.replace(init=None), FORGET, RETAIN,
                         None, jax.random.split(jax.random.key(1), K), make_config("del", epochs=1))


@pytest.mark.parametrize("name, kw, match", [
    ("gd@del", {"mask_fraction": 0.0}, "mask_fraction must lie in"),
    ("gd@del", {"mask_fraction": 1.5}, "mask_fraction must lie in"),
    ("del", {"mask_fraction": -0.1}, "mask_fraction must be a finite number >= 0, got -0.1"),
    ("gd@nope", {}, "unknown mask 'nope'"),
    ("nope@del", {}, "unknown method 'nope'"),
    ("dm-direct@del", {}, "unknown method 'dm-direct'"),
    ("gd@del", {"mask_channel_reduce": "max"}, "mask_channel_reduce must be one of"),
])
def test_bad_masks_and_fractions_are_one_clear_error(name, kw, match):
    with pytest.raises(JaxUnlearnError, match=match):
        make_config(name, **kw)


def test_pipeline_config_takes_method_at_mask():
    cfg = PipelineConfig(methods=("none", "neggrad+@del", "random-labels@saliency", "gd@random", "del"))
    assert cfg.validate().method_config("neggrad+@del").mask_fraction == 0.3
    cfg = cfg.with_overrides(["methods.gd@random.mask_fraction=0.1"])
    assert cfg.method_config("gd@random").mask_fraction == pytest.approx(0.1)
    with pytest.raises(JaxUnlearnError, match="unknown mask"):
        PipelineConfig(methods=("gd@bogus",)).validate()


def test_memorization_of_a_constructed_ensemble():
    rng = np.random.default_rng(0)
    masks = rng.random((400, 3)) < 0.5
    correct = np.zeros((400, 3), bool)
    correct[:, 0] = masks[:, 0]  # only the models that saw point 0 get it right: memorized
    correct[:, 1] = True  # an easy point: everyone gets it right
    correct[:, 2] = rng.random(400) < 0.3  # noise, unrelated to membership
    mem = np.asarray(memorization(masks, correct))
    assert mem[0] == pytest.approx(1.0) and mem[1] == pytest.approx(0.0) and abs(mem[2]) < 0.15
    margins = np.where(correct, 1.0, -1.0)
    np.testing.assert_allclose(np.asarray(memorization(masks, margins)), mem)
    logits = np.stack([-margins, margins], -1)  # correct class 1
    np.testing.assert_allclose(np.asarray(memorization(masks, logits, np.ones(3, int))), mem)
    with pytest.raises(JaxUnlearnError, match="in every subset or in none"):
        memorization(np.ones((4, 3), bool), correct[:4])
    with pytest.raises(JaxUnlearnError, match=r"outputs cover \(\d+, 3\) \(models, points\); masks \(\d+, 2\)"):
        memorization(masks[:, :2], correct)


def test_tug_of_war():
    o = {"forget": 0.8, "retain": 0.99, "test": 0.9}
    assert tug_of_war(o, o) == 1.0
    assert tug_of_war({"forget": 1.0, "retain": 0.99, "test": 0.85}, o) == pytest.approx(0.8 * 1.0 * 0.95)


def test_non_iid_and_memorized_forget_sets():
    labels = np.repeat(np.arange(10), 50)
    idx = make_forget_set("classes:2,5:60", labels, seed=1)
    assert len(idx) == 60 and set(labels[idx]) <= {2, 5} and len(set(labels[idx])) == 2
    mem = np.linspace(0, 1, 500)
    assert list(make_forget_set("memorized:5", labels, memorization=mem)) == [495, 496, 497, 498, 499]
    for spec, match in [("classes:2,5:101", "only 100"), ("classes:2,11:3", "no training point has class 11"),
                        ("classes:2,2:3", "listed twice"), ("memorized:5", "needs memorization"),
                        ("classes:2:0", "size must lie")]:
        with pytest.raises(JaxUnlearnError, match=match):
            make_forget_set(spec, labels)
