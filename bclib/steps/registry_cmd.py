"""`bcemb registry list|show|retire|activate|import|verify`: the registry as an operator sees it.

Each change is one Delta commit on the registry with the actor and reason in userMetadata
(`bclib.tables.registry`). Listing joins each transform with its latest gate verdict (metrics table).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from bclib.config import JobConfig
from bclib.errors import ChecksumError, DimensionMismatchError, RegistryError
from bclib.numerics.records import TransformRecord
from bclib.numerics.serialization import checksum, transform_from_bytes
from bclib.tables import registry
from bclib.tables.embeddings import read_embedding_version
from bclib.tables.metrics_table import gate_verdicts
from bclib.tables.lease import leased

log = logging.getLogger(__name__)


@dataclass
class RegistryResult:
    """What a registry command did or found: rows to print (and their JSON), and whether it committed."""

    action: str
    rows: list[dict] = field(default_factory=list)
    committed: bool = False
    problems: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        if self.action == "verify":
            return (f"registry verify: {len(self.rows)} transform(s) checked, "
                    + ("all checksums match" if not self.problems else f"{len(self.problems)} FAILED"))
        if self.action == "export":
            r = self.rows[0]
            return (f"export: chain {r['source']} -> {r['space']} ({r['chain_id']}: {', '.join(r['transforms'])}; "
                    f"{r['dim_in']} -> {r['dim_out']}) written to {r['file']} (sha256 {r['sha256'][:16]}…)")
        return f"registry {self.action}: " + ("one commit" if self.committed else "nothing committed")


def _describe(rec: TransformRecord, verdict: Optional[dict]) -> dict:
    gate = "-"
    if verdict:
        gate = "passed" if verdict["passed"] else "rejected"
    return {
        "edge": f"{rec.source_version}->{rec.target_version}", "transform_id": rec.transform_id, "kind": rec.kind,
        "objective": rec.objective, "origin": rec.origin, "status": rec.status,
        "created_at": rec.created_at.isoformat(sep=" ", timespec="seconds") + "Z" if rec.created_at else None,
        "retired_at": rec.retired_at.isoformat(sep=" ", timespec="seconds") + "Z" if rec.retired_at else None,
        "dims": f"{rec.transform.dim_in}->{rec.transform.dim_out}", "sample_size": rec.sample_size,
        "holdout_relative_l2": rec.fit_metrics.get("holdout_relative_l2"),
        "holdout_baseline_relative_l2": rec.fit_metrics.get("holdout_baseline_relative_l2"),
        "gate": gate, "gate_detail": verdict,
    }


def registry_list(spark, cfg: JobConfig) -> RegistryResult:
    """Every transform, newest edge first, with its latest gate verdict (checksums not required to match)."""
    verdicts = gate_verdicts(spark, cfg.metrics_location)
    recs = registry.read_records(spark, cfg.registry_location, verify=False)
    recs.sort(key=lambda r: (-r.source_version, r.status != "active", -(r.created_at.timestamp() if r.created_at else 0)))
    return RegistryResult("list", [_describe(r, verdicts.get(r.transform_id)) for r in recs])


def format_list(rows: list[dict]) -> str:
    """The table `bcemb registry list` prints."""
    cols = [("edge", 6), ("transform_id", 24), ("kind", 10), ("objective", 17), ("origin", 7), ("status", 7),
            ("created_at", 21), ("holdout_relative_l2", 8), ("gate", 8)]
    names = {"holdout_relative_l2": "fit_l2"}
    head = " ".join(f"{names.get(c, c):<{w}}" for c, w in cols)
    lines = [head, "-" * len(head)]
    for r in rows:
        vals = []
        for c, w in cols:
            v = r.get(c)
            v = "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
            vals.append(f"{v:<{w}}")
        lines.append(" ".join(vals))
    return "\n".join(lines)


def registry_show(spark, cfg: JobConfig, transform_id: str) -> RegistryResult:
    """One transform with every field, its checksum status, fit config and metrics."""
    rec = registry.get_record(spark, cfg.registry_location, transform_id, verify=False)
    row = _describe(rec, gate_verdicts(spark, cfg.metrics_location).get(transform_id))
    try:
        transform_from_bytes(rec.parameters, rec.stored_checksum)
        row["checksum_ok"] = True
    except ChecksumError:
        row["checksum_ok"] = False
    row.update({"checksum": rec.stored_checksum, "fit_config": rec.fit_config, "fit_metrics": rec.fit_metrics,
                "input_delta_versions": rec.input_delta_versions, "library_version": rec.library_version,
                "meta": rec.transform.meta})
    return RegistryResult("show", [row])


@leased("registry retire")
def registry_retire(spark, cfg: JobConfig, transform_id: str, reason: str = "", actor: Optional[str] = None):
    return RegistryResult("retire", committed=registry.retire(spark, cfg.registry_location, transform_id, actor,
                                                              reason or "bcemb registry retire"))


@leased("registry activate")
def registry_activate(spark, cfg: JobConfig, transform_id: str, reason: str = "", actor: Optional[str] = None):
    return RegistryResult("activate", committed=registry.activate(spark, cfg.registry_location, transform_id, actor,
                                                                  reason or "bcemb registry activate"))


def registry_verify(spark, cfg: JobConfig) -> RegistryResult:
    """Every stored checksum; `problems` lists (id, what is wrong)."""
    problems = registry.verify_registry(spark, cfg.registry_location)
    ids = [r.transform_id for r in registry.read_records(spark, cfg.registry_location, verify=False)]
    return RegistryResult("verify", [{"transform_id": i, "ok": i not in dict(problems)} for i in ids],
                          problems=problems)


def _version_dim(spark, cfg: JobConfig, version: int) -> Optional[int]:
    """The majority vector length of a version's first rows, or None when its table does not exist."""
    from pyspark.sql import functions as F

    from bclib.tables.delta import table_exists

    if not table_exists(spark, cfg.version_location(version)):
        return None
    df = read_embedding_version(spark, cfg, version).df
    sizes = df.limit(1000).groupBy(F.size("vector").alias("n")).count().collect()
    return max(sizes, key=lambda r: r["count"]).n if sizes else None


