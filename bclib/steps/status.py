"""`bcemb status`: per target space, what the registry says it should be and what the output holds.

Reads only metadata: the registry's active rows, the output's last commit that changed rows (VACUUM,
OPTIMIZE looked through) and its rows per space
(file footers), the source table's current Delta version, the metrics table's gate verdicts.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from typing import Optional

from bclib.config import JobConfig
from bclib.errors import RegistryError
from bclib.numerics.records import chain_id, chain_records
from bclib.tables.delta import commits, current_delta_version, table_exists
from bclib.tables.metrics_table import gate_verdicts, unreadable_spaces
from bclib.tables.output import read_output_state, space_rows
from bclib.tables.registry import active_transforms

log = logging.getLogger(__name__)


@dataclass
class SpaceStatus:
    space: int
    active_chain: Optional[str]  # the registry's chain source -> space (None: an edge has no active transform)
    transforms: list[str]
    gate: str  # passed | rejected | - (never gated)
    output_chain: Optional[str]
    output_source_version: Optional[int]
    output_source_delta_version: Optional[int]
    source_delta_version: Optional[int]  # the source table's current Delta version
    rows: int
    state: str  # current | stale (...) | missing | unknown (...)


@dataclass
class StatusResult:
    source_version: int
    spaces: list[SpaceStatus] = field(default_factory=list)
    output_delta_version: Optional[int] = None
    last_run_id: Optional[str] = None
    last_run_at: Optional[str] = None
    last_operation: Optional[str] = None

    @property
    def current(self) -> bool:
        return all(s.state == "current" for s in self.spaces)

    def summary(self) -> str:
        stale = [s.space for s in self.spaces if s.state != "current"]
        return (f"status: spaces {[s.space for s in self.spaces]} from version {self.source_version}: "
                + ("all current" if not stale else f"not current: {stale}")
                + (f"; last run {self.last_run_id} at {self.last_run_at}" if self.last_run_id else ""))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, default=str)

    def table(self) -> str:
        head = (f"{'space':>5} {'active chain':<16} {'gate':<8} {'output chain':<16} {'src v':>5} {'src Delta':>9} "
                f"{'now':>5} {'rows':>10}  state")
        lines = [head, "-" * len(head)]
        for s in self.spaces:
            lines.append(f"{s.space:>5} {s.active_chain or '-':<16} {s.gate:<8} {s.output_chain or '-':<16} "
                         f"{'-' if s.output_source_version is None else s.output_source_version:>5} "
                         f"{'-' if s.output_source_delta_version is None else s.output_source_delta_version:>9} "
                         f"{'-' if s.source_delta_version is None else s.source_delta_version:>5} "
                         f"{s.rows:>10}  {s.state}")
        return "\n".join(lines)


def run_status(spark, cfg: JobConfig) -> StatusResult:
    """Per configured target space: active chain, gate verdict, output lineage against the source's version."""
    source_v = cfg.source_version
    src_loc = cfg.version_location(source_v)
    src_delta = current_delta_version(spark, src_loc) if table_exists(spark, src_loc) else None
    active = active_transforms(spark, cfg.registry_location)
    verdicts = gate_verdicts(spark, cfg.metrics_location)
    unreadable = unreadable_spaces(spark, cfg.metrics_location)
    state = read_output_state(spark, cfg.output_location, cfg.object_store_options or None)
    rows = space_rows(spark, cfg.output_location, cfg.object_store_options or None) if state.exists else {}
    result = StatusResult(source_v, output_delta_version=state.delta_version)
    if state.exists:
        last = commits(spark, cfg.output_location, 1, cfg.object_store_options or None)[0]
        result.last_run_at = last.timestamp.isoformat(sep=" ", timespec="seconds") + "Z"
        result.last_operation = last.operation
        result.last_run_id = (state.lineage or {}).get("run_id")
    for j in cfg.target_spaces:
        try:
            records = chain_records(active, cfg.embeddings.versions, source_v, j)
            active_chain, tids = chain_id(records), [r.transform_id for r in records]
        except RegistryError:
            active_chain, tids = None, []
        gate = "-"
        if tids and all(t in verdicts for t in tids):
            gate = "passed" if all(verdicts[t]["passed"] for t in tids) else "rejected"
        cur = state.space(j) or {}
        out_chain = cur.get("chain_id")
        out_delta = cur.get("source_delta_version")
        if not state.exists or (not state.foreign and not cur):
            verdict = "missing"
        elif state.foreign:
            verdict = (f"unknown (the output's last commit that changed rows is a {state.operation} "
                       "not written by bcemb)")
        elif active_chain is None:
            verdict = "stale (an edge of the chain has no active transform)"
        elif out_chain != active_chain:
            verdict = "stale (chain changed: the active chain is fitted but not published yet)"
        elif cur.get("source_version") != source_v:
            verdict = f"stale (holds version {cur.get('source_version')})"
        elif src_delta is not None and out_delta is not None and src_delta > out_delta:
            verdict = f"stale by {src_delta - out_delta} commit(s) of the source"
        else:
            verdict = "current"
        skipped = unreadable.get(j)
        if verdict != "current" and skipped and skipped["chain_id"] == active_chain:
            verdict += f"; the last run (run {skipped['run_id']}) left it as it was: {skipped['why']}"
        result.spaces.append(SpaceStatus(j, active_chain, tids, gate, out_chain, cur.get("source_version"),
                                         out_delta, src_delta, rows.get(j, 0), verdict))
    return result
