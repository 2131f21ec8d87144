"""Compatibility metrics (pure numpy): transformed z~_j against true z_j on held-out entities."""

from __future__ import annotations

import numpy as np

from bclib.errors import DimensionMismatchError


def _check_same_shape(pred: np.ndarray, true: np.ndarray) -> None:
    if pred.shape != true.shape:
        raise DimensionMismatchError(f"prediction has shape {pred.shape} but truth has {true.shape}")


def relative_l2(pred: np.ndarray, true: np.ndarray) -> float:
    """||pred - true||_F / ||true||_F over the whole sample (0 = perfect)."""
    _check_same_shape(pred, true)
    diff = pred.astype(np.float64) - true.astype(np.float64)
    denom = float(np.sum(true.astype(np.float64) ** 2))
    return float(np.sqrt(np.sum(diff * diff) / max(denom, 1e-300)))


def mean_cosine(pred: np.ndarray, true: np.ndarray) -> float:
    """Mean over rows of cos(pred_i, true_i) (1 = same directions)."""
    _check_same_shape(pred, true)
    p, t = pred.astype(np.float64), true.astype(np.float64)
    num = np.sum(p * t, axis=1)
    den = np.linalg.norm(p, axis=1) * np.linalg.norm(t, axis=1)
    return float(np.mean(num / np.maximum(den, 1e-300)))


def _normalise(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn_indices(x: np.ndarray, queries: np.ndarray, k: int, batch: int = 1024) -> np.ndarray:
    """Exact cosine k nearest neighbours of rows `queries` among all rows of x (self excluded), batched."""
    if k >= len(x):
        raise ValueError(f"k = {k} needs more than {len(x)} rows")
    xn = _normalise(x)
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), batch):
        q = queries[start:start + batch]
        sims = xn[q] @ xn.T
        sims[np.arange(len(q)), q] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        out[start:start + len(q)] = top
    return out


