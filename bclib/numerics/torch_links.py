"""Torch twins of the numpy transforms (driver side only): trainable ResidualMLP and frozen links.

Used by the torch fits (`bclib.numerics.torch_fit`) and by joint training (`bclib.numerics.losses`);
executors never import torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bclib.numerics.transforms import AffineTransform, ResidualMLPTransform, Transform


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


def torch_link(t: Transform) -> nn.Module:
    """A frozen torch module computing a numpy transform (for multi-step objectives)."""
    if isinstance(t, AffineTransform):
        lin = nn.Linear(t.dim_in, t.dim_out, bias=t.bias is not None)
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(np.ascontiguousarray(t.weight.T, dtype=np.float32)))
            if t.bias is not None:
                lin.bias.copy_(torch.from_numpy(t.bias.astype(np.float32)))
        module: nn.Module = lin
    else:
        module = ResidualMLP(t.dim_in, t.dim_out, t.w1.shape[1])
        with torch.no_grad():
            for layer, w, b in ((module.linear, t.weight, t.bias), (module.hidden, t.w1, t.b1), (module.out, t.w2, t.b2)):
                layer.weight.copy_(torch.from_numpy(np.ascontiguousarray(w.T, dtype=np.float32)))
                layer.bias.copy_(torch.from_numpy(b.astype(np.float32)))
    module = module.float()
    for p in module.parameters():
        p.requires_grad_(False)
    return module
