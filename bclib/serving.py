"""Transforms for online consumers: a composed chain as one file, applied with numpy at request time.

A service that embeds a fresh item with the new model needs that vector in an old space now, not after the
next backfill. `bcemb export --source K --space J --output FILE` writes the active chain K -> J as one
self-contained file that cannot execute code: an npz read with `allow_pickle=False`, holding one JSON
metadata entry (format, source and target space, dims, chain id, each transform's id, edge, kind and SHA-256)
and each transform's own bytes (the registry's no-pickle npz, `bclib.numerics.serialization`).
`load_chain(FILE)` verifies every checksum and the dims, and returns a `Chain` whose `.transform(x)` maps
float32 (n, d_K) to (n, d_J) with the backfill's own kernel (`MultiSpaceKernel`: a linear chain collapses to
one matrix) — the same function on the same batch gives the same bits. numpy only: no Spark, no pyarrow.
"""

from __future__ import annotations

import io
import json
import os
import zipfile
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import numpy as np

from bclib.errors import BcembError, ChecksumError, DimensionMismatchError, TransformFormatError
from bclib.numerics.kernel import MultiSpaceKernel
from bclib.numerics.records import chain_id_of
from bclib.numerics.serialization import checksum, transform_from_bytes
from bclib.numerics.transforms import Transform, check_chain

FORMAT = "bcemb-chain"
FORMAT_VERSION = 1


class ChainMismatchError(BcembError, ValueError):
    """A loaded chain maps other spaces than the caller expects (a service must not mix spaces)."""


@dataclass(frozen=True)
class Chain:
    """The composed backward transforms from `source` to `target` space, ready to apply.

    transform_ids / checksums: the registry transforms in application order (source first); chain_id: the
    id the output table stores on rows of this chain (`bclib.numerics.records.chain_id`)."""

    source: int
    target: int
    dim_in: int
    dim_out: int
    chain_id: str
    transform_ids: tuple[str, ...]
    checksums: tuple[str, ...] = field(repr=False)
    transforms: tuple[Transform, ...] = field(repr=False)  # a notebook shows the ids, not every weight

    def __post_init__(self) -> None:
        object.__setattr__(self, "_kernel", MultiSpaceKernel(self.dim_in, {self.target: list(self.transforms)}))

    def transform(self, x: np.ndarray) -> np.ndarray:
        """x: (n, dim_in) vectors of the source space (cast to float32) -> (n, dim_out) float32 in the target space.

        Raises DimensionMismatchError naming the expected and found shape (a 1-D x of dim_in is one row)."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 1 and x.shape[0] == self.dim_in:
            x = x.reshape(1, -1)
        if x.ndim != 2 or x.shape[1] != self.dim_in:
            raise DimensionMismatchError(f"chain {self.source} -> {self.target} maps vectors of dimension "
                                         f"{self.dim_in} (shape (n, {self.dim_in})), found shape {x.shape}")
        return self._kernel(x)[self.target]

    def expect(self, source: Optional[int] = None, target: Optional[int] = None,
               transform_ids: Optional[Sequence[str]] = None) -> "Chain":
        """Fail fast (ChainMismatchError) unless this chain maps `source` -> `target` through `transform_ids`."""
        source, target = _space_number(source, "source"), _space_number(target, "target")
        wrong = []
        if source is not None and source != self.source:
            wrong.append(f"source space {self.source}, expected {source}")
        if target is not None and target != self.target:
            wrong.append(f"target space {self.target}, expected {target}")
        if transform_ids is not None and tuple(transform_ids) != self.transform_ids:
            wrong.append(f"transforms {list(self.transform_ids)}, expected {list(transform_ids)}")
        if wrong:
            raise ChainMismatchError(f"chain file maps {self.source} -> {self.target}: " + "; ".join(wrong))
        return self


def _space_number(value, what: str) -> Optional[int]:
    """A space as an int: ints and digit strings ('4') are accepted; anything else is a TypeError naming it."""
    if value is None or (isinstance(value, (int, np.integer)) and not isinstance(value, bool)):
        return None if value is None else int(value)
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise TypeError(f"{what} must be a version number (int), found {type(value).__name__} {value!r}")


def chain_to_bytes(source: int, target: int, transform_ids: Sequence[str], edges: Sequence[tuple[int, int]],
                   blobs: Sequence[bytes], chain_id: str, library_version: str = "") -> bytes:
    """The export file's bytes: a no-pickle npz of `__meta__` (JSON) and `t0`, `t1`, ... (each transform's bytes,
    in application order). blobs: the registry's parameter bytes, whose SHA-256 the metadata records."""
    if not (len(transform_ids) == len(edges) == len(blobs)) or not blobs:
        raise ValueError("a chain needs one id, edge and parameter blob per transform, at least one")
    loaded = [transform_from_bytes(b) for b in blobs]
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "source": int(source), "target": int(target),
            "dim_in": loaded[0].dim_in, "dim_out": loaded[-1].dim_out, "chain_id": chain_id,
            "library_version": library_version,
            "transforms": [{"id": tid, "edge": [int(e[0]), int(e[1])], "kind": t.kind, "sha256": checksum(b)}
                           for tid, e, t, b in zip(transform_ids, edges, loaded, blobs)]}
    arrays = {"__meta__": np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)}
    arrays.update({f"t{i}": np.frombuffer(b, dtype=np.uint8) for i, b in enumerate(blobs)})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            item = io.BytesIO()
            np.lib.format.write_array(item, arrays[name], allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), item.getvalue())
    return buf.getvalue()


