"""Where one incremental backfill's time goes: every Spark job it starts, with its Spark UI description and
seconds, summed per phase (before the MERGE, and each MERGE phase as Delta names it).

    python benchmarks/profile_incremental.py --rows 1000000 --rounds 3

One Spark session with its UI on (port --ui-port, 127.0.0.1 only); the source and output are built as
`benchmarks/incremental.py` builds them (256 floats, --spaces spaces, deletion-vector output), then per round
one change commit of --fraction x rows rows and one `run_backfill` with backfill.incremental = require and
backfill.incremental_commit = --commit (merge by default: the phases below are the MERGE's). Job
times come from the UI's REST API (/api/v1/applications/<app>/jobs: submission and completion times).
Writes benchmarks/results/incremental_profile.json or --output (per round: seconds, the jobs, the phase sums) and prints
the last round's jobs and the phase sums of every round.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import incremental as bench  # noqa: E402

from bclib.config import SparkSettings  # noqa: E402
from bclib.spark import get_or_create  # noqa: E402
from bclib.steps.backfill import run_backfill  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data" / "profile_incremental"
# Delta's MERGE names its phases in the jobs' descriptions; everything before the first is "before the MERGE"
PHASES = (("materialize source", "MERGE: materialise the source"),
          ("scanning files for matches", "MERGE: find touched files"),
          ("Writing modified data", "MERGE: write changed rows"),
          ("Writing Deletion Vectors", "MERGE: write deletion vectors"),
          ("Compute snapshot", "output snapshot"))


def phase_of(description: str, merge_started: bool) -> str:
    for key, name in PHASES:
        if key in description:
            return name
    return "MERGE: other" if merge_started else "before the MERGE"


def _time(text: str) -> datetime:
    return datetime.strptime(text.replace("GMT", ""), "%Y-%m-%dT%H:%M:%S.%f")


def jobs_since(port: int, app: str, first: int) -> list[dict]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/applications/{app}/jobs") as response:
        jobs = json.load(response)
    return sorted((j for j in jobs if j["jobId"] >= first), key=lambda j: j["jobId"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spaces", type=int, default=4)
    parser.add_argument("--fraction", type=float, default=0.01)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--ui-port", type=int, default=4077)
    parser.add_argument("--commit", choices=["merge", "auto"], default="merge",
                        help="backfill.incremental_commit: merge (the default here: the phases are the MERGE's) or "
                             "auto (INSERT REPLACE ON: its jobs are not named by phase)")
    parser.add_argument("--output", default="incremental_profile.json", help="the results file under benchmarks/results")
    parser.add_argument("--driver-memory", default="6g")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    spark = get_or_create(SparkSettings(master="local[*]", shuffle_partitions=4,
                                        warehouse_dir=str(DATA.parent / "profile_incremental_wh"),
                                        conf={"spark.driver.memory": args.driver_memory, "spark.ui.enabled": "true",
                                              "spark.ui.port": str(args.ui_port),
                                              "spark.driver.bindAddress": "127.0.0.1",
                                              "spark.driver.host": "127.0.0.1"}))
    app = spark.sparkContext.applicationId
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    source = DATA / "source"
    bench.make_source(spark, source, args.rows, args.dim)
    bench.setup(spark, DATA, source, args.spaces, args.dim)
    cfg = bench.job_config(DATA, source, args.spaces, "out", "require", True, args.commit)
    run_backfill(spark, cfg)  # the initial publish (full)
    rounds = []
    for r in range(args.rounds):
        bench.change_source(spark, source, args.rows, args.dim, args.fraction, 1000 + r)
        first = bench.spark_jobs(spark)
        t = time.perf_counter()
        result = run_backfill(spark, cfg)
        seconds = time.perf_counter() - t
        assert {a for a, _ in result.actions.values()} == {"incremental"}, result.actions
        jobs, phases, started = [], {}, None
        merge_started = False
        for j in jobs_since(args.ui_port, app, first):
            description = j.get("description", "") or ""
            merge_started = merge_started or "MERGE operation" in description
            phase = phase_of(description, merge_started)
            begin = _time(j["submissionTime"])
            started = started or begin
            took = (_time(j["completionTime"]) - begin).total_seconds() if j.get("completionTime") else None
            jobs.append({"job": j["jobId"], "at": (begin - started).total_seconds(), "seconds": took,
                         "tasks": j["numTasks"], "phase": phase, "description": description[:100],
                         "call_site": j["name"][:80]})
            phases[phase] = phases.get(phase, 0.0) + (took or 0.0)
        rounds.append({"seconds": seconds, "spark_jobs": len(jobs), "phase_job_seconds": phases, "jobs": jobs})
        bench.vacuum(spark, cfg.output_location)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / args.output).write_text(json.dumps(
        {"rows": args.rows, "dim": args.dim, "spaces": args.spaces, "fraction": args.fraction, "rounds": rounds},
        indent=2))
    for job in rounds[-1]["jobs"]:
        print(f"job {job['job']:5d} at {job['at']:6.2f} s  {job['seconds'] or 0:5.2f} s  {job['tasks']:4d} tasks  "
              f"{job['phase']:<30} {job['description'][:60]!r}")
    for i, r in enumerate(rounds):
        print(f"round {i}: {r['seconds']:.2f} s, {r['spark_jobs']} Spark jobs; job seconds by phase: "
              + ", ".join(f"{k} {v:.2f}" for k, v in r["phase_job_seconds"].items()))
    shutil.rmtree(DATA, ignore_errors=True)


if __name__ == "__main__":
    main()
