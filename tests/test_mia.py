"""The likelihood-ratio membership inference attack."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from jaxunlearn.errors import JaxUnlearnError
from jaxunlearn.metrics import mia, roc_auc, tpr_at_fpr


def test_auc_and_tpr_match_their_definitions():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 400).round(1), rng.normal(0, 1, 600).round(1)  # rounding makes ties
    assert roc_auc(pos, neg) == pytest.approx(roc_auc_score(np.r_[np.ones(400), np.zeros(600)], np.r_[pos, neg]))
    assert roc_auc(neg, neg) == pytest.approx(0.5)
    assert tpr_at_fpr(pos, neg, 0.01) == pytest.approx(np.mean(pos > np.sort(neg)[-7]))


def test_lira_tells_members_from_non_members_and_not_oracles_from_oracles():
    rng = np.random.default_rng(1)
    p = 300
    mu_in, mu_out = rng.normal(3, 1, p), rng.normal(0, 1, p)  # per-point "trained on it" / "not" margins
    draw = lambda mu, k: mu + rng.normal(0, 1, (k, p))  # noqa: E731
    ins, outs, heldout = draw(mu_in, 32), draw(mu_out, 32), draw(mu_out, 32)
    pts = np.arange(p)
    oracle_like = mia(draw(mu_out, 32), heldout, ins, outs, pts)
    member = mia(draw(mu_in, 32), heldout, ins, outs, pts)
    halfway = mia(draw(0.5 * (mu_in + mu_out), 32), heldout, ins, outs, pts)
    assert abs(oracle_like["auc"] - 0.5) < 0.03 and oracle_like["tpr_at_1pct_fpr"] < 0.03
    assert member["auc"] > 0.95 and member["tpr_at_1pct_fpr"] > 0.5
    assert 0.6 < halfway["auc"] < member["auc"]


def test_mia_rejects_bad_input():
    a = np.zeros((4, 10), np.float32)
    with pytest.raises(JaxUnlearnError, match="no points"):
        mia(a, a, a, a, np.array([], int))
    with pytest.raises(JaxUnlearnError, match="out of range"):
        mia(a, a, a, a, np.array([10]))
    with pytest.raises(JaxUnlearnError, match="NaN"):
        mia(a.copy() * np.nan, a, a, a, np.arange(3))
    with pytest.raises(JaxUnlearnError, match=r"MIA: every margins array must be \[models, 10\]"):
        mia(a, a[:, :5], a, a, np.arange(3))
    with pytest.raises(JaxUnlearnError, match="need at least 2 reference models"):
        mia(a, a, a[:1], a, np.arange(3))