def load_chain(path: Union[str, os.PathLike, bytes], source: Optional[int] = None,
               target: Optional[int] = None) -> Chain:
    """Read an exported chain file (or its bytes): no pickle, every transform's SHA-256 and the dims verified.

    source/target: when given, ChainMismatchError unless the file maps exactly those spaces.
    Raises TransformFormatError for a file that is not a bcemb chain (or a metadata inconsistent with its
    transforms), ChecksumError for a transform whose bytes were altered."""
    data = path if isinstance(path, bytes) else open(path, "rb").read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (ValueError, OSError, KeyError, zipfile.BadZipFile, EOFError, UnicodeDecodeError) as exc:
        raise TransformFormatError(f"not a bcemb chain file ({type(exc).__name__}: {exc})") from exc
    if not isinstance(meta, dict):
        raise TransformFormatError(f"not a bcemb chain file (its metadata is a {type(meta).__name__}, not a mapping)")
    try:
        return _chain_from(meta, arrays).expect(source=source, target=target)
    except (KeyError, TypeError, AttributeError, IndexError) as exc:  # metadata of the wrong shape
        raise TransformFormatError(f"the chain file's metadata is malformed ({type(exc).__name__}: {exc})") from exc


def _chain_from(meta: dict, arrays: dict) -> Chain:
    """The Chain a parsed file describes, after every check: format, count, checksums, composition, dims, and
    metadata consistent with its own transforms (edges from source to target, the chain id of their ids)."""
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise TransformFormatError(f"not a bcemb chain file of format version {FORMAT_VERSION}: "
                                   f"{meta.get('format')!r} {meta.get('format_version')!r}")
    entries = meta.get("transforms") or []
    if len(arrays) != len(entries) or not entries:
        raise TransformFormatError(f"the chain file lists {len(entries)} transform(s) but holds {len(arrays)}")
    transforms = []
    for i, entry in enumerate(entries):
        blob = arrays[f"t{i}"].tobytes() if f"t{i}" in arrays else b""
        if checksum(blob) != entry.get("sha256"):
            raise ChecksumError(f"transform {i} ({entry.get('id')}, edge {entry.get('edge')}) of the chain file has "
                                f"SHA-256 {checksum(blob)[:16]}…, its metadata says {str(entry.get('sha256'))[:16]}…: "
                                "the file was altered; export it again")
        transforms.append(transform_from_bytes(blob))
    try:
        check_chain(transforms)
    except (DimensionMismatchError, ValueError) as exc:
        raise TransformFormatError(f"the chain file's transforms do not compose: {exc}") from exc
    if (transforms[0].dim_in, transforms[-1].dim_out) != (meta.get("dim_in"), meta.get("dim_out")):
        raise TransformFormatError(f"the chain file's metadata says {meta.get('dim_in')} -> {meta.get('dim_out')}, "
                                   f"its transforms map {transforms[0].dim_in} -> {transforms[-1].dim_out}")
    source, target = int(meta["source"]), int(meta["target"])
    edges = [(int(e["edge"][0]), int(e["edge"][1])) for e in entries]
    ids = [str(e["id"]) for e in entries]
    steps = all(k > j for k, j in edges) and all(a[1] == b[0] for a, b in zip(edges, edges[1:]))
    if not steps or edges[0][0] != source or edges[-1][1] != target:
        raise TransformFormatError(f"the chain file says {source} -> {target} but its transforms' edges are "
                                   f"{edges}: the metadata was altered; export it again")
    expected_id = chain_id_of(ids)
    if meta.get("chain_id") != expected_id:
        raise TransformFormatError(f"the chain file's chain id {meta.get('chain_id')!r} is not the id of its "
                                   f"transforms {ids} ({expected_id}): the metadata was altered; export it again")
    return Chain(source, target, transforms[0].dim_in, transforms[-1].dim_out, expected_id, tuple(ids),
                 tuple(e["sha256"] for e in entries), tuple(transforms))


