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
from typing import Optional, Sequence

import numpy as np

from bclib.config import JobConfig
from bclib.errors import RegistryError
from bclib.numerics.metrics import RecallReference, mean_cosine, probe_retention, relative_l2
from bclib.numerics.records import chain_id, chain_records
from bclib.numerics.samples import Sample, align_samples
from bclib.numerics.transforms import apply_chain, truncate_or_pad
from bclib.steps.fit import fit_window_end
from bclib.steps.report import PairResult, format_table, write_report
from bclib.tables.delta import read_delta, require_columns, require_table, table_exists
from bclib.tables.embeddings import UNREADABLE, collect_sample, hash_window, read_embedding_version, \
    sample_versions, tolerant_counts
from bclib.tables.metrics_table import append_metrics
from bclib.tables.registry import active_transforms
from bclib.tables.lease import leased

log = logging.getLogger(__name__)


@dataclass
class EvaluateResult:
    """Every pair's metrics, the run id they were written under and the report directory."""

    run_id: str
    pairs: list[PairResult] = field(default_factory=list)
    report_dir: Optional[Path] = None
    seconds: float = 0.0
    unreadable: dict[int, str] = field(default_factory=dict)  # versions left out, and why

    # pairs of all configured versions (None: every pair was scored); `pairs` holds the scored ones
    of_pairs: Optional[int] = None

    def summary(self) -> str:
        left_out = f"; versions left out (unreadable): {sorted(self.unreadable)}" if self.unreadable else ""
        scored = (f"{len(self.pairs)} of {self.of_pairs} (source, space) pairs (those this run changed)"
                  if self.of_pairs is not None else f"{len(self.pairs)} (source, space) pairs")
        return (f"evaluate: {scored} in {self.seconds:.1f}s, run {self.run_id}; "
                f"report in {self.report_dir}{left_out}")


@dataclass
class HeldOut:
    """The evaluation window's entities on the driver: every version's sample, and labels if configured."""

    samples: dict[int, Sample]
    labels: Optional[Sample]
    window: tuple[float, float]
    delta_versions: dict[int, int]
    unreadable: dict[int, str] = field(default_factory=dict)  # version -> why it could not be sampled


def evaluation_window(cfg: JobConfig, rows: int) -> tuple[float, float]:
    """[lo, 1) of the id hash that evaluation and the gate sample from (disjoint from the fit window).

    `rows`: the smallest version's row count (sizes a `fit.holdout` given in rows).
    """
    return fit_window_end(cfg, rows), 1.0


def held_out(spark, cfg: JobConfig, versions: Optional[list[int]] = None, labels: bool = True,
             tolerate: Sequence[int] = (), sampled: Optional[Sequence[int]] = None) -> HeldOut:
    """Sample the evaluation window of `versions` (default: all configured), one scan each, plus labels.

    `sampled`: sample only these of `versions` (the window is still drawn from every version's row count, read
    from the Delta log, so a pair's figures are the same whichever pairs are scored with it).
    A version in `tolerate` whose table is missing, empty or lacks data files is left out and named in
    `HeldOut.unreadable`; for any other version that is MissingTableError, VersionTableEmptyError or
    VersionFilesMissingError."""
    wanted = sorted(versions or cfg.embeddings.versions)
    unreadable: dict[int, str] = {}
    reads = {}
    for v in wanted:
        try:
            reads[v] = read_embedding_version(spark, cfg, v)
        except UNREADABLE as exc:
            if v not in tolerate:
                raise
            unreadable[v] = f"{type(exc).__name__}: {exc}"
    counts = tolerant_counts(reads, tolerate, unreadable)  # Delta answers counts from its log
    reads = {v: reads[v] for v in counts}
    lo, cap = evaluation_window(cfg, min(counts.values()))
    if sampled is not None:
        reads = {v: r for v, r in reads.items() if v in set(sampled)}
        counts = {v: n for v, n in counts.items() if v in reads}
    samples, hi = sample_versions(reads, cfg.fit.salt, cfg.evaluate.sample_size, lo, cap=cap - lo,
                                  drop_invalid=cfg.backfill.quarantine_location is not None, tolerate=tolerate,
                                  unreadable=unreadable, counts=counts)
    for v, why in sorted(unreadable.items()):
        log.warning("evaluate: version %d left out: %s", v, why)
    label_sample = _labels_for(spark, cfg, lo, hi) if labels else None
    return HeldOut(samples, label_sample, (lo, hi), {v: r.delta_version for v, r in reads.items() if v in samples},
                   unreadable)


