"""The end-to-end demo: generate -> fit -> backfill -> evaluate, one log line per stage."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from bclib.config import JobConfig
from bclib.steps.backfill import BackfillResult, run_backfill
from bclib.steps.evaluate import EvaluateResult, run_evaluate
from bclib.steps.fit import FitResult, run_fit
from bclib.steps.generate import GenerateResult, run_generate

log = logging.getLogger(__name__)


@dataclass
class DemoResult:
    """Every stage's result and its seconds."""

    generate: GenerateResult
    fit: FitResult
    backfill: BackfillResult
    evaluate: EvaluateResult
    timings: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        return f"demo: done in {self.timings.get('total', 0.0):.1f}s (" + ", ".join(
            f"{k} {v:.1f}s" for k, v in self.timings.items() if k != "total") + ")"


def run_demo(spark, cfg: JobConfig) -> DemoResult:
    """Run every stage on the embedded default (or any config); returns per-stage results and seconds."""
    timings: dict[str, float] = {}
    started = time.time()

    def stage(name: str, step, describe):
        t = time.time()
        result = step(spark, cfg)
        timings[name] = time.time() - t
        log.info("stage %s: %s in %.1fs", name, describe(result), timings[name])
        return result

    generated = stage("generate", run_generate, lambda r: f"{r.counts} rows per version")
    fitted = stage("fit", run_fit, lambda r: f"{len(r.records)} transforms")
    backfill = stage("backfill", run_backfill, lambda r: f"{r.rows} rows")
    evaluated = stage("evaluate", run_evaluate, lambda r: f"{len(r.pairs)} pairs")

    timings["total"] = time.time() - started
    return DemoResult(generated, fitted, backfill, evaluated, timings)
