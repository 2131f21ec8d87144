"""The fit step on Spark: pin input versions, sample, fit every edge, register.

Sampling is one scan per version table with a hash filter inside the scan;
the samples meet on the driver (a sorted-id intersection), so no shuffle and
no Spark join. Edges are fitted oldest first so multi-step objectives can
use the already fitted (frozen) earlier transforms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict

import numpy as np

from bclib import __version__
from bclib.config import FitSettings, JobConfig, TransformSettings
from bclib.errors import InsufficientDataError
from bclib.fit import fit_edge
from bclib.io import Sample, VersionRead, align_samples, collect_window, read_embedding_version, window_fraction
from bclib.metrics import mean_cosine, relative_l2
from bclib.registry import TransformRecord, active_transforms, register
from bclib.transforms import Transform, truncate_or_pad

log = logging.getLogger(__name__)

FIT_WINDOW_END = 0.5  # fit samples hash in [0, 0.5); evaluation in [0.5, 1)


def read_versions(spark, cfg: JobConfig) -> dict[int, VersionRead]:
    """Every configured version, each pinned to its current Delta version."""
    return {v: read_embedding_version(spark, cfg, v) for v in sorted(cfg.embeddings.versions)}


def sample_versions(
    reads: dict[int, VersionRead], salt: str, wanted: int, lo: float, cap: float,
) -> tuple[dict[int, Sample], float]:
    """The same hash window of every version (same ids wherever present), one scan each; and the window's end."""
    smallest = min(r.df.count() for r in reads.values())  # Delta answers counts from its log
    width = window_fraction(wanted, smallest, cap=cap)
    samples = {}
    for v, read in reads.items():
        started = time.time()
        samples[v] = collect_window(read.df, salt, lo, lo + width, f"vector of version {v}")
        log.info("sample: version %d: %d rows (hash window [%.4f, %.4f)) in %.1fs",
                 v, len(samples[v]), lo, lo + width, time.time() - started)
    return samples, lo + width


