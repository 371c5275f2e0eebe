import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxunlearn.cli import main
from jaxunlearn.training.recipe import RECIPES, load_recipe

from conftest import REPO, xla_flags

TRAIN = ["train", "--dataset", "digits", "--recipe", "digits-cnn", "--epochs", "3", "--models", "8", "--chunk", "2",
         "--no-progress"]


def _cli(*args):
    return subprocess.Popen([sys.executable, "-m", "jaxunlearn", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ref") / "run")
    assert main([*TRAIN, "--out", out]) == 0
    return out


def test_run_folder_contents(reference_run):
    cfg = json.load(open(os.path.join(reference_run, "config.json")))
    masks = np.load(os.path.join(reference_run, "masks.npy"))
    margins = np.load(os.path.join(reference_run, "margins.npy"))
    logits = np.load(os.path.join(reference_run, "logits.npy"))
    acc = json.load(open(os.path.join(reference_run, "accuracy.json")))
    assert masks.shape == (8, 1437) and masks.dtype == bool and (masks.sum(1) == 718).all()
    assert margins.shape == (8, 1437 + 360) and margins.dtype == np.float32
    assert logits.shape == (8, 1797, 10)
    assert len(acc["test"]) == 8 and min(acc["test"]) > 0.8
    assert cfg["run"]["recipe"]["model"] == "cnn" and cfg["chunk_resolved"] == 2
    assert cfg["flat_optimizer"] is False  # the optimizer on the parameter tree: a CPU's layout
    assert sorted(os.listdir(os.path.join(reference_run, "chunks"))) == [f"{i:05d}" for i in range(4)]
    # margin = correct logit - logsumexp(other logits), train points first
    from jaxunlearn.data import load_digits
    y = load_digits().all_labels
    z = logits[3, 1500]
    others = np.delete(z, y[1500])
    assert np.isclose(margins[3, 1500], z[y[1500]] - np.log(np.exp(others).sum()), atol=1e-4)
    # a model scores higher margins on points it trained on
    n = masks.shape[1]
    assert (margins[:, :n][masks].mean() > margins[:, :n][~masks].mean())


def test_kill_and_resume_gives_bit_identical_margins(reference_run, tmp_path):
    out = str(tmp_path / "run")
    proc = _cli(*TRAIN, "--out", out)
    first = os.path.join(out, "chunks", "00000")
    deadline = time.time() + 120
    while not os.path.isdir(first) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_at_kill = [n for n in os.listdir(os.path.join(out, "chunks")) if not n.startswith(".")]
    assert 1 <= len(done_at_kill) < 4, done_at_kill  # killed in the middle
    assert not os.path.exists(os.path.join(out, "margins.npy"))
    proc = _cli(*TRAIN, "--out", out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    for name in ("margins.npy", "logits.npy", "masks.npy"):
        a, b = np.load(os.path.join(out, name)), np.load(os.path.join(reference_run, name))
        assert a.tobytes() == b.tobytes(), name


def test_half_written_chunk_is_never_taken_as_finished(reference_run, tmp_path):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    chunks = os.path.join(out, "chunks")
    for c in ("00002", "00003"):
        shutil.rmtree(os.path.join(chunks, c))
    os.makedirs(os.path.join(chunks, ".tmp-00002", "ckpt"))  # what a kill during a save leaves
    np.save(os.path.join(out, "margins.npy"), np.zeros(3))
    assert main([*TRAIN, "--out", out]) == 0
    assert not os.path.exists(os.path.join(chunks, ".tmp-00002"))
    assert sorted(os.listdir(chunks)) == [f"{i:05d}" for i in range(4)]
    a, b = np.load(os.path.join(out, "margins.npy")), np.load(os.path.join(reference_run, "margins.npy"))
    assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("stored", [True, None])
def test_a_resume_keeps_the_optimizer_formulation_the_run_stored(reference_run, tmp_path, monkeypatch, stored):
    """config.json's ``flat_optimizer`` (True: as a run created on a GPU stores it; absent: a run from before it
    existed, trained on the parameter tree) decides the optimizer of every chunk a resume trains, whatever this
    machine's own layout; both formulations give the reference run's margins."""
    import jaxunlearn.training.run as run_module

    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    for c in ("00002", "00003"):
        shutil.rmtree(os.path.join(out, "chunks", c))
    os.remove(os.path.join(out, "margins.npy"))
    path = os.path.join(out, "config.json")
    cfg = json.load(open(path))
    if stored is None:
        del cfg["flat_optimizer"]
    else:
        cfg["flat_optimizer"] = stored
    json.dump(cfg, open(path, "w"), indent=2)
    asked, make_trainer = [], run_module.make_trainer

    def recording_make_trainer(*args, **kwargs):  # the library's own, with the formulation it was asked for noted
        asked.append(kwargs.get("flat_optimizer"))
        return make_trainer(*args, **kwargs)

    monkeypatch.setattr(run_module, "make_trainer", recording_make_trainer)
    assert main([*TRAIN, "--out", out]) == 0
    assert asked == [bool(stored)]
    assert json.load(open(path)).get("flat_optimizer") == stored  # the run's record is left as it was
    a, b = np.load(os.path.join(out, "margins.npy")), np.load(os.path.join(reference_run, "margins.npy"))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_chunk_checkpoint_restores_the_models(reference_run):
    import jax
    import jax.numpy as jnp
    from jaxunlearn.data import load_digits
    from jaxunlearn.training import load_chunk_variables
    from jaxunlearn.training.step import make_trainer

    ds = load_digits()
    v = load_chunk_variables(reference_run, 1)
    tr = make_trainer(RECIPES["digits-cnn"].with_epochs(3), 10, ds.image_shape, ds.mean, ds.std, 12)
    first = jax.tree.map(lambda t: jnp.asarray(t[0]), v)  # model 2 = first model of chunk 1
    logits = jax.jit(tr.logits)(first["params"], first["batch_stats"], jnp.asarray(ds.all_images))
    np.testing.assert_allclose(logits, np.load(os.path.join(reference_run, "logits.npy"))[2], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--dataset", "mnist"], "unknown data set 'mnist'"),
    (["--model", "transformer"], "unknown model 'transformer'"),
    (["--alpha", "0"], r"--alpha must lie in \(0, 1\], got 0.0"),
    (["--alpha", "1.5"], r"--alpha must lie in \(0, 1\], got 1.5"),
    (["--models", "0"], "--models must be >= 1, got 0"),
    (["--chunk", "0"], "--chunk must be >= 1, got 0"),
    (["--vmap-width", "0"], "--vmap-width must be >= 1, got 0"),
    (["--dataset", "cifar10", "--data-dir", "."], "is not a CIFAR-10 python archive"),
    (["--recipe", "nope"], "unknown recipe 'nope'"),
    (["--forget-idx", "1,2,99999"], r"forget set has indices out of range \[0, 1437\)"),
    (["--forget-idx", ""], "forget set is empty"),
    (["--epochs", "0"], "epochs must be >= 1"),
    (["--batch-size", "100000"], r"batch size 100000 is larger than a model.s training set \(71\d points at alpha 0.5\)"),
])
def test_bad_inputs_give_one_clear_line_and_no_output(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["train", "--out", str(out), "--no-progress", *args]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("recipe: ")]
    assert len(err) == 1 and err[0].startswith("jaxunlearn: error: ")
    import re
    assert re.search(message, err[0]), err[0]
    assert not out.exists()


def test_bad_files_and_out_paths_give_one_clear_line(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("not a folder")
    junk = tmp_path / "junk.npy"
    junk.write_text("not an array")
    np.save(tmp_path / "two_d.npy", np.arange(6).reshape(2, 3))
    (tmp_path / "neg_lr.json").write_text(json.dumps({**RECIPES["digits-mlp"].to_dict(), "peak_lr": -1}))
    (tmp_path / "broken.json").write_text("{\"epochs\": ")
    cases = [
        (["train", "--out", str(afile / "sub")], "cannot create --out folder"),
        (["train", "--out", str(tmp_path / "o"), "--forget-idx", str(junk)], "is not a readable .npy array"),
        (["train", "--out", str(tmp_path / "o"), "--forget-idx", str(tmp_path / "two_d.npy")],
         r"forget set must be a 1-D array of indices, got shape \(2, 3\)"),
        (["train", "--out", str(tmp_path / "o"), "--recipe", str(tmp_path / "neg_lr.json")],
         "peak_lr must be a finite number >= 0, got -1"),
        (["train", "--out", str(tmp_path / "o"), "--recipe", str(tmp_path / "broken.json")], "cannot read recipe"),
        (["pipeline", "--out", str(afile)], "exists and is not a folder"),
        (["pipeline", "--out", str(tmp_path / "o"), "--set", "lds_points=-5"], "lds_points must be an integer >= 1"),
        (["pipeline", "--out", str(tmp_path / "o"), "--set", "recipe.peak_lr=-1"], "peak_lr must be a finite number"),
        (["report", "--out", str(afile)], "is not a folder"),
    ]
    for argv, message in cases:
        assert main([*argv, "--no-progress"] if argv[0] != "report" else argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()  # (train prints the recipe it uses first)
        assert err[-1].startswith("jaxunlearn: error: ") and sum("error" in line for line in err) == 1, (argv, err)
        import re
        assert re.search(message, err[-1]), (argv, err[-1])
        assert not (tmp_path / "o").exists() and afile.read_text() == "not a folder"


def test_train_command_builds_oracles_and_alpha_subsets_as_asked(tmp_path, capsys):
    base = ["train", "--dataset", "digits", "--recipe", "digits-mlp", "--models", "2", "--epochs", "1", "--no-progress"]
    oracle = tmp_path / "oracle"
    assert main([*base, "--forget-idx", "1,5,9", "--out", str(oracle)]) == 0
    masks = np.load(oracle / "masks.npy")
    assert masks.shape == (2, 1437) and not masks[:, [1, 5, 9]].any() and (masks.sum(1) == 1434).all()
    assert json.load(open(oracle / "config.json"))["run"]["forget"] == [1, 5, 9]
    capsys.readouterr()
    assert main(["evaluate", "--oracle", str(oracle), "--margins", str(oracle / "margins.npy")]) == 0
    assert set(json.loads(capsys.readouterr().out)["klom"]) == {"forget", "retain", "val", "mean"}
    subsets = {}
    for seed in ("4", "5"):
        out = tmp_path / f"alpha-{seed}"
        assert main([*base, "--alpha", "0.3", "--seed", seed, "--out", str(out)]) == 0
        subsets[seed] = np.load(out / "masks.npy")
        assert (subsets[seed].sum(1) == round(0.3 * 1437)).all()  # each model: round(α·n) points
        assert (subsets[seed][0] != subsets[seed][1]).any()  # models draw their own subsets
    assert (subsets["4"] != subsets["5"]).any()  # and the seed moves them


def test_a_run_that_diverges_leaves_nothing_behind(tmp_path, capsys):
    out = tmp_path / "run"
    (tmp_path / "huge_lr.json").write_text(json.dumps({**RECIPES["digits-mlp"].to_dict(), "peak_lr": 1e30}))
    argv = ["train", "--dataset", "digits", "--models", "2", "--epochs", "1", "--out", str(out), "--no-progress"]
    assert main([*argv, "--recipe", str(tmp_path / "huge_lr.json")]) == 2
    assert "training diverged" in capsys.readouterr().err
    assert not out.exists()  # so the same --out takes the corrected recipe
    assert main([*argv, "--recipe", "digits-mlp"]) == 0


def test_a_diverged_run_is_removed_only_when_nothing_else_is_in_it(tmp_path):
    from jaxunlearn.training.run import _drop_untrained_run

    mine = {"run": {"models": 2}, "format": 1}
    out, chunks = tmp_path / "run", tmp_path / "run" / "chunks"

    def make(config):
        chunks.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config))
        np.save(out / "masks.npy", np.ones((2, 3), bool))

    make(mine)
    (chunks / ".tmp-00001-other").mkdir()  # another process is writing a chunk of this run
    _drop_untrained_run(str(out), str(chunks), True, mine)
    assert (out / "config.json").exists() and (chunks / ".tmp-00001-other").exists()
    (chunks / ".tmp-00001-other").rmdir()
    make({"run": {"models": 3}, "format": 1})  # config.json is not this process's run
    _drop_untrained_run(str(out), str(chunks), True, mine)
    assert (out / "config.json").exists() and (out / "masks.npy").exists() and chunks.exists()
    make(mine)  # nothing but what this process wrote: all of it goes, the folder too
    _drop_untrained_run(str(out), str(chunks), True, mine)
    assert not out.exists()


def test_out_folder_with_a_different_run_is_refused_untouched(reference_run, tmp_path, capsys):
    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    before = {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    argv = [a if a != "3" else "5" for a in TRAIN]  # --epochs 5
    assert main([*argv, "--out", out]) == 2
    assert "holds a run with a different config (differs in: recipe)" in capsys.readouterr().err
    assert before == {f: os.path.getmtime(os.path.join(out, f)) for f in os.listdir(out)}
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    assert main([*TRAIN, "--out", str(other)]) == 2
    assert "is not empty and holds no jaxunlearn run" in capsys.readouterr().err
    assert os.listdir(other) == ["notes.txt"]


def test_unknown_cli_option_is_one_line():
    proc = _cli("train", "--out", "x", "--bogus")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 2 and err.strip().count("\n") == 0 and "unrecognized arguments: --bogus" in err


def test_experiment_recipes_match_the_builtins():
    for name, recipe in RECIPES.items():
        assert load_recipe(os.path.join(REPO, "experiments", "recipes", f"{name}.json")) == recipe
    paper = RECIPES["cifar10-resnet9"]
    assert (paper.model, paper.epochs, paper.batch_size, paper.peak_lr, paper.peak_epoch, paper.momentum,
            paper.weight_decay) == ("resnet9", 24, 512, 0.4, 5, 0.9, 5e-4)


# --- run folders that check themselves: checksums of every chunk and of the assembled files ---

def _flip_byte(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))


def _largest_file(folder):
    files = [os.path.join(root, f) for root, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def test_damaged_chunks_are_refused_then_retrained_bit_identically(reference_run, tmp_path, capsys):
    from jaxunlearn.data import load_digits
    from jaxunlearn.errors import JaxUnlearnError
    from jaxunlearn.training import load_chunk_variables, load_run
    from jaxunlearn.training.run import assemble_run

    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    chunks = os.path.join(out, "chunks")
    assert json.load(open(os.path.join(chunks, "00002", "checksums.json")))["outputs.npz"]
    _flip_byte(os.path.join(chunks, "00002", "outputs.npz"))
    with pytest.raises(JaxUnlearnError, match=r"chunk 00002 of .* is damaged \(outputs.npz: checksum mismatch\); "
                                              r"re-run the same `jaxunlearn train` command to re-train it"):
        load_run(out)
    # a flipped byte inside the orbax data restores silently (wrong weights); the checksums catch it
    ckpt_file = _largest_file(os.path.join(chunks, "00001", "ckpt"))
    _flip_byte(ckpt_file)
    rel = os.path.relpath(ckpt_file, os.path.join(chunks, "00001"))
    # load_run reads outputs, not weights: it checks every chunk but the checkpoints, which are
    # verified when loaded (a 5,000-model ResNet-9 run holds ~130 GB of them)
    with pytest.raises(JaxUnlearnError, match=r"chunk 00002 of .* is damaged \(outputs.npz"):
        load_run(out)
    for load in (lambda: load_chunk_variables(out, 1), lambda: assemble_run(out, load_digits())):
        with pytest.raises(JaxUnlearnError, match=rf"chunk 00001 of .* is damaged \({rel}: checksum mismatch\)"):
            load()
    capsys.readouterr()

    assert main([*TRAIN, "--out", out]) == 0  # what the error message says to do
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines() == [
        "recipe: digits-cnn epochs=3",  # train names the recipe it uses, then reports the damage
        f"chunk 00001 of {out} is damaged ({rel}: checksum mismatch); re-training it",
        f"chunk 00002 of {out} is damaged (outputs.npz: checksum mismatch); re-training it"]
    assert "(4 now)" in captured.out  # exactly the two damaged chunks of 2 models were re-trained
    run, ref = load_run(out), load_run(reference_run)
    for name in ("margins", "logits", "masks"):
        assert np.array_equal(run[name], ref[name]) and run[name].tobytes() == ref[name].tobytes(), name
    import jax
    restored, original = load_chunk_variables(out, 1), load_chunk_variables(reference_run, 1)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, restored, original)))


