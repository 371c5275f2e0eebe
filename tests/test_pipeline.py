"""The main job, exactly as README's first command runs it: `jaxunlearn demo`."""
import json
import os

import numpy as np
import pytest

from jaxunlearn.cli import main


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    assert main(["demo", "--out", out, "--no-progress"]) == 0
    with open(os.path.join(out, "results.json")) as f:
        return out, json.load(f)


def test_demo_writes_the_documented_results(demo):
    out, res = demo
    assert res["dataset"] == "digits"
    assert set(res["lds"]) == {"ridge", "lasso"} and res["lds"]["ridge"] > 0.1 and res["lds"]["lasso"] > 0.1
    specs = list(res["noise_floor"])
    assert len(specs) == 2 and specs[0].startswith("random:") and specs[1].startswith("cluster:")
    methods = {"none", "oracle-matching", "dm-direct", "dmm"}
    for spec in specs:
        rows = {r["method"]: r for r in res["results"] if r["forget_set"] == spec}
        assert set(rows) == methods
        for r in rows.values():
            assert set(r["klom"]) == {"forget", "retain", "val", "mean"}
            assert set(r["accuracy"]) == {"forget", "retain", "test"}
            assert 0 <= r["compute_fraction"] < 1
        assert rows["none"]["compute_fraction"] == 0 and rows["dmm"]["compute_fraction"] > 0
    png = os.path.join(out, "pareto.png")
    assert os.path.getsize(png) > 10_000 and open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_dmm_beats_doing_nothing_and_true_oracle_matching_beats_dmm(demo):
    _, res = demo
    mean = lambda spec, m: next(r["klom"]["mean"] for r in res["results"]  # noqa: E731
                                if r["forget_set"] == spec and r["method"] == m)
    for spec, floor in res["noise_floor"].items():
        print(spec, {m: round(mean(spec, m), 3) for m in ("none", "dm-direct", "dmm", "oracle-matching")},
              "noise floor", round(floor["mean"], 3))
        assert mean(spec, "dmm") < mean(spec, "none")
        assert mean(spec, "oracle-matching") < mean(spec, "dmm")
        assert mean(spec, "oracle-matching") < 1.6 * floor["mean"]  # true targets reach near the floor


def test_evaluate_command_scores_margins_against_an_oracle_run(demo, capsys):
    out, res = demo
    assert main(["evaluate", "--oracle", os.path.join(out, "oracle-random-100"),
                 "--margins", os.path.join(out, "full", "margins.npy")]) == 0
    printed = json.loads(capsys.readouterr().out)["klom"]
    none = next(r["klom"] for r in res["results"] if r["forget_set"] == "random:100" and r["method"] == "none")
    assert printed["forget"] > 1.0 and set(printed) == {"forget", "retain", "val", "mean"}
    assert printed["forget"] > none["forget"] * 0.5  # all 128 full models vs all 128 oracles: same ballpark
    assert np.load(os.path.join(out, "full", "masks.npy")).all()
    assert main(["evaluate", "--oracle", os.path.join(out, "full"), "--margins", os.path.join(out, "full", "margins.npy")]) == 2
    assert "is not an oracle run" in capsys.readouterr().err


def test_pipeline_bad_inputs(tmp_path, capsys):
    assert main(["pipeline", "--out", str(tmp_path / "o"), "--methods", "magic", "--no-progress"]) == 2
    assert "unknown method 'magic'" in capsys.readouterr().err
    assert main(["pipeline", "--out", str(tmp_path / "o"), "--forget", "random:0", "--no-progress"]) == 2
    assert "size must lie in" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
