"""The evaluate step's human-readable output: a printed table, report.md and compat.png (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np

if TYPE_CHECKING:
    from bclib.steps.evaluate import PairResult


def _neighbour_key(results: list["PairResult"]) -> Optional[str]:
    """The neighbour-recall metric's name (it carries K), if any pair has it."""
    return next((k for r in results for k in r.metrics if k.startswith("neighbour_recall_at_")), None)


def format_table(results: list["PairResult"]) -> str:
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


def write_report(results: list["PairResult"], report_dir: str, run_id: str) -> Path:
    """report.md with the table and compat.png: error, neighbour recall and probe retention per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(report_dir) / run_id
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
        for row, prefix in enumerate(("", "baseline_")):
            grid = np.full((len(versions), len(versions)), np.nan)
            for r in results:
                if prefix + key in r.metrics:
                    grid[idx[r.source_version], idx[r.space_version]] = r.metrics[prefix + key]
            ax = axes[row][col]
            im = ax.imshow(grid, cmap="viridis_r" if key == "relative_l2" else "viridis")
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
    (out / "report.md").write_text(
        f"# bcemb compatibility report, run {run_id}\n\n![compatibility](compat.png)\n\n```\n"
        f"{format_table(results)}\n```\n"
    )
    return out
