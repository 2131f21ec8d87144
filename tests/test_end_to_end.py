"""generate -> fit -> backfill -> evaluate on real local Spark + Delta tables, checked against numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bclib.steps.backfill import run_backfill
from bclib.steps.generate import run_generate
from bclib.steps.evaluate import run_evaluate
from bclib.steps.fit import run_fit
from bclib.tables.delta import current_delta_version, read_delta

from conftest import assert_same_vectors, small_config


def _load(spark, location, where=None):
    """(ids, vectors) sorted by id, read with plain Spark collect (independent of bclib.tables)."""
    df = spark.read.format("delta").load(location)
    if where:
        df = df.where(where)
    rows = sorted(df.select("id", "vector").collect(), key=lambda r: r.id)
    return np.array([r.id for r in rows]), np.array([r.vector for r in rows], dtype=np.float64)


@pytest.fixture(scope="module")
def pipeline(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    cfg = small_config(tmp)
    counts = run_generate(spark, cfg).counts
    records = run_fit(spark, cfg).records
    backfill = run_backfill(spark, cfg, run_id="run-1")
    results = run_evaluate(spark, cfg, run_id="eval-1").pairs
    return cfg, counts, records, backfill, results


def test_every_space_has_exactly_the_source_rows(spark, pipeline):
    cfg, counts, _, backfill, _ = pipeline
    out = spark.read.format("delta").load(cfg.output_location)
    per_space = {r.space_version: r["count"] for r in out.groupBy("space_version").count().collect()}
    assert per_space == {0: counts[2], 1: counts[2]}
    assert backfill.rows == 2 * counts[2]
    ids_src, _ = _load(spark, cfg.version_location(2))
    for space in (0, 1):
        ids_out, _ = _load(spark, cfg.output_location, f"space_version = {space}")
        np.testing.assert_array_equal(ids_out, ids_src)


def test_output_vectors_equal_the_registry_chain_in_numpy(spark, pipeline):
    cfg, _, records, _, _ = pipeline
    weights = {(r.source_version, r.target_version): r.transform.weight for r in records}
    ids_src, z2 = _load(spark, cfg.version_location(2))
    expected = {1: z2 @ weights[(2, 1)], 0: z2 @ weights[(2, 1)] @ weights[(1, 0)]}
    for space, exp in expected.items():
        _, got = _load(spark, cfg.output_location, f"space_version = {space}")
        assert got.shape == (len(ids_src), cfg.demo.dims[space])
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_output_schema_partitioning_and_lineage(spark, pipeline):
    from delta.tables import DeltaTable

    cfg, _, records, _, _ = pipeline
    out = spark.read.format("delta").load(cfg.output_location)
    assert dict(out.dtypes) == {
        "id": "bigint", "vector": "array<float>", "space_version": "int", "source_version": "int",
        "chain_id": "string", "produced_at": "timestamp",
    }
    detail = DeltaTable.forPath(spark, cfg.output_location).detail().first()
    assert detail.partitionColumns == ["space_version"]
    # the pipeline fixture's backfill commit, found by its run id (tests sharing the fixture may commit after it,
    # in any order)
    metas = [json.loads(h.userMetadata) for h in DeltaTable.forPath(spark, cfg.output_location).history().collect()
             if h.userMetadata]
    meta = next(m for m in metas if m.get("run_id") == "run-1")
    assert meta["source"]["version"] == 2
    ids_by_edge = {(r.source_version, r.target_version): r.transform_id for r in records}
    assert [t["id"] for t in meta["spaces"]["0"]["transforms"]] == [ids_by_edge[(2, 1)], ids_by_edge[(1, 0)]]


def test_metrics_match_a_numpy_reference(spark, pipeline):
    cfg, _, _, _, results = pipeline
    # evaluation entities: the ids whose salted xxhash64 falls in [1 - fit.holdout, 1) (the whole slice here)
    salt = cfg.fit.salt
    where = f"pmod(xxhash64('{salt}', id), {1 << 52}) / {float(1 << 52)} >= {1.0 - cfg.fit.holdout}"
    ids_out, pred = _load(spark, cfg.output_location, f"space_version = 0 AND ({where})")
    ids_true, true = _load(spark, cfg.version_location(0), where)
    ids_src, src = _load(spark, cfg.version_location(2), where)
    common = np.intersect1d(np.intersect1d(ids_out, ids_true), ids_src)
    p = pred[np.searchsorted(ids_out, common)]
    t = true[np.searchsorted(ids_true, common)]
    s = src[np.searchsorted(ids_src, common)][:, : t.shape[1]]
    expected = {
        "relative_l2": np.sqrt(((p - t) ** 2).sum() / (t ** 2).sum()),
        "mean_cosine": np.mean((p * t).sum(1) / np.linalg.norm(p, axis=1) / np.linalg.norm(t, axis=1)),
        "baseline_relative_l2": np.sqrt(((s - t) ** 2).sum() / (t ** 2).sum()),
    }
    rows = read_delta(spark, cfg.metrics_location).where(
        "run_id = 'eval-1' AND source_version = 2 AND space_version = 0").collect()
    got = {r.metric: r.value for r in rows}
    assert {r.sample_size for r in rows} == {len(common)}
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name
    pair = next(r for r in results if (r.source_version, r.space_version) == (2, 0))
    assert pair.from_output_table
    # the figures consumers get equal what the numpy least-squares chain fitted on the fit window gives
    records = {r.source_version: r for r in pipeline[2]}
    w21, w10 = (_numpy_lstsq(spark, cfg, k, records[k].transform.meta["ridge"]) for k in (2, 1))
    s_full = src[np.searchsorted(ids_src, common)]
    assert got["relative_l2"] == pytest.approx(np.sqrt((((s_full @ w21 @ w10) - t) ** 2).sum() / (t ** 2).sum()),
                                               rel=1e-4)
    assert got["relative_l2"] < got["baseline_relative_l2"]
    # neighbour recall and consumer-probe retention: recovered by the transform, lost without it
    assert got["neighbour_recall_at_5"] > got["baseline_neighbour_recall_at_5"]
    assert got["probe_retention"] > got["baseline_probe_retention"]
    assert (Path(cfg.evaluate.report_dir) / "eval-1" / "compat.png").stat().st_size > 10_000


def _numpy_lstsq(spark, cfg, k, ridge=0.0):
    """B_k by numpy (ridge) least squares on the fit step's training pairs, rebuilt with Spark SQL and numpy.

    The fit window is hash in [0, 1 - fit.holdout) (the whole window at this size); the top
    fit.holdout_fraction of its pairs by hash are the fit's own validation part, and the published map is
    refit on train + validation (fit.refit_with_validation). `ridge` is scale-free:
    λ = ridge × mean eigenvalue of XᵀX.
    """
    salt = cfg.fit.salt
    h = f"pmod(xxhash64('{salt}', id), {1 << 52}) / {float(1 << 52)}"
    src = spark.read.format("delta").load(cfg.version_location(k)).selectExpr("id", "vector AS x", f"{h} AS h")
    dst = spark.read.format("delta").load(cfg.version_location(k - 1)).selectExpr("id", "vector AS y")
    rows = sorted(src.where(f"h < {1.0 - cfg.fit.holdout}").join(dst, "id").collect(), key=lambda r: r.h)
    n_hold = max(1, int(round(len(rows) * cfg.fit.holdout_fraction)))
    train = rows if cfg.fit.refit_with_validation else rows[:-n_hold]
    x = np.array([r.x for r in train], dtype=np.float64)
    y = np.array([r.y for r in train], dtype=np.float64)
    gram = x.T @ x
    lam = ridge * np.trace(gram) / x.shape[1]
    return np.linalg.solve(gram + lam * np.eye(x.shape[1]), x.T @ y)


def test_registered_transforms_equal_numpy_least_squares_on_the_fit_window(spark, pipeline):
    cfg, _, records, _, _ = pipeline
    for r in records:
        chosen = r.transform.meta["ridge"]  # ridge: auto records its GCV choice
        assert r.transform.meta["ridge_mode"] == "auto" and chosen in r.transform.meta["ridge_grid"]
        ref = _numpy_lstsq(spark, cfg, r.source_version, ridge=chosen)
        np.testing.assert_allclose(r.transform.weight, ref, rtol=1e-6, atol=1e-8 * np.abs(ref).max())


def test_fit_records_family_objective_and_metrics(spark, pipeline, tmp_path):
    cfg, *_ = pipeline
    anchored = small_config(cfg_root(cfg), registry_location=str(tmp_path / "reg"),
                            transform={"kind": "linear", "objective": "anchored"})
    records = run_fit(spark, anchored).records
    rows = read_delta(spark, anchored.registry_location).where("status = 'active'").collect()
    assert {(r.kind, r.objective) for r in rows} == {("linear", "anchored")}
    by_edge = {(r.source_version, r.target_version): r for r in rows}
    assert by_edge[(2, 1)].fit_metrics["holdout_relative_l2"] < by_edge[(2, 1)].fit_metrics["holdout_baseline_relative_l2"]
    assert json.loads(by_edge[(2, 1)].fit_config)["transform"]["objective"] == "anchored"
    assert by_edge[(2, 1)].input_delta_versions == {anchored.version_location(v): 1 for v in (0, 1, 2)}  # create, write
    assert len(records) == 2


def test_rerun_is_a_no_op_and_forced_rerun_leaves_the_same_content(spark, pipeline):
    cfg, *_ = pipeline
    before_version = current_delta_version(spark, cfg.output_location)
    ids0, v0 = _load(spark, cfg.output_location, "space_version = 0")
    again = run_backfill(spark, cfg)
    assert again.skipped and current_delta_version(spark, cfg.output_location) == before_version
    forced_cfg = small_config(cfg_root(cfg), backfill={"force": True})
    forced = run_backfill(spark, forced_cfg)
    assert not forced.skipped
    assert current_delta_version(spark, cfg.output_location) == before_version + 1
    ids1, v1 = _load(spark, cfg.output_location, "space_version = 0")
    np.testing.assert_array_equal(ids0, ids1)
    assert_same_vectors(v1, v0, "forced rerun")
    assert spark.read.format("delta").load(cfg.output_location).count() == 2 * len(ids0)


def test_refit_is_idempotent_and_a_changed_fit_retires_in_one_commit(spark, pipeline):
    cfg, _, records, *_ = pipeline
    version = current_delta_version(spark, cfg.registry_location)
    run_fit(spark, cfg)  # same data, same config: nothing to commit
    assert current_delta_version(spark, cfg.registry_location) == version
    ridge_cfg = small_config(cfg_root(cfg), transform={"ridge": 0.01})
    kept = run_fit(spark, ridge_cfg)  # published edges stay frozen: another config alone refits nothing
    assert kept.fitted == [] and current_delta_version(spark, cfg.registry_location) == version
    new = run_fit(spark, ridge_cfg, refit=["all"]).records
    assert current_delta_version(spark, cfg.registry_location) == version + 1  # retire + insert: one MERGE
    reg = read_delta(spark, cfg.registry_location)
    status = {(r.transform_id, r.status) for r in reg.select("transform_id", "status").collect()}
    assert {(r.transform_id, "retired") for r in records} <= status
    assert {(r.transform_id, "active") for r in new} <= status
    assert reg.where("status = 'active'").groupBy("source_version", "target_version").count() \
        .where("count != 1").count() == 0
    # back to the first config: the retired transforms become active again, still one per edge
    run_fit(spark, cfg, refit=["all"])
    active = {r.transform_id for r in reg.where("status = 'active'").select("transform_id").collect()}
    assert active == {r.transform_id for r in records}


def cfg_root(cfg):
    from pathlib import Path

    return Path(cfg.registry_location).parent


def test_fit_sampling_is_one_scan_per_table(spark, pipeline):
    """The window size comes from Delta's log (no scan); the sample itself is one filtered scan, no shuffle."""
    from bclib.tables.embeddings import hash_window, read_versions

    cfg, *_ = pipeline
    read = read_versions(spark, cfg)[2]
    count_plan = read.df.groupBy().count()._jdf.queryExecution().executedPlan().toString()
    assert "LocalTableScan" in count_plan and "FileScan" not in count_plan
    sample_plan = hash_window(read.df, "id", cfg.fit.salt, 0.0, 0.5)._jdf.queryExecution().executedPlan().toString()
    assert sample_plan.count("FileScan") == 1 and "Exchange" not in sample_plan


