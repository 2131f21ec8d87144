"""Table rules are kept: the arrow engine writes only tables whose rules it can keep, and falls back (or is
refused by name) otherwise; outputs laid out another way and source layouts its raw reads would get wrong
are named before anything is written."""

from __future__ import annotations

import pytest

from bclib.errors import EngineUnavailableError, OutputLocationError
from bclib.steps.backfill import run_backfill
from bclib.steps.fit import run_fit
from bclib.steps.generate import run_generate
from bclib.tables.delta import current_delta_version

from conftest import generated_and_fitted, small_config


@pytest.fixture(scope="module")
def fitted(spark, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rules")
    generated_and_fitted(spark, tmp, evaluate={"label_location": None})
    return tmp


def _cfg(fitted, tmp_path, **backfill):
    return small_config(fitted, evaluate={"label_location": None}, output_location=str(tmp_path / "out"),
                        backfill=backfill)


def test_a_check_constraint_sends_the_rewrite_to_spark_which_enforces_it(spark, fitted, tmp_path):
    cfg = _cfg(fitted, tmp_path)
    assert run_backfill(spark, cfg).engine == "arrow"
    out = cfg.output_location
    # an analyst's rule that today's rows keep and any rewrite breaks (newer produced_at)
    now = spark.sql(f"SELECT max(produced_at) AS t FROM delta.`{out}`").first().t
    spark.sql(f"ALTER TABLE delta.`{out}` ADD CONSTRAINT frozen CHECK (produced_at <= TIMESTAMP '{now.isoformat()}')")
    before = current_delta_version(spark, out)
    with pytest.raises(EngineUnavailableError, match=r"CHECK constraint\(s\) \['frozen'\]"):
        run_backfill(spark, _cfg(fitted, tmp_path, engine="arrow", force=True))
    with pytest.raises(Exception, match=r"(?i)CHECK constraint frozen"):  # Spark's writer enforces the rule
        run_backfill(spark, _cfg(fitted, tmp_path, force=True))  # auto: falls back to spark
    assert current_delta_version(spark, out) == before  # nothing written (the arrow engine used to write them all)


def test_a_generated_column_or_a_foreign_delta_property_falls_back_to_spark_by_name(spark, fitted, tmp_path):
    cfg = _cfg(fitted, tmp_path)
    run_backfill(spark, cfg)
    out = cfg.output_location
    spark.sql(f"ALTER TABLE delta.`{out}` SET TBLPROPERTIES ('delta.appendOnly' = 'false', "
              "'delta.checkpointInterval' = '5')")
    result = run_backfill(spark, _cfg(fitted, tmp_path, force=True))
    assert result.engine == "spark" and "properties bcemb did not set (delta.appendOnly, delta.checkpointInterval)" \
        in result.engine_reason


def test_a_clustered_output_is_refused_at_plan_time_by_name(spark, fitted, tmp_path):
    out = str(tmp_path / "out")
    spark.sql(f"CREATE TABLE delta.`{out}` (id BIGINT, vector ARRAY<FLOAT>, space_version INT, source_version INT, "
              "chain_id STRING, produced_at TIMESTAMP) USING DELTA CLUSTER BY (id)")
    before = current_delta_version(spark, out)
    for engine in ("spark", "arrow"):
        with pytest.raises(OutputLocationError, match=r"is clustered by \['id'\] \(liquid clustering\); bcemb writes "
                                                      r"an output partitioned by space_version"):
            run_backfill(spark, _cfg(fitted, tmp_path, engine=engine))
    assert current_delta_version(spark, out) == before


def test_source_layouts_the_raw_reads_would_get_wrong_fall_back_to_spark(spark, tmp_path):
    """One table holding every version: a string version column, and a table partitioned by the version."""
    for layout in ("string_version", "partitioned"):
        root = tmp_path / layout
        gen = small_config(root, evaluate={"label_location": None})
        run_generate(spark, gen)
        df = None
        for v in gen.embeddings.versions:
            part = spark.read.format("delta").load(gen.version_location(v)).selectExpr(
                "id", "vector", f"CAST({v} AS {'STRING' if layout == 'string_version' else 'INT'}) AS version")
            df = part if df is None else df.unionByName(part)
        writer = df.write.format("delta")
        if layout == "partitioned":
            writer = writer.partitionBy("version")
        writer.save(str(root / "all"))
        cfg = small_config(root, evaluate={"label_location": None},
                           embeddings={"location": str(root / "all"), "version_column": "version",
                                       "versions": [0, 1, 2]})
        run_fit(spark, cfg)
        result = run_backfill(spark, cfg)
        assert result.engine == "spark", (layout, result.engine_reason)
        assert ("partitioned by ['version']" if layout == "partitioned" else "'version' is") in result.engine_reason
        n = spark.read.format("delta").load(gen.version_location(2)).count()
        assert spark.read.format("delta").load(cfg.output_location).where("space_version = 0").count() == n


@pytest.mark.parametrize("how", ["deletion_vectors", "spark_engine"])
def test_part_files_of_a_killed_first_run_neither_block_the_location_nor_stay(spark, fitted, tmp_path, how):
    """A first arrow run killed after its tasks wrote files but before the commit that creates the table; and
    an empty space folder, what a failed task leaves where its files were removed (on an object store a
    folder-marker object: CI once saw the next run refuse such a location as "not empty")."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bclib.tables.output import read_output_state

    (tmp_path / "out" / "space_version=1").mkdir(parents=True)
    # Delta 4's `_delta_log/_staged_commits/`, left by a spark-engine write refused before version 0
    (tmp_path / "out" / "_delta_log" / "_staged_commits").mkdir(parents=True)
    assert not read_output_state(spark, str(tmp_path / "out")).exists  # only empty folders: no refusal
    orphan = tmp_path / "out" / "space_version=0" / "part-00000-1b2c3d4e-c000.snappy.parquet"
    orphan.parent.mkdir(parents=True)
    pq.write_table(pa.table({"id": [1]}), orphan)
    assert not read_output_state(spark, str(tmp_path / "out")).exists  # read-only: tolerated, not removed
    assert orphan.exists()
    cfg = (_cfg(fitted, tmp_path, deletion_vectors=True) if how == "deletion_vectors"  # the DDL create refuses a
           else _cfg(fitted, tmp_path, engine="spark"))                                # non-empty directory
    run_backfill(spark, cfg)
    assert not orphan.exists()
    assert spark.read.format("delta").load(cfg.output_location).where("space_version = 0").count() > 0


def test_an_analysts_columns_comment_and_constraint_keep_the_output_current_and_their_values(spark, fitted,
                                                                                             tmp_path):
    """Schema-only commits by others (ADD COLUMNS, a column comment, a constraint, a property) do not make the
    output foreign: no rewrite, status current. The values an analyst then puts in an added column survive a
    full rewrite (the spark engine joins them back by space and id; auto leaves the arrow engine, which would
    write nulls, and a forced arrow engine is refused by the column's name)."""
    from bclib.steps.status import run_status
    from bclib.tables.output import read_output_state

    cfg = _cfg(fitted, tmp_path)
    assert run_backfill(spark, cfg).engine == "arrow"
    out = cfg.output_location
    spark.sql(f"ALTER TABLE delta.`{out}` ADD COLUMNS (note STRING COMMENT 'the analyst''s')")
    spark.sql(f"ALTER TABLE delta.`{out}` ALTER COLUMN chain_id COMMENT 'which transforms'")
    spark.sql(f"ALTER TABLE delta.`{out}` ADD CONSTRAINT has_id CHECK (id IS NOT NULL)")
    spark.sql(f"ALTER TABLE delta.`{out}` SET TBLPROPERTIES ('team.owner' = 'analytics')")
    edited = current_delta_version(spark, out)
    assert not read_output_state(spark, out).foreign
    assert run_backfill(spark, cfg).skipped and current_delta_version(spark, out) == edited  # 0 commits
    assert run_status(spark, cfg).current
    # the analyst fills the column (a data change: the next run rewrites), then a rewrite keeps the values
    spark.sql(f"UPDATE delta.`{out}` SET note = concat('n', cast(id AS string)) WHERE id % 3 = 0")
    notes = {(r.space_version, r.id): r.note for r in spark.read.format("delta").load(out).collect()}
    assert sum(v is not None for v in notes.values()) > 0
    with pytest.raises(EngineUnavailableError, match=r"column\(s\) bcemb does not own holding values \(note\)"):
        run_backfill(spark, _cfg(fitted, tmp_path, engine="arrow"))
    assert current_delta_version(spark, out) == edited + 1  # the refusal wrote nothing
    result = run_backfill(spark, cfg)
    assert result.engine == "spark" and "note" in result.engine_reason and result.commits == 1
    after = spark.read.format("delta").load(out)
    assert {(r.space_version, r.id): r.note for r in after.collect()} == notes
    fields = {f.name: f for f in after.schema.fields}
    assert fields["note"].metadata.get("comment") == "the analyst's"
    assert fields["chain_id"].metadata.get("comment") == "which transforms"
    props = spark.sql(f"DESCRIBE DETAIL delta.`{out}`").first().properties
    assert props.get("delta.constraints.has_id") and props.get("team.owner") == "analytics"
    assert run_status(spark, cfg).current
