"""The compatibility gate: a candidate chain is measured on held-out entities before its space is published.

The measurements are `evaluate`'s (same window, same metrics, the untransformed baseline beside each).
A chain passes when every check holds:

* headline neighbour recall (cross-space recall@K) >= the untransformed baseline's, always; and
  >= gate.min_neighbour_recall when set;
* probe retention >= gate.min_probe_retention and >= the baseline's, when the threshold is set;
* relative L2 <= gate.max_relative_l2 and <= the baseline's, when the threshold is set.

The gate fails closed: a chain judged on fewer held-out ids than gate.min_heldout_ids (default 200) is
refused (check `heldout_ids`, naming the edge, the count and the minimum), whatever its metrics.

A threshold whose metric could not be measured (no label table for probes) fails its check. Verdicts
go to the metrics table as `gate.*` rows (value, with the check's detail as JSON) and a `gate` row
(1 passed, 0 rejected) naming the chain's transform ids, which `bcemb registry list` shows.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from bclib.config import GateSettings, JobConfig
from bclib.errors import GateRejectedError
from bclib.numerics.records import TransformRecord, chain_id
from bclib.steps.evaluate import HeldOut, chain_metrics, held_out
from bclib.tables.metrics_table import append_metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """One gate check: metric value against its threshold and/or the untransformed baseline."""

    metric: str
    value: Optional[float]
    baseline: Optional[float]
    threshold: Optional[float]
    passed: bool
    why: str


@dataclass
class GateVerdict:
    """The verdict on one candidate chain (source version -> space)."""

    source_version: int
    space: int
    chain_id: str
    transform_ids: list[str]
    sample_size: int
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    def failures(self) -> str:
        return "; ".join(c.why for c in self.checks if not c.passed)


@dataclass
class GateResult:
    verdicts: list[GateVerdict]
    enforced: bool
    seconds: float = 0.0
    # spaces not judged because their version's table could not be read (missing, empty, files gone) -> why;
    # the backfill skips them (they keep what they hold) and publishes the others
    unreadable: dict[int, str] = field(default_factory=dict)
    source_version: int = -1
    chains: dict[int, str] = field(default_factory=dict)  # space -> candidate chain id (named on unreadable rows)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def rejected(self) -> list[GateVerdict]:
        return [v for v in self.verdicts if not v.passed]


def _higher_is_better(name: str, value, baseline, threshold, label: str) -> list[Check]:
    checks = []
    if threshold is not None:
        ok = value is not None and value >= threshold
        why = (f"{label} not measured" if value is None else f"{label} {value:.4f} < threshold {threshold:.4f}")
        checks.append(Check(name, value, baseline, threshold, ok, "" if ok else why))
    if value is not None and baseline is not None:
        ok = value >= baseline
        checks.append(Check(f"{name} vs baseline", value, baseline, None, ok,
                            "" if ok else f"{label} {value:.4f} is worse than the untransformed vectors' {baseline:.4f}"))
    return checks


def gate_checks(metrics: dict[str, float], settings: GateSettings, k: int) -> list[Check]:
    """The checks of one chain's metrics (pure; see the module docstring for the rules)."""
    recall = f"neighbour_recall_at_{k}"
    checks = _higher_is_better("neighbour_recall", metrics.get(recall), metrics.get(f"baseline_{recall}"),
                               settings.min_neighbour_recall, f"neighbour recall@{k}")
    if settings.min_probe_retention is not None:
        checks += _higher_is_better("probe_retention", metrics.get("probe_retention"),
                                    metrics.get("baseline_probe_retention"), settings.min_probe_retention,
                                    "probe retention")
    if settings.max_relative_l2 is not None:
        value, base, thr = metrics.get("relative_l2"), metrics.get("baseline_relative_l2"), settings.max_relative_l2
        ok = value is not None and value <= thr
        checks.append(Check("relative_l2", value, base, thr, ok,
                            "" if ok else f"relative L2 {value:.4f} > threshold {thr:.4f}"))
        if value is not None and base is not None:
            ok = value <= base
            checks.append(Check("relative_l2 vs baseline", value, base, None, ok,
                                "" if ok else f"relative L2 {value:.4f} is worse than the untransformed {base:.4f}"))
    return checks


MIN_RELIABLE_ENTITIES = 300  # below this many held-out entities a neighbour-recall verdict is noisy


