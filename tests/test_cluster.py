"""The cluster recipe in docs/where-it-runs.md, run as written against a real Spark standalone cluster on 127.0.0.1.

A master and one worker are started with pyspark's own `spark-class` (the pip package has no
start-master.sh) and stopped by process group. The scheduled job goes through `spark-submit` in client
mode with the dist zip (`--py-files`), the Delta jars from the cache (`--jars`) and the config passed by
path; `status` is also submitted with `--packages` (Ivy, as a cluster without the cache would). The output
must equal an in-process local run of the same config: same transform ids, vectors within 1e-6.

The submitted run also has TZ=America/Los_Angeles and Spark's session time zone Asia/Kolkata: every
timestamp it writes (registry created_at, output produced_at, metrics computed_at) must be the true UTC
instant.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest
import yaml

from bclib.spark import cached_delta_jars, delta_maven_coordinates

from conftest import JIT_FOR_TESTS, REPO, free_port, spark_submit_test_conf, wait_port

pytestmark = pytest.mark.slow

SPARK_HOME = Path(__import__("pyspark").__file__).parent


def _env(tmp: Path, jvm: str = JIT_FOR_TESTS) -> dict:
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "PYSPARK_PYTHON": sys.executable,
           "PYSPARK_DRIVER_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1", "OPENBLAS_NUM_THREADS": "1",
           "SPARK_WORKER_DIR": str(tmp / "work"), "SPARK_LOG_DIR": str(tmp / "logs"),
           "SPARK_DAEMON_JAVA_OPTS": jvm, "SPARK_DAEMON_MEMORY": "512m"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, subprocess_jvm_options):
    """spark://127.0.0.1:<port> with one worker (2 cores, 2 GB); both stopped at the end."""
    tmp = tmp_path_factory.mktemp("cluster")
    env = _env(tmp, subprocess_jvm_options)
    port, ui, wui = free_port(), free_port(), free_port()
    spark_class = str(SPARK_HOME / "bin" / "spark-class")
    master = subprocess.Popen([spark_class, "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                               "--port", str(port), "--webui-port", str(ui)], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(tmp / "master.log", "w"))
    procs = [master]
    try:
        wait_port(port, master)
        url = f"spark://127.0.0.1:{port}"
        worker = subprocess.Popen([spark_class, "org.apache.spark.deploy.worker.Worker", "--cores", "2",
                                   "--memory", "2g", "--webui-port", str(wui), url], env=env, start_new_session=True,
                                  stdout=subprocess.DEVNULL, stderr=open(tmp / "worker.log", "w"))
        procs.append(worker)
        end = time.time() + 120
        while "Successfully registered with master" not in (tmp / "worker.log").read_text():
            assert time.time() < end and worker.poll() is None, (tmp / "worker.log").read_text()[-3000:]
            time.sleep(0.5)
        yield url, env, tmp, subprocess_jvm_options
    finally:
        for p in reversed(procs):
            try:
                os.killpg(p.pid, signal.SIGTERM)
                p.wait(timeout=30)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                os.killpg(p.pid, signal.SIGKILL)


def _config(tmp: Path) -> Path:
    """The small-cluster config of docs/where-it-runs.md (conf/cluster.example.yaml), with local paths."""
    data = {
        "spark": {"app_name": "bcemb-cluster-test", "shuffle_partitions": 4, "delta_jars": "provided"},
        "embeddings": {"location": str(tmp / "emb" / "v{version}"), "versions": [0, 1, 2]},
        "registry_location": str(tmp / "registry"), "output_location": str(tmp / "out"),
        "metrics_location": str(tmp / "metrics"),
        "fit": {"min_pairs": 50, "holdout": 0.25},
        "evaluate": {"label_location": str(tmp / "labels"), "report_dir": str(tmp / "reports"), "neighbours_k": 5},
        "demo": {"n_entities": 1500, "dims": [12, 16, 20], "block_rows": 512},
    }
    path = tmp / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _submit(url: str, env: dict, job: str, conf: Path, deps: list[str], cwd: Path, jvm: str,
            extra: tuple = ()) -> subprocess.CompletedProcess:
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", url, "--deploy-mode", "client", *deps,
           "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
           "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
           "--conf", "spark.executor.memory=1g", "--conf", "spark.executor.cores=2",
           "--conf", "spark.cores.max=2",  # one executor with both cores: a JVM fewer on a 2-core machine
           *spark_submit_test_conf(),
           "--conf", f"spark.driver.extraJavaOptions={jvm}", "--conf", f"spark.executor.extraJavaOptions={jvm}",
           *extra,
           "--py-files", str(cwd / "dist" / "bclib.zip"), str(REPO / "jobs" / f"{job}.py"), "--config", str(conf)]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def _space(spark, location: str, space: int):
    t = spark.read.format("delta").load(location).where(f"space_version = {space}").orderBy("id") \
        .select("id", "vector").toArrow()
    return t.column("id").to_numpy(), np.array(t.column("vector").to_pylist(), dtype=np.float64)


def test_spark_submit_on_a_standalone_cluster_matches_a_local_run(spark, cluster):
    from bclib.config import load_config
    from bclib.steps.generate import run_generate
    from bclib.steps.run import run_scheduled
    from bclib.tables.registry import active_transforms

    url, env, tmp, jvm = cluster
    work = tmp / "submit"
    work.mkdir()
    shutil.make_archive(str(work / "dist" / "bclib"), "zip", root_dir=str(REPO), base_dir="bclib")  # make dist
    conf = _config(work)
    cfg = load_config(conf)
    run_generate(spark, cfg)
    jars = cached_delta_jars("~/.cache/bcemb/jars")
    deps = ["--jars", ",".join(jars)] if jars else ["--packages", delta_maven_coordinates()[0]]
    tz_env = {**env, "TZ": "America/Los_Angeles"}
    before = datetime.now(timezone.utc).timestamp()
    out = _submit(url, tz_env, "run", conf, deps, work, jvm,
                  ("--conf", "spark.sql.session.timeZone=Asia/Kolkata",
                   "--conf", "spark.executorEnv.TZ=America/Los_Angeles"))
    after = datetime.now(timezone.utc).timestamp()
    print(f"cluster test: submitted run {after - before:.1f}s", file=sys.stderr)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "app-" in (tmp / "worker.log").read_text()  # executors really ran on the worker
    for location, column in ((cfg.registry_location, "created_at"), (cfg.output_location, "produced_at"),
                             (cfg.metrics_location, "computed_at")):
        stamps = [r[0] for r in spark.read.format("delta").load(location).selectExpr(
            f"unix_micros({column}) / 1e6").collect()]
        assert stamps and all(before - 5 <= t <= after + 5 for t in stamps), (column, before, min(stamps), after)
    remote = {e: (r.transform_id, r.transform) for e, r in active_transforms(spark, cfg.registry_location).items()}
    spaces = {j: _space(spark, cfg.output_location, j) for j in (0, 1)}
    # the same config on the same paths, run in process with local Spark: same ids, same vectors
    for name in ("registry", "out", "metrics", "reports"):
        shutil.rmtree(work / name, ignore_errors=True)
    t_local = time.time()
    run_scheduled(spark, cfg)
    print(f"cluster test: local run {time.time() - t_local:.1f}s", file=sys.stderr)
    local = {e: (r.transform_id, r.transform) for e, r in active_transforms(spark, cfg.registry_location).items()}
    assert len(remote) == 2 and {e: t[0] for e, t in remote.items()} == {e: t[0] for e, t in local.items()}
    for edge, (_, t) in remote.items():
        np.testing.assert_allclose(t.weight, local[edge][1].weight, rtol=1e-9, atol=1e-12)
    for j, (ids_r, v_r) in spaces.items():
        ids_l, v_l = _space(spark, cfg.output_location, j)
        np.testing.assert_array_equal(ids_r, ids_l)
        np.testing.assert_allclose(v_r, v_l, rtol=1e-6, atol=1e-6)
    # status through --packages (Ivy), as a cluster without the jar cache would submit it
    t_status = time.time()
    status = _submit(url, env, "status", conf, ["--packages", delta_maven_coordinates()[0]], work, jvm)
    print(f"cluster test: status via --packages {time.time() - t_status:.1f}s", file=sys.stderr)
    assert status.returncode == 0, status.stderr[-4000:]
    assert "all current" in status.stdout
