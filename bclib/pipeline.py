"""The end-to-end demo: generate -> fit -> backfill -> evaluate, one log line per stage."""

from __future__ import annotations

import logging
import time

from bclib.backfill import run_backfill
from bclib.config import JobConfig
from bclib.demo_data import write_demo_versions
from bclib.evaluate import run_evaluate
from bclib.fitting import run_fit

log = logging.getLogger(__name__)


def run_demo(spark, cfg: JobConfig) -> dict:
    """Run every stage on the embedded default (or any config); returns per-stage seconds and results."""
    timings: dict[str, float] = {}
    started = time.time()

    t = time.time()
    counts = write_demo_versions(spark, cfg)
    timings["generate"] = time.time() - t
    log.info("stage generate: %s rows per version in %.1fs", counts, timings["generate"])

    t = time.time()
    records = run_fit(spark, cfg)
    timings["fit"] = time.time() - t
    log.info("stage fit: %d transforms in %.1fs", len(records), timings["fit"])

    t = time.time()
    backfill = run_backfill(spark, cfg)
    timings["backfill"] = time.time() - t
    log.info("stage backfill: %d rows in %.1fs", backfill["rows"], timings["backfill"])

    t = time.time()
    results = run_evaluate(spark, cfg)
    timings["evaluate"] = time.time() - t
    log.info("stage evaluate: %d pairs in %.1fs", len(results), timings["evaluate"])

    timings["total"] = time.time() - started
    log.info("demo done in %.1fs (%s)", timings["total"],
             ", ".join(f"{k} {v:.1f}s" for k, v in timings.items() if k != "total"))
    return {"timings": timings, "counts": counts, "records": records, "backfill": backfill, "results": results}
