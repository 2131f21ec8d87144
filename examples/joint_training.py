"""Joint training with bclib.numerics.losses.AlignmentLoss (BC-Aligner) in an embedding team's own torch loop.

Three model versions (dims 32, 40, 48) are trained for an intended task (regressing a target from entity
features). Each new version is trained either alone (then a post-hoc closed-form B_k is fitted), or jointly
with AlignmentLoss (lambda 16; multi-step through the frozen earlier B's). A consumer probe trained once on
version-0 embeddings scores an unintended label on the composed backward-transformed newest embeddings.

    python examples/joint_training.py [--registry ./warehouse/joint_registry] [--results FILE]

With --registry the jointly trained B_k are exported with one call each and registered in a Delta
registry (starts local Spark); without it the exported bytes are only verified. The figures go to
benchmarks/results/joint_training.json (--results), the file docs/transforms.md quotes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bclib.numerics.closed_form import fit_linear  # noqa: E402
from bclib.numerics.losses import AlignmentLoss, export_bytes  # noqa: E402
from bclib.numerics.metrics import probe_retention  # noqa: E402
from bclib.numerics.serialization import transform_from_bytes  # noqa: E402
from bclib.numerics.transforms import apply_chain  # noqa: E402

DIMS = [32, 40, 48]


def make_data(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    latent = rng.normal(size=(n, 12))
    features = np.tanh(latent @ rng.normal(size=(12, 24))) + 0.1 * rng.normal(size=(n, 24))
    target = np.sin(latent @ rng.normal(size=(12, 8)))  # the intended task
    unintended = (latent[:, 0] * latent[:, 1] + 0.5 * latent[:, 2] > 0).astype(int)  # a consumer's task
    t = lambda a: torch.from_numpy(a.astype(np.float32))  # noqa: E731
    return t(features), t(target), unintended


class Encoder(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(24, 128), nn.ReLU(), nn.Linear(128, dim))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(dim, 8))

    def forward(self, x):
        z = self.body(x)
        return z, self.head(z)


def train_version(dim, features, target, seed, align: AlignmentLoss | None = None, z_prev=None, epochs=60):
    torch.manual_seed(seed)
    model = Encoder(dim)
    params = [*model.parameters()] + ([*align.parameters()] if align is not None else [])
    opt = torch.optim.Adam(params, lr=3e-3)
    n = len(features)
    for _ in range(epochs):
        for idx in torch.randperm(n).split(512):
            opt.zero_grad()
            z, pred = model(features[idx])
            loss = ((pred - target[idx]) ** 2).mean()
            if align is not None:
                loss = loss + align(z, z_prev[idx])
            loss.backward()
            opt.step()
    with torch.no_grad():
        z, pred = model(features)
    return z, float(((pred - target) ** 2).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entities", type=int, default=8000)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--registry", help="Delta path of a registry to register the joint B_k in")
    parser.add_argument("--results", type=Path,
                        default=Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "joint_training.json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    features, target, labels = make_data(args.entities)
    z0, mse0 = train_version(DIMS[0], features, target, seed=0, epochs=args.epochs)
    z0_np = z0.numpy()
    print(f"version 0 (dim {DIMS[0]}): intended-task MSE {mse0:.4f}")

    results, exported = {}, []
    for mode in ("posthoc", "joint"):
        z_prev, chain, mses = z0, [], []
        for k in (1, 2):
            if mode == "joint":
                align = AlignmentLoss(DIMS[k], DIMS[k - 1], weight=16.0, multi_step=True, previous=chain[::-1])
                z_k, mse = train_version(DIMS[k], features, target, seed=k, align=align, z_prev=z_prev.detach(),
                                         epochs=args.epochs)
                data, digest = export_bytes(align)
                b_k = transform_from_bytes(data, digest)  # exactly what the registry stores and executors load
                exported.append(align.export(source_version=k, target_version=k - 1, sample_size=args.entities))
            else:
                z_k, mse = train_version(DIMS[k], features, target, seed=k, epochs=args.epochs)
                b_k = fit_linear(z_k.numpy(), z_prev.numpy())
            chain.append(b_k)
            mses.append(mse)
            z_prev = z_k
        composed = apply_chain(chain[::-1], z_prev.numpy().astype(np.float64))  # z_2 -> space 0
        retention = probe_retention(composed, z0_np, labels)["probe_retention"]
        err = float(np.linalg.norm(composed - z0_np) / np.linalg.norm(z0_np))
        results[mode] = (retention, err, mses)
        print(f"{mode:>8}: version-2 -> space-0 alignment error {err:.4f}, consumer probe AUC retention "
              f"{retention:.4f}, intended-task MSE per version {[round(m, 4) for m in mses]}")

    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({
        "entities": args.entities, "epochs": args.epochs, "dims": DIMS, "version0_mse": mse0,
        "methods": {mode: {"probe_retention": r, "alignment_error_2_to_0": e, "intended_mse_per_version": m}
                    for mode, (r, e, m) in results.items()},
    }, indent=2))
    print(f"results written to {args.results}")

    if args.registry:
        from bclib.config import SparkSettings
        from bclib.tables.registry import active_transforms, register
        from bclib.spark import get_or_create

        spark = get_or_create(SparkSettings(master="local[2]"))
        register(spark, args.registry, exported[-2:])
        print(f"registered {sorted(active_transforms(spark, args.registry))} in {args.registry}")


if __name__ == "__main__":
    main()
