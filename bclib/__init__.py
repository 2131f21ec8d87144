"""bcemb: backward-compatible embedding versions for Delta Lake, on Spark."""

__version__ = "0.1.0"