def register_sql_function(spark, cfg, name: str = "bc_to_space") -> list[tuple[int, int]]:
    """Register `name(vector, source, target)` as a Spark SQL function mapping a vector of version `source` into
    space `target` through the registry's active chain (the same kernel as the backfill), for analysts who must
    map a vector that is not in the output table yet: `SELECT bc_to_space(vector, 4, 2) FROM new_items`.

    Every (source, target) pair of configured versions whose chain is active is served; returns those pairs.
    The function returns null for a null vector; a pair without an active chain or a vector of another dimension
    fails the query naming it (ChainMismatchError / DimensionMismatchError). The chains are read once, now:
    register again after a refit. `name` must be an identifier."""
    import re

    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    from bclib.errors import RegistryError
    from bclib.numerics.records import chain_records
    from bclib.tables.registry import active_transforms

    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"SQL function name must be an identifier, found {name!r}")
    active = active_transforms(spark, cfg.registry_location)
    versions = sorted(cfg.embeddings.versions)
    chains: dict[tuple[int, int], list[Transform]] = {}
    for s in versions:
        for j in (v for v in versions if v < s):
            try:
                chains[(s, j)] = [r.transform for r in chain_records(active, versions, s, j)]
            except RegistryError:
                continue

    def to_space(vectors, sources, targets):
        out = pd.Series([None] * len(vectors), dtype=object)
        pairs = pd.DataFrame({"s": sources, "j": targets})
        pairs = pairs[pairs["s"].notna() & pairs["j"].notna()]  # a null version or space gives null
        for (s, j), rows in pairs.groupby(["s", "j"]).groups.items():
            if (int(s), int(j)) not in chains:
                raise ChainMismatchError(f"no active chain from version {s} to space {j}; served pairs: "
                                         f"{sorted(chains)}")
            chain = chains[(int(s), int(j))]
            idx = [i for i in rows if vectors.iloc[i] is not None]
            if not idx:
                continue
            found = sorted({len(vectors.iloc[i]) for i in idx} - {chain[0].dim_in})
            if found:
                raise DimensionMismatchError(f"{name}: version {int(s)} vectors have dimension {chain[0].dim_in}, "
                                             f"found dimension(s) {found}")
            x = np.stack([np.asarray(vectors.iloc[i], dtype=np.float32) for i in idx])
            y = MultiSpaceKernel(chain[0].dim_in, {int(j): chain})(x)[int(j)]
            for k, i in enumerate(idx):
                out.iloc[i] = y[k]
        return out

    to_space.__annotations__ = {"vectors": pd.Series, "sources": pd.Series, "targets": pd.Series,
                                "return": pd.Series}  # real types: this module's hints are strings
    spark.udf.register(name, pandas_udf(to_space, "array<float>"))
    return sorted(chains)
