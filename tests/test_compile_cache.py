"""The persistent compilation cache of the CLI: on by default, movable, off on request; same bits."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from jaxunlearn.compile_cache import ENV, default_cache_dir, resolve_cache_dir

from conftest import REPO

SMALL = ["train", "--dataset", "digits", "--recipe", "digits-mlp", "--epochs", "2", "--models", "4", "--no-progress"]


def _train(out, *extra, env_dir=None, xla_flags=None):
    env = {k: v for k, v in os.environ.items() if k != ENV}
    if env_dir is not None:
        env[ENV] = env_dir
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    r = subprocess.run([sys.executable, "-m", "jaxunlearn", *SMALL, "--out", out, *extra], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    return np.load(os.path.join(out, "margins.npy")), json.load(open(os.path.join(out, "summary.json")))["compile"]


@pytest.mark.parametrize("devices", [1, 2])
def test_cache_cold_warm_and_off_give_bit_identical_margins(tmp_path, devices):
    """On one CPU device and on two (the CLI's default on this 2-core machine: every program split
    across both): a warm run compiles nothing (its 3 programs stored, loaded without tracing)."""
    cache = str(tmp_path / "cache")
    flags = f"--xla_force_host_platform_device_count={devices}"  # XLA's defaults, as users compile
    cold, c_cold = _train(str(tmp_path / "cold"), env_dir=cache, xla_flags=flags)
    warm, c_warm = _train(str(tmp_path / "warm"), "--compile-cache", cache, xla_flags=flags)
    off, c_off = _train(str(tmp_path / "off"), "--no-compile-cache", env_dir=cache, xla_flags=flags)
    assert cold.tobytes() == warm.tobytes() == off.tobytes()
    assert c_cold["cache_dir"] == cache and c_cold["cache_hits"] == 0 and 1 <= c_cold["compiled"] <= 3, c_cold
    assert c_warm["compiled"] == 0 and c_warm["cache_hits"] == c_warm["programs"] == c_cold["programs"], c_warm
    assert all(name.endswith("(stored)") for name in c_warm["names"]), c_warm
    assert c_off["cache_dir"] is None and c_off["cache_hits"] == 0 and c_off["compiled"] == c_cold["compiled"]
    assert json.load(open(os.path.join(tmp_path, "cold", "config.json")))["devices"] == devices
    # entries were renamed into place, JAX's and the stored programs alike
    assert not [n for _, _, files in os.walk(cache) for n in files if ".tmp-" in n]


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


def test_a_stored_program_loads_without_tracing_and_gives_the_same_bits(tmp_path):
    """compile_cache.Program: with the cache on and a spec, a new Program (as in a new process) loads
    the stored executable without tracing its function; another spec or other shapes compile anew;
    without a spec nothing is stored; a damaged entry is compiled again; inside a trace it is the plain
    jitted function."""
    import jax
    import jax.numpy as jnp

    from jaxunlearn.compile_cache import CompileCounter, Program, enable_compile_cache

    before = jax.config.jax_compilation_cache_dir
    traced = []

    def f(x, y):
        traced.append(1)
        return jnp.sin(x) @ y, x.sum()

    x, y = jnp.linspace(0, 1, 12).reshape(4, 3), jnp.ones((3, 2))
    spec = {"what": "a test program", "n": 1}
    folder = tmp_path / "cache" / "jaxunlearn" / "programs"
    enable_compile_cache(str(tmp_path / "cache"))
    try:
        first = Program(f, "probe", spec)(x, y)
        assert len(traced) == 1 and len(os.listdir(folder)) == 1
        counter = CompileCounter()
        again = Program(f, "probe", spec)(x, y)
        assert len(traced) == 1  # loaded, not traced
        snap = counter.snapshot()
        assert snap["compiled"] == 0 and snap["cache_hits"] == snap["programs"] == 1 and snap["names"] == ["probe (stored)"]
        for a, b in zip(first, again):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        Program(f, "probe", {**spec, "n": 2})(x, y)  # another spec
        Program(f, "probe", spec)(x[:2], y)  # other shapes
        assert len(traced) == 3 and len(os.listdir(folder)) == 3
        Program(f, "probe")(x, y)  # no spec: compiled, not stored
        assert len(traced) == 4 and len(os.listdir(folder)) == 3
        for name in os.listdir(folder):  # damaged entries: compiled again, and stored whole again
            (folder / name).write_bytes(b"not an executable")
        with pytest.warns(UserWarning, match="did not load"):
            third = Program(f, "probe", spec)(x, y)
        assert len(traced) == 5 and np.asarray(third[0]).tobytes() == np.asarray(first[0]).tobytes()
        p = Program(f, "probe", spec)
        p(x, y)  # the damaged entry was replaced by a whole one
        assert len(traced) == 5
        shape = jax.eval_shape(p, x, y)
        assert shape[0].shape == (4, 2)
        np.testing.assert_allclose(jax.jit(lambda a, b: p(a, b)[0])(x, y), first[0], rtol=1e-6)
        assert not [n for n in os.listdir(folder) if ".tmp-" in n]
    finally:
        enable_compile_cache(before)


def test_a_compile_option_this_xla_does_not_know_is_left_out_and_the_others_kept():
    import jax
    import jax.numpy as jnp

    from jaxunlearn.compile_cache import Program, _compile

    p = Program(lambda x: x * 2, "probe", compiler_options={"xla_cpu_no_such_option_anywhere": True})
    np.testing.assert_array_equal(p(jnp.arange(3.0)), [0.0, 2.0, 4.0])
    # the older fusion emitters give fewer fusions for threefry draws than the newer: a known option (the one
    # this process's XLA_FLAGS do not set, see conftest) is still applied
    lowered = jax.jit(lambda k: jax.random.normal(k, (64, 32)).sum(0)).lower(jax.random.key(0))
    older = re.search(r"--xla_cpu_use_fusion_emitters=(false|0)\b", os.environ.get("XLA_FLAGS", ""), re.I)
    known = {"xla_cpu_use_fusion_emitters": bool(older)}
    want = _compile(lowered, known).as_text()
    assert want != lowered.compile().as_text()
    assert _compile(lowered, {**known, "xla_cpu_no_such_option_anywhere": True}).as_text() == want


PROBE = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from jaxunlearn.compile_cache import CompileCounter, Program, enable_compile_cache
enable_compile_cache(sys.argv[1])
jax.jit(lambda x: x + 1)(jnp.ones(2))  # something compiled first: JAX has decided to use its cache
counter = CompileCounter()
spec = None if sys.argv[2] == "none" else {"variant": sys.argv[2]}
program = Program(lambda x: jnp.sin(x) @ x.T, "probe", spec)
x = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
if sys.argv[3] == "plain-first":  # the plain jitted function first (JAX's in-memory caches then hold it)
    with jax.debug_nans(True):
        program(x)
out = program(x)
print(json.dumps({"out": np.asarray(out).tolist(), "devices": len(jax.devices()), **counter.snapshot()}))
"""


