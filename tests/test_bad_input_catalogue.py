"""The catalogue of bad inputs in docs/errors.md, each through the CLI: exit code, error class, message, no table moved.

One small warehouse (two versions, fitted and backfilled) is built once; each case works on its own copy
(Delta tables are directories with relative paths: a copy is a table), breaks one thing, snapshots every
table's Delta version, runs one `bcemb` step in-process (`bclib.cli.main`, the session fixture's JVM) and
checks that exactly one `bcemb <step>: <ErrorClass>: ...` line names what is wrong and that every table is
still at the version it had.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pytest

from bclib.cli import main

N, DIMS = 400, (6, 8)
TABLES = ("emb/v0", "emb/v1", "registry", "out", "metrics", "quarantine")


def _vectors(seed=0):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(N, DIMS[1])).astype(np.float32)
    z0 = (z1 @ rng.normal(size=(DIMS[1], DIMS[0]))).astype(np.float32)
    return z0, z1


def _write(spark, path: Path, rows, schema="id long, vector array<float>", cdf=False):
    w = spark.createDataFrame(rows, schema).coalesce(1).write.format("delta").mode("overwrite")
    if cdf:
        w = w.option("delta.enableChangeDataFeed", "true")
    w.option("overwriteSchema", "true").save(str(path))


def _config_text(root: Path) -> str:
    return (f"spark: {{master: 'local[2]'}}\n"
            f"embeddings: {{location: '{root}/emb/v{{version}}', versions: [0, 1]}}\n"
            f"registry_location: '{root}/registry'\n"
            f"output_location: '{root}/out'\n"
            f"metrics_location: '{root}/metrics'\n"
            f"fit: {{min_pairs: 50, holdout: 0.25}}\n"
            f"gate: {{enabled: false}}\n"
            f"evaluate: {{label_location: null, report_dir: '{root}/reports', neighbours_k: 5}}\n")


@pytest.fixture(scope="module")
def base(spark, tmp_path_factory):
    root = tmp_path_factory.mktemp("catalogue")
    z0, z1 = _vectors()
    for v, z in ((0, z0), (1, z1)):
        _write(spark, root / "emb" / f"v{v}", [(i, z[i].tolist()) for i in range(N)])
    (root / "job.yaml").write_text(_config_text(root))
    assert main(["fit", "--config", str(root / "job.yaml"), "--log-level", "WARNING"]) == 0
    assert main(["backfill", "--config", str(root / "job.yaml"), "--log-level", "WARNING"]) == 0
    return root


def _v1_rows(change: Callable[[int, list], Optional[tuple]]):
    """Version 1's rows with `change(id, vector)` applied (None drops the row)."""
    _, z1 = _vectors()
    rows = [change(i, z1[i].tolist()) for i in range(N)]
    return [r for r in rows if r is not None]


@dataclass
class Case:
    name: str
    argv: list  # after the step: extra args
    step: str
    code: int
    error: str
    message: tuple  # fragments the one line must contain
    prepare: Optional[Callable] = None  # (spark, root) -> None: breaks one thing before the snapshot
    extra: list = field(default_factory=list)


def _v1(change, schema="id long, vector array<float>"):
    return lambda spark, root: _write(spark, root / "emb" / "v1", _v1_rows(change), schema)


def _dup(i, v):
    return (i if i not in (7, 8) else 5, v)


def _v1_extends_v0(spark, root):
    """Version 1 = version 0 plus two noise dimensions: the untransformed vector (truncated) is exact."""
    z0, _ = _vectors()
    noise = np.random.default_rng(1).normal(size=(N, 2)).astype(np.float32)
    _write(spark, root / "emb" / "v1", [(i, z0[i].tolist() + noise[i].tolist()) for i in range(N)])


def _tamper(spark, root):
    from delta.tables import DeltaTable
    from pyspark.sql import functions as F

    DeltaTable.forPath(spark, str(root / "registry")).update(
        F.lit(True), {"parameters": F.concat(F.col("parameters"), F.lit(b"\x00").cast("binary"))})


def _not_delta(spark, root):
    (root / "elsewhere").mkdir()
    (root / "elsewhere" / "notes.txt").write_text("not a table")


def _parquet_dataset(spark, root):
    spark.range(10).write.parquet(str(root / "elsewhere"))


def _other_schema_and_bad_rows(spark, root):
    """An output table of another schema, and bad rows in the source that quarantine would take."""
    spark.createDataFrame([("a", "b", 0)], "id string, vector string, space_version int").write.format("delta") \
        .mode("overwrite").save(str(root / "elsewhere"))
    _write(spark, root / "emb" / "v1", _v1_rows(lambda i, v: (i, v[:3]) if i < 10 else (i, v)))


def _vector_udt(spark, root):
    from pyspark.ml.linalg import Vectors

    _, z1 = _vectors()
    spark.createDataFrame([(i, Vectors.dense(z1[i].tolist())) for i in range(N)], ["id", "vector"]) \
        .write.format("delta").mode("overwrite").option("overwriteSchema", "true").save(str(root / "emb" / "v1"))


