"""The executor function alone (numpy + pyarrow, no Spark), over Arrow batch sizes, against a numpy reference."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from bclib.errors import InvalidVectorError
from bclib.numerics.arrow import matrix_to_list
from bclib.numerics.kernel import MultiSpaceKernel, arrow_batch_rows, make_batch_fn
from bclib.numerics.transforms import AffineTransform, ResidualMLPTransform
from conftest import reference_chain

N_ROWS = 1000


def _chains(nonlinear: bool):
    rng = np.random.default_rng(0)
    b3 = AffineTransform(rng.normal(size=(16, 12)) / 4, rng.normal(size=12))
    if nonlinear:
        b2 = ResidualMLPTransform(rng.normal(size=(12, 10)) / 3, rng.normal(size=10), rng.normal(size=(12, 5)),
                                  rng.normal(size=5), rng.normal(size=(5, 10)) * 0.1, rng.normal(size=10))
    else:
        b2 = AffineTransform(rng.normal(size=(12, 10)) / 3)
    b1 = AffineTransform(rng.normal(size=(10, 8)) / 3, rng.normal(size=8))
    return {2: [b3], 1: [b3, b2], 0: [b3, b2, b1]}


def _table(ids_type: str):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(N_ROWS, 16)).astype(np.float32)
    ids = np.arange(N_ROWS, dtype=np.int64) * 7 + 3
    id_array = pa.array(ids) if ids_type == "long" else pa.array([f"e-{i}" for i in ids])
    return pa.Table.from_arrays([id_array, matrix_to_list(x)], names=["id", "vector"]), x


@pytest.mark.parametrize("batch_rows", [1, 7, 100, 10_000])
@pytest.mark.parametrize("nonlinear", [False, True])
@pytest.mark.parametrize("ids_type", ["long", "string"])
def test_every_batch_size_gives_the_numpy_reference(batch_rows, nonlinear, ids_type):
    chains = _chains(nonlinear)
    kernel = MultiSpaceKernel(16, chains)
    assert kernel.fused is not nonlinear
    table, x = _table(ids_type)
    batches = table.to_batches(max_chunksize=batch_rows)
    assert len(batches) == -(-N_ROWS // batch_rows)
    out = pa.Table.from_batches(list(make_batch_fn(kernel)(iter(batches))))
    assert out.num_rows == 3 * N_ROWS
    for space, chain in chains.items():
        part = out.filter(pa.compute.equal(out["space_version"], space))
        assert part["id"].to_pylist() == table["id"].to_pylist()  # every row once, in order
        got = np.array(part["vector"].to_pylist(), dtype=np.float64)
        expected = reference_chain(chain, x)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
        offsets = np.asarray(part["vector"].combine_chunks().offsets)
        assert (np.diff(offsets) == expected.shape[1]).all()


def test_empty_batches_are_skipped_and_bad_rows_name_their_id():
    kernel = MultiSpaceKernel(16, _chains(False))
    empty = pa.RecordBatch.from_arrays([pa.array([], pa.int64()), pa.array([], pa.list_(pa.float32()))],
                                       names=["id", "vector"])
    assert list(make_batch_fn(kernel)(iter([empty]))) == []
    bad = pa.RecordBatch.from_arrays(
        [pa.array([5, 6]), pa.array([[0.0] * 16, [float("nan")] + [0.0] * 15], pa.list_(pa.float32()))],
        names=["id", "vector"])
    with pytest.raises(InvalidVectorError, match=r"column 'vector': id=6 holds NaN or Inf"):
        list(make_batch_fn(kernel)(iter([bad])))


def test_arrow_batch_rows_targets_the_byte_budget():
    # 4 bytes per float: (256 in + 4 x 128 out) floats, plus 16 bytes of ids/offsets per column
    rows = arrow_batch_rows(256, [128] * 4, target_mb=16)
    per_row = 4 * (256 + 512) + 16 * 5
    assert rows == 16 * 2**20 // per_row
    assert arrow_batch_rows(4, [4], 1024) == 200_000 and arrow_batch_rows(100_000, [100_000], 1) == 1024
