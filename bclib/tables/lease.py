"""The run lease: one bcemb process at a time writes an output (DESIGN.md, "Shared lakehouses").

Delta's own commit protocol orders commits only where the log store's put is exclusive; on S3 Spark's
`S3SingleDriverLogStore` PUTs the next log entry without a condition, so two bcemb processes could
each "win" one version. The lease orders bcemb's own processes; the commit rule (`tables/commits.py`)
protects against every other writer.

Protocol (objects under the lease location, written with obstore, a maintained binding of the Rust
`object_store` crate that delta-rs also uses):

* a lease is an object `lease-<generation>.json` = {token, holder, step, acquired_at, expires_at};
  the holder is the newest generation;
* acquire: list; no lease, or the newest one expired -> create generation + 1 **put-if-absent**
  (`PutMode.Create`: O_EXCL-like hard link on a local disk, `If-None-Match: *` on S3, the stores'
  preconditions on GCS/Azure); exactly one of several racers gets a given generation. A live lease
  held by someone else -> wait up to `lease.wait_seconds`, then LeaseHeldError;
* heartbeat: a daemon thread rewrites the holder's own object with a new expiry every ttl/4;
* before every commit (`verify_held`): the newest generation must still be ours, with our token, and
  unexpired by our clock, else LeaseLostError and nothing is committed;
* release: delete our object (older generations are deleted by whoever takes over).

Clocks: expiry compares the holder's wall-clock time with the reader's; skew between hosts shortens
or lengthens the ttl by the skew. Re-entrant within a process: `bcemb run` holds it once for fit,
backfill and evaluate.
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterator, Optional

from bclib.errors import LeaseHeldError, LeaseLostError
from bclib.storage import object_store

log = logging.getLogger(__name__)

_PREFIX = "lease-"


def _process_start(pid: int) -> Optional[str]:
    """The process's start time in clock ticks since boot (/proc/<pid>/stat field 22), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def holder_is_dead(body: dict) -> bool:
    """True when the lease's holder ran on this host and that process is gone (or its pid was reused).

    A killed run (kill -9, OOM) then frees its lease at once instead of after its ttl; on another host
    only the expiry can tell.
    """
    if body.get("host") != socket.gethostname() or not isinstance(body.get("pid"), int):
        return False
    start = _process_start(body["pid"])
    if start is None:
        try:
            os.kill(body["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    return body.get("pid_start") is not None and start != body.get("pid_start")
_lock = threading.RLock()
_held: dict[str, list] = {}  # location -> [Lease, depth]


def default_location(spark, cfg) -> str:
    """`lease.location`, else `<output's parent>/_bcemb_leases/<output's name>` for a path output (beside the
    table, not in it: Delta's CREATE TABLE refuses a non-empty directory) or
    `<spark.sql.warehouse.dir>/_bcemb_leases/<name>` for a catalog output."""
    from bclib.tables.delta import is_path

    if cfg.lease.location:
        return cfg.lease.location
    out = cfg.output_location
    if is_path(out):
        trimmed = out.rstrip("/")
        parent, _, name = trimmed.rpartition("/")
        if "://" in trimmed and "/" not in trimmed.split("://", 1)[1]:  # a bucket root: s3://bucket
            parent, name = trimmed, "root"
        return f"{parent or '.'}/_bcemb_leases/{name}"
    warehouse = spark.conf.get("spark.sql.warehouse.dir", "./spark-warehouse")
    return warehouse.rstrip("/") + "/_bcemb_leases/" + out.lower()


class Lease:
    """One process's claim on a lease location (see the module docstring for the protocol)."""

    def __init__(self, location: str, ttl_seconds: float, storage_options: Optional[dict] = None,
                 step: str = "") -> None:
        self.location = location
        self.ttl = float(ttl_seconds)
        self.store = object_store(location, storage_options, mkdir=True)
        self.token = uuid.uuid4().hex
        self.holder = f"{getpass.getuser()}@{socket.gethostname()} pid {os.getpid()}"
        self.step = step
        self.generation: Optional[int] = None
        self.expires_at = 0.0
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ----------------------------------------------------------------- storage
    def _generations(self) -> list[int]:
        import obstore

        gens = []
        for batch in obstore.list(self.store):
            for meta in batch:
                name = str(meta["path"]).rsplit("/", 1)[-1]
                if name.startswith(_PREFIX) and name.endswith(".json"):
                    try:
                        gens.append(int(name[len(_PREFIX):-len(".json")]))
                    except ValueError:
                        continue
        return sorted(gens)

    @staticmethod
    def _name(generation: int) -> str:
        return f"{_PREFIX}{generation:012d}.json"

    def _read(self, generation: int) -> Optional[dict]:
        import obstore
        from obstore.exceptions import NotFoundError

        try:
            raw = bytes(obstore.get(self.store, self._name(generation)).bytes())
        except (NotFoundError, FileNotFoundError):
            return None
        try:
            body = json.loads(raw)
        except json.JSONDecodeError:
            return {"token": None, "expires_at": 0.0, "holder": "unreadable lease object"}
        return body if isinstance(body, dict) else None

    def _body(self) -> bytes:
        return json.dumps({"token": self.token, "holder": self.holder, "step": self.step,
                           "host": socket.gethostname(), "pid": os.getpid(),
                           "pid_start": _process_start(os.getpid()),
                           "acquired_at": time.time(), "expires_at": self.expires_at}).encode()

    # ----------------------------------------------------------------- protocol
    def current(self) -> tuple[Optional[int], Optional[dict]]:
        """(newest generation, its body), (None, None) when no lease object exists."""
        gens = self._generations()
        for gen in reversed(gens):
            body = self._read(gen)
            if body is not None:
                return gen, body
        return None, None

    def try_acquire(self) -> Optional[dict]:
        """Take the lease if it is free or expired; None on success, else the live holder's body."""
        import obstore
        from obstore.exceptions import AlreadyExistsError

        gen, body = self.current()
        if body is not None and float(body.get("expires_at", 0)) > time.time() and not holder_is_dead(body):
            return body
        new = 0 if gen is None else gen + 1
        self.expires_at = time.time() + self.ttl
        try:
            obstore.put(self.store, self._name(new), self._body(), mode="create")
        except AlreadyExistsError:  # another process took this generation first
            _, winner = self.current()
            return winner or {"holder": "another process", "expires_at": time.time() + self.ttl}
        self.generation = new
        if gen is not None:
            why = ("its process is gone" if holder_is_dead(body) else
                   f"expired {time.time() - float(body.get('expires_at', 0)):.0f}s ago")
            log.warning("lease %s: took over generation %d from %s (%s)", self.location, gen, body.get("holder"), why)
            for old in self._generations():
                if old < new:
                    self._delete(old)
        return None

    def acquire(self, wait_seconds: float = 0.0, poll_seconds: float = 2.0) -> "Lease":
        """Take the lease, waiting up to `wait_seconds` for a live holder; LeaseHeldError after that."""
        deadline = time.time() + max(0.0, wait_seconds)
        while True:
            holder = self.try_acquire()
            if holder is None:
                break
            left = deadline - time.time()
            if left <= 0:
                expires = float(holder.get("expires_at", 0)) - time.time()
                raise LeaseHeldError(
                    f"the run lease at {self.location} is held by {holder.get('holder')} "
                    f"(step {holder.get('step') or '?'}, expires in {max(0.0, expires):.0f}s unless renewed): "
                    "another bcemb process is writing this output. Run again later, or wait for it with "
                    "--wait-lease SECONDS (lease.wait_seconds)")
            time.sleep(min(poll_seconds, left))
        log.info("lease %s: generation %d held by %s (ttl %.0fs)", self.location, self.generation, self.holder,
                 self.ttl)
        self._thread = threading.Thread(target=self._heartbeat, name="bcemb-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def renew(self) -> None:
        """Extend our lease by ttl (only the holder writes its own generation's object)."""
        import obstore

        self.verify()
        self.expires_at = time.time() + self.ttl
        obstore.put(self.store, self._name(self.generation), self._body())

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.renew()
            except LeaseLostError as exc:
                log.error("lease %s: %s", self.location, exc)
                return
            except Exception as exc:  # noqa: BLE001 - storage hiccup: the next beat retries, verify() decides
                log.warning("lease %s: heartbeat failed (%s: %s); retrying", self.location, type(exc).__name__, exc)

    def verify(self) -> None:
        """LeaseLostError unless the newest lease object is still ours and unexpired by our clock."""
        if self.generation is None:
            raise LeaseLostError(f"the run lease at {self.location} is not held by this process")
        if time.time() > self.expires_at:
            raise LeaseLostError(
                f"the run lease at {self.location} expired {time.time() - self.expires_at:.0f}s ago (no heartbeat: "
                "the process was paused or its storage unreachable); nothing more is committed by this run")
        gen, body = self.current()
        if gen != self.generation or (body or {}).get("token") != self.token:
            raise LeaseLostError(
                f"the run lease at {self.location} was taken over by {(body or {}).get('holder', 'nobody')} "
                f"(generation {gen}, ours {self.generation}); nothing more is committed by this run")

    def _delete(self, generation: int) -> None:
        import obstore

        try:
            obstore.delete(self.store, self._name(generation))
        except Exception as exc:  # noqa: BLE001 - best effort: a leftover older generation is never newest
            log.debug("lease %s: could not delete generation %d (%s)", self.location, generation, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete our lease object (if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.generation is None:
            return
        body = self._read(self.generation)
        if body is not None and body.get("token") == self.token:
            self._delete(self.generation)
        log.info("lease %s: generation %d released", self.location, self.generation)
        self.generation = None


@contextmanager
def hold(spark, cfg, step: str) -> Iterator[Optional[Lease]]:
    """Hold the output's run lease for the block (re-entrant within this process); None when disabled.

    Raises LeaseHeldError when another process holds it past `cfg.lease.wait_seconds`.
    """
    if not cfg.lease.enabled:
        yield None
        return
    location = default_location(spark, cfg)
    with _lock:
        entry = _held.get(location)
        if entry is not None:
            entry[1] += 1
    if entry is not None:
        try:
            yield entry[0]
        finally:
            with _lock:
                entry[1] -= 1
        return
    lease = Lease(location, cfg.lease.ttl_seconds, cfg.object_store_options or None, step)
    lease.acquire(cfg.lease.wait_seconds)
    with _lock:
        _held[location] = [lease, 1]
    try:
        yield lease
    finally:
        with _lock:
            _held.pop(location, None)
        lease.release()


def verify_held() -> None:
    """Before a commit: LeaseLostError if a lease this process holds was lost (no-op when none is held)."""
    with _lock:
        leases = [entry[0] for entry in _held.values()]
    for lease in leases:
        lease.verify()


def leased(step: str):
    """Decorator for a step `fn(spark, cfg, ...)` that writes: it runs holding the run lease (`hold`).

    A call with `dry_run=True` writes nothing and runs without it.
    """
    import functools
    import inspect

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(spark, cfg, *args, **kwargs):
            if signature.bind(spark, cfg, *args, **kwargs).arguments.get("dry_run"):
                return fn(spark, cfg, *args, **kwargs)
            with hold(spark, cfg, step):
                return fn(spark, cfg, *args, **kwargs)

        return wrapper

    return decorate
