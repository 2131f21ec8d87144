"""`bcemb run`: the scheduled job. fit (only what is allowed) -> gate -> backfill (only what changed) ->
evaluate (only when something was published) -> status line.

Rerunning it with nothing changed reads a little metadata and commits nothing. Exit codes (cli.py):
0 published or nothing to do, 1 data error, 2 config error, 3 gate rejected.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional, Sequence

from bclib.config import JobConfig
from bclib.errors import RegistryError
from bclib.steps.backfill import BackfillResult, run_backfill
from bclib.steps.backfill_plan import FULL, INCREMENTAL
from bclib.steps.evaluate import EvaluateResult, changed_pairs, run_evaluate, unscored_pairs
from bclib.steps.fit import FitResult, plan_fit, run_fit
from bclib.steps.status import StatusResult, run_status
from bclib.tables.changes import source_rows
from bclib.tables.metrics_table import scored_chains
from bclib.tables.registry import active_transforms
from bclib.tables.lease import leased

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """One scheduled run: what each stage did (None: the stage had nothing to do or was not reached)."""

    run_id: str
    fit: Optional[FitResult] = None
    backfill: Optional[BackfillResult] = None
    evaluate: Optional[EvaluateResult] = None
    status: Optional[StatusResult] = None
    plan: list[str] = field(default_factory=list)  # --dry-run: what would happen
    dry_run: bool = False
    seconds: float = 0.0

    @property
    def commits(self) -> int:
        n = 0
        if self.fit is not None and self.fit.committed:
            n += 1
        if self.backfill is not None:
            n += self.backfill.commits + (1 if self.backfill.gate is not None else 0)
        if self.evaluate is not None:
            n += 1
        return n

    def summary(self) -> str:
        if self.dry_run:
            return "run (dry run, nothing touched):\n  " + "\n  ".join(self.plan)
        parts = [self.fit.summary() if self.fit else "fit: -",
                 self.backfill.summary() if self.backfill else "backfill: -",
                 self.evaluate.summary() if self.evaluate else "evaluate: skipped (nothing published)",
                 self.status.summary() if self.status else ""]
        return f"run {self.run_id}: {self.commits} commit(s) in {self.seconds:.1f}s\n  " + "\n  ".join(p for p in parts if p)


def dry_run_plan(spark, cfg: JobConfig, refit: Sequence[str] = ()) -> list[str]:
    """What `run` would do, from metadata only: edges to fit, spaces to write and how, estimated rows."""
    versions = sorted(cfg.embeddings.versions)
    edges = [(versions[i], versions[i - 1]) for i in range(1, len(versions))]
    decisions = plan_fit(active_transforms(spark, cfg.registry_location), edges, refit)
    lines = [f"fit edge {k} -> {j}: {why}" for (k, j), why in decisions.items()]
    if any(why.startswith("fit") for why in decisions.values()):
        lines.append("backfill: after the fit, every space whose chain changes is gated and rewritten")
        return lines
    try:
        backfill = run_backfill(spark, cfg, dry_run=True)
    except RegistryError as exc:
        return lines + [f"backfill: cannot plan: {exc}"]
    n = source_rows(spark, cfg.version_location(cfg.source_version))
    for j, (action, why) in sorted(backfill.actions.items()):
        est = {FULL: f"~{n} rows", INCREMENTAL: "the changed rows"}.get(action, "0 rows")
        lines.append(f"space {j}: {action} ({why}); writes {est}")
    return lines


@leased("run")
def run_scheduled(spark, cfg: JobConfig, refit: Sequence[str] = (), dry_run: bool = False,
                  allow_shrink: bool = False, run_id: Optional[str] = None) -> RunResult:
    """The daily job; raises what its stages raise (GateRejectedError: nothing published)."""
    started = time.time()
    result = RunResult(run_id or uuid.uuid4().hex[:12], dry_run=dry_run)
    if dry_run:
        result.plan = dry_run_plan(spark, cfg, refit)
        result.seconds = time.time() - started
        return result
    result.fit = run_fit(spark, cfg, refit)
    result.backfill = run_backfill(spark, cfg, run_id=result.run_id, allow_shrink=allow_shrink)
    # only the pairs this run changed (new or refitted edges toward pinned spaces, the spaces it wrote), and
    # those an earlier run committed but never scored (killed before its evaluate)
    activated = set(result.fit.committed)
    edges = [r.edge for r in result.fit.records if r.transform_id in activated]
    written = [j for j, (action, _) in result.backfill.actions.items() if action in (FULL, INCREMENTAL)] \
        if result.backfill.commits else []
    pairs = set(changed_pairs(cfg.embeddings.versions, cfg.target_spaces, cfg.source_version, edges, written))
    pairs |= set(unscored_pairs(active_transforms(spark, cfg.registry_location), cfg.embeddings.versions,
                                cfg.target_spaces, scored_chains(spark, cfg.metrics_location)))
    if pairs:
        result.evaluate = run_evaluate(spark, cfg, run_id=result.run_id, pairs=sorted(pairs, reverse=True))
    result.status = run_status(spark, cfg)
    result.seconds = time.time() - started
    return result
