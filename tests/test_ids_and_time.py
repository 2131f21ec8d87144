"""Ids keep their exact value: 64-bit ids near 2^63 beside a null, and string ids.

Ids travel as Arrow arrays end to end (never through float64), so 2^63 - 1 and 2^63 - 2 stay distinct.
"""

from __future__ import annotations


import numpy as np
import pytest

from bclib.steps.backfill import run_backfill
from bclib.steps.fit import run_fit

from conftest import small_config

N = 600


def _versions(spark, cfg, ids, null_id=False):
    rng = np.random.default_rng(3)
    z1 = rng.normal(size=(len(ids), 8)).astype(np.float32)
    z0 = (z1 @ rng.normal(size=(8, 6))).astype(np.float32)
    id_type = "string" if isinstance(ids[0], str) else "long"
    for v, z in ((0, z0), (1, z1)):
        rows = [(i, z[k].tolist()) for k, i in enumerate(ids)]
        if null_id and v == 1:
            rows.append((None, z[0].tolist()))
        spark.createDataFrame(rows, f"id {id_type}, vector array<float>").coalesce(1).write.format("delta") \
            .mode("overwrite").save(cfg.version_location(v))
    return z0, z1


def _cfg(tmp_path, **kw):
    emb = {"location": str(tmp_path / "emb" / "v{version}"), "versions": [0, 1]}
    return small_config(tmp_path, embeddings=emb, evaluate={"label_location": None}, gate={"enabled": False}, **kw)


def _output(spark, cfg):
    rows = spark.read.format("delta").load(cfg.output_location).where("space_version = 0").select("id", "vector")
    table = rows.toArrow()
    return table.column("id").to_pylist(), table


@pytest.mark.parametrize("kind", ["near 2^63 with a null id (quarantined)", "string ids"])
def test_ids_keep_their_exact_value_through_fit_and_backfill(spark, tmp_path, kind):
    if kind.startswith("near"):
        ids = [2**63 - 1 - k for k in range(N)]  # adjacent values: equal as float64
        assert len({float(i) for i in ids}) < N
        cfg = _cfg(tmp_path, backfill={"quarantine_location": str(tmp_path / "quarantine")})
    else:
        ids = [f"entity-{k:05d}-é" for k in range(N)]
        cfg = _cfg(tmp_path)
    z0, z1 = _versions(spark, cfg, ids, null_id=kind.startswith("near"))
    records = run_fit(spark, cfg).records
    assert records[0].fit_metrics["holdout_relative_l2"] < 1e-3  # exact linear relation: pairs matched right
    run_backfill(spark, cfg)
    out_ids, table = _output(spark, cfg)
    assert sorted(out_ids) == sorted(ids)
    got = dict(zip(out_ids, table.column("vector").to_pylist()))
    expected = records[0].transform.apply(z1.astype(np.float64))
    for k in (0, 1, N - 1):
        np.testing.assert_allclose(got[ids[k]], expected[k], rtol=1e-4, atol=1e-4)
    if kind.startswith("near"):
        q = spark.read.format("delta").load(str(tmp_path / "quarantine")).collect()
        assert len(q) == 1 and q[0].id is None and "null id" in q[0].reason


# timestamps under a non-UTC TZ and session time zone: tests/test_cluster.py (its spark-submit run)
