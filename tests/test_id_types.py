"""One id type rule for both engines, checked across every version before anything is written; the gate's minimum.

Accepted: bigint, string; int/smallint/tinyint and decimal(p <= 18, 0) read (and hashed) as bigint.
Refused by name (IdTypeError): decimal(20, 0) and any other type, and numeric ids in one version beside
string ids in another. Int in one version and bigint in the next fall in the same evaluation slice, so the
gate judges the edge on as many ids as with bigint everywhere; below gate.min_heldout_ids it refuses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from bclib.errors import GateRejectedError, IdTypeError
from bclib.steps.backfill import run_backfill
from bclib.steps.evaluate import held_out, run_evaluate
from bclib.steps.fit import run_fit
from bclib.tables.delta import current_delta_version, table_exists

from conftest import assert_same_vectors, small_config

N, DIMS = 600, (6, 8)
BIG = 10**17  # decimal(18, 0) ids beyond int32 and float64's exact range
SALT = "bcemb-fit"


def _cfg(tmp_path, out="out", **sections):
    emb = {"location": str(tmp_path / "emb" / "v{version}"), "versions": [0, 1]}
    return small_config(tmp_path, embeddings=emb, output_location=str(tmp_path / out),
                        evaluate={"label_location": None}, demo={"dims": list(DIMS)}, **sections)


def _vectors(n: int = N):
    rng = np.random.default_rng(0)
    z1 = rng.normal(size=(n, DIMS[1])).astype(np.float32)
    z0 = (z1 @ rng.normal(size=(DIMS[1], DIMS[0]))).astype(np.float32)
    return z0, z1


def _write(spark, location, id_type: str, z, ids, mode="overwrite"):
    """(id, vector) rows with the id column cast to `id_type` (int, bigint, decimal(p,s), string)."""
    df = spark.createDataFrame([(int(i), z[k].tolist()) for k, i in enumerate(ids)], "id long, vector array<float>")
    df.selectExpr(f"CAST(id AS {id_type}) AS id", "vector").coalesce(1).write.format("delta").mode(mode) \
        .option("overwriteSchema", "true").save(location)


def _both(spark, cfg, types=("bigint", "bigint"), ids=None):
    z0, z1 = _vectors()
    ids = list(range(N)) if ids is None else ids
    _write(spark, cfg.version_location(0), types[0], z0, ids)
    _write(spark, cfg.version_location(1), types[1], z1, ids)
    return z1


def _delta_versions(spark, cfg) -> dict[str, int]:
    locs = {"registry": cfg.registry_location, "output": cfg.output_location, "metrics": cfg.metrics_location}
    return {k: current_delta_version(spark, v) if table_exists(spark, v) else -1 for k, v in locs.items()}


def _space(spark, location, j=0):
    df = spark.read.format("delta").load(location)
    rows = sorted(df.where(f"space_version = {j}").select("id", "vector").collect(), key=lambda r: r.id)
    return dict(df.dtypes)["id"], [r.id for r in rows], np.array([r.vector for r in rows], dtype=np.float32)


# --------------------------------------------------------------------------- the rule, pure


@pytest.mark.parametrize("spark_type, read_as", [
    ("LongType()", "bigint"), ("IntegerType()", "bigint"), ("ShortType()", "bigint"), ("ByteType()", "bigint"),
    ("StringType()", "string"), ("DecimalType(18, 0)", "bigint"), ("DecimalType(10, 0)", "bigint"),
    ("DecimalType(19, 0)", None), ("DecimalType(20, 0)", None), ("DecimalType(18, 2)", None), ("DoubleType()", None),
    ("FloatType()", None), ("BinaryType()", None), ("DateType()", None), ("ArrayType(LongType())", None),
])
def test_the_id_rule_per_type(spark_type, read_as):
    from pyspark.sql import types as T

    from bclib.tables.ids import spark_read_type

    assert spark_read_type(eval(spark_type, vars(T))) == read_as


# --------------------------------------------------------------------------- refused and converted types


def test_decimal_20_ids_are_refused_by_name_before_anything_is_written(spark, tmp_path):
    cfg = _cfg(tmp_path, backfill={"engine": "arrow"})
    _both(spark, cfg)
    run_fit(spark, cfg)
    _both(spark, cfg, ("bigint", "decimal(20,0)"))  # as a JDBC import from Oracle arrives
    before = _delta_versions(spark, cfg)
    message = (r"version 1 at '.*/emb/v1': id column 'id' has type decimal\(20,0\), which bcemb does not accept as an "
               r"id; accepted id types: bigint, string.*CAST\(id AS BIGINT\) if every id .*, else CAST\(id AS STRING\)")
    with pytest.raises(IdTypeError, match=message):
        run_backfill(spark, cfg)
    with pytest.raises(IdTypeError, match=message):
        run_fit(spark, cfg, refit=["all"])
    assert _delta_versions(spark, cfg) == before and before["output"] == -1


def test_decimal_18_ids_are_written_as_bigint_by_both_engines(spark, tmp_path):
    ids = [BIG + 7919 * k for k in range(N)]
    spark_cfg = _cfg(tmp_path, "out_spark", backfill={"engine": "spark"})
    arrow_cfg = _cfg(tmp_path, "out_arrow", backfill={"engine": "arrow"})
    _both(spark, spark_cfg, ("decimal(18,0)", "decimal(18,0)"), ids)
    records = run_fit(spark, spark_cfg).records
    assert records[0].fit_metrics["holdout_relative_l2"] < 1e-3  # pairs matched by their exact ids
    s, a = run_backfill(spark, spark_cfg), run_backfill(spark, arrow_cfg)
    assert (s.engine, a.engine) == ("spark", "arrow") and s.rows == a.rows == N
    s_type, s_ids, s_vec = _space(spark, spark_cfg.output_location)
    a_type, a_ids, a_vec = _space(spark, arrow_cfg.output_location)
    assert s_type == a_type == "bigint"
    assert s_ids == a_ids == ids
    assert_same_vectors(a_vec, s_vec, "space 0")


def test_string_ids_beside_numeric_ids_are_refused_before_anything_is_written(spark, tmp_path):
    cfg = _cfg(tmp_path, backfill={"engine": "spark", "force": True})
    _both(spark, cfg)
    run_fit(spark, cfg)
    run_backfill(spark, cfg)
    z0, _ = _vectors()
    _write(spark, cfg.version_location(0), "string", z0, range(N))  # version 0 re-exported with string ids
    before = _delta_versions(spark, cfg)
    message = (r"id column 'id' holds numeric ids in version 1 at '.*/emb/v1' \(bigint\) but string ids in version 0 "
               r"at '.*/emb/v0' \(string\): the same entity must have the same id in every version")
    for step in (lambda: run_fit(spark, cfg, refit=["all"]), lambda: run_backfill(spark, cfg),
                 lambda: run_evaluate(spark, cfg)):
        with pytest.raises(IdTypeError, match=message):
            step()
    assert _delta_versions(spark, cfg) == before and min(before.values()) >= 0


# --------------------------------------------------------------------------- one slice whatever the integer type


def test_int_and_bigint_versions_share_their_slices_and_the_gate_counts_them_all(spark, tmp_path):
    mixed = _cfg(tmp_path / "mixed")
    bigint = _cfg(tmp_path / "bigint")
    _both(spark, mixed, ("int", "bigint"))
    _both(spark, bigint, ("bigint", "bigint"))
    hm, hb = held_out(spark, mixed, labels=False), held_out(spark, bigint, labels=False)
    assert hm.window == hb.window
    for v in (0, 1):
        np.testing.assert_array_equal(hm.samples[v].ids, hb.samples[v].ids)
        np.testing.assert_array_equal(hm.samples[v].hashes, hb.samples[v].hashes)
    # bigint ids hash as before the id rule: the slice is what Spark's own expression selects on the raw table
    lo = hb.window[0]
    raw = spark.read.format("delta").load(bigint.version_location(1)).where(
        f"pmod(xxhash64('{SALT}', id), {1 << 52}) / {float(1 << 52)} >= {lo}")
    assert sorted(r.id for r in raw.select("id").collect()) == hb.samples[1].ids.tolist()
    shared = len(np.intersect1d(hb.samples[0].ids, hb.samples[1].ids))
    assert shared >= mixed.gate.min_heldout_ids

    run_fit(spark, mixed)
    result = run_backfill(spark, mixed)
    assert [(v.space, v.sample_size, v.passed) for v in result.gate.verdicts] == [(0, shared, True)]
    out_type, out_ids, _ = _space(spark, mixed.output_location)
    assert out_type == "bigint" and out_ids == list(range(N))


def test_a_type_widened_source_backfills_on_the_arrow_engine_as_on_spark(spark, tmp_path):
    auto_cfg = _cfg(tmp_path, "out_auto")
    spark_cfg = _cfg(tmp_path, "out_spark", backfill={"engine": "spark"})
    z0, z1 = _vectors()
    _write(spark, auto_cfg.version_location(0), "bigint", z0, range(N))
    loc = auto_cfg.version_location(1)
    half = N // 2
    _write(spark, loc, "int", z1[:half], range(half))  # old files: int32 ids
    spark.sql(f"ALTER TABLE delta.`{loc}` SET TBLPROPERTIES ('delta.enableTypeWidening' = 'true')")
    spark.sql(f"ALTER TABLE delta.`{loc}` ALTER COLUMN id TYPE BIGINT")
    _write(spark, loc, "bigint", z1[half:], range(half, N), mode="append")  # new files: int64 ids
    run_fit(spark, auto_cfg)
    a, s = run_backfill(spark, auto_cfg), run_backfill(spark, spark_cfg)
    assert (a.engine, s.engine) == ("arrow", "spark") and a.rows == s.rows == N
    a_type, a_ids, a_vec = _space(spark, auto_cfg.output_location)
    s_type, s_ids, s_vec = _space(spark, spark_cfg.output_location)
    assert a_type == s_type == "bigint" and a_ids == s_ids == list(range(N))
    assert_same_vectors(a_vec, s_vec, "space 0")


# --------------------------------------------------------------------------- the gate fails closed


def test_the_gate_refuses_an_edge_judged_on_fewer_held_out_ids_than_the_minimum(spark, tmp_path):
    cfg = _cfg(tmp_path, gate={"min_heldout_ids": 1000})
    _both(spark, cfg)
    run_fit(spark, cfg)
    heldout = held_out(spark, cfg, labels=False)
    n = len(np.intersect1d(heldout.samples[0].ids, heldout.samples[1].ids))
    assert 50 < n < 1000
    with pytest.raises(GateRejectedError, match=rf"space 0 .*edge 1 -> 0 was judged on {n} held-out id\(s\), fewer "
                                                r"than gate.min_heldout_ids = 1000: .*fit.holdout.*"):
        run_backfill(spark, cfg)
    assert not table_exists(spark, cfg.output_location)
    rows = {r.metric: r for r in spark.read.format("delta").load(cfg.metrics_location).collect()}
    assert rows["gate"].value == 0.0 and rows["gate.heldout_ids"].value == n
    detail = json.loads(rows["gate.heldout_ids"].detail)
    assert (detail["passed"], detail["threshold"]) == (False, 1000.0)
