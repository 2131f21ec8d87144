"""Transforms for online consumers: `bcemb export` writes the active chain as one no-pickle file and
`bclib.serving.load_chain` applies it with numpy, as the backfill's kernel does (issue 26, part 5)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from bclib.errors import ChecksumError, DimensionMismatchError, TransformFormatError
from bclib.numerics.kernel import VECTOR_RTOL, MultiSpaceKernel
from bclib.numerics.records import TransformRecord, chain_id
from bclib.numerics.transforms import AffineTransform, LocalAffineTransform, ResidualMLPTransform
from bclib.serving import ChainMismatchError, chain_to_bytes, load_chain
from conftest import REPO, assert_same_vectors

DIMS = (12, 10, 8)  # version 2 -> 1 -> 0


def _family(kind: str, d_in: int, d_out: int, rng, unit: bool = False):
    meta = {"output_norm": "unit"} if unit else {}
    w, b = rng.normal(size=(d_in, d_out)) / np.sqrt(d_in), rng.normal(size=d_out) * 0.1
    if kind in ("linear", "orthogonal", "lowrank"):
        return AffineTransform(w, b, kind, meta)
    if kind == "mlp":
        h = 6
        return ResidualMLPTransform(w, b, rng.normal(size=(d_in, h)), rng.normal(size=h),
                                    rng.normal(size=(h, d_out)) * 0.1, rng.normal(size=d_out) * 0.1, meta=meta)
    k = 3
    return LocalAffineTransform(rng.normal(size=(k, d_in)), 2.0, rng.normal(size=(k, d_in, d_out)) / np.sqrt(d_in),
                                rng.normal(size=(k, d_out)) * 0.1, meta=meta)


def _records(kinds, seed=0, unit=False):
    rng = np.random.default_rng(seed)
    return [TransformRecord(f"t{i}{kind}", 2 - i, 1 - i, kind, "single_step",
                            _family(kind, DIMS[i], DIMS[i + 1], rng, unit and i == len(kinds) - 1))
            for i, kind in enumerate(kinds)]


def _file(records, target=0) -> bytes:
    return chain_to_bytes(2, target, [r.transform_id for r in records], [r.edge for r in records],
                          [r.parameters for r in records], chain_id(records))


@pytest.mark.parametrize("kinds, unit", [(("linear", "linear"), False), (("orthogonal", "lowrank"), True),
                                         (("mlp", "linear"), False), (("linear", "local"), True)])
def test_a_loaded_chain_maps_as_the_backfill_kernel_for_every_family_and_batch(kinds, unit):
    records = _records(kinds, unit=unit)
    chain = load_chain(_file(records), source=2, target=0)
    assert (chain.source, chain.target, chain.dim_in, chain.dim_out) == (2, 0, 12, 8)
    assert chain.transform_ids == tuple(r.transform_id for r in records) and chain.chain_id == chain_id(records)
    alone = MultiSpaceKernel(12, {0: [r.transform for r in records]})  # a backfill of this space alone
    kernel = MultiSpaceKernel(12, {0: [r.transform for r in records], 1: [records[0].transform]})
    x = np.random.default_rng(5).normal(size=(100_000, 12)).astype(np.float32)
    batch = x[:1000]
    # the backfill's batch: bitwise where its kernel maps this space alone; where it maps several, linear chains
    # fuse into one wider GEMM, which BLAS may block differently (it does on AMD EPYC): within the promise there
    assert chain.transform(batch).tobytes() == alone(batch)[0].tobytes()
    assert_same_vectors(chain.transform(batch), kernel(batch)[0], "the backfill's batch, two spaces")
    whole = kernel(x)[0]
    # other batches: within the float32 rounding promise; a local (gated) transform weighs its pieces by a
    # softmax whose float32 rounding moves with the batch too (1.7e-6 of the norm seen at batches of 7)
    rtol = 4 * VECTOR_RTOL if "local" in kinds else VECTOR_RTOL
    for n in (1, 2, 7, 1000, 100_000):
        got = np.concatenate([chain.transform(x[i:i + n]) for i in range(0, min(len(x), 3 * n), n)])
        assert got.dtype == np.float32 and got.shape == (min(len(x), 3 * n), 8)
        rel = np.linalg.norm(got - whole[:len(got)], axis=1) / np.linalg.norm(whole[:len(got)], axis=1)
        assert rel.max() <= rtol, f"batches of {n}: row {int(rel.argmax())} differs by {rel.max():.3g} (> {rtol})"
    assert VECTOR_RTOL == 1e-6
    assert chain.transform(x[0]).shape == (1, 8)  # one vector, as a service has it


def test_a_tampered_file_a_wrong_dimension_and_wrong_spaces_are_named():
    records = _records(("linear", "mlp"))
    data = bytearray(_file(records))
    at = data.find(b"w1.npy")  # a byte inside the second transform's parameters
    assert at > 0
    tampered = bytes(data[:at + 200]) + bytes([data[at + 200] ^ 0xFF]) + bytes(data[at + 201:])
    with pytest.raises((ChecksumError, TransformFormatError)):
        load_chain(tampered)
    with pytest.raises(TransformFormatError, match="not a bcemb chain file"):
        load_chain(b"PK\x03\x04 not a zip at all")
    chain = load_chain(bytes(data))
    with pytest.raises(DimensionMismatchError, match=r"dimension 12 \(shape \(n, 12\)\), found shape \(3, 10\)"):
        chain.transform(np.zeros((3, 10), np.float32))
    with pytest.raises(ChainMismatchError, match="target space 0, expected 1"):
        load_chain(bytes(data), source=2, target=1)
    with pytest.raises(ChainMismatchError, match="transforms"):
        chain.expect(transform_ids=["someone-else"])
    assert chain.expect(source=2, target=0) is chain


def _with_meta(data: bytes, edit) -> bytes:
    """The chain file `data` with its `__meta__` JSON changed by `edit(meta) -> meta` (transforms untouched)."""
    import io
    import json
    import zipfile

    src = zipfile.ZipFile(io.BytesIO(data))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in src.namelist():
            blob = src.read(name)
            if name == "__meta__.npy":
                meta = json.loads(np.load(io.BytesIO(blob), allow_pickle=False).tobytes().decode())
                item = io.BytesIO()
                np.lib.format.write_array(item, np.frombuffer(json.dumps(edit(meta)).encode(), np.uint8),
                                          allow_pickle=False)
                blob = item.getvalue()
            zf.writestr(name, blob)
    return out.getvalue()


def test_altered_or_malformed_metadata_is_a_format_error_and_spaces_are_numbers():
    """Metadata edited to claim other spaces, another chain id or another transform id, or of the wrong shape,
    fails as TransformFormatError (found by a new user's trial: it loaded as 2 -> 1 and passed `expect`)."""
    data = _file(_records(("linear", "linear")))

    def field_set(key, value):
        return lambda m: {**m, key: value}

    def first_id(m):
        m["transforms"][0]["id"] = "t-other"
        return m

    for edit, why in ((field_set("target", 1), "edges"), (field_set("source", 3), "edges"),
                      (field_set("chain_id", "0" * 16), "chain id"), (first_id, "chain id")):
        with pytest.raises(TransformFormatError, match=why):
            load_chain(_with_meta(data, edit))
    for edit in (lambda m: [m], lambda m: {k: v for k, v in m.items() if k != "source"}):
        with pytest.raises(TransformFormatError, match="metadata"):
            load_chain(_with_meta(data, edit))
    with pytest.raises(ChecksumError):  # entries without their checksums
        load_chain(_with_meta(data, lambda m: {**m, "transforms": [{"id": "x"}, {"id": "y"}]}))
    chain = load_chain(data)
    assert chain.expect(source="2", target=0) is chain  # a digit string is the version it names
    with pytest.raises(ChainMismatchError, match="source space 2, expected 4"):
        chain.expect(source="4")
    with pytest.raises(TypeError, match="source must be a version number"):
        chain.expect(source="two")
    assert "weight" not in repr(chain) and len(repr(chain)) < 300  # a notebook shows ids, not every weight


def test_export_refuses_an_output_that_is_no_file_name_before_spark_starts(tmp_path, capsys):
    from bclib.cli import main
    from bclib.errors import ConfigError
    from bclib.steps.registry_cmd import export_path

    (tmp_path / "adir").mkdir()
    for bad in (str(tmp_path / "adir"), ".", str(tmp_path / "new") + "/", ""):
        with pytest.raises(ConfigError, match="directory or has no file name"):
            export_path(bad)
    assert export_path(str(tmp_path / "sub" / "c.bcemb")).name == "c.bcemb"
    assert main(["export", "--space", "0", "--output", str(tmp_path / "adir"), "--config",
                 str(REPO / "conf" / "local.yaml")]) == 2
    assert "ConfigError: --output" in capsys.readouterr().err
    assert list((tmp_path / "adir").iterdir()) == []  # no .partial left behind


def test_load_chain_runs_where_pyspark_and_pyarrow_cannot_be_imported(tmp_path):
    path = tmp_path / "chain.bcemb"
    records = _records(("linear", "local"))
    path.write_bytes(_file(records))
    want = MultiSpaceKernel(12, {0: [r.transform for r in records]})(np.ones((4, 12), np.float32))[0]
    code = ("import sys; sys.modules['pyspark'] = None; sys.modules['pyarrow'] = None; sys.modules['torch'] = None\n"
            "import numpy as np; from bclib.serving import load_chain\n"
            f"c = load_chain({str(path)!r}, source=2, target=0)\n"
            "sys.stdout.write(c.transform(np.ones((4, 12), np.float32)).tobytes().hex())")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert bytes.fromhex(out.stdout) == want.tobytes()


@pytest.fixture(scope="module")
def published(spark, tmp_path_factory):
    from bclib.steps.backfill import run_backfill
    from conftest import generated_and_fitted

    tmp = tmp_path_factory.mktemp("serving")
    cfg = generated_and_fitted(spark, tmp, evaluate={"label_location": None})
    run_backfill(spark, cfg)
    return tmp, cfg


def _output_and_source(spark, cfg, space: int):
    from bclib.tables.delta import read_delta

    out = {r.id: (r.vector, r.chain_id) for r in read_delta(spark, cfg.output_location)
           .where(f"space_version = {space}").collect()}
    src = sorted((r.id, r.vector) for r in read_delta(spark, cfg.version_location(2)).collect())
    return out, src


def test_bcemb_export_gives_what_the_backfill_wrote(spark, published, capsys):
    import dataclasses

    import yaml

    from bclib.cli import main

    tmp, cfg = published
    conf = tmp / "job.yaml"
    conf.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    capsys.readouterr()
    assert main(["export", "--config", str(conf), "--space", "0", "--output", str(tmp / "c.bcemb"),
                 "--log-level", "ERROR"]) == 0
    assert "export: chain 2 -> 0" in capsys.readouterr().out
    chain = load_chain(tmp / "c.bcemb", source=2, target=0)
    out, src = _output_and_source(spark, cfg, 0)
    assert {c for _, c in out.values()} == {chain.chain_id}
    x = np.array([v for _, v in src], np.float32)
    assert_same_vectors(chain.transform(x), np.array([out[i][0] for i, _ in src], np.float32), "export vs output")


def test_the_sql_function_maps_like_the_output_table(spark, published):
    from bclib.serving import register_sql_function

    tmp, cfg = published
    assert register_sql_function(spark, cfg) == [(1, 0), (2, 0), (2, 1)]
    out, src = _output_and_source(spark, cfg, 1)
    rows = spark.sql(f"SELECT id, bc_to_space(vector, 2, 1) AS mapped FROM delta.`{cfg.version_location(2)}`"
                     ).collect()
    got = dict((r.id, r.mapped) for r in rows)
    ids = [i for i, _ in src]
    assert_same_vectors(np.array([got[i] for i in ids], np.float32), np.array([out[i][0] for i in ids], np.float32),
                        "SQL function vs output")
    nulls = spark.sql("SELECT bc_to_space(CAST(NULL AS array<float>), 2, 1) AS m").first().m
    assert nulls is None
    no_space = spark.sql("SELECT bc_to_space(array(CAST(1 AS float)), CAST(NULL AS int), 1) AS m").first().m
    assert no_space is None  # a null version or space gives null, as a null vector does
    with pytest.raises(Exception, match="DimensionMismatchError.*found dimension"):  # mixed lengths in one batch
        spark.sql(f"SELECT bc_to_space(IF(id % 2 = 0, vector, slice(vector, 1, 3)), 2, 1) FROM "
                  f"delta.`{cfg.version_location(2)}`").collect()
    with pytest.raises(Exception, match="no active chain from version 0 to space 2"):
        spark.sql(f"SELECT bc_to_space(vector, 0, 2) FROM delta.`{cfg.version_location(2)}`").collect()
