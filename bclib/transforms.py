"""Transform families, numpy apply, composition and pickle-free serialisation.

Convention: row vectors. A transform maps X (rows, dim_in) to (rows, dim_out);
an affine link is X @ weight + bias with weight of shape (dim_in, dim_out).
A chain is a list of links in *application* order: for z_k -> z_j that is
[B_k, B_{k-1}, ..., B_{j+1}].

Executors only need numpy: every family's forward pass lives here, and the
bytes format is an npz archive read with allow_pickle=False plus a JSON
header, guarded by a SHA-256 checksum.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from bclib.errors import ChecksumError, DimensionMismatchError, TransformFormatError

FORMAT_VERSION = 1
AFFINE_KINDS = ("linear", "orthogonal", "lowrank", "composed")
KINDS = AFFINE_KINDS + ("mlp",)


def _check_input(x: np.ndarray, dim_in: int, what: str) -> None:
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
        _check_input(x, self.dim_in, f"{self.kind} transform")
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
        _check_input(x, self.dim_in, "mlp transform")
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


class MultiSpaceKernel:
    """Maps a batch of source vectors into several target spaces at once.

    If every chain collapses to one affine map, all targets are one GEMM on
    the column-concatenated matrices; otherwise targets are produced nearest
    first, each continuing from the previous one so no link runs twice.
    Built on the driver, shipped to executors as plain arrays.
    """

    def __init__(self, dim_in: int, chains: dict[int, Sequence[Transform]], dtype=np.float32) -> None:
        if not chains:
            raise ValueError("MultiSpaceKernel needs at least one target space")
        self.dim_in = dim_in
        self.spaces = sorted(chains, reverse=True)  # nearest (largest) first
        for space, chain in chains.items():
            if chain and chain[0].dim_in != dim_in:
                raise DimensionMismatchError(
                    f"chain to space {space} expects input dimension {chain[0].dim_in}, source has {dim_in}"
                )
            check_chain(chain)
        collapsed = {s: collapse(chains[s]) for s in self.spaces}
        self.dims = {s: (chains[s][-1].dim_out if chains[s] else dim_in) for s in self.spaces}
        self.fused = all(len(c) == 1 and c[0].is_affine for c in collapsed.values())
        if self.fused:
            self.weight = np.concatenate([collapsed[s][0].weight for s in self.spaces], axis=1).astype(dtype)
            has_bias = any(collapsed[s][0].bias is not None for s in self.spaces)
            self.bias = (
                np.concatenate([
                    collapsed[s][0].bias if collapsed[s][0].bias is not None else np.zeros(self.dims[s])
                    for s in self.spaces
                ]).astype(dtype)
                if has_bias else None
            )
            bounds = np.cumsum([0] + [self.dims[s] for s in self.spaces])
            self.slices = {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(self.spaces)}
        else:
            # each step continues from the previous target's output
            self.steps: list[tuple[int, list[Transform]]] = []
            done = 0
            for s in self.spaces:
                chain = list(chains[s])
                self.steps.append((s, collapse(chain[done:])))
                done = len(chain)
            self._check_prefixes(chains)

    def _check_prefixes(self, chains: dict[int, Sequence[Transform]]) -> None:
        prev: Sequence[Transform] = []
        for s in self.spaces:
            chain = chains[s]
            if list(chain[: len(prev)]) != list(prev):
                raise ValueError(f"chain to space {s} does not extend the chain to the nearer space")
            prev = chain

    def __call__(self, x: np.ndarray) -> dict[int, np.ndarray]:
        _check_input(x, self.dim_in, "backfill kernel")
        if self.fused:
            y = x @ self.weight
            if self.bias is not None:
                y += self.bias
            return {s: np.ascontiguousarray(y[:, sl]) for s, sl in self.slices.items()}
        out: dict[int, np.ndarray] = {}
        cur = x
        for s, links in self.steps:
            for link in links:
                cur = link.apply(cur).astype(np.float32, copy=False)
            out[s] = cur
        return out


# --------------------------------------------------------------------------- serialisation


def transform_to_bytes(t: Transform) -> bytes:
    """npz bytes (no pickle): the arrays plus a JSON header with kind, dims and format version."""
    header = {
        "format_version": FORMAT_VERSION,
        "kind": t.kind,
        "class": type(t).__name__,
        "dim_in": t.dim_in,
        "dim_out": t.dim_out,
        "meta": t.meta,
    }
    buf = io.BytesIO()
    arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in t.arrays().items()}
    arrays["__header__"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    # fixed timestamps so the same transform always gives the same bytes
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, arrays[name], allow_pickle=False)
            zf.writestr(info, arr_buf.getvalue())
    return buf.getvalue()


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def transform_from_bytes(data: bytes, expected_checksum: Optional[str] = None) -> Transform:
    """Load a transform; the checksum is verified first, and no pickle is ever allowed."""
    if expected_checksum is not None and checksum(data) != expected_checksum:
        raise ChecksumError(
            f"transform bytes have checksum {checksum(data)[:16]}…, expected {expected_checksum[:16]}…; "
            "the stored parameters were altered or truncated"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise TransformFormatError(f"transform bytes are not a valid npz archive: {exc}") from exc
    if "__header__" not in arrays:
        raise TransformFormatError("transform bytes lack the '__header__' entry")
    try:
        header = json.loads(arrays.pop("__header__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransformFormatError(f"transform header is not valid JSON: {exc}") from exc
    if header.get("format_version") != FORMAT_VERSION:
        raise TransformFormatError(
            f"transform format version {header.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    cls_name = header.get("class")
    try:
        if cls_name == "AffineTransform":
            t: Transform = AffineTransform(arrays["weight"], arrays.get("bias"), header["kind"], header["meta"])
        elif cls_name == "ResidualMLPTransform":
            t = ResidualMLPTransform(**{k: arrays[k] for k in ("weight", "bias", "w1", "b1", "w2", "b2")},
                                     kind=header["kind"], meta=header["meta"])
        else:
            raise TransformFormatError(f"unknown transform class {cls_name!r}")
    except KeyError as exc:
        raise TransformFormatError(f"transform bytes lack array or header field {exc}") from exc
    if (t.dim_in, t.dim_out) != (header["dim_in"], header["dim_out"]):
        raise TransformFormatError(
            f"transform header says {header['dim_in']}->{header['dim_out']} but arrays are {t.dim_in}->{t.dim_out}"
        )
    return t


def truncate_or_pad(x: np.ndarray, dim: int) -> np.ndarray:
    """The 'no transform' baseline: keep the first dims, zero-pad if the target is wider."""
    if x.shape[1] >= dim:
        return x[:, :dim]
    return np.pad(x, ((0, 0), (0, dim - x.shape[1])))