def _output_sample(spark, cfg: JobConfig, source_version: int, space: int, lo: float, hi: float):
    """The backfilled z~_space rows of the evaluation window and the chain ids stored on them, if any."""
    from pyspark.sql import functions as F

    if not table_exists(spark, cfg.output_location):
        return None, []
    df = read_delta(spark, cfg.output_location).where(
        (F.col("space_version") == F.lit(int(space))) & (F.col("source_version") == F.lit(int(source_version)))
    )
    window = hash_window(df.select("id", "vector", "chain_id"), "id", cfg.fit.salt, lo, hi)
    sample = collect_sample(window, column=f"vector of output space {space}")
    chains = sorted(r.chain_id for r in window.select("chain_id").distinct().collect())
    return (sample if len(sample) else None), chains


def pair_metrics(
    pred: np.ndarray, true: np.ndarray, source: np.ndarray, settings, labels: Optional[np.ndarray] = None,
    within: bool = True,
) -> dict[str, float]:
    """Every metric for one pair, transformed and untransformed (source truncated/padded).

    pred, true: (n, d_j) mapped and true vectors of the same n held-out entities; source: (n, d_k).
    `neighbour_recall_at_K` is the cross-space recall (what an old index returns for mapped queries),
    `within_space_recall_at_K` the overlap of neighbourhoods inside the mapped space with the true ones
    (skipped with `within=False`: the gate does not need it).
    """
    baseline = truncate_or_pad(source, true.shape[1])
    out = {
        "relative_l2": relative_l2(pred, true),
        "mean_cosine": mean_cosine(pred, true),
        "baseline_relative_l2": relative_l2(baseline, true),
        "baseline_mean_cosine": mean_cosine(baseline, true),
    }
    k = settings.neighbours_k
    if len(true) > k + 1:
        ref = RecallReference(true, k, settings.neighbours_sample)
        out[f"neighbour_recall_at_{k}"] = ref.cross(pred)
        out[f"baseline_neighbour_recall_at_{k}"] = ref.cross(baseline)
        if within:
            out[f"within_space_recall_at_{k}"] = ref.within(pred)
            out[f"baseline_within_space_recall_at_{k}"] = ref.within(baseline)
    if labels is not None:
        out.update(probe_metrics(pred, true, baseline, labels, settings))
    return out


def probe_metrics(pred: np.ndarray, true: np.ndarray, baseline: np.ndarray, labels: np.ndarray,
                  settings) -> dict[str, float]:
    """One consumer probe per label column: AUC on the true vectors, retention where that AUC is informative.

    labels: (n,) or (n, L) float, NaN where an entity has no label; columns named by `settings.labels`.
    Per label (suffix `:<name>` when there are several): `probe_auc_true` (the probe's AUC on the true
    z_j), and either `probe_retention` / `baseline_probe_retention` (AUC on z~_j, resp. on the untransformed
    vector, over the AUC on z_j) or, when the true AUC is below `settings.probe_min_auc` (default 0.6),
    `probe_not_informative` = 1 and no retention (a ratio of two near-chance AUCs says nothing). With
    several labels the unsuffixed `probe_retention` is the mean over the informative ones.
    """
    labels = labels.reshape(len(labels), -1)
    names = list(getattr(settings, "labels", None) or ["label"])[: labels.shape[1]]
    several = len(names) > 1
    out: dict[str, float] = {}
    kept, kept_base = [], []
    for i, name in enumerate(names):
        sfx = f":{name}" if several else ""
        col = labels[:, i]
        known = ~np.isnan(col)
        if len(np.unique(col[known])) < 2 or known.sum() < 20:
            continue
        probe = probe_retention(pred[known], true[known], col[known])
        out[f"probe_auc_true{sfx}"] = probe["probe_auc_true"]
        if probe["probe_auc_true"] < getattr(settings, "probe_min_auc", 0.6):
            out[f"probe_not_informative{sfx}"] = 1.0
            continue
        base = probe_retention(baseline[known], true[known], col[known])
        out[f"probe_auc{sfx}"] = probe["probe_auc"]
        out[f"probe_retention{sfx}"] = probe["probe_retention"]
        out[f"baseline_probe_retention{sfx}"] = base["probe_retention"]
        kept.append(probe["probe_retention"])
        kept_base.append(base["probe_retention"])
    if several and kept:
        out["probe_retention"] = float(np.mean(kept))
        out["baseline_probe_retention"] = float(np.mean(kept_base))
    return out


