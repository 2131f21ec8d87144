"""An old version's table goes away (removed, emptied, its files deleted outside Delta): the error names it,
and only the spaces that need that table wait — the others are published, the run exits 4 (partly published)
and `status` says why (issue: "the daily run when others change the tables around it", part 2)."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import yaml

from bclib.errors import MissingTableError, VersionFilesMissingError, VersionTableEmptyError
from bclib.steps.backfill import run_backfill
from bclib.steps.fit import run_fit
from bclib.tables.delta import current_delta_version, delta_table

from conftest import generated_and_fitted

DAMAGE = {"removed": MissingTableError, "emptied": VersionTableEmptyError, "files_gone": VersionFilesMissingError}


def _damage(spark, location: str, how: str) -> None:
    if how == "removed":
        shutil.rmtree(location)
    elif how == "emptied":
        delta_table(spark, location).delete()  # every row deleted: the table stays, empty
    else:
        for part in Path(location).glob("**/*.parquet"):  # the log still lists them
            part.unlink()


def _chain(spark, cfg, space: int) -> str:
    rows = spark.read.format("delta").load(cfg.output_location).where(f"space_version = {space}") \
        .select("chain_id").distinct().collect()
    return ",".join(sorted(r.chain_id for r in rows))


@pytest.mark.parametrize("how", list(DAMAGE))
def test_a_lost_old_version_is_named_and_holds_back_only_its_own_space(spark, tmp_path, how, capsys):
    from bclib.cli import EXIT_PARTIAL, main
    from bclib.steps.evaluate import run_evaluate
    from bclib.steps.status import run_status

    cfg = generated_and_fitted(spark, tmp_path, evaluate={"label_location": None})
    run_backfill(spark, cfg)  # spaces 0 and 1 published
    before = {j: _chain(spark, cfg, j) for j in (0, 1)}
    # a new transform for edge 2 -> 1: both spaces' chains change, so the gate must read both spaces' truth
    run_fit(spark, dataclasses.replace(cfg, transform=dataclasses.replace(cfg.transform, ridge=0.01)), refit=["2:1"])
    _damage(spark, cfg.version_location(0), how)
    with pytest.raises(DAMAGE[how], match=r"embedding version 0 (table not found|at )"):  # named, not a shape
        run_fit(spark, cfg, refit=["1:0"])                                                  # error or a Py4J trace
    out_before = current_delta_version(spark, cfg.output_location)

    conf = tmp_path / "job.yaml"
    conf.write_text(yaml.safe_dump(dataclasses.asdict(cfg)))
    capsys.readouterr()
    code = main(["backfill", "--config", str(conf), "--log-level", "ERROR"])
    err = capsys.readouterr().err
    assert code == EXIT_PARTIAL == 4, err
    assert "partly published: space(s) [0] left as they were" in err and DAMAGE[how].__name__ in err
    assert current_delta_version(spark, cfg.output_location) == out_before + 1  # space 1's rewrite
    after = {j: _chain(spark, cfg, j) for j in (0, 1)}
    assert after[0] == before[0] and after[1] != before[1]  # space 0 kept what it held; space 1 moved on

    status = {s.space: s for s in run_status(spark, cfg).spaces}
    assert status[1].state == "current"
    assert status[0].state.startswith("stale (chain changed: the active chain is fitted but not published yet)")
    assert DAMAGE[how].__name__ in status[0].state  # why the last run left it
    evaluated = run_evaluate(spark, cfg)  # the pairs of the lost version are left out, by name
    assert set(evaluated.unreadable) == {0} and {(p.source_version, p.space_version) for p in evaluated.pairs} \
        == {(2, 1)}
    if how == "emptied":  # `bcemb evaluate` alone says so too: exit 4, one line
        capsys.readouterr()
        assert main(["evaluate", "--config", str(conf), "--log-level", "ERROR"]) == EXIT_PARTIAL
        assert "partly evaluated: version(s) [0] left out" in capsys.readouterr().err
