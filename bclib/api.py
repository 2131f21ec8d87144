"""The Python API: what a notebook (Databricks, Jupyter) calls instead of the CLI. The CLI runs the same steps.

    import bclib

    cfg = bclib.load_config("job.yaml", {"backfill.engine": "arrow"})  # a file, or a dict of sections
    spark = bclib.session(cfg)       # the session the config describes; an existing one is reused (getOrCreate)
    result = bclib.run(spark, cfg)   # the scheduled job: fit, gate, backfill, evaluate, status
    print(result.summary())
    print(bclib.status(spark, cfg).table())

Every function raises the named errors of `bclib.errors` (ConfigError, GateRejectedError, ...) that the CLI
turns into exit codes; each returns its step's result object (`.summary()` is the CLI's log line).
"""

from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

from bclib.config import JobConfig, apply_override, config_from_dict
from bclib.config import load_config as _load_file

if TYPE_CHECKING:  # pragma: no cover
    from pyspark.sql import SparkSession


def load_config(source: Union[str, os.PathLike, dict], overrides: Optional[dict[str, Any]] = None) -> JobConfig:
    """A validated JobConfig from a YAML file path or an already-parsed dict of sections (as the YAML holds).

    overrides: dotted keys -> values, as `--set` takes them (e.g. {"backfill.engine": "arrow"}).
    Raises ConfigError naming the key for an unknown key, a wrong type or an out-of-range value."""
    if isinstance(source, dict):
        data = copy.deepcopy(source)
        for dotted, value in (overrides or {}).items():
            apply_override(data, dotted, value)
        return config_from_dict(data)
    return _load_file(source, overrides)


def session(cfg: JobConfig) -> "SparkSession":
    """The Spark session `cfg.spark` describes (Delta's jars and extensions); the active one if there is one."""
    from bclib.spark import get_or_create

    return get_or_create(cfg.spark)


def generate(spark, cfg: JobConfig):
    """Write the synthetic demo versions (`bcemb generate`); returns GenerateResult (rows per version)."""
    from bclib.steps.generate import run_generate

    return run_generate(spark, cfg)


def fit(spark, cfg: JobConfig, refit: Sequence[str] = ()):
    """Fit the edges without an active transform, or those in `refit` ("K:J" or "all"); returns FitResult."""
    from bclib.steps.fit import run_fit

    return run_fit(spark, cfg, refit)


def backfill(spark, cfg: JobConfig, allow_shrink: bool = False, dry_run: bool = False):
    """Rewrite the source version into every configured space that needs it; returns BackfillResult
    (`.unreadable`: spaces left as they were because their version table could not be read)."""
    from bclib.steps.backfill import run_backfill

    return run_backfill(spark, cfg, allow_shrink=allow_shrink, dry_run=dry_run)


def evaluate(spark, cfg: JobConfig):
    """Metrics of every (source, space) pair on held-out entities, written and reported; returns EvaluateResult."""
    from bclib.steps.evaluate import run_evaluate

    return run_evaluate(spark, cfg)


def run(spark, cfg: JobConfig, refit: Sequence[str] = (), dry_run: bool = False, allow_shrink: bool = False):
    """The scheduled job (`bcemb run`): fit, gate, backfill, evaluate, status; returns RunResult."""
    from bclib.steps.run import run_scheduled

    return run_scheduled(spark, cfg, refit=refit, dry_run=dry_run, allow_shrink=allow_shrink)


def status(spark, cfg: JobConfig):
    """Per space: active chain, gate verdict, what the output holds, how stale; returns StatusResult."""
    from bclib.steps.status import run_status

    return run_status(spark, cfg)


def maintain(spark, cfg: JobConfig):
    """OPTIMIZE small files per space and VACUUM with the promised retention; returns MaintainResult."""
    from bclib.steps.maintain import run_maintain

    return run_maintain(spark, cfg)
