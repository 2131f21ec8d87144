"""The fit step: fit the edges that have no active transform (or that someone asked to refit), register them.

Edges are published, then frozen: an active transform stays active until someone decides otherwise
(`--refit K:J`, `--refit all`, `bcemb registry retire/activate`). A transform registered from outside
(joint training, an import) is never replaced implicitly: `--refit all` skips it, `--refit K:J` names it.

Sampling is one scan per version table with a hash filter inside the scan; the samples meet on the
driver (a sorted-id intersection), so no shuffle and no Spark join. Edges are fitted oldest first so
multi-step objectives can use the frozen earlier transforms. Nothing is read when nothing needs fitting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

from bclib import __version__
from bclib.config import JobConfig
from bclib.errors import ConfigError, FitRejectedError
from bclib.numerics.fitting import fit_one_edge
from bclib.numerics.records import TransformRecord
from bclib.tables.embeddings import read_embedding_version, sample_versions
from bclib.tables.registry import active_transforms, register
from bclib.tables.lease import leased

log = logging.getLogger(__name__)



def holdout_slice(cfg: JobConfig, rows: int) -> float:
    """Width h of the evaluation slice [1 - h, 1) of the id hash; the fit samples [0, 1 - h).

    `fit.holdout` is a fraction in (0, 0.5] or a row count (>= 1) of a table of `rows` rows (at most half).
    Both windows are disjoint and deterministic (salted xxhash64 of the id, `fit.salt`).
    """
    h = float(cfg.fit.holdout)
    if h >= 1:
        return min(0.5, h / max(int(rows), 1))
    return h


def fit_window_end(cfg: JobConfig, rows: int) -> float:
    """End of the fit's hash window [0, end): everything but the evaluation slice."""
    return 1.0 - holdout_slice(cfg, rows)


@dataclass
class FitResult:
    """What `run_fit` did per edge: fitted (why), kept (why), and the ids the registry commit activated."""

    records: list[TransformRecord]
    fitted: list[tuple[int, int]] = field(default_factory=list)
    kept: list[tuple[int, int]] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)
    decisions: dict[tuple[int, int], str] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """One line however long the history: runs of consecutive edges collapse (`edge_runs`)."""
        return (f"fit: {len(self.records)} edge(s): fitted {edge_runs(self.fitted)}, kept {edge_runs(self.kept)}; "
                f"{len(self.committed)} transform(s) activated in {self.seconds:.1f}s")


def edge_runs(edges: Sequence[tuple[int, int]], max_runs: int = 4) -> str:
    """Edges (source, target) as a short text: a run of consecutive single-step edges k -> k-1 -> ... -> j is
    written `k->j (n edges)`, a lone edge `k->j`; beyond `max_runs` runs, `... and n more edge(s)`.

    [(4, 3), (3, 2), (2, 1), (1, 0)] -> '4->0 (4 edges)'; [(2, 1), (5, 3)] -> '5->3, 2->1'; [] -> 'none'.
    """
    runs: list[list[tuple[int, int]]] = []
    for k, j in sorted(set(edges), reverse=True):
        last = runs[-1][-1] if runs else None
        if last is not None and k - j == 1 and last[0] - last[1] == 1 and last[1] == k:
            runs[-1].append((k, j))
        else:
            runs.append([(k, j)])
    if not runs:
        return "none"
    text = [f"{r[0][0]}->{r[-1][1]}" + (f" ({len(r)} edges)" if len(r) > 1 else "") for r in runs[:max_runs]]
    rest = sum(len(r) for r in runs[max_runs:])
    return ", ".join(text) + (f" and {rest} more edge(s)" if rest else "")


def parse_refit(specs: Sequence[str], edges: Sequence[tuple[int, int]]) -> tuple[set[tuple[int, int]], bool]:
    """`--refit` values -> (edges named explicitly, all posthoc edges?). 'all' or 'K:J' (an edge K -> J).

    Raises ConfigError naming the value and the configured edges when a value is not one of them.
    """
    named: set[tuple[int, int]] = set()
    every = False
    for spec in specs:
        if spec.strip().lower() == "all":
            every = True
            continue
        try:
            k, j = (int(x) for x in spec.split(":"))
        except ValueError:
            raise ConfigError(f"--refit expects 'all' or SOURCE:TARGET (e.g. 3:2), found {spec!r}") from None
        if (k, j) not in edges:
            raise ConfigError(f"--refit {spec}: no edge {k} -> {j} among the configured edges {list(edges)}")
        named.add((k, j))
    return named, every


def plan_fit(existing: dict[tuple[int, int], TransformRecord], edges: Sequence[tuple[int, int]],
             refit: Sequence[str] = ()) -> dict[tuple[int, int], str]:
    """Per edge: 'fit: ...' or 'keep: ...' with the reason (pure; what `--dry-run` prints)."""
    named, every = parse_refit(refit, edges)
    decisions = {}
    for edge in edges:
        rec = existing.get(edge)
        if rec is None:
            decisions[edge] = "fit: no active transform (new version)"
        elif edge in named:
            decisions[edge] = f"fit: refit asked (--refit {edge[0]}:{edge[1]}; replaces {rec.origin} {rec.transform_id})"
        elif every and rec.origin == "posthoc":
            decisions[edge] = f"fit: refit asked (--refit all; replaces {rec.transform_id})"
        elif every:
            decisions[edge] = (f"keep: {rec.origin} transform {rec.transform_id} is never replaced by --refit all "
                               f"(name it: --refit {edge[0]}:{edge[1]})")
        else:
            decisions[edge] = f"keep: active {rec.origin} transform {rec.transform_id} (published edges stay frozen)"
    return decisions


