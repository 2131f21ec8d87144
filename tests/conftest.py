"""One session-scoped local Spark + Delta session for the whole suite (never stopped between tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
# SQL confs for every JVM the suite starts. The suite's tables are a few thousand rows, read by thousands of
# small queries in JVMs that are new or still JIT-compiling: compiling each query's generated Java (whole-stage
# codegen, Janino, then the JIT) costs more than the rows it processes. Interpreted evaluation gives the same
# results (Spark's own suites run both modes); adaptive execution re-plans stages for nothing at this size.
# Measured 2026-12-07, each file alone: test_concurrent_writers + test_id_types 101 -> 84 s, test_incremental +
# test_engines 134 -> 114 s, test_crash_events 107 -> 86 s; the whole suite 885 -> 822 s (seed 777).
# pyspark passes PYSPARK_SUBMIT_ARGS to the spark-submit that starts a driver's JVM (the session fixture's,
# each subprocess CLI's); the tests that call spark-submit themselves add `spark_submit_test_conf()`. Not
# SPARK_CONF_DIR: Spark puts that folder on the class path, and a non-empty folder there turns off the class-data
# archive of the subprocess JVMs (their runs got ~25 % slower). BCEMB_TEST_CODEGEN=1 keeps Spark's defaults.
TEST_SQL_CONF = {} if os.environ.get("BCEMB_TEST_CODEGEN") == "1" else {
    "spark.sql.codegen.wholeStage": "false",
    "spark.sql.codegen.factoryMode": "NO_CODEGEN",
    "spark.sql.adaptive.enabled": "false",
}


def spark_submit_test_conf() -> list[str]:
    """TEST_SQL_CONF as spark-submit arguments (`--conf k=v` each)."""
    return [arg for key, value in TEST_SQL_CONF.items() for arg in ("--conf", f"{key}={value}")]


# ahead of a caller's own PYSPARK_SUBMIT_ARGS (kept: a later --conf of the same key wins), else the default's
_CALLERS_SUBMIT_ARGS = os.environ.get("PYSPARK_SUBMIT_ARGS") or "pyspark-shell"
if not _CALLERS_SUBMIT_ARGS.startswith(" ".join(spark_submit_test_conf())):  # xdist workers inherit the parent's
    os.environ["PYSPARK_SUBMIT_ARGS"] = " ".join([*spark_submit_test_conf(), _CALLERS_SUBMIT_ARGS])
JIT_FOR_TESTS = os.environ.get("BCEMB_SUBPROCESS_JIT", "-XX:TieredStopAtLevel=1")  # short-lived JVMs of subprocess tests: C1 alone starts faster
# the session JVMs: tiered C1 + C2 and the throughput collector. C1 alone looked 7 % faster on two 3-minute
# files but made the whole suite 50 % slower (25:33 -> 38:11, 2026-12-06: in-process tests ran ~2x longer once
# hot code would have been C2-compiled): a JVM that lives the whole run pays C2 back
SESSION_JVM_OPTIONS = "-XX:+UseParallelGC"


# Files whose tests together take a minute or more (measured with `--durations=0` under `-n 2`, 2026-12-06). The
# workers take whole files (--dist loadfile, --no-loadscope-reorder) in collection order: these go first, so the
# run does not end with one worker alone on a long file while the other idles. Each group is shuffled by the seed.
LONG_FILES = frozenset({
    "test_crash_events.py", "test_cluster.py", "test_concurrent_writers.py", "test_bad_input_catalogue.py",
    "test_incremental.py", "test_id_types.py", "test_lifecycle.py", "test_lease.py", "test_paper_quick.py",
    "test_crash.py", "test_engines.py", "test_end_to_end.py", "test_bad_input.py", "test_table_rules.py",
    "test_object_store.py", "test_secrets.py", "test_connect.py", "test_catalog.py",
    "test_azure_gcs.py",
})


# Tests marked `slow` here, beside the files that mark themselves (kill -9, the cluster, the paper run), so that
# `make test-fast` (-m "not slow") stays a smoke run of a few minutes: every file keeps a fast representative and
# every test still runs in `make test`. Node-id prefixes; figures are each test's seconds under `-n 2` (2026-12-06).
SLOW_TESTS = (
    "tests/test_lifecycle.py::test_four_days_of_scheduled_runs",  # 109 s
    "tests/test_lifecycle.py::test_restore_of_the_output_makes_run_rewrite",  # 59 s
    "tests/test_lifecycle.py::test_registry_commands_and_a_tampered_checksum",  # 31 s
    "tests/test_table_rules.py::test_source_layouts_the_raw_reads_would_get_wrong_fall_back_to_spark",  # 108 s
    "tests/test_table_rules.py::test_a_clustered_output_is_refused_at_plan_time_by_name",  # 16 s
    "tests/test_table_rules.py::test_a_generated_column_or_a_foreign_delta_property",  # 11 s
    "tests/test_lease.py::test_two_processes_on_one_output_on_an_s3_compatible_store",  # 2 x 60 s, two processes each
    "tests/test_lease.py::test_two_backfill_processes_on_one_output_write_once",  # 52 s, two bcemb processes
    "tests/test_batch_invariance.py::test_both_engines_over_batch_sizes",  # 63 s (the kernel's own check stays)
    "tests/test_incremental.py::test_without_deletion_vectors",  # 33 s
    "tests/test_incremental.py::test_deletes_beyond_max_shrink",  # 28 s
    "tests/test_incremental.py::test_maintain_compacts_and_vacuums",  # 28 s
    "tests/test_incremental.py::test_without_change_data_feed",  # 24 s
    "tests/test_incremental.py::test_a_retried_commit_is_skipped",  # 20 s
    "tests/test_incremental.py::test_a_source_with_deletion_vectors",  # 27 s
    "tests/test_concurrent_writers.py::test_a_concurrent_commit_to_the_spaces_makes_the_rewrite_replan[insert_only",
    "tests/test_concurrent_writers.py::test_a_concurrent_commit_to_the_spaces_makes_the_rewrite_replan[overwrite",
    "tests/test_concurrent_writers.py::test_a_concurrent_commit_to_the_spaces_makes_the_rewrite_replan[property",
    "tests/test_concurrent_writers.py::test_a_concurrent_commit_to_the_spaces_makes_the_rewrite_replan[schema",
    "tests/test_concurrent_writers.py::test_a_merge_with_deletion_vectors",  # 24 s
    "tests/test_concurrent_writers.py::test_a_concurrent_vacuum",  # 20 s
    "tests/test_concurrent_writers.py::test_two_backfills_of_a_new_output",
    "tests/test_engines.py::test_an_all_invalid_file_in_quarantine_mode",  # 24 s
    "tests/test_engines.py::test_arrow_commits_read_by_spark_delta_rs_and_duckdb",  # 23 s
    "tests/test_engines.py::test_a_bad_row_fails_the_arrow_engine",  # 15 s
    "tests/test_engines.py::test_arrow_and_spark_engines_write_the_same_table[one_big_file",
    "tests/test_engines.py::test_arrow_and_spark_engines_write_the_same_table[with_empty",
    "tests/test_id_types.py::test_a_type_widened_source",  # 18 s
    "tests/test_id_types.py::test_decimal_18_ids",  # 16 s
    "tests/test_id_types.py::test_int_and_bigint_versions",  # 16 s
    "tests/test_id_types.py::test_string_ids_beside_numeric_ids",  # 15 s
    "tests/test_id_types.py::test_the_gate_refuses_an_edge_judged",  # 11 s
    "tests/test_id_types.py::test_decimal_20_ids",  # 9-43 s
    "tests/test_engines.py::test_auto_says_why_it_falls_back",  # 18-27 s
    "tests/test_bad_input.py::test_quarantine_takes_the_bad_rows",  # 26 s
    "tests/test_storage_errors.py::test_a_full_disk",  # 16 s
    "tests/test_end_to_end.py::test_the_default_fit_uses_at_least_90_percent",  # 12 s
    "tests/test_end_to_end.py::test_fit_sampling_is_one_scan_per_table",  # 22 s
    "tests/test_bad_input_catalogue.py::test_a_quote_in_a_config_value",  # 12-20 s
    "tests/test_ids_and_time.py::test_ids_keep_their_exact_value_through_fit_and_backfill[near 2^63",  # 11-13 s
    "tests/test_vector_encoding.py::test_an_encoded_source_backfills_as_its_array_twin_on_both_engines",  # 4 x 8 s
    "tests/test_vector_encoding.py::test_an_encoded_vector_column_is_refused",  # its module fixture: ~25 s
    "tests/test_incremental.py::test_an_incremental_merge_keeps_an_analysts_column_values",  # ~20 s
    "tests/test_api.py::test_the_notebook_example_runs_the_daily_job_twice",  # two runs of a fresh demo
    "tests/test_serving.py::test_bcemb_export_gives_what_the_backfill_wrote",
    "tests/test_serving.py::test_the_sql_function_maps_like_the_output_table",
    "tests/test_lost_versions.py::test_a_lost_old_version_is_named_and_holds_back_only_its_own_space[removed",
    "tests/test_lost_versions.py::test_a_lost_old_version_is_named_and_holds_back_only_its_own_space[files_gone",
    "tests/test_table_rules.py::test_an_analysts_columns_comment_and_constraint",
)
# the bad-input catalogue: these cases stay in the fast run, every other case is slow (6-15 s each)
FAST_CATALOGUE_CASES = ("[NaN element]", "[null ids]", "[wrong vector length]", "[empty source]")


@pytest.hookimpl(tryfirst=True)  # before pytest's own -m deselection reads the marks
def pytest_itemcollected(item):
    nodeid = item.nodeid
    catalogue = nodeid.startswith("tests/test_bad_input_catalogue.py::test_bad_input_gets_a_named_error")
    if nodeid.startswith(SLOW_TESTS) or (catalogue and not nodeid.endswith(FAST_CATALOGUE_CASES)):
        item.add_marker(pytest.mark.slow)


@pytest.hookimpl(trylast=True)  # after pytest-randomly's shuffle: the order inside each file stays its own
def pytest_collection_modifyitems(config, items):
    """Long files first (in an order drawn from the run's seed), then the rest (likewise)."""
    import random

    seed = getattr(config.option, "randomly_seed", None)
    rng = random.Random(seed if isinstance(seed, int) else 0)
    files = list(dict.fromkeys(item.path.name for item in items))
    long_files = [f for f in files if f in LONG_FILES]
    short_files = [f for f in files if f not in LONG_FILES]
    if isinstance(seed, int):  # pytest-randomly active: both groups in a seeded random order
        rng.shuffle(long_files)
        rng.shuffle(short_files)
    rank = {f: i for i, f in enumerate(long_files + short_files)}
    items.sort(key=lambda item: rank[item.path.name])  # stable: each file's own order is kept


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from bclib.config import SparkSettings
    from bclib.spark import session_builder

    settings = SparkSettings(
        master="local[2]", app_name="bcemb-tests", shuffle_partitions=2,
        warehouse_dir=str(tmp_path_factory.mktemp("warehouse")),
        conf={"spark.default.parallelism": "2", "spark.driver.memory": "2g",
              # small tables: Delta rebuilds snapshots with 50 shuffle partitions by default
              "spark.databricks.delta.snapshotPartitions": "2",
              # SESSION_JVM_OPTIONS: C1 + C2 and the throughput collector (BCEMB_TEST_JIT overrides)
              "spark.driver.extraJavaOptions": os.environ.get("BCEMB_TEST_JIT", SESSION_JVM_OPTIONS),
              **dict(kv.split("=", 1) for kv in os.environ.get("BCEMB_TEST_CONF", "").split() if kv)},
    )
    session = session_builder(settings).getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session


WARMUP = """
import sys
from bclib.config import SparkSettings
from bclib.spark import get_or_create
spark = get_or_create(SparkSettings(master="local[2]", conf={"spark.driver.extraJavaOptions": sys.argv[1]}))
from delta.tables import DeltaTable
loc = sys.argv[2]
spark.range(100).selectExpr("id", "array(cast(id as float)) AS vector", "cast(id % 2 AS int) AS p") \\
    .write.format("delta").partitionBy("p").save(loc)
t = DeltaTable.forPath(spark, loc)
src = spark.range(50).selectExpr("id", "array(cast(0 as float)) AS vector", "cast(id % 2 AS int) AS p")
t.alias("t").merge(src.alias("s"), "t.id = s.id").whenMatchedUpdateAll().whenNotMatchedInsertAll().execute()
t.history(1).collect()
spark.read.format("delta").load(loc).groupBy("p").count().collect()
spark.stop()
"""


@pytest.fixture(scope="session")
def subprocess_jvm_options() -> str:
    """JVM options for tests that start their own Spark (CLI, kill -9, cluster): C1 JIT plus a class-data
    sharing archive dumped once by a warm-up run, which halves each JVM's start (measured 16.7 s -> 8 s).

    The archive is kept in ~/.cache/bcemb/jvm under a name drawn from the java, pyspark and Delta versions, and
    made under a file lock: the two pytest workers (and later runs on the same machine) share one warm-up."""
    import fcntl
    import hashlib
    import subprocess
    import sys

    from bclib.spark import delta_version, spark_version

    java = subprocess.run(["java", "-version"], capture_output=True, text=True).stderr
    key = hashlib.sha256(f"{java}|{spark_version()}|{delta_version()}|{JIT_FOR_TESTS}|{TEST_SQL_CONF}".encode()) \
        .hexdigest()[:16]
    root = Path(os.path.expanduser("~/.cache/bcemb/jvm"))
    root.mkdir(parents=True, exist_ok=True)
    archive = root / f"spark-classes-{key}.jsa"
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the other worker waits here while one dumps
        if not archive.exists():
            partial = root / f"spark-classes-{key}.{os.getpid()}.jsa"
            warm = root / f"warm-{os.getpid()}"
            dump = f"{JIT_FOR_TESTS} -XX:ArchiveClassesAtExit={partial}"
            out = subprocess.run([sys.executable, "-c", WARMUP, dump, str(warm)], cwd=REPO, capture_output=True,
                                 text=True, timeout=600)
            import shutil

            shutil.rmtree(warm, ignore_errors=True)
            if out.returncode == 0 and partial.exists():
                partial.rename(archive)  # whole or not at all
    if not archive.exists():
        return JIT_FOR_TESTS  # an archive is an optimisation only
    return f"{JIT_FOR_TESTS} -XX:SharedArchiveFile={archive}"


def small_config(tmp_path: Path, **sections):
    """A JobConfig for a small demo under tmp_path; keyword args override whole sections (dicts)."""
    from bclib.config import config_from_dict

    data = {
        "spark": {"master": "local[2]"},
        "embeddings": {"location": str(tmp_path / "emb" / "v{version}"), "versions": [0, 1, 2]},
        "registry_location": str(tmp_path / "registry"),
        "output_location": str(tmp_path / "out"),
        "metrics_location": str(tmp_path / "metrics"),
        # a quarter held out (the default is 5 %): enough evaluation entities for stable metrics at 1,500
        "fit": {"sample_size": 100_000, "min_pairs": 50, "holdout": 0.25},
        # the numpy references of the pipeline tests fit no intercept (bias: auto is tested on its own)
        "transform": {"bias": False},
        # the gate fails closed below this many held-out ids (default 200); some tests use 600 entities (~150)
        "gate": {"min_heldout_ids": 50},
        "evaluate": {"sample_size": 100_000, "label_location": str(tmp_path / "labels"),
                     "report_dir": str(tmp_path / "reports"), "neighbours_k": 5, "neighbours_sample": 200},
        "demo": {"n_entities": 1500, "dims": [12, 16, 20], "block_rows": 256, "n_clusters": 6, "latent_dim": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)


# sections that change neither what `generate` writes nor what `fit` fits: a world with only these is a copy
_COPYABLE_SECTIONS = {"evaluate", "gate", "backfill", "output_location", "metrics_location", "maintenance", "lease"}


def generated_and_fitted(spark, tmp_path: Path, **sections):
    """small_config(tmp_path, **sections) with its demo versions generated and its transforms fitted.

    The default demo and fit are the same bytes in every module: they are generated and fitted once per
    pytest worker (beside the module folders, `<basetemp>/_demo_world`) and copied; Delta tables hold
    relative file paths, so a copied folder is the same table at its new place. Other demo or fit settings
    generate and fit afresh."""
    import shutil

    from bclib.steps.fit import run_fit
    from bclib.steps.generate import run_generate

    cfg = small_config(tmp_path, **sections)
    if not set(sections) <= _COPYABLE_SECTIONS:
        run_generate(spark, cfg)
        run_fit(spark, cfg)
        return cfg
    world = tmp_path.parent / "_demo_world"
    if not (world / "done").exists():
        shutil.rmtree(world, ignore_errors=True)
        base = small_config(world)
        run_generate(spark, base)
        run_fit(spark, base)
        (world / "done").touch()
    for name in ("emb", "labels", "registry"):
        if (world / name).exists():
            shutil.copytree(world / name, tmp_path / name)
    return cfg


def assert_same_vectors(a, b, what: str = "vectors") -> None:
    """The promise between two computations of the same rows (engines, batch sizes, incremental vs full):
    equal shapes and, per vector, ||a - b|| <= VECTOR_RTOL * ||b|| (bclib.numerics.kernel). Not bitwise."""
    import numpy as np

    from bclib.numerics.kernel import VECTOR_RTOL

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} != {b.shape}"
    if a.size == 0:
        return
    rel = np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(b, axis=1), np.finfo(np.float32).tiny)
    worst = int(np.argmax(rel))
    assert rel[worst] <= VECTOR_RTOL, f"{what}: row {worst} differs by {rel[worst]:.3g} of its norm (> {VECTOR_RTOL})"


