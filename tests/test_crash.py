"""kill -9 at seeded random points of `bcemb backfill` (full and incremental) and `bcemb fit`, then rerun.

After every kill: the output's latest Delta version is the pre-run one or a complete commit (never in
between), rows per space equal the source's, no id twice in a space; the registry has exactly one
active transform per edge. After all kills a rerun converges to the content of an uninterrupted run
(the same ids per space, vectors within the promised float32 tolerance). The tally (kills tried / converged, rows lost, rows duplicated) is printed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from bclib.config import load_config
from bclib.tables.delta import current_delta_version, delta_table, read_delta

from conftest import JIT_FOR_TESTS, REPO, assert_same_vectors

pytestmark = pytest.mark.slow

# kills per kind (full backfill, incremental backfill, fit); BCEMB_CRASH_KILLS=5 for the 15-kill run
KILLS = int(os.environ.get("BCEMB_CRASH_KILLS", "2"))


def _config(tmp: Path, out: str = "out", jvm: str = JIT_FOR_TESTS, registry: str = "registry") -> Path:
    data = {
        "spark": {"master": "local[2]", "shuffle_partitions": 2,
                  "conf": {"spark.ui.enabled": "false", "spark.driver.extraJavaOptions": jvm}},
        "embeddings": {"location": str(tmp / "emb" / "v{version}"), "versions": [0, 1, 2]},
        "registry_location": str(tmp / registry), "output_location": str(tmp / out),
        "metrics_location": str(tmp / "metrics"),
        "fit": {"min_pairs": 50},
        "evaluate": {"label_location": None, "report_dir": str(tmp / "reports")},
        # several files per space for both engines (output_partitions would send auto to the spark engine)
        # deletion vectors: the incremental kind really commits incrementally (auto rewrites a plain output in full)
        # and changes piling up over killed rounds (2 % each) stay below incremental_max_fraction
        "backfill": {"target_file_mb": 1, "arrow_task_mb": 1, "deletion_vectors": True,
                     "incremental_max_fraction": 0.5},
        "demo": {"n_entities": 10_000, "dims": [32, 48, 64], "block_rows": 2048},
        # a registry of its own is another warehouse: its fit does not wait for the output's run lease
        "lease": {"location": str(tmp / f"lease-{registry}")},
    }
    path = tmp / f"{out}-{registry}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _start(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    return subprocess.Popen([sys.executable, "-m", "bclib.cli", *args, "--log-level", "WARNING"], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)


def _run_to_end(args: list[str]) -> float:
    started = time.time()
    proc = _start(args)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err.decode()[-2000:]
    return time.time() - started


def _rerun_in_process(args: list[str]) -> None:
    """The CLI step run to its end in this process, on the suite's Spark session (`bclib.cli.main`, as the
    lifecycle tests run it): a convergence rerun needs no JVM of its own, only the kills do."""
    from bclib.cli import main

    assert main([*args, "--log-level", "WARNING"]) == 0, args


def _kill_at(args: list[str], delay: float) -> bool:
    """Start the command, SIGKILL its whole process group (Python driver and JVM) after `delay` s; True if killed."""
    proc = _start(args)
    try:
        proc.wait(timeout=delay)
        return False  # it finished first
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
        return True


def _same_spaces(spark, got: str, want: str) -> None:
    """The same spaces and ids (exactly) and vectors within the promised float32 tolerance (VECTOR_RTOL):
    an incremental commit batches rows differently from a full rewrite."""
    def spaces(location):
        out = {}
        df = read_delta(spark, location).select("space_version", "id", "vector")
        for j in sorted(r.space_version for r in df.select("space_version").distinct().collect()):
            rows = sorted(df.where(f"space_version = {j}").select("id", "vector").collect(), key=lambda r: r.id)
            out[j] = (np.array([r.id for r in rows], dtype=np.int64), np.array([r.vector for r in rows], np.float32))
        return out

    a, b = spaces(got), spaces(want)
    assert sorted(a) == sorted(b)
    for j in a:
        np.testing.assert_array_equal(a[j][0], b[j][0])
        assert_same_vectors(a[j][1], b[j][1], f"space {j}")


def _counts(spark, cfg) -> dict[int, int]:
    return {r.space_version: r["count"] for r in read_delta(spark, cfg.output_location)
            .groupBy("space_version").count().collect()}


def _check_output(spark, cfg, before: int, counts_before: dict[int, int], tally: dict) -> None:
    """The invariants after a kill: pre-run version or one complete commit; rows and ids per space."""
    now = current_delta_version(spark, cfg.output_location)
    assert now in (before, before + 1), f"output went from Delta v{before} to v{now}"
    n_src = read_delta(spark, cfg.version_location(2)).count()
    counts = _counts(spark, cfg)
    expected = counts_before if now == before else {j: n_src for j in counts_before}
    if now == before + 1:
        meta = delta_table(spark, cfg.output_location).history(1).first().userMetadata
        assert meta and '"bcemb": "backfill"' in meta
    tally["lost"] += sum(max(0, expected[j] - counts.get(j, 0)) for j in expected)
    tally["duplicated"] += sum(max(0, counts.get(j, 0) - expected[j]) for j in expected)
    tally["duplicated"] += read_delta(spark, cfg.output_location).groupBy("space_version", "id").count() \
        .where("count > 1").count()
    assert counts == expected


def _change(spark, cfg, seed: int) -> None:
    rng = np.random.default_rng(seed)
    loc = cfg.version_location(2)
    t = delta_table(spark, loc)
    upd = read_delta(spark, loc).where(f"id % 50 = {seed % 50}").select("id").collect()
    rows = [(r.id, rng.normal(size=64).astype(np.float32).tolist()) for r in upd]
    changes = spark.createDataFrame(rows, "id long, vector array<float>")
    t.alias("t").merge(changes.alias("s"), "t.id = s.id").whenMatchedUpdateAll().execute()


def _make_world(spark, tmp: Path, jvm: str):
    """Versions 0..2, their transforms and a published output under tmp (the subprocess config too)."""
    from bclib.steps.backfill import run_backfill
    from bclib.steps.fit import run_fit
    from bclib.steps.generate import run_generate

    conf = _config(tmp, jvm=jvm)
    cfg = load_config(conf)
    run_generate(spark, cfg)
    run_fit(spark, cfg)
    run_backfill(spark, cfg)
    return tmp, conf, cfg


@pytest.fixture(scope="module")
def world(spark, tmp_path_factory, subprocess_jvm_options):
    return _make_world(spark, tmp_path_factory.mktemp("crash"), subprocess_jvm_options)


def _fit_kills(spark, tmp: Path, jvm: str, delays, results: dict) -> None:
    """kill -9 during `bcemb fit --refit all` on a registry of its own; after each: one active per edge."""
    conf = _config(tmp, jvm=jvm, registry="registry_fit")
    cfg = load_config(conf)
    _run_to_end(["fit", "--config", str(conf)])
    killed, checked = 0, 0
    for i, delay in enumerate(delays):
        args = ["fit", "--config", str(conf), "--refit", "all", "--set", f"transform.ridge={0.001 * (i + 1)}"]
        killed += _kill_at(args, float(delay))
        active = read_delta(spark, cfg.registry_location).where("status = 'active'") \
            .groupBy("source_version", "target_version").count().collect()
        assert sorted((r.source_version, r.target_version, r["count"]) for r in active) == [(1, 0, 1), (2, 1, 1)]
        checked += 1
    results.update(killed=killed, checked=checked)


def test_kill_minus_9_during_full_and_incremental_backfills_and_fit(spark, world, capsys, subprocess_jvm_options):
    import threading

    from bclib.steps.backfill import run_backfill

    tmp, conf, cfg = world
    rng = np.random.default_rng(2026)
    tally = {"tried": 0, "killed": 0, "converged": 0, "lost": 0, "duplicated": 0}
    full_args = ["backfill", "--config", str(conf), "--set", "backfill.force=true"]
    duration = _run_to_end(full_args)  # an uninterrupted forced rewrite, timed: kills are spread over it
    # the fit's kills run beside the backfill's (another registry, the same version tables)
    fit_results: dict = {}
    fit_thread = threading.Thread(target=_fit_kills, args=(spark, tmp, subprocess_jvm_options,
                                                           rng.uniform(0.5 * duration, 1.3 * duration, KILLS),
                                                           fit_results))
    fit_thread.start()
    for i, delay in enumerate(rng.uniform(0.35 * duration, 1.0 * duration, KILLS)):
        engine = ("arrow", "spark")[i % 2]  # both engines' full rewrites are killed
        before, counts = current_delta_version(spark, cfg.output_location), _counts(spark, cfg)
        tally["tried"] += 1
        tally["killed"] += _kill_at(full_args + ["--set", f"backfill.engine={engine}"], float(delay))
        _check_output(spark, cfg, before, counts, tally)

    incr_args = ["backfill", "--config", str(conf)]
    for i, delay in enumerate(rng.uniform(0.35 * duration, 1.0 * duration, KILLS)):
        _change(spark, cfg, seed=i)
        before, counts = current_delta_version(spark, cfg.output_location), _counts(spark, cfg)
        tally["tried"] += 1
        tally["killed"] += _kill_at(incr_args, float(delay))
        _check_output(spark, cfg, before, counts, tally)
    _rerun_in_process(incr_args)  # the rerun converges ...
    reference = load_config(_config(tmp, out="reference"))
    run_backfill(spark, reference)  # ... to what an uninterrupted full rewrite of the same source gives
    _same_spaces(spark, cfg.output_location, reference.output_location)
    tally["converged"] = 2 * KILLS
    fit_thread.join()
    assert fit_results.get("checked") == KILLS, fit_results  # the thread's assertions all held
    tally["tried"] += KILLS
    tally["killed"] += fit_results["killed"]
    tally["converged"] += KILLS
    with capsys.disabled():
        print(f"\ncrash test: {tally['tried']} kills tried ({tally['killed']} hit a running process), "
              f"{tally['converged']} converged, rows lost {tally['lost']}, rows duplicated {tally['duplicated']}")
    assert tally["lost"] == 0 and tally["duplicated"] == 0
    assert tally["killed"] >= 2 * KILLS  # the delays really hit running processes
