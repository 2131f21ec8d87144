"""The evaluate step's human-readable output: a printed table, report.md, report.html and compat.png.

The report opens with what was evaluated (per edge: transform id, kind, objective, origin; the config
digest and run id). compat.png (matplotlib, Agg) has one column per metric, the bcemb row above the
untransformed row on ONE colour scale per metric, so the two rows compare by colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from bclib.storage import local_path


@dataclass
class PairResult:
    """Metrics of one (source version, target space) pair on held-out entities (evaluate's unit of output)."""

    source_version: int
    space_version: int
    chain_id: str
    sample_size: int
    metrics: dict[str, float]
    from_output_table: bool


def _neighbour_key(results: list[PairResult]) -> Optional[str]:
    """The neighbour-recall metric's name (it carries K), if any pair has it."""
    return next((k for r in results for k in r.metrics if k.startswith("neighbour_recall_at_")), None)


def format_table(results: list[PairResult]) -> str:
    """Per (source, space): transformed vs untransformed (base) figures."""
    nn_key = _neighbour_key(results)
    has_probe = any("probe_retention" in r.metrics for r in results)
    cols = [("rel_l2", "relative_l2"), ("base_l2", "baseline_relative_l2"),
            ("cosine", "mean_cosine"), ("base_cos", "baseline_mean_cosine")]
    if nn_key:
        cols += [(f"nn@{nn_key.rsplit('_', 1)[1]}", nn_key), ("base_nn", f"baseline_{nn_key}")]
    if has_probe:
        cols += [("probe", "probe_retention"), ("base_prb", "baseline_probe_retention")]
    head = f"{'source':>6} {'space':>5} {'n':>7} " + " ".join(f"{c:>8}" for c, _ in cols) + "  from"
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (-r.source_version, -r.space_version)):
        vals = " ".join(f"{r.metrics[k]:>8.4f}" if k in r.metrics else f"{'-':>8}" for _, k in cols)
        lines.append(f"{r.source_version:>6} {r.space_version:>5} {r.sample_size:>7} {vals}  "
                     f"{'output table' if r.from_output_table else 'registry chain'}")
    return "\n".join(lines)


def write_report(results: list[PairResult], report_dir: str, run_id: str, header: Optional[dict] = None) -> Path:
    """report.md, report.html (the header, the table, the plot) and compat.png under report_dir/run_id.

    report_dir: a local path or file: URI (the report is written by this process).
    header: what was evaluated, e.g. {"config digest": ..., "transforms": [{"edge": "2 -> 1", "id": ...,
    "kind": ..., "objective": ..., "origin": ...}]}; shown first in both reports. Raises
    MissingDependencyError (bcemb[report]) without matplotlib.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from bclib.errors import MissingDependencyError

        raise MissingDependencyError("the evaluate report needs matplotlib: pip install 'bcemb[report]'") from None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(local_path(report_dir) or report_dir) / run_id  # a file: URI is this machine's path
    out.mkdir(parents=True, exist_ok=True)
    versions = sorted({r.source_version for r in results} | {r.space_version for r in results})
    idx = {v: i for i, v in enumerate(versions)}
    panels = [("relative_l2", "relative L2 error (lower is better)")]
    nn_key = _neighbour_key(results)
    if nn_key:
        panels.append((nn_key, nn_key.replace("_", " ")))
    if any("probe_retention" in r.metrics for r in results):
        panels.append(("probe_retention", "consumer probe AUC retention"))
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels), 8), squeeze=False)
    for col, (key, title) in enumerate(panels):
        values = [r.metrics[p + key] for r in results for p in ("", "baseline_") if p + key in r.metrics]
        vmin, vmax = (min(values), max(values)) if values else (0.0, 1.0)
        for row, prefix in enumerate(("", "baseline_")):
            grid = np.full((len(versions), len(versions)), np.nan)
            for r in results:
                if prefix + key in r.metrics:
                    grid[idx[r.source_version], idx[r.space_version]] = r.metrics[prefix + key]
            ax = axes[row][col]
            im = ax.imshow(grid, cmap="viridis_r" if key == "relative_l2" else "viridis", vmin=vmin, vmax=vmax)
            for (i, j), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8,
                            bbox={"facecolor": "white", "alpha": 0.7, "linewidth": 0})
            ax.set_xticks(range(len(versions)), versions)
            ax.set_yticks(range(len(versions)), versions)
            ax.set_xlabel("target space j")
            ax.set_ylabel("source version k")
            ax.set_title(("bcemb: " if not prefix else "untransformed: ") + title, fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(out / "compat.png", dpi=110)
    plt.close(fig)
    head = _header_lines(header or {})
    (out / "report.md").write_text(
        f"# bcemb compatibility report, run {run_id}\n\n" + "".join(f"* {line}\n" for line in head)
        + f"\n![compatibility](compat.png)\n\n```\n{format_table(results)}\n```\n"
    )
    (out / "report.html").write_text(_html(run_id, head, results))
    return out


def _header_lines(header: dict) -> list[str]:
    lines = [f"{k}: {v}" for k, v in header.items() if k != "transforms"]
    for t in header.get("transforms", []):
        lines.append(f"edge {t['edge']}: {t['kind']} / {t['objective']} ({t['origin']}), transform {t['id']}")
    return lines


def _html(run_id: str, head: list[str], results: list[PairResult]) -> str:
    """A self-contained page: header, one row per pair with every metric, the plot (compat.png beside it)."""
    import html

    keys = sorted({k for r in results for k in r.metrics})
    rows = []
    for r in sorted(results, key=lambda r: (-r.source_version, -r.space_version)):
        cells = "".join(f"<td>{r.metrics[k]:.4f}</td>" if k in r.metrics else "<td>-</td>" for k in keys)
        src = "output table" if r.from_output_table else "registry chain"
        rows.append(f"<tr><td>{r.source_version}</td><td>{r.space_version}</td><td>{r.sample_size}</td>"
                    f"<td>{html.escape(src)}</td>{cells}</tr>")
    th = "".join(f"<th>{html.escape(k)}</th>" for k in keys)
    items = "".join(f"<li>{html.escape(line)}</li>" for line in head)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>bcemb report {html.escape(run_id)}</title>"
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:12px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}</style></head><body>"
            f"<h1>bcemb compatibility report, run {html.escape(run_id)}</h1><ul>{items}</ul>"
            "<img src='compat.png' alt='compatibility per (source, space)' style='max-width:100%'>"
            f"<table><tr><th>source</th><th>space</th><th>n</th><th>from</th>{th}</tr>{''.join(rows)}</table>"
            "</body></html>\n")
