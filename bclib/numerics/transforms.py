"""Transform families: numpy forward passes, composition and collapse of chains.

Convention: row vectors. A transform maps X (rows, dim_in) to (rows, dim_out);
an affine link is X @ weight + bias with weight of shape (dim_in, dim_out).
A chain is a list of links in *application* order: for z_k -> z_j that is
[B_k, B_{k-1}, ..., B_{j+1}] (Hu et al., KDD 2022, section 3: B_{j+1} o ... o B_k).

A link whose meta says `output_norm: "unit"` renormalises its output rows to unit length (the fit found
the target space unit-norm, as for cosine-similarity consumers). That normalisation is part of the link's
forward pass, so a run of affine links collapses into one matrix only where no intermediate link
renormalises (`collapse`).

Executors only need numpy: every family's forward pass lives here. Serialisation is in
`bclib.numerics.serialization`, the executor kernel in `bclib.numerics.kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np

from bclib.errors import DimensionMismatchError

AFFINE_KINDS = ("linear", "orthogonal", "lowrank", "composed")
KINDS = AFFINE_KINDS + ("mlp", "local")

NORM_EPS = 1e-12  # rows shorter than this are divided by it (zero rows stay zero), as torch's F.normalize
LOCAL_CHUNK_VALUES = 1 << 24  # local forward: at most this many (row, cluster, output) values per GEMM


def check_input(x: np.ndarray, dim_in: int, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != dim_in:
        raise DimensionMismatchError(
            f"{what} expects input of shape (rows, {dim_in}), found {tuple(x.shape)}"
        )


def normalize_rows(y: np.ndarray) -> np.ndarray:
    """Divide every row of y (rows, d) by its L2 norm, in place; returns y (same dtype).

    Rows with norm below NORM_EPS are divided by NORM_EPS (a zero row stays zero), the convention of
    torch.nn.functional.normalize, so the torch twins (`bclib.numerics.torch_links`) agree exactly.
    """
    norms = np.sqrt(np.einsum("ij,ij->i", y, y))
    np.maximum(norms, NORM_EPS, out=norms)
    y /= norms[:, None]
    return y


def output_is_unit(meta: dict) -> bool:
    """Whether a link with this meta renormalises its output rows (meta['output_norm'] == 'unit')."""
    return meta.get("output_norm") == "unit"


class _OutputNorm:
    """`unit_output` from the link's meta (shared by every family)."""

    meta: dict

    @property
    def unit_output(self) -> bool:
        return output_is_unit(self.meta)


class _WeightShape(_OutputNorm):
    """dim_in/dim_out from the main weight matrix (shared by every family)."""

    weight: np.ndarray

    @property
    def dim_in(self) -> int:
        return int(self.weight.shape[0])

    @property
    def dim_out(self) -> int:
        return int(self.weight.shape[1])


@dataclass(frozen=True, eq=False)
class AffineTransform(_WeightShape):
    """X @ weight + bias (rows renormalised when meta says output_norm 'unit').

    Linear, orthogonal, low-rank and collapsed chains all take this form. weight (d_in, d_out), bias
    (d_out,) or None; `apply` computes in the input's dtype (float32 in, float32 out).
    """

    weight: np.ndarray
    bias: Optional[np.ndarray] = None
    kind: str = "linear"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight.ndim != 2:
            raise DimensionMismatchError(f"weight must be 2-D, found shape {self.weight.shape}")
        if self.bias is not None and self.bias.shape != (self.weight.shape[1],):
            raise DimensionMismatchError(
                f"bias must have shape ({self.weight.shape[1]},), found {self.bias.shape}"
            )

    @property
    def is_affine(self) -> bool:
        return True

    def apply(self, x: np.ndarray) -> np.ndarray:
        check_input(x, self.dim_in, f"{self.kind} transform")
        y = x @ self.weight.astype(x.dtype, copy=False)
        if self.bias is not None:
            y += self.bias.astype(y.dtype, copy=False)
        return normalize_rows(y) if self.unit_output else y

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"weight": self.weight}
        if self.bias is not None:
            out["bias"] = self.bias
        return out


