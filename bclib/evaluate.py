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
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import numpy as np

from bclib.config import JobConfig
from bclib.fitting import FIT_WINDOW_END, read_versions, sample_versions
from bclib.io import Sample, align_samples, collect_window, is_path, read_delta, table_exists
from bclib.metrics import mean_cosine, relative_l2
from bclib.registry import active_transforms, chain_id, chain_records
from bclib.transforms import apply_chain, truncate_or_pad

log = logging.getLogger(__name__)

METRICS_DDL = (
    "run_id STRING, source_version INT, space_version INT, metric STRING, value DOUBLE, "
    "sample_size BIGINT, chain_id STRING, computed_at TIMESTAMP"
)


@dataclass
class PairResult:
    source_version: int
    space_version: int
    chain_id: str
    sample_size: int
    metrics: dict[str, float]
    from_output_table: bool


def _output_sample(spark, cfg: JobConfig, source_version: int, space: int, lo: float, hi: float) -> Optional[Sample]:
    """The backfilled z~_space rows of the evaluation window, if the output table holds them."""
    if not table_exists(spark, cfg.output_location):
        return None
    df = read_delta(spark, cfg.output_location).where(
        f"space_version = {int(space)} AND source_version = {int(source_version)}"
    )
    sample = collect_window(df.select("id", "vector"), cfg.fit.salt, lo, hi, f"vector of output space {space}")
    return sample if len(sample) else None


def pair_metrics(pred: np.ndarray, true: np.ndarray, source: np.ndarray) -> dict[str, float]:
    """Transformed and untransformed (truncated/padded) figures for one pair."""
    baseline = truncate_or_pad(source, true.shape[1])
    return {
        "relative_l2": relative_l2(pred, true),
        "mean_cosine": mean_cosine(pred, true),
        "baseline_relative_l2": relative_l2(baseline, true),
        "baseline_mean_cosine": mean_cosine(baseline, true),
    }


def run_evaluate(spark, cfg: JobConfig, run_id: Optional[str] = None) -> list[PairResult]:
    """Evaluate every (source, space) pair on held-out entities; write and print the figures."""
    started = time.time()
    run_id = run_id or uuid.uuid4().hex[:12]
    reads = read_versions(spark, cfg)
    versions = sorted(reads)
    salt = cfg.fit.salt
    lo = FIT_WINDOW_END
    samples, hi = sample_versions(reads, cfg.fit.salt, cfg.evaluate.sample_size, lo, cap=1.0 - FIT_WINDOW_END)
    active = active_transforms(spark, cfg.registry_location)
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
            metrics = pair_metrics(pred, true_v, src_v)
            results.append(PairResult(s, j, chain_id(records), len(ids), metrics, out is not None))
    write_metrics(spark, cfg, run_id, results)
    print(format_table(results))
    log.info("evaluate: %d (source, space) pairs in %.1fs, run %s", len(results), time.time() - started, run_id)
    return results


def write_metrics(spark, cfg: JobConfig, run_id: str, results: list[PairResult]) -> None:
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    rows = [
        (run_id, r.source_version, r.space_version, name, float(value), r.sample_size, r.chain_id, now)
        for r in results for name, value in sorted(r.metrics.items())
    ]
    df = spark.createDataFrame(rows, METRICS_DDL)
    writer = df.write.format("delta").mode("append")
    loc = cfg.metrics_location
    writer.save(loc) if is_path(loc) else writer.saveAsTable(loc)
    log.info("evaluate: %d metric rows appended to %s (run %s)", len(rows), loc, run_id)


def format_table(results: list[PairResult]) -> str:
    """Per (source, space): transformed vs untransformed error and cosine."""
    head = f"{'source':>6} {'space':>5} {'n':>7} {'rel_l2':>8} {'cosine':>7} {'base_l2':>8} {'base_cos':>8}  from"
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (-r.source_version, -r.space_version)):
        m = r.metrics
        lines.append(
            f"{r.source_version:>6} {r.space_version:>5} {r.sample_size:>7} {m['relative_l2']:>8.4f} "
            f"{m['mean_cosine']:>7.4f} {m['baseline_relative_l2']:>8.4f} {m['baseline_mean_cosine']:>8.4f}  "
            f"{'output table' if r.from_output_table else 'registry chain'}"
        )
    return "\n".join(lines)
