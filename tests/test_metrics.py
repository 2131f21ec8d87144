import numpy as np
import pytest

from bclib.errors import DimensionMismatchError
from bclib.numerics.metrics import knn_indices, mean_cosine, neighbour_recall, probe_retention, relative_l2, roc_auc


def test_relative_l2_and_cosine_on_known_values():
    t = np.array([[3.0, 4.0], [0.0, 5.0]])
    p = np.array([[3.0, 4.0], [0.0, -5.0]])
    assert relative_l2(p, t) == pytest.approx(np.sqrt(100 / 50))
    assert mean_cosine(p, t) == pytest.approx(0.0)
    assert relative_l2(t, t) == 0.0 and mean_cosine(2 * t, t) == pytest.approx(1.0)
    with pytest.raises(DimensionMismatchError, match=r"prediction has shape \(2, 1\) but truth has \(2, 2\)"):
        relative_l2(t[:, :1], t)


def test_knn_matches_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    queries = np.array([0, 5, 299])
    got = knn_indices(x, queries, k=4, batch=2)
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    for q, row in zip(queries, got):
        sims = xn @ xn[q]
        sims[q] = -np.inf
        assert set(row) == set(np.argsort(-sims)[:4])


def test_neighbour_recall_extremes():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 16))
    assert neighbour_recall(x, x, k=10) == 1.0
    rot = np.linalg.qr(rng.normal(size=(16, 16)))[0]
    assert neighbour_recall(x @ rot, x, k=10) == 1.0  # cosine neighbours survive rotations
    assert neighbour_recall(rng.normal(size=(500, 16)), x, k=10) < 0.1


def test_roc_auc_against_pairwise_count_with_ties():
    rng = np.random.default_rng(2)
    scores = rng.integers(0, 5, 200).astype(float)
    labels = rng.random(200) < 0.4
    pos, neg = scores[labels], scores[~labels]
    brute = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (len(pos) * len(neg))
    assert roc_auc(scores, labels) == pytest.approx(brute)


def test_probe_retention_is_one_on_the_truth_and_drops_on_noise():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(2000, 10))
    labels = (z[:, 0] + 0.5 * z[:, 1] + 0.3 * rng.normal(size=2000) > 0).astype(int)
    same = probe_retention(z, z, labels)
    assert same["probe_retention"] == pytest.approx(1.0) and same["probe_auc_true"] > 0.9
    noisy = probe_retention(z + 2.0 * rng.normal(size=z.shape), z, labels)
    assert noisy["probe_retention"] < 0.9
    multi = probe_retention(z, z, np.digitize(z[:, 0], [-0.5, 0.5]))  # three classes, one-vs-rest
    assert multi["probe_retention"] == pytest.approx(1.0)


def test_probe_metrics_per_label_and_not_informative_below_the_threshold():
    from types import SimpleNamespace

    from bclib.steps.evaluate import probe_metrics

    rng = np.random.default_rng(11)
    true = rng.normal(size=(3000, 16))
    pred = true + 0.3 * rng.normal(size=true.shape)
    baseline = rng.normal(size=true.shape)
    informative = (true[:, 0] + 0.5 * true[:, 1] > 0).astype(float)
    noise = rng.integers(0, 2, size=len(true)).astype(float)  # unrelated to the vectors: AUC ~ 0.5
    partly = informative.copy()
    partly[:100] = np.nan  # entities without this label are left out of its probe
    labels = np.column_stack([informative, noise, partly])
    settings = SimpleNamespace(labels=["topic", "coin", "topic_partial"], probe_min_auc=0.6)
    out = probe_metrics(pred, true, baseline, labels, settings)
    assert out["probe_auc_true:topic"] > 0.9 and 0.9 < out["probe_retention:topic"] <= 1.01
    assert out["baseline_probe_retention:topic"] < 0.7
    assert out["probe_auc_true:coin"] < 0.6 and out["probe_not_informative:coin"] == 1.0
    assert "probe_retention:coin" not in out
    assert out["probe_retention"] == pytest.approx(np.mean([out["probe_retention:topic"],
                                                            out["probe_retention:topic_partial"]]))
    single = probe_metrics(pred, true, baseline, informative, SimpleNamespace(labels=["label"], probe_min_auc=0.6))
    assert set(single) == {"probe_auc_true", "probe_auc", "probe_retention", "baseline_probe_retention"}