def _transform_id(edge: tuple[int, int], cfg: JobConfig, inputs: dict[str, int], frozen_ids: list[str]) -> str:
    """Content id of a fit: what was fitted, how, on which data and after which frozen transforms."""
    payload = json.dumps({
        "edge": edge, "transform": asdict(cfg.transform), "fit": asdict(cfg.fit),
        "inputs": inputs, "frozen": frozen_ids, "library": __version__,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


@leased("fit")
def run_fit(spark, cfg: JobConfig, refit: Sequence[str] = (), actor: Optional[str] = None) -> FitResult:
    """Fit the edges `plan_fit` selects and register them in one commit; keep every other active transform.

    Raises FitRejectedError (nothing registered) when a fitted transform's held-out error is worse than
    the untransformed baseline's.
    """
    started = time.time()
    versions = sorted(cfg.embeddings.versions)
    edges = [(versions[i], versions[i - 1]) for i in range(1, len(versions))]
    existing = active_transforms(spark, cfg.registry_location)
    decisions = plan_fit(existing, edges, refit)
    for edge, why in decisions.items():
        log.info("fit: edge %d -> %d: %s", edge[0], edge[1], why)
    result = FitResult(records=[], decisions=decisions)
    to_fit = [e for e in edges if decisions[e].startswith("fit")]
    if not to_fit:
        result.records = [existing[e] for e in edges]
        result.kept = list(edges)
        result.seconds = time.time() - started
        return result
    multi = cfg.transform.objective != "single_step"
    needed = versions[: max(versions.index(k) for k, _ in to_fit) + 1]
    needed = needed if multi else sorted({v for e in to_fit for v in e})
    reads = {v: read_embedding_version(spark, cfg, v) for v in needed}
    end = fit_window_end(cfg, min(r.df.count() for r in reads.values()))  # counts come from Delta's log
    samples, window_end = sample_versions(reads, cfg.fit.salt, cfg.fit.sample_size, 0.0, end,
                                 drop_invalid=cfg.backfill.quarantine_location is not None)
    chosen: dict[int, TransformRecord] = {}  # by source version: what each edge will be after this run
    for i in range(1, len(versions)):
        k, prev = edge = versions[i], versions[i - 1]
        if edge not in to_fit:  # kept: also the frozen link later multi-step edges are fitted through
            chosen[k] = existing[edge]
            result.records.append(existing[edge])
            result.kept.append(edge)
            continue
        frozen_ids = [chosen[versions[m]].transform_id for m in range(i - 1, 0, -1)] if multi else []
        used = versions[: i + 1] if multi else [prev, k]  # the tables this edge's fit reads
        inputs = {reads[v].location: reads[v].delta_version for v in used}
        tid = _transform_id(edge, cfg, inputs, frozen_ids)
        transform, metrics = fit_one_edge(
            samples, versions, i, {v: r.transform for v, r in chosen.items()}, cfg.transform, cfg.fit,
        )
        metrics["fit_window_end"] = window_end
        metrics["estimated_shared_pairs"] = round(metrics["shared_pairs_in_window"] / window_end)
        fitted_on = int(metrics.get("refit_rows", metrics["train_rows"]))  # the published map's pairs
        log.info("fit: edge %d -> %d: the published map is fit on %d pairs of %d shared in its hash window "
                 "[0, %.3f) (validated on %d of them first; about %d shared in all; the slice [%.3f, 1) is kept "
                 "for evaluation and the gate)", k, prev, fitted_on, int(metrics["shared_pairs_in_window"]),
                 window_end, int(metrics["holdout_rows"]), metrics["estimated_shared_pairs"], end)
        if metrics["holdout_relative_l2"] >= metrics["holdout_baseline_relative_l2"]:
            raise FitRejectedError(
                f"edge {k} -> {prev}: the fitted {cfg.transform.kind} transform's held-out relative L2 "
                f"{metrics['holdout_relative_l2']:.4f} is not better than no transform "
                f"({metrics['holdout_baseline_relative_l2']:.4f}) on {int(metrics['holdout_rows'])} held-out pairs "
                f"({int(metrics['train_rows'])} training pairs for dimension {transform.dim_in}); nothing was "
                "registered. Fit on more pairs (fit.sample_size) or regularise (transform.ridge)"
            )
        record = TransformRecord(
            transform_id=tid, source_version=k, target_version=prev, kind=cfg.transform.kind,
            objective=cfg.transform.objective, transform=transform,
            fit_config={"transform": asdict(cfg.transform), "fit": asdict(cfg.fit), "frozen": frozen_ids},
            sample_size=fitted_on, input_delta_versions=inputs, fit_metrics=metrics,
            origin="posthoc",
        )
        chosen[k] = record
        result.records.append(record)
        result.fitted.append(edge)
    fitted_records = [r for r in result.records if r.edge in result.fitted]
    result.committed = register(spark, cfg.registry_location, fitted_records, actor=actor,
                                reason="; ".join(f"{e[0]}->{e[1]} {decisions[e]}" for e in result.fitted),
                                attempts=cfg.backfill.max_retries)
    result.seconds = time.time() - started
    log.info("fit: %d edge(s) fitted, %d kept, in %.1fs", len(result.fitted), len(result.kept), result.seconds)
    return result
