import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics.klom import binned_kl, klom, klom_groups, klom_half_sample_spread, klom_summary
from jaxunlearn.metrics.margins import margins_from_logits


def _reference(p, q, bins=20, eps=1e-5, clip=100.0):
    """Point-by-point numpy/scipy KL(p || q) with shared bins (independent of our vectorised code)."""
    out = []
    for j in range(p.shape[1]):
        a, b = np.clip(p[:, j], -clip, clip), np.clip(q[:, j], -clip, clip)
        lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
        hi = hi if hi > lo else lo + 1
        edges = np.linspace(lo, hi, bins + 1)
        hp = np.histogram(a, edges)[0] / len(a)
        hq = np.histogram(b, edges)[0] / len(b)
        hq = np.where(hp > 0, np.maximum(hq, eps), hq)
        out.append(stats.entropy(hp, hq))
    return np.array(out)


def test_klom_of_identical_sets_is_zero_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(64, 30))
    assert np.abs(np.asarray(klom(a, a))).max() < 1e-6
    shifts = [0.0, 0.5, 1.0, 2.0, 4.0]
    b = rng.normal(size=(64, 30))
    vals = [float(np.mean(klom(a, b + s))) for s in shifts]
    assert all(x < y for x, y in zip(vals, vals[1:])), vals
    assert vals[-1] > 5


def test_klom_matches_point_by_point_reference():
    rng = np.random.default_rng(1)
    p = rng.normal(size=(40, 25)) * 3
    q = rng.normal(size=(32, 25)) * 2 + 1
    q[:, 0] = 500.0  # clipping at ±100
    ours = np.asarray(klom(p, q))
    np.testing.assert_allclose(ours, _reference(p, q), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(klom(p, q, direction="unlearned||oracle")), _reference(q, p),
                               rtol=1e-4, atol=1e-5)


def test_klom_summary_and_errors():
    per = np.arange(100, dtype=float)
    s = klom_summary(per, {"forget": np.arange(10), "retain": np.arange(10, 90), "val": np.arange(90, 100)})
    assert s["forget"] == pytest.approx(np.percentile(np.arange(10), 95))
    assert s["mean"] == pytest.approx((s["forget"] + s["retain"] + s["val"]) / 3)
    with pytest.raises(JaxUnlearnError, match="oracle margins cover 3 points, unlearned 4"):
        klom(jnp.zeros((5, 3)), jnp.zeros((5, 4)))
    with pytest.raises(JaxUnlearnError, match="NaN"):
        klom(jnp.zeros((5, 3)), jnp.full((5, 3), jnp.nan))
    with pytest.raises(JaxUnlearnError, match="NaN"):  # the public per-point function too
        binned_kl(jnp.zeros((5, 3)), jnp.full((5, 3), jnp.nan))
    # ...which still runs inside a user's jit / vmap (values cannot be checked there; shapes and bins are)
    p = jnp.asarray(np.random.default_rng(0).normal(size=(6, 4)), jnp.float32)
    direct = np.asarray(binned_kl(p, p + 1.0))
    np.testing.assert_allclose(np.asarray(jax.jit(lambda a: binned_kl(a, a + 1.0))(p)), direct, rtol=1e-6)
    per_point = jax.vmap(lambda col: binned_kl(col[:, None], col[:, None] + 1.0, eps=jnp.float32(1e-5)), 1)(p)
    np.testing.assert_allclose(np.asarray(per_point)[:, 0], direct, rtol=1e-6)
    with pytest.raises(JaxUnlearnError, match="need at least one model on each side, got 0 oracle"):
        klom(jnp.zeros((0, 3)), jnp.zeros((5, 3)))
    for kw, msg in [({"bins": 0}, "bins must be a positive integer"), ({"eps": 0.0}, "eps must be a finite number > 0"),
                    ({"clip": -1.0}, "clip must be a finite number > 0")]:
        with pytest.raises(JaxUnlearnError, match=msg):
            klom(jnp.zeros((5, 3)), jnp.zeros((5, 3)), **kw)
    g = klom_groups(np.array([1, 3]), 5, 2)  # points: 5 training, then 2 test
    assert {k: v.tolist() for k, v in g.items()} == {"forget": [1, 3], "retain": [0, 2, 4], "val": [5, 6]}
    with pytest.raises(JaxUnlearnError, match="out of range"):  # a test index is not a forget point
        klom_groups(np.array([3, 12]), 10, 5)
    with pytest.raises(JaxUnlearnError, match="forget set is empty"):
        klom_groups(np.array([], int), 10, 5)
    with pytest.raises(JaxUnlearnError, match=r"labels must be integers in \[0, 3\)"):
        margins_from_logits(jnp.zeros((2, 4, 3)), jnp.array([0, 1, 2, 3]))
    with pytest.raises(JaxUnlearnError, match=r"logits must be \[..., n, C\] and labels \[n\], got \(2, 4, 3\) and \(5,\)"):
        margins_from_logits(jnp.zeros((2, 4, 3)), jnp.array([0, 1, 2, 0, 1]))


