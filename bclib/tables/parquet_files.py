"""Parquet files of a Delta snapshot, read and written with pyarrow: the arrow engine's executor side.

No Spark here: the driver plans tasks (row-group ranges of the pinned snapshot's files, ~`target_bytes`
each) and Spark only schedules them; each task reads its row groups (the id, vector and, for a
one-table layout, version columns), validates and transforms them with the numpy kernel, and writes
one Parquet file per target space (and per ~`file_rows` rows) straight under the output table's
`space_version=<j>/` directory. It returns each file's Delta `add` metadata; the driver commits them
all at once (`bclib.tables.delta_rs`). File names carry a fresh uuid, so the files of a retried or
failed task are never referenced by a commit (VACUUM removes them).

Files are written the way Spark/Delta readers expect: snappy, the compliant `list<element>` layout,
`produced_at` as INT64 TIMESTAMP(MICROS, UTC), int32 version columns, stats (numRecords, min/max/null
count of `id` and `source_version`) in the add action.
"""

from __future__ import annotations

import json
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa
from pyarrow import fs as pafs

from bclib.numerics.arrow import decode_vectors, usable_rows
from bclib.numerics.kernel import MultiSpaceKernel, make_batch_fn
from bclib.errors import output_write_error
from bclib.tables.ids import normalise_ids
from bclib.storage import local_path, pyarrow_s3_options

PARTITION = "space_version"


def output_file_schema(id_type: pa.DataType) -> pa.Schema:
    """The columns of an output data file (the partition column lives in the path and the add action)."""
    return pa.schema([
        pa.field("id", id_type),
        pa.field("vector", pa.list_(pa.float32())),  # written as the compliant list<element> layout
        pa.field("source_version", pa.int32()),
        pa.field("chain_id", pa.string()),
        pa.field("produced_at", pa.timestamp("us", tz="UTC")),
    ])


def filesystem_and_path(uri: str, storage_options: Optional[dict] = None):
    """(pyarrow FileSystem, path inside it) for a local path or an object-store URI.

    Spark's `s3a://` is read as `s3://`. Credentials come from `storage_options` (passed to the
    filesystem, e.g. access_key/secret_key/region for S3) or the environment, as pyarrow documents.
    Azure (`abfs[s]://container@account.dfs.core.windows.net/...`, `wasb[s]://`, `az://`) and GCS (`gs://`) with
    storage options get an AzureFileSystem / GcsFileSystem built from them (`bclib.storage`); the path inside
    is `container/...` / `bucket/...`.
    """
    from bclib.storage import azure_location, pyarrow_azure_options, pyarrow_gcs_options

    path = local_path(uri)
    if path is not None:
        return pafs.LocalFileSystem(), path
    if uri.startswith("s3a://"):
        uri = "s3://" + uri[len("s3a://"):]
    if storage_options and uri.startswith("s3://"):
        bucket_path = uri[len("s3://"):]
        return pafs.S3FileSystem(**pyarrow_s3_options(storage_options)), bucket_path
    if storage_options and uri.startswith(("abfs://", "abfss://", "wasb://", "wasbs://", "az://", "azure://")):
        account, container_path = azure_location(uri)
        return pafs.AzureFileSystem(**pyarrow_azure_options(storage_options, account)), container_path
    if storage_options and uri.startswith(("gs://", "gcs://")):
        return pafs.GcsFileSystem(**pyarrow_gcs_options(storage_options)), uri.split("://", 1)[1]
    if uri.startswith("s3://") and "?" not in uri:  # credentials from the environment: one PUT per small file too
        return pafs.FileSystem.from_uri(uri + "?allow_delayed_open=true")
    return pafs.FileSystem.from_uri(uri)


@dataclass
class Task:
    """Row groups of one or more files, read by one Spark task."""

    parts: list[tuple[str, list[int]]] = field(default_factory=list)  # (file URI, row-group indices)
    rows: int = 0
    bytes: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str) -> "Task":
        d = json.loads(text)
        return Task([(p, list(rg)) for p, rg in d["parts"]], d["rows"], d["bytes"])


OPEN_COST_BYTES = 4 * 2**20  # what opening one file costs a task, in bytes read (Spark's spark.sql.files.openCostInBytes)


