"""A fitted transform with its provenance: what one registry row holds, as plain Python (no Spark).

`bclib.tables.registry` stores and loads these; `AlignmentLoss.export` (joint training) and the fit
step create them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional, Sequence

from bclib import __version__
from bclib.errors import RegistryError
from bclib.numerics.serialization import checksum, transform_to_bytes
from bclib.numerics.transforms import Transform


ORIGINS = ("posthoc", "joint", "import")


@dataclass
class TransformRecord:
    """One registry row, with its parsed transform.

    transform_id: content id (hex); source_version -> target_version: the edge (version k -> k-1);
    kind/objective: family and objective names; fit_config: JSON-able settings; sample_size: pairs
    fitted on; input_delta_versions: table location -> Delta version read; fit_metrics: name -> value.
    """

    transform_id: str
    source_version: int
    target_version: int
    kind: str
    objective: str
    transform: Transform
    fit_config: dict = field(default_factory=dict)
    sample_size: int = 0
    input_delta_versions: dict = field(default_factory=dict)
    fit_metrics: dict = field(default_factory=dict)
    created_at: Optional[datetime] = None
    library_version: str = __version__
    status: str = "active"
    stored_checksum: Optional[str] = None  # set when loaded from the registry (verified there)
    origin: str = "posthoc"  # posthoc (bcemb fit) | joint (AlignmentLoss.export) | import (a file)
    retired_at: Optional[datetime] = None

    @property
    def checksum(self) -> str:
        """SHA-256 of the parameter bytes: the registry's verified value, or computed."""
        return self.stored_checksum or checksum(self.parameters)

    @property
    def edge(self) -> tuple[int, int]:
        return (self.source_version, self.target_version)

    @property
    def parameters(self) -> bytes:
        """The transform as registry bytes (npz, no pickle; deterministic for the same arrays)."""
        return transform_to_bytes(self.transform)


def chain_id(records: Sequence[TransformRecord]) -> str:
    """A stable id for a chain: the first 16 hex digits of SHA-256 over its transform ids in order."""
    return chain_id_of([r.transform_id for r in records])


def chain_id_of(transform_ids: Sequence[str]) -> str:
    """`chain_id` from the transform ids alone (application order), e.g. for a chain file's metadata."""
    return hashlib.sha256("|".join(transform_ids).encode()).hexdigest()[:16]


def chain_records(
    active: dict[tuple[int, int], TransformRecord], versions: Sequence[int], source: int, target: int,
) -> list[TransformRecord]:
    """Records of the chain source -> target over consecutive configured versions, in application order."""
    ordered = sorted(versions)
    if source not in ordered or target not in ordered or target >= source:
        raise RegistryError(f"no chain from version {source} to {target} among versions {ordered}")
    chain = []
    i = ordered.index(source)
    while ordered[i] != target:
        edge = (ordered[i], ordered[i - 1])
        if edge not in active:
            raise RegistryError(
                f"no active transform for edge {edge[0]} -> {edge[1]} in the registry; run `bcemb fit` first"
            )
        chain.append(active[edge])
        i -= 1
    return chain