@pytest.mark.parametrize("batch_rows, partitions", [(1, 1), (7, 3), (100, 2), (10_000, 1)])
def test_backfill_over_arrow_batch_sizes_and_partitions_equals_numpy(spark, pipeline, tmp_path, batch_rows, partitions):
    """The executor path through Spark (maxRecordsPerBatch, repartitioned input) against the numpy chain."""
    cfg, _, records, _, _ = pipeline
    out = str(tmp_path / "out")
    run_cfg = small_config(cfg_root(cfg), output_location=out,
                           backfill={"arrow_batch_rows": batch_rows, "output_partitions": partitions})
    result = run_backfill(spark, run_cfg)
    weights = {(r.source_version, r.target_version): r.transform.weight for r in records}
    ids_src, z2 = _load(spark, cfg.version_location(2))
    assert result.rows == 2 * len(ids_src)
    expected = {1: z2 @ weights[(2, 1)], 0: z2 @ weights[(2, 1)] @ weights[(1, 0)]}
    for space, exp in expected.items():
        ids, got = _load(spark, out, f"space_version = {space}")
        np.testing.assert_array_equal(ids, ids_src)
        np.testing.assert_allclose(got, exp, rtol=1e-4, atol=1e-4)


def test_the_default_fit_uses_at_least_90_percent_of_the_shared_pairs(spark, tmp_path):
    """fit.holdout (default 5 %) is the only slice kept from the fit; its validation part is 5 % of the rest."""
    from bclib.config import FitSettings

    cfg = small_config(tmp_path, fit={"holdout": FitSettings().holdout})
    run_generate(spark, cfg)
    records = run_fit(spark, cfg).records
    for r in records:
        src = spark.read.format("delta").load(cfg.version_location(r.source_version)).select("id")
        dst = spark.read.format("delta").load(cfg.version_location(r.target_version)).select("id")
        shared = src.join(dst, "id").count()
        m = r.fit_metrics
        assert m["train_rows"] >= 0.88 * shared, (r.edge, m["train_rows"], shared)
        assert m["train_rows"] + m["holdout_rows"] == m["shared_pairs_in_window"] < shared
        assert m["refit_rows"] == m["shared_pairs_in_window"]  # the published map saw train + validation
        assert abs(m["estimated_shared_pairs"] - shared) <= 0.1 * shared
