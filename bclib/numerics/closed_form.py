"""Closed-form fits of backward transforms from paired samples (pure numpy).

X is the ver-k sample (rows, d_k) and Y the ver-(k-1) sample (rows, d_{k-1})
for the same entities. Closed forms are solved in float64 with `solve` /
eigen-decompositions, never an explicit inverse. Least squares is the exact
optimum of the paper's post-hoc linear objective (Hu et al., KDD 2022, eq. 4).

A numeric `ridge` is scale-free (λ = ridge × mean eigenvalue of XᵀX, `ridge_penalty`); `ridge="auto"`
chooses it from `RIDGE_GRID`: by generalised cross-validation for linear and low-rank fits
(`select_ridge`), by K-fold cross-validation on the anchored objective (`select_anchored`). What was
chosen, and the curve it was chosen from, go into the transform's meta (JSON-able) for the registry.
"""

from __future__ import annotations

import logging
import math
from typing import Optional, Sequence, Union

import numpy as np

from bclib.errors import DimensionMismatchError, InsufficientDataError
from bclib.numerics.transforms import AffineTransform, Transform, apply_chain, collapse

log = logging.getLogger(__name__)

Ridge = Union[float, str]  # a scale-free value >= 0, or "auto"
# "auto" chooses from 0 and 29 log-spaced values 1e-6 .. 10, four per decade (scale-free: × the mean eigenvalue
# of XᵀX). Four per decade, not two: on real sentence-embedding upgrades GCV's optimum sits near 0.5, between
# a 14-value grid's 0.24 and 0.84 (benchmarks/real_models.py); GCV is one spectrum plus a cheap curve,
# so the finer grid costs almost nothing (the anchored K-fold solves once per value: twice the solves).
RIDGE_GRID: tuple[float, ...] = (0.0,) + tuple(float(v) for v in np.logspace(-6, 1, 29))
ANCHOR_W0 = (0.5, 0.75, 0.9)  # 1-hop weights tried besides uniform 1/m by the anchored "auto" (rest spread evenly)
ILL_CONDITIONED = 1e6  # an unregularised fit of a design this ill-conditioned is logged (ridge: auto is suggested)
UNRELIABLE_SOLVE = 1e10  # GCV does not offer ridge 0 when the design's condition number exceeds this
UNIT_NORM_TOL = 1e-3  # space_geometry: a row is unit-norm when | ||y|| - 1 | <= this ...
UNIT_NORM_FRACTION = 0.99  # ... and a space is when at least this fraction of its rows are
CENTRED_TOL = 0.1  # space_geometry: centred when ||mean row|| <= this × the mean row norm


def json_float(value: float) -> Optional[float]:
    """A float for JSON meta: finite values as Python floats, inf/NaN as None."""
    value = float(value)
    return value if math.isfinite(value) else None


def ridge_grid(grid: Optional[Sequence[float]] = None) -> np.ndarray:
    """The candidate ridges (scale-free) as a float64 array: `grid`, or RIDGE_GRID when None.

    Raises ValueError for an empty grid or a negative or non-finite value.
    """
    g = np.asarray(RIDGE_GRID if grid is None else grid, dtype=np.float64).reshape(-1)
    if not len(g) or not np.isfinite(g).all() or (g < 0).any():
        raise ValueError(f"a ridge grid needs at least one finite value >= 0, found {g.tolist()}")
    return g


def fixed_ridge(ridge: Ridge) -> float:
    """An explicit (scale-free) ridge as a float; ValueError for 'auto', None, NaN/Inf or a negative value."""
    if isinstance(ridge, str) or ridge is None or not math.isfinite(float(ridge)) or float(ridge) < 0:
        raise ValueError(f"ridge must be a finite number >= 0 or 'auto', found {ridge!r}")
    return float(ridge)


