"""A fragmented source (a streaming ingestion's many one-row files): backfill time and output files per space on
both engines, against `size / target file size`.

    python benchmarks/fragmented_source.py --files 20000 --dim 256 --spaces 2 --repeats 3

The source is one Delta table of `--files` rows, one row per Parquet file (written in one commit with Spark's
`maxRecordsPerFile` = 1); a linear transform per edge is registered (benchmarks/backfill_throughput.py's
`setup_registry`) and `run_backfill` rewrites `--spaces` spaces, on the spark engine then the arrow engine,
alternated per round (median of `--repeats` after an uncounted warm-up round), each into an empty output.
Per engine: seconds, rows/s, the widest Spark stage's tasks, and files per space of the result against the ideal
`ceil(rows / file rows)`, file rows being what the backfill sizes files by (`backfill.target_file_mb` over the
output row's bytes, at least 10,000 rows); target: within 2x. Writes benchmarks/results/fragmented_source.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from backfill_throughput import job_config, setup_registry  # noqa: E402

from bclib.steps.backfill import run_backfill  # noqa: E402
from bclib.tables.delta import table_exists  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data"


def make_fragmented_source(spark, path: Path, files: int, dim: int) -> None:
    """`files` rows of float vectors (sin of id and element), one row per Parquet file, one Delta commit; reused if present."""
    if table_exists(spark, str(path)):
        return
    spark.range(files).selectExpr(
        "id", f"transform(sequence(1, {dim}), i -> cast(sin(id * {dim} + i) AS float)) AS vector") \
        .repartition(1).write.format("delta").option("maxRecordsPerFile", 1).mode("overwrite").save(str(path))


def files_per_space(location: str) -> dict[int, int]:
    """Live files per space of a Delta output (its log, read by delta-rs)."""
    from deltalake import DeltaTable

    counts: dict[int, int] = {}
    for uri in DeltaTable(location).file_uris():
        part = [p for p in uri.split("/") if p.startswith("space_version=")][0]
        j = int(part.split("=", 1)[1])
        counts[j] = counts.get(j, 0) + 1
    return dict(sorted(counts.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--spaces", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--target-file-mb", type=int, default=256)
    ap.add_argument("--engines", nargs="+", default=["spark", "arrow"])
    ap.add_argument("--out", default=str(RESULTS / "fragmented_source.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)

    from bclib.config import SparkSettings
    from bclib.spark import default_parallelism, get_or_create

    spark = get_or_create(SparkSettings(master="local[2]", conf={"spark.ui.enabled": "true"}))
    DATA.mkdir(parents=True, exist_ok=True)
    source = DATA / f"fragmented_{args.files}_{args.dim}"
    make_fragmented_source(spark, source, args.files, args.dim)
    n_source_files = len(__import__("deltalake").DeltaTable(str(source)).file_uris())
    root = DATA / f"fragmented_run_{args.files}_{args.dim}_{args.spaces}"
    cfgs = {}
    for engine in args.engines:
        cfg, versions = job_config(root, source, args.spaces, args.dim, None, engine)
        cfgs[engine] = dataclasses.replace(cfg, backfill=dataclasses.replace(cfg.backfill,
                                                                           target_file_mb=args.target_file_mb))
    link = Path(cfgs[args.engines[0]].version_location(args.spaces))
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(source.resolve())
    setup_registry(spark, cfgs[args.engines[0]], versions, args.dim)
    file_rows = max(10_000, args.target_file_mb * 2**20 // (4 * args.dim + 48))  # as bclib.steps.backfill sizes files
    ideal = max(1, -(-args.files // file_rows))
    tracker = spark.sparkContext.statusTracker()
    times = {e: [] for e in args.engines}
    tasks, layout = {}, {}
    for i in range(args.repeats + 1):
        for engine in args.engines:
            cfg = cfgs[engine]
            shutil.rmtree(cfg.output_location, ignore_errors=True)
            spark.sparkContext.setJobGroup(f"frag-{engine}-{i}", engine)
            t = time.perf_counter()
            result = run_backfill(spark, cfg)
            seconds = time.perf_counter() - t
            assert result.rows == args.files * args.spaces, (engine, result.rows)
            jobs = tracker.getJobIdsForGroup(f"frag-{engine}-{i}")
            stages = [s for j in jobs for s in (tracker.getJobInfo(j).stageIds if tracker.getJobInfo(j) else [])]
            tasks[engine] = max((tracker.getStageInfo(s).numTasks for s in stages if tracker.getStageInfo(s)),
                                default=0)
            layout[engine] = files_per_space(cfg.output_location)
            if i:  # round 0 warms up
                times[engine].append(seconds)
            print(f"round {i} {engine}: {seconds:.1f} s, widest stage {tasks[engine]} tasks, files per space "
                  f"{layout[engine]}", flush=True)
    runs = []
    for engine in args.engines:
        med = statistics.median(times[engine])
        worst = max(layout[engine].values())
        runs.append({"engine": engine, "seconds": round(med, 2), "rows_per_s": round(args.files / med),
                     "widest_stage_tasks": tasks[engine], "files_per_space": layout[engine],
                     "ideal_files_per_space": ideal, "within_2x": worst <= 2 * ideal,
                     "times": [round(x, 2) for x in times[engine]]})
    out = {"files": args.files, "source_files": n_source_files, "dim": args.dim, "spaces": args.spaces,
           "target_file_mb": args.target_file_mb, "parallelism": default_parallelism(spark),
           "repeats": args.repeats, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for r in runs:
        print(f"{r['engine']:>6}: {r['seconds']:.1f} s ({r['rows_per_s']} rows/s), files per space "
              f"{r['files_per_space']} (ideal {ideal}, within 2x: {r['within_2x']})")
    shutil.rmtree(root, ignore_errors=True)
    spark.stop()


if __name__ == "__main__":
    main()