@dataclass(frozen=True, eq=False)
class ResidualMLPTransform(_WeightShape):
    """y = x @ weight + bias + relu(x @ w1 + b1) @ w2 + b2 (the numpy forward executors run)."""

    weight: np.ndarray
    bias: np.ndarray
    w1: np.ndarray
    b1: np.ndarray
    w2: np.ndarray
    b2: np.ndarray
    kind: str = "mlp"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        d_in, d_out = self.weight.shape
        hidden = self.w1.shape[1]
        expected = {
            "bias": (d_out,), "w1": (d_in, hidden), "b1": (hidden,), "w2": (hidden, d_out), "b2": (d_out,),
        }
        for name, shape in expected.items():
            if getattr(self, name).shape != shape:
                raise DimensionMismatchError(f"mlp '{name}' must have shape {shape}, found {getattr(self, name).shape}")

    @property
    def is_affine(self) -> bool:
        return False

    def apply(self, x: np.ndarray) -> np.ndarray:
        check_input(x, self.dim_in, "mlp transform")
        dt = x.dtype
        hidden = x @ self.w1.astype(dt, copy=False) + self.b1.astype(dt, copy=False)
        np.maximum(hidden, 0, out=hidden)
        y = x @ self.weight.astype(dt, copy=False) + self.bias.astype(dt, copy=False)
        y += hidden @ self.w2.astype(dt, copy=False) + self.b2.astype(dt, copy=False)
        return normalize_rows(y) if self.unit_output else y

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in ("weight", "bias", "w1", "b1", "w2", "b2")}


