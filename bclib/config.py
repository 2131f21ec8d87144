"""Strict job configs: frozen dataclasses loaded from YAML.

Unknown keys and wrong types are rejected at load time with a message that
names the key (as a dotted path) and lists the valid keys, so a typo in a
scheduled backfill's config fails before any table is touched.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from bclib.errors import ConfigError

VERSION_PLACEHOLDER = "{version}"


@dataclass(frozen=True)
class SparkSettings:
    """Session settings; `bclib.spark` is the only reader."""

    # Spark master URL (local[*], spark://host:7077, yarn); None: whatever spark-submit set
    master: Optional[str] = "local[*]"
    app_name: str = "bcemb"  # the Spark application name
    warehouse_dir: str = "./warehouse"  # spark.sql.warehouse.dir: where catalog tables without a location live
    shuffle_partitions: int = 8  # spark.sql.shuffle.partitions
    # auto: nothing under spark-submit, cached jars if present, else Ivy.
    delta_jars: Literal["auto", "ivy", "cache", "provided"] = "auto"
    # where `make jars` caches the Delta (and S3A) jars that delta_jars: cache uses
    jar_cache_dir: str = "~/.cache/bcemb/jars"
    log_level: str = "WARN"  # Spark's own log level (the driver's log4j)
    # any other Spark settings, passed to the session builder (spark.jars: bcemb adds Delta's)
    conf: dict[str, str] = field(default_factory=dict)
    # Spark Connect server URL (sc://host:15002/;token=...); None: $SPARK_REMOTE when set, else a classic session
    remote: Optional[str] = None
    # on Spark Connect: send bclib to the server's Python workers with spark.addArtifacts (its dependencies —
    # numpy, pyarrow, pyyaml — must be installed there); false: bclib is installed on the cluster
    ship_bclib: bool = True

    @property
    def connect_url(self) -> Optional[str]:
        """The Spark Connect URL in effect: `remote`, else $SPARK_REMOTE, else None (a classic session)."""
        return self.remote or os.environ.get("SPARK_REMOTE") or None

    @property
    def connect_shown(self) -> Optional[str]:
        """`connect_url` for logs and messages: its ';key=value' parameters (token=..., user_id=...) left out."""
        url = self.connect_url
        return None if url is None else url.split(";", 1)[0] + (";<parameters hidden>" if ";" in url else "")


@dataclass(frozen=True)
class EmbeddingSource:
    """Where the embedding team's versions live and how to read them.

    `location` is a Delta path (anything with '/' or a URI scheme) or a
    catalog table name. With `version_column` unset it must contain
    '{version}' (one table per version); with it set, one table holds all
    versions and `location` has no placeholder.
    """

    # a Delta path or catalog table per version, with '{version}'; one table when version_column is set
    location: str = "./warehouse/embeddings/v{version}"
    # the column that tells versions apart when one table holds them all; None: a table per version
    version_column: Optional[str] = None
    # the entity id column (bigint or string; int, smallint, tinyint and decimal(p <= 18, 0) read as bigint)
    id_column: str = "id"
    vector_column: str = "vector"  # the vector column (array<float|double>, or encoded: see vector_encoding)
    # the versions bcemb keeps spaces for, oldest first; the newest is the source
    versions: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    # how the vector column stores a vector: array<float|double> ("array"), little-endian float32 bytes in a
    # binary column ("float32_le", lossless), or a JSON array in a string column ("json"); decoded on read
    vector_encoding: Literal["array", "float32_le", "json"] = "array"


@dataclass(frozen=True)
class TransformSettings:
    """Which transform family and objective `fit` uses.

    ridge: scale-free (× the mean eigenvalue of XᵀX) or "auto" (GCV for linear/lowrank/local, K-fold on the
    anchored objective, which then also chooses the step weights within `anchor_tolerance` of the
    single-step 1-hop error). bias: "auto" fits an intercept when either space is off-centre (the mean
    vector's norm over 10 % of the rows' RMS norm, e.g. sentence embeddings) for single-step fits, none
    for the multi-step objectives (their closed form has none). output_norm: "auto" renormalises the transform's output rows when the target
    space is unit-norm, "unit" always, "none" never. clusters/temperature: the local family's k and
    softmax temperature (None: chosen from the data).
    """

    # the transform family: linear (affine ridge), orthogonal (Procrustes), lowrank, mlp, local (clustered linear)
    kind: Literal["linear", "orthogonal", "lowrank", "mlp", "local"] = "linear"
    # single_step (B_k on k -> k-1 pairs), multi_step (all composed hops), anchored (multi-step kept near single-step)
    objective: Literal["single_step", "multi_step", "anchored"] = "single_step"
    # ridge strength, scale-free (x the mean eigenvalue of X^T X), or auto (chosen by cross-validation)
    ridge: Union[float, Literal["auto"]] = "auto"
    # fit an intercept; auto: when either space is off-centre (single-step fits)
    bias: Union[bool, Literal["auto"]] = "auto"
    # auto: renormalise output rows when the target space is unit-norm; unit: always; none: never
    output_norm: Literal["auto", "unit", "none"] = "auto"
    rank: Optional[int] = None  # the rank of the lowrank family (required there)
    clusters: Optional[int] = None  # the local family's number of clusters; None: chosen from the data
    temperature: Optional[float] = None  # the local family's softmax temperature; None: chosen from the data
    # anchored objective: how much worse than the single-step 1-hop error it may get (fraction)
    anchor_tolerance: float = 0.02
    # target dimensions constant on the fit sample (std < 1e-4 x the median) are output as that constant
    pin_constant_dims: bool = True
    scale: bool = True  # orthogonal family: also fit a global scale factor
    hidden: int = 256  # mlp family: hidden layer width
    epochs: int = 200  # mlp family: maximum training epochs
    batch_size: int = 1024  # mlp family: rows per training batch
    learning_rate: float = 1e-3  # mlp family: Adam learning rate
    patience: int = 10  # mlp family: epochs without validation improvement before stopping early
    seed: int = 0  # mlp family: the torch seed (fits are deterministic for a given seed)


@dataclass(frozen=True)
class FitSettings:
    """The deterministic hash sample the driver fits on."""

    sample_size: int = 100_000  # caps the fit's rows only
    holdout: float = 0.05  # the evaluation slice: a fraction (0, 0.5] of the id-hash space, or a row count >= 1
    holdout_fraction: float = 0.05  # validation part of the fit sample (fit metrics, degenerate-fit check)
    refit_with_validation: bool = True  # after validating, fit the published map again on train + validation
    min_pairs: int = 100  # an edge needs at least this many shared entities in the fit sample (InsufficientDataError)
    # the salt of the id hash that picks the fit and evaluation samples (changing it picks others)
    salt: str = "bcemb-fit"


@dataclass(frozen=True)
class BackfillSettings:
    """Which version is rewritten into which spaces, and executor sizing."""

    source_version: Optional[int] = None  # None: the newest configured version
    target_spaces: Optional[list[int]] = None  # None: every earlier version
    arrow_batch_rows: Optional[int] = None  # None: sized from the row width
    target_batch_mb: int = 16  # arrow batches of about this many MB when arrow_batch_rows is unset
    target_file_mb: int = 256  # output files of about this size (maxRecordsPerFile from the row width)
    output_partitions: Optional[int] = None  # None: keep the input's partitioning
    quarantine_location: Optional[str] = None  # None: bad vectors fail the run
    force: bool = False  # rewrite even when the output is already up to date
    # auto: commit the source's change data feed (INSERT REPLACE ON or MERGE, `incremental_commit`) when only the
    # source changed and the cost model prefers it (else a full rewrite, logged); require: commit it whenever the
    # feed serves the range (whatever the changed fraction or layout), else fail with IncrementalUnavailableError;
    # off: always full rewrites
    incremental: Literal["auto", "require", "off"] = "auto"
    # auto decides by estimated cost (bclib.steps.backfill_plan.auto_choice); this optional cap also rewrites in
    # full when more than this fraction of the source's rows changed
    incremental_max_fraction: Optional[float] = None  # auto: a cap on the changed share (None: the cost model decides)
    # the incremental commit broadcasts its change set's keys (changed ids x spaces rows, ~24 bytes a row on the
    # driver and each executor) when it has at most this many rows: INSERT REPLACE ON's one join and two of the
    # MERGE's three then need no shuffle of the output's ids (docs/incremental.md)
    merge_broadcast_rows: int = 4_000_000  # an incremental commit of at most this many changed ids x spaces broadcasts them (0: never)
    # how an incremental change set is committed: auto = Delta's INSERT REPLACE ON (the replaceOn write option, Delta
    # >= 4.3: a broadcast semi join removes the changed rows, the new ones are appended; docs/incremental.md) where it
    # keeps everything the MERGE keeps, else the MERGE (logged, with why); merge = always the MERGE
    incremental_commit: Literal["auto", "merge"] = "auto"  # auto: INSERT REPLACE ON where it can, else MERGE; merge: always MERGE
    # create the output with delta.enableDeletionVectors: an incremental MERGE then writes the changed rows and
    # a deletion vector per touched file instead of rewriting those files (readers need Delta reader v3; the
    # deltalake 1.x pyarrow reader refuses such tables). Without them, auto rewrites in full when a MERGE would
    # touch most files anyway. Applies when bcemb creates the output; an existing one: ALTER TABLE
    # (docs/incremental.md).
    deletion_vectors: bool = False
    max_shrink: float = 0.1  # a space may lose at most this fraction of its rows (--allow-shrink overrides)
    max_retries: int = 3  # bounded retries on Delta's concurrent-modification exceptions
    retry_backoff_seconds: float = 1.0  # first wait before a re-plan (doubled each time, with jitter)
    # a source_version older than the newest configured version must be asked for explicitly
    allow_older_source: bool = False
    # auto: the arrow engine for plain path tables it can read and commit to, else spark (logged, with why)
    engine: Literal["auto", "spark", "arrow"] = "auto"
    arrow_task_mb: int = 128  # arrow engine: row groups per Spark task, about this many MB of input
    # the arrow engine's and the lease's object-store options over storage.options (kept for older configs)
    storage_options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class GateSettings:
    """The compatibility gate a candidate chain passes before its space is (re)published.

    Thresholds are optional (None = not checked). Whatever the thresholds, a chain whose headline
    neighbour recall, or any thresholded metric, is worse than the untransformed baseline is refused.
    With `enforce: false` the verdict is logged and recorded but the space is published anyway.
    """

    # refuse a chain whose neighbour recall@K is below this (None: only the baseline check)
    min_neighbour_recall: Optional[float] = None
    # refuse a chain whose consumer-probe AUC retention is below this (needs labels)
    min_probe_retention: Optional[float] = None
    max_relative_l2: Optional[float] = None  # refuse a chain whose relative L2 error is above this
    enforce: bool = True  # false: record and log a rejection but publish anyway
    # false: no measurement at all (only for tables without stored historical versions, e.g. benchmarks)
    enabled: bool = True
    # the gate fails closed: an edge judged on fewer held-out ids than this is refused, naming the edge and count
    min_heldout_ids: int = 200


@dataclass(frozen=True)
class MaintenanceSettings:
    """`bcemb maintain`: OPTIMIZE small files per space, VACUUM files older than the retention."""

    vacuum_retention_hours: float = 168.0  # Delta's default (7 days); VACUUM uses it rounded up to whole hours
    time_travel_hours: float = 168.0  # what analysts are promised; VACUUM never retains less
    # VACUUM never retains less than this (longer than any backfill, so an in-flight task's files survive) ...
    min_retention_hours: float = 24.0
    allow_short_retention: bool = False  # ... unless this is true
    optimize_min_files: int = 8  # OPTIMIZE a space holding at least this many files ...
    optimize_small_file_mb: int = 64  # ... of which more than half are smaller than this
    # tasks of VACUUM's file listing (Delta uses spark.sql.sources.parallelPartitionDiscovery.parallelism, 10,000
    # by default: 10,000 tasks to list a few directories, ~30 s on 2 local cores); 0: twice the session's cores
    vacuum_listing_parallelism: int = 0


@dataclass(frozen=True)
class StorageSettings:
    """How bcemb reaches an object store: one set of options for Spark, pyarrow and delta-rs.

    Keys are the Rust object_store crate's (what delta-rs and obstore take): aws_endpoint, aws_region,
    aws_access_key_id, aws_secret_access_key, aws_session_token, aws_allow_http, azure_storage_account_name,
    azure_storage_account_key, google_service_account_path, ... (`bclib.storage`). bcemb translates
    them for Spark's S3A/ABFS/GCS connectors (`spark.hadoop.*`, unless `spark.conf` sets the same key), for
    pyarrow's S3FileSystem and for the run lease. Unset: every library takes credentials from the environment
    or the platform's provider chain. Credentials given here never appear in a log line, an error message, a
    commit, the report or `status`.
    """

    # object-store options (object_store names); credentials: prefer the environment or the provider chain
    options: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LeaseSettings:
    """The run lease: one bcemb process at a time writes an output (`bclib.tables.lease`).

    Created put-if-absent on the output's own storage (O_EXCL locally, a conditional PUT on object
    stores), renewed by a heartbeat, re-checked before every commit. A crashed holder blocks others
    for at most `ttl_seconds`.
    """

    enabled: bool = True  # false: no run lease (only where nothing else can write the output)
    # where the lease objects live; None: `<output's parent>/_bcemb_leases/<output's name>` for a path output,
    # `<spark.sql.warehouse.dir>/_bcemb_leases/<name>` for a catalog output
    location: Optional[str] = None
    ttl_seconds: float = 120.0  # a holder that stops renewing for this long loses the lease
    wait_seconds: float = 0.0  # how long a second process waits for the lease before LeaseHeldError (--wait-lease)


@dataclass(frozen=True)
class EvaluateSettings:
    """The held-out evaluation sample (disjoint from the fit sample)."""

    sample_size: int = 20_000  # held-out entities evaluated per version (at most)
    neighbours_k: int = 10  # K of the neighbour recall@K metrics
    neighbours_sample: int = 2_000  # query entities of the neighbour-recall metrics
    label_location: Optional[str] = "./warehouse/labels"  # None: no probe metrics
    label_column: str = "label"  # the label column of the label table (one consumer probe)
    # several label columns of the label table, one consumer probe each (None: just label_column)
    label_columns: Optional[list[str]] = None
    # a label whose probe on the TRUE vectors has a lower AUC is "not informative": no retention is reported
    probe_min_auc: float = 0.6
    report_dir: str = "./reports"  # where evaluate writes its report (Markdown and JSON)

    @property
    def labels(self) -> list[str]:
        """The label columns probed, in order."""
        return list(self.label_columns) if self.label_columns else [self.label_column]


@dataclass(frozen=True)
class DemoSettings:
    """The synthetic embedding versions `bcemb demo` generates."""

    n_entities: int = 200_000  # entities of the newest synthetic version
    # the dimension of each synthetic version (one per configured version)
    dims: list[int] = field(default_factory=lambda: [64, 80, 96, 112, 128])
    n_clusters: int = 32  # clusters of the synthetic latent space (and of the demo labels)
    latent_dim: int = 48  # dimension of the shared latent space the versions are drawn from
    churn_fraction: float = 0.03  # fraction of entities added and removed between consecutive versions
    nonlinear_strength: float = 0.15  # how far each version's map from the latent space is from linear
    noise: float = 0.02  # Gaussian noise added to every vector
    block_rows: int = 8192  # rows generated per block (memory of generate)
    seed: int = 7  # the generator's seed (the same seed writes the same tables)
    # None: (re)write tables `generate` created itself (marked with a table property), refuse any other;
    # true: overwrite whatever is there; false: keep existing tables
    overwrite: Optional[bool] = None


@dataclass(frozen=True)
class JobConfig:
    """One config file: every section a job may read."""

    spark: SparkSettings = field(default_factory=SparkSettings)
    embeddings: EmbeddingSource = field(default_factory=EmbeddingSource)
    registry_location: str = "./warehouse/bc_registry"  # the transform registry (Delta path or catalog table)
    # the output table: every configured earlier space, partitioned by space_version
    output_location: str = "./warehouse/bc_embeddings"
    metrics_location: str = "./warehouse/bc_metrics"  # the metrics table (evaluate's figures, the gate's verdicts)
    transform: TransformSettings = field(default_factory=TransformSettings)
    fit: FitSettings = field(default_factory=FitSettings)
    backfill: BackfillSettings = field(default_factory=BackfillSettings)
    evaluate: EvaluateSettings = field(default_factory=EvaluateSettings)
    gate: GateSettings = field(default_factory=GateSettings)
    maintenance: MaintenanceSettings = field(default_factory=MaintenanceSettings)
    lease: LeaseSettings = field(default_factory=LeaseSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    demo: DemoSettings = field(default_factory=DemoSettings)

    @property
    def object_store_options(self) -> dict[str, str]:
        """The options pyarrow, delta-rs and the lease get: `storage.options`, then `backfill.storage_options`
        (the arrow engine's own, kept for configs that have it) over them."""
        return {**self.storage.options, **self.backfill.storage_options}

    def version_location(self, version: int) -> str:
        """The table holding one embedding version."""
        return self.embeddings.location.replace(VERSION_PLACEHOLDER, str(version))

    @property
    def source_version(self) -> int:
        if self.backfill.source_version is not None:
            return self.backfill.source_version
        return max(self.embeddings.versions)

    @property
    def target_spaces(self) -> list[int]:
        if self.backfill.target_spaces is not None:
            return sorted(self.backfill.target_spaces)
        return sorted(v for v in self.embeddings.versions if v < self.source_version)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")  # 1e-9, 2E3, .5e1


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to float)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(value, inner[0], key)
        problems = []
        for member in inner:  # the first member that accepts the value wins
            try:
                return _coerce(value, member, key)
            except ConfigError as exc:
                problems.append(str(exc).removeprefix(f"config key '{key}': "))
        raise ConfigError(f"config key '{key}': {value!r} matches none of "
                          f"{', '.join(_type_name(m) for m in inner)} ({'; '.join(problems)})")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"config key '{key}': {value!r} is not one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}': expected a list, found {type(value).__name__} {value!r}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}': expected a mapping, found {type(value).__name__} {value!r}")
        return {str(k): str(v) for k, v in value.items()}
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 (PyYAML) reads 1e-9 as a string: an exponent needs a dot there
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"config key '{key}': expected int, found bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(
            f"config key '{key}': expected {_type_name(tp)}, found {type(value).__name__} {value!r}"
        )
    return value


