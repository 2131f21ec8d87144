"""Synthetic embedding versions that behave like a real model's upgrades.

Entities come from clustered latent factors. Version 0 is a linear read-out
of the latent; every later version is the previous one pushed through a
random wider linear map, plus a non-linear (tanh) component, plus noise, so
a linear backward map recovers most but not all of the old space. Each
version drops a few percent of entities and adds new ones.

Generation is per block of ids, seeded by (seed, block), so the result does
not depend on Spark's partitioning and scales to millions of rows on
executors; the Spark part (`bclib.steps.generate`) only maps blocks to rows
and writes Delta.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # settings are duck-typed: numerics never imports the config layer
    from bclib.config import DemoSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriftModel:
    """Every random parameter of the synthetic versions (small; shipped to executors)."""

    settings: DemoSettings
    centers: np.ndarray  # (clusters, latent)
    readout: np.ndarray  # (latent, d_0)
    linear_maps: tuple  # M_v: (d_{v-1}, d_v)
    nonlinear_in: tuple  # P_v: (d_{v-1}, h)
    nonlinear_out: tuple  # Q_v: (h, d_v)
    n_added_per_version: int

    @property
    def n_versions(self) -> int:
        return len(self.settings.dims)

    @property
    def pool_size(self) -> int:
        return self.settings.n_entities + (self.n_versions - 1) * self.n_added_per_version

    @property
    def n_blocks(self) -> int:
        return -(-self.pool_size // self.settings.block_rows)


def make_drift_model(settings: DemoSettings) -> DriftModel:
    """Draw the cluster centres and per-version maps from the demo seed."""
    rng = np.random.default_rng(settings.seed)
    dims, r = settings.dims, settings.latent_dim
    centers = rng.normal(0.0, 1.0, (settings.n_clusters, r)) * 1.5
    readout = rng.normal(0.0, 1.0 / np.sqrt(r), (r, dims[0]))
    lin, p_in, q_out = [], [], []
    hidden = 32
    for prev, cur in zip(dims, dims[1:]):
        lin.append(rng.normal(0.0, 1.0 / np.sqrt(prev), (prev, cur)))
        p_in.append(rng.normal(0.0, 1.5 / np.sqrt(prev), (prev, hidden)))
        q_out.append(rng.normal(0.0, 1.0 / np.sqrt(hidden), (hidden, cur)))
    n_added = int(round(settings.churn_fraction * settings.n_entities))
    return DriftModel(settings, centers, readout, tuple(lin), tuple(p_in), tuple(q_out), n_added)


def _lifecycle(model: DriftModel, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Birth and death version per id: initial ids are born at 0, added ones later; removal is geometric."""
    n0, n_add = model.settings.n_entities, max(model.n_added_per_version, 1)
    birth = np.where(ids < n0, 0, 1 + (ids - n0) // n_add)
    churn = model.settings.churn_fraction
    u = rng.random(len(ids))
    if churn > 0:
        lifetime = 1 + np.floor(np.log(np.maximum(u, 1e-300)) / np.log1p(-churn))
    else:
        lifetime = np.full(len(ids), np.inf)
    return birth, birth + lifetime


def _block_entities(model: DriftModel, block: int):
    """ids, birth, death, cluster and latent factors of every pool entity in `block`."""
    s = model.settings
    lo = block * s.block_rows
    ids = np.arange(lo, min(lo + s.block_rows, model.pool_size), dtype=np.int64)
    rng = np.random.default_rng([s.seed, block])
    birth, death = _lifecycle(model, ids, rng)
    cluster = rng.integers(0, s.n_clusters, len(ids))
    latent = model.centers[cluster] + rng.normal(0.0, 0.6, (len(ids), s.latent_dim))
    return ids, birth, death, cluster, latent, rng


def generate_block(model: DriftModel, block: int, version: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, vectors float32, cluster) of the entities of `block` alive at `version`."""
    s = model.settings
    ids, birth, death, cluster, latent, rng = _block_entities(model, block)
    z = latent @ model.readout
    z += rng.normal(0.0, s.noise, z.shape)
    for v in range(1, version + 1):
        step_rng = np.random.default_rng([s.seed, block, 1000 + v])
        m, p, q = model.linear_maps[v - 1], model.nonlinear_in[v - 1], model.nonlinear_out[v - 1]
        z = z @ m + s.nonlinear_strength * np.tanh(z @ p) @ q * np.sqrt(z.shape[1] / q.shape[0])
        z += step_rng.normal(0.0, s.noise, z.shape)
    alive = (birth <= version) & (version < death)
    return ids[alive], z[alive].astype(np.float32), cluster[alive]


def block_labels(model: DriftModel, block: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, label) for a consumer task nobody planned: a noisy linear property of the latent factors."""
    ids, _, _, cluster, latent, _ = _block_entities(model, block)
    rng = np.random.default_rng([model.settings.seed, block, 99])
    direction = np.random.default_rng([model.settings.seed, 99]).normal(size=latent.shape[1])
    score = (latent - model.centers.mean(axis=0)) @ direction / np.linalg.norm(direction)
    return ids, (score + rng.normal(0.0, 0.5, len(ids)) > 0).astype(np.int32)
