"""Bad input gets a named error and leaves every table as it was (the catalogue of kinds, through the CLI:
test_bad_input_catalogue.py; here the cases that need more than one step)."""

from __future__ import annotations

import numpy as np
import pytest

from bclib.steps.backfill import run_backfill
from bclib.cli import main
from bclib.errors import DimensionMismatchError, MissingTableError
from bclib.steps.fit import run_fit
from bclib.tables.delta import table_exists

from conftest import small_config

DIMS = [6, 8]


def _write_versions(spark, cfg, n=400, bad_rows=None, seed=0):
    """Two versions with an exactly linear relation; `bad_rows` maps id -> vector for version 1."""
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, DIMS[1])).astype(np.float32)
    z0 = (z1 @ rng.normal(size=(DIMS[1], DIMS[0]))).astype(np.float32)
    for version, z in ((0, z0), (1, z1)):
        rows = [(i, z[i].tolist()) for i in range(n)]
        if version == 1 and bad_rows:
            rows = [(i, bad_rows.get(i, v)) for i, v in rows]
        spark.createDataFrame(rows, "id long, vector array<float>").coalesce(1).write.format("delta") \
            .mode("overwrite").save(cfg.version_location(version))


def _cfg(tmp_path, embeddings=None, **kw):
    emb = {"location": str(tmp_path / "emb" / "v{version}"), "versions": [0, 1], **(embeddings or {})}
    return small_config(tmp_path, embeddings=emb, demo={"dims": DIMS}, **kw)


def test_missing_table_is_named_and_nothing_is_written(spark, tmp_path):
    cfg = _cfg(tmp_path)
    with pytest.raises(MissingTableError, match=r"embedding version 0 table not found: '.*emb/v0'"):
        run_fit(spark, cfg)
    assert not table_exists(spark, cfg.registry_location)


def test_dimension_change_without_refit_is_caught_before_writing(spark, tmp_path):
    cfg = _cfg(tmp_path)
    _write_versions(spark, cfg)
    run_fit(spark, cfg)
    rows = [(i, [0.5] * 10) for i in range(50)]
    spark.createDataFrame(rows, "id long, vector array<float>").write.format("delta").mode("overwrite") \
        .save(cfg.version_location(1))
    with pytest.raises(DimensionMismatchError, match=r"50 of the first 50 vectors have 10 elements but the active transform 1 -> 0 expects dimension 8; the "
                                                       r"table's vectors changed dimension"):
        run_backfill(spark, cfg)
    assert not table_exists(spark, cfg.output_location)


def test_quarantine_takes_the_bad_rows_and_writes_the_rest(spark, tmp_path):
    cfg = _cfg(tmp_path, backfill={"quarantine_location": str(tmp_path / "quarantine")})
    _write_versions(spark, cfg)
    run_fit(spark, cfg)
    nan_at_3 = [1.0, 1.0, 1.0, float("nan"), 1.0, 1.0, 1.0, 1.0]
    null_at_1 = [1.0, None, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    _write_versions(spark, cfg, bad_rows={5: [1.0], 6: None, 7: [float("inf")] * DIMS[1], 8: nan_at_3, 9: null_at_1})
    result = run_backfill(spark, cfg)
    assert result.rows == 400 - 5
    q = spark.read.format("delta").load(str(tmp_path / "quarantine"))
    reasons = {r.id: r.reason for r in q.collect()}
    assert reasons == {5: "expected dimension 8, found 1", 6: "null vector", 7: "Inf element at index 0",
                       8: "NaN element at index 3", 9: "null element at index 1"}
    # rerun replaces this source's quarantine rows instead of appending duplicates
    run_backfill(spark, _cfg(tmp_path, backfill={"quarantine_location": str(tmp_path / "quarantine"), "force": True}))
    assert spark.read.format("delta").load(str(tmp_path / "quarantine")).count() == 5
    # a user's VACUUM of both tables (VACUUM START/END commits) changes no rows: the next run writes nothing
    from delta.tables import DeltaTable

    for location in (cfg.output_location, str(tmp_path / "quarantine")):
        DeltaTable.forPath(spark, location).vacuum(168)
    again = run_backfill(spark, cfg)
    assert again.skipped and again.commits == 0


def test_cli_missing_table_is_one_line_nonzero_and_writes_nothing(spark, tmp_path, capsys):
    conf = tmp_path / "job.yaml"
    conf.write_text(
        f"spark: {{master: 'local[2]'}}\n"
        f"embeddings: {{location: '{tmp_path}/nothing/v{{version}}', versions: [0, 1]}}\n"
        f"registry_location: '{tmp_path}/registry'\n"
        f"output_location: '{tmp_path}/out'\n"
    )
    assert main(["backfill", "--config", str(conf)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bcemb")]
    assert err == [f"bcemb backfill: RegistryError: no active transform for edge 1 -> 0 in the registry; run `bcemb fit` first"]
    assert main(["fit", "--config", str(conf)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("bcemb")]
    assert len(err) == 1 and "MissingTableError: embedding version 0 table not found" in err[0]
    assert not (tmp_path / "registry").exists() and not (tmp_path / "out").exists()


