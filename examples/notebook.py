"""bcemb from a notebook (Databricks, Jupyter): paste the body of `main` into a cell, with your own locations.

Runs the whole daily job on a small synthetic demo under `workdir`: generate three embedding versions, then
`bclib.run` (fit, gate, backfill, evaluate, status), then a second run that finds nothing to do.
`python examples/notebook.py [workdir]` runs it as a script; `tests/test_api.py` runs it in the test suite.
"""

from __future__ import annotations

import sys
import tempfile


def main(workdir: str) -> dict:
    import bclib

    cfg = bclib.load_config({
        "spark": {"master": "local[2]", "shuffle_partitions": 2},
        "embeddings": {"location": f"{workdir}/embeddings/v{{version}}", "versions": [0, 1, 2]},
        "registry_location": f"{workdir}/registry",
        "output_location": f"{workdir}/output",
        "metrics_location": f"{workdir}/metrics",
        "evaluate": {"label_location": f"{workdir}/labels", "report_dir": f"{workdir}/reports"},
        "fit": {"holdout": 0.25},  # a small demo: a quarter of the ids held out for the gate and evaluate
        "gate": {"min_heldout_ids": 50},
        "demo": {"n_entities": 1500, "dims": [12, 16, 20], "n_clusters": 6, "latent_dim": 8},
    })
    spark = bclib.session(cfg)  # in a Databricks notebook: the cluster's session
    from bclib.tables.delta import table_exists

    if not table_exists(spark, cfg.version_location(2)):  # the demo's versions, once: a rerun of the cell
        bclib.generate(spark, cfg)  # finds nothing new (your own versions: point embeddings.location at them)
    first = bclib.run(spark, cfg)
    print(first.summary())
    again = bclib.run(spark, cfg)  # nothing new: nothing written
    status = bclib.status(spark, cfg)
    print(status.table())
    return {"first_commits": first.commits, "second_commits": again.commits, "current": status.current,
            "rows": {s.space: s.rows for s in status.spaces}}


if __name__ == "__main__":
    print(main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="bcemb-notebook-")))
