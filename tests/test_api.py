"""The Python API (`import bclib`): what a notebook user calls. The example in examples/notebook.py runs here."""

from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest

from bclib.errors import ConfigError
from conftest import REPO


def test_import_bclib_loads_no_spark_and_names_the_api():
    code = ("import sys, bclib; assert 'pyspark' not in sys.modules, 'pyspark imported'; "
            "assert callable(bclib.run) and callable(bclib.load_config); print(sorted(bclib.__all__))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'backfill'" in out.stdout and "'status'" in out.stdout
    import bclib

    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        bclib.nothing  # noqa: B018


def test_load_config_from_a_dict_with_overrides_and_a_named_refusal():
    import bclib

    base = {"embeddings": {"location": "/data/v{version}", "versions": [0, 1, 2]}}
    cfg = bclib.load_config(base, {"backfill.engine": "arrow", "gate.min_heldout_ids": 10})
    assert cfg.backfill.engine == "arrow" and cfg.gate.min_heldout_ids == 10 and cfg.source_version == 2
    assert base == {"embeddings": {"location": "/data/v{version}", "versions": [0, 1, 2]}}  # not mutated
    with pytest.raises(ConfigError, match="backfill.engine"):
        bclib.load_config(base, {"backfill.engine": "fast"})


def test_the_notebook_example_runs_the_daily_job_twice(spark, tmp_path):
    spec = importlib.util.spec_from_file_location("bcemb_notebook_example", REPO / "examples" / "notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = module.main(str(tmp_path))
    assert out["first_commits"] >= 3 and out["second_commits"] == 0 and out["current"]
    assert set(out["rows"]) == {0, 1} and min(out["rows"].values()) > 1000
    rerun = module.main(str(tmp_path))  # the cell run again, as notebook users do: nothing new, nothing written
    assert rerun["first_commits"] == 0 and rerun["second_commits"] == 0 and rerun["rows"] == out["rows"]