def reference_chain(chain, x):
    """An independent numpy reference for a chain of transforms (float64): each family's forward written out
    from its stored arrays, not the product's `apply` / `apply_chain`. Affine: x W + b; residual MLP:
    x W + b + relu(x W1 + b1) W2 + b2; local: softmax_i(-||x - c_i||^2 / T)-weighted sum of x W_i + b_i;
    then rows divided by their norm where the link's meta says output_norm 'unit'."""
    import numpy as np

    y = np.asarray(x, dtype=np.float64)
    for link in chain:
        a = {k: np.asarray(v, dtype=np.float64) for k, v in link.arrays().items()}
        if "centroids" in a:
            d2 = ((y[:, None, :] - a["centroids"][None, :, :]) ** 2).sum(axis=2)
            logits = -d2 / float(np.asarray(a["temperature"]).reshape(-1)[0])
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            y = np.einsum("nk,nkd->nd", p, np.einsum("ni,kid->nkd", y, a["weight"]) + a["bias"][None])
        elif "w1" in a:
            y = y @ a["weight"] + a["bias"] + np.maximum(y @ a["w1"] + a["b1"], 0) @ a["w2"] + a["b2"]
        else:
            y = y @ a["weight"] + (a["bias"] if "bias" in a else 0.0)
        if link.meta.get("output_norm") == "unit":
            y = y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)
    return y


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3-compatible server on 127.0.0.1 with a bucket `bcemb-lease`, stopped with the module; yields
    bcemb's storage options for it (object_store names: `storage.options`)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    import boto3

    endpoint = f"http://{host}:{port}"
    boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                 region_name="us-east-1").create_bucket(Bucket="bcemb-lease")
    yield {"aws_endpoint": endpoint, "aws_access_key_id": "test", "aws_secret_access_key": "test",
           "aws_region": "us-east-1", "aws_allow_http": "true"}
    server.stop()