@dataclass(frozen=True, eq=False)
class LocalAffineTransform(_OutputNorm):
    """Piecewise-affine map: a soft mixture of per-cluster affine maps.

    p(x) = softmax_i(-||x - c_i||² / T) over the k centroids c_i; y = Σ_i p_i(x) (x W_i + b_i), rows
    renormalised when meta says output_norm 'unit'. centroids (k, d_in), temperature T > 0 (float),
    weight (k, d_in, d_out), bias (k, d_out). The softmax drops the per-row constant ||x||² and subtracts
    the row maximum, so it neither overflows nor underflows to 0/0. `apply` computes in the input's dtype
    with two GEMMs: x @ centroidsᵀ (distances) and x @ the (d_in, k·d_out) concatenation of the W_i.
    Not affine: a chain keeps it as its own link. (A mixture of local linear experts, as in Jacobs et al.,
    "Adaptive mixtures of local experts", 1991, with k-means gating.)
    """

    centroids: np.ndarray
    temperature: float
    weight: np.ndarray
    bias: np.ndarray
    kind: str = "local"
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.weight.ndim != 3:
            raise DimensionMismatchError(f"local 'weight' must be 3-D (k, d_in, d_out), found {self.weight.shape}")
        k, d_in, d_out = self.weight.shape
        for name, shape in {"centroids": (k, d_in), "bias": (k, d_out)}.items():
            if getattr(self, name).shape != shape:
                found = getattr(self, name).shape
                raise DimensionMismatchError(f"local '{name}' must have shape {shape}, found {found}")
        if not (np.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"local temperature must be a finite number > 0, found {self.temperature!r}")

    @property
    def dim_in(self) -> int:
        return int(self.weight.shape[1])

    @property
    def dim_out(self) -> int:
        return int(self.weight.shape[2])

    @property
    def n_clusters(self) -> int:
        return int(self.weight.shape[0])

    @property
    def is_affine(self) -> bool:
        return False

    def assignments(self, x: np.ndarray) -> np.ndarray:
        """Soft assignments p (rows, k) in x's float dtype; each row sums to 1.

        Where 1/T overflows the dtype, the hard limit: 1 for the nearest centroid (shared on exact ties).
        Raises DimensionMismatchError for an x of the wrong shape.
        """
        check_input(x, self.dim_in, "local transform")
        dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
        c = self.centroids.astype(dt, copy=False)
        # -||x - c||² = 2 x·c - ||c||² - ||x||²; the last term is the same for every cluster of a row
        logits = 2 * (x.astype(dt, copy=False) @ c.T) - np.einsum("ij,ij->i", c, c)[None, :]
        logits -= logits.max(axis=1, keepdims=True)
        scale = dt.type(1.0 / self.temperature)
        if not np.isfinite(scale):  # T below the dtype's range: the hard (nearest-centroid) limit
            return (logits == 0).astype(dt) / (logits == 0).sum(axis=1, keepdims=True).astype(dt)
        logits *= scale
        np.exp(logits, out=logits)
        logits /= logits.sum(axis=1, keepdims=True)
        return logits

    def apply(self, x: np.ndarray) -> np.ndarray:
        """y (rows, d_out) for x (rows, d_in), in x's float dtype; rows in chunks of LOCAL_CHUNK_VALUES / (k·d_out).

        Raises DimensionMismatchError for an x of the wrong shape.
        """
        check_input(x, self.dim_in, "local transform")
        k, d_in, d_out = self.weight.shape
        dt = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
        w_cat = self.weight.transpose(1, 0, 2).reshape(d_in, k * d_out).astype(dt)  # (d_in, k·d_out)
        b = self.bias.astype(dt, copy=False)
        y = np.empty((x.shape[0], d_out), dtype=dt)
        step = max(1, LOCAL_CHUNK_VALUES // max(k * d_out, 1))
        for start in range(0, x.shape[0], step):
            xs = x[start:start + step].astype(dt, copy=False)
            p = self.assignments(xs)
            per_cluster = (xs @ w_cat).reshape(len(xs), k, d_out)
            per_cluster += b[None]
            y[start:start + step] = np.einsum("rk,rkd->rd", p, per_cluster)
        return normalize_rows(y) if self.unit_output else y

    def arrays(self) -> dict[str, np.ndarray]:
        return {"centroids": self.centroids, "temperature": np.array([self.temperature], dtype=np.float64),
                "weight": self.weight, "bias": self.bias}


Transform = AffineTransform | ResidualMLPTransform | LocalAffineTransform


# a target dimension whose sample std is below this fraction of the median dimension's std is constant
CONSTANT_DIM_RTOL = 1e-4


def constant_dims(y: np.ndarray, rtol: float = CONSTANT_DIM_RTOL) -> tuple[np.ndarray, np.ndarray]:
    """(dims, values): the columns of a target sample y (rows, d) that are constant up to `rtol` × the
    median column std, and their means (float64). Real models have them (all-MiniLM-L6-v2 has three
    dimensions with std ~1e-33); a consumer that standardises its features divides by that std, so a map
    that leaves 1e-3 there moves its input by thousands of standard deviations. Empty when none.
    """
    y64 = np.asarray(y, dtype=np.float64)
    if y64.ndim != 2 or len(y64) < 2:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    std = y64.std(axis=0)
    median = float(np.median(std))
    if median <= 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    dims = np.flatnonzero(std < rtol * median)
    return dims.astype(np.int64), y64[:, dims].mean(axis=0)


def pin_dims(t: "Transform", dims: np.ndarray, values: np.ndarray) -> "Transform":
    """A copy of `t` whose output dims `dims` are the constants `values` for every input (before the
    unit-norm renormalisation, if any), folded into its parameters: the weight columns (every
    cluster's for `local`, the hidden layer's output columns for `mlp`) become 0 and the biases the
    values. meta["pinned_dims"] lists them. Same forward cost, same serialisation, composes as before.
    """
    dims = np.asarray(dims, dtype=np.int64)
    if not len(dims):
        return t
    values = np.asarray(values, dtype=np.float64)
    meta = {**t.meta, "pinned_dims": [int(d) for d in dims]}
    if isinstance(t, AffineTransform):
        w = np.array(t.weight, copy=True)
        b = np.zeros(w.shape[1], dtype=w.dtype) if t.bias is None else np.array(t.bias, copy=True)
        w[:, dims] = 0
        b[dims] = values
        return replace(t, weight=w, bias=b, meta=meta)
    if isinstance(t, ResidualMLPTransform):
        w, b, w2, b2 = (np.array(a, copy=True) for a in (t.weight, t.bias, t.w2, t.b2))
        w[:, dims], w2[:, dims], b2[dims] = 0, 0, 0
        b[dims] = values
        return replace(t, weight=w, bias=b, w2=w2, b2=b2, meta=meta)
    if isinstance(t, LocalAffineTransform):
        w, b = np.array(t.weight, copy=True), np.array(t.bias, copy=True)
        w[:, :, dims] = 0
        b[:, dims] = values
        return replace(t, weight=w, bias=b, meta=meta)
    raise TypeError(f"cannot pin output dimensions of {type(t).__name__}")


# --------------------------------------------------------------------------- composition


def apply_chain(chain: Sequence[Transform], x: np.ndarray) -> np.ndarray:
    """Apply links one by one, each with its own output normalisation (the reference the kernel is tested against).

    x: (rows, chain[0].dim_in); returns (rows, chain[-1].dim_out) in x's dtype (x itself for an empty chain).
    Raises DimensionMismatchError when x or a link does not fit the previous output.
    """
    for link in chain:
        x = link.apply(x)
    return x


def check_chain(chain: Sequence[Transform]) -> None:
    for i, (a, b) in enumerate(zip(chain, chain[1:])):
        if a.dim_out != b.dim_in:
            raise DimensionMismatchError(
                f"chain link {i} outputs dimension {a.dim_out} but link {i + 1} expects {b.dim_in}"
            )


def compose_affine(first: AffineTransform, second: AffineTransform) -> AffineTransform:
    """second(first(x)) as one affine map, computed in float64; it renormalises iff `second` does.

    Raises ValueError when `first` renormalises its output (then the composition is not affine).
    """
    if first.unit_output:
        raise ValueError("cannot compose through a link that renormalises its output rows (output_norm 'unit')")
    w1, w2 = first.weight.astype(np.float64), second.weight.astype(np.float64)
    weight = w1 @ w2
    bias = None
    if first.bias is not None or second.bias is not None:
        bias = np.zeros(w2.shape[1])
        if first.bias is not None:
            bias += first.bias.astype(np.float64) @ w2
        if second.bias is not None:
            bias += second.bias.astype(np.float64)
    meta = {"output_norm": "unit"} if second.unit_output else {}
    return AffineTransform(weight, bias, kind="composed", meta=meta)


def collapse(chain: Sequence[Transform]) -> list[Transform]:
    """Merge every run of consecutive affine links whose intermediate outputs are not renormalised.

    A link that renormalises its rows ends a run (it may be the run's last link: the merged map then
    renormalises); non-affine links stay in sequence. apply_chain(collapse(c), x) == apply_chain(c, x).
    Raises DimensionMismatchError when consecutive links' dimensions disagree.
    """
    check_chain(chain)
    out: list[Transform] = []
    for link in chain:
        if out and out[-1].is_affine and not out[-1].unit_output and link.is_affine:
            out[-1] = compose_affine(out[-1], link)
        else:
            out.append(link)
    return out


def truncate_or_pad(x: np.ndarray, dim: int) -> np.ndarray:
    """The 'no transform' baseline: keep the first dims, zero-pad if the target is wider."""
    if x.shape[1] >= dim:
        return x[:, :dim]
    return np.pad(x, ((0, 0), (0, dim - x.shape[1])))
