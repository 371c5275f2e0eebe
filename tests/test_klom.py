import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics.klom import klom, klom_summary


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