def test_chunks_from_before_checksums_are_adopted_not_retrained(reference_run, tmp_path, capsys):
    from jaxunlearn.training import load_run

    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    for c in ("00000", "00003"):
        os.remove(os.path.join(out, "chunks", c, "checksums.json"))
    os.remove(os.path.join(out, "checksums.json"))
    capsys.readouterr()
    assert main([*TRAIN, "--out", out]) == 0
    captured = capsys.readouterr()
    assert "2 chunk(s) of" in captured.err and "had no checksums; recorded them now" in captured.err
    assert "(0 now)" in captured.out and "damaged" not in captured.err
    assert np.array_equal(load_run(out)["margins"], load_run(reference_run)["margins"])


def test_rerunning_a_finished_run_rewrites_nothing(reference_run, tmp_path, capsys):
    """A finished, intact run is checked, not assembled again: a job-array worker checking it once more
    must not rewrite files another process may be reading."""
    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    files = ("margins.npy", "logits.npy", "checksums.json", "summary.json", "accuracy.json")
    before = {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in files}
    time.sleep(0.01)
    capsys.readouterr()
    assert main([*TRAIN, "--out", out]) == 0
    assert "(0 now)" in capsys.readouterr().out
    assert {f: os.stat(os.path.join(out, f)).st_mtime_ns for f in files} == before