def test_a_program_stored_after_jax_had_it_cached_still_runs_in_a_new_process(tmp_path):
    """JAX's cache holds the program (compiled without a spec), then a Program with a new spec stores
    it: an executable JAX read from its cache would be stored without its kernels and crash the next
    process ("Function ... not found"); the stored one must run and give the same bits."""
    cache = str(tmp_path / "cache")

    def probe(variant, first="", devices=1):
        # under XLA's defaults: the jaxlib bug this guards against is one of theirs
        env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
        r = subprocess.run([sys.executable, "-c", PROBE, cache, variant, first], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        assert "did not load" not in r.stderr and "failed to run" not in r.stderr, r.stderr[-2000:]
        return json.loads(r.stdout.strip().splitlines()[-1])

    plain = probe("none")  # compiled and written to JAX's cache only
    assert plain["compiled"] == 1 and not os.path.exists(os.path.join(cache, "jaxunlearn", "programs"))
    stored = probe("b")  # our store misses, JAX's would hit: compiled afresh and stored
    assert stored["compiled"] == 1 and stored["cache_hits"] == 0
    loaded = probe("b")
    assert loaded["names"] == ["probe (stored)"] and loaded["compiled"] == 0
    assert loaded["out"] == stored["out"] == plain["out"]
    # the plain jitted function first (a JAX cache hit, kept in JAX's in-memory caches), then stored
    probe("c", "plain-first")
    assert probe("c")["names"] == ["probe (stored)"]
    # two devices, a program on one of them (uncommitted inputs): loaded onto that one again
    stored2 = probe("d", devices=2)
    loaded2 = probe("d", devices=2)
    assert stored2["devices"] == loaded2["devices"] == 2 and loaded2["names"] == ["probe (stored)"]
    assert loaded2["out"] == plain["out"]
