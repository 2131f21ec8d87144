"""The fit step: pin input versions, sample, fit every edge on the driver, register (one commit).

Sampling is one scan per version table with a hash filter inside the scan; the samples meet on the
driver (a sorted-id intersection), so no shuffle and no Spark join. Edges are fitted oldest first so
multi-step objectives can use the already fitted (frozen) earlier transforms.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass, field

from bclib import __version__
from bclib.config import JobConfig
from bclib.numerics.fitting import fit_one_edge
from bclib.numerics.records import TransformRecord
from bclib.tables.embeddings import read_versions, sample_versions
from bclib.tables.registry import active_transforms, register

log = logging.getLogger(__name__)

FIT_WINDOW_END = 0.5  # fit samples hash in [0, 0.5); evaluation in [0.5, 1)


@dataclass
class FitResult:
    """What `run_fit` did: every edge's record (fitted or kept), which edges it fitted, which it kept."""

    records: list[TransformRecord]
    fitted: list[tuple[int, int]] = field(default_factory=list)
    kept: list[tuple[int, int]] = field(default_factory=list)
    committed: list[str] = field(default_factory=list)  # transform ids the registry commit activated
    seconds: float = 0.0

    def summary(self) -> str:
        return (f"fit: {len(self.records)} edge(s): fitted {self.fitted or 'none'}, kept {self.kept or 'none'}; "
                f"{len(self.committed)} transform(s) activated in {self.seconds:.1f}s")


def _transform_id(edge: tuple[int, int], cfg: JobConfig, inputs: dict[str, int], frozen_ids: list[str]) -> str:
    """Content id of a fit: what was fitted, how, on which data and after which frozen transforms."""
    payload = json.dumps({
        "edge": edge, "transform": asdict(cfg.transform), "fit": asdict(cfg.fit),
        "inputs": inputs, "frozen": frozen_ids, "library": __version__,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def run_fit(spark, cfg: JobConfig) -> FitResult:
    """Fit B_k for every consecutive pair of configured versions and register them (one commit)."""
    started = time.time()
    reads = read_versions(spark, cfg)
    versions = sorted(reads)
    samples, _ = sample_versions(reads, cfg.fit.salt, cfg.fit.sample_size, 0.0, FIT_WINDOW_END)
    existing = active_transforms(spark, cfg.registry_location)
    result = FitResult(records=[])
    fitted: dict[int, TransformRecord] = {}  # by source version, the records this run will activate
    multi = cfg.transform.objective != "single_step"
    for i in range(1, len(versions)):
        k, prev = versions[i], versions[i - 1]
        edge = (k, prev)
        frozen_ids = [fitted[versions[m]].transform_id for m in range(i - 1, 0, -1)] if multi else []
        used = versions[: i + 1] if multi else [prev, k]  # the tables this edge's fit reads
        inputs = {reads[v].location: reads[v].delta_version for v in used}
        tid = _transform_id(edge, cfg, inputs, frozen_ids)
        if edge in existing and existing[edge].transform_id == tid:
            log.info("fit: edge %d -> %d up to date (transform %s), not refitted", k, prev, tid)
            fitted[k] = existing[edge]
            result.records.append(existing[edge])
            result.kept.append(edge)
            continue
        transform, metrics = fit_one_edge(
            samples, versions, i, {v: r.transform for v, r in fitted.items()}, cfg.transform, cfg.fit,
        )
        record = TransformRecord(
            transform_id=tid, source_version=k, target_version=prev, kind=cfg.transform.kind,
            objective=cfg.transform.objective, transform=transform,
            fit_config={"transform": asdict(cfg.transform), "fit": asdict(cfg.fit), "frozen": frozen_ids},
            sample_size=int(metrics["train_rows"]), input_delta_versions=inputs, fit_metrics=metrics,
        )
        fitted[k] = record
        result.records.append(record)
        result.fitted.append(edge)
    result.committed = register(spark, cfg.registry_location, result.records)
    result.seconds = time.time() - started
    log.info("fit: %d edge(s) done in %.1fs", len(result.records), result.seconds)
    return result
