"""The two backfill engines give the same table, over file and row-group layouts; auto says why it picks.

The arrow engine (executors read and write Parquet with pyarrow, one delta-rs commit) against the spark
engine (mapInArrow over Spark's reader and writer): the same ids per space, vectors within the promised
float32 tolerance (bclib.numerics.kernel.VECTOR_RTOL; the engines batch rows differently).
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from bclib.errors import EngineUnavailableError, InvalidVectorError
from bclib.steps.backfill import run_backfill
from bclib.steps.fit import run_fit
from bclib.tables.delta import current_delta_version, delta_table

from conftest import assert_same_vectors, small_config

DIMS = [6, 8]


def _cfg(tmp_path, out="out", **sections):
    emb = {"location": str(tmp_path / "emb" / "v{version}"), "versions": [0, 1]}
    return small_config(tmp_path, embeddings=emb, output_location=str(tmp_path / out),
                        evaluate={"label_location": None}, demo={"dims": DIMS}, **sections)


def _write(spark, cfg, layout: str, n: int = 600, seed: int = 0):
    """Versions 0 and 1 (linear relation); version 1 in the given file/row-group layout."""
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, DIMS[1])).astype(np.float32)
    z0 = (z1 @ rng.normal(size=(DIMS[1], DIMS[0]))).astype(np.float32)
    spark.createDataFrame([(i, z0[i].tolist()) for i in range(n)], "id long, vector array<float>") \
        .write.format("delta").mode("overwrite").save(cfg.version_location(0))
    df = spark.createDataFrame([(i, z1[i].tolist()) for i in range(n)], "id long, vector array<float>")
    loc = cfg.version_location(1)
    if layout == "many_small_files":
        df.repartition(24).write.format("delta").mode("overwrite").save(loc)
    elif layout == "one_big_file_many_row_groups":
        df.coalesce(1).write.format("delta").option("parquet.block.size", 4096).mode("overwrite").save(loc)
    elif layout == "one_row_files":  # a streaming ingestion's layout
        df.coalesce(1).write.format("delta").option("maxRecordsPerFile", 1).mode("overwrite").save(loc)
    elif layout == "with_empty_files":
        df.coalesce(2).write.format("delta").mode("overwrite").save(loc)
        df.where("id < 0").repartition(3).write.format("delta").mode("append").save(loc)  # appends no rows
    else:
        raise ValueError(layout)


def _space(spark, location, j):
    rows = sorted(spark.read.format("delta").load(location).where(f"space_version = {j}")
                  .select("id", "vector", "chain_id", "source_version").collect(), key=lambda r: r.id)
    return ([r.id for r in rows], np.array([r.vector for r in rows], dtype=np.float32),
            {(r.chain_id, r.source_version) for r in rows})


def _same_table(spark, a, b, spaces=(0,)):
    for j in spaces:
        ia, va, ca = _space(spark, a, j)
        ib, vb, cb = _space(spark, b, j)
        assert ia == ib
        assert_same_vectors(va, vb, f"space {j}")
        assert ca == cb


@pytest.mark.parametrize("layout, batch_rows", [("many_small_files", 7), ("one_big_file_many_row_groups", 10_000),
                                               ("with_empty_files", 7)])
def test_arrow_and_spark_engines_write_the_same_table(spark, tmp_path, layout, batch_rows):
    spark_cfg = _cfg(tmp_path, "out_spark", backfill={"engine": "spark", "arrow_batch_rows": batch_rows})
    arrow_cfg = _cfg(tmp_path, "out_arrow", backfill={"engine": "arrow", "arrow_task_mb": 1})
    _write(spark, spark_cfg, layout)
    run_fit(spark, spark_cfg)
    a = run_backfill(spark, arrow_cfg)
    s = run_backfill(spark, spark_cfg)
    assert (a.engine, s.engine) == ("arrow", "spark") and a.rows == s.rows == 600
    _same_table(spark, arrow_cfg.output_location, spark_cfg.output_location)


def test_an_all_invalid_file_in_quarantine_mode(spark, tmp_path):
    q = str(tmp_path / "quarantine")
    spark_cfg = _cfg(tmp_path, "out_spark", backfill={"engine": "spark", "quarantine_location": q + "_s"})
    arrow_cfg = _cfg(tmp_path, "out_arrow", backfill={"engine": "arrow", "quarantine_location": q + "_a"})
    _write(spark, spark_cfg, "many_small_files")
    run_fit(spark, spark_cfg)
    bad = spark.createDataFrame([(10_000 + i, [float("nan")] * DIMS[1]) for i in range(20)] +
                                [(20_000, [1.0]), (20_001, None)], "id long, vector array<float>")
    bad.coalesce(1).write.format("delta").mode("append").save(spark_cfg.version_location(1))  # a file of bad rows
    a, s = run_backfill(spark, arrow_cfg), run_backfill(spark, spark_cfg)
    assert a.engine == "arrow" and a.rows == s.rows == 600 and a.quarantined == s.quarantined == 22
    _same_table(spark, arrow_cfg.output_location, spark_cfg.output_location)


def test_a_bad_row_fails_the_arrow_engine_naming_the_id_and_writes_nothing(spark, tmp_path):
    cfg = _cfg(tmp_path, backfill={"engine": "arrow"})
    _write(spark, cfg, "many_small_files")
    run_fit(spark, cfg)
    run_backfill(spark, cfg)
    before = current_delta_version(spark, cfg.output_location)
    bad = spark.createDataFrame([(100_077, [float("inf")] * DIMS[1])], "id long, vector array<float>")
    bad.write.format("delta").mode("append").save(cfg.version_location(1))
    forced = _cfg(tmp_path, backfill={"engine": "arrow", "force": True})  # a full rewrite: the arrow engine's path
    with pytest.raises(InvalidVectorError, match=r"column 'vector': id=100077 holds NaN or Inf"):
        run_backfill(spark, forced)
    assert current_delta_version(spark, cfg.output_location) == before


def test_arrow_commits_read_by_spark_delta_rs_and_duckdb_with_history_and_time_travel(spark, tmp_path):
    from deltalake import DeltaTable

    cfg = _cfg(tmp_path, backfill={"engine": "arrow", "force": True})
    _write(spark, cfg, "many_small_files")
    run_fit(spark, cfg)
    run_backfill(spark, cfg)
    first = _space(spark, cfg.output_location, 0)
    _write(spark, cfg, "many_small_files", seed=1)  # new vectors, same ids
    run_fit(spark, cfg, refit=["all"])
    run_backfill(spark, cfg)
    latest = current_delta_version(spark, cfg.output_location)
    history = delta_table(spark, cfg.output_location).history().collect()  # DESCRIBE HISTORY
    meta = json.loads(history[0].userMetadata)
    assert meta["bcemb"] == "backfill" and meta["engine"] == "arrow" and history[0].operation == "WRITE"
    old = spark.read.format("delta").option("versionAsOf", latest - 1).load(cfg.output_location) \
        .where("space_version = 0").orderBy("id").select("vector").collect()
    # the same stored files read back (time travel; delta-rs): bitwise, nothing is recomputed
    assert np.array(old, dtype=np.float32).reshape(len(old), -1).tobytes() == first[1].tobytes()
    ids, vectors, _ = _space(spark, cfg.output_location, 0)
    dt = DeltaTable(cfg.output_location)
    table = dt.to_pyarrow_table(filters=[("space_version", "=", 0)]).sort_by("id")
    assert table.column("id").to_pylist() == ids
    assert np.array(table.column("vector").to_pylist(), dtype=np.float32).tobytes() == vectors.tobytes()
    assert dt.version() == latest and json.loads(dt.history(1)[0]["userMetadata"]) == meta
    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the dev extra")
    dataset = dt.to_pyarrow_dataset()  # noqa: F841 (duckdb scans the Python variable by name)
    assert duckdb.sql("SELECT count(*) FROM dataset WHERE space_version = 0").fetchall()[0][0] == len(ids)


def test_auto_says_why_it_falls_back_and_arrow_refuses_by_name(spark, tmp_path):
    cfg = _cfg(tmp_path)
    _write(spark, cfg, "many_small_files")
    spark.sql(f"ALTER TABLE delta.`{cfg.version_location(1)}` SET TBLPROPERTIES (delta.enableDeletionVectors = true)")
    spark.sql(f"DELETE FROM delta.`{cfg.version_location(1)}` WHERE id = 3")  # a deletion vector
    run_fit(spark, cfg)
    auto = run_backfill(spark, cfg)
    assert auto.engine == "spark" and "deletion vectors" in auto.engine_reason and auto.rows == 599
    forced = _cfg(tmp_path, "out2", backfill={"engine": "arrow"})
    with pytest.raises(EngineUnavailableError, match=r"backfill.engine is 'arrow' but the source table has deletion "
                                                     r"vectors \(its files still hold deleted rows\)"):
        run_backfill(spark, forced)


def _files_per_space(location: str) -> dict:
    from deltalake import DeltaTable

    counts: dict = {}
    for uri in DeltaTable(location).file_uris():
        j = int(uri.split("space_version=")[1].split("/")[0])
        counts[j] = counts.get(j, 0) + 1
    return counts


def test_a_source_of_one_row_files_gets_a_file_per_core_per_space_on_both_engines(spark, tmp_path):
    """600 one-row files (a streaming ingestion): Spark would split them in ~19 scans of ~32 files and the spark
    engine wrote a file per split per space (19); the arrow engine read them all in one task. Now each engine
    spreads them over the cores (local[2]: 2 tasks) and writes one file per core per space, the same table."""
    spark_cfg = _cfg(tmp_path, "out_spark", backfill={"engine": "spark"})
    arrow_cfg = _cfg(tmp_path, "out_arrow", backfill={"engine": "arrow"})
    _write(spark, spark_cfg, "one_row_files")
    assert len(delta_table(spark, spark_cfg.version_location(1)).toDF().inputFiles()) == 600
    run_fit(spark, spark_cfg)
    a, s = run_backfill(spark, arrow_cfg), run_backfill(spark, spark_cfg)
    assert (a.engine, s.engine) == ("arrow", "spark") and a.rows == s.rows == 600
    assert _files_per_space(arrow_cfg.output_location) == {0: 2}
    assert _files_per_space(spark_cfg.output_location) == {0: 2}
    _same_table(spark, arrow_cfg.output_location, spark_cfg.output_location)
    assert spark.conf.get("spark.sql.files.maxPartitionNum", None) is None  # the attempt's cap is not left behind


def test_the_task_planner_splits_big_files_and_packs_small_ones(tmp_path):
    import pyarrow.parquet as pq

    from bclib.tables.parquet_files import plan_tasks

    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"x": np.arange(100_000, dtype=np.int64)}), big, row_group_size=10_000)
    smalls = []
    for i in range(5):
        p = tmp_path / f"s{i}.parquet"
        pq.write_table(pa.table({"x": np.arange(100, dtype=np.int64)}), p)
        smalls.append((str(p), p.stat().st_size))
    rg = pq.read_metadata(big).row_group(0).total_byte_size
    tasks = plan_tasks([(str(big), big.stat().st_size), *smalls], target_bytes=3 * rg)
    assert sum(t.rows for t in tasks) == 100_000 + 500
    assert [len(g) for t in tasks for p, g in t.parts if p == str(big)] == [3, 3, 3, 1]
    assert len(tasks) == 4  # the small files ride with the last row group of the big one


def test_probe_rows_stay_under_a_few_hundred_file_opens():
    from bclib.steps.backfill import PROBE_FILES, probe_rows_for

    assert probe_rows_for(None, 256) == 10_000  # unknown layout: the whole probe
    assert probe_rows_for((20_000, 20_000 * 1_000), 256) == PROBE_FILES  # one-row files: a row per file opened
    assert probe_rows_for((20_000, 20_000 * 2_064), 256) == 2 * PROBE_FILES  # two rows per file
    assert probe_rows_for((4, 4 * 128 * 2**20), 256) == 10_000  # big files: the probe fits in the first one
    assert probe_rows_for((0, 0), 256) == 10_000


def test_many_small_files_are_spread_over_the_cores_and_no_further(tmp_path):
    """A streaming source (many one-row files, their opening is the work): the planner spreads the files over
    `parallelism` tasks of about equal file counts, never more tasks (each task writes one file per space),
    keeps every row once; a source of few big files is cut by bytes alone, whatever the parallelism."""
    import pyarrow.parquet as pq

    from bclib.tables.parquet_files import plan_tasks
    from bclib.spark import max_partition_num

    smalls = []
    for i in range(301):
        p = tmp_path / f"s{i}.parquet"
        pq.write_table(pa.table({"x": np.array([i], dtype=np.int64)}), p)
        smalls.append((str(p), p.stat().st_size))
    one = plan_tasks(smalls, target_bytes=128 * 2**20)
    assert len(one) == 1 and one[0].rows == 301  # parallelism 1: one task, as before
    for cores, expected in ((2, 2), (7, 7), (64, 10)):  # 301 x 4 MiB of opening fills 10 tasks of 128 MiB
        tasks = plan_tasks(smalls, target_bytes=128 * 2**20, parallelism=cores)
        assert len(tasks) == expected, cores
        files = [len(t.parts) for t in tasks]
        assert max(files) - min(files) <= 1 and sum(files) == 301  # even, each file once
        assert [p for t in tasks for p, _ in t.parts] == [p for p, _ in smalls]  # file order kept
    # more cores than the opening cost fills stay idle (no tasks of a file or two)
    assert len(plan_tasks(smalls, target_bytes=1204 * 2**20, parallelism=64)) == 2
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"x": np.arange(400_000, dtype=np.int64)}), big, row_group_size=100_000)
    bytes_only = plan_tasks([(str(big), big.stat().st_size)], target_bytes=2**30, parallelism=64)
    assert len(bytes_only) == 1  # its bytes are the work: cut by bytes, one task, one output file per space
    # the spark engine's scan cap: the files one space needs, or the cores when that is more
    assert max_partition_num(20_000, 250_000, 2) == 2
    assert max_partition_num(10**9, 250_000, 2) == 4000
    assert max_partition_num(0, 250_000, 8) == 8
