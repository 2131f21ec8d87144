"""The evaluate step: compatibility of every (source version, target space) pair.

Evaluation entities come from a hash window disjoint from the fit sample.
For the version the backfill wrote, z~_j is read back from the output
table (what consumers actually get); for other sources it is the registry
chain applied on the driver with the executors' own numpy code. Figures go
to a metrics Delta table (one append per run) and to a printed table.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from bclib.config import JobConfig
from bclib.numerics.metrics import mean_cosine, neighbour_recall, probe_retention, relative_l2
from bclib.numerics.records import chain_id, chain_records
from bclib.numerics.samples import Sample, align_samples
from bclib.numerics.transforms import apply_chain, truncate_or_pad
from bclib.steps.fit import FIT_WINDOW_END
from bclib.steps.report import format_table, write_report
from bclib.tables.delta import read_delta, require_columns, require_table, table_exists
from bclib.tables.embeddings import collect_window, hash_window, read_versions, sample_versions
from bclib.tables.metrics_table import append_metrics
from bclib.tables.registry import active_transforms

log = logging.getLogger(__name__)


@dataclass
class PairResult:
    """Metrics of one (source version, target space) pair on held-out entities."""

    source_version: int
    space_version: int
    chain_id: str
    sample_size: int
    metrics: dict[str, float]
    from_output_table: bool


@dataclass
class EvaluateResult:
    """Every pair's metrics, the run id they were written under and the report directory."""

    run_id: str
    pairs: list[PairResult] = field(default_factory=list)
    report_dir: Optional[Path] = None
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"evaluate: {len(self.pairs)} (source, space) pairs in {self.seconds:.1f}s, run {self.run_id}; "
                f"report in {self.report_dir}")


def _output_sample(spark, cfg: JobConfig, source_version: int, space: int, lo: float, hi: float) -> Optional[Sample]:
    """The backfilled z~_space rows of the evaluation window, if the output table holds them."""
    from pyspark.sql import functions as F

    if not table_exists(spark, cfg.output_location):
        return None
    df = read_delta(spark, cfg.output_location).where(
        (F.col("space_version") == F.lit(int(space))) & (F.col("source_version") == F.lit(int(source_version)))
    )
    sample = collect_window(df.select("id", "vector"), cfg.fit.salt, lo, hi, f"vector of output space {space}")
    return sample if len(sample) else None


def pair_metrics(
    pred: np.ndarray, true: np.ndarray, source: np.ndarray, settings, labels: Optional[np.ndarray] = None,
) -> dict[str, float]:
    """Every metric for one pair, transformed and untransformed (source truncated/padded)."""
    baseline = truncate_or_pad(source, true.shape[1])
    out = {
        "relative_l2": relative_l2(pred, true),
        "mean_cosine": mean_cosine(pred, true),
        "baseline_relative_l2": relative_l2(baseline, true),
        "baseline_mean_cosine": mean_cosine(baseline, true),
    }
    k = settings.neighbours_k
    if len(true) > k + 1:
        out[f"neighbour_recall_at_{k}"] = neighbour_recall(pred, true, k, settings.neighbours_sample)
        out[f"baseline_neighbour_recall_at_{k}"] = neighbour_recall(baseline, true, k, settings.neighbours_sample)
    if labels is not None:
        known = ~np.isnan(labels)
        if len(np.unique(labels[known])) >= 2 and known.sum() >= 20:
            probe = probe_retention(pred[known], true[known], labels[known])
            base = probe_retention(baseline[known], true[known], labels[known])
            out.update(probe)
            out["baseline_probe_retention"] = base["probe_retention"]
    return out


def _labels_for(spark, cfg: JobConfig, lo: float, hi: float) -> Optional[Sample]:
    """Labels of the evaluation window's entities (vectors column holds the label), if configured."""
    loc = cfg.evaluate.label_location
    if not loc:
        return None
    from pyspark.sql import functions as F

    require_table(spark, loc, "label", hint=" (evaluate.label_location); set evaluate.label_location: null "
                  "to evaluate without consumer-probe metrics")
    df = read_delta(spark, loc)
    require_columns(df, ["id", cfg.evaluate.label_column], loc)
    table = hash_window(df.select("id", F.col(cfg.evaluate.label_column).cast("long").alias("label")),
                        "id", cfg.fit.salt, lo, hi).toArrow()
    ids = table.column("id").to_numpy()
    order = np.argsort(ids)
    return Sample(ids[order], table.column("label").to_numpy()[order], np.zeros(len(ids)))


def _lookup_labels(labels: Optional[Sample], ids: np.ndarray) -> Optional[np.ndarray]:
    """Label per id as float, NaN where the label table has none."""
    if labels is None:
        return None
    out = np.full(len(ids), np.nan)
    _, in_ids, in_labels = np.intersect1d(ids, labels.ids, assume_unique=True, return_indices=True)
    out[in_ids] = labels.vectors[in_labels]
    return out


def run_evaluate(spark, cfg: JobConfig, run_id: Optional[str] = None) -> EvaluateResult:
    """Evaluate every (source, space) pair on held-out entities; write and print the figures."""
    started = time.time()
    run_id = run_id or uuid.uuid4().hex[:12]
    reads = read_versions(spark, cfg)
    versions = sorted(reads)
    salt = cfg.fit.salt
    lo = FIT_WINDOW_END
    samples, hi = sample_versions(reads, cfg.fit.salt, cfg.evaluate.sample_size, lo, cap=1.0 - FIT_WINDOW_END)
    active = active_transforms(spark, cfg.registry_location)
    labels = _labels_for(spark, cfg, lo, hi)
    results: list[PairResult] = []
    for s in versions[1:]:
        for j in [v for v in versions if v < s]:
            records = chain_records(active, versions, s, j)
            src, true = samples[s], samples[j]
            out = None
            if s == cfg.source_version and j in cfg.target_spaces:
                out = _output_sample(spark, cfg, s, j, lo, hi)
            if out is not None:
                # what consumers get: the rows the backfill wrote (restricted to entities still in the source)
                out = Sample(*(a[np.isin(out.ids, src.ids)] for a in (out.ids, out.vectors, out.hashes)))
                ids, pred, true_v, _ = align_samples(out, true)
                src_v = src.vectors[np.searchsorted(src.ids, ids)]
            else:
                ids, src_v, true_v, _ = align_samples(src, true)
                pred = apply_chain([r.transform for r in records], src_v)
            metrics = pair_metrics(pred, true_v, src_v, cfg.evaluate, _lookup_labels(labels, ids))
            results.append(PairResult(s, j, chain_id(records), len(ids), metrics, out is not None))
    append_metrics(spark, cfg.metrics_location, run_id, [
        (r.source_version, r.space_version, name, value, r.sample_size, r.chain_id)
        for r in results for name, value in sorted(r.metrics.items())
    ])
    print(format_table(results))
    report = write_report(results, cfg.evaluate.report_dir, run_id)
    log.info("evaluate: report with plots in %s", report)
    result = EvaluateResult(run_id, results, report, time.time() - started)
    log.info("evaluate: %d (source, space) pairs in %.1fs, run %s", len(results), result.seconds, run_id)
    return result
