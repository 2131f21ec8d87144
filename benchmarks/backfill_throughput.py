"""Backfill throughput against its floor: an identity copy of the same Delta table, measured side by side.

    python benchmarks/backfill_throughput.py --rows 2000000 --dim 256 --spaces 1
    python benchmarks/backfill_throughput.py --sweep --sweep-rows 500000 1000000 2000000 --sweep-dims 128 256 768

In one Spark session it alternates A B A B ... (median of --repeats each):
  A: identity copy: read the source Delta table, write it unchanged to another Delta table;
  B: `bclib.steps.backfill.run_backfill` into --spaces target spaces (one pass, one commit).
`ratio` = backfill output rows/s / copy rows/s. Peak RSS of the Python workers (the executors' Arrow
memory) and of the JVM are sampled from /proc every 50 ms. Writes benchmarks/results/backfill_throughput.json
(or backfill_sweep.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bclib.steps.backfill import run_backfill  # noqa: E402
from bclib.config import config_from_dict  # noqa: E402
from bclib.tables.delta import table_exists  # noqa: E402
from bclib.numerics.records import TransformRecord  # noqa: E402
from bclib.tables.registry import register  # noqa: E402
from bclib.numerics.transforms import AffineTransform  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(__file__).resolve().parent / "data"


class RssSampler:
    """Peak resident memory of the JVM and of Spark's Python workers (children of this process tree)."""

    def __init__(self) -> None:
        self.peak_worker_mb = 0.0
        self.peak_jvm_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def _rss_mb(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/statm") as fh:
                return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except (OSError, IndexError, ValueError):
            return 0.0

    @staticmethod
    def _children(pid: int) -> list[int]:
        out = []
        try:
            for tid in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{tid}/children") as fh:
                    out += [int(c) for c in fh.read().split()]
        except OSError:
            pass
        return out

    @staticmethod
    def _is_python_worker(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmd = fh.read()
            # the daemon and its forked workers; not the JVM's short-lived forks (whose classpath says pyspark)
            return b"pyspark.daemon" in cmd and b"java" not in cmd
        except OSError:
            return False

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for jvm in self._children(me):
                self.peak_jvm_mb = max(self.peak_jvm_mb, self._rss_mb(jvm))
                stack = self._children(jvm)
                while stack:  # pyspark daemon and its forked workers (not the JVM's short-lived forks)
                    pid = stack.pop()
                    if self._is_python_worker(pid):
                        self.peak_worker_mb = max(self.peak_worker_mb, self._rss_mb(pid))
                    stack += self._children(pid)
            time.sleep(0.05)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the JVM and by Spark's Python workers (for where-the-time-goes splits)."""
    ticks = os.sysconf("SC_CLK_TCK")
    out = {"jvm": 0.0, "python_workers": 0.0}

    def cpu(pid: int) -> float:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / ticks
        except (OSError, IndexError, ValueError):
            return 0.0

    for jvm in RssSampler._children(os.getpid()):
        out["jvm"] += cpu(jvm)
        stack = RssSampler._children(jvm)
        while stack:
            pid = stack.pop()
            if RssSampler._is_python_worker(pid):
                out["python_workers"] += cpu(pid)
            stack += RssSampler._children(pid)
    return out


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before[k] for k in after}


def make_source(spark, path: Path, rows: int, dim: int) -> None:
    """A Delta table of `rows` random float vectors (bigint ids), generated on the executors; reused if present."""
    import pyarrow as pa

    from bclib.numerics.arrow import matrix_to_list

    if table_exists(spark, str(path)):
        return
    block = 50_000

    def gen(batches):
        for batch in batches:
            for b in batch.column(0).to_numpy():
                lo, hi = int(b) * block, min((int(b) + 1) * block, rows)
                rng = np.random.default_rng(int(b))
                yield pa.RecordBatch.from_arrays(
                    [pa.array(np.arange(lo, hi, dtype=np.int64)),
                     matrix_to_list(rng.normal(size=(hi - lo, dim)).astype(np.float32))], names=["id", "vector"])

    n_blocks = -(-rows // block)
    spark.range(0, n_blocks, numPartitions=max(2, n_blocks // 4)).mapInArrow(gen, "id long, vector array<float>") \
        .write.format("delta").mode("overwrite").save(str(path))


def job_config(root: Path, source: Path, spaces: int, dim: int, batch_rows: int | None):
    versions = list(range(spaces + 1))
    return config_from_dict({
        "embeddings": {"location": str(root / "emb_v{version}"), "versions": versions},
        "registry_location": str(root / "registry"),
        "output_location": str(root / "out"),
        "backfill": {"source_version": spaces, "force": True, "arrow_batch_rows": batch_rows},
    }), versions


def setup_registry(spark, cfg, versions: list[int], dim: int) -> None:
    rng = np.random.default_rng(0)
    records = [
        TransformRecord(f"bench-{k}-{dim}", k, k - 1, "linear", "single_step",
                        AffineTransform(rng.normal(size=(dim, dim)) / np.sqrt(dim)))
        for k in versions[1:]
    ]
    register(spark, cfg.registry_location, records)


def measure(spark, rows: int, dim: int, spaces: int, repeats: int, batch_rows: int | None) -> dict:
    DATA.mkdir(parents=True, exist_ok=True)
    source = DATA / f"src_{rows}_{dim}"
    make_source(spark, source, rows, dim)
    root = DATA / f"run_{rows}_{dim}_{spaces}"
    cfg, versions = job_config(root, source, spaces, dim, batch_rows)
    # the source version's table is the benchmark table (symlink keeps one copy on disk)
    link = Path(cfg.version_location(spaces))
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(source.resolve())
    setup_registry(spark, cfg, versions, dim)
    copy_path = str(root / "copy")
    copy_times, backfill_times, write_times, copy_cpu, backfill_cpu = [], [], [], [], []
    with RssSampler() as rss:
        for i in range(repeats + 1):  # the first round warms up (JIT, Python workers) and is not counted
            # every round starts from empty targets: Delta keeps overwritten files, and the disk is finite
            shutil.rmtree(copy_path, ignore_errors=True)
            shutil.rmtree(cfg.output_location, ignore_errors=True)
            c0, t = cpu_seconds(), time.perf_counter()
            spark.read.format("delta").load(str(source)).write.format("delta").mode("overwrite").save(copy_path)
            a = time.perf_counter() - t
            c1, t = cpu_seconds(), time.perf_counter()
            result = run_backfill(spark, cfg)
            b = time.perf_counter() - t
            c2 = cpu_seconds()
            assert result.rows == rows * spaces, result
            if i:
                copy_times.append(a)
                backfill_times.append(b)
                write_times.append(result.write_seconds)
                copy_cpu.append(_delta(c0, c1))
                backfill_cpu.append(_delta(c1, c2))
            logging.info("round %d: copy %.2fs, backfill %.2fs", i, a, b)
    shutil.rmtree(copy_path, ignore_errors=True)
    shutil.rmtree(cfg.output_location, ignore_errors=True)
    copy_s, back_s = statistics.median(copy_times), statistics.median(backfill_times)
    return {
        "rows": rows, "dim": dim, "spaces": spaces, "repeats": repeats, "cores": os.cpu_count(),
        "copy_seconds": copy_times, "backfill_seconds": backfill_times,
        "copy_rows_per_s": rows / copy_s, "backfill_rows_per_s": rows * spaces / back_s,
        "ratio": (rows * spaces / back_s) / (rows / copy_s),
        "time_ratio": back_s / copy_s,
        "write_only_ratio": (rows * spaces / statistics.median(write_times)) / (rows / copy_s),
        "backfill_write_seconds": write_times,
        "peak_rss_mb": rss.peak_worker_mb, "peak_jvm_rss_mb": rss.peak_jvm_mb,
        "arrow_batch_rows": batch_rows or "auto",
        # CPU seconds (median over rounds) of the JVM and of the Python workers: where the time goes
        "copy_cpu_seconds": {k: statistics.median(c[k] for c in copy_cpu) for k in copy_cpu[0]},
        "backfill_cpu_seconds": {k: statistics.median(c[k] for c in backfill_cpu) for k in backfill_cpu[0]},
    }


def print_rows(rows: list[dict]) -> None:
    head = f"{'rows':>9} {'dim':>5} {'spaces':>6} {'copy rows/s':>12} {'backfill out rows/s':>20} {'ratio':>6} " \
           f"{'write-only':>10} {'time B/A':>8} {'worker MB':>9} {'JVM MB':>7}"
    print(head)
    for r in rows:
        print(f"{r['rows']:>9} {r['dim']:>5} {r['spaces']:>6} {r['copy_rows_per_s']:>12,.0f} "
              f"{r['backfill_rows_per_s']:>20,.0f} {r['ratio']:>6.3f} {r['write_only_ratio']:>10.3f} {r['time_ratio']:>8.3f} "
              f"{r['peak_rss_mb']:>9.0f} {r['peak_jvm_rss_mb']:>7.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spaces", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=None, help="Arrow batch rows (default: sized by bcemb)")
    parser.add_argument("--sweep", action="store_true", help="sweep rows x dims at one space")
    parser.add_argument("--sweep-rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--sweep-dims", type=int, nargs="+", default=[128, 256, 768])
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--drop-data", action="store_true", help="delete the generated source tables at the end")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from bclib.config import SparkSettings
    from bclib.spark import get_or_create

    spark = get_or_create(SparkSettings(
        master="local[*]", shuffle_partitions=4, warehouse_dir=str(DATA / "warehouse"),
        conf={"spark.driver.memory": args.driver_memory},
    ))
    results = []
    if args.sweep:
        for rows in args.sweep_rows:
            for dim in args.sweep_dims:
                results.append(measure(spark, rows, dim, 1, args.repeats, args.batch_rows))
                print_rows(results[-1:])
        name = "backfill_sweep.json"
    else:
        for spaces in args.spaces:
            results.append(measure(spark, args.rows, args.dim, spaces, args.repeats, args.batch_rows))
            print_rows(results[-1:])
        name = "backfill_throughput.json"
    if args.drop_data:
        shutil.rmtree(DATA, ignore_errors=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    previous = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    key = lambda r: (r["rows"], r["dim"], r["spaces"])  # noqa: E731
    fresh = {key(r) for r in results}
    runs = [r for r in previous if key(r) not in fresh] + results  # one file; a rerun replaces its own rows
    path.write_text(json.dumps({"cores": os.cpu_count(), "runs": runs}, indent=2))
    print()
    print_rows(results)


if __name__ == "__main__":
    main()
