"""The persistent compilation cache of the CLI: on by default, movable, off on request; same bits."""
import json
import os
import subprocess
import sys

import numpy as np

from jaxunlearn.compile_cache import ENV, default_cache_dir, resolve_cache_dir

from conftest import REPO

SMALL = ["train", "--dataset", "digits", "--recipe", "digits-mlp", "--epochs", "2", "--models", "4", "--no-progress"]


def _train(out, *extra, env_dir=None):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_dir is not None:
        env[ENV] = env_dir
    r = subprocess.run([sys.executable, "-m", "jaxunlearn", *SMALL, "--out", out, *extra], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(os.path.join(out, "margins.npy")), json.load(open(os.path.join(out, "summary.json")))["compile"]


def test_cache_cold_warm_and_off_give_bit_identical_margins(tmp_path):
    cache = str(tmp_path / "cache")
    cold, c_cold = _train(str(tmp_path / "cold"), env_dir=cache)
    warm, c_warm = _train(str(tmp_path / "warm"), "--compile-cache", cache)
    off, c_off = _train(str(tmp_path / "off"), "--no-compile-cache", env_dir=cache)
    assert cold.tobytes() == warm.tobytes() == off.tobytes()
    assert c_cold["cache_dir"] == cache and c_cold["cache_hits"] == 0 and 1 <= c_cold["compiled"] <= 6, c_cold
    assert c_warm["compiled"] == 0 and c_warm["cache_hits"] == c_warm["programs"] == c_cold["programs"], c_warm
    assert c_off["cache_dir"] is None and c_off["cache_hits"] == 0 and c_off["compiled"] == c_cold["compiled"]
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]  # entries were renamed into place


def test_cache_folder_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert resolve_cache_dir() == default_cache_dir() == str(tmp_path / "xdg" / "jaxunlearn" / "jax")
    monkeypatch.setenv(ENV, str(tmp_path / "env"))
    assert resolve_cache_dir() == str(tmp_path / "env")
    assert resolve_cache_dir(str(tmp_path / "flag")) == str(tmp_path / "flag")  # the flag beats the environment
    assert resolve_cache_dir(str(tmp_path / "flag"), disabled=True) is None
    assert resolve_cache_dir("off") is None
    monkeypatch.setenv(ENV, "off")
    assert resolve_cache_dir() is None


def test_unwritable_cache_folder_is_one_clear_error(tmp_path, capsys):
    from jaxunlearn.cli import main

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main([*SMALL, "--out", str(tmp_path / "o"), "--compile-cache", str(blocker / "jax")]) == 2
    assert "compile cache folder" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_a_remembered_value_is_computed_once_per_key_and_always_when_the_cache_is_off(tmp_path):
    import jax

    from jaxunlearn.compile_cache import enable_compile_cache, remembered

    before = jax.config.jax_compilation_cache_dir
    calls = []

    def compute():
        calls.append(1)
        return {"state": 123, "step": 456}

    enable_compile_cache(str(tmp_path / "cache"))
    try:
        assert remembered("memory-estimate", {"a": 1}, compute) == {"state": 123, "step": 456}
        assert remembered("memory-estimate", {"a": 1}, compute) == {"state": 123, "step": 456}
        assert len(calls) == 1  # the second came from the folder
        remembered("memory-estimate", {"a": 2}, compute)  # another key: computed
        assert len(calls) == 2
        files = os.listdir(tmp_path / "cache" / "jaxunlearn")
        assert len(files) == 2 and all(f.startswith("memory-estimate-") for f in files)
        enable_compile_cache(None)
        remembered("memory-estimate", {"a": 1}, compute)
        assert len(calls) == 3  # cache off: computed every time
    finally:
        enable_compile_cache(before)