@leased("registry import")
def registry_import(spark, cfg: JobConfig, path: str, source: int, target: int, expected_checksum: Optional[str] = None,
                    reason: str = "", actor: Optional[str] = None, origin: str = "import") -> RegistryResult:
    """Register a transform file (npz bytes as `export_bytes` writes them) as the edge source -> target.

    Verified first: the bytes parse without pickle, match `expected_checksum` when given, and their
    dimensions match the two versions' tables where those exist. The edge's current transform is
    retired in the same commit. Raises ChecksumError, TransformFormatError, DimensionMismatchError,
    RegistryError (not an edge of the configured versions).
    """
    versions = sorted(cfg.embeddings.versions)
    if source not in versions or target not in versions or versions.index(source) != versions.index(target) + 1:
        raise RegistryError(f"{source} -> {target} is not an edge of the configured versions {versions} "
                            "(an edge goes from a version to the one before it)")
    data = Path(path).read_bytes()
    transform = transform_from_bytes(data, expected_checksum)
    for version, dim, side in ((source, transform.dim_in, "input"), (target, transform.dim_out, "output")):
        found = _version_dim(spark, cfg, version)
        if found is not None and found != dim:
            raise DimensionMismatchError(
                f"{path}: the transform's {side} dimension is {dim} but version {version}'s vectors have {found}")
    digest = checksum(data)
    tid = hashlib.sha256(f"{origin}|{source}->{target}|{digest}".encode()).hexdigest()[:24]
    meta = transform.meta or {}
    record = TransformRecord(
        transform_id=tid, source_version=source, target_version=target, kind=transform.kind,
        objective=str(meta.get("objective", "imported")), transform=transform,
        fit_config={"imported_from": str(path), "meta": meta}, origin=origin,
    )
    committed = registry.register(spark, cfg.registry_location, [record], actor=actor,
                                  reason=reason or f"bcemb registry import {path}")
    log.info("registry import: %s as %s (%d -> %d, %s)", path, tid, source, target, transform.kind)
    return RegistryResult("import", [{"transform_id": tid, "edge": f"{source}->{target}", "checksum": digest}],
                          committed=bool(committed))


def to_json(result: RegistryResult) -> str:
    return json.dumps(result.rows if result.action != "show" else result.rows[0], indent=2, default=str)


def export_path(output: str) -> Path:
    """The file `bcemb export --output` writes, checked before anything runs: ConfigError for an empty name,
    a name ending in '/', '.' or '..', or an existing directory (a chain file is one file)."""
    from bclib.errors import ConfigError

    text = str(output)
    path = Path(text)
    if not text.strip() or text.endswith(("/", os.sep)) or path.name in ("", ".", "..") or path.is_dir():
        raise ConfigError(f"--output {text!r} is a directory or has no file name: give the chain file's path, "
                          "e.g. --output chains/4_to_2.bcemb")
    return path


def export_chain(spark, cfg: JobConfig, source: Optional[int], space: int, output: str) -> RegistryResult:
    """`bcemb export`: the active chain `source` (default: the newest configured version) -> `space` as one chain
    file (`bclib.serving`), written atomically (a temporary file renamed). Its rows: the chain's id, transforms
    and dims. Raises RegistryError when an edge of the chain has no active transform, ConfigError for an
    --output that is no file name (`export_path`)."""

    from bclib import __version__
    from bclib.numerics.records import chain_id, chain_records
    from bclib.serving import chain_to_bytes, load_chain

    src = cfg.source_version if source is None else int(source)
    records = chain_records(registry.active_transforms(spark, cfg.registry_location), cfg.embeddings.versions,
                            src, int(space))
    data = chain_to_bytes(src, int(space), [r.transform_id for r in records], [r.edge for r in records],
                          [r.parameters for r in records], chain_id(records), __version__)
    chain = load_chain(data, source=src, target=int(space))  # what a consumer will read back, checked first
    path = export_path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        partial.write_bytes(data)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)  # gone after the rename; a failed write leaves nothing behind
    row = {"file": str(path), "source": src, "space": int(space), "chain_id": chain.chain_id,
           "transforms": list(chain.transform_ids), "dim_in": chain.dim_in, "dim_out": chain.dim_out,
           "sha256": checksum(data)}
    log.info("export: chain %d -> %d (%s, %d transform(s)) written to %s", src, space, chain.chain_id,
             len(records), path)
    return RegistryResult("export", [row])
