"""Backfill throughput against its floor: an identity copy of the same Delta table, measured side by side.

    python benchmarks/backfill_throughput.py --rows 2000000 --dim 256 --spaces 1 --engine spark arrow
    python benchmarks/backfill_throughput.py --sweep --sweep-rows 1000000 2000000 4000000 --sweep-dims 128 256 768

In one Spark session it alternates, per round, A B C ... (a warm-up round, then median of --repeats each):
  A: identity copy: read the source Delta table, write it unchanged to another Delta table (Spark);
  B: `run_backfill` with backfill.engine = spark (mapInArrow over Spark's reader and writer);
  C: `run_backfill` with backfill.engine = arrow (pyarrow reads/writes on the executors, one delta-rs commit)
into --spaces target spaces (one pass, one commit); and
  D: the peer script (benchmarks/peer_script.py, unless --no-peer): what a user would write instead on one
     machine, in a process of its own: delta-rs reads the source, one numpy GEMM per 64k-row batch and space,
     `write_deltalake` overwrites an output; timed from its first read to its commit
     (`peer_script_rows_per_s`, `vs_peer_script` = peer seconds / backfill seconds: above 1, bcemb is faster). The gate is off (the benchmark has no historical
versions to measure against); the checks on ids and dimensions run as in production. `ratio` = backfill
output rows/s / copy rows/s. Peak RSS of the Python workers (the executors' Arrow memory) and of the JVM,
and the workers' CPU seconds, are sampled from /proc every 50 ms (the JVM's CPU is read before and after). Writes benchmarks/results/backfill_throughput.json (a list `runs`, one
entry per (engine, rows, dim, spaces)) or backfill_sweep.json, and prints a table.
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
    """Peak resident memory of the JVM and of Spark's Python workers (children of this process tree), and the
    workers' CPU seconds while it runs (`worker_cpu_seconds`).

    The CPU is sampled per worker every 50 ms (and once more on exit) and summed over workers, each keyed by
    (pid, start time) so a reused pid is a new worker: last value seen minus the value when the sampler started
    (0 for a worker forked since). The pyspark daemon ignores SIGCHLD, so a worker that exits is reaped by the
    kernel and its CPU reaches no parent's cutime; a before/after sum over live processes loses it. A worker's
    CPU after its last sample (under 50 ms) is not counted: the figure is a slight undercount."""

    def __init__(self) -> None:
        self.peak_worker_mb = 0.0
        self.peak_jvm_mb = 0.0
        self._cpu_base: dict[tuple[int, int], float] = {}
        self._cpu_last: dict[tuple[int, int], float] = {}
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

    def _workers(self, jvms: list[int]) -> list[int]:
        """The pids of Spark's Python workers (the daemon and its forks) under the JVM(s) `jvms`."""
        out = []
        for jvm in jvms:
            stack = self._children(jvm)
            while stack:
                pid = stack.pop()
                if self._is_python_worker(pid):
                    out.append(pid)
                stack += self._children(pid)
        return out

    def _sample(self) -> None:
        jvms = self._children(os.getpid())
        for jvm in jvms:
            self.peak_jvm_mb = max(self.peak_jvm_mb, self._rss_mb(jvm))
        for pid in self._workers(jvms):
            self.peak_worker_mb = max(self.peak_worker_mb, self._rss_mb(pid))
            started, cpu = _proc_times(pid)
            if started is not None:
                self._cpu_last[pid, started] = cpu

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(0.05)

    @property
    def worker_cpu_seconds(self) -> float:
        """Python workers' CPU seconds since __enter__ (read after __exit__)."""
        last = dict(self._cpu_last)
        return sum(c - self._cpu_base.get(key, 0.0) for key, c in last.items())

    def __enter__(self) -> "RssSampler":
        for pid in self._workers(self._children(os.getpid())):  # workers alive now count from their current CPU
            started, cpu = _proc_times(pid)
            if started is not None:
                self._cpu_base[pid, started] = cpu
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()  # the last 50 ms


