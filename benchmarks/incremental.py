"""Incremental backfill (change data feed + one MERGE) against a full rewrite of the same state, side by side.

    python benchmarks/incremental.py --rows 2000000 --dim 256 --spaces 4 --fractions 0.001 0.01 0.1
    python benchmarks/incremental.py --rows 1000000 2000000 4000000 --fractions 0.01   # the slope

One Spark session. The source version table (CDF on) is backfilled into --spaces spaces once. Then, per
changed fraction f and round (median of --repeats rounds), the source gets one change commit of f x rows
rows (80 % re-embedded ids, 10 % new ids, 10 % deleted ids, the ids drawn by a seeded hash) and two
outputs are brought up to date from that same source version:
  incremental: `run_backfill` with backfill.incremental = require (reads the feed, one commit: INSERT
               REPLACE ON where Delta takes it, which Delta 4.3+ does here; the operation is recorded per round);
  full:        `run_backfill` of a second output with backfill.incremental = off (a full rewrite,
               backfill.engine auto);
  MERGE:       a third output with backfill.incremental_commit = merge, measured beside them (--no-merge: not).
`ratio` = incremental seconds / full seconds. Both outputs are then compared (same ids, same vectors per
space) so a fast wrong answer cannot pass. The incremental output is created with deletion vectors
(`backfill.deletion_vectors: true`: a MERGE writes the changed rows and a deletion vector per touched file);
`--no-deletion-vectors` measures a copy-on-write MERGE instead, which rewrites every file a changed id is in
(every file, for ids spread over the table) and is what `incremental: auto` then avoids (`auto_picks`).
Each incremental run also counts its Spark jobs before the MERGE (`spark_jobs_before_merge`, through the commit
seam). With two or more --rows the medians at --slope-fraction are fitted as time = a + b * N for both paths:
`incremental_slope_s_per_million`, `full_slope_s_per_million`, `marginal_ratio` (their ratio: what a
billion-row table feels) and `fixed_seconds` (the incremental intercept); the MERGE's as `merge_*`. Writes benchmarks/results/
incremental.json (one size), incremental_slope.json (several), incremental_no_dv.json (--no-deletion-vectors),
or --output;
a list `runs`, one entry per size and changed fraction, and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bclib.config import config_from_dict  # noqa: E402
from bclib.numerics.records import TransformRecord  # noqa: E402
from bclib.numerics.transforms import AffineTransform  # noqa: E402
from bclib.steps.backfill import run_backfill  # noqa: E402
from bclib.tables.registry import register  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data" / "incremental"
BLOCK = 50_000


def _vectors_fn(dim: int, seed: int):
    """mapInArrow function: (id) batches -> (id, vector) with seeded random vectors per id block."""
    import pyarrow as pa

    from bclib.numerics.arrow import matrix_to_list

    def gen(batches):
        for batch in batches:
            ids = batch.column(0).to_numpy()
            if not len(ids):
                continue
            rng = np.random.default_rng([seed, int(ids[0])])
            yield pa.RecordBatch.from_arrays(
                [pa.array(ids.astype(np.int64)), matrix_to_list(rng.normal(size=(len(ids), dim)).astype(np.float32))],
                names=["id", "vector"])

    return gen


def make_source(spark, path: Path, rows: int, dim: int) -> None:
    """The source version table: `rows` ids with random vectors, change data feed on."""
    df = spark.range(0, rows, numPartitions=max(2, rows // (4 * BLOCK))).mapInArrow(
        _vectors_fn(dim, 0), "id long, vector array<float>")
    df.write.format("delta").option("delta.enableChangeDataFeed", "true").mode("overwrite").save(str(path))


def change_source(spark, path: Path, rows: int, dim: int, fraction: float, round_seed: int) -> dict:
    """One commit changing `fraction` x rows rows: 80 % re-embedded, 10 % inserted (new ids), 10 % deleted."""
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    n = max(10, int(fraction * rows))
    scale = 1_000_000
    pick = lambda share: F.pmod(F.xxhash64(F.col("id"), F.lit(round_seed)), F.lit(scale)) < F.lit(  # noqa: E731
        int(share * fraction * scale))
    table = DeltaTable.forPath(spark, str(path))
    base = spark.read.format("delta").load(str(path)).select("id")
    updated = base.where(pick(0.8)).select("id")
    deleted = base.where(~pick(0.8) & pick(0.9)).select("id")
    new_lo = rows * 10 + round_seed * n  # fresh ids, never used before
    inserted = spark.range(new_lo, new_lo + n // 10, numPartitions=2).select("id")
    changes = updated.union(inserted).repartition(4).mapInArrow(_vectors_fn(dim, round_seed), "id long, vector array<float>")
    changes = changes.withColumn("_op", F.lit("upsert")).unionByName(
        deleted.withColumn("vector", F.lit(None).cast("array<float>")).withColumn("_op", F.lit("delete")))
    (table.alias("t").merge(changes.alias("s"), "t.id = s.id")
     .whenMatchedDelete("s._op = 'delete'")
     .whenMatchedUpdate("s._op = 'upsert'", {"vector": "s.vector"})
     .whenNotMatchedInsert("s._op = 'upsert'", {"id": "s.id", "vector": "s.vector"})
     .execute())
    m = table.history(1).select("operationMetrics").first()[0]
    return {k: int(m.get(k, 0)) for k in ("numTargetRowsUpdated", "numTargetRowsInserted", "numTargetRowsDeleted")}


def job_config(root: Path, source: Path, spaces: int, out: str, incremental: str, deletion_vectors: bool = False,
               commit: str = "auto"):
    return config_from_dict({
        "embeddings": {"location": str(root / "emb_v{version}"), "versions": list(range(spaces + 1))},
        "registry_location": str(root / "registry"),
        "output_location": str(root / out),
        "metrics_location": str(root / "metrics"),
        "backfill": {"incremental": incremental, "incremental_max_fraction": 0.5,
                     "deletion_vectors": deletion_vectors, "incremental_commit": commit},
        "gate": {"enabled": False},
    })


def setup(spark, root: Path, source: Path, spaces: int, dim: int) -> None:
    versions = list(range(spaces + 1))
    link = root / f"emb_v{spaces}"
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(source.resolve())
    rng = np.random.default_rng(0)
    register(spark, str(root / "registry"), [
        TransformRecord(f"inc-{k}-{dim}", k, k - 1, "linear", "single_step",
                        AffineTransform(rng.normal(size=(dim, dim)) / np.sqrt(dim)))
        for k in versions[1:]])


def auto_picks(spark, location: str, spaces: int, changed: int, rows: int, dim: int = 256) -> str:
    """What `backfill.incremental: auto` with default settings would do with this output for `changed` ids
    of a `rows`-row source (`bclib.steps.backfill_plan.auto_choice`: the cost model and its two rules)."""
    from bclib.config import BackfillSettings
    from bclib.steps.backfill_plan import auto_choice
    from bclib.tables.output import output_layout

    deletion_vectors, files = output_layout(spark, location)
    return auto_choice(rows, spaces, dim, changed, deletion_vectors, files / spaces,
                       BackfillSettings().incremental_max_fraction)[0]


def spark_jobs(spark) -> int:
    """Spark jobs this session has started so far (job ids count up from 0; bcemb sets no job groups)."""
    ids = spark.sparkContext.statusTracker().getJobIdsForGroup()
    return max(ids) + 1 if ids else 0


def timed_backfill(spark, cfg) -> tuple:
    """run_backfill(cfg) -> (result, seconds, Spark jobs before the output's commit rule ran, i.e. before the
    MERGE or the rewrite's commit, found through the commit seam `bclib.tables.commits.commit_seam`; all jobs)."""
    from bclib.tables.commits import commit_seam

    first = spark_jobs(spark)
    at_commit: list[int] = []

    def seen(stage: str, location: str, read_version: int) -> None:
        if location == cfg.output_location and not at_commit:
            at_commit.append(spark_jobs(spark))

    t = time.perf_counter()
    with commit_seam(seen):
        result = run_backfill(spark, cfg)
    seconds = time.perf_counter() - t
    total = spark_jobs(spark) - first
    return result, seconds, (at_commit[0] - first) if at_commit else total, total


def vacuum(spark, *locations: str) -> None:
    """Remove the files the last commits replaced (a full rewrite of 4 spaces leaves ~4 KB x rows behind:
    without this, three rounds at 2M rows fill a 60 GB disk). Retention 0: nothing reads old versions here."""
    from delta.tables import DeltaTable

    spark.conf.set("spark.databricks.delta.retentionDurationCheck.enabled", "false")
    for location in locations:
        DeltaTable.forPath(spark, location).vacuum(0)


def same_content(spark, a: str, b: str, sample: float = 1.0) -> bool:
    """Both outputs hold the same (space, id) rows, each row's vector the same to float32 rounding: per row two
    order-free checksums, sum(v) and sum(v^2), from each table (a narrow column each: the join shuffles 24 bytes
    a row, not the vectors; joining the vectors took 9 minutes at 1M rows x 4 spaces here), then one join on
    (space, id): no row may be unmatched, and |sum_a - sum_b| <= 1e-5 * sqrt(d * sumsq_b),
    |sumsq_a - sumsq_b| <= 1e-5 * sumsq_b (bclib's promise is ||a - b|| <= 1e-6 ||b||; a stale or wrong vector
    moves both sums by its own size)."""
    from pyspark.sql import functions as F

    zero = F.lit(0.0).cast("double")

    def sums(location: str, tag: str):
        df = spark.read.format("delta").load(location)
        if sample < 1.0:  # the rows whose id hash falls in the first `sample` of the range
            df = df.where(F.pmod(F.xxhash64("id"), F.lit(1_000_000)) < F.lit(int(sample * 1_000_000)))
        return df.select("space_version", "id",
                         F.aggregate("vector", zero, lambda acc, x: acc + x).alias(f"s_{tag}"),
                         F.aggregate("vector", zero, lambda acc, x: acc + x * x).alias(f"q_{tag}"),
                         F.size("vector").alias(f"d_{tag}"))

    joined = sums(a, "a").join(sums(b, "b"), ["space_version", "id"], "full_outer")
    off = (F.col("s_a").isNull() | F.col("s_b").isNull()
           | (F.abs(F.col("s_a") - F.col("s_b")) > F.lit(1e-5) * F.sqrt(F.col("d_b") * F.col("q_b")) + F.lit(1e-30))
           | (F.abs(F.col("q_a") - F.col("q_b")) > F.lit(1e-5) * F.col("q_b") + F.lit(1e-30)))
    row = joined.agg(F.sum(F.when(off, 1).otherwise(0)).alias("bad"), F.count("*").alias("n")).first()
    if sample < 1.0:  # every row's (space, id), counted and summed exactly: reads the id column only
        def ids(location: str):
            return {r.space_version: (r.n, r.h) for r in spark.read.format("delta").load(location)
                    .groupBy("space_version").agg(F.count("*").alias("n"),
                                                  F.sum(F.xxhash64("id").cast("decimal(38,0)")).alias("h")).collect()}
        if ids(a) != ids(b):
            return False
    return row.n > 0 and row.bad == 0


def fit_line(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares (a, b) of seconds = a + b * N, N in millions of rows (two or more sizes)."""
    b, a = np.polyfit(np.asarray(sizes, dtype=float) / 1e6, np.asarray(seconds, dtype=float), 1)
    return float(a), float(b)


def slope_summary(runs: list[dict], fraction: float) -> dict | None:
    """Per size the medians at `fraction` changed, and the fitted lines of both paths: what a billion-row table
    pays per million rows (`*_slope_s_per_million`), their ratio (`marginal_ratio`) and the incremental path's
    intercept (`fixed_seconds`). None with fewer than two sizes."""
    at = sorted((r for r in runs if r["changed_fraction"] == fraction), key=lambda r: r["rows"])
    if len({r["rows"] for r in at}) < 2:
        return None
    sizes = [r["rows"] for r in at]
    inc_a, inc_b = fit_line(sizes, [r["incremental_seconds"] for r in at])
    full_a, full_b = fit_line(sizes, [r["full_seconds"] for r in at])
    return {"changed_fraction": fraction, "sizes": sizes,
            "incremental_seconds": [r["incremental_seconds"] for r in at],
            "full_seconds": [r["full_seconds"] for r in at],
            "incremental_slope_s_per_million": inc_b, "full_slope_s_per_million": full_b,
            "marginal_ratio": inc_b / full_b if full_b > 0 else None,
            "fixed_seconds": inc_a, "full_fixed_seconds": full_a,
            "ratio_at_largest": at[-1]["ratio"], "largest_rows": at[-1]["rows"],
            "spark_jobs_before_merge": [r["spark_jobs_before_merge"] for r in at],
            **(_merge_slope(sizes, at, full_b) if all("merge_seconds" in r for r in at) else {})}


def _merge_slope(sizes: list[int], at: list[dict], full_b: float) -> dict:
    """The same fit for the MERGE measured beside it (backfill.incremental_commit: merge)."""
    merge_a, merge_b = fit_line(sizes, [r["merge_seconds"] for r in at])
    return {"merge_seconds": [r["merge_seconds"] for r in at], "merge_slope_s_per_million": merge_b,
            "merge_marginal_ratio": merge_b / full_b if full_b > 0 else None, "merge_fixed_seconds": merge_a}


def last_operation(spark, location: str) -> str:
    """The Delta operation of the table's last commit (WRITE: INSERT REPLACE ON; MERGE)."""
    return spark.sql(f"DESCRIBE HISTORY delta.`{location}` LIMIT 1").first().operation


def measure_size(spark, rows: int, args) -> list[dict]:
    """One source size: a fresh source and both outputs, then --repeats rounds per changed fraction."""
    shutil.rmtree(DATA, ignore_errors=True)
    DATA.mkdir(parents=True)
    source = DATA / "source"
    t = time.perf_counter()
    make_source(spark, source, rows, args.dim)
    setup(spark, DATA, source, args.spaces, args.dim)
    inc_cfg = job_config(DATA, source, args.spaces, "out_incremental", "require", args.deletion_vectors)
    full_cfg = job_config(DATA, source, args.spaces, "out_full", "off")
    merge_cfg = job_config(DATA, source, args.spaces, "out_merge", "require", args.deletion_vectors, "merge") \
        if args.merge else None
    first_inc = run_backfill(spark, inc_cfg)  # the initial publish (full)
    first_full = run_backfill(spark, full_cfg)
    if merge_cfg:
        run_backfill(spark, merge_cfg)
    logging.info("setup: %d rows x %d, %d spaces, initial backfills %s / %s, %.1fs", rows, args.dim, args.spaces,
                 first_inc.engine, first_full.engine, time.perf_counter() - t)
    runs = []
    round_seed = 0
    for fraction in args.fractions:
        inc_s, full_s, merge_s, commits, changed, picks, jobs_before, jobs_all = [], [], [], [], [], [], [], []
        for _ in range(args.repeats):
            round_seed += 1
            changed.append(change_source(spark, source, rows, args.dim, fraction, round_seed))
            picks.append(auto_picks(spark, inc_cfg.output_location, args.spaces, sum(changed[-1].values()), rows,
                                      args.dim))
            inc, seconds, before, total = timed_backfill(spark, inc_cfg)
            inc_s.append(seconds)
            commits.append(last_operation(spark, inc_cfg.output_location))
            jobs_before.append(before)
            jobs_all.append(total)
            t = time.perf_counter()
            full = run_backfill(spark, full_cfg)
            full_s.append(time.perf_counter() - t)
            if merge_cfg:
                t = time.perf_counter()
                merged = run_backfill(spark, merge_cfg)
                merge_s.append(time.perf_counter() - t)
                assert last_operation(spark, merge_cfg.output_location) == "MERGE", merged.actions
            vacuum(spark, inc_cfg.output_location, full_cfg.output_location,
                   *([merge_cfg.output_location] if merge_cfg else []))  # untimed: keeps the disk bounded
            assert {a for a, _ in inc.actions.values()} == {"incremental"}, inc.actions
            assert {a for a, _ in full.actions.values()} == {"full"}, full.actions
            logging.info("rows %d, fraction %g: changed %s, incremental %.2fs (%s; %d Spark jobs before its commit), "
                         "full (%s) %.2fs, MERGE %s", rows, fraction, changed[-1], inc_s[-1], commits[-1], before,
                         full.engine, full_s[-1], f"{merge_s[-1]:.2f}s" if merge_s else "not measured")
        equal = same_content(spark, inc_cfg.output_location, full_cfg.output_location, args.check_sample)
        assert equal, "incremental and full outputs differ"
        if merge_cfg:
            assert same_content(spark, merge_cfg.output_location, full_cfg.output_location, args.check_sample), \
                "MERGE and full outputs differ"
        runs.append({
            "changed_fraction": fraction, "rows": rows, "dim": args.dim, "spaces": args.spaces,
            "repeats": args.repeats, "cores": os.cpu_count(), "deletion_vectors": args.deletion_vectors,
            "changed_rows": changed, "incremental_seconds_all": inc_s, "full_seconds_all": full_s,
            "incremental_seconds": statistics.median(inc_s), "full_seconds": statistics.median(full_s),
            "ratio": statistics.median(i / f for i, f in zip(inc_s, full_s)),
            "full_engine": full.engine, "outputs_equal": equal, "auto_picks": picks,
            "spark_jobs_before_merge": statistics.median(jobs_before),
            "spark_jobs_incremental": statistics.median(jobs_all),
            "incremental_commits": commits,  # the Delta operation of each round's incremental commit
            **({"merge_seconds_all": merge_s, "merge_seconds": statistics.median(merge_s),
                "merge_ratio": statistics.median(m / f for m, f in zip(merge_s, full_s))} if merge_s else {}),
        })
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000],
                        help="source sizes; two or more also fit time = a + b * N for both paths (the slope)")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spaces", type=int, default=4)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.001, 0.01, 0.1])
    parser.add_argument("--slope-fraction", type=float, default=0.01, help="the changed fraction the slope is fitted at")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-deletion-vectors", dest="deletion_vectors", action="store_false",
                        help="a copy-on-write incremental output (no delta.enableDeletionVectors)")
    parser.add_argument("--check-sample", type=float, default=1.0,
                        help="compare the vectors of this share of the ids (by hash); every (space, id) is always "
                             "compared by count and an exact id checksum")
    parser.add_argument("--output", help="the results file's name under benchmarks/results (default: incremental.json "
                                         "for one size, incremental_slope.json for several, incremental_no_dv.json)")
    parser.add_argument("--no-merge", dest="merge", action="store_false",
                        help="do not measure the MERGE beside it (a third output, backfill.incremental_commit: merge)")
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--keep-data", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from bclib.config import SparkSettings
    from bclib.spark import get_or_create

    spark = get_or_create(SparkSettings(master="local[*]", shuffle_partitions=4,
                                        warehouse_dir=str(DATA.parent / "incremental_wh"),
                                        conf={"spark.driver.memory": args.driver_memory}))
    runs = []
    RESULTS.mkdir(parents=True, exist_ok=True)
    name = args.output or (("incremental_slope.json" if len(args.rows) > 1 else "incremental.json")
                           if args.deletion_vectors else "incremental_no_dv.json")
    for rows in args.rows:
        runs += measure_size(spark, rows, args)
        slope = slope_summary(runs, args.slope_fraction)  # written after each size: a long run keeps what it has
        (RESULTS / name).write_text(json.dumps({**(slope or {}), "check_sample": args.check_sample, "runs": runs},
                                               indent=2))
    print(f"\n{'rows':>10} {'changed':>8} {'rows changed':>13} {'incremental s':>14} {'MERGE s':>8} {'full s':>8} "
          f"{'ratio':>6} {'jobs before commit':>19}")
    for r in runs:
        n = sum(sum(c.values()) for c in r["changed_rows"]) // len(r["changed_rows"])
        print(f"{r['rows']:>10,} {r['changed_fraction']:>8.3%} {n:>13,} {r['incremental_seconds']:>14.2f} "
              f"{r.get('merge_seconds', float('nan')):>8.2f} {r['full_seconds']:>8.2f} {r['ratio']:>6.3f} "
              f"{r['spark_jobs_before_merge']:>19g}")
    if slope:
        print(f"slope at {slope['changed_fraction']:.1%} changed: incremental {slope['incremental_slope_s_per_million']:.2f} "
              f"s per million rows, full {slope['full_slope_s_per_million']:.2f}; marginal ratio "
              f"{slope['marginal_ratio'] if slope['marginal_ratio'] is not None else float('nan'):.3f}; fixed "
              f"{slope['fixed_seconds']:.1f} s; ratio at {slope['largest_rows']:,} "
              f"rows {slope['ratio_at_largest']:.3f}")
        if "merge_slope_s_per_million" in slope:
            print(f"the MERGE beside it: {slope['merge_slope_s_per_million']:.2f} s per million rows (marginal ratio "
                  f"{slope['merge_marginal_ratio']:.3f}), fixed {slope['merge_fixed_seconds']:.1f} s")
    if not args.keep_data:
        shutil.rmtree(DATA, ignore_errors=True)


if __name__ == "__main__":
    main()
