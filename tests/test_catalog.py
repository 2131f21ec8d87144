"""Catalog tables: every table a name in a persistent Hive metastore (Spark's embedded Derby), as on a cluster
with a metastore (Hive, Glue) or Unity Catalog (three-part names).

Two processes, one after the other, share the metastore: the first generates the versions and runs the
scheduled job; the second (a new session, so the names must come back from the metastore) runs it again and
must commit nothing, reads the per-space views, runs evaluate and status, then brings the output up to date
incrementally after an UPDATE and a DELETE on the source (INSERT REPLACE ON through saveAsTable, once the
output has deletion vectors). Names are one-, two- and three-part
(`spark_catalog.default.<table>`): each is passed through to Spark as it is.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO

pytestmark = pytest.mark.slow

SCRIPT = r"""
import json, sys
import bclib

cfg = bclib.load_config(sys.argv[1])
spark = bclib.session(cfg)
report = {"catalog": spark.conf.get("spark.sql.catalogImplementation")}

def versions(name):
    return spark.sql(f"DESCRIBE HISTORY {name}").count()

tables = [cfg.output_location, cfg.registry_location, cfg.metrics_location]
if sys.argv[2] == "first":
    report["generate"] = bclib.generate(spark, cfg).summary()
    result = bclib.run(spark, cfg)
    report["run"] = {"commits": result.commits, "engine": result.backfill.engine, "rows": result.backfill.rows}
else:
    report["found"] = {t: spark.catalog.tableExists(t) for t in tables}
    before = {t: versions(t) for t in tables}
    result = bclib.run(spark, cfg)
    report["rerun"] = {"commits": result.commits, "unchanged": before == {t: versions(t) for t in tables}}
    report["views"] = {str(j): spark.table(f"{cfg.output_location}_space_{j}").count() for j in (0, 1)}
    report["view_columns"] = spark.table(f"{cfg.output_location}_space_0").columns
    report["output_rows"] = {str(r.space_version): r["count"] for r in
                             spark.table(cfg.output_location).groupBy("space_version").count().collect()}
    ev = bclib.evaluate(spark, cfg)
    report["evaluated"] = len(ev.pairs)
    report["status_current"] = bclib.status(spark, cfg).current
    report["source_rows"] = spark.table(cfg.version_location(2)).count()
    report["location"] = spark.sql(f"DESCRIBE DETAIL {cfg.output_location}").first().location
    # an incremental round into the catalog output: INSERT REPLACE ON through saveAsTable
    import dataclasses
    spark.sql(f"ALTER TABLE {cfg.output_location} SET TBLPROPERTIES (delta.enableDeletionVectors = true)")
    src = cfg.version_location(2)
    spark.sql(f"UPDATE {src} SET vector = transform(vector, x -> x * 2) WHERE id % 31 = 3")
    spark.sql(f"DELETE FROM {src} WHERE id % 37 = 5")
    inc = bclib.backfill(spark, dataclasses.replace(cfg, backfill=dataclasses.replace(cfg.backfill,
                                                                                        incremental="require")))
    last = spark.sql(f"DESCRIBE HISTORY {cfg.output_location} LIMIT 1").first()
    report["incremental"] = {"commits": inc.commits, "actions": sorted({a for a, _ in inc.actions.values()}),
                             "operation": last.operation,
                             "replace_on": "bcemb_replace_keys_" in str(last.operationParameters),
                             "source_rows": spark.table(src).count(),
                             "output_rows": {str(r.space_version): r["count"] for r in
                                             spark.table(cfg.output_location).groupBy("space_version").count()
                                             .collect()}}
print("REPORT " + json.dumps(report))
"""


def test_every_table_a_name_in_a_persistent_metastore(tmp_path, subprocess_jvm_options):
    warehouse = tmp_path / "warehouse"
    data = {
        "spark": {"master": "local[2]", "shuffle_partitions": 2, "warehouse_dir": str(warehouse),
                  "conf": {"spark.sql.catalogImplementation": "hive",
                           "spark.hadoop.javax.jdo.option.ConnectionURL":
                               f"jdbc:derby:;databaseName={tmp_path / 'metastore_db'};create=true",
                           "spark.driver.extraJavaOptions": subprocess_jvm_options}},
        "embeddings": {"location": "emb_v{version}", "versions": [0, 1, 2]},
        "registry_location": "default.bc_registry",
        "output_location": "spark_catalog.default.bc_out",
        "metrics_location": "bc_metrics",
        "fit": {"min_pairs": 50, "holdout": 0.25},
        "gate": {"min_heldout_ids": 50},
        "evaluate": {"label_location": "bc_labels", "report_dir": str(tmp_path / "reports"), "neighbours_k": 5,
                     "neighbours_sample": 200},
        "demo": {"n_entities": 1200, "dims": [12, 16, 20], "block_rows": 256, "n_clusters": 6, "latent_dim": 8},
    }
    conf = tmp_path / "catalog.yaml"
    conf.write_text(yaml.safe_dump(data))
    reports = {}
    for phase in ("first", "second"):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, str(conf), phase], cwd=tmp_path, capture_output=True,
                              text=True, timeout=900, env={**__import__("os").environ, "PYTHONPATH": str(REPO)})
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
        assert proc.returncode == 0 and lines, (phase, proc.stderr[-4000:])
        reports[phase] = json.loads(lines[-1][len("REPORT "):])
        if phase == "first":
            assert "do not persist after this session" not in proc.stderr  # the metastore is persistent
    first, second = reports["first"], reports["second"]
    print(json.dumps(reports, indent=1))
    assert first["catalog"] == "hive" and first["run"]["commits"] >= 3
    n = second["source_rows"]
    assert first["run"]["rows"] == 2 * n
    assert all(second["found"].values()), second["found"]
    assert second["rerun"] == {"commits": 0, "unchanged": True}
    assert second["views"] == {"0": n, "1": n} and second["view_columns"] == ["id", "vector"]
    assert second["output_rows"] == {"0": n, "1": n}
    assert second["evaluated"] >= 2 and second["status_current"]
    assert second["location"].startswith("file:" + str(warehouse)), second["location"]  # a managed table
    inc = second["incremental"]
    assert inc["commits"] == 1 and inc["actions"] == ["incremental"], inc
    assert inc["operation"] == "WRITE" and inc["replace_on"], inc
    m = inc["source_rows"]
    assert m < n and inc["output_rows"] == {"0": m, "1": m}, inc
