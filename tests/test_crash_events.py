"""kill -9 at events, not at times: the arrow engine's first part file, the output's next _delta_log entry (before
the side tables), an incremental INSERT REPLACE ON commit on a deletion-vector output at its commit, `fit
--refit` at its registry commit, `maintain` at its OPTIMIZE commit. After each kill the tables are at the
pre-run version or one complete commit, the run lease is free again, and a rerun converges. (Beside
tests/test_crash.py so that the two long kill tests can run on different pytest workers.)
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from bclib.tables.delta import current_delta_version, delta_table, read_delta

from test_crash import _change, _check_output, _counts, _make_world, _rerun_in_process, _start

pytestmark = pytest.mark.slow


def _new_files(root: Path, pattern: str, since: set) -> list:
    return [p for p in root.glob(pattern) if p not in since]


def _kill_when(args: list[str], event, timeout: float = 600) -> bool:
    """Start the command; SIGKILL its process group as soon as `event()` is true (polled every 10 ms, an
    event on disk, not a time). True when it was killed there, False when it ended first."""
    proc = _start(args)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if event():
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    raise AssertionError(f"{args}: the event did not happen in {timeout}s")


@pytest.fixture(scope="module")
def event_world(spark, tmp_path_factory, subprocess_jvm_options):
    return _make_world(spark, tmp_path_factory.mktemp("crash_events"), subprocess_jvm_options)


def test_kills_at_the_first_part_file_the_log_entry_and_before_the_side_tables(spark, event_world, capsys):
    """kill -9 when the arrow engine's first part file appears, when the output's next _delta_log entry appears
    (before the metrics/gate side-table commits), during an incremental commit (INSERT REPLACE ON) on a
    deletion-vector output, `fit --refit` at its registry commit and `maintain` at its OPTIMIZE commit: after each kill the tables
    are at the pre-run version or one complete commit, the run lease is free again (the holder died), and a
    rerun converges."""
    tmp, conf, cfg = event_world
    out = Path(cfg.output_location)
    tally = {"tried": 0, "killed": 0, "converged": 0, "lost": 0, "duplicated": 0}

    def commit_after(root: Path, version: int):
        return lambda: (root / "_delta_log" / f"{version + 1:020d}.json").exists()

    cases = []
    before_files = set(out.glob("space_version=*/*.parquet"))
    cases.append(("arrow full rewrite, first part file",
                  ["backfill", "--config", str(conf), "--set", "backfill.force=true", "--set", "backfill.engine=arrow"],
                  lambda: bool(_new_files(out, "space_version=*/*.parquet", before_files))))
    for name, args, event in cases:
        before, counts = current_delta_version(spark, cfg.output_location), _counts(spark, cfg)
        tally["tried"] += 1
        tally["killed"] += _kill_when(args, event)
        _check_output(spark, cfg, before, counts, tally)
        assert current_delta_version(spark, cfg.output_location) == before, name  # no commit yet at that event
    for engine in ("arrow", "spark"):  # at the output's commit, before the side tables
        before, counts = current_delta_version(spark, cfg.output_location), _counts(spark, cfg)
        tally["tried"] += 1
        tally["killed"] += _kill_when(["backfill", "--config", str(conf), "--set", "backfill.force=true",
                                       "--set", f"backfill.engine={engine}"], commit_after(out, before))
        _check_output(spark, cfg, before, counts, tally)
    _change(spark, cfg, seed=7)  # an incremental commit into the deletion-vector output, killed at its commit
    before, counts = current_delta_version(spark, cfg.output_location), _counts(spark, cfg)
    tally["tried"] += 1
    tally["killed"] += _kill_when(["backfill", "--config", str(conf)], commit_after(out, before))
    _check_output(spark, cfg, before, counts, tally)
    _rerun_in_process(["backfill", "--config", str(conf)])  # converges: no LeaseHeldError from the killed holders
    tally["converged"] = tally["tried"]

    registry = Path(cfg.registry_location)
    reg_before = current_delta_version(spark, cfg.registry_location)
    tally["tried"] += 1
    tally["killed"] += _kill_when(["fit", "--config", str(conf), "--refit", "all", "--set", "transform.ridge=0.01"],
                                  commit_after(registry, reg_before))
    active = read_delta(spark, cfg.registry_location).where("status = 'active'") \
        .groupBy("source_version", "target_version").count().collect()
    assert sorted((r.source_version, r.target_version, r["count"]) for r in active) == [(1, 0, 1), (2, 1, 1)]
    _rerun_in_process(["fit", "--config", str(conf)])
    tally["converged"] += 1

    before = current_delta_version(spark, cfg.output_location)  # maintain: killed at its OPTIMIZE commit
    tally["tried"] += 1
    tally["killed"] += _kill_when(["maintain", "--config", str(conf), "--set", "maintenance.optimize_min_files=2"],
                                  commit_after(out, before))
    versions = delta_table(spark, cfg.output_location).history().select("version").collect()
    for v in sorted(r.version for r in versions)[-3:]:  # time travel still reads the recent versions
        spark.read.format("delta").option("versionAsOf", v).load(cfg.output_location).count()
    _rerun_in_process(["maintain", "--config", str(conf), "--set", "maintenance.optimize_min_files=2"])
    _rerun_in_process(["backfill", "--config", str(conf)])  # still up to date after maintain: converged
    tally["converged"] += 1
    n_src = read_delta(spark, cfg.version_location(2)).count()
    assert _counts(spark, cfg) == {0: n_src, 1: n_src}
    with capsys.disabled():
        print(f"\nevent kills: {tally['tried']} tried ({tally['killed']} hit the event), {tally['converged']} "
              f"converged, rows lost {tally['lost']}, rows duplicated {tally['duplicated']}")
    assert tally["lost"] == 0 and tally["duplicated"] == 0 and tally["killed"] == tally["tried"]
