"""Fitting one edge B_k (version k -> k-1): family/objective dispatch and the per-edge seam (pure numpy/torch).

`fit_edge` picks the closed form (`bclib.numerics.closed_form`), the local fit
(`bclib.numerics.local_fit`) or the torch fit (`bclib.numerics.torch_fit`, imported only when needed),
in the geometry consumers use: when the target space is unit-norm (detected with `output_norm: auto`,
or forced with `unit`) the fit sees unit-norm inputs and targets and the transform renormalises its
output rows (meta output_norm 'unit'). `fit_one_edge` is the seam the Spark fit step and the
benchmarks share: driver-side samples in, a transform and its held-out metrics out.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Sequence

import numpy as np

from bclib.errors import InsufficientDataError
from bclib.numerics.closed_form import fit_anchored_linear, fit_linear, fit_lowrank, fit_orthogonal, space_geometry
from bclib.numerics.local_fit import fit_local
from bclib.numerics.metrics import mean_cosine, relative_l2
from bclib.numerics.samples import Sample, align_samples
from bclib.numerics.transforms import CONSTANT_DIM_RTOL, AffineTransform, Transform, apply_chain, constant_dims, \
    normalize_rows, pin_dims, truncate_or_pad

if TYPE_CHECKING:  # settings are duck-typed: numerics never imports the config layer
    from bclib.config import FitSettings, TransformSettings

log = logging.getLogger(__name__)


def fit_edge(
    x: np.ndarray,
    y: np.ndarray,
    settings,
    frozen_chains: Sequence[Sequence[Transform]] = (),
    anchors: Sequence[np.ndarray] = (),
) -> Transform:
    """Fit B_k for one edge with the configured family and objective.

    x: (n, d_k) and y: (n, d_{k-1}) paired rows, any float dtype. frozen_chains[i] maps space k-1 to an
    earlier space j_i (the already fitted B_{k-1}, ..., B_{j_i+1}); anchors[i] holds the true z_{j_i}
    for the same rows (anchored objective only). With no earlier transforms the multi-step objectives
    reduce to single-step. `settings` is duck-typed (TransformSettings): kind, objective, ridge, bias,
    rank, scale, output_norm, clusters, temperature, anchor_tolerance, seed and the torch fields.
    Output geometry (`output_geometry`): for a unit-norm target space y (and x, when its space is
    unit-norm) is renormalised before the fit and meta gets output_norm 'unit', so the forward pass
    renormalises; meta also records both spaces' `space_geometry`. The closed forms fit the affine
    part to the unit-norm targets (the renormalisation is applied after); the torch fits train through it.
    With settings.pin_constant_dims, target dimensions constant on the sample (`constant_dims`) are
    pinned to their means (`pin_dims`, meta "pinned_dims").
    Raises ValueError for an unknown kind/objective or missing anchors, and what the fits raise.
    """
    unit, geometry = output_geometry(x, y, settings.output_norm)
    if unit:
        y = normalize_rows(y.astype(np.float64))
        if geometry["source"]["unit_norm"]:
            x = normalize_rows(x.astype(np.float64))
    multi = settings.objective != "single_step" and bool(frozen_chains)
    bias, why = resolve_bias(settings.bias, geometry["source"], geometry["target"], multi)
    if bias != settings.bias:
        settings = _replaced(settings, bias=bias)
    t = _fit_objective(x, y, settings, frozen_chains, anchors, unit)
    if getattr(settings, "pin_constant_dims", False):
        dims, values = constant_dims(y)
        if len(dims):
            t = pin_dims(t, dims, values)
            log.info("fit: target dimension(s) %s are constant on the sample (std < %g x the median): pinned to "
                     "their means", [int(d) for d in dims], CONSTANT_DIM_RTOL)
    return dataclasses.replace(t, meta={**t.meta, "output_norm": "unit" if unit else "none", "geometry": geometry,
                                        "bias": why})


def resolve_bias(bias, source_geometry: dict, target_geometry: dict, multi_step: bool) -> tuple[bool, str]:
    """(fit an intercept?, why) for `transform.bias` True, False or "auto".

    auto: yes when either space is off-centre by `space_geometry` (the mean row's norm above 0.1 x the mean
    row norm; real sentence embeddings: 0.3-0.9, centred factors ~0), except for multi-step objectives,
    whose closed form fits no intercept. The geometries are `space_geometry` dicts of the two samples.
    """
    if bias != "auto":
        return bool(bias), f"configured: {bool(bias)}"
    off = not (source_geometry["centred"] and target_geometry["centred"])
    if multi_step:
        return False, "auto: no intercept for a multi-step objective"
    return off, f"auto: {'intercept (a space is off-centre)' if off else 'none (both spaces centred)'}"


def _replaced(settings, **changes):
    """A copy of duck-typed settings (a dataclass or a plain object) with `changes` applied."""
    if dataclasses.is_dataclass(settings):
        return dataclasses.replace(settings, **changes)
    import copy

    out = copy.copy(settings)
    for k, v in changes.items():
        setattr(out, k, v)
    return out


def output_geometry(x: np.ndarray, y: np.ndarray, output_norm: str) -> tuple[bool, dict]:
    """Whether the fitted map renormalises its output, and both spaces' geometry (JSON-able).

    output_norm: "unit" (always), "none" (never) or "auto" (when y's space is unit-norm by
    `space_geometry`: 99 % of rows within 1e-3 of norm 1). x: (n, d_k), y: (n, d_{k-1}).
    Raises ValueError for another output_norm.
    """
    if output_norm not in ("auto", "unit", "none"):
        raise ValueError(f"output_norm must be 'auto', 'unit' or 'none', found {output_norm!r}")
    geometry = {"source": space_geometry(x), "target": space_geometry(y)}
    unit = output_norm == "unit" or (output_norm == "auto" and geometry["target"]["unit_norm"])
    return unit, geometry


def _fit_objective(x, y, settings, frozen_chains, anchors, unit: bool) -> Transform:
    kind, objective = settings.kind, settings.objective
    if objective == "single_step" or not frozen_chains:
        return _fit_single(x, y, settings, unit)
    chains = [[]] + [list(c) for c in frozen_chains]
    if objective == "multi_step":
        targets = [y] + [apply_chain(c, y.astype(np.float64)) for c in frozen_chains]
    elif objective == "anchored":
        if len(anchors) != len(frozen_chains):
            raise ValueError("the anchored objective needs the true embeddings of every earlier version")
        targets = [y] + list(anchors)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    uniform = [1.0 / len(targets)] * len(targets)
    all_linear = all(link.is_affine and link.bias is None and not link.unit_output for c in frozen_chains for link in c)
    if kind == "linear" and not settings.bias and all_linear:
        # multi_step keeps the paper's uniform step weights; anchored may choose them (ridge: auto)
        weights = uniform if objective == "multi_step" else None
        t = fit_anchored_linear(x, targets, chains, ridge=settings.ridge, weights=weights,
                                anchor_tolerance=settings.anchor_tolerance)
        step = t.meta.get("anchor_weights") or uniform
        return AffineTransform(t.weight, None, "linear", {**t.meta, "objective": objective, "solver": "closed_form",
                                                          "step_weights": [float(w) for w in step]})
    from bclib.numerics.torch_fit import fit_multistep_torch

    if kind == "linear":
        # the closed form (and with it the K-fold choice of step weights within anchor_tolerance) needs frozen
        # links without bias or renormalisation; cosine spaces (sentence embeddings) have both, so say so
        log.info("fit: %s objective by gradient descent (a frozen link has a bias or renormalises its output, or "
                 "an intercept is fitted): uniform step weights, no ridge penalty (transform.ridge only sets the "
                 "single-step starting point)%s", objective,
                 "; anchor_tolerance applies to the closed form only" if objective == "anchored" else "")
    t = fit_multistep_torch(x, targets, chains, settings, unit_output=unit)
    return dataclasses.replace(t, meta={**t.meta, "solver": "gradient_descent", "step_weights": uniform})


def _fit_single(x: np.ndarray, y: np.ndarray, settings, unit: bool = False) -> Transform:
    kind = settings.kind
    if kind == "linear":
        return fit_linear(x, y, ridge=settings.ridge, bias=settings.bias)
    if kind == "orthogonal":
        return fit_orthogonal(x, y, scale=settings.scale, bias=settings.bias)
    if kind == "lowrank":
        return fit_lowrank(x, y, rank=settings.rank, ridge=settings.ridge, bias=settings.bias)
    if kind == "local":
        return fit_local(x, y, k=settings.clusters, temperature=settings.temperature, ridge=settings.ridge,
                         seed=settings.seed)
    if kind == "mlp":
        from bclib.numerics.torch_fit import fit_residual_mlp

        return fit_residual_mlp(x, y, settings, unit_output=unit)
    raise ValueError(f"unknown transform kind {kind!r}")


def _split(hashes: np.ndarray, sample_size: int, holdout_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Take the `sample_size` lowest-hash rows; the top `holdout_fraction` of them by hash is held out."""
    order = np.argsort(hashes, kind="stable")[:sample_size]
    n_hold = max(1, int(round(len(order) * holdout_fraction)))
    return np.sort(order[:-n_hold]), np.sort(order[-n_hold:])


