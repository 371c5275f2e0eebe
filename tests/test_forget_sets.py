import numpy as np
import pytest

from jaxunlearn.data.forget_sets import kmeans, make_forget_set
from jaxunlearn.errors import JaxUnlearnError


def test_random_and_class_sets(digits):
    y = digits.train_labels
    a = make_forget_set("random:50", y, seed=3)
    assert a.size == 50 and np.all(np.diff(a) > 0)
    np.testing.assert_array_equal(a, make_forget_set("random:50", y, seed=3))
    assert not np.array_equal(a, make_forget_set("random:50", y, seed=4))
    c = make_forget_set("class:7", y)
    assert (y[c] == 7).all() and c.size == (y == 7).sum()


def test_cluster_sets_are_coherent_subpopulations():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 5)) * 10
    which = rng.integers(0, 4, 400)
    emb = centers[which] + rng.normal(size=(400, 5))
    labels = which % 2  # clusters 0, 2 -> label 0; 1, 3 -> label 1
    assign = kmeans(emb, 4, seed=0)
    for j in range(4):  # k-means recovers the planted clusters
        assert len(set(which[assign == j])) == 1
    f = make_forget_set("cluster:4:2", labels, emb)
    assert len(set(labels[f])) == 1 and len(set(which[f])) == 1
    np.testing.assert_array_equal(f, make_forget_set("cluster:4:2", labels, emb))


@pytest.mark.parametrize("spec,msg", [
    ("random:0", r"size must lie in \[1, "), ("random:99999", "size must lie in"),
    ("class:11", "no training point has class 11"), ("cluster:5:5", r"cluster index must lie in \[0, 5\)"),
    ("cluster:5:1", "needs embeddings"), ("bogus:1", "unknown forget set kind 'bogus'"),
    ("random:x", "expected integers"), ("random", "expected 1 numbers"),
])
def test_bad_forget_specs(digits, spec, msg):
    with pytest.raises(JaxUnlearnError, match=msg):
        make_forget_set(spec, digits.train_labels)


def test_whole_training_set_is_refused():
    with pytest.raises(JaxUnlearnError, match="whole training set"):
        make_forget_set("class:0", np.zeros(10, int))


def test_bad_embeddings_and_scores_are_refused():
    labels = np.arange(20) % 2
    emb = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(JaxUnlearnError, match="30 clusters for 20 training points"):
        make_forget_set("cluster:30:1", labels, emb)
    with pytest.raises(JaxUnlearnError, match="embeddings contain NaN"):
        make_forget_set("cluster:2:1", labels, np.where(np.eye(20, 3) > 0, np.nan, emb))
    with pytest.raises(JaxUnlearnError, match=r"embeddings must be \[20 training points, D\]"):
        make_forget_set("cluster:2:1", labels, emb[:, 0])
    with pytest.raises(JaxUnlearnError, match="memorization scores contain NaN"):
        make_forget_set("memorized:3", labels, memorization=np.full(20, np.nan))