def _proc_times(pid: int) -> tuple[int | None, float]:
    """(start time in clock ticks since boot, utime + stime in seconds) of a live process; (None, 0) if gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return int(fields[19]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None, 0.0


def cpu_seconds() -> dict[str, float]:
    """CPU seconds used so far by the JVM (its Python workers' come from `RssSampler.worker_cpu_seconds`)."""
    return {"jvm": sum(_proc_times(jvm)[1] for jvm in RssSampler._children(os.getpid()))}


def _cpu_split(before: dict[str, float], after: dict[str, float], sampler: "RssSampler") -> dict[str, float]:
    """JVM and Python-worker CPU seconds of one timed step (where the time goes)."""
    return {"jvm": after["jvm"] - before["jvm"], "python_workers": sampler.worker_cpu_seconds}


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


def job_config(root: Path, source: Path, spaces: int, dim: int, batch_rows: int | None, engine: str = "spark"):
    versions = list(range(spaces + 1))
    return config_from_dict({
        "embeddings": {"location": str(root / "emb_v{version}"), "versions": versions},
        "registry_location": str(root / "registry"),
        "output_location": str(root / f"out_{engine}"),
        "backfill": {"force": True, "arrow_batch_rows": batch_rows, "engine": engine},
        "gate": {"enabled": False},
    }), versions


def setup_registry(spark, cfg, versions: list[int], dim: int) -> dict[int, np.ndarray]:
    """Register one linear transform per edge; returns per target space j the composed matrix M_j of the chain
    from the source version (the newest) down to j (x @ M_j: what the peer script applies)."""
    rng = np.random.default_rng(0)
    records = [
        TransformRecord(f"bench-{k}-{dim}", k, k - 1, "linear", "single_step",
                        AffineTransform(rng.normal(size=(dim, dim)) / np.sqrt(dim)))
        for k in versions[1:]
    ]
    register(spark, cfg.registry_location, records)
    weight = {r.source_version: r.transform.weight for r in records}
    composed, m = {}, np.eye(dim)
    for k in reversed(versions[1:]):  # source -> source-1 -> ... -> 0
        m = m @ weight[k]
        composed[k - 1] = m.copy()
    return composed


def run_peer(source: Path, output: Path, composed: dict[int, np.ndarray]) -> dict:
    """benchmarks/peer_script.py in a process of its own (delta-rs read, numpy GEMM per batch, write_deltalake);
    its JSON line (rows_read, rows_written, seconds from first read to commit)."""
    import subprocess

    weights = output.parent / "peer_weights.npz"
    np.savez(weights, **{f"space_{j}": m.astype(np.float32) for j, m in composed.items()})
    shutil.rmtree(output, ignore_errors=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("peer_script.py")), str(source), str(output),
                           str(weights)], capture_output=True, text=True, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    shutil.rmtree(output, ignore_errors=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def measure(spark, rows: int, dim: int, spaces: int, repeats: int, batch_rows: int | None,
            engines: list[str], warmup: bool = True, peer: bool = True) -> list[dict]:
    """One (rows, dim, spaces) point: copy, every engine and (`peer`) the one-process peer script alternated per
    round; one result per engine. `warmup`: one uncounted round first (the session's first point needs it)."""
    DATA.mkdir(parents=True, exist_ok=True)
    source = DATA / f"src_{rows}_{dim}"
    make_source(spark, source, rows, dim)
    root = DATA / f"run_{rows}_{dim}_{spaces}"
    cfgs = {}
    for engine in engines:
        cfgs[engine], versions = job_config(root, source, spaces, dim, batch_rows, engine)
    first = cfgs[engines[0]]
    # the source version's table is the benchmark table (symlink keeps one copy on disk)
    link = Path(first.version_location(spaces))
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(source.resolve())
    composed = setup_registry(spark, first, versions, dim)
    peer_times: list[float] = []
    copy_path = str(root / "copy")
    copy_times, copy_cpu = [], []
    per = {e: {"times": [], "write": [], "cpu": [], "rss": []} for e in engines}
    warm = 1 if warmup else 0
    for i in range(repeats + warm):  # a first round warms up (JIT, Python workers) and is not counted
        # every round starts from empty targets: Delta keeps overwritten files, and the disk is finite
        shutil.rmtree(copy_path, ignore_errors=True)
        with RssSampler() as copy_rss:
            c0, t = cpu_seconds(), time.perf_counter()
            spark.read.format("delta").load(str(source)).write.format("delta").mode("overwrite").save(copy_path)
            a = time.perf_counter() - t
            c1 = cpu_seconds()
        shutil.rmtree(copy_path, ignore_errors=True)
        if i >= warm:
            copy_times.append(a)
            copy_cpu.append(_cpu_split(c0, c1, copy_rss))
        line = [f"round {i}: copy {a:.2f}s"]
        for engine in engines:
            cfg = cfgs[engine]
            shutil.rmtree(cfg.output_location, ignore_errors=True)
            with RssSampler() as rss:
                c1, t = cpu_seconds(), time.perf_counter()
                result = run_backfill(spark, cfg)
                b = time.perf_counter() - t
                c2 = cpu_seconds()
            assert result.rows == rows * spaces and result.engine == engine, result
            shutil.rmtree(cfg.output_location, ignore_errors=True)
            if i >= warm:
                per[engine]["times"].append(b)
                per[engine]["write"].append(result.write_seconds)
                per[engine]["cpu"].append(_cpu_split(c1, c2, rss))
                per[engine]["rss"].append((rss.peak_worker_mb, rss.peak_jvm_mb))
            line.append(f"{engine} {b:.2f}s")
        if peer:
            got = run_peer(source, root / "peer_out", composed)
            assert got["rows_written"] == rows * spaces, got
            if i >= warm:
                peer_times.append(got["seconds"])
            line.append(f"peer script {got['seconds']:.2f}s")
        logging.info(", ".join(line))
    copy_s = statistics.median(copy_times)
    out = []
    for engine in engines:
        m = per[engine]
        back_s = statistics.median(m["times"])
        out.append({
            "engine": engine, "rows": rows, "dim": dim, "spaces": spaces, "repeats": repeats, "cores": os.cpu_count(),
            "copy_seconds": copy_times, "backfill_seconds": m["times"],
            "copy_rows_per_s": rows / copy_s, "backfill_rows_per_s": rows * spaces / back_s,
            "ratio": (rows * spaces / back_s) / (rows / copy_s),
            "time_ratio": back_s / copy_s,
            "write_only_ratio": (rows * spaces / statistics.median(m["write"])) / (rows / copy_s),
            "backfill_write_seconds": m["write"],
            "peak_rss_mb": max(r[0] for r in m["rss"]), "peak_jvm_rss_mb": max(r[1] for r in m["rss"]),
            "arrow_batch_rows": batch_rows or "auto",
            # CPU seconds (median over rounds) of the JVM and of the Python workers: where the time goes
            "copy_cpu_seconds": {k: statistics.median(c[k] for c in copy_cpu) for k in copy_cpu[0]},
            "backfill_cpu_seconds": {k: statistics.median(c[k] for c in m["cpu"]) for k in m["cpu"][0]},
        })
        if peer_times:  # the one-process delta-rs + numpy script of the same round (benchmarks/peer_script.py)
            out[-1].update({"peer_script_seconds": peer_times,
                            "peer_script_rows_per_s": rows * spaces / statistics.median(peer_times),
                            "vs_peer_script": statistics.median(peer_times) / back_s})
    return out


def print_rows(rows: list[dict]) -> None:
    head = f"{'engine':>6} {'rows':>9} {'dim':>5} {'spaces':>6} {'copy rows/s':>12} {'backfill out rows/s':>20} " \
           f"{'ratio':>6} {'write-only':>10} {'time B/A':>8} {'worker MB':>9} {'JVM MB':>7} {'peer rows/s':>12} {'vs peer':>7}"
    print(head)
    for r in rows:
        print(f"{r['engine']:>6} {r['rows']:>9} {r['dim']:>5} {r['spaces']:>6} {r['copy_rows_per_s']:>12,.0f} "
              f"{r['backfill_rows_per_s']:>20,.0f} {r['ratio']:>6.3f} {r['write_only_ratio']:>10.3f} {r['time_ratio']:>8.3f} "
              f"{r['peak_rss_mb']:>9.0f} {r['peak_jvm_rss_mb']:>7.0f} {r.get('peer_script_rows_per_s', 0):>12,.0f} "
              f"{r.get('vs_peer_script', 0):>7.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--spaces", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-rows", type=int, default=None, help="Arrow batch rows (default: sized by bcemb)")
    parser.add_argument("--engine", nargs="+", choices=["spark", "arrow"], default=["spark", "arrow"])
    parser.add_argument("--sweep", action="store_true", help="sweep rows x dims at one space")
    parser.add_argument("--sweep-rows", type=int, nargs="+", default=[1_000_000, 2_000_000, 4_000_000])
    parser.add_argument("--sweep-dims", type=int, nargs="+", default=[128, 256, 768])
    parser.add_argument("--driver-memory", default="6g")
    parser.add_argument("--no-peer", dest="peer", action="store_false",
                        help="leave out the one-process delta-rs + numpy peer script (benchmarks/peer_script.py)")
    parser.add_argument("--drop-data", action="store_true",
                        help="delete every generated src_*/run_* table and the warehouse under benchmarks/data (sweep: after "
                             "each point; other runs: at the end); other benchmarks' caches stay")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("py4j").setLevel(logging.WARNING)
    from bclib.config import SparkSettings
    from bclib.spark import get_or_create

    spark = get_or_create(SparkSettings(
        master="local[*]", shuffle_partitions=4, warehouse_dir=str(DATA / "warehouse"),
        # a Python worker that dies prints its stack (the 2M x 768 spark-engine crash of a long sweep session)
        conf={"spark.driver.memory": args.driver_memory, "spark.python.worker.faulthandler.enabled": "true"},
    ))
    results = []
    if args.sweep:
        for rows in args.sweep_rows:
            for dim in args.sweep_dims:
                results += measure(spark, rows, dim, 1, args.repeats, args.batch_rows, args.engine,
                                   warmup=not results, peer=args.peer)
                print_rows(results[-len(args.engine):])
                save_results(RESULTS / "backfill_sweep.json", results)  # each point as soon as it is measured
                if args.drop_data:  # one source at a time on disk (4M x 768 floats is 12 GB)
                    shutil.rmtree(DATA / f"src_{rows}_{dim}", ignore_errors=True)
                    shutil.rmtree(DATA / f"run_{rows}_{dim}_1", ignore_errors=True)
        name = "backfill_sweep.json"
    else:
        for spaces in args.spaces:
            results += measure(spark, args.rows, args.dim, spaces, args.repeats, args.batch_rows, args.engine,
                               peer=args.peer)
            print_rows(results[-len(args.engine):])
        name = "backfill_throughput.json"
    if args.drop_data:  # every generated source/run table and the warehouse; other benchmarks' caches stay
        for path in list(DATA.glob("src_*")) + list(DATA.glob("run_*")) + [DATA / "warehouse"]:
            shutil.rmtree(path, ignore_errors=True)
    save_results(RESULTS / name, results)
    print()
    print_rows(results)


def save_results(path: Path, results: list[dict]) -> None:
    """Merge `results` into the JSON at `path` (one file; a rerun replaces its own (engine, rows, dim, spaces))."""
    path.parent.mkdir(parents=True, exist_ok=True)
    previous = json.loads(path.read_text()).get("runs", []) if path.exists() else []
    key = lambda r: (r.get("engine", "spark"), r["rows"], r["dim"], r["spaces"])  # noqa: E731
    fresh = {key(r) for r in results}
    runs = [r for r in previous if key(r) not in fresh] + results
    path.write_text(json.dumps({"cores": os.cpu_count(), "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
