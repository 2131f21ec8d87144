"""Synthetic embedding versions that behave like a real model's upgrades.

Entities come from clustered latent factors. Version 0 is a linear read-out
of the latent; every later version is the previous one pushed through a
random wider linear map, plus a non-linear (tanh) component, plus noise, so
a linear backward map recovers most but not all of the old space. Each
version drops a few percent of entities and adds new ones.

Generation is per block of ids, seeded by (seed, block), so the result does
not depend on Spark's partitioning and scales to millions of rows on
executors; the Spark part only maps blocks to rows and writes Delta.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from bclib.config import DemoSettings, JobConfig
from bclib.errors import ConfigError

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


def check_demo_config(cfg: JobConfig) -> None:
    if len(cfg.demo.dims) != len(cfg.embeddings.versions):
        raise ConfigError(
            f"config key 'demo.dims' has {len(cfg.demo.dims)} entries but embeddings.versions has "
            f"{len(cfg.embeddings.versions)}"
        )
    if cfg.embeddings.version_column is not None:
        raise ConfigError("the demo generator writes one table per version; unset 'embeddings.version_column'")


def write_demo_versions(spark, cfg: JobConfig) -> dict[int, int]:
    """Write every configured version as a Delta table; returns rows per version."""
    import pyarrow as pa

    from bclib.io import matrix_to_list, table_exists

    check_demo_config(cfg)
    model = make_drift_model(cfg.demo)
    id_col, vec_col = cfg.embeddings.id_column, cfg.embeddings.vector_column
    counts: dict[int, int] = {}
    for index, version in enumerate(sorted(cfg.embeddings.versions)):
        location = cfg.version_location(version)
        if table_exists(spark, location) and not cfg.demo.overwrite:
            counts[version] = spark.read.format("delta").load(location).count()
            log.info("generate: version %d exists at %s (%d rows), kept", version, location, counts[version])
            continue
        started = time.time()

        def blocks_to_rows(batches, _version=index):
            for batch in batches:
                for block in batch.column(0).to_numpy():
                    ids, vectors, _ = generate_block(model, int(block), _version)
                    yield pa.RecordBatch.from_arrays([pa.array(ids), matrix_to_list(vectors)], names=[id_col, vec_col])

        n_parts = max(1, min(model.n_blocks, spark.sparkContext.defaultParallelism * 2))
        df = spark.range(0, model.n_blocks, numPartitions=n_parts).mapInArrow(
            blocks_to_rows, f"{id_col} long, {vec_col} array<float>"
        )
        df.write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(location)
        counts[version] = spark.read.format("delta").load(location).count()
        log.info(
            "generate: version %d (dim %d) -> %s: %d rows in %.1fs",
            version, cfg.demo.dims[index], location, counts[version], time.time() - started,
        )
    if cfg.evaluate.label_location:
        _write_labels(spark, cfg, model)
    return counts


def _write_labels(spark, cfg: JobConfig, model: DriftModel) -> None:
    import pyarrow as pa

    from bclib.io import is_path

    label_col = cfg.evaluate.label_column

    def blocks_to_labels(batches):
        for batch in batches:
            for block in batch.column(0).to_numpy():
                ids, labels = block_labels(model, int(block))
                yield pa.RecordBatch.from_arrays([pa.array(ids), pa.array(labels)], names=["id", label_col])

    df = spark.range(0, model.n_blocks, numPartitions=max(1, min(model.n_blocks, 4))).mapInArrow(
        blocks_to_labels, f"id long, {label_col} int")
    writer = df.write.format("delta").mode("overwrite").option("overwriteSchema", "true")
    loc = cfg.evaluate.label_location
    writer.save(loc) if is_path(loc) else writer.saveAsTable(loc)
    log.info("generate: labels for %d entities -> %s", model.pool_size, loc)