def condition_number(x: np.ndarray) -> float:
    """The 2-norm condition number σ_max / σ_min of x (rows, d), any float dtype (computed in float64).

    It is inf when x has fewer rows than columns or a zero singular value (XᵀX singular); the normal
    equations of a least-squares fit on x have the square of it. Raises DimensionMismatchError for a
    non-2-D x. (Golub & Van Loan, Matrix Computations, 4th ed., section 2.6.)
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise DimensionMismatchError(f"condition_number expects a 2-D array, found shape {x.shape}")
    if x.shape[0] < x.shape[1] or x.shape[1] == 0:
        return math.inf
    return _condition(np.linalg.svd(x.astype(np.float64), compute_uv=False))


def _condition(s: np.ndarray) -> float:
    if not len(s) or s[-1] <= 0:
        return math.inf
    return float(s[0] / s[-1])


def _gram_condition(gram: np.ndarray) -> float:
    """sqrt(λ_max / λ_min) of XᵀX: X's condition number without another pass over the rows.

    Accurate while it is well below 1/sqrt(machine epsilon) (~1e7); beyond that it only says "large" (or inf).
    """
    e = np.linalg.eigvalsh(gram)
    return math.sqrt(e[-1] / e[0]) if len(e) and e[0] > 0 else math.inf


def space_geometry(y: np.ndarray) -> dict:
    """Geometry of an embedding space from a sample y (rows, d), any float dtype.

    Returns {"unit_norm": bool, "centred": bool, "mean_norm": float}: unit_norm when at least 99 % of
    the rows have an L2 norm within 1e-3 of 1; centred when the norm of the mean row is at most 0.1 ×
    the mean row norm; mean_norm the mean of the row norms. Raises DimensionMismatchError for a
    non-2-D or empty y.
    """
    y = np.asarray(y)
    if y.ndim != 2 or not len(y):
        raise DimensionMismatchError(f"space_geometry expects a non-empty 2-D sample, found shape {y.shape}")
    y64 = y.astype(np.float64)
    norms = np.sqrt(np.einsum("ij,ij->i", y64, y64))
    mean_norm = float(norms.mean())
    unit = float(np.mean(np.abs(norms - 1.0) <= UNIT_NORM_TOL)) >= UNIT_NORM_FRACTION
    centred = float(np.linalg.norm(y64.mean(axis=0))) <= CENTRED_TOL * mean_norm
    return {"unit_norm": bool(unit), "centred": bool(centred), "mean_norm": mean_norm}


def check_pairs(x: np.ndarray, y: np.ndarray, min_rows: int = 2) -> None:
    """Paired samples X (n, d_in), Y (n, d_out) fit for a solve: DimensionMismatchError for non-2-D arrays or
    different row counts, InsufficientDataError for fewer than `min_rows` rows."""
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


def solve_spd(gram: np.ndarray, rhs: np.ndarray) -> np.ndarray:
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


def _ridge_solve(xc: np.ndarray, yc: np.ndarray, ridge: float, gram: Optional[np.ndarray] = None) -> np.ndarray:
    """W minimising ||Xc W - Yc||² + λ||W||² with λ = ridge_penalty(XᵀX, ridge), via the normal equations."""
    gram = xc.T @ xc if gram is None else gram.copy()
    if ridge:
        gram[np.diag_indices_from(gram)] += ridge_penalty(gram, ridge)
    return solve_spd(gram, xc.T @ yc)


def _affine(weight: np.ndarray, mx: np.ndarray, my: np.ndarray, bias: bool, kind: str, meta: dict) -> AffineTransform:
    b = (my - mx @ weight) if bias else None
    return AffineTransform(weight, b, kind=kind, meta=meta)


# --------------------------------------------------------------------------- ridge: auto (GCV)


def _gcv_spectrum(xc: np.ndarray, yc: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Singular values s of Xc, squared projections ||u_iᵀ Yc||² and the residual of Yc outside range(Xc).

    One Householder QR of [Xc | Yc] (R only, no n-row factor kept) and the SVD of its leading block:
    with [Xc | Yc] = Q [R1 | R2], Xc = (Q U_r) S Vᵀ is the thin SVD of Xc, so UᵀYc = U_rᵀ R2 and
    ||(I − UUᵀ)Yc||² = ||(I − U_r U_rᵀ) R2||² (Golub & Van Loan, section 5.4.4, "R-SVD").
    """
    d = xc.shape[1]
    r = np.linalg.qr(np.hstack([xc, yc]), mode="r")
    r1, r2 = r[:, :d], r[:, d:]
    u, s, _ = np.linalg.svd(r1, full_matrices=False)
    q = u.T @ r2
    outside = r2 - u @ q
    return s, np.einsum("ij,ij->i", q, q), float(np.sum(outside * outside))