def _build(cls: type, data: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys."""
    where = prefix or "top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section '{where}': expected a mapping, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(map(str, data)) - set(valid))
    if unknown:
        dotted = ", ".join(f"'{prefix + '.' if prefix else ''}{u}'" for u in unknown)
        raise ConfigError(f"unknown config key {dotted} in {where}; valid keys: {', '.join(valid)}")
    kwargs = {
        name: _coerce(value, hints[name], f"{prefix + '.' if prefix else ''}{name}")
        for name, value in data.items()
    }
    return cls(**kwargs)


_COLUMN = re.compile(r"^[A-Za-z0-9_\-]+$")


def _validate(cfg: JobConfig) -> None:
    """Cross-field checks that a type alone cannot express."""
    emb = cfg.embeddings
    for key, name in (("embeddings.id_column", emb.id_column), ("embeddings.vector_column", emb.vector_column),
                      ("embeddings.version_column", emb.version_column),
                      ("evaluate.label_column", cfg.evaluate.label_column),
                      *(("evaluate.label_columns", c) for c in (cfg.evaluate.label_columns or []))):
        if name is not None and not _COLUMN.match(name):
            raise ConfigError(f"config key '{key}' = {name!r} is not a single column name (letters, digits, '_' "
                              "or '-'; no dots, spaces, commas, quotes or backticks)")
    has_placeholder = VERSION_PLACEHOLDER in emb.location
    if emb.version_column is None and not has_placeholder:
        raise ConfigError(
            "config key 'embeddings.location' must contain '{version}' when "
            "'embeddings.version_column' is not set (one table per version)"
        )
    if emb.version_column is not None and has_placeholder:
        raise ConfigError(
            "config key 'embeddings.location' must not contain '{version}' when "
            "'embeddings.version_column' is set (one table holds every version)"
        )
    if len(emb.versions) < 2 or len(set(emb.versions)) != len(emb.versions):
        raise ConfigError(f"config key 'embeddings.versions' needs at least two distinct versions, found {emb.versions}")
    if cfg.source_version not in emb.versions:
        raise ConfigError(
            f"config key 'backfill.source_version' = {cfg.source_version} is not among embeddings.versions {emb.versions}"
        )
    newest = max(emb.versions)
    if cfg.source_version == min(emb.versions):
        raise ConfigError(
            f"config key 'backfill.source_version' = {cfg.source_version} is the oldest configured version: there is "
            "no earlier space to backfill into (use the newest version, or leave it unset)"
        )
    if cfg.source_version != newest and not cfg.backfill.allow_older_source:
        raise ConfigError(
            f"config key 'backfill.source_version' = {cfg.source_version} is older than the newest configured version "
            f"{newest}: the output would serve consumers from an older model than the newest one. Leave it unset "
            "(the newest), or set backfill.allow_older_source: true if that is really wanted"
        )
    if cfg.backfill.target_spaces is not None and not cfg.backfill.target_spaces:
        raise ConfigError("config key 'backfill.target_spaces' is an empty list: no space to backfill into "
                          "(leave it unset for every earlier version)")
    bad = [s for s in cfg.target_spaces if s not in emb.versions or s >= cfg.source_version]
    if bad:
        raise ConfigError(
            f"config key 'backfill.target_spaces': {bad} must be configured versions older than "
            f"source version {cfg.source_version}"
        )
    if list(emb.versions) != sorted(set(emb.versions)):
        raise ConfigError(f"config key 'embeddings.versions' must list each version once, oldest first (increasing), "
                          f"found {list(emb.versions)}")
    _check_bounds(cfg)
    if not (0 < cfg.fit.holdout <= 0.5 or (cfg.fit.holdout >= 1 and float(cfg.fit.holdout).is_integer())):
        raise ConfigError(f"config key 'fit.holdout' must be a fraction in (0, 0.5] of the entities or a whole "
                          f"number of rows >= 1, found {cfg.fit.holdout}")
    if not 0 < cfg.fit.holdout_fraction < 0.5:
        raise ConfigError(f"config key 'fit.holdout_fraction' must be in (0, 0.5), found {cfg.fit.holdout_fraction}")
    if cfg.fit.sample_size < cfg.fit.min_pairs:
        raise ConfigError(f"config key 'fit.sample_size' ({cfg.fit.sample_size}) is below fit.min_pairs ({cfg.fit.min_pairs})")
    if cfg.transform.kind in ("orthogonal", "lowrank", "local") and cfg.transform.objective != "single_step":
        raise ConfigError(
            f"config key 'transform.objective': '{cfg.transform.objective}' is available for kinds 'linear' and "
            f"'mlp'; '{cfg.transform.kind}' fits single_step only"
        )
    if cfg.transform.kind == "lowrank" and cfg.transform.rank is None:
        raise ConfigError("config key 'transform.rank' is required when transform.kind is 'lowrank'")
    _check_locations(cfg)
    from bclib.storage import local_path

    if local_path(cfg.evaluate.report_dir) is None:
        raise ConfigError(f"config key 'evaluate.report_dir' = {cfg.evaluate.report_dir!r} is not on this machine: "
                          "the report is written by this process (the driver, or the Spark Connect client); give a "
                          "local path or a file: URI")
    if cfg.spark.connect_url:
        _check_connect_locations(cfg)


# --------------------------------------------------------------------------- table locations

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]+):(.*)$")  # two letters or more: 'C:/x' stays a local path
_SAME_STORE = {"s3a": "s3", "s3n": "s3"}  # Hadoop's connectors for one store
CATALOG = "catalog"


def location_key(location: str) -> tuple[str, tuple[str, ...]]:
    """(store, path parts) of a table location, normalised so that two spellings of one place compare equal.

    A catalog table name (no '/', no scheme, not starting with '.'; `bclib.tables.delta.is_path`) is
    ("catalog", (its lower-case name,)). A URI with a scheme is ("<scheme>://<authority>", parts): scheme
    and authority lower-cased, s3a/s3n read as s3. Anything else, 'file:' / 'file://' URIs included, is a
    local path resolved against the working directory: ("", parts). Parts drop '.', empty (duplicate or
    trailing '/') and apply '..'.
    """
    text = location.strip()
    if "/" not in text and "://" not in text and not text.startswith("."):
        return CATALOG, (text.lower(),)
    store = ""
    match = _SCHEME.match(text)
    if match and match.group(1).lower() != "file":
        scheme, rest = match.group(1).lower(), match.group(2)
        authority = ""
        if rest.startswith("//"):
            authority, _, rest = rest[2:].partition("/")
        store = f"{_SAME_STORE.get(scheme, scheme)}://{authority.lower()}"
    else:
        rest = match.group(2) if match else text
        if rest.startswith("//"):  # file://host/path: the host (localhost or none) is this machine
            rest = "/" + rest[2:].partition("/")[2]
        if not rest.startswith("/"):
            rest = os.path.join(os.getcwd(), rest)
    parts: list[str] = []
    for part in rest.split("/"):
        if part == "..":
            if parts:
                parts.pop()
        elif part not in ("", "."):
            parts.append(part)
    return store, tuple(parts)


def _shown(key: tuple[str, tuple[str, ...]]) -> str:
    store, parts = key
    return parts[0] if store == CATALOG else store + "/" + "/".join(parts)


def table_locations(cfg: JobConfig) -> list[tuple[str, str]]:
    """(config key, location) of every Delta table a config names; one entry per embedding version table."""
    out = [("output_location", cfg.output_location), ("registry_location", cfg.registry_location),
           ("metrics_location", cfg.metrics_location)]
    if cfg.backfill.quarantine_location is not None:
        out.append(("backfill.quarantine_location", cfg.backfill.quarantine_location))
    if cfg.evaluate.label_location is not None:
        out.append(("evaluate.label_location", cfg.evaluate.label_location))
    if cfg.embeddings.version_column is not None:
        out.append(("embeddings.location", cfg.embeddings.location))
    else:
        out.extend((f"'embeddings.location' (version {v})", cfg.version_location(v)) for v in cfg.embeddings.versions)
    return [(k if k.startswith("'") else f"'{k}'", loc) for k, loc in out]


_CATALOG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){0,2}$")
_READ_ONLY_KEYS = ("'evaluate.label_location'", "'embeddings.location'")  # bcemb only reads these tables


def _check_locations(cfg: JobConfig) -> None:
    """No table bcemb writes (output, registry, metrics, quarantine) at the place of another table or inside
    another's directory, nor another inside it (ConfigError naming both keys). Tables bcemb only reads may
    coincide: labels kept in an embedding version table are read, never written."""
    placed = [(key, loc, location_key(loc)) for key, loc in table_locations(cfg)]
    for key, loc, (store, _) in placed:
        if store == CATALOG and not _CATALOG_NAME.match(loc.strip()):
            raise ConfigError(
                f"config key {key} = {loc!r} is neither a path (a '/' or a scheme followed by '/': file:/..., "
                "s3a://...) nor a catalog table name (up to three dot-separated identifiers of letters, digits "
                "and underscores)")
    for i, a in enumerate(placed):
        for b in placed[i + 1:]:
            (store, parts_a), (store_b, parts_b) = a[2], b[2]
            if store != store_b or (a[0].startswith(_READ_ONLY_KEYS) and b[0].startswith(_READ_ONLY_KEYS)):
                continue
            if parts_a == parts_b:
                raise ConfigError(
                    f"config keys {a[0]} = {a[1]!r} and {b[0]} = {b[1]!r} point at the same table "
                    f"({_shown(a[2])}): each table needs its own location")
            for inner, outer in ((a, b), (b, a)):
                if store != CATALOG and inner[2][1][:len(outer[2][1])] == outer[2][1]:
                    raise ConfigError(
                        f"config key {inner[0]} = {inner[1]!r} ({_shown(inner[2])}) is inside the table of "
                        f"{outer[0]} = {outer[1]!r} ({_shown(outer[2])}): a Delta table's directory holds only "
                        "that table; give each table a location outside the others")


def _check_connect_locations(cfg: JobConfig) -> None:
    """On Spark Connect every location is an absolute URI (scheme:/...) or a catalog name: a relative or bare
    local path would resolve against the client's working directory for some operations (DDL, the lease) and
    the server's for others (reads and writes), splitting one table in two (ConfigError naming the key)."""
    keys = table_locations(cfg) + [("'lease.location'", cfg.lease.location)] * bool(cfg.lease.location)
    for key, loc in keys:
        if location_key(loc)[0] != CATALOG and not _SCHEME.match(loc.strip()):
            raise ConfigError(
                f"config key {key} = {loc!r} is a path without a scheme; on Spark Connect ({cfg.spark.connect_shown}) "
                "locations must be absolute URIs (file:/..., s3a://..., abfss://..., dbfs:/...) or catalog table "
                "names: a plain path resolves on the client for some operations and on the server for others")


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set one dotted key in a parsed config mapping, in place: 'fit.sample_size' -> data['fit']['sample_size'].

    Under 'spark.conf.' the rest is one Spark conf key with its dots ('spark.conf.spark.executor.memory'
    sets data['spark']['conf']['spark.executor.memory']). Raises ConfigError for an empty key part or
    a key that would descend into a value that is not a mapping.
    """
    prefix = "spark.conf."
    if dotted.startswith(prefix):
        parts = ["spark", "conf", dotted[len(prefix):]]
    else:
        parts = dotted.split(".")
    if any(not part for part in parts):
        raise ConfigError(f"override key {dotted!r} has an empty part; expected a dotted key like fit.sample_size")
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override key {dotted!r}: '{'.'.join(parts[:i + 1])}' is a value, not a section")
        node = child
    node[parts[-1]] = value


_BOUNDS = {  # dotted key: (low, high) inclusive; None = unbounded on that side
    "fit.sample_size": (1, None), "fit.min_pairs": (2, None),
    "backfill.arrow_batch_rows": (1, 1_000_000), "backfill.target_batch_mb": (1, 1024),
    "backfill.target_file_mb": (1, 4096), "backfill.output_partitions": (1, 1_000_000),
    "backfill.incremental_max_fraction": (0.0, 1.0), "backfill.max_shrink": (0.0, 1.0),
    "backfill.merge_broadcast_rows": (0, 100_000_000),
    "backfill.max_retries": (1, 20), "backfill.retry_backoff_seconds": (0.0, 600.0), "backfill.arrow_task_mb": (1, 4096),
    "evaluate.sample_size": (1, None), "evaluate.neighbours_k": (1, 1000), "evaluate.probe_min_auc": (0.5, 1.0), "evaluate.neighbours_sample": (1, None),
    "maintenance.vacuum_retention_hours": (0.0, None), "maintenance.time_travel_hours": (0.0, None),
    "maintenance.min_retention_hours": (0.0, None),
    "maintenance.optimize_min_files": (2, None), "maintenance.optimize_small_file_mb": (1, None),
    "maintenance.vacuum_listing_parallelism": (0, 100_000),
    "transform.hidden": (1, None), "transform.epochs": (1, None), "transform.batch_size": (1, None),
    "transform.patience": (1, None), "transform.clusters": (1, None), "transform.anchor_tolerance": (0.0, None),
    "spark.shuffle_partitions": (1, None),
    "gate.min_heldout_ids": (1, None), "lease.ttl_seconds": (5.0, 86_400.0), "lease.wait_seconds": (0.0, None),
    "demo.n_entities": (1, None), "demo.block_rows": (1, 10_000_000),
}


def _check_bounds(cfg: JobConfig) -> None:
    """Numeric settings within their bounds, the bound named in the message."""
    for dotted, (low, high) in _BOUNDS.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value is None:
            continue
        if (low is not None and value < low) or (high is not None and value > high):
            rng = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise ConfigError(f"config key '{dotted}' = {value} is out of range: expected {rng}")
    m = cfg.maintenance
    if m.vacuum_retention_hours < m.time_travel_hours:
        raise ConfigError(
            f"config key 'maintenance.vacuum_retention_hours' = {m.vacuum_retention_hours:g} is shorter than "
            f"maintenance.time_travel_hours = {m.time_travel_hours:g}, the time-travel and change-feed window "
            "analysts are promised; VACUUM would delete files they may still read"
        )
    if m.vacuum_retention_hours < m.min_retention_hours and not m.allow_short_retention:
        raise ConfigError(
            f"config key 'maintenance.vacuum_retention_hours' = {m.vacuum_retention_hours:g} is below "
            f"maintenance.min_retention_hours = {m.min_retention_hours:g}, the floor that keeps the files of a "
            "backfill still in flight; raise it, or set maintenance.allow_short_retention: true if nothing "
            "runs that long"
        )
    if cfg.transform.ridge != "auto" and isinstance(cfg.transform.ridge, (int, float)) and cfg.transform.ridge < 0:
        raise ConfigError(f"config key 'transform.ridge' = {cfg.transform.ridge} must be >= 0 (or 'auto')")
    if cfg.transform.temperature is not None and not cfg.transform.temperature > 0:
        raise ConfigError(f"config key 'transform.temperature' = {cfg.transform.temperature} must be > 0 "
                          "(or unset: chosen from the data)")


def config_from_dict(data: dict[str, Any]) -> JobConfig:
    """Build and validate a JobConfig from an already-parsed mapping."""
    cfg = _with_storage(_build(JobConfig, data))
    _validate(cfg)
    return cfg


def _with_storage(cfg: JobConfig) -> JobConfig:
    """Storage options checked (ConfigError names unknown keys, never a value), credentials hidden (`Secret`)
    and Spark's connector settings derived from them (`spark.hadoop.*`; a key `spark.conf` sets wins)."""
    from bclib.storage import Secret, spark_hadoop_conf, unknown_storage_keys, with_secrets_hidden

    for key, options in (("storage.options", cfg.storage.options),
                         ("backfill.storage_options", cfg.backfill.storage_options)):
        unknown = unknown_storage_keys(options)
        if unknown:
            raise ConfigError(f"config key '{key}': unknown option(s) {unknown}; expected the object_store names "
                              "that delta-rs takes (aws_endpoint, aws_region, aws_access_key_id, "
                              "aws_secret_access_key, aws_allow_http, azure_storage_account_name, "
                              "google_service_account_path, ...) or pyarrow S3FileSystem arguments")
    storage = dataclasses.replace(cfg.storage, options=with_secrets_hidden(cfg.storage.options))
    backfill = dataclasses.replace(cfg.backfill, storage_options=with_secrets_hidden(cfg.backfill.storage_options))
    conf = {**spark_hadoop_conf(storage.options), **with_secrets_hidden(cfg.spark.conf)}
    remote = Secret(cfg.spark.remote) if cfg.spark.remote else cfg.spark.remote  # sc://...;token=<a credential>
    return dataclasses.replace(cfg, storage=storage, backfill=backfill,
                               spark=dataclasses.replace(cfg.spark, conf=conf, remote=remote))


def config_digest(cfg: JobConfig) -> str:
    """16 hex digits of sha256 over the config with every credential left out (the report's fingerprint)."""
    import hashlib
    import json

    from bclib.storage import Secret

    def clean(value):
        if isinstance(value, Secret):
            return "<redacted>"
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value

    return hashlib.sha256(json.dumps(clean(dataclasses.asdict(cfg)), sort_keys=True, default=str).encode()) \
        .hexdigest()[:16]


def load_config(path: str | os.PathLike[str], overrides: Optional[dict[str, Any]] = None) -> JobConfig:
    """Load a YAML config file strictly; `overrides` are dotted keys (tests, CLI)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {p} is not valid YAML: {exc}") from exc
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    try:
        return config_from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