# --- the benchmark's own binning, on real margins -------------------------------------------------

def _benchmark_transcription(p_arr, q_arr, bins=20, eps=1e-5, clip=100.0, drop_max=True):
    """data-unlearning-bench's compute_binned_KL_div for one point, in NumPy/SciPy (our transcription of
    its logic): np.linspace edges over the pooled clipped range, np.digitize, only indices 1..bins
    counted, scipy.stats.entropy. drop_max=False counts the pooled maximum in the last bin (our
    default binning), everything else the same."""
    p_arr, q_arr = np.clip(p_arr, -clip, clip), np.clip(q_arr, -clip, clip)
    start, end = min(p_arr.min(), q_arr.min()), max(p_arr.max(), q_arr.max())
    if start >= end:
        end = start + 1
    edges = np.linspace(start, end, bins + 1)
    ip, iq = np.digitize(p_arr, edges), np.digitize(q_arr, edges)
    if not drop_max:
        ip, iq = np.minimum(ip, bins), np.minimum(iq, bins)
    cp = np.array([np.sum(ip == i) for i in range(1, bins + 1)])
    cq = np.array([np.sum(iq == i) for i in range(1, bins + 1)])
    hp = cp / cp.sum() if cp.sum() > 0 else np.zeros(bins)
    hq = cq / cq.sum() if cq.sum() > 0 else np.zeros(bins)
    with np.errstate(invalid="ignore"):
        return stats.entropy(hp, np.where(hp > 0, np.maximum(hq, eps), hq))


@pytest.fixture(scope="module")
def real_margins(tmp_path_factory, digits):
    """Margins f32[16, train + test] of two halves of a 32-model digits MLP ensemble on random halves
    of the data (2 epochs; trained here, on the real data)."""
    from jaxunlearn.training.recipe import load_recipe
    from jaxunlearn.training.run import RunConfig, train_run

    recipe = dataclasses.replace(load_recipe("digits-mlp"), epochs=2, peak_epoch=1)
    folder = str(tmp_path_factory.mktemp("run"))
    train_run(RunConfig("digits", 32, recipe, seed=3, chunk=32), digits, folder, log=lambda s: None)
    margins = np.load(os.path.join(folder, "margins.npy"))
    return margins[:16], margins[16:]


