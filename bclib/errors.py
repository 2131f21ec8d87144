"""Named exceptions raised at bcemb's boundaries.

Every message says what is wrong, what was expected and, where it helps, what
to do. Jobs turn these into a one-line error and a non-zero exit code.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Iterator, Optional


class BcembError(Exception):
    """Base class for every error bcemb raises on purpose."""


class ConfigError(BcembError, ValueError):
    """A config file is missing, malformed, has unknown keys or wrong types."""


class MissingTableError(BcembError, LookupError):
    """An input Delta table (path or catalog name) does not exist."""


class VersionTableEmptyError(BcembError, ValueError):
    """An embedding version's table exists but holds no rows (every row deleted, an empty export)."""


class VersionFilesMissingError(BcembError, LookupError):
    """An embedding version's Delta log lists data files that are gone (deleted outside Delta)."""


class MissingColumnError(BcembError, KeyError):
    """A table lacks a column the config names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class VectorTypeError(BcembError, TypeError):
    """The vector column exists but its type is not one bcemb reads (the found type and a conversion are named)."""


class DimensionMismatchError(BcembError, ValueError):
    """Arrays or vectors do not have the dimension the transform expects."""


class InvalidVectorError(BcembError, ValueError):
    """A vector is null, has the wrong length or holds NaN/Inf."""


class ChecksumError(BcembError, ValueError):
    """Serialised transform bytes do not match their recorded checksum."""


class TransformFormatError(BcembError, ValueError):
    """Serialised transform bytes are not a valid bcemb transform."""


class RegistryError(BcembError, LookupError):
    """The transform registry lacks an active transform an edge needs."""


class InsufficientDataError(BcembError, ValueError):
    """Too few shared entities to fit or evaluate a transform."""


class DuplicateIdError(BcembError, ValueError):
    """An embedding version holds the same id more than once."""


class NullIdError(BcembError, ValueError):
    """An embedding version holds rows whose id is null."""


class EmptySourceError(BcembError, ValueError):
    """The version table to publish from holds no usable rows."""


class ShrinkGuardError(BcembError, ValueError):
    """A space would lose more rows than `backfill.max_shrink` allows (`--allow-shrink` overrides)."""


class FitRejectedError(BcembError, ValueError):
    """A fitted transform is degenerate: worse than no transform on its own held-out pairs."""


class GateRejectedError(BcembError):
    """A candidate chain failed the compatibility gate; nothing was published (exit code 3)."""


class IncrementalUnavailableError(BcembError):
    """`backfill.incremental: require` but the source's change data feed cannot serve the range."""


class ConcurrentRunError(BcembError):
    """Another run kept winning the Delta commit race after the bounded retries."""


class ConcurrentCommitError(BcembError):
    """Another writer committed a change to the spaces this step replaces after it planned (the step re-plans)."""

    def __init__(self, message: str, version: Optional[int] = None) -> None:
        super().__init__(message)
        self.version = version


class LeaseHeldError(BcembError):
    """Another bcemb process holds the run lease of this output (exit code 75: try again later)."""


class LeaseLostError(BcembError):
    """This process's run lease expired or was taken over before a commit; nothing more was committed (exit 75)."""


class OutputWriteError(BcembError, OSError):
    """Writing an output file failed on the storage (no space left, permission denied, read-only filesystem)."""


_IO_REASONS = {28: "no space left on device", 13: "permission denied", 1: "operation not permitted",
               30: "read-only filesystem", 122: "disk quota exceeded"}


def output_write_error(exc: OSError, path: str) -> "BcembError":
    """OutputWriteError naming the storage failure and the file (pyarrow often carries errno only in its text)."""
    import errno as _errno

    code = exc.errno
    text = str(exc)
    if code is None:
        found = re.search(r"errno (\d+)", text, re.IGNORECASE)
        code = int(found.group(1)) if found else None
    if code is None:
        for number, words in _IO_REASONS.items():
            if words in text.lower():
                code = number
    reason = _IO_REASONS.get(code, _errno.errorcode.get(code or -1, "I/O error"))
    return OutputWriteError(f"{reason} at {path} ({text.strip().splitlines()[0] if text.strip() else code}); "
                            "the task's files were removed and nothing was committed: free space or fix the "
                            "permissions, then run again")


