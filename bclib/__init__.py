"""bcemb: backward-compatible embedding versions for Delta Lake, on Spark.

The Python API (`bclib.api`, importable from here): load_config, session, generate, fit, backfill, evaluate,
run, status, maintain. Importing bclib imports neither pyspark nor the steps; each name loads on first use.
"""

__version__ = "0.1.0"

__all__ = ["load_config", "session", "generate", "fit", "backfill", "evaluate", "run", "status", "maintain"]


def __getattr__(name: str):
    if name in __all__:
        from bclib import api

        return getattr(api, name)
    raise AttributeError(f"module 'bclib' has no attribute {name!r}")