def _transform_id(edge: tuple[int, int], cfg: JobConfig, inputs: dict[str, int], frozen_ids: list[str]) -> str:
    """Content id of a fit: what was fitted, how, on which data and after which frozen transforms."""
    payload = json.dumps({
        "edge": edge, "transform": asdict(cfg.transform), "fit": asdict(cfg.fit),
        "inputs": inputs, "frozen": frozen_ids, "library": __version__,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _split(hashes: np.ndarray, sample_size: int, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Take the `sample_size` lowest-hash rows; the top `holdout_fraction` of them by hash is held out."""
    order = np.argsort(hashes, kind="stable")[:sample_size]
    n_hold = max(1, int(round(len(order) * holdout_fraction)))
    return np.sort(order[:-n_hold]), np.sort(order[-n_hold:])


def fit_one_edge(
    samples: dict[int, Sample], versions: list[int], i: int, fitted: dict[int, Transform],
    transform: TransformSettings, fit: FitSettings,
) -> tuple[Transform, dict[str, float]]:
    """Fit the edge versions[i] -> versions[i-1] from driver-side samples (pure numpy/torch, no Spark).

    `fitted` holds the already fitted earlier transforms by source version
    (frozen for multi-step objectives). Returns the transform and its fit
    metrics on the held-out part of the sample.
    """
    k, prev = versions[i], versions[i - 1]
    ids, x, y, hashes = align_samples(samples[k], samples[prev])
    if len(ids) < fit.min_pairs:
        raise InsufficientDataError(
            f"edge {k} -> {prev}: only {len(ids)} sampled entities are in both versions, "
            f"need fit.min_pairs = {fit.min_pairs}"
        )
    train, hold = _split(hashes, fit.sample_size, fit.holdout_fraction)
    earlier = versions[: i - 1][::-1]  # j = k-2, ..., oldest
    # frozen chain from space k-1 to space j: B_{k-1}, ..., B_{j+1}
    frozen = [[fitted[versions[m]] for m in range(i - 1, versions.index(j), -1)] for j in earlier]
    started = time.time()
    anchors: list[np.ndarray] = []
    x_fit, y_fit = x[train], y[train]
    if transform.objective == "anchored" and earlier:
        x_fit, y_fit, anchors = _anchor_rows(ids[train], x_fit, y_fit, [samples[j] for j in earlier])
    result = fit_edge(x_fit, y_fit, transform, frozen_chains=frozen, anchors=anchors)
    seconds = time.time() - started
    pred = result.apply(x[hold])
    metrics = {
        "holdout_relative_l2": relative_l2(pred, y[hold]),
        "holdout_mean_cosine": mean_cosine(pred, y[hold]),
        "holdout_baseline_relative_l2": relative_l2(truncate_or_pad(x[hold], y.shape[1]), y[hold]),
        "train_rows": float(len(x_fit)),
        "holdout_rows": float(len(hold)),
        "fit_seconds": seconds,
    }
    log.info("fit: edge %d -> %d (%s, %s): %d train / %d holdout pairs, holdout rel. L2 %.4f "
             "(untransformed %.4f) in %.2fs", k, prev, transform.kind, transform.objective,
             len(x_fit), len(hold), metrics["holdout_relative_l2"], metrics["holdout_baseline_relative_l2"], seconds)
    return result, metrics


def run_fit(spark, cfg: JobConfig) -> list[TransformRecord]:
    """Fit B_k for every consecutive pair of configured versions and register them (one commit)."""
    started = time.time()
    reads = read_versions(spark, cfg)
    versions = sorted(reads)
    samples, _ = sample_versions(reads, cfg.fit.salt, cfg.fit.sample_size, 0.0, FIT_WINDOW_END)
    existing = active_transforms(spark, cfg.registry_location)
    records: list[TransformRecord] = []
    fitted: dict[int, TransformRecord] = {}  # by source version, the records this run will activate
    multi = cfg.transform.objective != "single_step"
    for i in range(1, len(versions)):
        k, prev = versions[i], versions[i - 1]
        edge = (k, prev)
        frozen_ids = [fitted[versions[m]].transform_id for m in range(i - 1, 0, -1)] if multi else []
        used = versions[: i + 1] if multi else [prev, k]  # the tables this edge's fit reads
        inputs = {reads[v].location: reads[v].delta_version for v in used}
        tid = _transform_id(edge, cfg, inputs, frozen_ids)
        if edge in existing and existing[edge].transform_id == tid:
            log.info("fit: edge %d -> %d up to date (transform %s), not refitted", k, prev, tid)
            fitted[k] = existing[edge]
            records.append(existing[edge])
            continue
        transform, metrics = fit_one_edge(
            samples, versions, i, {v: r.transform for v, r in fitted.items()}, cfg.transform, cfg.fit,
        )
        record = TransformRecord(
            transform_id=tid, source_version=k, target_version=prev, kind=cfg.transform.kind,
            objective=cfg.transform.objective, transform=transform,
            fit_config={"transform": asdict(cfg.transform), "fit": asdict(cfg.fit), "frozen": frozen_ids},
            sample_size=int(metrics["train_rows"]), input_delta_versions=inputs, fit_metrics=metrics,
        )
        fitted[k] = record
        records.append(record)
    register(spark, cfg.registry_location, records)
    log.info("fit: %d edge(s) done in %.1fs", len(records), time.time() - started)
    return records


def _anchor_rows(ids: np.ndarray, x: np.ndarray, y: np.ndarray, earlier: list[Sample]):
    """Restrict the training pairs to ids also present in every earlier version; return their true z_j."""
    keep = np.ones(len(ids), dtype=bool)
    for s in earlier:
        keep &= np.isin(ids, s.ids, assume_unique=True)
    kept = ids[keep]
    anchors = [s.vectors[np.searchsorted(s.ids, kept)] for s in earlier]
    log.info("fit: anchored objective on %d of %d pairs present in all earlier versions", len(kept), len(ids))
    return x[keep], y[keep], anchors

