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

    t = time.time()
    generated = run_generate(spark, cfg)
    timings["generate"] = time.time() - t
    log.info("stage generate: %s rows per version in %.1fs", generated.counts, timings["generate"])

    t = time.time()
    fitted = run_fit(spark, cfg)
    timings["fit"] = time.time() - t
    log.info("stage fit: %d transforms in %.1fs", len(fitted.records), timings["fit"])

    t = time.time()
    backfill = run_backfill(spark, cfg)
    timings["backfill"] = time.time() - t
    log.info("stage backfill: %d rows in %.1fs", backfill.rows, timings["backfill"])

    t = time.time()
    evaluated = run_evaluate(spark, cfg)
    timings["evaluate"] = time.time() - t
    log.info("stage evaluate: %d pairs in %.1fs", len(evaluated.pairs), timings["evaluate"])

    timings["total"] = time.time() - started
    return DemoResult(generated, fitted, backfill, evaluated, timings)
