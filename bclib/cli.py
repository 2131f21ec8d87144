"""The `bcemb` command: args -> strict config -> session -> one bclib call -> exit code."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional, Sequence

import yaml

from bclib.config import JobConfig, apply_override, config_from_dict, load_config
from bclib.errors import BcembError, ConfigError, executor_error

log = logging.getLogger("bcemb")

STEPS = {
    "demo": "generate demo versions, fit, backfill and evaluate (the embedded default)",
    "generate": "write the synthetic demo embedding versions as Delta tables",
    "fit": "fit a backward transform for every consecutive pair of versions and register it",
    "backfill": "rewrite the newest version into every earlier space (one pass, one Delta commit)",
    "evaluate": "measure compatibility of every (source, space) pair; write metrics and print a table",
}

def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (dotted key), found {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcemb", description="Backward-compatible embedding versions on Delta Lake.")
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, help_text in STEPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--config", metavar="FILE",
                       help="YAML job config (default: the embedded local default, same as conf/local.yaml)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override one dotted config key, e.g. --set fit.sample_size=50000 (repeatable)")
        p.add_argument("--log-level", default="INFO", help="Python log level (default INFO)")
    return parser


def resolve_config(path: Optional[str], overrides: Sequence[str]) -> JobConfig:
    pairs = dict(_parse_override(o) for o in overrides)
    if path:
        return load_config(path, pairs)
    data: dict = {}
    for dotted, value in pairs.items():
        apply_override(data, dotted, value)
    return config_from_dict(data)


def run_step(spark, step: str, cfg: JobConfig):
    """Dispatch one step (library functions take `spark`; they never create it)."""
    if step == "demo":
        from bclib.steps.demo import run_demo

        return run_demo(spark, cfg)
    if step == "generate":
        from bclib.steps.generate import run_generate

        return run_generate(spark, cfg)
    if step == "fit":
        from bclib.steps.fit import run_fit

        return run_fit(spark, cfg)
    if step == "backfill":
        from bclib.steps.backfill import run_backfill

        return run_backfill(spark, cfg)
    if step == "evaluate":
        from bclib.steps.evaluate import run_evaluate

        return run_evaluate(spark, cfg)
    raise ValueError(f"unknown step {step!r}")


def one_line_error(exc: BaseException) -> str:
    """The message a user needs, also for errors raised inside Spark's Python workers."""
    if isinstance(exc, BcembError):
        return f"{type(exc).__name__}: {exc}"
    named = executor_error(exc)
    if named is not None:
        return f"{type(named).__name__}: {named}"
    text = str(exc)
    first = text.strip().splitlines()[0] if text.strip() else repr(exc)
    return f"{type(exc).__name__}: {first}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    try:
        cfg = resolve_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"bcemb {args.step}: {one_line_error(exc)}", file=sys.stderr)
        return 2
    from bclib.spark import get_or_create

    try:
        spark = get_or_create(cfg.spark)
        result = run_step(spark, args.step, cfg)
    except BcembError as exc:
        print(f"bcemb {args.step}: {one_line_error(exc)}", file=sys.stderr)
        return 1
    except Exception as exc:  # Spark's own errors: still one line, with the cause
        from pyspark.errors import PySparkException

        if not isinstance(exc, (PySparkException,)) and executor_error(exc) is None:
            raise
        print(f"bcemb {args.step}: {one_line_error(exc)}", file=sys.stderr)
        return 1
    log.info(result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
