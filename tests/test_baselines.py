"""The baseline unlearning methods: each changes only what it should, all run vmapped over K models."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxunlearn.cli import main
from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.unlearning import (ALL_METHODS, METHODS, SCRUBConfig, get_method, make_config, parse_grid, scrub,
                                   unlearn_ensemble, unlearn_grid)
from jaxunlearn.unlearning.finetune import run_sgd, sgd
from jaxunlearn.unlearning.registry import NEEDS_INIT
from jaxunlearn.unlearning.salun import forget_gradient, salun_mask
from jaxunlearn.unlearning.scrub import retain_batches, scrub_losses
from conftest import check_jit

K = 8
FORGET = np.arange(0, 60, 2)  # 30 points
RETAIN = np.setdiff1d(np.arange(1437), FORGET)


@pytest.fixture(scope="module")
def mlps(train_mlps):
    return train_mlps(K, 4)


def _run(mlps, method, cfg=None, data=None, targets=None):
    tr, fns, states, d, logits = mlps
    m = get_method(method)
    cfg = cfg or make_config(method, epochs=1)
    t = logits.at[:, FORGET].add(1.0) if m.targets else targets  # matching: targets away from the model's own
    keys = jax.random.split(jax.random.key(3), K)
    return unlearn_ensemble(m.fn, states.params, states.batch_stats, data or d, FORGET, RETAIN, t, keys, cfg)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_unlearns_all_models_in_one_vmapped_call(mlps, method):
    tr, fns, states, data, logits = mlps
    p, s, cost = _run(mlps, method)
    assert cost.shape == (K,) and bool(jnp.all(cost > 0))
    leaves = jax.tree.leaves(p)
    assert all(x.shape[0] == K and bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    moved = [float(jnp.abs(a - b).max()) for a, b in zip(leaves, jax.tree.leaves(states.params))]
    assert max(moved) > 0  # every method changes the models
    if method not in ("neggrad+", "salun"):
        return
    # each model is unlearned independently of the others (same result when run on 2 of them)
    keys = jax.random.split(jax.random.key(3), K)
    m = get_method(method)
    p2, _, _ = unlearn_ensemble(m.fn, jax.tree.map(lambda t: t[:2], states.params),
                                jax.tree.map(lambda t: t[:2], states.batch_stats), data, FORGET, RETAIN,
                                logits[:2] if m.targets else None, keys[:2], make_config(method, epochs=1))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[1], b[1], rtol=1e-4, atol=1e-5), p, p2)


def test_counted_compute_follows_each_methods_schedule(mlps):
    # the cost feeds compute_fraction and the Pareto frontier: gradient evaluations = epochs x steps x batch
    r, f = len(RETAIN), len(FORGET)
    steps = lambda n, b: -(-n // b)  # noqa: E731
    for method, cfg, want in [
        ("gd", make_config("gd", epochs=2, batch_size=64), 2 * steps(r, 64) * 64),
        ("gd", make_config("gd", epochs=1, batch_size=64, retain_per_epoch=100), steps(100, 64) * 64),
        ("l1-sparse", make_config("l1-sparse", epochs=3, batch_size=128), 3 * steps(r, 128) * 128),
        ("ga", make_config("ga", epochs=2, batch_size=16), 2 * steps(f, 16) * 16),
        ("ga", make_config("ga", epochs=1, batch_size=256), f),  # the batch shrinks to |F|
    ]:
        _, _, cost = _run(mlps, method, cfg)
        assert np.all(np.asarray(cost) == want), (method, cfg, np.asarray(cost)[0], want)


def test_l1_term_shrinks_the_weights_and_random_labels_are_wrong(mlps):
    from jaxunlearn.unlearning.l1_sparse import l1_norm
    from jaxunlearn.unlearning.random_labels import wrong_labels

    tr, fns, states, data, logits = mlps
    norms = {g: np.asarray(jax.vmap(l1_norm)(_run(mlps, "l1-sparse", make_config("l1-sparse", epochs=1, l1=g))[0]))
             for g in (0.0, 1e-3)}
    assert np.all(norms[1e-3] < norms[0.0] - 1.0), norms  # the same run but the γ·‖θ‖₁ term: smaller ‖θ‖₁
    labels = jnp.asarray(np.arange(1000) % 10)
    drawn = np.stack([np.asarray(wrong_labels(jax.random.key(i), labels, 10)) for i in range(200)])
    assert np.all(drawn != np.asarray(labels)) and np.all((drawn >= 0) & (drawn < 10))
    assert all(set(drawn[:, j]) == set(range(10)) - {j % 10} for j in range(10))  # every other class turns up


def test_gradient_ascent_raises_forget_loss_and_gd_leaves_forget_points_alone(mlps):
    tr, fns, states, data, logits = mlps
    # poison the forget images: any gradient or forward pass through a forget point turns params NaN
    poisoned = data.replace(images=data.images.at[FORGET].set(jnp.nan))
    for method in ("gd", "l1-sparse"):  # retain-only methods never touch a forget point
        p, _, _ = _run(mlps, method, make_config(method, epochs=2), data=poisoned)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p)), method
    for method in ("ga", "neggrad+", "scrub", "random-labels"):  # the test can fail: these do use F
        p, _, _ = _run(mlps, method, data=poisoned)
        assert not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p)), method
    p, s, _ = _run(mlps, "ga", make_config("ga", epochs=4, lr=0.05))
    new = fns.logits(p, s, jnp.asarray(data.images))
    ce = lambda lg: -jnp.take_along_axis(jax.nn.log_softmax(lg[:, FORGET]), data.labels[FORGET][None, :, None], 2).mean()  # noqa: E731
    assert float(ce(new)) > 1.5 * float(ce(logits)), (float(ce(new)), float(ce(logits)))


def test_salun_leaves_unmasked_weights_bit_identical(mlps):
    tr, fns, states, data, logits = mlps
    cfg = make_config("salun", epochs=1, saliency_fraction=0.3)
    p, _, _ = _run(mlps, "salun", cfg)
    one = lambda t, i=0: jax.tree.map(lambda x: x[i], t)  # noqa: E731
    grads = forget_gradient(one(states.params), one(states.batch_stats), data, jnp.asarray(FORGET), cfg.batch_size)
    mask = salun_mask(grads, cfg.saliency_fraction)
    sizes = sum(x.size for x in jax.tree.leaves(mask))
    assert sum(int(x.sum()) for x in jax.tree.leaves(mask)) == round(0.3 * sizes)
    changed = 0
    for new, old, m in zip(jax.tree.leaves(one(p)), jax.tree.leaves(one(states.params)), jax.tree.leaves(mask)):
        same_bits = np.asarray(new).view(np.uint32) == np.asarray(old).view(np.uint32)
        assert same_bits[~np.asarray(m)].all()  # unmasked: exactly the old bits
        changed += int((~same_bits[np.asarray(m)]).sum())
    assert changed > 0.5 * round(0.3 * sizes)  # masked weights do move


def test_scrub_without_max_steps_is_its_min_step_finetune(mlps):
    tr, fns, states, data, logits = mlps
    one = lambda t: jax.tree.map(lambda x: x[0], t)  # noqa: E731
    params, bstats = one(states.params), one(states.batch_stats)
    key = jax.random.key(11)
    f, r = jnp.asarray(FORGET, jnp.int32), jnp.asarray(RETAIN, jnp.int32)
    cfg = SCRUBConfig(epochs=2, max_steps=0, retain_per_epoch=256)
    a, _, _ = check_jit(lambda p, s: scrub(p, s, data, f, r, None, key, cfg))(params, bstats)

    def by_hand(p, s):
        min_loss, _ = scrub_losses(data, p, s, cfg)
        batches, steps = retain_batches(r, 256, cfg.batch_size)
        return run_sgd(p, s, cfg, batches, steps, min_loss, key, sgd(cfg, cfg.epochs * steps))[0]

    b = check_jit(by_hand)(params, bstats)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7), a, b)
    # with max-steps the student is pushed away from the teacher on F
    c, s_c, _ = check_jit(lambda p, s: scrub(p, s, data, f, r, None, key, cfg.replace(max_steps=2, lr=0.02)))(
        params, bstats)
    lg = lambda p, s: tr.logits(p, s, jnp.asarray(data.images[FORGET]))  # noqa: E731
    assert float(jnp.abs(lg(c, s_c) - lg(params, bstats)).mean()) > float(jnp.abs(lg(a, bstats) - lg(params, bstats)).mean())
    # max_steps beyond epochs means every epoch starts with a max pass (as the reference's `epoch <= msteps`)
    d, _, _ = check_jit(lambda p, s: scrub(p, s, data, f, r, None, key, cfg.replace(max_steps=5, lr=0.02)))(params, bstats)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(x, y), c, d)


def test_a_grid_of_configs_is_one_vmapped_call_equal_to_separate_calls(mlps):
    tr, fns, states, data, logits = mlps
    configs = parse_grid("neggrad+", ["lr=0.005,0.02", "beta=0.9,0.99", "epochs=1"])
    assert len(configs) == 4 and configs[3].lr == 0.02 and configs[3].beta == 0.99
    keys = jax.random.split(jax.random.key(3), K)
    m = get_method("neggrad+")
    grid = unlearn_grid(m.fn, states.params, states.batch_stats, data, FORGET, RETAIN, None, keys, configs)
    for c, (p, s, cost) in zip(configs, grid):
        q, _, cost1 = unlearn_ensemble(m.fn, states.params, states.batch_stats, data, FORGET, RETAIN, None, keys, c)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p, q)
        np.testing.assert_array_equal(cost, cost1)
    assert float(jnp.abs(jax.tree.leaves(grid[0][0])[0] - jax.tree.leaves(grid[3][0])[0]).max()) > 0


def test_bad_methods_and_grids_are_clear_errors(tmp_path, capsys):
    with pytest.raises(JaxUnlearnError, match="unknown method 'magic'"):
        get_method("magic")
    with pytest.raises(JaxUnlearnError, match="ga has no hyperparameter 'beta'"):
        parse_grid("ga", ["beta=0.5"])
    with pytest.raises(JaxUnlearnError, match="values must be numbers"):
        parse_grid("gd", ["lr=fast"])
    with pytest.raises(JaxUnlearnError, match="write NAME=V1,V2"):
        parse_grid("gd", ["lr"])
    with pytest.raises(JaxUnlearnError, match="epochs must be an integer"):
        parse_grid("gd", ["epochs=1.5"])
    with pytest.raises(JaxUnlearnError, match="epochs must be positive"):
        parse_grid("gd", ["epochs=0"])
    with pytest.raises(JaxUnlearnError, match="empty grid"):
        parse_grid("gd", [])
    with pytest.raises(JaxUnlearnError, match="saliency_fraction must lie in"):
        make_config("salun", saliency_fraction=1.5)
    out = tmp_path / "o"
    assert main(["sweep", "--method", "magic", "--grid", "lr=0.1", "--out", str(out), "--no-progress"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert main(["sweep", "--method", "gd", "--grid", "lr=0.1", "momentum=x", "--out", str(out), "--no-progress"]) == 2
    assert "values must be numbers" in capsys.readouterr().err
    assert not out.exists()


def test_experiment_configs_parse(tmp_path):
    import json
    import os

    from jaxunlearn.pipeline.config import PipelineConfig

    exp = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
    for name in ("cifar10_paper.json", "cifar10_mini.json", "cifar10_mini_cpu.json"):
        cfg = PipelineConfig.from_json(os.path.join(exp, name))
        assert set(cfg.methods) == set(ALL_METHODS) - {"del"} == set(METHODS) - set(NEEDS_INIT) - {"del"} | {
            "none", "dm-direct"}  # DEL: its own configs
        for m in (m for m in ALL_METHODS if m in METHODS):
            cfg.method_config(m)
    for name in ("cifar10_baseline_grid.json", "cifar10_mini_cpu_grid.json"):
        with open(os.path.join(exp, name)) as f:
            grid = json.load(f)
        assert set(grid["grids"]) == set(METHODS) - set(NEEDS_INIT) - {"del"}
        cfg = PipelineConfig.from_json(os.path.join(exp, grid["pipeline"]))
        for m, items in grid["grids"].items():
            assert len(parse_grid(m, items, base=cfg.method_kwargs(m))) >= 6
    for name in ("del_digits_cnn_grid.json", "del_cifar10_mini_cpu_grid.json", "del_cifar10_resnet18_grid.json"):  # DEL's comparison grids
        with open(os.path.join(exp, name)) as f:
            grid = json.load(f)
        cfg = PipelineConfig.from_json(os.path.join(exp, grid["pipeline"]))
        for m in grid["methods"]:
            for loc in grid["localizations"]:
                configs = parse_grid(f"{m}@{loc}", grid["grids"][m], base=cfg.method_kwargs(f"{m}@{loc}"))
                assert configs[0].epochs == cfg.method_config(m).epochs  # the same budget as the method alone
        assert len(parse_grid("del", grid["grids"]["del"], base=cfg.method_kwargs("del"))) >= 2
    # a sweep starts from the pipeline's settings of the method; the grid overrides only what it names
    cfg = PipelineConfig(method_overrides={"dmm": {"retain_per_epoch": 512, "batch_size": 128},
                                           "gd": {"epochs": 3}})
    dmm = parse_grid("dmm", ["lr=0.01,0.05"], base=cfg.method_kwargs("dmm"))
    assert [(c.lr, c.retain_per_epoch, c.batch_size, c.epochs) for c in dmm] == [(0.01, 512, 128, 4), (0.05, 512, 128, 4)]
    assert parse_grid("gd", ["lr=0.1"], base=cfg.method_kwargs("gd"))[0].epochs == 3
    assert parse_grid("gd", ["epochs=1"], base=cfg.method_kwargs("gd"))[0].epochs == 1
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"method_overrides": {"ga": {"beta": 0.5}}}))
    with pytest.raises(JaxUnlearnError, match="ga has no hyperparameter 'beta'"):
        PipelineConfig.from_json(str(bad))
    with pytest.raises(JaxUnlearnError, match="forget_effects must be one of influence, ridge, lasso, got 'ols'"):
        PipelineConfig(forget_effects="ols").validate()
    with pytest.raises(JaxUnlearnError, match="optimizer must be one of adam, sgd"):
        PipelineConfig(method_overrides={"dmm": {"optimizer": "rmsprop"}}).validate()
    # the library defaults are the reference code's recipes (Attribute-to-Delete)
    om, dm = make_config("oracle-matching"), make_config("dmm")
    assert (om.optimizer, om.lr, om.epochs, om.batch_size, om.forget_multiplier, om.retain_multiplier) == \
        ("adam", 1e-3, 10, 512, 1, 5.0)
    assert (dm.optimizer, dm.lr, dm.epochs, dm.batch_size, dm.forget_multiplier, dm.retain_multiplier) == \
        ("adam", 1e-4, 4, 512, 5, 20.0)
    assert om.lr_decay == dm.lr_decay == 0.95 and om.weight_decay == dm.weight_decay == 0.0


def test_one_config_for_pipeline_and_sweep_and_set_overrides_any_setting(tmp_path):
    import json

    from jaxunlearn.cli import build_parser, pipeline_config
    from jaxunlearn.pipeline.demo import demo_config

    DEMO, QUICK = demo_config(), demo_config(quick=True)

    parse = build_parser().parse_args
    # the same folder is made and swept with the same config, with or without --config / --quick
    for extra in ([], ["--quick"]):
        made = pipeline_config(parse(["pipeline", "--out", "x", *extra]))
        swept = pipeline_config(parse(["sweep", "--out", "x", "--method", "ga", "--grid", "lr=0.1", *extra]))
        assert made == swept == (QUICK if extra else DEMO)
    cfg = pipeline_config(parse(["pipeline", "--out", "x", "--set", "forget_effects=lasso", "full_models=100",
                                 "methods.dmm.lr=0.02", "methods.scrub.epochs=3", "forget_sets=[\"random:5\"]"]))
    assert (cfg.forget_effects, cfg.full_models, cfg.forget_sets) == ("lasso", 100, ("random:5",))
    assert cfg.method_config("dmm").lr == 0.02 and cfg.method_config("dmm").epochs == DEMO.method_config("dmm").epochs
    assert cfg.method_config("scrub").epochs == 3
    cfg = pipeline_config(parse(["pipeline", "--out", "x", "--set", "recipe.peak_lr=0.2", "recipe.model=cnn"]))
    assert cfg.recipe["peak_lr"] == 0.2 and cfg.recipe["model"] == "cnn" and cfg.recipe["batch_size"] == 64
    cfg = pipeline_config(parse(["pipeline", "--out", "x", "--set", "recipe.epochs=20", "seed=3", "forget_sets=random:7"]))
    assert (cfg.recipe["epochs"], cfg.seed, cfg.forget_sets) == (20, 3, ("random:7",))  # a lone string is a list
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"full_models": 8, "method_overrides": {"gd": {"lr": 0.5}}}))
    cfg = pipeline_config(parse(["sweep", "--config", str(path), "--out", "x", "--method", "gd", "--grid", "lr=1",
                                 "--set", "methods.gd.epochs=5"]))
    assert cfg.full_models == 8 and cfg.method_kwargs("gd") == {"lr": 0.5, "epochs": 5}
    for bad, msg in ((["nonsense=1"], "not a pipeline setting"), (["methods.gd.warp=1"], "gd has no hyperparameter"),
                     (["forget_effects"], "write KEY=VALUE"), (["methods.dmm.optimizer=lbfgs"], "optimizer must be"),
                     (["recipe.warp=2"], "unknown fields \\['warp'\\]"), (["recipe.model=transformer"], "unknown model"),
                     (["recipe.epochs=20", "momentum=0.5"], "not a pipeline setting"),
                     (['method_overrides={"ga":{"lr":0.1}}'], "not a pipeline setting"),
                     (["influence_thresholds=2"], "expected a list"), (["full_models=abc"], "expected an integer"),
                     (["forget_sets=[random:5, cluster:40:3]"], "a list of strings is written as JSON"),
                     (["alpha=x"], "expected a number"), (["methods.dmm.lr=inf"], "finite number >= 0"),
                     (["methods.dmm.retain_multiplier=-1"], "finite number >= 0"),
                     (["methods.dmm.epochs=inf"], "must be an integer")):
        with pytest.raises(JaxUnlearnError, match=msg):
            pipeline_config(parse(["pipeline", "--out", "x", "--set", *bad]))
