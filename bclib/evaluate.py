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
from pathlib import Path
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Optional

import numpy as np

from bclib.config import JobConfig
from bclib.fitting import FIT_WINDOW_END, read_versions, sample_versions
from bclib.io import Sample, align_samples, collect_window, is_path, read_delta, table_exists
from bclib.metrics import mean_cosine, neighbour_recall, probe_retention, relative_l2
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

    from bclib.io import hash_window, require_columns, require_table

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
    write_metrics(spark, cfg, run_id, results)
    print(format_table(results))
    report = write_report(results, cfg.evaluate.report_dir, run_id)
    log.info("evaluate: report with plots in %s", report)
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


def _neighbour_key(results: list[PairResult]) -> Optional[str]:
    """The neighbour-recall metric's name (it carries K), if any pair has it."""
    return next((k for r in results for k in r.metrics if k.startswith("neighbour_recall_at_")), None)


def format_table(results: list[PairResult]) -> str:
    """Per (source, space): transformed vs untransformed (base) figures."""
    nn_key = _neighbour_key(results)
    has_probe = any("probe_retention" in r.metrics for r in results)
    cols = [("rel_l2", "relative_l2"), ("base_l2", "baseline_relative_l2"),
            ("cosine", "mean_cosine"), ("base_cos", "baseline_mean_cosine")]
    if nn_key:
        cols += [(f"nn@{nn_key.rsplit('_', 1)[1]}", nn_key), ("base_nn", f"baseline_{nn_key}")]
    if has_probe:
        cols += [("probe", "probe_retention"), ("base_prb", "baseline_probe_retention")]
    head = f"{'source':>6} {'space':>5} {'n':>7} " + " ".join(f"{c:>8}" for c, _ in cols) + "  from"
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (-r.source_version, -r.space_version)):
        vals = " ".join(f"{r.metrics[k]:>8.4f}" if k in r.metrics else f"{'-':>8}" for _, k in cols)
        lines.append(f"{r.source_version:>6} {r.space_version:>5} {r.sample_size:>7} {vals}  "
                     f"{'output table' if r.from_output_table else 'registry chain'}")
    return "\n".join(lines)


def write_report(results: list[PairResult], report_dir: str, run_id: str) -> Path:
    """report.md with the table and compat.png: error, neighbour recall and probe retention per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(report_dir) / run_id
    out.mkdir(parents=True, exist_ok=True)
    versions = sorted({r.source_version for r in results} | {r.space_version for r in results})
    idx = {v: i for i, v in enumerate(versions)}
    panels = [("relative_l2", "relative L2 error (lower is better)")]
    nn_key = _neighbour_key(results)
    if nn_key:
        panels.append((nn_key, nn_key.replace("_", " ")))
    if any("probe_retention" in r.metrics for r in results):
        panels.append(("probe_retention", "consumer probe AUC retention"))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 8), squeeze=False)
    for col, (key, title) in enumerate(panels):
        for row, prefix in enumerate(("", "baseline_")):
            grid = np.full((len(versions), len(versions)), np.nan)
            for r in results:
                if prefix + key in r.metrics:
                    grid[idx[r.source_version], idx[r.space_version]] = r.metrics[prefix + key]
            ax = axes[row][col]
            im = ax.imshow(grid, cmap="viridis_r" if key == "relative_l2" else "viridis")
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                            bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
            ax.set_xticks(range(len(versions)), versions)
            ax.set_yticks(range(len(versions)), versions)
            ax.set_xlabel("target space j")
            ax.set_ylabel("source version k")
            ax.set_title(("bcemb: " if not prefix else "untransformed: ") + title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "compat.png", dpi=110)
    plt.close(fig)
    (out / "report.md").write_text(
        f"# bcemb compatibility report, run {run_id}\n\n![compatibility](compat.png)\n\n```\n"
        f"{format_table(results)}\n```\n"
    )
    return out
