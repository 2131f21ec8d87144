"""The local (piecewise-affine) family's fit: k-means centroids, soft assignments, one weighted ridge map per cluster.

Pure numpy, driver side. The transform it returns (`LocalAffineTransform`, `bclib.numerics.transforms`)
is y = Σ_i p_i(x) (x W_i + b_i) with p = softmax(−||x − c_i||² / T). Each (W_i, b_i) is the weighted
ridge least-squares map with row weights p_i(x): a mixture of local linear experts with a fixed
(k-means) gate (Jacobs et al., "Adaptive mixtures of local experts", Neural Computation 3, 1991;
Arthur & Vassilvitskii, "k-means++: the advantages of careful seeding", SODA 2007).
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence

import numpy as np

from bclib.errors import InsufficientDataError
from bclib.numerics.closed_form import (
    Ridge, UNRELIABLE_SOLVE, check_pairs, fixed_ridge, gcv_curve, solve_spd, json_float, ridge_grid,
)
from bclib.numerics.metrics import relative_l2
from bclib.numerics.transforms import LocalAffineTransform

log = logging.getLogger(__name__)

K_GRID = (1, 2, 4, 8, 16)  # k tried when clusters is None, limited to at least d_in + 1 rows per cluster
HOLDOUT_FRACTION = 0.2  # the deterministic internal split choosing k
NEGLIGIBLE_WEIGHT = 1e-12  # rows with a smaller soft weight are left out of a cluster's sums
MAX_LLOYD_ITERATIONS = 100
KMEANS_ROWS_PER_CLUSTER = 256  # k-means runs on a seeded sample of at most this many rows per centroid (as faiss)


def _sq_distances(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    """||x_r − c_i||² (rows, k) by one GEMM, clipped at 0 against round-off."""
    d2 = np.einsum("ij,ij->i", x, x)[:, None] - 2 * (x @ c.T) + np.einsum("ij,ij->i", c, c)[None, :]
    return np.maximum(d2, 0.0, out=d2)


def kmeans(
    x: np.ndarray, k: int, seed: int = 0, max_iter: int = MAX_LLOYD_ITERATIONS,
    max_rows: Optional[int] = None,
) -> tuple[np.ndarray, int]:
    """Seeded k-means++ initialisation, then Lloyd iterations until no assignment changes (or `max_iter`).

    x: (n, d), any float dtype (float64 inside); returns (centroids (k, d) float64, iterations run).
    With `max_rows` (default KMEANS_ROWS_PER_CLUSTER × k) a seeded sample of that many rows is clustered,
    as faiss does (Johnson, Douze & Jégou, "Billion-scale similarity search with GPUs", 2017). An
    emptied cluster is re-seeded at the row farthest from its centroid. Deterministic for a seed.
    Raises ValueError unless 1 <= k <= n. (Arthur & Vassilvitskii, SODA 2007; Lloyd, IEEE Trans. Inf.
    Theory 28(2), 1982.)
    """
    x64 = np.asarray(x, dtype=np.float64)
    n = x64.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= rows, found k = {k} for {n} rows")
    rng = np.random.default_rng(seed)
    limit = KMEANS_ROWS_PER_CLUSTER * k if max_rows is None else max(int(max_rows), k)
    if n > limit:
        x64 = x64[np.sort(rng.choice(n, size=limit, replace=False))]
        n = limit
    centroids = np.empty((k, x64.shape[1]))
    centroids[0] = x64[rng.integers(n)]
    closest = _sq_distances(x64, centroids[:1])[:, 0]
    for i in range(1, k):
        total = closest.sum()
        pick = rng.choice(n, p=closest / total) if total > 0 else rng.integers(n)
        centroids[i] = x64[pick]
        np.minimum(closest, _sq_distances(x64, centroids[i:i + 1])[:, 0], out=closest)
    labels = np.full(n, -1)
    it = 0
    for it in range(1, max_iter + 1):
        d2 = _sq_distances(x64, centroids)
        new = d2.argmin(axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = (labels[None, :] == np.arange(k)[:, None]).astype(np.float64) @ x64  # one-hot GEMM
        for i in range(k):
            if counts[i]:
                centroids[i] = sums[i] / counts[i]
            else:  # re-seed an emptied cluster at the worst-served row
                far = int(d2[np.arange(n), labels].argmax())
                centroids[i] = x64[far]
                labels[far] = i
    return centroids, it


def default_temperature(x: np.ndarray, centroids: np.ndarray) -> float:
    """The median over rows of the squared distance to the nearest centroid (float > 0).

    Falls back to the mean of those distances, then to 1.0, when the median is 0 (duplicate rows).
    x: (n, d), centroids (k, d).
    """
    nearest = _sq_distances(np.asarray(x, dtype=np.float64), centroids).min(axis=1)
    for value in (float(np.median(nearest)), float(nearest.mean())):
        if value > 0 and math.isfinite(value):
            return value
    return 1.0


def _weighted_map(x: np.ndarray, y: np.ndarray, w: np.ndarray, ridge: Ridge, grid: np.ndarray, cluster: int):
    """Weighted ridge map of one cluster: (W (d_in, d_out), b (d_out,), ridge used, GCV curve or None).

    Minimises Σ_r w_r ||x_r W + b − y_r||² + λ||W||², λ = ridge × mean eigenvalue of the weighted centred
    gram. "auto": weighted GCV over `grid` with the effective row count n_eff = (Σw)² / Σw² (for 0/1
    weights exactly the cluster's own GCV, `select_ridge`).
    """
    keep = w > NEGLIGIBLE_WEIGHT
    x, y, w = x[keep], y[keep], w[keep]
    d = x.shape[1]
    sw = float(w.sum())
    if sw <= 0:
        return np.zeros((d, y.shape[1])), np.zeros(y.shape[1]), 0.0, None
    mx, my = w @ x / sw, w @ y / sw
    xc, yc = x - mx, y - my
    xw = xc * w[:, None]
    gram, cross = xw.T @ xc, xw.T @ yc
    mean_eig = float(np.trace(gram)) / max(d, 1)
    n_eff = sw * sw / float(np.sum(w * w))
    curve = None
    if isinstance(ridge, str) and ridge == "auto":
        e, v = np.linalg.eigh(gram)
        e = np.maximum(e, 0.0)
        usable = e > max(float(e.max()), 0.0) * d * np.finfo(np.float64).eps
        q = v.T @ cross  # √e_i · u_iᵀỸ, Ỹ the √w-scaled centred targets
        proj2 = np.where(usable, np.einsum("ij,ij->i", q, q) / np.where(usable, e, 1.0), 0.0)
        total = float(np.sum(w * np.einsum("ij,ij->i", yc, yc)))
        outside = max(total - float(proj2.sum()), 0.0)
        # residuals in weights normalised to sum n_eff: the same argmin, values comparable across clusters
        curve = gcv_curve(np.where(usable, e, 0.0), proj2, outside, n_eff, 1.0, grid * mean_eig) * (n_eff / sw)
        cond = math.sqrt(e[-1] / e[0]) if e[0] > 0 else math.inf
        if cond > UNRELIABLE_SOLVE or not usable.all():
            curve[grid == 0] = math.inf
        if not np.isfinite(curve).any():
            raise InsufficientDataError(
                f"fit_local: cluster {cluster} has {n_eff:.1f} effective pairs for dimension {d}: no ridge in the "
                "grid avoids interpolating them; use fewer clusters or more pairs (fit.sample_size)")
        chosen = float(grid[int(np.argmin(curve))])
    else:
        chosen = fixed_ridge(ridge)
        if chosen == 0 and n_eff < d + 1:
            raise InsufficientDataError(
                f"fit_local with ridge 0: cluster {cluster} has {n_eff:.1f} effective training pairs, needs at "
                f"least {d + 1} ({d} input dimensions + bias); use fewer clusters, sample more pairs "
                "(fit.sample_size) or set transform.ridge: auto to regularise")
    if chosen:
        gram[np.diag_indices_from(gram)] += chosen * mean_eig
    weight = solve_spd(gram, cross)
    return weight, my - mx @ weight, chosen, curve


def _fit_k(x: np.ndarray, y: np.ndarray, k: int, temperature: Optional[float], ridge: Ridge, grid: np.ndarray,
           seed: int) -> LocalAffineTransform:
    centroids, iterations = kmeans(x, k, seed)
    t = float(temperature) if temperature is not None else default_temperature(x, centroids)
    shell = LocalAffineTransform(centroids, t, np.zeros((k, x.shape[1], 1)), np.zeros((k, 1)))
    p = shell.assignments(x)
    maps = [_weighted_map(x, y, p[:, i], ridge, grid, i) for i in range(k)]
    meta = {
        "clusters": k, "temperature": t, "temperature_mode": "fixed" if temperature is not None else "auto",
        "ridge": [m[2] for m in maps], "ridge_mode": "auto" if isinstance(ridge, str) else "fixed",
        "cluster_mass": [float(v) for v in p.mean(axis=0)], "kmeans_iterations": iterations, "seed": seed,
    }
    if isinstance(ridge, str):
        meta["ridge_grid"] = [float(v) for v in grid]
        meta["gcv"] = [[json_float(v) for v in m[3]] if m[3] is not None else None for m in maps]
    return LocalAffineTransform(centroids, t, np.stack([m[0] for m in maps]), np.stack([m[1] for m in maps]),
                                meta=meta)


def fit_local(
    x: np.ndarray,
    y: np.ndarray,
    k: Optional[int] = None,
    temperature: Optional[float] = None,
    ridge: Ridge = "auto",
    seed: int = 0,
    k_grid: Optional[Sequence[int]] = None,
    grid: Optional[Sequence[float]] = None,
) -> LocalAffineTransform:
    """Fit the local family: k-means on x, soft assignments, one weighted ridge affine map per cluster.

    x: (n, d_in), y: (n, d_out), any float dtype (float64 inside); returns a LocalAffineTransform
    (centroids (k, d_in), weight (k, d_in, d_out), bias (k, d_out), float64). `temperature` None: the
    median squared distance to the nearest centroid (`default_temperature`). `ridge`: a scale-free value
    (λ_i = ridge × mean eigenvalue of cluster i's weighted centred gram) or "auto" (weighted GCV per
    cluster). `k` None: every value of `k_grid` (default K_GRID) leaving at least d_in + 1 rows per
    cluster is fitted on a deterministic 80 % of the rows (permutation seeded by `seed`) and scored by
    relative L2 on the other 20 %; the best k is refitted on all rows. meta records clusters,
    temperature, per-cluster ridges (and GCV curves), cluster masses and, when k was chosen, k_grid and
    k_holdout_relative_l2. With k = 1 the fit is `fit_linear(x, y, ridge, bias=True)` whatever T.
    Raises DimensionMismatchError / InsufficientDataError for misaligned or too few pairs (also a cluster
    with fewer effective pairs than d_in + 1 under ridge 0), ValueError for k outside [1, n] or T <= 0.
    """
    check_pairs(x, y)
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0 or None, found {temperature!r}")
    x64, y64 = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    g = ridge_grid(grid)
    n, d_in = x64.shape
    if k is not None:
        return _fit_k(x64, y64, int(k), temperature, ridge, g, seed)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * HOLDOUT_FRACTION)))
    val, train = np.sort(perm[:n_val]), np.sort(perm[n_val:])
    if len(train) < 2:
        raise InsufficientDataError(f"fit_local needs at least 3 pairs to choose k, found {n}; set transform.clusters")
    ks = [c for c in (k_grid or K_GRID) if c == 1 or len(train) // c >= d_in + 1]
    errors = []
    for c in ks:
        t = _fit_k(x64[train], y64[train], c, temperature, ridge, g, seed)
        errors.append(relative_l2(t.apply(x64[val]), y64[val]))
    best = ks[int(np.argmin(errors))]
    log.info("fit_local: k %d chosen from %s by held-out relative L2 %s (%d / %d rows)", best, ks,
             [round(e, 4) for e in errors], len(train), n_val)
    t = _fit_k(x64, y64, best, temperature, ridge, g, seed)
    meta = {**t.meta, "k_grid": [int(c) for c in ks], "k_holdout_relative_l2": errors,
            "k_holdout_fraction": HOLDOUT_FRACTION}
    return LocalAffineTransform(t.centroids, t.temperature, t.weight, t.bias, meta=meta)