def chain_metrics(records, heldout: HeldOut, source: int, space: int, settings,
                  within: bool = True) -> tuple[int, dict[str, float]]:
    """A registry chain source -> space applied on the driver to the held-out entities: (n, metrics)."""
    src, true = heldout.samples[source], heldout.samples[space]
    ids, src_v, true_v, _ = align_samples(src, true)
    pred = apply_chain([r.transform for r in records], src_v)
    return len(ids), pair_metrics(pred, true_v, src_v, settings, _lookup_labels(heldout.labels, ids), within)


def _labels_for(spark, cfg: JobConfig, lo: float, hi: float) -> Optional[Sample]:
    """Labels of the evaluation window's entities, if configured: `vectors` is (n, L) float, one column per
    label in `evaluate.labels`, NaN where a label is null."""
    loc = cfg.evaluate.label_location
    if not loc:
        return None
    from pyspark.sql import functions as F

    require_table(spark, loc, "label", hint=" (evaluate.label_location); set evaluate.label_location: null "
                  "to evaluate without consumer-probe metrics")
    df = read_delta(spark, loc)
    names = cfg.evaluate.labels
    require_columns(df, ["id", *names], loc)
    cols = [F.col(c).alias(f"_label_{i}") for i, c in enumerate(names)]
    table = hash_window(df.select("id", *cols), "id", cfg.fit.salt, lo, hi).toArrow()
    ids = table.column("id").to_numpy(zero_copy_only=False)
    order = np.argsort(ids, kind="stable")
    values = np.column_stack([_label_codes(table.column(f"_label_{i}")) for i in range(len(names))]) \
        if len(ids) else np.zeros((0, len(names)))
    return Sample(ids[order], values[order], np.zeros(len(ids)))


