"""What else was tried on the real-model upgrades, and how far it gets (numpy/torch only, no Spark).

    python benchmarks/real_models_alternatives.py                 # both corpora, a minute or two on 2 cores
    python benchmarks/real_models_alternatives.py --contrastive   # also an InfoNCE-trained linear map (slower)

Same cache, split, probes and mixed recall@10 as `benchmarks/real_models.py` (its functions are imported), but
every map is fitted in numpy on all 1,000 fit-set pairs (the product's fit sample is the 947 of them inside its
hash window), so the figures show what a change of the product's fit could gain. Per 1-hop edge:
  ridge oracle      the ridge (scale-free, × the mean eigenvalue of XᵀX) with the best held-out recall over
                    ORACLE_GRID (0.01 .. 10, five per decade): no rule choosing from that grid can beat it;
  gcv / kfold-nb    ridge chosen on the fit set by GCV (the product's rule, `select_ridge`) / by 5-fold
                    neighbour overlap@10 inside each validation fold;
  kernel ridge      exponential cosine kernel exp((cos - 1) / τ), τ and the ridge chosen on the held-out
                    half (again an upper bound), a non-linear map through every training pair;
  contrastive       (--contrastive) a linear map trained with InfoNCE (τ 0.05) + MSE from the ridge fit.
And per corpus, the 3-hop chain 3 -> 0 with the anchored objective solved in closed form on centred links with
one shared intercept (renormalisation inside the chain ignored), against the product's gradient-descent
anchored fit and a direct 3 -> 0 map. Writes benchmarks/results/real_models_alternatives.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import real_models as rm  # noqa: E402
from bclib.config import TransformSettings  # noqa: E402
from bclib.numerics.closed_form import fit_anchored_linear, fit_linear, ridge_penalty, select_ridge  # noqa: E402
from bclib.numerics.fitting import fit_edge  # noqa: E402
from bclib.numerics.transforms import AffineTransform, apply_chain, normalize_rows  # noqa: E402

ORACLE_GRID = tuple(float(v) for v in np.geomspace(0.01, 10, 16))
KERNEL_TAUS = (0.2, 0.5, 1.0, 2.0)
KERNEL_RIDGES = (0.003, 0.03, 0.1)


def ridge_map(x: np.ndarray, y: np.ndarray, ridge: float) -> AffineTransform:
    """Ridge with an intercept at a scale-free `ridge`, output renormalised (cosine spaces)."""
    t = fit_linear(x, y, ridge=ridge, bias=True)
    return AffineTransform(t.weight, t.bias, "linear", {"output_norm": "unit"})


def fold_overlap(pred: np.ndarray, true: np.ndarray, k: int = 10) -> float:
    """Mean overlap of each mapped row's k nearest true rows with its true row's k nearest (self excluded)."""
    p, t = rm._unit(pred), rm._unit(true)
    s, tt = p @ t.T, t @ t.T
    np.fill_diagonal(s, -np.inf)
    np.fill_diagonal(tt, -np.inf)
    a, b = rm._topk(s, k), rm._topk(tt, k)
    return float(np.mean([len(set(u) & set(v)) for u, v in zip(a.tolist(), b.tolist())]) / k)


def kfold_neighbour_ridge(x: np.ndarray, y: np.ndarray, grid, folds: int = 5, seed: int = 0) -> float:
    """The grid ridge with the best mean `fold_overlap` over `folds` validation folds of (x, y)."""
    f = np.arange(len(x)) % folds
    np.random.default_rng(seed).shuffle(f)
    score = np.zeros(len(grid))
    for i in range(folds):
        tr, va = f != i, f == i
        for g, r in enumerate(grid):
            score[g] += fold_overlap(ridge_map(x[tr], y[tr], r).apply(x[va]), y[va])
    return float(grid[int(np.argmax(score))])


def kernel_ridge(x: np.ndarray, y: np.ndarray, xq: np.ndarray, tau: float, ridge: float) -> np.ndarray:
    """Kernel ridge with k(a, b) = exp((cos(a, b) - 1) / tau), λ = ridge × mean eigenvalue of K."""
    xn, qn = normalize_rows(x.astype(np.float64)), normalize_rows(xq.astype(np.float64))
    my = y.mean(0)
    gram = np.exp((xn @ xn.T - 1.0) / tau)
    alpha = np.linalg.solve(gram + ridge_penalty(gram, ridge) * np.eye(len(gram)), y - my)
    return np.exp((qn @ xn.T - 1.0) / tau) @ alpha + my


def contrastive_map(x: np.ndarray, y: np.ndarray, init: AffineTransform, tau: float = 0.05, epochs: int = 300,
                    lr: float = 1e-3, weight_decay: float = 1e-3) -> AffineTransform:
    """Full-batch Adam on InfoNCE(unit(xW + b), y; τ) + MSE, from the ridge fit (a retrieval-shaped loss)."""
    import torch

    torch.manual_seed(0)
    xt, yt = torch.tensor(x, dtype=torch.float64), torch.tensor(y, dtype=torch.float64)
    w = torch.tensor(init.weight, requires_grad=True)
    b = torch.tensor(init.bias, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    yn = torch.nn.functional.normalize(yt, dim=1)
    for _ in range(epochs):
        opt.zero_grad()
        p = xt @ w + b
        logits = torch.nn.functional.normalize(p, dim=1) @ yn.T / tau
        loss = torch.nn.functional.cross_entropy(logits, torch.arange(len(xt))) \
            + ((p - yt) ** 2).sum(1).mean() + weight_decay * (w ** 2).sum()
        loss.backward()
        opt.step()
    return AffineTransform(w.detach().numpy(), b.detach().numpy(), "linear", {"output_norm": "unit"})


def anchored_closed_form(x: np.ndarray, targets: list[np.ndarray], chains: list[list[AffineTransform]]
                         ) -> AffineTransform:
    """Anchored B on centred data (links' linear parts; ridge and step weights by the product's K-fold), then
    the one intercept b minimising Σ_j w_j ||(x̄B + b) C_j + c_j − z̄_j||² (C_j, c_j: the collapsed chain)."""
    mx = x.mean(0)
    linear = [[AffineTransform(link.weight, None, "linear", {}) for link in chain] for chain in chains]
    t = fit_anchored_linear(x - mx, [z - z.mean(0) for z in targets], linear, ridge="auto")
    weight = t.weight
    weights = t.meta.get("anchor_weights") or [1.0 / len(targets)] * len(targets)
    a, r = 0.0, 0.0
    for w, chain, z in zip(weights, chains, targets):
        c_mat, c_off = np.eye(weight.shape[1]), np.zeros(weight.shape[1])
        for link in chain:
            c_off = c_off @ link.weight + (link.bias if link.bias is not None else 0.0)
            c_mat = c_mat @ link.weight
        a = a + w * c_mat @ c_mat.T
        r = r + w * (z.mean(0) - c_off) @ c_mat.T
    bias = np.linalg.lstsq(a, r, rcond=None)[0] - mx @ weight
    return AffineTransform(weight, bias, "linear", {"output_norm": "unit", "anchor_weights": weights,
                                                    "ridge": t.meta.get("ridge")})


def run_corpus(name: str, contrastive: bool) -> dict:
    corpus = rm.load_corpus(name)
    ev = rm.Evaluator(corpus)
    z = [v.astype(np.float64) for v in corpus.z]
    fit, held = corpus.fit, corpus.held

    def recall(pred: np.ndarray, j: int) -> float:
        return round(ev.metrics(pred, j)["mixed_recall_at_10"], 4)

    out: dict = {"hops": {}}
    for k in (1, 2, 3):
        j = k - 1
        x, y, xq = z[k][fit], z[j][fit], z[k][held]
        w, b = rm.ridge_fit(x, y)
        row = {"numpy_ridge_alpha_1": recall(xq @ w + b, j)}
        oracle = {r: recall(ridge_map(x, y, r).apply(xq), j) for r in ORACLE_GRID}
        best = max(oracle, key=oracle.get)
        row["ridge_oracle"] = {"ridge": best, "recall": oracle[best]}
        gcv, _ = select_ridge(x, y, bias=True)
        row["gcv"] = {"ridge": gcv, "recall": recall(ridge_map(x, y, gcv).apply(xq), j)}
        nb = kfold_neighbour_ridge(x, y, ORACLE_GRID)
        row["kfold_neighbour"] = {"ridge": nb, "recall": recall(ridge_map(x, y, nb).apply(xq), j),
                                  "probe_kept": {lab: round(v["kept"], 4) for lab, v in
                                                 ev.metrics(ridge_map(x, y, nb).apply(xq), j)["probe"].items()},
                                  "gcv_probe_kept": {lab: round(v["kept"], 4) for lab, v in
                                                     ev.metrics(ridge_map(x, y, gcv).apply(xq), j)["probe"].items()}}
        kr = {(tau, r): recall(kernel_ridge(x, y, xq, tau, r), j) for tau in KERNEL_TAUS for r in KERNEL_RIDGES}
        tau, r = max(kr, key=kr.get)
        row["kernel_ridge_oracle"] = {"tau": tau, "ridge": r, "recall": kr[tau, r]}
        if contrastive:
            row["contrastive"] = recall(contrastive_map(x, y, ridge_map(x, y, gcv)).apply(xq), j)
        out["hops"][f"{k}->{j}"] = row
        print(name, f"{k}->{j}", json.dumps(row), flush=True)
    # the 3-hop chain: closed-form anchored with one intercept vs the product's gradient-descent anchored fit
    xq = z[3][held]
    single = TransformSettings()
    anchored = TransformSettings(objective="anchored")
    b1 = fit_edge(z[1][fit], z[0][fit], single)
    direct = fit_edge(z[3][fit], z[0][fit], single)
    g2 = fit_edge(z[2][fit], z[1][fit], anchored, frozen_chains=[[b1]], anchors=[z[0][fit]])
    g3 = fit_edge(z[3][fit], z[2][fit], anchored, frozen_chains=[[g2], [g2, b1]], anchors=[z[1][fit], z[0][fit]])
    c2 = anchored_closed_form(z[2][fit], [z[1][fit], z[0][fit]], [[], [b1]])
    c3 = anchored_closed_form(z[3][fit], [z[2][fit], z[1][fit], z[0][fit]], [[], [c2], [c2, b1]])
    out["chain_3_0"] = {
        "direct": recall(apply_chain([direct], xq), 0),
        "anchored_gradient_descent": {"3->2": recall(apply_chain([g3], xq), 2),
                                      "3->0": recall(apply_chain([g3, g2, b1], xq), 0)},
        "anchored_closed_form_intercept": {"3->2": recall(apply_chain([c3], xq), 2),
                                           "3->0": recall(apply_chain([c3, c2, b1], xq), 0),
                                           "anchor_weights": c3.meta["anchor_weights"]},
    }
    print(name, "chain", json.dumps(out["chain_3_0"]), flush=True)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=["healthtweets", "rottentomatoes"])
    parser.add_argument("--contrastive", action="store_true")
    args = parser.parse_args(argv)
    try:
        results = {name: run_corpus(name, args.contrastive) for name in args.corpus}
    except rm.CacheMissing as e:
        print(f"real_models_alternatives: {e}", file=sys.stderr)
        return 2
    rm.RESULTS.mkdir(parents=True, exist_ok=True)
    (rm.RESULTS / "real_models_alternatives.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
