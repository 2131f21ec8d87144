"""Joint training (BC-Aligner, Hu et al. 2022): an alignment loss for the embedding team's own loop.

While training model M_k, add `AlignmentLoss` to the model's own loss:

    align = AlignmentLoss(dim_new=64, dim_old=56, weight=16.0, multi_step=True, previous=[B_{k-1}, ..., B_1])
    optimizer = torch.optim.Adam([*model.parameters(), *align.parameters()])
    loss = task_loss(model(batch)) + align(z_new=model.embed(ids), z_old=z_prev[ids])

B_k is a learnable linear map (no bias by default). Single-step aligns
B_k(z_k) with z_{k-1}; multi-step also pushes the residual through the frozen
earlier transforms B_{k-1}, ..., B_1 and averages the error over steps, so
errors that grow along the chain are penalised where they grow. After
training, `align.export(...)` gives the registry record (`bclib.tables.registry`).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn

from bclib.errors import DimensionMismatchError
from bclib.numerics.torch_links import torch_link
from bclib.numerics.transforms import AffineTransform, Transform, check_chain


class AlignmentLoss(nn.Module):
    """weight * mean over steps j of mean_rows ||C_j(B_k z_new) - C_j(z_old)||² (C_0 = identity).

    `previous` are the frozen earlier transforms in application order
    (B_{k-1} first). With `multi_step=False` only the first step counts.
    Optional `anchors` in `forward` replace C_j(z_old) by the true stored
    z_j (the anchored objective), where the team still has them. With
    `normalize=True` each step's error is divided by the mean squared norm
    of its target, so `weight` is scale-free (relative squared error).
    """

    def __init__(
        self,
        dim_new: int,
        dim_old: int,
        weight: float = 1.0,
        multi_step: bool = False,
        previous: Sequence[Transform] = (),
        bias: bool = False,
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if previous:
            check_chain(list(previous))
            if previous[0].dim_in != dim_old:
                raise DimensionMismatchError(
                    f"the first frozen transform expects dimension {previous[0].dim_in}, but dim_old is {dim_old}"
                )
        self.dim_new, self.dim_old = dim_new, dim_old
        self.weight = float(weight)
        self.multi_step = multi_step
        self.normalize = normalize
        self.backward_map = nn.Linear(dim_new, dim_old, bias=bias)
        with torch.no_grad():  # start near a truncation so early training is not dominated by the penalty
            self.backward_map.weight.zero_()
            k = min(dim_new, dim_old)
            self.backward_map.weight[:k, :k] = torch.eye(k)
            if bias:
                self.backward_map.bias.zero_()
        links = [torch_link(t) for t in previous] if multi_step else []
        self.frozen = nn.ModuleList(links)

    def steps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x in space k-1 pushed through the frozen chain: [x, B_{k-1}x, B_{k-2}B_{k-1}x, ...]."""
        out = [x]
        for link in self.frozen:
            out.append(link(out[-1].to(next(link.parameters()).dtype)).to(x.dtype))
        return out

    def forward(
        self, z_new: torch.Tensor, z_old: torch.Tensor, anchors: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        if z_new.shape[-1] != self.dim_new or z_old.shape[-1] != self.dim_old:
            raise DimensionMismatchError(
                f"AlignmentLoss expects z_new (*, {self.dim_new}) and z_old (*, {self.dim_old}), "
                f"found {tuple(z_new.shape)} and {tuple(z_old.shape)}"
            )
        pred_steps = self.steps(self.backward_map(z_new))
        if anchors is not None:
            if len(anchors) != len(self.frozen):
                raise ValueError(f"expected {len(self.frozen)} anchors (one per frozen step), found {len(anchors)}")
            true_steps = [z_old, *anchors]
        else:
            with torch.no_grad():
                true_steps = self.steps(z_old)
        terms = [((p - t) ** 2).sum(dim=-1).mean() for p, t in zip(pred_steps, true_steps)]
        if self.normalize:  # relative squared error: the weight means the same whatever the embeddings' scale
            terms = [term / (t.detach() ** 2).sum(dim=-1).mean().clamp_min(1e-12) for term, t in zip(terms, true_steps)]
        return self.weight * torch.stack(terms).mean()

    def to_transform(self) -> AffineTransform:
        """The learned B_k as the numpy transform executors apply."""
        w = self.backward_map.weight.detach().cpu().double().numpy().T.copy()
        b = self.backward_map.bias
        bias = None if b is None else b.detach().cpu().double().numpy().copy()
        objective = "joint_multi_step" if self.multi_step else "joint_single_step"
        return AffineTransform(w, bias, "linear", {"objective": objective, "lambda": self.weight})

    def export(self, source_version: int, target_version: int, fit_metrics: Optional[dict] = None,
               sample_size: int = 0, transform_id: Optional[str] = None):
        """One call from the training loop to a registry record (register it with `bclib.tables.registry.register`)."""
        import hashlib

        from bclib.numerics.records import TransformRecord
        from bclib.numerics.serialization import checksum, transform_to_bytes

        t = self.to_transform()
        tid = transform_id or hashlib.sha256(
            f"joint|{source_version}->{target_version}|{checksum(transform_to_bytes(t))}".encode()
        ).hexdigest()[:24]
        return TransformRecord(
            transform_id=tid, source_version=source_version, target_version=target_version, kind="linear",
            objective=t.meta["objective"], transform=t,
            fit_config={"joint": True, "lambda": self.weight, "multi_step": self.multi_step},
            sample_size=sample_size, fit_metrics=dict(fit_metrics or {}), origin="joint",
        )


def export_bytes(loss: AlignmentLoss) -> tuple[bytes, str]:
    """The learned B_k as registry bytes and their checksum (what the registry stores)."""
    from bclib.numerics.serialization import checksum, transform_to_bytes

    data = transform_to_bytes(loss.to_transform())
    return data, checksum(data)

