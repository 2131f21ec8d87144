"""bcemb beside other writers: one commit rule for both engines, driven through the seam between plan and commit.

Each test publishes spaces 0 and 1, then starts a forced full rewrite (or an incremental MERGE) and, at the
seam after the plan and before the commit, lets another writer commit one kind of change: a compaction
(OPTIMIZE, dataChange=false), an insert-only append, a MERGE with deletion vectors, an overwrite, a
property or schema change, a VACUUM. No sleeps, no threads: the interleaving is forced. Before the commit
rule, the arrow engine kept the compacted file or the appended rows next to its own (every row twice).
"""

from __future__ import annotations

import logging
import shutil

import pytest

from bclib.steps.backfill import run_backfill
from bclib.tables import commits
from bclib.tables.delta import delta_table

from conftest import generated_and_fitted, small_config

ENGINES = ["spark", "arrow"]


@pytest.fixture(scope="module")
def fitted(spark, tmp_path_factory):
    """Versions 0..2, their transforms and two published outputs (spaces 0 and 1 by the spark engine, 3 files
    per space so OPTIMIZE has work; one with deletion vectors), shared read-only: each test copies one."""
    tmp = tmp_path_factory.mktemp("writers")
    cfg = generated_and_fitted(spark, tmp, evaluate={"label_location": None})
    for name, dv in (("published", False), ("published_dv", True)):
        run_backfill(spark, _cfg((tmp, 0), tmp / name, engine="spark", output_partitions=3, deletion_vectors=dv))
    n_src = spark.read.format("delta").load(cfg.version_location(2)).count()
    return tmp, n_src


def _cfg(fitted, out_dir, **backfill):
    """The test's config: its own output under out_dir; the gate off (these tests are about commits)."""
    tmp, _ = fitted
    return small_config(tmp, evaluate={"label_location": None}, output_location=str(out_dir / "out"),
                        backfill={"retry_backoff_seconds": 0.05, **backfill}, gate={"enabled": False})


def _publish(spark, fitted, tmp_path, deletion_vectors=False):
    """A copy of a published output (a Delta table is its directory: the log's paths are relative)."""
    src = fitted[0] / ("published_dv" if deletion_vectors else "published") / "out"
    shutil.copytree(src, tmp_path / "out")
    return str(tmp_path / "out")


def _counts(spark, out):
    df = spark.read.format("delta").load(out)
    per_space = {r.space_version: r["count"] for r in df.groupBy("space_version").count().collect()}
    dups = df.groupBy("space_version", "id").count().where("count > 1").count()
    return per_space, dups


def _ops(spark, out, after):
    return [(h.version, h.operation) for h in delta_table(spark, out).history().orderBy("version").collect()
            if h.version > after]


def _version(spark, out):
    return int(delta_table(spark, out).history(1).first().version)


# --------------------------------------------------------------------------- the other writers


def _compaction(spark, out):
    delta_table(spark, out).optimize().where("space_version = 0").executeCompaction()


def _append(spark, out):  # a blind, insert-only commit of new ids into space 0
    spark.sql(f"INSERT INTO delta.`{out}` SELECT id + 1000000 AS id, vector, space_version, source_version, chain_id, "
              f"produced_at FROM delta.`{out}` WHERE space_version = 0 AND id < 50")


def _merge_with_dvs(spark, out):
    src = spark.read.format("delta").load(out).where("space_version = 0 AND id < 20")
    (delta_table(spark, out).alias("t").merge(src.alias("s"), "t.space_version = s.space_version AND t.id = s.id")
     .whenMatchedUpdate(set={"chain_id": "concat(s.chain_id, '-edited')"}).execute())


def _overwrite(spark, out):
    (spark.read.format("delta").load(out).where("space_version = 0").write.format("delta").mode("overwrite")
     .option("replaceWhere", "space_version = 0").save(out))


def _property(spark, out):
    spark.sql(f"ALTER TABLE delta.`{out}` SET TBLPROPERTIES ('team.owner' = 'analytics')")


def _add_column(spark, out):
    spark.sql(f"ALTER TABLE delta.`{out}` ADD COLUMNS (note STRING)")


def _vacuum(spark, out):
    spark.sql(f"VACUUM delta.`{out}` RETAIN 168 HOURS")


CONFLICTING = {"compaction": _compaction, "insert_only_append": _append, "overwrite": _overwrite,
               "property_change": _property, "schema_change": _add_column}


class Interleave:
    """A seam callback: the other writer commits once, at the first time the commit rule is reached."""

    def __init__(self, spark, writer, stage=commits.BEFORE_CHECK):
        self.spark, self.writer, self.stage = spark, writer, stage
        self.calls, self.fired = [], False

    def __call__(self, stage, location, read_version):
        self.calls.append((stage, read_version))
        if stage == self.stage and not self.fired:
            self.fired = True
            self.writer(self.spark, location)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", sorted(CONFLICTING))
