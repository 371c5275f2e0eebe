"""Scale-out beyond training: unlearning over local devices, and the pipeline as a job array."""
import json
import os
import subprocess
import sys

import numpy as np

from conftest import xla_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

UNLEARN = """
import sys, jax, jax.numpy as jnp, numpy as np
from jaxunlearn.data import load_digits
from jaxunlearn.training import RECIPES, EnsembleFns, make_trainer, train_ensemble
from jaxunlearn.training.subsets import steps_per_epoch
from jaxunlearn.unlearning import UnlearnData, get_method, make_config, parse_grid, unlearn_ensemble, unlearn_grid
d = load_digits(); K = 4
recipe = RECIPES["digits-mlp"].with_epochs(2)
masks = np.ones((K, d.n_train), bool)
tr = make_trainer(recipe, 10, d.image_shape, d.mean, d.std, steps_per_epoch(masks, 64))
states, _ = train_ensemble(tr, jnp.asarray(d.train_images), jnp.asarray(d.train_labels), masks, np.arange(K), 0, 2,
                           fns=EnsembleFns(tr, K, K, jax.devices()[:1]))
data = UnlearnData(jnp.asarray(d.train_images), jnp.asarray(d.train_labels), tr.apply_images)
F = np.arange(0, 40, 2); R = np.setdiff1d(np.arange(d.n_train), F)
keys = jax.random.split(jax.random.key(1), K)
m = get_method("neggrad+@del")
p, _, c = unlearn_ensemble(m.fn, states.params, states.batch_stats, data, F, R, None, keys,
                           make_config("neggrad+@del", epochs=1, lr=0.01), vmap_width=2)
grid = unlearn_grid(m.fn, states.params, states.batch_stats, data, F, R, None, keys,
                    parse_grid("neggrad+@del", ["lr=0.01,0.03"], {"epochs": 1}), vmap_width=2)
leaves = jax.tree.leaves((p, c, grid))
np.save(sys.argv[1], np.concatenate([np.asarray(x, np.float32).ravel() for x in leaves]))
print(len(jax.devices()))
"""


def test_unlearning_on_two_devices_is_bit_identical_to_one(tmp_path):
    """K models split across 2 (host-platform) devices, each running the same per-device layout
    (groups of 2 vmapped models) as the 1-device run: the same bits, for one config and a grid.
    (With a different layout, e.g. all 4 vmapped on one device against 2 per device, XLA may
    block the batched matmuls differently: differences of ~1 ulp, 6e-8 here.)"""
    script = tmp_path / "unlearn.py"
    script.write_text(UNLEARN)
    outs = []
    for n in (1, 2):
        env = {**os.environ, "XLA_FLAGS": xla_flags(n)}
        out = tmp_path / f"out{n}.npy"
        r = subprocess.run([sys.executable, str(script), str(out)], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert r.stdout.strip().splitlines()[-1] == str(n)
        outs.append(np.load(out))
    assert outs[0].tobytes() == outs[1].tobytes()


def _pipeline(args, cwd=REPO, env=None):
    return subprocess.Popen([sys.executable, "-m", "jaxunlearn", "pipeline", "--no-progress", *args], cwd=cwd,
                            env=env or os.environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_pipeline_as_a_job_array_equals_one_process(tmp_path):
    """Two `pipeline --worker I/2` processes started together on one folder, then `pipeline`: the
    same ensembles and the same results as one process."""
    sets = ["--set", "datamodel_models=20", "full_models=4", "chunk=2", "epochs=2", 'forget_sets=["random:20"]',
            'methods=["none","gd"]', "methods.gd.epochs=1", "methods.gd.retain_per_epoch=256"]
    one, arr = str(tmp_path / "one"), str(tmp_path / "array")
    said = []
    # the single process first: it fills the suite's compile cache, so the two workers (started together,
    # racing for the same chunks) load its programs instead of compiling them twice more
    for group in ([["--out", one]], [["--out", arr, "--worker", f"{i}/2"] for i in range(2)]):
        procs = [_pipeline([*args, *sets]) for args in group]
        for p in procs:
            out, err = p.communicate(timeout=900)
            assert p.returncode == 0, err[-2000:]
            said.append(out)
    assert any("every ensemble is complete" in s for s in said[1:])  # the last worker to finish sees it
    assert not os.path.exists(os.path.join(arr, "results.json"))  # workers only train
    final = _pipeline(["--out", arr, *sets])
    out, err = final.communicate(timeout=900)
    assert final.returncode == 0, err[-2000:]
    for run in ("datamodels", "full", "oracle-random-20"):
        for f in ("masks.npy", "margins.npy"):
            a = np.load(os.path.join(one, run, f))
            b = np.load(os.path.join(arr, run, f))
            assert a.tobytes() == b.tobytes(), (run, f)
    with open(os.path.join(one, "results.json")) as f:
        ra = json.load(f)["results"]
    with open(os.path.join(arr, "results.json")) as f:
        rb = json.load(f)["results"]
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb)
    bad = _pipeline(["--out", arr, "--worker", "2/2", *sets])
    _, err = bad.communicate(timeout=300)
    assert bad.returncode == 2 and "need 0 <= I < N" in err

