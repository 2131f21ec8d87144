"""benchmarks/real_models.py without Spark: its numpy references and metrics, and the missing-cache exit.

The product run itself (Delta tables, run_fit, run_backfill) needs the real-model cache, which only
`benchmarks/real_models_embed.py` with the model packages creates; these tests need neither.
"""

import importlib.util
import sys

import numpy as np
import pytest

from conftest import REPO


@pytest.fixture(scope="module")
def rm():
    spec = importlib.util.spec_from_file_location("real_models", REPO / "benchmarks" / "real_models.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["real_models"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ridge_reference_recovers_an_affine_map_and_composes(rm):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6))
    w, b = rng.normal(size=(6, 4)), rng.normal(size=4)
    fw, fb = rm.ridge_fit(x, x @ w + b, alpha=1e-9)
    np.testing.assert_allclose(fw, w, atol=1e-6)
    np.testing.assert_allclose(fb, b, atol=1e-6)
    w2 = rng.normal(size=(4, 3))
    out = rm.ridge_apply([(w, b), (w2, np.zeros(3))], x)
    np.testing.assert_allclose(out, (x @ w + b) @ w2)
    shrunk, _ = rm.ridge_fit(x, x @ w + b, alpha=1e4)  # the penalty shrinks the weights, not the bias
    assert np.linalg.norm(shrunk) < 0.5 * np.linalg.norm(w)


def test_mixed_recall_excludes_the_entity_itself_on_both_sides(rm):
    rng = np.random.default_rng(1)
    true = _unit(rng.normal(size=(300, 8))).astype(np.float32)
    ref = rm.RecallReference(true, k=10, n_queries=300)
    assert rm.mixed_recall(true, ref) == (1.0, 0.0)
    # a query mapped exactly onto its own true vector still has to find the other 10, not itself
    assert rm.mixed_recall(true * 3.0, ref)[0] == 1.0  # cosine: the scale does not matter
    unrelated = _unit(rng.normal(size=(300, 8))).astype(np.float32)
    recall, se = rm.mixed_recall(unrelated, ref)
    assert recall < 0.15 and 0 < se < 0.02
    # entity i mapped onto entity i+1's vector: its search excludes i's own vector, not i+1's, so the hits
    # are i+1 itself and most of i+1's neighbours, and they overlap i's neighbours little
    shifted = np.roll(true, -1, axis=0)
    assert rm.mixed_recall(shifted, ref)[0] < 0.3


def test_probe_scores_the_truth_above_noise_and_keeps_full_auc_on_the_truth(rm):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, size=600).astype(str)
    centres = rng.normal(size=(3, 5)) * 2
    x = centres[y.astype(int)] + rng.normal(size=(600, 5))
    probe = rm.Probe(x[:300], y[:300])
    assert len(probe.models) == 3  # one-vs-rest for 3 classes
    assert probe.auc(x[300:], y[300:]) > 0.9
    assert abs(probe.auc(rng.normal(size=(300, 5)), y[300:]) - 0.5) < 0.1
    binary = rm.Probe(x[:300], (y[:300] == "0").astype(str))
    assert len(binary.models) == 1


def test_a_missing_cache_is_one_line_and_exit_2(rm, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rm, "CACHE_ROOT", tmp_path)
    assert rm.main(["--quick", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "benchmarks/real_models_embed.py --corpus healthtweets" in err
    assert not (tmp_path / "out").exists()


def test_targets_read_the_default_against_the_ridge(rm):
    def run(method, hop, recall, kept):
        return {"corpus": "rottentomatoes", "method": method, "hop": hop, "mixed_recall_at_10": recall,
                "probe": {"category": {"kept": kept, "auc_mapped": kept * 0.8, "auc_true": 0.8, "informative": True}}}

    runs = []
    for hop in ["1->0", "2->1", "3->2", "3->1", "3->0", "3->0 direct"]:
        runs += [run(rm.RIDGE, hop, 0.30, 0.99), run(rm.DEFAULT, hop, 0.31, 1.01), run("mlp/single_step", hop, 0.34, 1.0)]
    lines = rm.check_targets(runs)
    assert all(line.startswith("PASS") for line in lines), lines
    assert sum("best family" in line and "mlp/single_step" in line for line in lines) == 3
    runs[0]["mixed_recall_at_10"] = 0.5  # ridge beats the default on 1->0 recall
    assert rm.check_targets(runs)[0].startswith("MISS default >= numpy ridge, rottentomatoes 1->0")
