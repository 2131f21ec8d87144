"""Closed-form fits of backward transforms from paired samples (pure numpy).

X is the ver-k sample (rows, d_k) and Y the ver-(k-1) sample (rows, d_{k-1})
for the same entities. Closed forms are solved in float64 with `solve` /
eigen-decompositions, never an explicit inverse. Least squares is the exact
optimum of the paper's post-hoc linear objective (Hu et al., KDD 2022, eq. 4).
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import numpy as np

from bclib.errors import DimensionMismatchError, InsufficientDataError
from bclib.numerics.transforms import AffineTransform, Transform, apply_chain, collapse

log = logging.getLogger(__name__)


def _check_pairs(x: np.ndarray, y: np.ndarray, min_rows: int = 2) -> None:
    if x.ndim != 2 or y.ndim != 2:
        raise DimensionMismatchError(f"X and Y must be 2-D, found shapes {x.shape} and {y.shape}")
    if x.shape[0] != y.shape[0]:
        raise DimensionMismatchError(f"X has {x.shape[0]} rows but Y has {y.shape[0]}; pairs must align")
    if x.shape[0] < min_rows:
        raise InsufficientDataError(f"need at least {min_rows} paired rows to fit, found {x.shape[0]}")


def _center(x: np.ndarray, y: np.ndarray, bias: bool):
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    if not bias:
        return x64, y64, np.zeros(x.shape[1]), np.zeros(y.shape[1])
    mx, my = x64.mean(axis=0), y64.mean(axis=0)
    return x64 - mx, y64 - my, mx, my


def _solve_spd(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    """Solve gram @ W = rhs for a symmetric PSD gram; least squares if singular."""
    try:
        return np.linalg.solve(gram, rhs)
    except np.linalg.LinAlgError:
        log.warning("Gram matrix is singular; falling back to least squares (consider ridge > 0)")
        return np.linalg.lstsq(gram, rhs, rcond=None)[0]


def ridge_penalty(gram: np.ndarray, ridge: float) -> float:
    """The absolute penalty λ for a scale-free `ridge`: ridge × the mean eigenvalue of XᵀX (= trace / d).

    So ridge = 0.01 shrinks by 1 % of the average input variance whatever the embeddings' scale, the
    number of rows or the dimension (unit-norm and raw vectors alike); ridge = 1 equals the mean eigenvalue.
    """
    return float(ridge) * float(np.trace(gram)) / max(gram.shape[0], 1)


def _ridge_solve(xc: np.ndarray, yc: np.ndarray, ridge: float) -> np.ndarray:
    """W minimising ||Xc W - Yc||² + λ||W||² with λ = ridge_penalty(XᵀX, ridge), via the normal equations."""
    gram = xc.T @ xc
    if ridge:
        gram[np.diag_indices_from(gram)] += ridge_penalty(gram, ridge)
    return _solve_spd(gram, xc.T @ yc)


def _affine(weight: np.ndarray, mx: np.ndarray, my: np.ndarray, bias: bool, kind: str, meta: dict) -> AffineTransform:
    b = (my - mx @ weight) if bias else None
    return AffineTransform(weight, b, kind=kind, meta=meta)


def fit_linear(x: np.ndarray, y: np.ndarray, ridge: float = 0.0, bias: bool = False) -> AffineTransform:
    """Least squares min ||XW (+b) - Y||² + λ||W||², closed form (the paper's post-hoc optimum, eq. 4).

    x: (n, d_in), y: (n, d_out), any float dtype (solved in float64). `ridge` is scale-free:
    λ = ridge × mean eigenvalue of XᵀX (`ridge_penalty`). With bias, X and Y are centred first.
    Raises DimensionMismatchError / InsufficientDataError for misaligned or too few pairs.
    """
    _check_pairs(x, y)
    xc, yc, mx, my = _center(x, y, bias)
    weight = _ridge_solve(xc, yc, ridge)
    return _affine(weight, mx, my, bias, "linear", {"ridge": ridge, "bias": bias})


def fit_orthogonal(x: np.ndarray, y: np.ndarray, scale: bool = True, bias: bool = False) -> AffineTransform:
    """Procrustes: W with orthonormal columns (or rows, if d_in < d_out) via SVD of XᵀY, optional global scale."""
    _check_pairs(x, y)
    xc, yc, mx, my = _center(x, y, bias)
    u, s, vt = np.linalg.svd(xc.T @ yc, full_matrices=False)
    weight = u @ vt
    mapped = xc @ weight
    factor = float(np.sum(mapped * yc) / max(np.sum(mapped * mapped), 1e-300)) if scale else 1.0
    weight = weight * factor
    return _affine(weight, mx, my, bias, "orthogonal", {"scale": factor, "bias": bias})


def fit_lowrank(x: np.ndarray, y: np.ndarray, rank: int, ridge: float = 0.0, bias: bool = True) -> AffineTransform:
    """Reduced-rank regression: the OLS fit projected onto the top-`rank` directions of its fitted values."""
    _check_pairs(x, y)
    if not 1 <= rank <= min(x.shape[1], y.shape[1]):
        raise DimensionMismatchError(
            f"rank must be in [1, {min(x.shape[1], y.shape[1])}] for {x.shape[1]}->{y.shape[1]}, found {rank}"
        )
    xc, yc, mx, my = _center(x, y, bias)
    w_ols = _ridge_solve(xc, yc, ridge)
    fitted = xc @ w_ols
    # top right-singular vectors of the fitted values = top eigenvectors of fittedᵀfitted
    evals, evecs = np.linalg.eigh(fitted.T @ fitted)
    v = evecs[:, np.argsort(evals)[::-1][:rank]]
    weight = w_ols @ v @ v.T
    return _affine(weight, mx, my, bias, "lowrank", {"rank": rank, "ridge": ridge, "bias": bias})


def fit_anchored_linear(
    x: np.ndarray,
    targets: Sequence[np.ndarray],
    frozen_chains: Sequence[Sequence[Transform]],
    ridge: float = 0.0,
    weights: Optional[Sequence[float]] = None,
) -> AffineTransform:
    """Anchored multi-step: B minimising Σ_j w_j ||X B C_j - Z_j||² + ridge ||B||².

    targets[i] is the true Z_j for the same rows as X and frozen_chains[i]
    the frozen links C_j from space k-1 to space j (empty for j = k-1); all
    links must be linear without bias. Setting the gradient to zero gives the
    Sylvester-type equation  G B A + λB = Xᵀ R  with G = XᵀX,
    A = Σ w_j C_j C_jᵀ and R = Σ w_j Z_j C_jᵀ. With G = U S Uᵀ and
    A = V T Vᵀ it decouples: B = U [(Uᵀ Xᵀ R V) / (s_i t_j + λ)] Vᵀ.
    `ridge` is scale-free: λ = ridge × mean eigenvalue of G × mean eigenvalue of A.
    """
    if len(targets) != len(frozen_chains) or not targets:
        raise ValueError("targets and frozen_chains must be non-empty and the same length")
    for z in targets:
        _check_pairs(x, z)
    w = np.full(len(targets), 1.0 / len(targets)) if weights is None else np.asarray(weights, dtype=np.float64)
    x64 = x.astype(np.float64)
    d_out = None
    a = r = None
    for wi, z, chain in zip(w, targets, frozen_chains):
        links = collapse(chain) if chain else []
        if any(not link.is_affine or link.bias is not None for link in links):
            raise ValueError("anchored closed form needs linear links without bias; use the torch objective")
        if links:
            c = links[0].weight.astype(np.float64)
        else:
            c = np.eye(z.shape[1])
        if c.shape[1] != z.shape[1]:
            raise DimensionMismatchError(
                f"frozen chain outputs dimension {c.shape[1]} but its target has {z.shape[1]}"
            )
        d_out = c.shape[0] if d_out is None else d_out
        if c.shape[0] != d_out:
            raise DimensionMismatchError(f"frozen chains disagree on the fitted map's output dimension: {c.shape[0]} vs {d_out}")
        a = wi * (c @ c.T) if a is None else a + wi * (c @ c.T)
        term = wi * (z.astype(np.float64) @ c.T)
        r = term if r is None else r + term
    gram = x64.T @ x64
    s, u = np.linalg.eigh(gram)
    t, v = np.linalg.eigh(a)
    rhs = u.T @ (x64.T @ r) @ v
    denom = np.outer(s, t) + anchored_penalty(gram, a, ridge)
    tiny = np.abs(denom) < 1e-12 * max(np.abs(denom).max(), 1.0)
    inner = np.where(tiny, 0.0, rhs / np.where(tiny, 1.0, denom))  # pseudo-inverse on null directions
    weight = u @ inner @ v.T
    return AffineTransform(weight, None, kind="linear", meta={"objective": "anchored", "ridge": ridge})


def anchored_penalty(gram: np.ndarray, a: np.ndarray, ridge: float) -> float:
    """λ of the anchored objective for a scale-free `ridge`: ridge × mean eig(XᵀX) × mean eig(A)."""
    return ridge_penalty(gram, ridge) * float(np.trace(a)) / max(a.shape[0], 1)


def anchored_objective(
    weight: np.ndarray, x: np.ndarray, targets: Sequence[np.ndarray], frozen_chains: Sequence[Sequence[Transform]],
    ridge: float = 0.0, weights: Optional[Sequence[float]] = None,
) -> tuple[float, np.ndarray]:
    """The anchored objective and its gradient in B (for optimality checks)."""
    w = np.full(len(targets), 1.0 / len(targets)) if weights is None else np.asarray(weights, dtype=np.float64)
    x64 = x.astype(np.float64)
    a = sum(wi * ((collapse(c)[0].weight @ collapse(c)[0].weight.T) if c else np.eye(z.shape[1]))
            for wi, z, c in zip(w, targets, frozen_chains))
    lam = anchored_penalty(x64.T @ x64, a, ridge)
    value = lam * float(np.sum(weight * weight))
    grad = 2 * lam * weight
    for wi, z, chain in zip(w, targets, frozen_chains):
        pred = apply_chain(chain, x64 @ weight) if chain else x64 @ weight
        resid = pred - z
        value += wi * float(np.sum(resid * resid))
        c = collapse(chain)[0].weight if chain else np.eye(z.shape[1])
        grad += 2 * wi * x64.T @ resid @ c.T
    return value, grad
