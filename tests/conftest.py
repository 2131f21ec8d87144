"""One session-scoped local Spark + Delta session for the whole suite (never stopped between tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def spark(tmp_path_factory):
    from bclib.config import SparkSettings
    from bclib.spark import session_builder

    settings = SparkSettings(
        master="local[2]", app_name="bcemb-tests", shuffle_partitions=2,
        warehouse_dir=str(tmp_path_factory.mktemp("warehouse")),
        conf={"spark.default.parallelism": "2", "spark.driver.memory": "2g"},
    )
    session = session_builder(settings).getOrCreate()
    session.sparkContext.setLogLevel("ERROR")
    yield session


def small_config(tmp_path: Path, **sections):
    """A JobConfig for a small demo under tmp_path; keyword args override whole sections (dicts)."""
    from bclib.config import config_from_dict

    data = {
        "spark": {"master": "local[2]"},
        "embeddings": {"location": str(tmp_path / "emb" / "v{version}"), "versions": [0, 1, 2]},
        "registry_location": str(tmp_path / "registry"),
        "output_location": str(tmp_path / "out"),
        "metrics_location": str(tmp_path / "metrics"),
        "fit": {"sample_size": 100_000, "min_pairs": 50},
        "evaluate": {"sample_size": 100_000, "label_location": str(tmp_path / "labels"),
                     "report_dir": str(tmp_path / "reports"), "neighbours_k": 5, "neighbours_sample": 200},
        "demo": {"n_entities": 1500, "dims": [12, 16, 20], "block_rows": 256, "n_clusters": 6, "latent_dim": 8},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return config_from_dict(data)