class OutputLocationError(BcembError, ValueError):
    """The output location holds something that is not a Delta table bcemb owns."""


class ForeignTableError(BcembError, ValueError):
    """`generate` would overwrite a table it did not create."""


class EngineUnavailableError(BcembError):
    """`backfill.engine: arrow` for a table the arrow engine cannot read or commit to (the reason is named)."""


class ConnectServerUnreachableError(BcembError, ConnectionError):
    """The Spark Connect server of `spark.remote` / $SPARK_REMOTE does not answer (nothing listens there)."""


class MissingDependencyError(BcembError, ImportError):
    """A feature needs an optional extra (`pip install bcemb[torch]`, `bcemb[report]`, ...)."""


class MaintenanceError(BcembError):
    """`bcemb maintain` could not keep its promise (a VACUUM recorded a retention below the one promised)."""


class IdTypeError(BcembError, TypeError):
    """An id column's type is not one bcemb accepts, or versions disagree on it (numeric vs string ids)."""


# --------------------------------------------------------------------------- errors raised on executors

_EXECUTOR_ERROR = re.compile(r"bclib\.errors\.(\w+): (.*)")


def executor_error(exc: BaseException) -> Optional[BcembError]:
    """The bcemb error a Spark Python worker raised, rebuilt on the driver from `exc`'s text, if any.

    Spark wraps an exception raised inside `mapInArrow` in a PythonException (or a Py4JJavaError)
    whose message holds the worker's traceback ending in 'bclib.errors.<Class>: <message>'. Returns
    an instance of that class with that message (the last one in the text), or None.
    """
    found = _EXECUTOR_ERROR.findall(str(exc))
    if not found:
        text = str(exc)
        for words in ("No space left on device", "Read-only file system", "Permission denied", "Disk quota exceeded"):
            if words in text:  # Spark's own writer (the spark engine, MERGE) failed on the storage
                line = next((ln.strip() for ln in text.splitlines() if words in ln), words)
                return OutputWriteError(f"{words.lower()} while Spark wrote a table ({line[:300]}); Spark removes "
                                        "its failed tasks' files and nothing was committed: free space or fix the "
                                        "permissions, then run again")
        return None
    name, message = found[-1]
    cls = globals().get(name)
    if not (isinstance(cls, type) and issubclass(cls, BcembError)):
        return None
    return cls(message.strip())


@contextmanager
def reraise_executor_errors() -> Iterator[None]:
    """Run a Spark action; a bcemb error raised on an executor is re-raised on the driver as its own class."""
    try:
        yield
    except BcembError:
        raise
    except Exception as exc:  # only re-raised as a bcemb error when the text names one, else unchanged
        named = executor_error(exc)
        if named is None:
            raise
        raise named from exc


_ANSI = __import__("re").compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(text: str, limit: int = 300) -> str:
    """`text` (a library's error, often several lines with terminal colour codes: delta-rs's) as one clean
    line: colour codes removed, whitespace runs (newlines too) made one space, cut at `limit` characters
    with '...'. Pure."""
    clean = " ".join(_ANSI.sub("", str(text)).split())
    return clean if len(clean) <= limit else clean[: limit - 3].rstrip() + "..."


def error_class(exc: BaseException) -> str:
    """Spark's error class (condition) of `exc` ('DELTA_CONCURRENT_APPEND', 'JAVA_GATEWAY_EXITED', ...), '' when it
    has none: `getCondition`, else the deprecated `getErrorClass` (older pyspark); an accessor that fails
    (a py4j call on a dead gateway) counts as none."""
    for attr in ("getCondition", "getErrorClass"):
        fn = getattr(exc, attr, None)
        if callable(fn):
            try:
                value = fn()
            except Exception:  # noqa: BLE001 - a failing accessor just means "no class"
                value = None
            if value:
                return str(value)
    return ""
