"""The main job, exactly as README's first command runs it: `jaxunlearn demo`."""
import json
import os

import numpy as np
import pytest

from jaxunlearn.cli import main
from jaxunlearn.compile_cache import resolve_cache_dir
from jaxunlearn.data import load_digits
from jaxunlearn.metrics import klom, klom_groups, klom_summary, mia
from jaxunlearn.unlearning import ALL_METHODS


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    assert main(["demo", "--out", out, "--no-progress"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def test_demo_writes_the_documented_results(demo):
    out, res = demo
    assert res["dataset"] == "digits"
    assert set(res["lds"]) == {"influence", "ridge", "lasso"} and min(res["lds"].values()) > 0.1
    assert res["lds"]["influence"] == max(res["lds_detail"]["influence_by_threshold"].values())
    assert res["ensemble"]["unlearned"] == res["ensemble"]["eval_oracles"] == 100
    specs = list(res["noise_floor"])
    assert set(res["forget_memorization"]) == set(res["oracle_accuracy"]) == set(specs)
    # the cluster set (a coherent subpopulation) is more memorized than the random one
    assert res["forget_memorization"][specs[1]]["mean"] > res["forget_memorization"][specs[0]]["mean"]
    assert len(specs) == 2 and specs[0].startswith("random:") and specs[1].startswith("cluster:")
    for spec in specs:
        rows = {r["method"]: r for r in res["results"] if r["forget_set"] == spec}
        assert set(rows) == set(ALL_METHODS) and len(ALL_METHODS) == 12
        for r in rows.values():
            assert set(r["klom"]) == {"forget", "retain", "val", "mean"}
            assert set(r["accuracy"]) == set(r["accuracy_gap"]) == {"forget", "retain", "test"}
            assert 0 < r["tow"] <= 1
            assert set(r["mia"]) == {"auc", "tpr_at_1pct_fpr"} and 0 <= r["mia"]["auc"] <= 1
            assert 0 <= r["compute_fraction"] < 1
        assert rows["none"]["compute_fraction"] == 0 and rows["dmm"]["compute_fraction"] > 0
        # the accuracy columns from their definitions: gaps to the held-out oracles, ToW their product, and the
        # "none" row's accuracies those of full models 0..99 on their own logits
        ref = res["oracle_accuracy"][spec]
        for r in rows.values():
            assert r["accuracy_gap"] == pytest.approx({g: abs(r["accuracy"][g] - ref[g]) for g in ref}, abs=1e-12)
            assert r["tow"] == pytest.approx(np.prod([1 - v for v in r["accuracy_gap"].values()]), rel=1e-12)
        forget = np.asarray(res["forget_sets"][spec])
        correct = np.load(os.path.join(out, "full", "logits.npy"))[:100].argmax(-1) == load_digits().all_labels
        assert rows["none"]["accuracy"] == pytest.approx(
            {"forget": correct[:, forget].mean(), "retain": correct[:, np.setdiff1d(np.arange(1437), forget)].mean(),
             "test": correct[:, 1437:].mean()}, abs=1e-12)
        assert rows["dmm"]["estimator"] == rows["dm-direct"]["estimator"] == "influence"
    # the job's start-up record: the suite's cache folder is warm or cold, but the counts add up
    c = res["compile"]
    assert c["cache_dir"] == resolve_cache_dir()
    assert c["programs"] == c["compiled"] + c["cache_hits"] == sum(c["names"].values()) > 0
    png = os.path.join(out, "pareto.png")
    assert os.path.getsize(png) > 10_000 and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_dmm_beats_doing_nothing_and_true_oracle_matching_beats_dmm(demo):
    _, res = demo
    mean = lambda spec, m: next(r["klom"]["mean"] for r in res["results"]  # noqa: E731
                                if r["forget_set"] == spec and r["method"] == m)
    for spec, floor in res["noise_floor"].items():
        print(spec, {m: round(mean(spec, m), 3) for m in ("none", "dm-direct", "dmm", "oracle-matching")},
              "noise floor", round(floor["mean"], 3))
        assert mean(spec, "dmm") < mean(spec, "none") and mean(spec, "dm-direct") < mean(spec, "none")
        assert mean(spec, "oracle-matching") < mean(spec, "dmm")
        assert mean(spec, "oracle-matching") < 1.6 * floor["mean"]  # true targets reach near the floor
    # the paper's claim on the random forget set: DM-Direct near the oracle floor at zero compute
    assert mean("random:100", "dm-direct") < 1.5 * res["noise_floor"]["random:100"]["mean"]


def test_mia_cannot_tell_oracles_from_oracles_but_spots_the_full_models(demo):
    out, res = demo
    oracle = np.load(os.path.join(out, "oracle-cluster-40-3", "margins.npy"))
    full = np.load(os.path.join(out, "full", "margins.npy"))
    f_idx = np.asarray(res["forget_sets"]["cluster:40:3"])
    k2, k4 = len(oracle) // 2, len(oracle) * 3 // 4
    # Gaussians: "in" from full[k2:], "out" from oracle[:k2]; negatives oracle[k4:]; targets independent of both
    of_oracles = mia(oracle[k2:k4], oracle[k4:], full[k2:], oracle[:k2], f_idx)
    of_full = mia(full[:k2 // 2], oracle[k4:], full[k2:], oracle[:k2], f_idx)
    print("MIA AUC oracles", of_oracles, "full", of_full)
    assert abs(of_oracles["auc"] - 0.5) < 0.08
    assert of_full["auc"] > of_oracles["auc"] + 0.2
    rows = {r["method"]: r["mia"]["auc"] for r in res["results"] if r["forget_set"] == "cluster:40:3"}
    assert rows["none"] > 0.7 and rows["oracle-matching"] < rows["none"] - 0.2


def test_sweep_reuses_the_demo_ensembles_and_writes_every_grid_point(demo):
    out, res = demo
    assert main(["sweep", "--out", out, "--method", "gd", "--grid", "lr=0.005,0.05", "epochs=1,2",
                 "--forget", "random:100", "--no-progress"]) == 0
    with open(os.path.join(out, "sweep-gd.json")) as f:
        sw = json.load(f)
    # the demo's datamodel fits are reused: LDS, the forget set's effects and the memorization
    # (1 LDS file + 2 effect files + 1 memorization file)
    assert sw["lds_detail"]["cached"] and sw["lds_detail"]["forget_effects_cached"] == ["random:100"]
    assert len(os.listdir(os.path.join(out, "datamodel-fits"))) == 4
    gd = [r for r in sw["results"] if r["method"] == "gd"]
    assert [(r["config"]["lr"], r["config"]["epochs"]) for r in gd] == [(0.005, 1), (0.005, 2), (0.05, 1), (0.05, 2)]
    assert {r["method"] for r in sw["results"]} == {"gd", "none", "oracle-matching", "dmm"}
    assert gd[1]["compute_fraction"] == pytest.approx(2 * gd[0]["compute_fraction"])
    assert len({round(r["klom"]["mean"], 6) for r in gd}) == 4  # four different models
    none = next(r for r in sw["results"] if r["method"] == "none")
    assert none["klom"] == next(r["klom"] for r in res["results"] if r["forget_set"] == "random:100"
                                and r["method"] == "none")  # same ensembles, same numbers
    png = os.path.join(out, "sweep-gd.png")
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    # a grid point that blows up is recorded as diverged; the sweep goes on and plots the rest
    assert main(["sweep", "--out", out, "--method", "ga", "--grid", "lr=0.001,1e9", "--forget", "random:100",
                 "--no-progress"]) == 0
    with open(os.path.join(out, "sweep-ga.json")) as f:
        ga = [r for r in json.load(f)["results"] if r["method"] == "ga"]
    assert "diverged_models" not in ga[0] and ga[0]["klom"]["mean"] > 0
    assert ga[1]["diverged_models"] >= 1 and ga[1]["klom"] is None and ga[1]["compute_fraction"] > 0
    # one report over the pipeline's rows and both sweeps: every point, the Pareto frontier, each method's best
    assert main(["report", "--out", out]) == 0
    with open(os.path.join(out, "frontier.json")) as f:
        rep = json.load(f)
    assert rep["sources"] == ["results.json", "sweep-ga.json", "sweep-gd.json"]
    f = rep["frontier"]["random:100"]
    assert f["points"] == 12 + 2 + 4 and f["diverged_points"] == 1  # 12 methods, +2 ga, +4 gd (references deduplicated)
    pts = [r for r in rep["results"] if r["forget_set"] == "random:100" and r["klom"]]
    for front in (f["pareto"], f["pareto_without_oracle_targets"]):
        xs, ys = [r["compute_fraction"] for r in front], [r["klom"]["mean"] for r in front]
        assert xs == sorted(xs) and all(a > b for a, b in zip(ys, ys[1:]))  # cheaper-to-dearer, strictly better
        for r in pts:  # every point is matched or beaten by a frontier point at no more compute
            if front is f["pareto"] or r["method"] != "oracle-matching":
                assert any(x <= r["compute_fraction"] and y <= r["klom"]["mean"] for x, y in zip(xs, ys))
    assert all(r["method"] != "oracle-matching" for r in f["pareto_without_oracle_targets"])
    assert f["best_per_method"]["gd"]["klom"]["mean"] == min(r["klom"]["mean"] for r in pts if r["method"] == "gd")
    assert open(os.path.join(out, "frontier.png"), "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_command_scores_margins_against_an_oracle_run(demo, capsys):
    out, res = demo
    assert main(["evaluate", "--oracle", os.path.join(out, "oracle-random-100"),
                 "--margins", os.path.join(out, "full", "margins.npy")]) == 0
    printed = json.loads(capsys.readouterr().out)["klom"]
    none = next(r["klom"] for r in res["results"] if r["forget_set"] == "random:100" and r["method"] == "none")
    assert printed["forget"] > 1.0 and set(printed) == {"forget", "retain", "val", "mean"}
    assert printed["forget"] > none["forget"] * 0.5  # all 200 full models vs all 200 oracles: same ballpark
    # exactly KLoM of those margins on the oracle run's groups: forget = its F, retain = the other training
    # points, val = the test points after them
    forget = np.asarray(res["forget_sets"]["random:100"])
    oracle = np.load(os.path.join(out, "oracle-random-100", "margins.npy"))
    full = np.load(os.path.join(out, "full", "margins.npy"))
    want = klom_summary(klom(oracle, full), {"forget": forget, "retain": np.setdiff1d(np.arange(1437), forget),
                                              "val": np.arange(1437, 1797)})
    assert printed == pytest.approx(want, rel=1e-6)
    assert main(["evaluate", "--oracle", os.path.join(out, "oracle-random-100"), "--margins",
                 os.path.join(out, "full", "margins.npy"), "--klom-binning", "reference",
                 "--klom-direction", "unlearned||oracle"]) == 0  # both settings reach the computation
    ref = klom_summary(klom(oracle, full, direction="unlearned||oracle", binning="reference"),
                       klom_groups(forget, 1437, 360))
    assert json.loads(capsys.readouterr().out)["klom"] == pytest.approx(ref, rel=1e-6) and ref != want
    assert main(["evaluate", "--oracle", os.path.join(out, "oracle-random-100"), "--margins",
                 os.path.join(out, "full", "margins.npy"), "--spread-draws", "3"]) == 0
    spread = json.loads(capsys.readouterr().out)["half_sample_spread"]
    assert spread["klom"] == pytest.approx(want["mean"], rel=1e-6) and spread["draws"] == 3
    assert spread["models"] == [len(oracle) // 2, len(full) // 2] and spread["sd"] > 0
    assert np.load(os.path.join(out, "full", "masks.npy")).all()
    assert main(["evaluate", "--oracle", os.path.join(out, "full"), "--margins", os.path.join(out, "full", "margins.npy")]) == 2
    assert "is not an oracle run" in capsys.readouterr().err


def test_pipeline_bad_inputs(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path / "o"), "--methods", "magic", "--no-progress"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path / "o"), "--forget", "random:0", "--no-progress"]) == 2
    assert "size must lie in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
    assert main(["report", "--out", str(tmp_path)]) == 2
    assert "no results.json or sweep-*.json in" in capsys.readouterr().err
    assert not (tmp_path / "frontier.json").exists()


def test_oracle_matching_never_targets_a_models_own_twin():
    from jaxunlearn.pipeline.unlearn import oracle_targets

    logits = np.arange(6 * 2 * 3, dtype=np.float32).reshape(6, 2, 3)  # 6 oracles; oracle k is model k's twin
    got = np.asarray(oracle_targets(logits, 3))  # models 0..2 take oracles 0..2, each another model's
    np.testing.assert_array_equal(got, logits[[1, 2, 0]])
    np.testing.assert_array_equal(np.asarray(oracle_targets(logits, 1)), logits[:1])  # one model: only its twin