def test_chunks_that_kept_only_logits_are_assembled_from_them(reference_run, tmp_path, capsys):
    """Chunks written before chunks kept their margins (outputs.npz: logits and model ids only) are
    assembled from their logits, not re-trained."""
    from jaxunlearn.training import load_run
    from jaxunlearn.training.run import CHECKSUMS, file_digests
    from jaxunlearn.utils import write_json_atomic

    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    folder = os.path.join(out, "chunks", "00001")
    with np.load(os.path.join(folder, "outputs.npz")) as z:
        assert {"logits", "margins", "correct", "model_ids"} <= set(z.files)
        np.savez(os.path.join(folder, "outputs.npz"), logits=z["logits"], model_ids=z["model_ids"])
    write_json_atomic(os.path.join(folder, CHECKSUMS), file_digests(folder))
    os.remove(os.path.join(out, "margins.npy"))
    capsys.readouterr()
    assert main([*TRAIN, "--out", out]) == 0
    assert "(0 now)" in capsys.readouterr().out
    run, ref = load_run(out), load_run(reference_run)
    assert run["logits"].tobytes() == ref["logits"].tobytes()
    np.testing.assert_allclose(run["margins"], ref["margins"], rtol=1e-6, atol=1e-6)
    acc, ref_acc = (json.load(open(os.path.join(f, "accuracy.json"))) for f in (out, reference_run))
    assert acc == ref_acc


