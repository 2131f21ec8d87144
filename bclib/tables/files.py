"""A table location's files, listed and removed the way the session can reach them.

Classic sessions go through Spark's own Hadoop FileSystem (the default filesystem, the working directory and
the S3A/ABFS/GCS settings Spark resolves paths with). Spark Connect has no JVM handle on the client: there the
location is read with obstore (local paths and file: URIs directly, object stores with `storage.options`,
the same access the run lease already needs). Only what the output checks need: what a path is, a folder's
entries, a recursive delete.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional


class HadoopFiles:
    """A location through the session's Hadoop FileSystem (classic sessions: `spark._jvm`)."""

    def __init__(self, spark, location: str):
        jvm = spark._jvm
        self._path = jvm.org.apache.hadoop.fs.Path(location)
        self._fs = self._path.getFileSystem(spark._jsc.hadoopConfiguration())
        self._jvm = jvm

    def _at(self, rel: str):
        return self._path if not rel else self._jvm.org.apache.hadoop.fs.Path(self._path, rel)

    def qualified(self) -> str:
        """The location qualified by Hadoop (scheme, authority, absolute path), as Spark's writers resolve it."""
        return self._fs.makeQualified(self._path).toString()

    def kind(self, rel: str = "") -> Optional[str]:
        """'dir', 'file' or None (nothing there) for `rel` under the location."""
        path = self._at(rel)
        if not self._fs.exists(path):
            return None
        return "dir" if self._fs.getFileStatus(path).isDirectory() else "file"

    def entries(self, rel: str = "") -> list[tuple[str, bool]]:
        """[(name, is a folder)] directly under `rel`."""
        return [(s.getPath().getName(), bool(s.isDirectory())) for s in self._fs.listStatus(self._at(rel))]

    def remove(self, rel: str) -> None:
        """Delete `rel` and everything under it."""
        self._fs.delete(self._at(rel), True)


class StoreFiles:
    """A location read without Spark (Spark Connect): a local path or file: URI with the os module, an object
    store URI with obstore (`bclib.storage.object_store`, `storage_options` as `storage.options` gives them).
    An object store has no folders: a folder is a key prefix with objects (or a marker) under it."""

    def __init__(self, location: str, storage_options: Optional[dict] = None):
        from bclib.storage import local_path, object_store

        self._local = local_path(location)
        if self._local is None:
            self._store = object_store(location, storage_options)

    def _listing(self, rel: str) -> tuple[list[str], list[str]]:
        import obstore

        prefix = rel.strip("/") + "/" if rel else None
        found = obstore.list_with_delimiter(self._store, prefix)
        dirs = [p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]]
        files = [o["path"].rsplit("/", 1)[-1] for o in found["objects"]]
        return dirs, [f for f in files if f]

    def kind(self, rel: str = "") -> Optional[str]:
        if self._local is not None:
            path = os.path.join(self._local, rel) if rel else self._local
            return "dir" if os.path.isdir(path) else "file" if os.path.exists(path) else None
        dirs, files = self._listing(rel)
        return "dir" if dirs or files else None

    def entries(self, rel: str = "") -> list[tuple[str, bool]]:
        if self._local is not None:
            path = os.path.join(self._local, rel) if rel else self._local
            return [(e.name, e.is_dir()) for e in os.scandir(path)]
        dirs, files = self._listing(rel)
        return [(d, True) for d in dirs] + [(f, False) for f in files]

    def remove(self, rel: str) -> None:
        if self._local is not None:
            path = os.path.join(self._local, rel)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            return
        import obstore

        for batch in obstore.list(self._store, rel.strip("/") + "/"):
            obstore.delete(self._store, [o["path"] for o in batch])


def table_files(spark, location: str, storage_options: Optional[dict] = None):
    """`HadoopFiles` on a classic session, `StoreFiles` on Spark Connect, for a path location."""
    from bclib.spark import is_connect

    return StoreFiles(location, storage_options) if is_connect(spark) else HadoopFiles(spark, location)
