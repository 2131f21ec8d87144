"""Ids keep their exact value (64-bit ids near 2^63 beside a null, string ids); timestamps are true UTC instants.

Ids travel as Arrow arrays end to end (never through float64), so 2^63 - 1 and 2^63 - 2 stay distinct;
every timestamp bcemb writes (registry created_at/retired_at, output produced_at, metrics computed_at) is
the instant it was written whatever the process's `TZ` and Spark's session time zone.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone

import numpy as np
import pytest
import yaml

from bclib.steps.backfill import run_backfill
from bclib.steps.fit import run_fit

from conftest import REPO, small_config

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


def test_timestamps_are_utc_instants_whatever_the_time_zones(spark, tmp_path, subprocess_jvm_options):
    """A demo run under TZ=America/Los_Angeles with Spark's session time zone Asia/Kolkata writes true instants."""
    data = {
        "spark": {"master": "local[2]", "shuffle_partitions": 2,
                  "conf": {"spark.ui.enabled": "false", "spark.driver.extraJavaOptions": subprocess_jvm_options,
                           "spark.sql.session.timeZone": "Asia/Kolkata"}},
        "embeddings": {"location": str(tmp_path / "emb" / "v{version}"), "versions": [0, 1, 2]},
        "registry_location": str(tmp_path / "registry"), "output_location": str(tmp_path / "out"),
        "metrics_location": str(tmp_path / "metrics"),
        "fit": {"min_pairs": 50, "holdout": 0.25},
        "evaluate": {"label_location": None, "report_dir": str(tmp_path / "reports"), "neighbours_k": 5},
        "demo": {"n_entities": 1500, "dims": [12, 16, 20], "block_rows": 512},
    }
    conf = tmp_path / "job.yaml"
    conf.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TZ": "America/Los_Angeles", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    before = datetime.now(timezone.utc).timestamp()
    out = subprocess.run([sys.executable, "-m", "bclib.cli", "demo", "--config", str(conf), "--log-level", "WARNING"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    after = datetime.now(timezone.utc).timestamp()

    def epochs(location, column):
        df = spark.read.format("delta").load(str(tmp_path / location)).where(f"{column} IS NOT NULL")
        return [r[0] for r in df.selectExpr(f"unix_micros({column}) / 1e6").collect()]

    stamps = {c: epochs(loc, c) for loc, c in (("registry", "created_at"), ("out", "produced_at"),
                                                ("metrics", "computed_at"))}
    for column, values in stamps.items():
        assert values, column
        assert all(before - 5 <= v <= after + 5 for v in values), (column, before, min(values), max(values), after)