def gcv_curve(s2: np.ndarray, proj2: np.ndarray, outside: float, n: float, dof0: float,
               penalties: np.ndarray) -> np.ndarray:
    """GCV(λ) = n·RSS(λ) / (n − dof0 − Σ_i f_i)² with f_i = s_i² / (s_i² + λ), RSS = outside + Σ (1 − f_i)² proj2_i.

    s2: squared singular values of the centred design, proj2: ||u_iᵀY||², outside: ||(I − UUᵀ)Y||², dof0: the
    unpenalised parameters per output (1 for an intercept). inf where n − tr H <= 1e-9·n (an interpolating fit).
    """
    out = np.empty(len(penalties))
    for i, lam in enumerate(penalties):
        denom_s = s2 + lam
        f = np.divide(s2, denom_s, out=np.zeros_like(s2), where=denom_s > 0)
        rss = outside + float(np.sum((1.0 - f) ** 2 * proj2))
        slack = n - dof0 - float(f.sum())
        out[i] = n * rss / slack**2 if slack > 1e-9 * n else math.inf
    return out


def select_ridge(
    x: np.ndarray, y: np.ndarray, bias: bool, grid: Optional[Sequence[float]] = None,
) -> tuple[float, list[float]]:
    """The scale-free ridge from `grid` (default RIDGE_GRID) minimising generalised cross-validation.

    x: (n, d_in), y: (n, d_out), any float dtype (float64 inside); with bias X and Y are centred and the
    intercept adds 1 to tr H. GCV(λ) = n·||(I − H_λ)Y||² / (n − tr H_λ)², H_λ = U diag(s²/(s²+λ)) Uᵀ from one
    SVD of the centred X (via `_gcv_spectrum`), λ = ridge × mean eigenvalue of XᵀX (`ridge_penalty`). Ridge 0
    is not offered when X's condition number exceeds UNRELIABLE_SOLVE. Ties go to the smaller ridge.
    Returns (ridge, curve): the chosen grid value and GCV at every grid value (inf where n <= tr H).
    Raises DimensionMismatchError / InsufficientDataError for misaligned or too few pairs, ValueError for a
    bad grid. (Golub, Heath & Wahba, "Generalized cross-validation as a method for choosing a good ridge
    parameter", Technometrics 21(2), 1979.)
    """
    check_pairs(x, y)
    xc, yc, _, _ = _center(x, y, bias)
    ridge, curve, _ = _select_ridge_centred(xc, yc, bias, ridge_grid(grid))
    return ridge, curve


def _select_ridge_centred(xc: np.ndarray, yc: np.ndarray, bias: bool, grid: np.ndarray):
    """select_ridge on already-centred X, Y: (ridge, curve as a list of floats, condition number of Xc)."""
    n, d = xc.shape
    s, proj2, outside = _gcv_spectrum(xc, yc)
    s2 = s * s
    mean_eig = float(s2.sum()) / max(d, 1)  # = trace(XᵀX) / d, the `ridge_penalty` scale
    cond = _condition(s) if n >= d else math.inf
    curve = gcv_curve(s2, proj2, outside, float(n), float(bias), grid * mean_eig)
    if cond > UNRELIABLE_SOLVE:
        curve[grid == 0] = math.inf
    if not np.isfinite(curve).any():
        raise InsufficientDataError(
            f"ridge: auto found no usable ridge in the grid for {n} pairs of dimension {d}: every candidate "
            "interpolates the training pairs; fit on more pairs (fit.sample_size)"
        )
    best = int(np.argmin(curve))
    return float(grid[best]), [float(v) for v in curve], cond


def _require_determined(n: int, d_in: int, bias: bool, what: str) -> None:
    """Ridge 0 needs at least one pair per parameter of each output (d_in, +1 with a bias)."""
    need = d_in + int(bias)
    if n < need:
        raise InsufficientDataError(
            f"{what} with ridge 0: {n} training pairs for {need} parameters per output dimension "
            f"({d_in} input dimensions{' + bias' if bias else ''}), need at least {need} pairs; sample more "
            "pairs (fit.sample_size) or set transform.ridge: auto to regularise"
        )