def heldout_check(n: int, minimum: int, source_version: int, space: int) -> Check:
    """The fail-closed check: at least `minimum` (gate.min_heldout_ids) held-out ids shared by both versions."""
    ok = n >= minimum
    why = "" if ok else (
        f"edge {source_version} -> {space} was judged on {n} held-out id(s), fewer than gate.min_heldout_ids = "
        f"{minimum}: its verdict would mean nothing. Give it more entities shared by versions {source_version} "
        f"and {space}, a larger evaluation slice (fit.holdout, a fraction or a row count), or a lower "
        "gate.min_heldout_ids")
    return Check("heldout_ids", float(n), None, float(minimum), ok, why)


def run_gate(spark, cfg: JobConfig, source_version: int, chains: dict[int, Sequence[TransformRecord]],
             heldout: Optional[HeldOut] = None) -> GateResult:
    """Measure each candidate chain (space -> records) on held-out entities and judge it; writes nothing.

    A space whose version table is missing, empty or lacks data files is not judged: it is named in
    `GateResult.unreadable` (the source version's own such error is raised)."""
    started = time.time()
    heldout = heldout or held_out(spark, cfg, sorted({source_version, *chains}),
                                  labels=cfg.gate.min_probe_retention is not None, tolerate=sorted(chains))
    verdicts = []
    unreadable = {j: why for j, why in heldout.unreadable.items() if j in chains}
    for space, why in sorted(unreadable.items()):
        log.warning("gate: space %d not judged, its version's table cannot be read (the space keeps what it holds; "
                    "the other spaces go on): %s", space, why)
    for space, records in sorted(chains.items()):
        if space in unreadable:
            continue
        shared = np.intersect1d(heldout.samples[source_version].ids, heldout.samples[space].ids).size
        n, metrics = chain_metrics(records, heldout, source_version, space, cfg.evaluate, within=False) \
            if shared else (0, {})
        checks = [heldout_check(n, cfg.gate.min_heldout_ids, source_version, space)]
        verdict = GateVerdict(source_version, space, chain_id(records), [r.transform_id for r in records], n,
                              checks + gate_checks(metrics, cfg.gate, cfg.evaluate.neighbours_k))
        log.info("gate: %d -> %d (chain %s, %d held-out entities): %s", source_version, space, verdict.chain_id, n,
                 "passed" if verdict.passed else "REJECTED: " + verdict.failures())
        if cfg.gate.min_heldout_ids <= n < MIN_RELIABLE_ENTITIES:
            log.warning("gate: %d -> %d was judged on only %d held-out entities: its verdict is noisy; a larger "
                        "evaluation slice (fit.holdout, a fraction or a row count) makes it reliable",
                        source_version, space, n)
        verdicts.append(verdict)
    return GateResult(verdicts, cfg.gate.enforce, time.time() - started, unreadable, source_version,
                      {j: chain_id(records) for j, records in chains.items()})


def record_verdicts(spark, cfg: JobConfig, run_id: str, result: GateResult) -> int:
    """Append the verdicts to the metrics table (one commit): `gate.<check>` rows and one `gate` row per chain."""
    rows = []
    for space, why in sorted(result.unreadable.items()):
        rows.append((result.source_version, space, "gate.unreadable", float("nan"), 0, result.chains.get(space, ""),
                     json.dumps({"why": why, "transforms": []}, sort_keys=True)))
    for v in result.verdicts:
        for c in v.checks:
            rows.append((v.source_version, v.space, f"gate.{c.metric.replace(' ', '_')}",
                         float("nan") if c.value is None else c.value, v.sample_size, v.chain_id,
                         json.dumps({"baseline": c.baseline, "threshold": c.threshold, "passed": c.passed,
                                     "why": c.why}, sort_keys=True)))
        rows.append((v.source_version, v.space, "gate", 1.0 if v.passed else 0.0, v.sample_size, v.chain_id,
                     json.dumps({"passed": v.passed, "enforced": result.enforced, "transforms": v.transform_ids,
                                 "why": v.failures()}, sort_keys=True)))
    return append_metrics(spark, cfg.metrics_location, run_id, rows)


def raise_if_rejected(result: GateResult) -> None:
    """GateRejectedError naming the space, metric, value and threshold of the first rejected chain (if enforced)."""
    if not result.rejected:
        return
    first = result.rejected[0]
    text = "; ".join(f"space {v.space} (chain {v.chain_id}, transforms {v.transform_ids}): {v.failures()}"
                     for v in result.rejected)
    if not result.enforced:
        log.warning("gate: rejected but gate.enforce is false, publishing anyway: %s", text)
        return
    raise GateRejectedError(
        f"{len(result.rejected)} space(s) rejected, nothing published: {text}. Roll back with "
        f"`bcemb registry activate <previous id>` or refit; `bcemb registry list` shows the verdicts "
        f"(first rejected: space {first.space})"
    )
