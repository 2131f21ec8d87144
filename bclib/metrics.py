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