def _ridge_for(xc: np.ndarray, yc: np.ndarray, ridge: Ridge, bias: bool, what: str,
               grid: Optional[Sequence[float]], gram: np.ndarray) -> tuple[float, dict]:
    """The ridge to solve with, and the meta recording how it was chosen (GCV curve for 'auto')."""
    if isinstance(ridge, str) and ridge == "auto":
        g = ridge_grid(grid)
        chosen, curve, cond = _select_ridge_centred(xc, yc, bias, g)
        log.info("%s: ridge auto chose %.3g by GCV over %d values (%d pairs, %d input dims, condition number %.3g)",
                 what, chosen, len(g), xc.shape[0], xc.shape[1], cond)
        return chosen, {"ridge": chosen, "ridge_mode": "auto", "ridge_grid": [float(v) for v in g],
                        "gcv": [json_float(v) for v in curve], "condition_number": json_float(cond)}
    chosen = fixed_ridge(ridge)
    cond = _gram_condition(gram) if xc.shape[0] >= xc.shape[1] else math.inf
    if chosen == 0:
        _require_determined(xc.shape[0], xc.shape[1], bias, what)
        if cond > ILL_CONDITIONED:
            log.warning("%s: ridge 0 on a design with condition number %.3g; the fit may be unstable "
                        "(consider transform.ridge: auto)", what, cond)
    return chosen, {"ridge": chosen, "ridge_mode": "fixed", "condition_number": json_float(cond)}


def fit_linear(
    x: np.ndarray, y: np.ndarray, ridge: Ridge = 0.0, bias: bool = False, grid: Optional[Sequence[float]] = None,
) -> AffineTransform:
    """Least squares min ||XW (+b) - Y||² + λ||W||², closed form (the paper's post-hoc optimum, eq. 4).

    x: (n, d_in), y: (n, d_out), any float dtype (solved in float64); returns an AffineTransform with
    float64 weight (d_in, d_out) and bias (d_out,) or None. `ridge` is scale-free: λ = ridge × mean
    eigenvalue of XᵀX (`ridge_penalty`), or "auto": chosen by GCV from `grid` (`select_ridge`). With bias,
    X and Y are centred first. meta: ridge (the value used), ridge_mode, bias, condition_number of the
    (centred) X, and for "auto" ridge_grid and gcv (the curve; None where infinite).
    Raises DimensionMismatchError for misaligned pairs, InsufficientDataError for fewer than 2 pairs or, with
    ridge 0, fewer pairs than parameters per output (d_in, +1 with bias), ValueError for a negative ridge.
    """
    check_pairs(x, y)
    xc, yc, mx, my = _center(x, y, bias)
    gram = xc.T @ xc
    chosen, meta = _ridge_for(xc, yc, ridge, bias, "fit_linear", grid, gram)
    weight = _ridge_solve(xc, yc, chosen, gram)
    return _affine(weight, mx, my, bias, "linear", {**meta, "bias": bias})


def fit_orthogonal(x: np.ndarray, y: np.ndarray, scale: bool = True, bias: bool = False) -> AffineTransform:
    """Procrustes: W with orthonormal columns (or rows, if d_in < d_out) via SVD of XᵀY, optional global scale."""
    check_pairs(x, y)
    xc, yc, mx, my = _center(x, y, bias)
    u, s, vt = np.linalg.svd(xc.T @ yc, full_matrices=False)
    weight = u @ vt
    mapped = xc @ weight
    factor = float(np.sum(mapped * yc) / max(np.sum(mapped * mapped), 1e-300)) if scale else 1.0
    weight = weight * factor
    return _affine(weight, mx, my, bias, "orthogonal", {"scale": factor, "bias": bias})


def fit_lowrank(
    x: np.ndarray, y: np.ndarray, rank: int, ridge: Ridge = 0.0, bias: bool = True,
    grid: Optional[Sequence[float]] = None,
) -> AffineTransform:
    """Reduced-rank regression: the (ridge) least-squares fit projected on the top-`rank` directions of its fit.

    x: (n, d_in), y: (n, d_out), any float dtype (float64 inside); weight (d_in, d_out) of rank <= `rank`.
    `ridge` as in `fit_linear` ("auto": GCV of the full-rank ridge fit, `select_ridge`), recorded in meta
    with the condition number. (Izenman, "Reduced-rank regression for the multivariate linear model",
    J. Multivariate Analysis 5, 1975.) Raises DimensionMismatchError for a rank outside [1, min(d_in, d_out)]
    or misaligned pairs, InsufficientDataError as `fit_linear`.
    """
    check_pairs(x, y)
    if not 1 <= rank <= min(x.shape[1], y.shape[1]):
        raise DimensionMismatchError(
            f"rank must be in [1, {min(x.shape[1], y.shape[1])}] for {x.shape[1]}->{y.shape[1]}, found {rank}"
        )
    xc, yc, mx, my = _center(x, y, bias)
    gram = xc.T @ xc
    chosen, meta = _ridge_for(xc, yc, ridge, bias, "fit_lowrank", grid, gram)
    w_ols = _ridge_solve(xc, yc, chosen, gram)
    fitted = xc @ w_ols
    # top right-singular vectors of the fitted values = top eigenvectors of fittedᵀfitted
    evals, evecs = np.linalg.eigh(fitted.T @ fitted)
    v = evecs[:, np.argsort(evals)[::-1][:rank]]
    weight = w_ols @ v @ v.T
    return _affine(weight, mx, my, bias, "lowrank", {**meta, "rank": rank, "bias": bias})


