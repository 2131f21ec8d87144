"""The `bcemb` command: args -> strict config -> session -> one bclib call -> exit code.

Exit codes: 0 done (or nothing to do), 1 data or runtime error, 2 config error, 3 gate rejected,
75 another bcemb process holds the output's run lease (try again later), 130 interrupted. Every failure ends in one line `bcemb <step>: <ErrorClass>: <what to do>` on stderr;
`--debug` adds the full traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from typing import Optional, Sequence

import yaml

from bclib.config import JobConfig, apply_override, config_from_dict, load_config
from bclib.errors import BcembError, ConfigError, GateRejectedError, LeaseHeldError, LeaseLostError, executor_error, \
    error_class, one_line

log = logging.getLogger("bcemb")

EXIT_OK, EXIT_DATA, EXIT_CONFIG, EXIT_GATE, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_LEASE = 75  # EX_TEMPFAIL (sysexits.h): a scheduler retries later
EXIT_PARTIAL = 4  # done in part: spaces left as they were / pairs left out (a version table unreadable)

WRITING_STEPS = ("run", "demo", "fit", "backfill", "evaluate", "maintain")  # they hold the run lease

STEPS = {
    "run": "the scheduled job: fit new edges, gate, backfill what changed, evaluate, status",
    "demo": "generate demo versions, fit, backfill and evaluate (the embedded default)",
    "generate": "write the synthetic demo embedding versions as Delta tables",
    "fit": "fit the edges that have no active transform (or --refit), register them",
    "backfill": "bring every target space up to date (incremental where only the source changed)",
    "evaluate": "measure compatibility of every (source, space) pair; write metrics and print a table",
    "status": "per space: active chain, gate verdict, what the output holds, how stale it is",
    "registry": "list, show, retire, activate, import or verify transforms",
    "maintain": "OPTIMIZE small files per space and VACUUM with the configured retention",
    "export": "write the active chain source -> space as one file for online use (bclib.serving.load_chain)",
}

EPILOG = """exit codes:
  0  done, or nothing to do
  1  data or runtime error (one line on stderr names the error class and what to do)
  2  config error
  3  gate rejected: a candidate chain failed the compatibility gate, nothing was published
  4  done in part: spaces (backfill) or pairs (evaluate) whose version table could not be read were left
     as they were / left out; stderr names each
  75  another bcemb process holds this output's run lease, or this run lost it: nothing (more) was
      committed; run again later or pass --wait-lease SECONDS
  130  interrupted (SIGINT); nothing half-written, the next run converges