def fit_one_edge(
    samples: dict[int, Sample], versions: list[int], i: int, fitted: dict[int, Transform],
    transform: TransformSettings, fit: FitSettings,
) -> tuple[Transform, dict[str, float]]:
    """Fit the edge versions[i] -> versions[i-1] from driver-side samples (pure numpy/torch, no Spark).

    samples: version -> Sample (same hash window in every version, sorted by id); `fitted` holds the
    already fitted earlier transforms by source version (frozen for multi-step objectives). Returns
    the transform and its fit metrics on the held-out (validation) part of the sample (relative L2, mean
    cosine, the untransformed baseline's relative L2, row counts, seconds), measured on a fit of the
    training part; with `fit.refit_with_validation` (default) the returned transform is then fit again,
    same settings, on training + validation pairs (metrics["refit_rows"]). Raises InsufficientDataError when
    fewer than `fit.min_pairs` sampled entities are in both versions.
    """
    k, prev = versions[i], versions[i - 1]
    ids, x, y, hashes = align_samples(samples[k], samples[prev])
    if len(ids) < fit.min_pairs:
        raise InsufficientDataError(
            f"edge {k} -> {prev}: only {len(ids)} sampled entities are in both versions, "
            f"need fit.min_pairs = {fit.min_pairs}"
        )
    train, hold = _split(hashes, fit.sample_size, fit.holdout_fraction)
    earlier = versions[: i - 1][::-1]  # j = k-2, ..., oldest
    # frozen chain from space k-1 to space j: B_{k-1}, ..., B_{j+1}
    frozen = [[fitted[versions[m]] for m in range(i - 1, versions.index(j), -1)] for j in earlier]
    started = time.time()
    anchors: list[np.ndarray] = []
    x_fit, y_fit = x[train], y[train]
    if transform.objective == "anchored" and earlier:
        x_fit, y_fit, anchors = _anchor_rows(ids[train], x_fit, y_fit, [samples[j] for j in earlier])
    result = fit_edge(x_fit, y_fit, transform, frozen_chains=frozen, anchors=anchors)
    seconds = time.time() - started
    pred = result.apply(x[hold])
    metrics = {
        "holdout_relative_l2": relative_l2(pred, y[hold]),
        "holdout_mean_cosine": mean_cosine(pred, y[hold]),
        "holdout_baseline_relative_l2": relative_l2(truncate_or_pad(x[hold], y.shape[1]), y[hold]),
        "train_rows": float(len(x_fit)),
        "shared_pairs_in_window": float(len(ids)),
        "holdout_rows": float(len(hold)),
        "fit_seconds": seconds,
    }
    log.info("fit: edge %d -> %d (%s, %s): %d train / %d holdout pairs, holdout rel. L2 %.4f "
             "(untransformed %.4f) in %.2fs", k, prev, transform.kind, transform.objective,
             len(x_fit), len(hold), metrics["holdout_relative_l2"], metrics["holdout_baseline_relative_l2"], seconds)
    if getattr(fit, "refit_with_validation", False) and len(hold):
        # the published map is refit on train + validation with the same settings (ridge: auto and the
        # local family's k choose again on the larger set), as scikit-learn's *CV estimators do with
        # refit=True; the metrics above describe the procedure, measured on pairs that fit did not see
        both = np.sort(np.concatenate([train, hold]))
        x_all, y_all, anchors = x[both], y[both], []
        if transform.objective == "anchored" and earlier:
            x_all, y_all, anchors = _anchor_rows(ids[both], x_all, y_all, [samples[j] for j in earlier])
        result = fit_edge(x_all, y_all, transform, frozen_chains=frozen, anchors=anchors)
        metrics["refit_rows"] = float(len(x_all))
        metrics["fit_seconds"] = time.time() - started
        log.info("fit: edge %d -> %d refit on %d train + validation pairs", k, prev, len(x_all))
    return result, metrics


def _anchor_rows(ids: np.ndarray, x: np.ndarray, y: np.ndarray, earlier: list[Sample]):
    """Restrict the training pairs to ids also present in every earlier version; return their true z_j."""
    keep = np.ones(len(ids), dtype=bool)
    for s in earlier:
        keep &= np.isin(ids, s.ids, assume_unique=True)
    kept = ids[keep]
    anchors = [s.vectors[np.searchsorted(s.ids, kept)] for s in earlier]
    log.info("fit: anchored objective on %d of %d pairs present in all earlier versions", len(kept), len(ids))
    return x[keep], y[keep], anchors