def _anchor_maps(x: np.ndarray, targets: Sequence[np.ndarray],
                 frozen_chains: Sequence[Sequence[Transform]]) -> list[np.ndarray]:
    """C_j (d_out, d_j) in float64 for every target: the collapsed frozen chain's matrix, or the identity."""
    if len(targets) != len(frozen_chains) or not targets:
        raise ValueError("targets and frozen_chains must be non-empty and the same length")
    for z in targets:
        check_pairs(x, z)
    maps: list[np.ndarray] = []
    for z, chain in zip(targets, frozen_chains):
        links = collapse(chain) if chain else []
        if any(not link.is_affine or link.bias is not None or link.unit_output for link in links):
            raise ValueError("anchored closed form needs linear links without bias or output renormalisation; "
                             "use the torch objective")
        c = links[0].weight.astype(np.float64) if links else np.eye(z.shape[1])
        if c.shape[1] != z.shape[1]:
            raise DimensionMismatchError(
                f"frozen chain outputs dimension {c.shape[1]} but its target has {z.shape[1]}"
            )
        if maps and c.shape[0] != maps[0].shape[0]:
            raise DimensionMismatchError(
                f"frozen chains disagree on the fitted map's output dimension: {c.shape[0]} vs {maps[0].shape[0]}")
        maps.append(c)
    return maps


def _step_weights(weights: Optional[Sequence[float]], m: int) -> np.ndarray:
    w = np.full(m, 1.0 / m) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if len(w) != m or not np.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"anchored weights must be {m} finite values >= 0 with a positive sum, found {w.tolist()}")
    return w


class _AnchoredSystem:
    """G = XᵀX and P_j = Xᵀ Z_j C_jᵀ for one set of rows; solves G B A + λB = Σ w_j P_j for many (w, ridge)."""

    def __init__(self, gram: np.ndarray, cross: list[np.ndarray], maps: list[np.ndarray]) -> None:
        self.gram, self.cross, self.maps = gram, cross, maps
        self.s, self.u = np.linalg.eigh(gram)

    @classmethod
    def of(cls, x64: np.ndarray, targets: Sequence[np.ndarray], maps: list[np.ndarray]) -> "_AnchoredSystem":
        return cls(x64.T @ x64, [x64.T @ (z.astype(np.float64) @ c.T) for z, c in zip(targets, maps)], maps)

    def solve(self, w: np.ndarray, ridges: Sequence[float]) -> list[np.ndarray]:
        """B for every ridge: with G = U S Uᵀ and A = V T Vᵀ, B = U [(Uᵀ R V) / (s_i t_j + λ)] Vᵀ."""
        a = sum(wi * (c @ c.T) for wi, c in zip(w, self.maps))
        r = sum(wi * p for wi, p in zip(w, self.cross))
        t, v = np.linalg.eigh(a)
        rhs = self.u.T @ r @ v
        st = np.outer(self.s, t)
        out = []
        for ridge in ridges:
            denom = st + anchored_penalty(self.gram, a, ridge)
            tiny = np.abs(denom) < 1e-12 * max(np.abs(denom).max(), 1.0)
            inner = np.where(tiny, 0.0, rhs / np.where(tiny, 1.0, denom))  # pseudo-inverse on null directions
            out.append(self.u @ inner @ v.T)
        return out


