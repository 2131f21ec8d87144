"""Torch twins of the numpy transforms (driver side only): trainable ResidualMLP and frozen links.

Used by the torch fits (`bclib.numerics.torch_fit`) and by joint training (`bclib.numerics.losses`);
executors never import torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bclib.numerics.transforms import NORM_EPS, AffineTransform, LocalAffineTransform, ResidualMLPTransform, Transform


class ResidualMLP(nn.Module):
    """y = linear(x) + out(relu(hidden(x))); the torch twin of ResidualMLPTransform."""

    def __init__(self, dim_in: int, dim_out: int, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)
        self.hidden = nn.Linear(dim_in, hidden)
        self.out = nn.Linear(hidden, dim_out)
        nn.init.zeros_(self.out.weight)  # starts as the closed-form linear map
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.out(torch.relu(self.hidden(x)))

    def to_transform(self, meta: dict) -> ResidualMLPTransform:
        g = lambda p: p.detach().cpu().double().numpy()  # noqa: E731
        return ResidualMLPTransform(
            g(self.linear.weight).T.copy(), g(self.linear.bias), g(self.hidden.weight).T.copy(), g(self.hidden.bias),
            g(self.out.weight).T.copy(), g(self.out.bias), meta=meta,
        )


class LocalAffine(nn.Module):
    """softmax(−||x − c_i||² / T)-weighted sum of per-cluster affine maps; the torch twin of LocalAffineTransform."""

    def __init__(self, t: LocalAffineTransform) -> None:
        super().__init__()
        k, d_in, d_out = t.weight.shape
        as_param = lambda a: nn.Parameter(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)))  # noqa: E731
        self.centroids = as_param(t.centroids)
        self.weight = as_param(t.weight.transpose(1, 0, 2).reshape(d_in, k * d_out))
        self.bias = as_param(t.bias)
        self.temperature = float(t.temperature)
        self.k, self.d_out = k, d_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.centroids.to(x.dtype)
        logits = (2 * x @ c.T - (c * c).sum(dim=1)) / self.temperature
        p = torch.softmax(logits, dim=1)
        per_cluster = (x @ self.weight.to(x.dtype)).reshape(len(x), self.k, self.d_out) + self.bias.to(x.dtype)
        return torch.einsum("rk,rkd->rd", p, per_cluster)


class UnitRows(nn.Module):
    """Renormalise output rows to unit length (a link whose meta says output_norm 'unit')."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1, eps=NORM_EPS)


def torch_link(t: Transform) -> nn.Module:
    """A frozen torch module computing a numpy transform (for multi-step objectives), float32.

    Affine, residual-MLP and local links, each followed by the row renormalisation when its meta says
    output_norm 'unit'. Every parameter has requires_grad False.
    """
    if isinstance(t, LocalAffineTransform):
        module: nn.Module = LocalAffine(t)
    elif isinstance(t, AffineTransform):
        lin = nn.Linear(t.dim_in, t.dim_out, bias=t.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(t.weight.T, dtype=np.float32)))
            if t.bias is not None:
                lin.bias.copy_(torch.from_numpy(t.bias.astype(np.float32)))
        module = lin
    else:
        module = ResidualMLP(t.dim_in, t.dim_out, t.w1.shape[1])
        with torch.no_grad():
            for layer, w, b in ((module.linear, t.weight, t.bias), (module.hidden, t.w1, t.b1), (module.out, t.w2, t.b2)):
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)))
                layer.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    if t.unit_output:
        module = nn.Sequential(module, UnitRows())
    module = module.float()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