def _top_k(queries_x: np.ndarray, base: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest dot products of each (normalised) query row with every (normalised) base row.

    Exact. Uses torch.topk when torch is installed (about 20x faster than numpy's row-wise argpartition
    on the driver), numpy otherwise; the two agree up to the order within the top k (sets are compared).
    """
    try:
        import torch
    except ImportError:
        torch = None
    out = np.empty((len(queries_x), k), dtype=np.int64)
    for start in range(0, len(queries_x), 1024):
        sims = queries_x[start:start + 1024] @ base.T
        if exclude is not None:
            sims[np.arange(len(sims)), exclude[start:start + 1024]] = -np.inf
        if torch is not None:
            out[start:start + len(sims)] = torch.topk(torch.from_numpy(sims), k, dim=1).indices.numpy()
        else:
            out[start:start + len(sims)] = np.argpartition(sims, len(base) - k, axis=1)[:, -k:]
    return out


def _overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """Mean |a_i ∩ b_i| / k over rows (each row: k distinct indices)."""
    both = np.concatenate([a, b], axis=1)
    both.sort(axis=1)
    return float(np.mean(np.sum(both[:, 1:] == both[:, :-1], axis=1)) / k)


class RecallReference:
    """The true space's neighbourhoods, computed once, to score several candidate spaces against.

    true: (n, d) true old vectors of n held-out entities; `queries` are n_queries of them (seeded).
    `within(pred)`: overlap of pred's own K-NN sets with the true K-NN sets (self excluded) — the
    neighbourhood structure inside the mapped space. `cross(pred)`: pred[i] searched among the *true*
    vectors, overlap with true[i]'s K nearest true vectors (itself included) — what an index of old
    vectors returns for mapped queries. Both cosine, exact; 1 = identical.
    """

    def __init__(self, true: np.ndarray, k: int = 10, n_queries: int = 2000, seed: int = 0) -> None:
        if k >= len(true):
            raise ValueError(f"k = {k} needs more than {len(true)} rows")
        self.k, self.n = k, len(true)
        rng = np.random.default_rng(seed)
        self.queries = np.sort(rng.choice(len(true), size=min(n_queries, len(true)), replace=False))
        self.true_n = _normalise(true)
        self.within_ref = _top_k(self.true_n[self.queries], self.true_n, k, exclude=self.queries)
        self.cross_ref = _top_k(self.true_n[self.queries], self.true_n, k)

    def within(self, pred: np.ndarray) -> float:
        _check_same_shape(pred[:, :0], self.true_n[:, :0])
        pn = _normalise(pred)
        return _overlap(_top_k(pn[self.queries], pn, self.k, exclude=self.queries), self.within_ref, self.k)

    def cross(self, pred: np.ndarray) -> float:
        _check_same_shape(pred, self.true_n)
        pn = _normalise(pred)
        return _overlap(_top_k(pn[self.queries], self.true_n, self.k), self.cross_ref, self.k)


def neighbour_recall(pred: np.ndarray, true: np.ndarray, k: int = 10, n_queries: int = 2000, seed: int = 0) -> float:
    """Mean overlap |kNN_pred(i) ∩ kNN_true(i)| / k over sampled queries (1 = same neighbourhoods).

    Within-space recall: neighbours of pred[i] among pred, of true[i] among true (self excluded), exact
    cosine. The true space's overlap with itself is exactly 1, so this is already the ratio to it.
    """
    return RecallReference(true, k, n_queries, seed).within(pred)


def cross_space_recall(pred: np.ndarray, true: np.ndarray, k: int = 10, n_queries: int = 2000,
                       seed: int = 0) -> float:
    """What an old index returns: mapped vectors searched among the *true* old vectors (1 = the same hits).

    pred, true: (n, d) for the same n held-out entities (row i of each is entity i). For sampled queries
    i, the K nearest true vectors (cosine) of pred[i] are compared with the K nearest true vectors of
    true[i] (itself included: an index of old vectors queried with the old vector returns it first);
    the mean overlap / K. Untransformed vectors of another model score near K / n; a perfect map 1.
    """
    if k > len(true):
        raise ValueError(f"k = {k} needs at least {k} rows, found {len(true)}")
    return RecallReference(true, k, n_queries, seed).cross(pred)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), dtype=np.float64)
    sorted_x = x[order]
    # average rank within ties
    boundaries = np.flatnonzero(np.diff(sorted_x)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(x)]])
    avg = (starts + ends - 1) / 2.0 + 1
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """ROC-AUC by the rank-sum statistic (ties averaged)."""
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC-AUC needs both classes")
    ranks = _average_ranks(scores.astype(np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[np.ndarray, float]:
    """Binary logistic regression by Newton's method (d is small), L2-regularised; returns (w, b)."""
    n, d = x.shape
    xa = np.hstack([x.astype(np.float64), np.ones((n, 1))])
    w = np.zeros(d + 1)
    reg = np.full(d + 1, l2 * n)
    reg[-1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xa @ w, -30, 30)))
        grad = xa.T @ (p - y) + reg * w
        hess = (xa * (p * (1 - p))[:, None]).T @ xa + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1])


def probe_retention(pred: np.ndarray, true: np.ndarray, labels: np.ndarray, seed: int = 0) -> dict[str, float]:
    """A consumer probe trained on true z_j: its AUC on z~_j divided by its AUC on z_j (held-out rows).

    Multi-class labels are scored one-vs-rest and averaged. Features are
    standardised with the true space's training statistics, as a consumer
    model trained on z_j would be.
    """
    _check_same_shape(pred, true)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(true))
    cut = len(true) // 2
    tr, te = perm[:cut], perm[cut:]
    mu, sd = true[tr].mean(0), true[tr].std(0) + 1e-8
    zt, zp = (true - mu) / sd, (pred - mu) / sd
    classes = np.unique(labels)
    positives = classes[1:] if len(classes) == 2 else classes
    auc_true, auc_pred = [], []
    for c in positives:
        y = (labels == c).astype(np.float64)
        if y[tr].min() == y[tr].max() or y[te].min() == y[te].max():
            continue
        w, b = fit_logistic(zt[tr], y[tr])
        auc_true.append(roc_auc(zt[te] @ w + b, y[te]))
        auc_pred.append(roc_auc(zp[te] @ w + b, y[te]))
    if not auc_true:
        raise ValueError("probe retention needs at least two label classes in both halves of the sample")
    a_true, a_pred = float(np.mean(auc_true)), float(np.mean(auc_pred))
    return {"probe_auc_true": a_true, "probe_auc": a_pred, "probe_retention": a_pred / a_true}
