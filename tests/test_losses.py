"""Joint training: AlignmentLoss in a torch loop, and its one-call export to the registry format."""

import numpy as np
import pytest
import torch

from bclib.errors import DimensionMismatchError
from bclib.numerics.losses import AlignmentLoss, export_bytes
from bclib.numerics.serialization import checksum, transform_from_bytes
from bclib.numerics.transforms import AffineTransform


def _frozen(rng, dims):
    return [AffineTransform(rng.normal(size=(a, b)) / np.sqrt(a)) for a, b in zip(dims, dims[1:])]


def test_single_step_loss_value_and_gradient():
    loss = AlignmentLoss(4, 3, weight=2.0)
    z_new, z_old = torch.randn(10, 4), torch.randn(10, 3)
    value = loss(z_new, z_old)
    w = loss.backward_map.weight.detach()
    expected = 2.0 * ((z_new @ w.T - z_old) ** 2).sum(1).mean()
    assert float(value.detach()) == pytest.approx(float(expected), rel=1e-6)
    value.backward()
    assert loss.backward_map.weight.grad is not None and z_new.grad is None


def test_multi_step_averages_over_frozen_steps():
    rng = np.random.default_rng(0)
    frozen = _frozen(rng, [6, 5, 4])
    loss = AlignmentLoss(8, 6, multi_step=True, previous=frozen)
    z_new, z_old = torch.randn(32, 8), torch.randn(32, 6)
    value = float(loss(z_new, z_old).detach())
    w = loss.backward_map.weight.detach().double().numpy().T
    resid = z_new.double().numpy() @ w - z_old.double().numpy()
    c1 = frozen[0].weight
    c2 = frozen[0].weight @ frozen[1].weight
    terms = [np.mean(np.sum(r ** 2, 1)) for r in (resid, resid @ c1, resid @ c2)]
    assert value == pytest.approx(np.mean(terms), rel=1e-4)
    # frozen transforms stay frozen
    assert all(not p.requires_grad for p in loss.frozen.parameters())
    assert [n for n, p in loss.named_parameters() if p.requires_grad] == ["backward_map.weight"]


def test_anchored_forward_uses_the_true_old_embeddings():
    rng = np.random.default_rng(1)
    frozen = _frozen(rng, [6, 5])
    loss = AlignmentLoss(8, 6, multi_step=True, previous=frozen)
    z_new, z_old, z_prev = torch.randn(16, 8), torch.randn(16, 6), torch.randn(16, 5)
    with torch.no_grad():
        got = float(loss(z_new, z_old, anchors=[z_prev]))
    w = loss.backward_map.weight.detach().double().numpy().T
    pred = z_new.double().numpy() @ w
    # step 0 against z_old, step 1: the prediction pushed through the frozen link against the stored z_prev
    expected = np.mean([np.mean(np.sum((pred - z_old.double().numpy()) ** 2, 1)),
                        np.mean(np.sum((pred @ frozen[0].weight - z_prev.double().numpy()) ** 2, 1))])
    assert got == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="expected 1 anchors"):
        loss(z_new, z_old, anchors=[])


def test_dimension_errors_are_named():
    with pytest.raises(DimensionMismatchError, match=r"expects z_new \(\*, 4\) and z_old \(\*, 3\), found \(2, 5\)"):
        AlignmentLoss(4, 3)(torch.randn(2, 5), torch.randn(2, 3))
    with pytest.raises(DimensionMismatchError, match="first frozen transform expects dimension 6, but dim_old is 5"):
        AlignmentLoss(8, 5, multi_step=True, previous=_frozen(np.random.default_rng(0), [6, 4]))


def test_joint_training_aligns_and_exports_to_registry_bytes():
    """A tiny 'model' (a learnable embedding table) trained for its own task plus alignment."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, d_old, d_new = 400, 6, 8
    z_old = torch.from_numpy(rng.normal(size=(n, d_old)).astype(np.float32))
    target = torch.from_numpy(rng.normal(size=(n, d_new)).astype(np.float32))  # the 'intended task'
    emb = torch.nn.Parameter(torch.randn(n, d_new))
    align = AlignmentLoss(d_new, d_old, weight=16.0)
    opt = torch.optim.Adam([emb, *align.parameters()], lr=0.05)
    first = None
    for step in range(300):
        opt.zero_grad()
        task = ((emb - target) ** 2).sum(1).mean()
        a = align(emb, z_old)
        (task + a).backward()
        opt.step()
        first = float(a.detach()) if first is None else first
    assert float(a.detach()) < 0.05 * first
    record = align.export(source_version=1, target_version=0, fit_metrics={"align": float(a.detach())}, sample_size=n)
    assert (record.source_version, record.target_version, record.kind) == (1, 0, "linear")
    assert record.objective == "joint_single_step" and record.transform.bias is None
    data, digest = export_bytes(align)
    assert digest == checksum(data) == checksum(record.parameters)
    back = transform_from_bytes(data, digest)
    pred = back.apply(emb.detach().double().numpy())
    np.testing.assert_allclose(pred, align.backward_map(emb).detach().double().numpy(), rtol=1e-5, atol=1e-5)