def _label_codes(column) -> np.ndarray:
    """A label column as float: numbers as they are, anything else (strings) as category codes; NaN for null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_integer(column.type) or pa.types.is_floating(column.type) or pa.types.is_boolean(column.type):
        return pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False)
    codes = pc.cast(column.dictionary_encode().indices, pa.float64())
    return codes.to_numpy(zero_copy_only=False)


def _lookup_labels(labels: Optional[Sample], ids: np.ndarray) -> Optional[np.ndarray]:
    """Labels per id as float (n, L), NaN where the label table has none."""
    if labels is None:
        return None
    out = np.full((len(ids), labels.vectors.shape[1] if labels.vectors.ndim == 2 else 1), np.nan)
    _, in_ids, in_labels = np.intersect1d(ids, labels.ids, assume_unique=True, return_indices=True)
    out[in_ids] = labels.vectors[in_labels].reshape(len(in_labels), -1)
    return out


def report_header(cfg: JobConfig, active: dict) -> dict:
    """What the report evaluated: the config digest and the active transform of every edge."""
    from bclib.config import config_digest

    return {"config digest": config_digest(cfg), "registry": cfg.registry_location, "output": cfg.output_location,
            "transforms": [{"edge": f"{k} -> {j}", "id": r.transform_id, "kind": r.kind, "objective": r.objective,
                            "origin": r.origin} for (k, j), r in sorted(active.items(), reverse=True)]}


def all_pairs(versions: Sequence[int]) -> list[tuple[int, int]]:
    """Every (source, space) pair of `versions`: each version to each older one."""
    vs = sorted(versions)
    return [(s, j) for i, s in enumerate(vs) for j in vs[:i]]


def scored_candidates(versions: Sequence[int], target_spaces: Sequence[int]) -> list[tuple[int, int]]:
    """The pairs `run` keeps scored: (s, j) with j pinned (`target_spaces`) or one step below s. Pure."""
    vs = sorted(versions)
    step = {v: vs[i - 1] for i, v in enumerate(vs) if i}
    return [(s, j) for s, j in all_pairs(vs) if j in target_spaces or j == step[s]]


def unscored_pairs(active: dict, versions: Sequence[int], target_spaces: Sequence[int],
                   scored: set) -> list[tuple[int, int]]:
    """Candidate pairs (`scored_candidates`) whose active chain id has no evaluate rows in `scored`
    ((source, space, chain_id) triples, `metrics_table.scored_chains`): a run killed between its fit (or
    backfill) commit and its evaluate left them unscored, and the rerun, which changes nothing, scores them.
    A pair without a complete active chain is left out. Pure."""
    out = []
    for s, j in scored_candidates(versions, target_spaces):
        try:
            current = chain_id(chain_records(active, versions, s, j))
        except RegistryError:
            continue
        if (s, j, current) not in scored:
            out.append((s, j))
    return out


def changed_pairs(versions: Sequence[int], target_spaces: Sequence[int], source_version: int,
                  edges: Sequence[tuple[int, int]], written_spaces: Sequence[int]) -> list[tuple[int, int]]:
    """The pairs a run changed, for `run` to score: each pair (s, j) whose chain s -> ... -> j holds an edge of
    `edges` (fitted and activated by the run) and whose space j is pinned (`target_spaces`) or one step below s,
    plus (source_version, j) for every output space the run wrote. Pure.

    A new version N adds the pairs (N, j) for the pinned spaces and (N, N-1): the count follows the pinned
    spaces, not the square of the history; pairs whose chain and vectors did not change keep the figures
    stored in the metrics table by the run that scored them."""
    vs = sorted(versions)
    step = {v: vs[i - 1] for i, v in enumerate(vs) if i}
    changed = set(map(tuple, edges))
    out = set()
    for s, j in all_pairs(vs):
        chain = set()
        k = s
        while k != j:
            chain.add((k, step[k]))
            k = step[k]
        if chain & changed and (j in target_spaces or j == step[s]):
            out.add((s, j))
    out |= {(int(source_version), int(j)) for j in written_spaces}
    return sorted(out, reverse=True)


@leased("evaluate")
def run_evaluate(spark, cfg: JobConfig, run_id: Optional[str] = None,
                 pairs: Optional[Sequence[tuple[int, int]]] = None) -> EvaluateResult:
    """Evaluate every (source, space) pair on held-out entities (or only `pairs`, as `run` asks for the pairs
    it changed: `changed_pairs`); write and print the figures.

    For the pairs the output table holds, the vectors are read back from it (what consumers get) and
    the chain id reported is the one stored on those rows; other pairs apply the active registry chain.
    Only the versions the scored pairs need are sampled; the evaluation window is the same either way.
    """
    started = time.time()
    run_id = run_id or uuid.uuid4().hex[:12]
    wanted = None if pairs is None else {tuple(p) for p in pairs}
    sampled = None if wanted is None else sorted({v for p in wanted for v in p})
    # a version whose table is gone, empty or lacks files leaves out its pairs (named), not the whole step
    heldout = held_out(spark, cfg, tolerate=[v for v in cfg.embeddings.versions if v != cfg.source_version],
                       sampled=sampled)
    lo, hi = heldout.window
    versions = sorted(heldout.samples)
    active = active_transforms(spark, cfg.registry_location)
    results: list[PairResult] = []
    for s in versions[1:]:
        for j in [v for v in versions if v < s and (wanted is None or (s, v) in wanted)]:
            records = chain_records(active, cfg.embeddings.versions, s, j)
            src, true = heldout.samples[s], heldout.samples[j]
            out, stored_chains = None, []
            if s == cfg.source_version and j in cfg.target_spaces:
                out, stored_chains = _output_sample(spark, cfg, s, j, lo, hi)
            if out is not None:
                # what consumers get: the rows the backfill wrote (restricted to entities still in the source)
                out = out.subset(np.isin(out.ids, src.ids))
                ids, pred, true_v, _ = align_samples(out, true)
                src_v = src.vectors[np.searchsorted(src.ids, ids)]
                pair_chain = ",".join(stored_chains)
                if pair_chain != chain_id(records):
                    log.warning("evaluate: space %d of the output holds chain %s, the registry's active chain is %s "
                                "(the output is stale until the next backfill)", j, pair_chain, chain_id(records))
            else:
                ids, src_v, true_v, _ = align_samples(src, true)
                pred = apply_chain([r.transform for r in records], src_v)
                pair_chain = chain_id(records)
            metrics = pair_metrics(pred, true_v, src_v, cfg.evaluate, _lookup_labels(heldout.labels, ids))
            results.append(PairResult(s, j, pair_chain, len(ids), metrics, out is not None))
    append_metrics(spark, cfg.metrics_location, run_id, [
        (r.source_version, r.space_version, name, value, r.sample_size, r.chain_id)
        for r in results for name, value in sorted(r.metrics.items())
    ])
    print(format_table(results))
    report = write_report(results, cfg.evaluate.report_dir, run_id, report_header(cfg, active))
    log.info("evaluate: report with plots in %s", report)
    result = EvaluateResult(run_id, results, report, time.time() - started, dict(heldout.unreadable),
                            None if wanted is None else len(all_pairs(cfg.embeddings.versions)))
    log.info("evaluate: %d (source, space) pairs in %.1fs, run %s", len(results), result.seconds, run_id)
    return result