@pytest.mark.parametrize("direction", ["oracle||unlearned", "unlearned||oracle"])
def test_reference_binning_equals_the_benchmark_code_on_real_margins(real_margins, direction):
    oracle, unlearned = real_margins
    assert oracle.dtype == np.float32 and oracle.shape == unlearned.shape
    oracle = oracle.copy()
    oracle[:, 5] = np.float32(250.0)  # a point whose oracle margins all clip at +100 (ties at the pooled max)
    oracle[:8, 6] = np.float32(-300.0)  # ties at the pooled min (kept by both binnings)
    p, q = (oracle, unlearned) if direction == "oracle||unlearned" else (unlearned, oracle)
    theirs = np.array([_benchmark_transcription(p[:, j], q[:, j]) for j in range(p.shape[1])])
    inclusive = np.array([_benchmark_transcription(p[:, j], q[:, j], drop_max=False) for j in range(p.shape[1])])
    ours_ref = klom(oracle, unlearned, direction=direction, binning="reference")
    ours_inc = np.asarray(klom(oracle, unlearned, direction=direction))
    assert ours_ref.dtype == np.float64
    nan = np.isnan(theirs)
    assert np.array_equal(nan, np.isnan(ours_ref))
    assert nan[5] == (direction == "oracle||unlearned")  # every oracle sample dropped: no distribution
    np.testing.assert_allclose(ours_ref[~nan], theirs[~nan], rtol=0, atol=1e-6)
    # our default binning keeps the max; same KL otherwise (float32 arithmetic: 2e-5)
    np.testing.assert_allclose(ours_inc, inclusive, rtol=0, atol=2e-5)
    # the two binnings really differ: dropping the max moves many points
    differ = np.abs(ours_inc - np.where(nan, 0, theirs)) > 1e-3
    assert differ.sum() > 10, differ.sum()


def test_klom_rejects_unknown_binning():
    with pytest.raises(JaxUnlearnError, match="unknown binning 'digitize'"):
        klom(jnp.zeros((5, 3)), jnp.zeros((5, 3)), binning="digitize")
    with pytest.raises(JaxUnlearnError, match="unknown direction"):
        klom(jnp.zeros((5, 3)), jnp.zeros((5, 3)), direction="q||p")


def test_pipeline_config_takes_the_klom_settings():
    from jaxunlearn.pipeline.config import PipelineConfig

    cfg = PipelineConfig().with_overrides(["klom_binning=reference", "klom_direction=unlearned||oracle"])
    assert (cfg.klom_binning, cfg.klom_direction) == ("reference", "unlearned||oracle")
    with pytest.raises(JaxUnlearnError, match="klom_binning must be one of inclusive, reference"):
        PipelineConfig().with_overrides(["klom_binning=digitize"])


def test_half_sample_spread_on_real_margins(real_margins):
    o, u = real_margins  # 16 and 16 digits-MLP models
    groups = klom_groups(np.arange(100), 1437, 360)
    res = klom_half_sample_spread(o, u, groups, draws=6, seed=1)
    assert res["klom"] == pytest.approx(klom_summary(klom(o, u), groups)["mean"], rel=1e-6)
    assert res["models"] == [8, 8] and res["draws"] == 6
    rng = np.random.default_rng(1)  # the same draws by hand: half of each side, without replacement
    values = [klom_summary(klom(o[np.sort(rng.permutation(16)[:8])], u[np.sort(rng.permutation(16)[:8])]),
                           groups)["mean"] for _ in range(6)]
    assert res["sd"] == pytest.approx(np.std(values, ddof=1), rel=1e-6) and res["sd"] > 0
    assert (res["min"], res["max"], res["half_mean"]) == pytest.approx((min(values), max(values), np.mean(values)))
    # the documented caution: with half the models a binned KL is larger, so only the spread compares
    assert res["half_mean"] > res["klom"]
    assert klom_half_sample_spread(o, u, groups, draws=6, seed=1) == res
    assert klom_half_sample_spread(o, u, groups, draws=6, seed=2)["sd"] != res["sd"]
    ref = klom_half_sample_spread(o, u, groups, draws=3, binning="reference", direction="unlearned||oracle")
    assert ref["klom"] == pytest.approx(klom_summary(klom(o, u, direction="unlearned||oracle", binning="reference"),
                                                     groups)["mean"], rel=1e-6)
    with pytest.raises(JaxUnlearnError, match="at least 4 models on each side, got 3 oracle"):
        klom_half_sample_spread(o[:3], u, groups)
    with pytest.raises(JaxUnlearnError, match="draws must be an integer >= 2, got 1"):
        klom_half_sample_spread(o, u, groups, draws=1)
