"""`bcemb maintain` keeps what analysts were promised: whole-hour retention rounded up, a floor, the table's own
retention properties, and the retention the VACUUM START commit recorded checked after the fact (issue 23, item 5)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from bclib.config import MaintenanceSettings, config_from_dict
from bclib.errors import ConfigError, MaintenanceError
from bclib.tables.delta import sql_table
from bclib.tables.retention import retention_properties, vacuum_retention_hours

from conftest import small_config

SHORT = {"vacuum_retention_hours": 0.1, "time_travel_hours": 0.1}


# --------------------------------------------------------------------------- the rules (no Spark)


def test_a_retention_below_the_floor_is_refused_at_load_without_the_flag():
    with pytest.raises(ConfigError, match=r"'maintenance.vacuum_retention_hours' = 0.1 is below "
                                          r"maintenance.min_retention_hours = 24.*allow_short_retention: true"):
        config_from_dict({"maintenance": SHORT})
    with pytest.raises(ConfigError, match=r"'maintenance.vacuum_retention_hours' = 47 is below "
                                          r"maintenance.min_retention_hours = 48"):
        config_from_dict({"maintenance": {"vacuum_retention_hours": 47, "time_travel_hours": 12,
                                          "min_retention_hours": 48}})
    assert config_from_dict({"maintenance": {**SHORT, "allow_short_retention": True}}).maintenance.allow_short_retention
    # the time-travel promise holds whatever the flag says
    with pytest.raises(ConfigError, match=r"'maintenance.vacuum_retention_hours' = 0.1 is shorter than "
                                          r"maintenance.time_travel_hours = 2"):
        config_from_dict({"maintenance": {"vacuum_retention_hours": 0.1, "time_travel_hours": 2,
                                          "allow_short_retention": True}})


@pytest.mark.parametrize("settings, hours", [
    ({}, 168),
    ({**SHORT, "allow_short_retention": True}, 1),  # Delta would round 0.1 h down to 0
    ({"vacuum_retention_hours": 0, "time_travel_hours": 0, "allow_short_retention": True}, 0),
    ({"vacuum_retention_hours": 30.2, "time_travel_hours": 24}, 31),
    ({"vacuum_retention_hours": 24.0, "time_travel_hours": 24.0}, 24),
    # built without the load-time checks: still never below time travel nor the floor
    ({"vacuum_retention_hours": 0.1, "time_travel_hours": 2.5}, 24),
    ({"vacuum_retention_hours": 0.1, "time_travel_hours": 2.5, "allow_short_retention": True}, 3),
])
def test_the_retention_used_is_whole_hours_rounded_up_never_below_time_travel_or_the_floor(settings, hours):
    assert vacuum_retention_hours(MaintenanceSettings(**settings)) == hours


def test_retention_properties_cover_the_promise():
    assert retention_properties(config_from_dict({})) == {
        "delta.logRetentionDuration": "interval 720 hours", "delta.deletedFileRetentionDuration": "interval 168 hours"}
    long = config_from_dict({"maintenance": {"vacuum_retention_hours": 1000.5, "time_travel_hours": 1000.2}})
    assert retention_properties(long) == {
        "delta.logRetentionDuration": "interval 1001 hours", "delta.deletedFileRetentionDuration": "interval 1001 hours"}


def test_table_references_reach_sql_quoted():
    assert sql_table("/w/it's `out`") == "delta.`/w/it's ``out```"
    assert sql_table("ml.compat") == "`ml`.`compat`"
    with pytest.raises(ConfigError, match="is not a catalog table name"):
        sql_table("ml.compat; DROP TABLE x")


def _start(**params):
    return SimpleNamespace(version=7, operation_parameters=params)


def test_the_recorded_retention_is_checked():
    from bclib.steps.maintain import check_recorded_retention

    assert check_recorded_retention([_start(specifiedRetentionMillis="3600000")], 1, 0.1, "/w/out") == 1
    assert check_recorded_retention([_start(defaultRetentionMillis="604800000")], 168, 168, "/w/out") == 168
    with pytest.raises(MaintenanceError, match=r"VACUUM START \(version 7\) of '/w/out' recorded a retention of 0 h; "
                                               r"maintain asked for 1 h and maintenance.time_travel_hours promises 0.1"):
        check_recorded_retention([_start(specifiedRetentionMillis="0", defaultRetentionMillis="3600000")], 1, 0.1,
                                  "/w/out")
    with pytest.raises(MaintenanceError, match="recorded no retention"):
        check_recorded_retention([_start()], 1, 0.1, "/w/out")
    with pytest.raises(MaintenanceError, match="wrote 0 VACUUM START commit"):
        check_recorded_retention([], 1, 0.1, "/w/out")


# --------------------------------------------------------------------------- on a Delta table


def _two_versions(spark, location: str) -> list[list[int]]:
    """Versions 0 and 1 of a small output-shaped table, the second replacing every file of the first."""
    rows = []
    for version, offset in ((0, 0), (1, 1000)):
        (spark.range(offset, offset + 50).selectExpr("id", "array(cast(id AS float)) AS vector",
                                                     "cast(id % 2 AS int) AS space_version")
         .write.format("delta").mode("overwrite").partitionBy("space_version").save(location))
        rows.append(list(range(offset, offset + 50)))
    return rows


def _ids(spark, location: str, version: int) -> list[int]:
    df = spark.read.format("delta").option("versionAsOf", version).load(location)
    return sorted(r.id for r in df.select("id").collect())


def test_a_short_retention_is_rounded_up_and_young_versions_stay_readable(spark, tmp_path):
    from bclib.spark import session_conf
    from bclib.steps.maintain import run_maintain
    from bclib.tables.retention import table_properties

    cfg = small_config(tmp_path, evaluate={"label_location": None},
                       maintenance={**SHORT, "allow_short_retention": True})
    expected = _two_versions(spark, cfg.output_location)
    result = run_maintain(spark, cfg)
    # Delta would have rounded 0.1 h to 0 h and deleted version 0's files; 1 h keeps them
    assert result.retention_hours == 1 and result.vacuumed_files == 0
    assert [_ids(spark, cfg.output_location, v) for v in (0, 1)] == expected
    props = table_properties(spark, cfg.output_location)
    assert props["delta.logRetentionDuration"] == "interval 720 hours"
    assert props["delta.deletedFileRetentionDuration"] == "interval 1 hours"
    assert result.properties_set == retention_properties(cfg)
    history = {r.operation: r for r in spark.sql(f"DESCRIBE HISTORY delta.`{cfg.output_location}`").collect()}
    assert _recorded_millis(history["VACUUM START"]) == 3_600_000
    assert result.run_id in history["SET TBLPROPERTIES"].userMetadata
    # again, on a session whose retention check someone turned off: maintain runs its VACUUM with the check on
    # (nothing younger than the table's 1 h goes); the properties are aligned already: no second ALTER
    check = "spark.databricks.delta.retentionDurationCheck.enabled"
    with session_conf(spark, {check: "false"}):
        again = run_maintain(spark, cfg)
        assert spark.conf.get(check) == "false"  # the caller's value is restored
    assert again.properties_set == {} and again.retention_hours == 1 and again.vacuumed_files == 0
    assert [_ids(spark, cfg.output_location, v) for v in (0, 1)] == expected


def _recorded_millis(start) -> int:
    params = start.operationParameters
    return int(params.get("specifiedRetentionMillis", params.get("defaultRetentionMillis")))


def test_a_promise_longer_than_delta_s_defaults_is_kept_by_the_table(spark, tmp_path):
    """Delta 4.4 ignores a non-zero retention given to VACUUM (it uses the table's property, 168 h when unset):
    a 200 h promise holds only because maintain set the property; the log is kept at least 30 days."""
    from bclib.steps.maintain import run_maintain
    from bclib.tables.retention import table_properties

    cfg = small_config(tmp_path, evaluate={"label_location": None},
                       maintenance={"vacuum_retention_hours": 200, "time_travel_hours": 200})
    _two_versions(spark, cfg.output_location)
    assert run_maintain(spark, cfg).retention_hours == 200
    starts = [r for r in spark.sql(f"DESCRIBE HISTORY delta.`{cfg.output_location}`").collect()
              if r.operation == "VACUUM START"]
    assert [_recorded_millis(r) for r in starts] == [200 * 3_600_000]
    props = table_properties(spark, cfg.output_location)
    assert {k: props.get(k) for k in retention_properties(cfg)} == {
        "delta.logRetentionDuration": "interval 720 hours", "delta.deletedFileRetentionDuration": "interval 200 hours"}


def test_a_vacuum_that_recorded_less_than_the_promise_is_a_maintenance_error(spark, tmp_path, monkeypatch):
    from bclib.steps import maintain

    cfg = small_config(tmp_path, evaluate={"label_location": None},
                       maintenance={**SHORT, "allow_short_retention": True})
    _two_versions(spark, cfg.output_location)
    # a regression in the retention rule: 0 h for VACUUM and the table's property alike (maintain only raises the
    # property, so the table starts at 0 h as someone may have set it)
    spark.sql(f"ALTER TABLE delta.`{cfg.output_location}` SET TBLPROPERTIES "
              "('delta.deletedFileRetentionDuration' = 'interval 0 hours')")
    monkeypatch.setattr(maintain, "vacuum_retention_hours", lambda m: 0)
    monkeypatch.setattr(maintain, "retention_properties", lambda c: {
        "delta.logRetentionDuration": "interval 720 hours", "delta.deletedFileRetentionDuration": "interval 0 hours"})
    with pytest.raises(MaintenanceError, match=r"recorded a retention of 0 h; maintain asked for 0 h and "
                                               r"maintenance.time_travel_hours promises 0.1 h"):
        maintain.run_maintain(spark, cfg)


def test_vacuum_lists_with_tasks_sized_to_the_session_not_delta_s_10000(spark):
    """Delta lists a table's directories for VACUUM with spark.sql.sources.parallelPartitionDiscovery.parallelism
    tasks (10,000 by default: ~30 s per VACUUM of a small table on 2 cores); maintain sets it for its VACUUM."""
    from bclib.steps.maintain import vacuum_listing_parallelism

    assert vacuum_listing_parallelism(spark, 0) == 2 * spark.sparkContext.defaultParallelism
    assert vacuum_listing_parallelism(spark, 64) == 64
    cfg = config_from_dict({"maintenance": {"vacuum_listing_parallelism": 16}})
    assert cfg.maintenance.vacuum_listing_parallelism == 16
    with pytest.raises(ConfigError, match="vacuum_listing_parallelism"):
        config_from_dict({"maintenance": {"vacuum_listing_parallelism": -1}})