def test_damaged_assembled_files_are_refused_then_rebuilt_without_training(reference_run, tmp_path, capsys):
    from jaxunlearn.errors import JaxUnlearnError
    from jaxunlearn.training import load_run

    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    _flip_byte(os.path.join(out, "margins.npy"))
    with pytest.raises(JaxUnlearnError, match=r"the results of .* are damaged \(margins.npy: checksum mismatch\); "
                                              r"re-run the same `jaxunlearn train` command to rebuild them"):
        load_run(out)
    _flip_byte(os.path.join(out, "masks.npy"))
    os.remove(os.path.join(out, "checksums.json"))  # e.g. killed while assembling
    with pytest.raises(JaxUnlearnError, match=r"the results of .* are damaged \(no checksums.json\)"):
        load_run(out)
    capsys.readouterr()
    assert main([*TRAIN, "--out", out]) == 0
    captured = capsys.readouterr()
    assert captured.err == "recipe: digits-cnn epochs=3\n" and "(0 now)" in captured.out  # nothing but the recipe
    for name in ("margins.npy", "logits.npy", "masks.npy"):
        assert open(os.path.join(out, name), "rb").read() == open(os.path.join(reference_run, name), "rb").read()
    load_run(out)


def test_checkpoint_that_fails_to_restore_gives_one_clear_error(reference_run, tmp_path):
    from jaxunlearn.errors import JaxUnlearnError
    from jaxunlearn.training import load_chunk_variables
    from jaxunlearn.training.run import file_digests, verify_folder

    out = str(tmp_path / "run")
    shutil.copytree(reference_run, out)
    chunk = os.path.join(out, "chunks", "00003")
    data = _largest_file(os.path.join(chunk, "ckpt"))
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    with open(os.path.join(chunk, "checksums.json"), "w") as f:
        json.dump(file_digests(chunk), f)  # damage the checksums cannot see: orbax's own error is wrapped
    assert verify_folder(chunk) is None
    with pytest.raises(JaxUnlearnError, match=r"chunk 00003 of .* is damaged \(checkpoint does not restore: .*\); "
                                              r"re-run the same `jaxunlearn train` command to re-train it"):
        load_chunk_variables(out, 3)
    with pytest.raises(JaxUnlearnError, match=r"chunk 00007 of .* is damaged \(missing\)"):
        load_chunk_variables(out, 7)


