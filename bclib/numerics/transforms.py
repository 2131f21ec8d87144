"""Transform families: numpy forward passes, composition and collapse of chains.

Convention: row vectors. A transform maps X (rows, dim_in) to (rows, dim_out);
an affine link is X @ weight + bias with weight of shape (dim_in, dim_out).
A chain is a list of links in *application* order: for z_k -> z_j that is
[B_k, B_{k-1}, ..., B_{j+1}] (Hu et al., KDD 2022, section 3: B_{j+1} o ... o B_k).

Executors only need numpy: every family's forward pass lives here. Serialisation is in
`bclib.numerics.serialization`, the executor kernel in `bclib.numerics.kernel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from bclib.errors import DimensionMismatchError

AFFINE_KINDS = ("linear", "orthogonal", "lowrank", "composed")
KINDS = AFFINE_KINDS + ("mlp",)


def check_input(x: np.ndarray, dim_in: int, what: str) -> None:
    if x.ndim != 2 or x.shape[1] != dim_in:
        raise DimensionMismatchError(
            f"{what} expects input of shape (rows, {dim_in}), found {tuple(x.shape)}"
        )


class _WeightShape:
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
    """X @ weight + bias. Linear, orthogonal, low-rank and collapsed chains all take this form."""

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
        return y

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
        return y

    def arrays(self) -> dict[str, np.ndarray]:
        return {n: getattr(self, n) for n in ("weight", "bias", "w1", "b1", "w2", "b2")}


Transform = AffineTransform | ResidualMLPTransform


# --------------------------------------------------------------------------- composition


def apply_chain(chain: Sequence[Transform], x: np.ndarray) -> np.ndarray:
    """Apply links one by one (the reference composition is tested against)."""
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
    """second(first(x)) as one affine map, computed in float64."""
    w1, w2 = first.weight.astype(np.float64), second.weight.astype(np.float64)
    weight = w1 @ w2
    bias = None
    if first.bias is not None or second.bias is not None:
        bias = np.zeros(w2.shape[1])
        if first.bias is not None:
            bias += first.bias.astype(np.float64) @ w2
        if second.bias is not None:
            bias += second.bias.astype(np.float64)
    return AffineTransform(weight, bias, kind="composed")


def collapse(chain: Sequence[Transform]) -> list[Transform]:
    """Merge every run of consecutive affine links into one; non-linear links stay in sequence."""
    check_chain(chain)
    out: list[Transform] = []
    for link in chain:
        if out and out[-1].is_affine and link.is_affine:
            out[-1] = compose_affine(out[-1], link)
        else:
            out.append(link)
    return out


def truncate_or_pad(x: np.ndarray, dim: int) -> np.ndarray:
    """The 'no transform' baseline: keep the first dims, zero-pad if the target is wider."""
    if x.shape[1] >= dim:
        return x[:, :dim]
    return np.pad(x, ((0, 0), (0, dim - x.shape[1])))