def _new_v1_commit(spark, root):
    """A change to version 1 in a table without the change data feed (after a backfill of this copy: the
    output's lineage names its source by location, so the copied output is first brought up to date)."""
    assert main(["backfill", "--config", str(root / "job.yaml"), "--log-level", "ERROR"]) == 0
    _write(spark, root / "emb" / "v1", _v1_rows(lambda i, v: (i, [x * 1.01 for x in v]) if i < 5 else (i, v)))


CASES = [
    Case("unknown config key", ["--set", "fit.bogus=1"], "fit", 2, "ConfigError", ("fit.bogus",)),
    Case("wrong type", ["--set", "fit.sample_size=lots"], "fit", 2, "ConfigError", ("fit.sample_size",)),
    Case("out of range", ["--set", "fit.holdout=0.9"], "fit", 2, "ConfigError", ("fit.holdout", "0.9")),
    Case("column name that is not an identifier", ["--set", "embeddings.id_column=id) OR (1=1"], "fit", 2,
         "ConfigError", ("embeddings.id_column",)),
    Case("missing table", ["--refit", "1:0", "--set", "embeddings.location=/nonexistent/bcemb/v{version}"], "fit", 1,
         "MissingTableError", ("/nonexistent/bcemb/v0",)),
    Case("missing vector column", ["--refit", "1:0", "--set", "embeddings.vector_column=embedding"], "fit", 1,
         "MissingColumnError", ("embedding", "'vector'")),
    Case("vector column of strings", ["--refit", "1:0"], "fit", 1, "VectorTypeError",
         ("vector", "found string", "vector_encoding: json"),
         _v1(lambda i, v: (i, ",".join(map(str, v))), "id long, vector string")),
    Case("duplicate ids at fit", ["--refit", "1:0"], "fit", 1, "DuplicateIdError", ("5",), _v1(_dup)),
    Case("duplicate ids at backfill", [], "backfill", 1, "DuplicateIdError", ("5 x3",), _v1(_dup)),
    Case("null ids", [], "backfill", 1, "NullIdError", ("null id",), _v1(lambda i, v: (None if i == 3 else i, v))),
    Case("wrong vector length", [], "backfill", 1, "InvalidVectorError", ("id=123", "3 elements", "8"),
         _v1(lambda i, v: (i, v[:3]) if i == 123 else (i, v))),
    Case("NaN element", [], "backfill", 1, "InvalidVectorError", ("id=42", "NaN"),
         _v1(lambda i, v: (i, v[:2] + [float("nan")] + v[3:]) if i == 42 else (i, v))),
    Case("null vector", [], "backfill", 1, "InvalidVectorError", ("id=9",),
         _v1(lambda i, v: (i, None) if i == 9 else (i, v))),
    Case("empty source", [], "backfill", 1, "EmptySourceError", ("version 1",), _v1(lambda i, v: None)),
    Case("a space would shrink by half", [], "backfill", 1, "ShrinkGuardError", ("space 0",),
         _v1(lambda i, v: (i, v) if i % 2 else None)),
    Case("too few shared pairs", ["--refit", "1:0", "--set", "fit.min_pairs=5000"], "fit", 1,
         "InsufficientDataError", ("1 -> 0", "5000")),
    Case("a fit worse than no transform (an explicit ridge that flattens the map)",
         ["--refit", "1:0", "--set", "transform.ridge=1000000"], "fit", 1, "FitRejectedError",
         ("1 -> 0", "not better than no transform"), _v1_extends_v0),
    Case("tampered registry", ["--set", "backfill.force=true"], "backfill", 1, "ChecksumError", ("checksum",),
         _tamper),
    Case("output location that is not Delta", ["--set", "output_location={root}/elsewhere"], "backfill", 1,
         "OutputLocationError", ("elsewhere",), _not_delta),
    Case("generate over tables it did not write", ["--set", "demo.dims=[6, 8]"], "generate", 1, "ForeignTableError", ("emb/v",)),
    Case("incremental required without a change feed", ["--set", "backfill.incremental=require"], "backfill", 1,
         "IncrementalUnavailableError", ("change data feed",), _new_v1_commit),
    Case("output location holding a Parquet dataset", ["--set", "output_location={root}/elsewhere"], "backfill", 1,
         "OutputLocationError", ("not a Delta table", "_SUCCESS"), _parquet_dataset),
    Case("output of another schema, with quarantine: the quarantine is not written either",
         ["--set", "output_location={root}/elsewhere", "--set", "backfill.quarantine_location={root}/quarantine"],
         "backfill", 1, "OutputLocationError", ("another schema", "vector: expected array<float>"),
         _other_schema_and_bad_rows),
    Case("source version with no older space", ["--set", "backfill.source_version=0"], "backfill", 2, "ConfigError",
         ("backfill.source_version",)),
    Case("versions out of order", ["--set", "embeddings.versions=[1, 0]"], "fit", 2, "ConfigError",
         ("embeddings.versions",)),
    Case("a column name spliced into generate's DDL", ["--set", "embeddings.id_column=id long, injected"],
         "generate", 2, "ConfigError", ("embeddings.id_column",)),
    Case("VectorUDT column", ["--refit", "1:0"], "fit", 1, "VectorTypeError", ("Spark ML vector", "vector_to_array"),
         _vector_udt),
    Case("no active transform", ["--set", "registry_location={root}/empty_registry"], "backfill", 1, "RegistryError",
         ("1 -> 0", "bcemb fit")),
    Case("missing label table at evaluate", ["--set", "evaluate.label_location={root}/no_labels"], "evaluate", 1,
         "MissingTableError", ("label table not found", "evaluate.label_location: null")),
    Case("arrow engine where it cannot run", ["--set", "backfill.engine=arrow", "--set", "backfill.force=true",
                                              "--set", "backfill.output_partitions=3"], "backfill", 1,
         "EngineUnavailableError", ("output_partitions",)),
    Case("decimal(20,0) ids (a JDBC import)", [], "backfill", 1, "IdTypeError",
         ("version 1", "decimal(20,0)", "CAST(id AS BIGINT)", "CAST(id AS STRING)"),
         _v1(lambda i, v: (Decimal(i), v), "id decimal(20,0), vector array<float>")),
    Case("string ids in one version, numbers in the other", ["--refit", "1:0"], "fit", 1, "IdTypeError",
         ("numeric ids in version 0", "string ids in version 1"),
         _v1(lambda i, v: (str(i), v), "id string, vector array<float>")),
]