def test_two_workers_on_one_folder_give_the_single_process_run(reference_run, tmp_path, capsys):
    from jaxunlearn.training import load_run

    out = str(tmp_path / "run")
    procs = [_cli(*TRAIN, "--out", out, "--worker", f"{i}/2") for i in range(2)]  # a job array of 2, at once
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for i, (stdout, _) in enumerate(outputs):  # each trained its own 2 chunks of 2 models, no more
        assert f"worker {i}/2: trained 4 models" in stdout or "(4 now)" in stdout, stdout
    for c in range(4):  # chunk c was written by worker c % 2: no chunk twice, none missing
        meta = json.load(open(os.path.join(out, "chunks", f"{c:05d}", "meta.json")))
        assert meta["models"] == [2 * c, 2 * c + 1]
    assert not [n for n in os.listdir(os.path.join(out, "chunks")) if n.startswith(".")]
    run, ref = load_run(out), load_run(reference_run)
    for name in ("margins", "logits", "masks"):
        assert run[name].tobytes() == ref[name].tobytes(), name
    # a worker killed before its last chunk: --assemble names what is missing, re-running the worker finishes
    shutil.rmtree(os.path.join(out, "chunks", "00003"))
    capsys.readouterr()
    assert main([*TRAIN, "--out", out, "--assemble"]) == 2
    assert "is missing 1 of 4 chunks (00003); run (or re-run) the workers" in capsys.readouterr().err
    assert main([*TRAIN, "--out", out, "--worker", "1/2"]) == 0
    assert "(2 now)" in capsys.readouterr().out  # only the missing chunk, then the run is assembled
    assert load_run(out)["margins"].tobytes() == ref["margins"].tobytes()
    for bad in ("2/2", "x", "1/0"):
        assert main([*TRAIN, "--out", out, "--worker", bad]) == 2
        assert "--worker" in capsys.readouterr().err


