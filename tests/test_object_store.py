"""The whole daily life on an object store: every table on `s3a://` (moto's S3-compatible server on 127.0.0.1),
configured through `storage.options` alone. One process (the Python API, one JVM) runs generate, the scheduled
job (fit, gate, backfill, evaluate), a forced rewrite on each engine, a second run that commits nothing, status
and maintain; delta-rs reads the output back with the same options."""

from __future__ import annotations


import pytest

from conftest import s3a_jars_conf, store_pipeline_report

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
import numpy as np
import bclib
from bclib.storage import store_options

def spaces(spark, cfg):
    df = spark.read.format("delta").load(cfg.output_location)
    t = df.orderBy("space_version", "id").select("space_version", "id", "vector").toArrow()
    out = {}
    for j in sorted(set(t.column("space_version").to_pylist())):
        m = t.filter(__import__("pyarrow.compute", fromlist=["x"]).equal(t.column("space_version"), j))
        out[j] = (m.column("id").to_numpy(), np.array(m.column("vector").to_pylist(), dtype=np.float64))
    return out

cfg = bclib.load_config(sys.argv[1])
spark = bclib.session(cfg)
report = {}
report["generate"] = bclib.generate(spark, cfg).summary()
first = bclib.run(spark, cfg)
report["run1"] = {"commits": first.commits, "engine": first.backfill.engine, "rows": first.backfill.rows,
                  "evaluated": len(first.evaluate.pairs) if first.evaluate else 0}
written = {}
for engine in ("spark", "arrow"):
    forced = bclib.load_config(sys.argv[1], {"backfill.engine": engine, "backfill.force": True})
    result = bclib.backfill(spark, forced)
    written[engine] = spaces(spark, cfg)
    report[engine] = {"engine": result.engine, "commits": result.commits, "rows": result.rows}
a, b = written["spark"], written["arrow"]
report["same_ids"] = sorted(a) == sorted(b) and all(np.array_equal(a[j][0], b[j][0]) for j in a)
report["max_rel_diff"] = max(float(np.max(np.linalg.norm(a[j][1] - b[j][1], axis=1)
                                          / np.linalg.norm(b[j][1], axis=1))) for j in a)
report["rows_per_space"] = {str(j): int(len(a[j][0])) for j in a}
report["unique_ids"] = all(len(set(a[j][0].tolist())) == len(a[j][0]) for j in a)
second = bclib.run(spark, cfg)
report["run2"] = {"commits": second.commits, "skipped": bool(second.backfill and second.backfill.skipped)}
status = bclib.status(spark, cfg)
report["status_current"] = status.current
report["maintain"] = bclib.maintain(spark, cfg).summary()
report["after_maintain_current"] = bclib.status(spark, cfg).current
from deltalake import DeltaTable
opts = dict(cfg.object_store_options)
table = DeltaTable(cfg.output_location.replace("s3a://", "s3://"), storage_options=opts)
report["delta_rs_rows"] = table.to_pyarrow_table(columns=["space_version"]).num_rows
report["source_rows"] = spark.read.format("delta").load(cfg.version_location(2)).count()
print("REPORT " + json.dumps(report))
"""


def test_the_daily_job_on_s3a_through_storage_options_alone(s3_server, tmp_path, subprocess_jvm_options):
    report = store_pipeline_report(tmp_path, "s3", SCRIPT, "s3a://bcemb-lease/pipeline", s3_server, s3a_jars_conf(),
                                   subprocess_jvm_options, {"maintenance": {"optimize_min_files": 2}})
    n = report["source_rows"]
    assert report["run1"]["engine"] == "arrow" and report["run1"]["commits"] >= 3  # fit, output, metrics (+gate)
    assert report["run1"]["rows"] == 2 * n and report["run1"]["evaluated"] >= 2
    assert report["spark"] == {"engine": "spark", "commits": 1, "rows": 2 * n}
    assert report["arrow"] == {"engine": "arrow", "commits": 1, "rows": 2 * n}
    assert report["same_ids"] and report["unique_ids"] and report["rows_per_space"] == {"0": n, "1": n}
    assert report["max_rel_diff"] <= 1e-6  # the engines' promise (bclib.numerics.kernel.VECTOR_RTOL)
    assert report["run2"] == {"commits": 0, "skipped": True}
    assert report["status_current"] and report["after_maintain_current"]
    assert report["delta_rs_rows"] == 2 * n