def _versions(spark, root: Path) -> dict:
    """Every table's latest Delta version (None: no table): the newest commit file `_delta_log/<version>.json`
    (these local tables keep every commit file: no coordinated commits, log retention 30 days). A directory
    listing, where Spark's history takes 0.2 s and more on a busy session (12 reads a case, 57 cases), and
    delta-rs cannot open a table with a UDT column (a case below writes one)."""
    out = {}
    for t in TABLES:
        commits = [int(p.name[:-5]) for p in (root / t / "_delta_log").glob("*.json") if p.name[:-5].isdigit()]
        out[t] = max(commits) if commits else None
    return out


def _check_case(spark, base, tmp_path, capsys, case, extra: tuple = ()) -> None:
    """Run the case's step through the CLI on a copy of the base world (plus `extra` arguments): the case's exit
    code, one `bcemb <step>: <Error>: ...` line holding its fragments, and no table moved."""
    root = tmp_path / "w"
    shutil.copytree(base, root)
    (root / "job.yaml").write_text(_config_text(root))
    if case.prepare:
        case.prepare(spark, root)
    before = _versions(spark, root)
    argv = [case.step, "--config", str(root / "job.yaml"), "--log-level", os.environ.get("BCEMB_TEST_LOG", "ERROR")]
    argv += [a.replace("{root}", str(root)) for a in case.argv] + list(extra)
    capsys.readouterr()
    code = main(argv)
    captured = capsys.readouterr()
    lines = [x for x in captured.err.splitlines() if x.startswith("bcemb ")]
    assert code == case.code, (extra, code, lines, captured.out)
    assert len(lines) == 1 and lines[0].startswith(f"bcemb {case.step}: {case.error}: "), (extra, lines)
    for fragment in case.message:
        assert fragment in lines[0], (extra, fragment, lines[0])
    assert _versions(spark, root) == before


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_gets_a_named_error_and_moves_no_table(spark, base, tmp_path, capsys, case):
    _check_case(spark, base, tmp_path, capsys, case)


# backfill cases whose input reaches the engine (not refused by config, registry or location checks first);
# each must end in the same named error on both engines. Left out: "incremental required without a change
# feed" and "a space would shrink by half" (an incremental MERGE runs on Spark whatever the engine) and "arrow
# engine where it cannot run" (about the engine choice itself).
ENGINE_CASES = [c for c in CASES if c.step == "backfill" and c.name not in (
    "incremental required without a change feed", "a space would shrink by half", "arrow engine where it cannot run",
    "source version with no older space")]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["spark", "arrow"])
@pytest.mark.parametrize("case", ENGINE_CASES, ids=[c.name for c in ENGINE_CASES])
def test_each_engine_refuses_bad_backfill_input_by_the_same_name(spark, base, tmp_path, capsys, case, engine):
    """The catalogue's backfill inputs on each engine forced: the same exit code, error class and message
    fragments, and no table moved (the arrow path handles every input the spark path refuses by name)."""
    _check_case(spark, base, tmp_path, capsys, case, ("--set", f"backfill.engine={engine}"))


def test_a_quote_in_a_config_value_reaches_no_sql(spark, base, tmp_path, capsys):
    """A salt and an output path with quotes are values, not SQL: the run works and uses them verbatim."""
    root = tmp_path / "w"
    shutil.copytree(base, root)
    (root / "job.yaml").write_text(_config_text(root))
    odd = str(root / "it's \"out\"")
    argv = ["backfill", "--config", str(root / "job.yaml"), "--log-level", "ERROR",
            "--set", f"output_location={odd}"]
    assert main(["fit", "--config", str(root / "job.yaml"), "--refit", "1:0", "--set", "fit.salt=it's \"salty\""]) == 0
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    assert spark.read.format("delta").load(odd).where("space_version = 0").count() == N
