"""Driver-side torch fitting: the residual MLP and multi-step objectives without a closed form.

Only the driver imports torch; what it produces is converted to numpy
transforms (`bclib.numerics.transforms`) whose forward pass executors run.
The multi-step objective is the paper's MLoss (Hu et al., KDD 2022, eq. 6).
"""

from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bclib.numerics.closed_form import fit_linear
from bclib.numerics.torch_links import ResidualMLP, torch_link
from bclib.numerics.transforms import NORM_EPS, AffineTransform, ResidualMLPTransform, Transform

log = logging.getLogger(__name__)


def _chain_module(chain: Sequence[Transform]) -> nn.Module:
    return nn.Sequential(*[torch_link(t) for t in chain]) if chain else nn.Identity()


def train_map(
    model: nn.Module,
    x: np.ndarray,
    targets: Sequence[np.ndarray],
    chains: Sequence[Sequence[Transform]],
    settings,
    unit_output: bool = False,
) -> dict:
    """Adam on minibatches of mean_j ||C_j(model(x)) - Z_j||², early stopping on a held-out split.

    With `unit_output` the model's output rows are renormalised before the frozen chains (as the
    forward pass of a transform with meta output_norm 'unit' does). The best (lowest validation loss)
    parameters are restored at the end. Returns a small training log (epochs run, best validation loss).
    """
    gen = np.random.default_rng(settings.seed)
    n = len(x)
    perm = gen.permutation(n)
    n_val = max(1, n // 10)
    val, train = perm[:n_val], perm[n_val:]
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    zs = [torch.from_numpy(np.ascontiguousarray(z, dtype=np.float32)) for z in targets]
    heads = [_chain_module(c) for c in chains]
    model = model.float()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate)

    def loss_on(idx: np.ndarray) -> torch.Tensor:
        out = model(xt[idx])
        if unit_output:
            out = nn.functional.normalize(out, dim=1, eps=NORM_EPS)
        terms = [((head(out) - z[idx]) ** 2).sum(dim=1).mean() for head, z in zip(heads, zs)]
        return torch.stack(terms).mean()

    best = float("inf")
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    stale, epoch = 0, 0
    for epoch in range(1, settings.epochs + 1):
        model.train()
        order = train[gen.permutation(len(train))]
        for start in range(0, len(order), settings.batch_size):
            opt.zero_grad()
            loss = loss_on(order[start:start + settings.batch_size])
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            val_loss = float(loss_on(val))
        if val_loss < best * (1 - 1e-6):
            best, stale = val_loss, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.patience:
                break
    model.load_state_dict(best_state)
    log.debug("torch fit: %d epochs, best validation loss %.6g", epoch, best)
    return {"epochs": epoch, "best_validation_loss": best}


def fit_residual_mlp(x: np.ndarray, y: np.ndarray, settings, unit_output: bool = False) -> ResidualMLPTransform:
    """Residual MLP (linear part from the closed-form affine fit, one ReLU hidden layer), single-step.

    x: (n, d_in), y: (n, d_out); trained in float32, returned as float64 arrays. `unit_output`: train
    through the output renormalisation (`train_map`).
    """
    return _fit_mlp(x, [y], [[]], settings, objective="single_step", unit_output=unit_output)


def _fit_mlp(x, targets, chains, settings, objective: str, unit_output: bool = False) -> ResidualMLPTransform:
    torch.manual_seed(settings.seed)  # the hidden layer's initial weights
    init = fit_linear(x, targets[0], ridge=settings.ridge, bias=True)
    model = ResidualMLP(x.shape[1], targets[0].shape[1], settings.hidden)
    with torch.no_grad():
        model.linear.weight.copy_(torch.from_numpy(init.weight.T.astype(np.float32)))
        model.linear.bias.copy_(torch.from_numpy(init.bias.astype(np.float32)))
    info = train_map(model, x, targets, chains, settings, unit_output)
    return model.to_transform({"objective": objective, "hidden": settings.hidden, **info})


def fit_multistep_torch(
    x: np.ndarray, targets: Sequence[np.ndarray], chains: Sequence[Sequence[Transform]], settings,
    unit_output: bool = False,
) -> Transform:
    """Multi-step / anchored objectives by gradient descent (MLP maps, biases or non-linear frozen links).

    x: (n, d_in); targets[j] (n, d_j) with chains[j] the frozen links from the fitted map's output
    space to space j (empty for the first). `unit_output` as in `train_map`. Raises ValueError for a
    kind other than 'linear' or 'mlp'.
    """
    objective = settings.objective
    if settings.kind == "mlp":
        return _fit_mlp(x, targets, chains, settings, objective, unit_output)
    if settings.kind != "linear":
        raise ValueError(f"objective {objective!r} supports kinds 'linear' and 'mlp', not {settings.kind!r}")
    init = fit_linear(x, targets[0], ridge=settings.ridge, bias=settings.bias)
    model = nn.Linear(x.shape[1], targets[0].shape[1], bias=settings.bias)
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(init.weight.T.astype(np.float32)))
        if settings.bias:
            model.bias.copy_(torch.from_numpy(init.bias.astype(np.float32)))
    info = train_map(model, x, targets, chains, settings, unit_output)
    weight = model.weight.detach().double().numpy().T.copy()
    bias = model.bias.detach().double().numpy().copy() if settings.bias else None
    return AffineTransform(weight, bias, "linear", {"objective": objective, **info})