def plan_tasks(files: Sequence[tuple[str, int]], target_bytes: int, storage_options: Optional[dict] = None,
               threads: int = 8, parallelism: int = 1, open_cost_bytes: int = OPEN_COST_BYTES) -> list[Task]:
    """Cut the snapshot's files (URI, size) into tasks of about `target_bytes` of row groups each.

    Footers are read on the driver (threads); big files are split at row-group boundaries, small
    files are packed together; empty files (no rows) are left out. Each task writes its own output files, so
    the task count is what sizes them: by bytes (`target_bytes` of input per task). When the files are many
    and small (opening them costs more than their bytes: a streaming source of 20,000 one-row files), each
    file also counts `open_cost_bytes` (Spark's file-split rule) and the files are spread over up to
    `parallelism` tasks (the cluster's cores), never more, so the output still gets few, large files.
    Consecutive row groups stay in one task (file order is kept); the tasks' costs differ by at most one
    file's cost from an even split.
    """
    def footer(item):
        uri, _ = item
        filesystem, path = filesystem_and_path(uri, storage_options)
        import pyarrow.parquet as pq

        with filesystem.open_input_file(path) as f:
            md = pq.read_metadata(f)
        return uri, [(i, md.row_group(i).num_rows, md.row_group(i).total_byte_size) for i in range(md.num_row_groups)]

    with ThreadPoolExecutor(max_workers=threads) as pool:
        footers = list(pool.map(footer, files))
    groups = [(uri, i, rows, size) for uri, gs in footers for i, rows, size in gs if rows > 0]
    tasks = _pack_by_bytes(groups, target_bytes)
    n_files = len({uri for uri, *_ in groups})
    total_cost = sum(size for *_, size in groups) + n_files * open_cost_bytes
    if n_files * open_cost_bytes <= total_cost - n_files * open_cost_bytes:  # the bytes are the work
        return tasks
    wanted = min(max(1, int(parallelism)), -(-total_cost // max(1, target_bytes)))
    return tasks if wanted <= len(tasks) else _spread_by_cost(groups, wanted, open_cost_bytes)


def _add_group(task: Task, uri: str, index: int, rows: int, size: int) -> None:
    if task.parts and task.parts[-1][0] == uri:
        task.parts[-1][1].append(index)
    else:
        task.parts.append((uri, [index]))
    task.rows += rows
    task.bytes += size


def _pack_by_bytes(groups: list, target_bytes: int) -> list[Task]:
    """Greedy: row groups in file order, a new task when the next one would pass `target_bytes`."""
    tasks: list[Task] = []
    cur = Task()
    for uri, i, rows, size in groups:
        if cur.bytes and cur.bytes + size > target_bytes:
            tasks.append(cur)
            cur = Task()
        _add_group(cur, uri, i, rows, size)
    if cur.parts:
        tasks.append(cur)
    return tasks


def _spread_by_cost(groups: list, n_tasks: int, open_cost_bytes: int) -> list[Task]:
    """`n_tasks` tasks of about equal cost (bytes + `open_cost_bytes` per file opened), contiguous in file order:
    a row group goes to the task its cost's midpoint falls in."""
    costs, prev = [], None
    for uri, _, _, size in groups:
        costs.append(size + (open_cost_bytes if uri != prev else 0))
        prev = uri
    per_task = sum(costs) / n_tasks
    tasks = [Task() for _ in range(n_tasks)]
    done = 0.0
    for (uri, i, rows, size), cost in zip(groups, costs):
        _add_group(tasks[min(n_tasks - 1, int((done + cost / 2) / per_task))], uri, i, rows, size)
        done += cost
    return [t for t in tasks if t.parts]


def _stats(table: pa.Table) -> str:
    import pyarrow.compute as pc

    mins, maxs, nulls = {}, {}, {}
    for name in ("id", "source_version"):
        col = table.column(name)
        nulls[name] = col.null_count
        if len(col) > col.null_count:
            mm = pc.min_max(col)
            mins[name], maxs[name] = mm["min"].as_py(), mm["max"].as_py()
    return json.dumps({"numRecords": table.num_rows, "minValues": mins, "maxValues": maxs, "nullCount": nulls})


def make_task_fn(
    kernel: MultiSpaceKernel, chain_ids: dict[int, str], source_version: int, produced_at_us: int,
    out_root: str, id_column: str, vector_column: str, version_column: Optional[str], version: int,
    drop_invalid: bool, file_rows: int, storage_options: Optional[dict] = None, batch_rows: Optional[int] = None,
    vector_encoding: str = "array",
) -> Callable[[Iterator[str]], Iterator[str]]:
    """The function Spark tasks run: task JSON in, the add-action JSON of every file written out.

    The kernel runs on slices of at most `batch_rows` rows (None: one call per file part), as the
    spark engine's Arrow batches of `spark.sql.execution.arrow.maxRecordsPerBatch` rows.

    Vectors stored encoded (`vector_encoding` float32_le / json) are decoded with `decode_vectors`, the
    function the spark engine's reads run, so both engines read the same values.

    Ids are cast per file part to their read type (`bclib.tables.ids`: int32 and decimal(p <= 18, 0) ->
    int64), the type the spark engine reads and the output table gets: a table whose id column Delta widened
    from int to bigint (old files int32, new files int64) gives one id type.

    Raises InvalidVectorError (naming the id) for an unusable row unless `drop_invalid`, in which
    case null-id and unusable rows are left out (the quarantine table gets them from the step).
    """
    batch_fn = make_batch_fn(kernel)
    spaces = list(kernel.spaces)

    def run(task_texts: Iterator[str]) -> Iterator[str]:
        import pyarrow.parquet as pq

        out_fs, out_path = filesystem_and_path(out_root, storage_options)
        writers: dict[int, dict] = {}
        written: list[str] = []  # this task's files: deleted again if the task fails (never committed)

        def flush(space: int) -> Optional[str]:
            w = writers.pop(space, None)
            if not w or not w["tables"]:
                return None
            table = pa.concat_tables(w["tables"])
            name = f"{PARTITION}={space}/part-{uuid.uuid4().hex}-c000.snappy.parquet"
            full = f"{out_path.rstrip('/')}/{name}"
            written.append(full)
            try:
                if isinstance(out_fs, pafs.LocalFileSystem):  # object stores have no folders: no marker objects
                    out_fs.create_dir(full.rsplit("/", 1)[0], recursive=True)
                with out_fs.open_output_stream(full) as sink:
                    pq.write_table(table, sink, compression="snappy", use_compliant_nested_type=True,
                                   coerce_timestamps="us")
            except OSError as exc:
                raise output_write_error(exc, full) from exc
            info = out_fs.get_file_info(full)
            return json.dumps({"path": name, "size": int(info.size), "partition_values": {PARTITION: str(space)},
                               "modification_time": int(info.mtime.timestamp() * 1000) if info.mtime else 0,
                               "stats": _stats(table), "rows": table.num_rows})

        try:
            yield from process(task_texts, flush, writers)
        except BaseException:
            for path in written:  # partial and finished files of a failed task: free the space now
                try:
                    out_fs.delete_file(path)
                except OSError:
                    pass
            raise

    def process(task_texts: Iterator[str], flush, writers: dict) -> Iterator[str]:
        import pyarrow.parquet as pq

        for text in task_texts:
            task = Task.from_json(text)
            for uri, groups in task.parts:
                fs_in, path = filesystem_and_path(uri, storage_options)
                with fs_in.open_input_file(path) as f:
                    pf = pq.ParquetFile(f)
                    cols = [id_column, vector_column] + ([version_column] if version_column else [])
                    data = pf.read_row_groups(groups, columns=cols)
                if version_column:
                    import pyarrow.compute as pc

                    data = data.filter(pc.equal(data.column(version_column), version))
                ids, vectors = normalise_ids(data.column(id_column)), data.column(vector_column)
                if vector_encoding != "array":  # binary float32 bytes or JSON text: as the spark engine decodes
                    vectors = decode_vectors(vectors, vector_encoding)
                elif pa.types.is_list(vectors.type) and vectors.type.value_type != pa.float32():
                    vectors = vectors.cast(pa.list_(pa.float32()))
                if isinstance(vectors, pa.ChunkedArray):
                    vectors = vectors.combine_chunks()
                if drop_invalid and data.num_rows:
                    mask, dim = usable_rows(vectors)
                    mask &= np.asarray(ids.combine_chunks().is_valid())
                    mask &= dim == kernel.dim_in
                    keep = pa.array(mask)
                    ids, vectors = ids.combine_chunks().filter(keep), vectors.filter(keep)
                batch = pa.RecordBatch.from_arrays([ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids,
                                                    vectors.combine_chunks() if isinstance(vectors, pa.ChunkedArray)
                                                    else vectors], names=["id", "vector"])
                if batch.num_rows == 0:
                    continue
                step = batch_rows or batch.num_rows
                slices = (batch.slice(start, step) for start in range(0, batch.num_rows, step))
                for out in batch_fn(slices):
                    space = int(out.column(2)[0].as_py())
                    n = out.num_rows
                    table = pa.Table.from_arrays([
                        out.column(0), out.column(1),
                        pa.array(np.full(n, source_version, dtype=np.int32)),
                        pa.array([chain_ids[space]] * n, pa.string()),
                        pa.array(np.full(n, produced_at_us, dtype=np.int64)).cast(pa.timestamp("us", tz="UTC")),
                    ], schema=output_file_schema(out.column(0).type))
                    w = writers.setdefault(space, {"tables": [], "rows": 0})
                    w["tables"].append(table)
                    w["rows"] += n
                    if w["rows"] >= file_rows:
                        done = flush(space)
                        if done:
                            yield done
        for space in spaces:
            done = flush(space)
            if done:
                yield done

    return run