def test_a_concurrent_commit_to_the_spaces_makes_the_rewrite_replan(spark, fitted, tmp_path, engine, kind, caplog):
    out = _publish(spark, fitted, tmp_path)
    before = _version(spark, out)
    cfg = _cfg(fitted, tmp_path, engine=engine, force=True)
    seam = Interleave(spark, CONFLICTING[kind])
    with caplog.at_level(logging.WARNING, logger="bclib.tables.delta"), commits.commit_seam(seam):
        result = run_backfill(spark, cfg)
    assert result.engine == engine
    checks = [c for c in seam.calls if c[0] == commits.BEFORE_CHECK]
    assert len(checks) == 2, seam.calls  # planned, conflict, re-planned, committed
    assert "ConcurrentCommitError" in caplog.text
    per_space, dups = _counts(spark, out)
    assert per_space == {0: fitted[1], 1: fitted[1]} and dups == 0
    ops = _ops(spark, out, before)
    assert len(ops) == 2, ops  # the other writer's commit, then exactly one rewrite
    if kind == "insert_only_append":  # the appended ids are gone: the rewrite replaced the whole space
        assert spark.read.format("delta").load(out).where("id >= 1000000").count() == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_merge_with_deletion_vectors_makes_the_rewrite_replan(spark, fitted, tmp_path, engine, caplog):
    out = _publish(spark, fitted, tmp_path, deletion_vectors=True)
    cfg = _cfg(fitted, tmp_path, engine=engine, force=True)
    seam = Interleave(spark, _merge_with_dvs)
    with caplog.at_level(logging.WARNING, logger="bclib.tables.delta"), commits.commit_seam(seam):
        run_backfill(spark, cfg)
    assert "deletion vector" in caplog.text
    assert len([c for c in seam.calls if c[0] == commits.BEFORE_CHECK]) == 2
    per_space, dups = _counts(spark, out)
    assert per_space == {0: fitted[1], 1: fitted[1]} and dups == 0
    assert spark.read.format("delta").load(out).where("chain_id LIKE '%-edited'").count() == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_a_concurrent_vacuum_does_not_conflict(spark, fitted, tmp_path, engine):
    out = _publish(spark, fitted, tmp_path)
    before = _version(spark, out)
    seam = Interleave(spark, _vacuum)
    with commits.commit_seam(seam):
        run_backfill(spark, _cfg(fitted, tmp_path, engine=engine, force=True))
    assert len([c for c in seam.calls if c[0] == commits.BEFORE_CHECK]) == 1  # no re-plan
    ops = [op for _, op in _ops(spark, out, before)]
    assert ops[:2] == ["VACUUM START", "VACUUM END"] and len(ops) == 3, ops  # then the rewrite, first time
    per_space, dups = _counts(spark, out)
    assert per_space == {0: fitted[1], 1: fitted[1]} and dups == 0


def test_a_compaction_after_the_check_fails_the_arrow_commit_and_it_replans(spark, fitted, tmp_path, caplog):
    """The window between the rule's check and delta-rs's commit: delta-rs commits with no retry of its own."""
    out = _publish(spark, fitted, tmp_path)
    seam = Interleave(spark, _compaction, stage=commits.BEFORE_COMMIT)
    with caplog.at_level(logging.WARNING, logger="bclib.tables.delta"), commits.commit_seam(seam):
        run_backfill(spark, _cfg(fitted, tmp_path, engine="arrow", force=True))
    assert "between the commit rule's check and this commit" in caplog.text
    assert len([c for c in seam.calls if c[0] == commits.BEFORE_COMMIT]) == 2
    per_space, dups = _counts(spark, out)
    assert per_space == {0: fitted[1], 1: fitted[1]} and dups == 0


@pytest.mark.parametrize("engine", ENGINES)
def test_two_backfills_of_a_new_output_one_writes_the_other_replans_to_nothing(spark, fitted, tmp_path, engine):
    """The second run commits while the first is between plan and commit: the first re-plans, finds the
    spaces up to date and writes nothing (deterministic: the seam runs the second run inside the first)."""
    cfg = _cfg(fitted, tmp_path, engine=engine)
    inner = []
    seam = Interleave(spark, lambda s, loc: inner.append(run_backfill(s, cfg)))
    with commits.commit_seam(seam):
        outer = run_backfill(spark, cfg)
    assert inner[0].commits == 1 and not inner[0].skipped
    assert outer.skipped and outer.commits == 0
    per_space, dups = _counts(spark, cfg.output_location)
    assert per_space == {0: fitted[1], 1: fitted[1]} and dups == 0
    writes = [op for _, op in _ops(spark, cfg.output_location, -1)]
    assert len(writes) == 1, writes