def fit_anchored_linear(
    x: np.ndarray,
    targets: Sequence[np.ndarray],
    frozen_chains: Sequence[Sequence[Transform]],
    ridge: Ridge = 0.0,
    weights: Optional[Sequence[float]] = None,
    anchor_tolerance: float = 0.02,
    grid: Optional[Sequence[float]] = None,
    folds: int = 5,
) -> AffineTransform:
    """Anchored multi-step: B minimising Σ_j w_j ||X B C_j - Z_j||² + λ ||B||².

    x: (n, d_in); targets[i] (n, d_j) is the true Z_j for the same rows as X and frozen_chains[i]
    the frozen links C_j from space k-1 to space j (empty for j = k-1); all
    links must be linear without bias or output renormalisation. Setting the gradient to zero gives the
    Sylvester-type equation  G B A + λB = Xᵀ R  with G = XᵀX,
    A = Σ w_j C_j C_jᵀ and R = Σ w_j Z_j C_jᵀ. With G = U S Uᵀ and
    A = V T Vᵀ it decouples: B = U [(Uᵀ Xᵀ R V) / (s_i t_j + λ)] Vᵀ (pseudo-inverse on null directions).
    `ridge` is scale-free: λ = ridge × mean eigenvalue of G × mean eigenvalue of A. Weights default to
    uniform 1/m. With ridge="auto" the ridge (and, when `weights` is None, the step weights) come from
    `select_anchored` (K-fold on these rows, `folds`, `anchor_tolerance`, `grid`), recorded in meta.
    Returns an AffineTransform (d_in, d_k-1) without bias, float64. Raises ValueError for mismatched
    lists, non-linear links or bad weights, DimensionMismatchError / InsufficientDataError for bad pairs.
    (Beyond Hu et al., KDD 2022: their eq. 6 with the true z_j in place of C_j(z_{k-1}).)
    """
    maps = _anchor_maps(x, targets, frozen_chains)
    x64 = x.astype(np.float64)
    meta: dict = {"objective": "anchored"}
    if isinstance(ridge, str) and ridge == "auto":
        chosen = select_anchored(x, targets, frozen_chains, weights=weights, grid=grid, folds=folds,
                                 tolerance=anchor_tolerance)
        ridge_value, w = chosen["ridge"], np.asarray(chosen["anchor_weights"])
        meta.update(chosen)
    else:
        ridge_value, w = fixed_ridge(ridge), _step_weights(weights, len(targets))
        meta.update({"ridge": ridge_value, "ridge_mode": "fixed", "anchor_weights": [float(v) for v in w]})
    system = _AnchoredSystem.of(x64, targets, maps)
    meta["condition_number"] = json_float(_gram_condition(system.gram) if x64.shape[0] >= x64.shape[1] else math.inf)
    weight = system.solve(w, [ridge_value])[0]
    return AffineTransform(weight, None, kind="linear", meta=meta)


def anchor_weight_candidates(m: int) -> list[list[float]]:
    """Step weights the anchored "auto" tries for m steps: uniform, then w_0 in ANCHOR_W0 above 1/m, the rest even."""
    out = [[1.0 / m] * m]
    for w0 in ANCHOR_W0:
        if m > 1 and w0 > 1.0 / m + 1e-12:
            out.append([w0] + [(1.0 - w0) / (m - 1)] * (m - 1))
    return out