def _two_device_cli(args):
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    return subprocess.run([sys.executable, "-m", "jaxunlearn", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


LOAD_MODELS = """
import sys, jax, numpy as np
from jaxunlearn.pipeline.unlearn import load_models
v = load_models(sys.argv[1])
np.save(sys.argv[2], np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(v)]))
print(len(jax.devices()))
"""


def test_two_local_devices_share_each_chunk_bit_identically(reference_run, tmp_path):
    """6 models in chunks of 4 split across 2 (host-platform) devices, 2 vmapped models each, the
    reference's layout (im2col, 2 at a time): the same margins as the one-device reference run in
    chunks of 2. The checkpoints (a full chunk and a padded short one) load the same on 1 device and
    on 2: they record no devices."""
    from jaxunlearn.pipeline.unlearn import load_models
    from jaxunlearn.training import load_run

    out = str(tmp_path / "run")
    args = [*TRAIN, "--out", out, "--conv-impl", "im2col", "--vmap-width", "2"]
    args[args.index("--chunk") + 1] = "4"
    args[args.index("--models") + 1] = "6"
    r = _two_device_cli(args)
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["devices"], cfg["chunk_resolved"], cfg["vmap_width_resolved"]) == (2, 4, 2)
    assert load_run(out)["margins"].tobytes() == load_run(reference_run)["margins"][:6].tobytes()
    one = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(load_models(out))])
    script = tmp_path / "load.py"
    script.write_text(LOAD_MODELS)
    env = {**os.environ, "XLA_FLAGS": xla_flags(2)}
    r = subprocess.run([sys.executable, str(script), out, str(tmp_path / "two.npy")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and r.stdout.split()[-1] == "2", r.stderr[-2000:]
    assert np.load(tmp_path / "two.npy").tobytes() == one.tobytes()
    r = _two_device_cli([*TRAIN, "--out", out, "--devices", "3"])
    assert r.returncode == 2 and "--devices must lie in [1, 2]" in r.stderr


def test_a_worker_keeps_the_layout_the_run_was_created_with(reference_run, tmp_path):
    """Worker 0/2 creates the run on one device (im2col, 2 vmapped); worker 1/2 has 2 devices, whose own
    default would be another conv formulation, 1 model per device: it trains its chunks in the stored
    layout instead (a chunk of 2 at width 2 stays on one device), so the run equals the reference."""
    from jaxunlearn.training import load_run
    from jaxunlearn.training.strategy import default_strategy

    assert default_strategy("cnn", "cpu", 2, 2).conv_impl != "im2col"  # what worker 1 would pick alone
    out = str(tmp_path / "run")
    assert main([*TRAIN, "--out", out, "--worker", "0/2"]) == 0
    r = _two_device_cli([*TRAIN, "--out", out, "--worker", "1/2"])
    assert r.returncode == 0, r.stderr[-2000:]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert (cfg["conv_impl"], cfg["vmap_width_resolved"], cfg["devices"]) == ("im2col", 2, 1)
    assert load_run(out)["margins"].tobytes() == load_run(reference_run)["margins"].tobytes()


def test_short_last_chunk_is_padded_into_the_same_program(reference_run, tmp_path):
    """5 models in chunks of 2: the last chunk (1 model) runs padded in the 2-model program, its padding
    dropped; every model is bit-identical to the 8-model reference run's."""
    from jaxunlearn.training import load_run

    out = str(tmp_path / "run")
    args = [a if a != "8" else "5" for a in TRAIN]
    assert main([*args, "--out", out]) == 0
    run, ref = load_run(out), load_run(reference_run)
    assert run["margins"].shape == (5, 1797)
    assert run["margins"].tobytes() == ref["margins"][:5].tobytes()
    assert json.load(open(os.path.join(out, "chunks", "00002", "meta.json")))["models"] == [4]
    summary = json.load(open(os.path.join(out, "summary.json")))
    # programs this call needed beyond those already in memory: never one for the short chunk's shape
    # (compiled or read from the suite's cache folder, which the CLI took from JAXUNLEARN_CACHE_DIR)
    assert summary["compile"]["programs"] <= 5, summary["compile"]
    names = [n.replace(" (stored)", "").replace("jit(", "").rstrip(")") for n in summary["compile"]["names"]]
    # each of the run's three programs once (stored or compiled): a second shape for the short chunk would
    # add another "epoch"
    assert sorted(names) == ["epoch", "init_models", "outputs"], names
    assert summary["compile"]["cache_dir"] == os.environ["JAXUNLEARN_CACHE_DIR"], summary["compile"]


def test_recipe_follows_the_model_and_is_named():
    from jaxunlearn.cli import build_parser, run_config_from_args

    def cfg_of(*extra):
        args = build_parser().parse_args(["train", "--dataset", "digits", "--out", "x", *extra])
        return run_config_from_args(args)[0].recipe, args.recipe_used

    assert cfg_of("--model", "cnn") == (RECIPES["digits-cnn"], "digits-cnn")
    assert cfg_of() == (RECIPES["digits-mlp"], "digits-mlp")
    recipe, used = cfg_of("--model", "cnn", "--recipe", "digits-mlp", "--epochs", "4")
    assert recipe.model == "cnn" and recipe.peak_lr == RECIPES["digits-mlp"].peak_lr
    assert used == "digits-mlp model=cnn epochs=4"
    assert cfg_of("--model", "resnet9")[1] == "digits-mlp model=resnet9"  # no digits-resnet9: said so