"""


def _parse_override(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise ConfigError(f"--set expects KEY=VALUE (dotted key), found {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), yaml.safe_load(value)


def _parse_conf(text: str) -> tuple[str, str]:
    if "=" not in text or not text.split("=", 1)[0].strip():
        raise ConfigError(f"--conf expects a Spark conf KEY=VALUE like spark.executor.memory=2g, found {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE",
                   help="YAML job config (default: the embedded local default, same as conf/local.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one dotted config key, e.g. --set fit.sample_size=50000 (repeatable)")
    p.add_argument("--conf", dest="spark_conf", action="append", default=[], metavar="KEY=VALUE",
                   help="a Spark conf, as spark-submit takes it, e.g. --conf spark.executor.memory=2g (repeatable)")
    p.add_argument("--log-level", default="INFO", help="Python log level (default INFO)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of a failure")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcemb", description="Backward-compatible embedding versions on Delta Lake.",
                                     epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="step", required=True, metavar="STEP")
    for name, help_text in STEPS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == "registry":
            actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
            for action, text in (("list", "every transform with its status, origin, fit error and gate verdict"),
                                 ("show", "one transform: every field, fit config and metrics"),
                                 ("retire", "retire a transform (its edge then has no active transform)"),
                                 ("activate", "make a transform its edge's active one (rolls back; one commit)"),
                                 ("import", "register a transform file (npz bytes, e.g. AlignmentLoss.export_bytes)"),
                                 ("verify", "check every stored checksum")):
                a = actions.add_parser(action, help=text, description=text)
                _common(a)
                if action in ("show", "retire", "activate"):
                    a.add_argument("transform_id", metavar="ID")
                if action in ("retire", "activate", "import"):
                    a.add_argument("--reason", default="", help="why (recorded in the commit's userMetadata)")
                if action == "import":
                    a.add_argument("file", metavar="FILE")
                    a.add_argument("--source", type=int, required=True, help="source version k of the edge k -> j")
                    a.add_argument("--target", type=int, required=True, help="target version j (the one before k)")
                    a.add_argument("--checksum", default=None, help="expected SHA-256 of the file (verified)")
                    a.add_argument("--origin", choices=["import", "joint"], default="import")
                if action in ("list", "show"):
                    a.add_argument("--json", action="store_true", help="machine-readable output")
                if action in ("retire", "activate", "import"):
                    a.add_argument("--wait-lease", type=float, default=None, metavar="SECONDS",
                                   help="wait up to SECONDS for another process's run lease (default 0)")
            continue
        _common(p)
        if name in ("fit", "run"):
            p.add_argument("--refit", action="append", default=[], metavar="K:J|all",
                           help="refit edge K -> J (repeatable), or every post-hoc edge ('all')")
        if name in ("backfill", "run"):
            p.add_argument("--allow-shrink", action="store_true",
                           help="publish even if a space loses more than backfill.max_shrink of its rows")
            p.add_argument("--dry-run", action="store_true", help="print the plan; read metadata only, write nothing")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "export":
            p.add_argument("--source", type=int, default=None, help="source version K (default: the newest)")
            p.add_argument("--space", type=int, required=True, help="target space J (an older configured version)")
            p.add_argument("--output", required=True, metavar="FILE", help="the chain file to write")
        if name in WRITING_STEPS:
            p.add_argument("--wait-lease", type=float, default=None, metavar="SECONDS",
                           help="wait up to SECONDS for another bcemb process's run lease on this output "
                                "(default lease.wait_seconds, 0: exit 75 at once)")
    return parser


def resolve_config(path: Optional[str], overrides: Sequence[str], spark_conf: Sequence[str] = (),
                   wait_lease: Optional[float] = None) -> JobConfig:
    """Load the config (or the embedded default) with --set, --conf and --wait-lease applied, validated."""
    pairs = [_parse_override(o) for o in overrides]
    if wait_lease is not None:
        pairs.append(("lease.wait_seconds", wait_lease))
    pairs += [(f"spark.conf.{k}", v) for k, v in (_parse_conf(c) for c in spark_conf)]
    if path:
        return load_config(path, dict(pairs))
    data: dict = {}
    for dotted, value in pairs:
        apply_override(data, dotted, value)
    return config_from_dict(data)


def run_step(spark, args: argparse.Namespace, cfg: JobConfig):
    """Dispatch one step (library functions take `spark`; they never create it). Returns (result, text)."""
    step = args.step
    if step == "run":
        from bclib.steps.run import run_scheduled

        r = run_scheduled(spark, cfg, refit=args.refit, dry_run=args.dry_run, allow_shrink=args.allow_shrink)
        return r, r.summary()
    if step == "demo":
        from bclib.steps.demo import run_demo

        r = run_demo(spark, cfg)
        return r, None
    if step == "generate":
        from bclib.steps.generate import run_generate

        r = run_generate(spark, cfg)
        return r, None
    if step == "fit":
        from bclib.steps.fit import run_fit

        r = run_fit(spark, cfg, refit=args.refit)
        return r, None
    if step == "backfill":
        from bclib.steps.backfill import run_backfill

        r = run_backfill(spark, cfg, allow_shrink=args.allow_shrink, dry_run=args.dry_run)
        return r, r.summary() if args.dry_run else None
    if step == "evaluate":
        from bclib.steps.evaluate import run_evaluate

        r = run_evaluate(spark, cfg)
        return r, None
    if step == "status":
        from bclib.steps.status import run_status

        r = run_status(spark, cfg)
        return r, r.to_json() if args.json else r.table() + "\n" + r.summary()
    if step == "maintain":
        from bclib.steps.maintain import run_maintain

        r = run_maintain(spark, cfg)
        return r, None
    if step == "registry":
        return _registry(spark, args, cfg)
    if step == "export":
        from bclib.steps.registry_cmd import export_chain

        r = export_chain(spark, cfg, args.source, args.space, args.output)
        return r, r.summary()
    raise ValueError(f"unknown step {step!r}")


def _registry(spark, args, cfg: JobConfig):
    from bclib.steps import registry_cmd as rc

    if args.action == "list":
        r = rc.registry_list(spark, cfg)
        return r, rc.to_json(r) if args.json else rc.format_list(r.rows)
    if args.action == "show":
        r = rc.registry_show(spark, cfg, args.transform_id)
        text = rc.to_json(r) if args.json else "\n".join(f"{k}: {v}" for k, v in r.rows[0].items())
        return r, text
    if args.action == "retire":
        r = rc.registry_retire(spark, cfg, args.transform_id, args.reason)
        return r, r.summary()
    if args.action == "activate":
        r = rc.registry_activate(spark, cfg, args.transform_id, args.reason)
        return r, r.summary()
    if args.action == "import":
        r = rc.registry_import(spark, cfg, args.file, args.source, args.target, args.checksum, args.reason,
                               origin=args.origin)
        return r, f"{r.summary()}: {r.rows[0]['transform_id']} ({r.rows[0]['edge']})"
    if args.action == "verify":
        r = rc.registry_verify(spark, cfg)
        if r.problems:
            from bclib.errors import ChecksumError

            raise ChecksumError("; ".join(f"transform {tid}: {why}" for tid, why in r.problems)
                                + f" ({len(r.problems)} of {len(r.rows)} transforms fail; retire them or re-import)")
        return r, r.summary()
    raise ValueError(f"unknown registry action {args.action!r}")


def one_line_error(exc: BaseException) -> str:
    """The message a user needs, also for errors raised inside Spark's Python workers."""
    if isinstance(exc, BcembError):
        return f"{type(exc).__name__}: {exc}"
    named = executor_error(exc)
    if named is not None:
        return f"{type(named).__name__}: {named}"
    text = str(exc).strip()
    hint = _hint(exc, text)
    first = one_line(text.splitlines()[0]) if text else repr(exc)
    return f"{type(exc).__name__}: {first}" + (f" ({hint})" if hint else "")


