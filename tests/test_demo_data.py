import numpy as np
import pytest

from bclib.config import DemoSettings
from bclib.numerics.synthetic import generate_block, make_drift_model
from bclib.numerics.closed_form import fit_linear
from bclib.numerics.metrics import relative_l2
from bclib.numerics.transforms import truncate_or_pad

SETTINGS = DemoSettings(n_entities=4000, dims=[16, 20, 24, 28, 32], block_rows=512, latent_dim=8, n_clusters=5)


def _version(model, v):
    parts = [generate_block(model, b, v) for b in range(model.n_blocks)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def test_blocks_are_deterministic_and_dimensions_follow_the_config():
    a, b = make_drift_model(SETTINGS), make_drift_model(SETTINGS)
    for v, dim in enumerate(SETTINGS.dims):
        ids1, x1, _ = generate_block(a, 3, v)
        ids2, x2, _ = generate_block(b, 3, v)
        np.testing.assert_array_equal(ids1, ids2)
        np.testing.assert_array_equal(x1, x2)
        assert x1.shape[1] == dim and x1.dtype == np.float32


def test_entities_are_added_and_removed_per_version():
    model = make_drift_model(SETTINGS)
    ids = [set(_version(model, v)[0].tolist()) for v in range(5)]
    assert len(ids[0]) == SETTINGS.n_entities
    for prev, cur in zip(ids, ids[1:]):
        removed, added = len(prev - cur) / len(prev), len(cur - prev) / len(prev)
        assert 0.01 < removed < 0.06 and 0.01 < added < 0.06


def test_drift_is_mostly_but_not_exactly_linear():
    model = make_drift_model(SETTINGS)
    ids0, z0 = _version(model, 0)
    ids1, z1 = _version(model, 1)
    common, i0, i1 = np.intersect1d(ids0, ids1, return_indices=True)
    x, y = z1[i1], z0[i0]
    err = relative_l2(fit_linear(x, y).apply(x), y)
    assert 0.005 < err < 0.2  # linear recovers most, not all
    assert relative_l2(truncate_or_pad(x, y.shape[1]), y) > 0.8  # raw vectors are incompatible


def test_vectors_are_clustered():
    model = make_drift_model(SETTINGS)
    _, z, cluster = generate_block(model, 0, 0)
    centroid = np.stack([z[cluster == c].mean(0) for c in range(SETTINGS.n_clusters) if (cluster == c).any()])
    within = np.mean([np.linalg.norm(z[cluster == c] - z[cluster == c].mean(0), axis=1).mean()
                      for c in range(SETTINGS.n_clusters) if (cluster == c).sum() > 1])
    between = np.linalg.norm(centroid[:, None] - centroid[None], axis=2)
    assert within < np.median(between[np.triu_indices(len(centroid), 1)])
