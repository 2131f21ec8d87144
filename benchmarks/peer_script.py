"""What a user would write instead of bcemb's backfill, on one machine: the peer of benchmarks/backfill_throughput.py.

    python benchmarks/peer_script.py SOURCE OUTPUT WEIGHTS.npz

One process, no Spark: delta-rs reads the source Delta table (id, vector) as a stream of Arrow batches, each
64k-row batch is mapped into every space by one float32 numpy GEMM per space (`out = x @ M_j`, the space's
composed linear chain, from WEIGHTS.npz arrays `space_<j>`), and `deltalake.write_deltalake` overwrites the
output table (id, vector, space_version; partitioned by space_version) in one commit. Threads are the
libraries' own (delta-rs's reader and writer, the BLAS). No checks, no lineage, no lease, no gate: the floor
an engine on one machine is held against. Prints one JSON line: rows read, rows written, seconds from the first
read to the commit (the interpreter's start and imports not counted, as a Spark session's start is not counted
for bcemb).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

BATCH_ROWS = 65_536


def _matrix(vectors: pa.Array, dim: int) -> np.ndarray:
    """(rows, dim) float32 view of a list<float> column (every row `dim` long, no nulls: the demo source)."""
    flat = vectors.flatten().to_numpy(zero_copy_only=False)
    return flat.astype(np.float32, copy=False).reshape(-1, dim)


def _list(matrix: np.ndarray) -> pa.Array:
    rows, dim = matrix.shape
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1)))


def main(source: str, output: str, weights_path: str) -> dict:
    weights = np.load(weights_path)
    spaces = {int(name.split("_", 1)[1]): weights[name].astype(np.float32) for name in weights.files}
    started = time.perf_counter()
    dataset = DeltaTable(source).to_pyarrow_dataset()
    schema = pa.schema([("id", pa.int64()), ("vector", pa.list_(pa.float32())), ("space_version", pa.int32())])
    counts = {"read": 0, "written": 0}

    def batches():
        for batch in dataset.to_batches(columns=["id", "vector"], batch_size=BATCH_ROWS):
            if not batch.num_rows:
                continue
            counts["read"] += batch.num_rows
            ids = batch.column(0)
            x = _matrix(batch.column(1), next(iter(spaces.values())).shape[0])
            for j, m in sorted(spaces.items()):
                y = x @ m
                counts["written"] += len(y)
                yield pa.RecordBatch.from_arrays(
                    [ids, _list(y), pa.array(np.full(len(y), j, dtype=np.int32))], schema=schema)

    write_deltalake(output, pa.RecordBatchReader.from_batches(schema, batches()), mode="overwrite",
                    partition_by=["space_version"])
    return {"rows_read": counts["read"], "rows_written": counts["written"],
            "seconds": time.perf_counter() - started}


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