S3A_JARS = Path(os.path.expanduser("~/.cache/bcemb/jars/s3a"))  # `make s3a-jars` (part of `make install`)


def s3a_jars_conf() -> dict:
    """Spark's S3A connector on the class path (bcemb adds Delta's jars to these). The endpoint, path-style
    addressing, plain HTTP and the keys come from `storage.options` alone (`bclib.storage.spark_hadoop_conf`)."""
    import shutil

    jars = sorted(str(j) for j in S3A_JARS.glob("*.jar"))
    if not any("hadoop-aws" in j for j in jars):
        if shutil.which("mvn") is None:
            pytest.skip("no S3A jars and no mvn to fetch them (`make s3a-jars`)")
        raise AssertionError(f"no S3A jars in {S3A_JARS}: run `make s3a-jars`")
    return {"spark.jars": ",".join(jars)}


def store_pipeline_report(tmp_path: Path, name: str, script: str, root: str, options: dict, jars: dict,
                          jvm_options: str, extra: dict | None = None) -> dict:
    """The object-store tests' daily life: a small demo config with every table under `root` (a bucket or
    container URI) and `storage.options` = `options`, written to tmp_path/<name>.yaml; `script` run on it in one
    subprocess (its own JVM with `jars`); the JSON of its last `REPORT ` line. `extra`: config sections added."""
    import json
    import subprocess
    import sys

    import yaml

    data = {
        "spark": {"master": "local[2]", "shuffle_partitions": 2,
                  "conf": {**jars, "spark.driver.extraJavaOptions": jvm_options}},
        "embeddings": {"location": f"{root}/emb/v{{version}}", "versions": [0, 1, 2]},
        "registry_location": f"{root}/registry", "output_location": f"{root}/out",
        "metrics_location": f"{root}/metrics",
        "fit": {"sample_size": 100_000, "min_pairs": 50, "holdout": 0.25}, "transform": {"bias": False},
        "gate": {"min_heldout_ids": 50},
        "evaluate": {"label_location": None, "report_dir": str(tmp_path / "reports"), "neighbours_k": 5,
                     "neighbours_sample": 200},
        "demo": {"n_entities": 1500, "dims": [12, 16, 20], "block_rows": 256, "n_clusters": 6, "latent_dim": 8},
        "storage": {"options": options},
        **(extra or {}),
    }
    conf = tmp_path / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(data))
    proc = subprocess.run([sys.executable, "-c", script, str(conf)], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("REPORT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    report = json.loads(lines[-1][len("REPORT "):])
    print(json.dumps(report, indent=1))
    return report


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, proc, timeout: float = 120) -> None:
    """Wait until something listens on 127.0.0.1:`port`; RuntimeError if `proc` exits first, TimeoutError."""
    import socket
    import time

    end = time.time() + timeout
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server process exited with {proc.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


# Azure and GCS emulators (`make emulators`: Azurite from npm, fake-gcs-server built with go install) and the
# connectors Spark needs for them (`make abfs-jars`, `make gcs-jars`); tests/test_azure_gcs.py
EMULATORS = Path(os.path.expanduser("~/.cache/bcemb"))
AZURITE = EMULATORS / "azurite" / "node_modules" / ".bin" / "azurite-blob"
FAKE_GCS = EMULATORS / "bin" / "fake-gcs-server"
ABFS_JARS = Path(os.path.expanduser("~/.cache/bcemb/jars/abfs"))
GCS_JARS = Path(os.path.expanduser("~/.cache/bcemb/jars/gcs"))


def _connector_jars_conf(folder: Path, jar: str, target: str) -> dict:
    """`spark.jars` with every jar of `folder` (a `make <target>` cache), which must hold `jar`."""
    import shutil

    jars = sorted(str(j) for j in folder.glob("*.jar"))
    if not any(jar in j for j in jars):
        if shutil.which("mvn") is None:
            pytest.skip(f"no {jar} jar and no mvn to fetch it (`make {target}`)")
        raise AssertionError(f"no {jar} jar in {folder}: run `make {target}`")
    return {"spark.jars": ",".join(jars)}


def abfs_jars_conf() -> dict:
    """Spark's ABFS driver (hadoop-azure 3.5.0 and what it needs) on the class path."""
    return _connector_jars_conf(ABFS_JARS, "hadoop-azure", "abfs-jars")


def gcs_jars_conf() -> dict:
    """Google's GCS connector (the shaded jar) on the class path, named for gs://, and the sizes Hadoop 3.5's
    core-default.xml gives with a unit ("64m": for Hadoop's own new hadoop-gcp module, whose classes,
    org.apache.hadoop.fs.gs.*, it names and pyspark does not ship) in bytes: the connector reads them as plain
    numbers (NumberFormatException: For input string: "64m")."""
    h = "spark.hadoop.fs.gs."
    return {**_connector_jars_conf(GCS_JARS, "gcs-connector", "gcs-jars"),
            h + "impl": "com.google.cloud.hadoop.fs.gcs.GoogleHadoopFileSystem",
            "spark.hadoop.fs.AbstractFileSystem.gs.impl": "com.google.cloud.hadoop.fs.gcs.GoogleHadoopFS",
            h + "block.size": str(64 << 20), h + "rewrite.max.chunk.size": str(512 << 20),
            h + "outputstream.buffer.size": str(8 << 20), h + "inputstream.inplace.seek.limit": str(8 << 20),
            h + "inputstream.min.range.request.size": str(2 << 20)}


def _start_server(argv: list, port: int, cwd: Path):
    """Start a server process on 127.0.0.1:`port` (stdout/stderr to server.log in `cwd`) and wait until it
    listens; the log's tail in the error when it does not."""
    import subprocess

    log = open(cwd / "server.log", "wb")
    proc = subprocess.Popen(argv, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        wait_port(port, proc, timeout=60)
    except Exception as e:
        _stop_server(proc)
        raise AssertionError(f"{argv[0]} did not start: {e}\n{(cwd / 'server.log').read_text()[-2000:]}") from e
    return proc


def _stop_server(proc) -> None:
    """Stop a server started by `_start_server` by its pid: SIGTERM, SIGKILL after 10 s."""
    import subprocess

    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def azurite_server(tmp_path_factory):
    """Azurite's Blob service (in memory, telemetry off) on 127.0.0.1 with a container `bcemb`, stopped with the
    module; yields bcemb's storage options for it: Azurite's published development account and key, its
    endpoint (the account in the path, as Azurite addresses it) and plain http."""
    if not AZURITE.exists():
        pytest.skip(f"Azurite is not installed ({AZURITE}): `make emulators` installs it with npm")
    from bclib.storage import AZURITE_ACCOUNT, AZURITE_ACCOUNT_KEY, pyarrow_azure_options

    port = free_port()
    proc = _start_server([str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(port), "--inMemoryPersistence",
                          "--disableTelemetry", "--skipApiVersionCheck", "--silent"], port,
                         tmp_path_factory.mktemp("azurite"))
    options = {"azure_storage_account_name": AZURITE_ACCOUNT, "azure_storage_account_key": AZURITE_ACCOUNT_KEY,
               "azure_storage_endpoint": f"http://127.0.0.1:{port}/{AZURITE_ACCOUNT}", "azure_allow_http": "true"}
    try:
        import pyarrow.fs as pafs

        pafs.AzureFileSystem(**pyarrow_azure_options(options)).create_dir("bcemb")  # a container
        yield options
    finally:
        _stop_server(proc)


@pytest.fixture(scope="module")
def fake_gcs_server(tmp_path_factory):
    """fake-gcs-server (in memory, plain http) on 127.0.0.1 with a bucket `bcemb`, stopped with the module; yields
    bcemb's storage options for it: a service-account key with object_store's emulator fields (`gcs_base_url`,
    `disable_oauth`) and plain http."""
    if not FAKE_GCS.exists():
        pytest.skip(f"fake-gcs-server is not installed ({FAKE_GCS}): `make emulators` builds it with go install")
    import json
    import urllib.request

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = _start_server([str(FAKE_GCS), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port), "-backend",
                          "memory", "-public-host", f"127.0.0.1:{port}", "-external-url", base, "-log-level", "warn"],
                         port, tmp_path_factory.mktemp("fake-gcs"))
    try:
        urllib.request.urlopen(urllib.request.Request(
            f"{base}/storage/v1/b?project=bcemb", data=json.dumps({"name": "bcemb"}).encode(),
            headers={"Content-Type": "application/json"}, method="POST"), timeout=30).read()
        key = {"gcs_base_url": base, "disable_oauth": True, "client_email": "", "private_key": "",
               "private_key_id": ""}
        yield {"google_service_account_key": json.dumps(key), "google_allow_http": "true"}
    finally:
        _stop_server(proc)
