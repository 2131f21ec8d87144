"""The backfill's plan, decided on the driver before anything is read in bulk: chains, kernel, per-space action.

    plan_backfill(spark, cfg)        registry -> verified chains -> MultiSpaceKernel
    decide(state, desired, ...)      per space: skip (up to date) | incremental (source changed) | full
    merge_touched_share(c, F)        the share of F files a MERGE of c changed ids rewrites (auto's cost rule)
    txn_id(...)                      the Delta transaction id of one commit (exactly-once)

Pure but for `plan_backfill`, which reads the registry.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

from bclib.config import JobConfig
from bclib.numerics.kernel import MultiSpaceKernel
from bclib.numerics.records import TransformRecord, chain_id, chain_records
from bclib.tables.output import OutputState
from bclib.tables.registry import active_transforms

SKIP, INCREMENTAL, FULL = "skip", "incremental", "full"


@dataclass(frozen=True)
class BackfillPlan:
    """Everything the write needs, decided on the driver: the source version, the spaces and their chains."""

    source_version: int
    spaces: list[int]
    chains: dict[int, list[TransformRecord]]
    kernel: MultiSpaceKernel

    @property
    def chain_ids(self) -> dict[int, str]:
        return {s: chain_id(c) for s, c in self.chains.items()}

    @property
    def dims_out(self) -> list[int]:
        return [self.kernel.dims[s] for s in self.spaces]

    def restricted(self, spaces: list[int]) -> "BackfillPlan":
        """The same plan for a subset of its spaces (its own fused kernel)."""
        chains = {s: self.chains[s] for s in spaces}
        kernel = MultiSpaceKernel(self.kernel.dim_in, {s: [r.transform for r in c] for s, c in chains.items()})
        return BackfillPlan(self.source_version, sorted(spaces), chains, kernel)


def plan_backfill(spark, cfg: JobConfig) -> BackfillPlan:
    """The active chains from the registry, verified (checksums, edges that compose), and their fused kernel.

    One chain per target space `cfg.target_spaces`, from `cfg.source_version` down (`records.chain_records`).
    Raises RegistryError when an edge of a chain is not registered, ChecksumError when a stored transform does
    not match its checksum.
    """
    active = active_transforms(spark, cfg.registry_location)
    source = cfg.source_version
    chains = {s: chain_records(active, cfg.embeddings.versions, source, s) for s in cfg.target_spaces}
    dim_in = chains[max(chains)][0].transform.dim_in
    kernel = MultiSpaceKernel(dim_in, {s: [r.transform for r in c] for s, c in chains.items()})
    return BackfillPlan(source, sorted(chains), chains, kernel)


def decide(state: OutputState, desired: dict[int, dict], incremental: str, force: bool) -> dict[int, tuple[str, str]]:
    """Per space: (skip | incremental | full, why). Pure: the output's state against what it should hold."""
    out = {}
    for j, want in sorted(desired.items()):
        cur = state.space(j)
        if not state.exists:
            out[j] = (FULL, "the output table does not exist yet")
        elif state.foreign:
            out[j] = (FULL, f"the output's last commit that changed rows ({state.operation or 'unknown'}; table "
                            f"at Delta v{state.delta_version}) was not written by bcemb")
        elif cur is None:
            out[j] = (FULL, "the space is not in the output yet")
        elif force:
            out[j] = (FULL, "backfill.force")
        elif cur == want:
            out[j] = (SKIP, f"up to date: source Delta v{want['source_delta_version']}, chain {want['chain_id']}")
        elif cur.get("chain_id") != want["chain_id"] or cur.get("transforms") != want["transforms"]:
            out[j] = (FULL, f"chain changed: {cur.get('chain_id')} -> {want['chain_id']}")
        elif (cur.get("source_location"), cur.get("source_version")) != (want["source_location"], want["source_version"]):
            out[j] = (FULL, f"source changed: version {cur.get('source_version')} -> {want['source_version']}")
        elif int(cur.get("source_delta_version", -1)) > want["source_delta_version"]:
            out[j] = (FULL, f"the source table went back from Delta v{cur['source_delta_version']} to "
                            f"v{want['source_delta_version']}")
        elif incremental == "off":
            out[j] = (FULL, "source changed and backfill.incremental is off")
        else:
            out[j] = (INCREMENTAL, f"source Delta v{cur['source_delta_version']} -> v{want['source_delta_version']}")
    return out


def txn_id(location: str, mode: str, plan: BackfillPlan, state: OutputState, delta_version: int) -> tuple[str, int]:
    """Delta transaction id of one commit: (app id of output + spaces + chains + base version, source version)."""
    key = json.dumps([location, mode, plan.spaces, plan.chain_ids, state.delta_version], sort_keys=True, default=str)
    return "bcemb-" + hashlib.sha256(key.encode()).hexdigest()[:32], int(delta_version)


# auto: rewrite in full when a MERGE into an output without deletion vectors would rewrite more than this
# share of the spaces' files anyway (it would then cost more than a full rewrite: it also joins)
MERGE_MAX_TOUCHED_SHARE = 0.5


def merge_touched_share(changed_ids: int, files: float) -> float:
    """Expected share of `files` equal files holding at least one of `changed_ids` ids spread over them.

    1 - (1 - 1/F)^c ~= 1 - exp(-c / F) (each id falls in one of F files uniformly: ids are not clustered by
    arrival in an embedding table). Pure; F < 1 counts as 1.
    """
    files = max(1.0, float(files))
    return -math.expm1(-max(0, changed_ids) / files)