def _hint(exc: BaseException, text: str) -> str:
    """What to do for failures of the environment (Java, jars, a conflicting writer)."""
    cls = error_class(exc)
    if cls == "JAVA_GATEWAY_EXITED" or "JAVA_GATEWAY_EXITED" in text or "Java gateway process exited" in text:
        from bclib.spark import java_hint

        return java_hint()
    if "ClassNotFoundException" in text or "No FileSystem for scheme" in text:
        from bclib.spark import missing_class_hint

        return missing_class_hint(text)
    return "run with --debug for the full traceback"


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("py4j").setLevel(logging.WARNING)
    name = args.step + (f" {args.action}" if args.step == "registry" else "")

    def fail(exc: BaseException, code: int) -> int:
        if args.debug:
            traceback.print_exception(exc, file=sys.stderr)
        print(f"bcemb {name}: {one_line_error(exc)}", file=sys.stderr)
        return code

    try:
        cfg = resolve_config(args.config, args.overrides, args.spark_conf, getattr(args, "wait_lease", None))
        if args.step == "export":  # a bad --output fails now, not after the session's start
            from bclib.steps.registry_cmd import export_path

            export_path(args.output)
    except ConfigError as exc:
        return fail(exc, EXIT_CONFIG)
    try:
        from bclib.spark import get_or_create, progress

        spark = get_or_create(cfg.spark)
        if not args.debug and cfg.spark.log_level.upper() in ("WARN", "ERROR", "FATAL", "OFF"):
            from bclib.spark import quiet_task_failure_logs

            quiet_task_failure_logs(spark)  # a failure is one named line (below), not pages of task traces
        from bclib.spark import ephemeral_catalog_warning
        from bclib.tables.delta import is_path

        locations = [cfg.registry_location, cfg.output_location, cfg.metrics_location, cfg.embeddings.location]
        warning = ephemeral_catalog_warning(spark, [loc for loc in locations if loc and not is_path(loc)])
        if warning:
            log.warning(warning)
        with progress(spark, f"bcemb {name}"):  # a log line at least every 30 s while the step runs
            result, text = run_step(spark, args, cfg)
    except KeyboardInterrupt as exc:
        return fail(exc, EXIT_INTERRUPTED)
    except GateRejectedError as exc:
        return fail(exc, EXIT_GATE)
    except (LeaseHeldError, LeaseLostError) as exc:
        return fail(exc, EXIT_LEASE)
    except ConfigError as exc:
        return fail(exc, EXIT_CONFIG)
    except Exception as exc:  # every other failure: one line (the class and what to do), exit 1
        named = executor_error(exc)
        if isinstance(named, GateRejectedError):
            return fail(named, EXIT_GATE)
        if named is None:
            from bclib.tables.embeddings import files_missing_error

            gone = files_missing_error(exc, cfg)  # a version's data file deleted outside Delta, named
            if gone is not None:
                gone.__cause__ = exc
                return fail(gone, EXIT_DATA)
        return fail(exc, EXIT_DATA)
    if text:
        print(text)
    if hasattr(result, "summary") and not (text and text.endswith(result.summary())):
        log.info(result.summary())
    partial = partly_done(result)
    if partial:
        print(f"bcemb {name}: {partial}", file=sys.stderr)
        return EXIT_PARTIAL
    return EXIT_OK


def partly_done(result) -> str:
    """The exit-4 line, or "": spaces a backfill (alone or inside `run`) left as they were, and versions evaluate
    (alone or inside `run`) left out, because their version table cannot be read."""
    from bclib.steps.backfill import BackfillResult
    from bclib.steps.evaluate import EvaluateResult

    backfill = result if isinstance(result, BackfillResult) else getattr(result, "backfill", None)
    evaluated = result if isinstance(result, EvaluateResult) else getattr(result, "evaluate", None)
    parts = []
    if isinstance(backfill, BackfillResult) and backfill.unreadable:
        parts.append(f"partly published: space(s) {sorted(backfill.unreadable)} left as they were: "
                     + "; ".join(f"space {j}: {why}" for j, why in sorted(backfill.unreadable.items())))
    if isinstance(evaluated, EvaluateResult) and evaluated.unreadable:
        parts.append(f"partly evaluated: version(s) {sorted(evaluated.unreadable)} left out (their pairs are not "
                     "measured): " + "; ".join(f"version {v}: {why}" for v, why in sorted(evaluated.unreadable.items())))
    return " | ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
