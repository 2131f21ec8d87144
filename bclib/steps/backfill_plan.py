"""The backfill's plan, decided on the driver before anything is read in bulk: chains, kernel, per-space action.

    plan_backfill(spark, cfg)        registry -> verified chains -> MultiSpaceKernel
    decide(state, desired, ...)      per space: skip (up to date) | incremental (source changed) | full
    merge_touched_share(c, F)        the share of F files a MERGE of c changed ids rewrites (auto's cost rule)
    auto_choice(...)                 auto's incremental/full choice by the cost model (estimate_full,
                                     estimate_incremental, prefer_incremental), calibrated by the benchmarks
    txn_id(...)                      the Delta transaction id of one commit (exactly-once)

Pure but for `plan_backfill`, which reads the registry.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Optional

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


@dataclass(frozen=True)
class CostModel:
    """Seconds of a backfill, linear in what each path touches; auto compares the two (`prefer_incremental`).

    The incremental path has two commits (`steps.backfill._commit_changes`): INSERT REPLACE ON (`replace_*`: a
    broadcast semi join over the output's ids, then a plain append) and the MERGE (`merge_*`: three joins, one
    of which shuffles the output's ids). Calibrated on the benchmark machine (2 cores, d = 256, 4 spaces, the
    arrow engine's full rewrite, an output with deletion vectors) by least squares over every size and changed
    share measured with the same code on 2026-12-07: `benchmarks/results/incremental_slope.json` (1M, 2M and 4M
    rows at 1 % changed), `incremental.json` (2M rows at 0.1 %, 1 % and 10 % changed, the MERGE measured beside)
    and `incremental_small.json` (20,000 rows at 1 %, the MERGE beside); every point within 18 % of its model
    (the MERGE's terms rest on its four points: 2M rows and 20,000). `incremental_no_dv.json` (1M rows, no
    deletion vectors: a MERGE that touches every file took 4.6x the full rewrite) sets `copy_on_write`, as that
    ratio. A cluster scales the per-row terms of both paths alike, so the choice holds there; the fixed terms
    are this machine's."""

    full_fixed_s: float = 1.50  # listing, checks, planning, the commit
    full_s_per_million_row_spaces: float = 2.10  # 8.4 s per million rows / 4 spaces, at d = 256 (scales with d)
    replace_fixed_s: float = 3.61  # state, the change feed, checks, the commit
    replace_s_per_million_row_spaces: float = 0.095  # the removal's scan of the output's ids (a broadcast probe)
    replace_s_per_changed_space: float = 12.6e-6  # per changed id and space, at d = 256 (scales with d)
    merge_fixed_s: float = 3.58  # state, the change feed, checks, MERGE planning, the commit
    merge_s_per_million_row_spaces: float = 0.521  # the MERGE's scans and its shuffled join of the output's ids
    merge_s_per_changed_space: float = 20.6e-6  # per changed id and space, at d = 256 (scales with d)
    copy_on_write: float = 4.6  # no deletion vectors: a touched file costs this many times its full rewrite


COST_MODEL = CostModel()
# estimates within this fraction, or these seconds, of each other are a tie, and a tie goes to the incremental
# path: it writes only what changed (less storage, a shorter history to vacuum, a change feed of the output that
# names only the changed rows). On small tables both paths are a few seconds of fixed cost (20,000 rows: 3.3 s
# incremental, 1.4 s full), which a daily job does not feel; a billion-row table is decided by the relative margin.
COST_TIE = 0.10
COST_TIE_SECONDS = 5.0


def estimate_full(rows: int, spaces: int, dim: int, model: CostModel = COST_MODEL) -> float:
    """Seconds of a full rewrite of `spaces` spaces from `rows` source rows of dimension `dim` (`CostModel`)."""
    return model.full_fixed_s + model.full_s_per_million_row_spaces * rows / 1e6 * spaces * dim / 256


def estimate_incremental(rows: int, spaces: int, dim: int, changed: int, deletion_vectors: bool,
                         touched_share: float = 1.0, model: CostModel = COST_MODEL, replace: bool = True) -> float:
    """Seconds of committing `changed` ids into `spaces` spaces of a `rows`-row output (`CostModel`), with
    INSERT REPLACE ON (`replace`, which needs deletion vectors) or the MERGE. Without deletion vectors the
    MERGE also rewrites `touched_share` of the spaces' files (`merge_touched_share`), each at `copy_on_write`
    times what the full rewrite pays for it."""
    replace = replace and deletion_vectors
    fixed, per_row, per_change = ((model.replace_fixed_s, model.replace_s_per_million_row_spaces,
                                   model.replace_s_per_changed_space) if replace else
                                  (model.merge_fixed_s, model.merge_s_per_million_row_spaces,
                                   model.merge_s_per_changed_space))
    seconds = fixed + per_row * rows / 1e6 * spaces + per_change * changed * spaces * dim / 256
    if not deletion_vectors:
        seconds += touched_share * model.copy_on_write * (estimate_full(rows, spaces, dim, model) - model.full_fixed_s)
    return seconds


def prefer_incremental(incremental_s: float, full_s: float, tie: float = COST_TIE,
                       tie_seconds: float = COST_TIE_SECONDS) -> bool:
    """auto's choice: the incremental path unless the full rewrite is estimated cheaper by more than `tie` (a
    fraction) and by more than `tie_seconds`."""
    return incremental_s <= full_s * (1.0 + tie) or incremental_s - full_s <= tie_seconds


def auto_choice(rows: int, spaces: int, dim: int, changed: int, deletion_vectors: bool, files_per_space: float,
                max_fraction: Optional[float] = None, replace: bool = True) -> tuple[str, str]:
    """auto's choice for `spaces` incremental spaces: (INCREMENTAL or FULL, why, with both estimates);
    `replace`: the change set would be committed with INSERT REPLACE ON (else the MERGE).

    FULL when more than `max_fraction` (None: no cap) of the `rows` changed, when without deletion vectors the
    `changed` ids would touch more than MERGE_MAX_TOUCHED_SHARE of the `files_per_space` files (a copy-on-write
    MERGE rewrites them and joins), or when the full rewrite is estimated cheaper beyond the tie margin."""
    share = 1.0 if deletion_vectors else merge_touched_share(changed, files_per_space)
    full_s = estimate_full(rows, spaces, dim)
    incremental_s = estimate_incremental(rows, spaces, dim, changed, deletion_vectors, share, replace=replace)
    facts = (f"{changed} changed ids of {rows} rows, {spaces} space(s) of dimension {dim}, "
             + ("deletion vectors" if deletion_vectors else f"no deletion vectors: ~{share:.0%} of the files touched"))
    how = "REPLACE ON" if replace and deletion_vectors else "MERGE"
    estimate = f"estimated {incremental_s:.1f} s incremental ({how}) against {full_s:.1f} s full ({facts})"
    if max_fraction is not None and changed > max_fraction * rows:
        return FULL, f"{changed} changed rows > backfill.incremental_max_fraction ({max_fraction:g}) of {rows}; {estimate}"
    if not deletion_vectors and share > MERGE_MAX_TOUCHED_SHARE:
        return FULL, (f"the output has no deletion vectors, so a MERGE would rewrite ~{share:.0%} of the spaces' "
                      f"files: a full rewrite is cheaper ({estimate}; backfill.deletion_vectors: true lets a MERGE "
                      "cost what changed)")
    if not prefer_incremental(incremental_s, full_s):
        return FULL, f"a full rewrite is cheaper: {estimate}"
    if incremental_s > full_s:
        return INCREMENTAL, (f"{estimate}: a tie (within {COST_TIE:.0%} or {COST_TIE_SECONDS:g} s), and a tie "
                             "goes incremental: it writes only what "
                             "changed (set backfill.incremental_max_fraction to cap the changed share)")
    return INCREMENTAL, estimate
