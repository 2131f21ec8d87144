"""Vectors stored as binary float32 bytes or JSON text (issue: "vectors in another type").

Refused by default with VectorTypeError naming the found type and the conversion; read losslessly with
`embeddings.vector_encoding: float32_le | json` on both engines, giving the output the array<float> source gives.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from bclib.errors import VectorTypeError
from bclib.numerics.arrow import decode_vectors
from conftest import assert_same_vectors, generated_and_fitted


def test_decode_vectors_is_lossless_for_float32_bytes_and_nulls_what_it_cannot_read():
    v = np.random.default_rng(1).normal(size=(6, 5)).astype(np.float32)
    raw = pa.array([r.astype("<f4").tobytes() for r in v], pa.binary())
    for arr in (raw, raw.slice(2)):  # the fast path on a sliced array too
        out = decode_vectors(arr, "float32_le")
        np.testing.assert_array_equal(np.array(out.to_pylist(), np.float32), v[len(v) - len(arr):])
    bad = decode_vectors(pa.array([v[0].tobytes(), b"\x00" * 7, None], pa.binary()), "float32_le")
    assert bad.to_pylist()[1:] == [None, None] and bad.to_pylist()[0] == v[0].tolist()
    text = pa.array(["[1, 2.5, -3e-2]", "[1, null]", "not json", '{"a": 1}', "[true]", None])
    assert decode_vectors(text, "json").to_pylist() == [[1.0, 2.5, np.float32(-3e-2).item()], None, None, None,
                                                        None, None]
    with pytest.raises(ValueError, match="needs a binary column"):
        decode_vectors(text, "float32_le")


@pytest.fixture(scope="module")
def encoded(spark, tmp_path_factory):
    """The demo's versions fitted once as array<float>; copies of every version with the vector as little-endian
    float32 bytes and as JSON text; the array source's output on the arrow engine as the reference."""
    from bclib.steps.backfill import run_backfill
    from bclib.tables.delta import read_delta

    tmp = tmp_path_factory.mktemp("encoded")
    cfg = generated_and_fitted(spark, tmp, evaluate={"label_location": None})
    run_backfill(spark, dataclasses.replace(cfg, backfill=dataclasses.replace(cfg.backfill, engine="arrow")))
    reference = {r.id: np.array(r.vector, np.float32)
                 for r in read_delta(spark, cfg.output_location).where("space_version = 0").collect()}

    spark.udf.register("bc_test_f32le", lambda v: None if v is None else np.asarray(v, dtype="<f4").tobytes(),
                       "binary")
    for v in cfg.embeddings.versions:
        df = read_delta(spark, cfg.version_location(v))
        df.selectExpr("id", "bc_test_f32le(vector) AS vector").write.format("delta").save(str(tmp / "bin" / f"v{v}"))
        df.selectExpr("id", "to_json(vector) AS vector").write.format("delta").save(str(tmp / "json" / f"v{v}"))
    return cfg, tmp, reference


def _config(cfg, tmp, encoding: str, folder: str, engine: str):
    emb = dataclasses.replace(cfg.embeddings, location=str(tmp / folder / "v{version}"), vector_encoding=encoding)
    return dataclasses.replace(cfg, embeddings=emb, output_location=str(tmp / f"out_{folder}_{encoding}_{engine}"),
                               backfill=dataclasses.replace(cfg.backfill, engine=engine))


@pytest.mark.parametrize("folder, hint", [("bin", "vector_encoding: float32_le"), ("json", "vector_encoding: json")])
def test_an_encoded_vector_column_is_refused_by_type_with_the_conversion(spark, encoded, folder, hint):
    from bclib.steps.backfill import run_backfill
    from bclib.tables.delta import table_exists

    cfg, tmp, _ = encoded
    plain = _config(cfg, tmp, "array", folder, "auto")
    with pytest.raises(VectorTypeError, match=f"found {'binary' if folder == 'bin' else 'string'}.*{hint}"):
        run_backfill(spark, plain)
    assert not table_exists(spark, plain.output_location)


@pytest.mark.parametrize("engine", ["spark", "arrow"])
@pytest.mark.parametrize("folder, encoding", [("bin", "float32_le"), ("json", "json")])
def test_an_encoded_source_backfills_as_its_array_twin_on_both_engines(spark, encoded, folder, encoding, engine):
    from bclib.steps.backfill import run_backfill
    from bclib.tables.delta import read_delta

    cfg, tmp, reference = encoded
    enc = _config(cfg, tmp, encoding, folder, engine)
    result = run_backfill(spark, enc)
    assert result.engine == engine
    got = {r.id: np.array(r.vector, np.float32)
           for r in read_delta(spark, enc.output_location).where("space_version = 0").collect()}
    assert sorted(got) == sorted(reference)
    ids = sorted(reference)
    assert_same_vectors([got[i] for i in ids], [reference[i] for i in ids], f"{encoding} source, {engine} engine")
