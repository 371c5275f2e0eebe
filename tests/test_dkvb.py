"""DKVB heads and zero-gradient class unlearning (jaxunlearn.models.dkvb, jaxunlearn.unlearning.dkvb)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.models.dkvb import (DKVBConfig, DKVBHead, dkvb_logits, nearest_keys, project, random_projection,
                                    select, train_heads)
from jaxunlearn.unlearning.dkvb import (dkvb_activations, dkvb_examples, selection_counts, sweep_heads)

C, K, KD, D, V = 6, 16, 4, 10, 3


def _head(seed=0, mask=None, used=None):
    r = np.random.default_rng(seed)
    proj = random_projection(jax.random.key(seed), C, D, KD)
    keys = jnp.asarray(r.normal(size=(C, K, KD)), jnp.float32)
    values = jnp.asarray(r.normal(size=(C, K, V)), jnp.float32)
    mask = jnp.zeros((C, K), bool) if mask is None else mask
    return DKVBHead(proj, keys, values, mask, used)


def _brute(head, x):
    """NumPy: per codebook, argmin over the keys neither masked nor unused of the squared distance."""
    proj, keys, mask = (np.asarray(a, np.float64) for a in (head.projection, head.keys, head.key_mask))
    unused = np.zeros(mask.shape, bool) if head.used is None else ~np.asarray(head.used)
    out = np.zeros((C, x.shape[0]), np.int64)
    for c in range(C):
        z = x @ proj[c]
        d = ((z[:, None, :] - keys[c][None]) ** 2).sum(-1)
        d[:, mask[c].astype(bool) | unused[c]] = np.inf
        out[c] = d.argmin(1)
    return out


def test_projection_columns_unit_norm():
    p = np.asarray(random_projection(jax.random.key(1), C, D, KD))
    np.testing.assert_allclose(np.linalg.norm(p, axis=1), 1.0, rtol=1e-5)


def test_nearest_key_matches_numpy_brute_force_with_and_without_mask():
    x = np.random.default_rng(3).normal(size=(37, D)).astype(np.float32)
    head = _head()
    np.testing.assert_array_equal(np.asarray(select(head, jnp.asarray(x), block=8)), _brute(head, x))
    mask = jnp.asarray(np.random.default_rng(4).random((C, K)) < 0.5)
    masked = _head(mask=mask)
    np.testing.assert_array_equal(np.asarray(select(masked, jnp.asarray(x), block=5)), _brute(masked, x))
    z = project(head.projection, jnp.asarray(x))
    assert np.asarray(nearest_keys(z, head.keys)).shape == (C, 37)
    # pairs no training point selected are skipped as masked ones are, and the two combine
    used = jnp.asarray(np.random.default_rng(8).random((C, K)) < 0.6).at[:, 0].set(True)
    for h in (_head(used=used), _head(mask=mask.at[:, 0].set(False), used=used)):
        np.testing.assert_array_equal(np.asarray(select(h, jnp.asarray(x), block=8)), _brute(h, x))


def test_masked_pairs_never_selected_and_unmasked_bits_kept():
    r = np.random.default_rng(5)
    feats = jnp.asarray(r.normal(size=(60, D)), jnp.float32)
    head = _head()
    for (masked, cost), passes in ((dkvb_activations(head, feats[:20], 9), 20), (dkvb_examples(head, feats[:20], 7), 7),
                                   (dkvb_activations(head, feats[:20], 2, per_codebook=True), 20)):
        # activations: every forget example goes through the head once; examples: only the N_e used
        assert cost["gradient_evaluations"] == 0 and cost["forward_passes"] == passes
        m = np.asarray(masked.key_mask)
        assert m.sum() > 0
        idx = np.asarray(select(masked, feats))
        chosen = np.zeros((C, K), bool)
        for c in range(C):
            chosen[c, idx[c]] = True
        assert not np.any(chosen & m), "a masked pair was selected"
        # nothing but the mask changes: values, keys, projection keep their exact bits
        for a, b in ((masked.values, head.values), (masked.keys, head.keys), (masked.projection, head.projection)):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()


def test_algorithms_mask_what_the_papers_say():
    r = np.random.default_rng(6)
    feats = jnp.asarray(r.normal(size=(25, D)), jnp.float32)
    head = _head()
    counts = np.asarray(selection_counts(head, feats))
    assert counts.sum() == C * 25
    m = np.asarray(dkvb_activations(head, feats, 5)[0].key_mask)
    assert m.sum() == 5 and counts[m].min() >= np.sort(counts.ravel())[-5]
    pc = np.asarray(dkvb_activations(head, feats, 2, per_codebook=True)[0].key_mask)
    assert (pc.sum(1) == 2).all()
    ex = np.asarray(dkvb_examples(head, feats, 3)[0].key_mask)
    idx = _brute(head, np.asarray(feats[:3]))
    want = np.zeros((C, K), bool)
    for c in range(C):
        want[c, idx[c]] = True
    np.testing.assert_array_equal(ex, want)
    # one vmapped sweep equals the single calls
    stacked = jax.tree.map(lambda a: jnp.stack([a, a]), head)
    sw = sweep_heads(stacked, feats, jnp.asarray([3, 5]), "activations")
    np.testing.assert_array_equal(np.asarray(sw.key_mask[1, 0]), m)


def test_bad_input_is_one_clear_error():
    head = _head()
    feats = jnp.ones((4, D))
    with pytest.raises(JaxUnlearnError, match="width 7"):
        dkvb_activations(head, jnp.ones((4, 7)), 3)
    with pytest.raises(JaxUnlearnError, match="N_a must be >= 1"):
        dkvb_activations(head, feats, 0)
    with pytest.raises(JaxUnlearnError, match="N_e must be >= 1"):
        dkvb_examples(head, feats, -2)
    with pytest.raises(JaxUnlearnError, match="empty"):
        dkvb_examples(head, jnp.ones((0, D)), 2)
    with pytest.raises(JaxUnlearnError, match="NaN"):
        dkvb_examples(head, feats.at[0, 0].set(jnp.nan), 2)
    with pytest.raises(JaxUnlearnError, match="pairs must be >= 1"):
        DKVBConfig(pairs=0).validate()
    from jaxunlearn.pipeline.dkvb import DKVBExperiment

    base = DKVBExperiment()
    for item, msg in (("n_a=[0,10]", "n_a must be"), ("heads=3", "even number"), ("pairs=x", "expected an integer"),
                      ("scrub.bogus=1", "no hyperparameter 'bogus'"), ("nope=1", "not a dkvb setting"),
                      ("per_codebook=1", "true or false")):
        with pytest.raises(JaxUnlearnError, match=msg):
            base.with_overrides([item])
    assert base.with_overrides(["per_codebook=true", "n_e=[3]"]).per_codebook is True
    # a SCRUB field that the grid also sweeps would be silently replaced: refused, by name
    gridded = base.with_overrides(['scrub_grid=["lr=0.1,0.2", "epochs=1"]'])
    with pytest.raises(JaxUnlearnError, match="scrub.lr is also an axis of scrub_grid"):
        gridded.with_overrides(["scrub.lr=0.05"])
    (one,) = gridded.with_overrides(["scrub_grid=[]", "scrub.lr=0.05"]).scrub_configs()
    assert one.lr == 0.05


def test_trained_heads_learn_and_unlearn_a_class():
    r = np.random.default_rng(0)
    centers = r.normal(size=(V, D)) * 3
    y = np.repeat(np.arange(V), 40)
    x = jnp.asarray(centers[y] + r.normal(size=(y.size, D)), jnp.float32)
    cfg = DKVBConfig(num_codebooks=8, pairs=32, dim_key=4, epochs=30, batch_size=32)
    heads = train_heads(jax.random.split(jax.random.key(0), 2), x, jnp.asarray(y), jnp.ones((2, y.size)), V, cfg)
    assert heads.values.shape == (2, 8, 32, V)
    h = jax.tree.map(lambda a: a[0], heads)
    acc = float((np.asarray(dkvb_logits(h, x)).argmax(-1) == y).mean())
    assert acc > 0.95
    # `used`: exactly the pairs the training points select (the authors' counter > 0 after training)
    first = np.asarray(select(h.replace(used=None), x))
    want = np.zeros((8, 32), bool)
    for c in range(8):
        want[c, first[c]] = True
    np.testing.assert_array_equal(np.asarray(h.used), want)
    assert 0 < want.sum() < want.size
    # a test point whose nearest key no training point selected falls back to a used one, whose value trained
    far = jnp.asarray(r.normal(size=(200, D)) * 6, jnp.float32)
    chosen = np.asarray(select(h, far))
    assert all(want[c, chosen[c]].all() for c in range(8))
    assert (np.asarray(select(h.replace(used=None), far)) != chosen).any()
    masked, cost = dkvb_examples(h, x[y == 1], 40)
    pred = np.asarray(dkvb_logits(masked, x)).argmax(-1)
    assert (pred[y == 1] == 1).mean() == 0.0  # every pair the class selected is masked
    c, kk, k = h.keys.shape[-3:]  # per example: projection 2·C·D·k, distances 2·C·K·k, argmin C·K
    per_example = 2 * c * h.feature_dim * k + 2 * c * kk * k + c * kk
    assert cost == {"forward_passes": 40, "gradient_evaluations": 0, "head_flops": 40.0 * per_example}


def test_an_oracle_heads_epochs_are_sized_from_its_subset():
    from jaxunlearn.models.dkvb import shuffled_batches

    w = jnp.ones(100).at[:40].set(0.0)  # 60 training points of 100
    batches, steps = shuffled_batches(jax.random.key(0), w, 16, 2, 60)
    assert steps == 4 and batches.shape == (8, 16)  # ceil(60 / 16) steps an epoch, not ceil(100 / 16)
    assert np.asarray(batches).min() >= 40
    assert shuffled_batches(jax.random.key(0), w, 16, 2)[1] == 7  # default: the whole set's size
    y = jnp.asarray(np.arange(100) % V)
    x = jnp.asarray(np.random.default_rng(1).normal(size=(100, D)), jnp.float32)
    cfg = DKVBConfig(num_codebooks=4, pairs=8, dim_key=4, epochs=2, batch_size=16, init_epochs=1)
    keys = jax.random.split(jax.random.key(0), 2)
    with pytest.raises(JaxUnlearnError, match="no training point"):
        train_heads(keys, x, y, jnp.zeros((2, 100)), V, cfg)
    from jaxunlearn.models.dkvb import train_head

    heads = train_heads(keys, x, y, jnp.stack([w, w]), V, cfg)
    sized = jax.jit(lambda p: train_head(keys[0], x, y, w, V, cfg, p), static_argnums=0)
    assert np.array_equal(np.asarray(heads.values[0]), np.asarray(sized(60).values))
    assert not np.array_equal(np.asarray(heads.values[0]), np.asarray(sized(100).values))


def test_cli_smoke_on_digits_and_bad_class(tmp_path, capsys):
    from jaxunlearn.cli import main

    out = str(tmp_path / "dk")
    small = ["--set", "heads=2", "num_codebooks=8", "pairs=32", "epochs=3", "init_epochs=1", "n_a=[20,200]",
             "n_e=[5,500]", "linear_epochs=2", "scrub_grid=[]", "backbone_epochs=1"]
    assert main(["dkvb", "--dataset", "digits", "--forget-class", "12", "--out", out, *small, "--no-progress"]) == 2
    assert "forget class 12 is not a class of digits" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(out, "results.json"))
    assert main(["dkvb", "--dataset", "digits", "--forget-class", "3", "--out", out, *small, "--no-progress"]) == 0
    res = json.load(open(os.path.join(out, "results.json")))
    rows = res["classes"][0]["rows"]
    methods = {row["method"] for row in rows}
    assert {"dkvb activations", "dkvb examples", "scrub (linear head)", "dkvb oracle (retrained head)"} <= methods
    for row in rows:
        if row["method"] in ("dkvb activations", "dkvb examples"):
            assert row["gradient_evaluations"] == 0 and row["head_forward_passes"] > 0
    assert os.path.isfile(os.path.join(out, "dkvb.png"))


def test_user_features_run_and_resume(tmp_path):
    """run_dkvb with a user-supplied feature function (no backbone); a second run reuses every cache."""
    from jaxunlearn.pipeline.dkvb import DKVBExperiment, run_dkvb

    cfg = DKVBExperiment(dataset="digits", forget_classes=(3,), heads=2, num_codebooks=8, pairs=32, epochs=3,
                         init_epochs=1, n_a=(20, 200), n_e=(5,), linear_epochs=2, eval_train_points=300)
    feats = lambda images: np.asarray(images, np.float32).reshape(images.shape[0], -1) / 16.0  # noqa: E731
    out = str(tmp_path / "user")
    res = run_dkvb(cfg, out, features=feats, progress=False, log=lambda _: None)
    assert res["backbone"]["model"] == "user-supplied" and res["backbone"]["feature_dim"] == 64
    assert res["classes"][0]["eval_train_points"] == 300
    cached = {f: os.stat(os.path.join(out, f)).st_mtime_ns
              for f in ("heads.npz", "heads_oracle_c3.npz", "linear.npz", "features.npz")}
    again = run_dkvb(cfg, out, features=feats, progress=False, log=lambda _: None)
    assert cached == {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in cached}  # nothing re-trained
    assert again["classes"] == res["classes"]
    with pytest.raises(JaxUnlearnError, match="other training settings"):
        run_dkvb(DKVBExperiment(**{**cfg.to_dict(), "pairs": 16}), out, features=feats, progress=False)


def test_experiment_configs_parse():
    from jaxunlearn.pipeline.dkvb import DKVBExperiment, default_config

    exp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    c10 = DKVBExperiment.from_json(os.path.join(exp, "dkvb_cifar10_mini.json"))
    assert c10.data_dir.endswith(os.path.join("shared", "data", "cifar10-mini")) and c10.recipe.endswith(".json")
    assert len(c10.scrub_configs()) == 6
    assert default_config("digits") == DKVBExperiment.from_json(os.path.join(exp, "dkvb_digits.json"))
    paper = default_config("cifar10")  # without a config: the papers' head sizes
    assert (paper.num_codebooks, paper.pairs, paper.dim_key, paper.lr, paper.batch_size) == (256, 4096, 14, 0.3, 256)