def select_anchored(
    x: np.ndarray,
    targets: Sequence[np.ndarray],
    frozen_chains: Sequence[Sequence[Transform]],
    weights: Optional[Sequence[float]] = None,
    grid: Optional[Sequence[float]] = None,
    folds: int = 5,
    tolerance: float = 0.02,
) -> dict:
    """Ridge and step weights of the anchored objective by K-fold cross-validation on the training rows.

    x, targets, frozen_chains as in `fit_anchored_linear`. Folds are deterministic: row i is in fold
    i mod K (K = min(folds, n)). For every candidate (weights, ridge) the closed form is fitted on K-1
    folds and scored on the held-out fold; the hop-j error is the pooled relative L2 (as `relative_l2`)
    sqrt(Σ_folds ||X_v B C_j − Z_j||² / Σ_folds ||Z_j||²), computed from d×d statistics of each fold. The
    single-step reference is w = (1, 0, ..., 0) with its best ridge ("single_step_cv_error", its hop-1
    error). Weights: `weights` if given (then only the ridge is chosen, no constraint), else
    `anchor_weight_candidates(m)`; the choice is the lowest mean error over all m hops among candidates
    whose hop-1 error is at most (1 + tolerance) × the single-step reference; when none qualifies, the
    single-step reference itself ("fallback": True).
    Returns a JSON-able dict: ridge, anchor_weights, ridge_mode "auto", ridge_grid, cv_folds,
    anchor_tolerance, cv_hop_errors (chosen), single_step_cv_error, fallback, weight_candidates and
    cv_mean_errors (per candidate, per grid value; None where not finite).
    Raises ValueError / DimensionMismatchError / InsufficientDataError as `fit_anchored_linear`.
    """
    maps = _anchor_maps(x, targets, frozen_chains)
    g = ridge_grid(grid)
    n, m = x.shape[0], len(targets)
    k = int(min(max(folds, 2), n))
    x64 = x.astype(np.float64)
    fold_of = np.arange(n) % k
    total = _AnchoredSystem.of(x64, targets, maps)
    fold_stats = []  # per fold: the training system (all rows but the fold's) and the fold's own statistics
    for f in range(k):
        rows = fold_of == f
        xf, zf = x64[rows], [z[rows] for z in targets]
        gram_f = xf.T @ xf
        cross_f = [xf.T @ (z.astype(np.float64) @ c.T) for z, c in zip(zf, maps)]
        norms_f = [float(np.sum(z.astype(np.float64) ** 2)) for z in zf]
        train = _AnchoredSystem(total.gram - gram_f, [p - pf for p, pf in zip(total.cross, cross_f)], maps)
        fold_stats.append((train, gram_f, cross_f, norms_f))
    cc = [c @ c.T for c in maps]

    def hop_errors(w: np.ndarray) -> np.ndarray:
        """(len(grid), m) pooled relative errors of the candidate weights w at every grid ridge."""
        sse = np.zeros((len(g), m))
        ref = np.zeros(m)
        for train, gram_f, cross_f, norms_f in fold_stats:
            ref += norms_f
            for i, b in enumerate(train.solve(w, g)):
                quad = b.T @ (gram_f @ b)  # Bᵀ G_v B
                for j in range(m):  # ||X_v B C_j − Z_j||² = <Bᵀ G_v B, C_j C_jᵀ> − 2 <B, X_vᵀ Z_j C_jᵀ> + ||Z_j||²
                    sse[i, j] += float(np.sum(quad * cc[j]) - 2 * np.sum(b * cross_f[j]) + norms_f[j])
        return np.sqrt(np.maximum(sse, 0.0) / np.maximum(ref, 1e-300))

    single_w = np.zeros(m)
    single_w[0] = 1.0
    single = hop_errors(single_w)[:, 0]
    best_single = int(np.argmin(single))
    reference = float(single[best_single])
    fixed = weights is not None
    candidates = [list(_step_weights(weights, m))] if fixed else anchor_weight_candidates(m)
    table, choice = [], None
    for ci, cand in enumerate(candidates):
        errs = hop_errors(np.asarray(cand))
        means = errs.mean(axis=1)
        table.append(means)
        for gi in range(len(g)):
            ok = fixed or errs[gi, 0] <= (1.0 + tolerance) * reference
            if ok and np.isfinite(means[gi]) and (choice is None or means[gi] < choice[0]):
                choice = (float(means[gi]), ci, gi, errs[gi])
    fallback = choice is None
    if fallback:
        chosen_w, gi, hop = [float(v) for v in single_w], best_single, hop_errors(single_w)[best_single]
    else:
        _, ci, gi, hop = choice
        chosen_w = [float(v) for v in candidates[ci]]
    log.info("anchored ridge auto: ridge %.3g, weights %s (%d-fold, hop-1 error %.4g vs single-step %.4g%s)",
             g[gi], [round(v, 3) for v in chosen_w], k, hop[0], reference, ", fallback" if fallback else "")
    return {
        "ridge": float(g[gi]), "anchor_weights": chosen_w, "ridge_mode": "auto",
        "ridge_grid": [float(v) for v in g], "cv_folds": k, "anchor_tolerance": float(tolerance),
        "cv_hop_errors": [json_float(v) for v in hop], "single_step_cv_error": json_float(reference),
        "fallback": bool(fallback), "weight_candidates": [[float(v) for v in c] for c in candidates],
        "cv_mean_errors": [[json_float(v) for v in row] for row in table],
    }


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
