"""Driver-side samples of one embedding version and their pairing by id (pure numpy)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Sample:
    """A sample on the driver, sorted by id.

    ids: (n,) int64 or object (strings); vectors: (n, d) float32 (or, for label samples, (n,) labels);
    hashes: (n,) float64 in [0, 1), the id's deterministic hash (`bclib.tables.embeddings.hash_unit`).
    """

    ids: np.ndarray
    vectors: np.ndarray
    hashes: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, mask: np.ndarray) -> "Sample":
        """The rows where `mask` (bool, (n,)) is True, still sorted by id."""
        return Sample(self.ids[mask], self.vectors[mask], self.hashes[mask])


def align_samples(a: Sample, b: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a and b for ids present in both: (ids, Xa, Xb, hashes of a), sorted by id."""
    ids, ia, ib = np.intersect1d(a.ids, b.ids, assume_unique=True, return_indices=True)
    return ids, a.vectors[ia], b.vectors[ib], a.hashes[ia]
