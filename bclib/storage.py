"""Object-store settings: bcemb's `storage_options` turned into what each storage library takes.

bcemb takes one set of storage options, named as the Rust `object_store` crate names them (the keys
delta-rs and obstore take: aws_access_key_id, aws_region, aws_endpoint, aws_allow_http, ...,
azure_storage_account_name, azure_storage_endpoint, ..., google_service_account_key, ...; with or
without the `aws_`/`azure_`/`google_` prefix, any case). pyarrow's S3FileSystem, AzureFileSystem and
GcsFileSystem name their arguments otherwise, and so do Spark's Hadoop connectors (S3A, ABFS, the GCS
connector); this module is the one place that maps them. Pure: no I/O.
"""

from __future__ import annotations

import json
import os
from typing import Optional
from urllib.parse import urlsplit

# object_store client settings (obstore's client_options), given among delta-rs style storage options
_CLIENT_KEYS = {"allow_http", "allow_invalid_certificates", "timeout", "connect_timeout", "proxy_url", "user_agent"}


def store_options(location: str, storage_options: Optional[dict]) -> tuple[dict, dict]:
    """(config, client_options) for obstore from bcemb's storage options (the keys delta-rs takes: both are
    the Rust object_store crate's names, e.g. aws_endpoint, aws_region, aws_allow_http). For an s3:// or
    s3a:// location, bare keys get the `aws_` prefix and endpoint/endpoint_url become aws_endpoint; client
    settings "true"/"false" become booleans. Pure."""
    config: dict = {}
    client: dict = {}
    s3 = location.startswith(("s3://", "s3a://"))
    for key, value in (storage_options or {}).items():
        k = str(key).lower()
        bare = k.split("_", 1)[1] if k.startswith(("aws_", "azure_", "google_")) else k
        if bare in _CLIENT_KEYS:
            client[bare] = str(value).lower() == "true" if str(value).lower() in ("true", "false") else value
        elif s3 and k in ("endpoint", "endpoint_url", "aws_endpoint_url"):
            config["aws_endpoint"] = value
        elif s3 and not k.startswith("aws_"):
            config["aws_" + k] = value
        else:
            config[k] = value
    return config, client


# object_store name (after `aws_`) -> pyarrow.fs.S3FileSystem argument; pyarrow's own names pass through
_S3_KEYS = {"access_key_id": "access_key", "secret_access_key": "secret_key", "session_token": "session_token",
            "token": "session_token", "region": "region", "default_region": "region", "endpoint": "endpoint_override"}
_PYARROW_S3 = {"access_key", "secret_key", "session_token", "region", "endpoint_override", "scheme",
               "allow_delayed_open", "request_timeout", "anonymous"}
_PYARROW_BOOL = {"allow_delayed_open", "anonymous"}


def pyarrow_s3_options(storage_options: Optional[dict]) -> dict:
    """pyarrow.fs.S3FileSystem keyword arguments from bcemb's storage options (normalised by `store_options`).

    pyarrow's own argument names are accepted as they are; keys pyarrow has no use for (aws_conditional_put,
    the object_store client's timeouts, ...) are left out. A plain-http endpoint or aws_allow_http=true
    selects scheme http. `allow_delayed_open` defaults to True: a file smaller than one upload part is then
    one PUT instead of CreateMultipartUpload + UploadPart + CompleteMultipartUpload (bcemb's part files
    mostly are), and a failed open is reported at the write, where bcemb handles it anyway. Pure."""
    config, client = store_options("s3://", storage_options)
    out: dict = {"allow_delayed_open": True}
    for key, value in config.items():
        bare = key[len("aws_"):] if key.startswith("aws_") else key
        if bare in _PYARROW_S3:
            out[bare] = str(value).lower() == "true" if bare in _PYARROW_BOOL and isinstance(value, str) else value
        elif bare in _S3_KEYS:
            out[_S3_KEYS[bare]] = value
    endpoint = out.get("endpoint_override")
    if isinstance(endpoint, str) and "://" in endpoint:
        scheme, rest = endpoint.split("://", 1)
        out["endpoint_override"] = rest
        out.setdefault("scheme", scheme)
    elif client.get("allow_http") is True:
        out.setdefault("scheme", "http")
    return out


# Azurite's well-known development account (published by Microsoft; object_store's use_emulator takes the same)
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
AZURITE_BLOB_URL = "http://127.0.0.1:10000"  # object_store's default emulator endpoint (AZURITE_BLOB_STORAGE_URL)


def _first(options: dict, *keys: str):
    """The value of the first of `keys` present in `options` (lower-cased keys), else None."""
    for key in keys:
        if options.get(key) not in (None, ""):
            return options[key]
    return None


def _true(value) -> bool:
    return str(value).lower() == "true"


def _azure(options: Optional[dict]) -> dict:
    """The Azure settings among bcemb's storage options, by meaning: account, key, sas, endpoint (a URL: given,
    or the emulator's for azure_storage_use_emulator), service principal. The emulator's account and key are
    the defaults under use_emulator, as object_store has them. Pure."""
    o = {str(k).lower(): v for k, v in (options or {}).items()}
    emulator = _true(_first(o, "azure_storage_use_emulator", "use_emulator"))
    account = _first(o, "azure_storage_account_name", "account_name")
    key = _first(o, "azure_storage_account_key", "azure_storage_access_key", "azure_storage_master_key",
                 "account_key", "master_key")  # not bare access_key: pyarrow's S3FileSystem has that name
    endpoint = _first(o, "azure_storage_endpoint", "azure_endpoint")
    if emulator:
        account = account or AZURITE_ACCOUNT
        key = key or AZURITE_ACCOUNT_KEY
        endpoint = endpoint or f"{AZURITE_BLOB_URL}/{account}"
    return {"account": account, "key": key, "endpoint": endpoint,
            "sas": _first(o, "azure_storage_sas_key", "azure_storage_sas_token", "sas_key", "sas_token"),
            "client_id": _first(o, "azure_storage_client_id", "azure_client_id", "client_id"),
            "client_secret": _first(o, "azure_storage_client_secret", "azure_client_secret", "client_secret"),
            "tenant_id": _first(o, "azure_storage_tenant_id", "azure_storage_authority_id", "azure_tenant_id",
                                "azure_authority_id", "tenant_id", "authority_id")}


def _emulator_style(endpoint) -> bool:
    """An endpoint that names the account in its path (`http://127.0.0.1:10000/devstoreaccount1`: Azurite's
    addressing) rather than in its host name (`https://<account>.blob.core.windows.net`)."""
    return bool(endpoint) and urlsplit(str(endpoint)).path.strip("/") != ""


def azure_location(uri: str) -> tuple[Optional[str], str]:
    """(account or None, `container/path`) of an Azure URI as Spark, delta-rs and pyarrow write them:
    `abfs[s]://<container>@<account>.dfs.core.windows.net/<path>`, `wasb[s]://<container>@<account>.blob.core.
    windows.net/<path>`, or `az://<container>/<path>` / `azure://...` (the account then comes from the options).
    Pure."""
    parts = urlsplit(uri)
    container, at, host = parts.netloc.partition("@")
    account = host.split(".", 1)[0] if at and host else None
    if not at:
        container = parts.netloc
    return account, (container + "/" + parts.path.lstrip("/")).rstrip("/")


def pyarrow_azure_options(storage_options: Optional[dict], account: Optional[str] = None) -> dict:
    """pyarrow.fs.AzureFileSystem keyword arguments from bcemb's storage options: the account (else `account`,
    from the location), its key, a SAS token or a service principal (client id/secret, tenant), and for a
    custom endpoint (azure_storage_endpoint, or the emulator's under azure_storage_use_emulator) the Blob and
    DFS authorities (host:port) and scheme. Without a key, SAS or principal pyarrow takes Azure's default
    credential chain. Pure."""
    az = _azure(storage_options)
    out: dict = {"account_name": az["account"] or account}
    if az["key"]:
        out["account_key"] = az["key"]
    elif az["sas"]:
        out["sas_token"] = az["sas"]
    if az["client_id"]:
        out["client_id"] = az["client_id"]
        if az["client_secret"] and az["tenant_id"]:
            out["client_secret"], out["tenant_id"] = az["client_secret"], az["tenant_id"]
    if az["endpoint"]:
        url = urlsplit(str(az["endpoint"]))
        out["blob_storage_authority"] = out["dfs_storage_authority"] = url.netloc
        out["blob_storage_scheme"] = out["dfs_storage_scheme"] = url.scheme or "https"
    return out


def _gcs(options: Optional[dict]) -> dict:
    """The GCS settings among bcemb's storage options: the key file's path, the key itself (JSON text) and what
    object_store reads from that JSON besides the credential, `gcs_base_url` (a custom endpoint, e.g. an
    emulator) and `disable_oauth` (no token: an emulator); `google_skip_signature` also means no token. Pure."""
    o = {str(k).lower(): v for k, v in (options or {}).items()}
    key_json = _first(o, "google_service_account_key", "service_account_key")
    try:
        key = json.loads(str(key_json)) if key_json else {}
    except ValueError:
        key = {}
    key = key if isinstance(key, dict) else {}
    return {"path": _first(o, "google_service_account_path", "google_service_account", "service_account_path",
                           "service_account", "google_application_credentials", "application_credentials"),
            "base_url": key.get("gcs_base_url"),
            "anonymous": bool(key.get("disable_oauth")) or _true(_first(o, "google_skip_signature"))}


def pyarrow_gcs_options(storage_options: Optional[dict]) -> dict:
    """pyarrow.fs.GcsFileSystem keyword arguments from bcemb's storage options: a service-account key's
    `gcs_base_url` becomes endpoint_override (host:port) and scheme, `disable_oauth` (or google_skip_signature)
    anonymous access. pyarrow takes no key file argument: a real key reaches it through the environment
    (GOOGLE_APPLICATION_CREDENTIALS) or the platform's credentials, as pyarrow documents. Pure."""
    g = _gcs(storage_options)
    out: dict = {}
    if g["base_url"]:
        url = urlsplit(str(g["base_url"]))
        out["endpoint_override"], out["scheme"] = url.netloc, url.scheme or "https"
    if g["anonymous"]:
        out["anonymous"] = True
    return out


# --------------------------------------------------------------------------- one set of options, three libraries

class Secret(str):
    """A credential: the string itself where a library needs it, `<redacted>` wherever it is shown (repr, so
    in a logged dict, an error naming a mapping, `bcemb status --json`)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "'<redacted>'"


_SECRET_WORDS = ("secret", "password", "token", "sas", "access_key", "account_key", "master_key", "private_key",
                 "service_account_key", "client_secret", "credential")


def is_secret_key(key: str) -> bool:
    """True for an option whose value is a credential (secret key, token, password, SAS, account key)."""
    k = key.lower().replace(".", "_")  # Spark's spark.hadoop.fs.s3a.secret.key reads as ..._secret_key
    return any(w in k for w in _SECRET_WORDS) and not k.endswith(("_id", "_file", "_path", "provider", "_uri"))


# the Rust object_store crate's keys (delta-rs and obstore take them; `aws_`/`azure_`/`google_` prefix optional)
_OBJECT_STORE_KEYS = {
    # S3
    "aws_access_key_id", "aws_secret_access_key", "aws_session_token", "aws_token", "aws_region",
    "aws_default_region", "aws_endpoint", "aws_endpoint_url", "aws_virtual_hosted_style_request", "aws_bucket",
    "aws_bucket_name", "aws_imdsv1_fallback", "aws_metadata_endpoint", "aws_unsigned_payload",
    "aws_checksum_algorithm", "aws_container_credentials_relative_uri", "aws_skip_signature", "aws_s3_express",
    "aws_copy_if_not_exists", "aws_conditional_put", "aws_server_side_encryption", "aws_sse_kms_key_id",
    "aws_sse_bucket_key_enabled", "aws_request_payer", "aws_profile", "aws_s3_locking_provider",
    "aws_s3_allow_unsafe_rename", "aws_allow_http",
    # Azure
    "azure_storage_account_name", "azure_storage_account_key", "azure_storage_access_key",
    "azure_storage_client_id", "azure_storage_client_secret", "azure_storage_tenant_id",
    "azure_storage_authority_id", "azure_storage_sas_key", "azure_storage_sas_token", "azure_storage_token",
    "azure_storage_use_emulator", "azure_storage_endpoint", "azure_use_fabric_endpoint", "azure_use_azure_cli",
    "azure_msi_endpoint", "azure_object_id", "azure_msi_resource_id", "azure_federated_token_file",
    "azure_container_name", "azure_skip_signature", "azure_disable_tagging", "azure_endpoint",
    "azure_storage_master_key", "azure_client_id", "azure_client_secret", "azure_tenant_id", "azure_authority_id",
    "azure_storage_authority_id",
    # GCS
    "google_service_account", "google_service_account_path", "google_service_account_key",
    "google_bucket", "google_bucket_name", "google_application_credentials", "google_skip_signature",
}
# bare names (no prefix) the crate also takes, and the object_store client's settings
_BARE_KEYS = {k.split("_", 1)[1] for k in _OBJECT_STORE_KEYS} | {
    "account_name", "account_key", "access_key", "client_id", "client_secret", "tenant_id", "sas_key",
    "sas_token", "bearer_token", "use_emulator", "service_account", "service_account_key", "master_key",
    "service_account_path", "endpoint_url", "authority_id"} | _CLIENT_KEYS | {
    "pool_idle_timeout", "pool_max_idle_per_host", "http1_only", "http2_only", "retry_timeout", "max_retries",
    "conditional_put"}


def unknown_storage_keys(options: Optional[dict]) -> list[str]:
    """The keys of `options` that neither object_store (delta-rs, obstore) nor pyarrow's S3FileSystem takes,
    any case, sorted (a client setting may carry a store's prefix: azure_allow_http). Pure."""
    out = []
    for key in options or {}:
        k = str(key).lower()
        if k in _OBJECT_STORE_KEYS or k in _BARE_KEYS or k in _PYARROW_S3:
            continue
        if k.startswith(("aws_", "azure_", "google_")) and k.split("_", 1)[1] in _CLIENT_KEYS:
            continue  # a client setting with its store's prefix (azure_allow_http), as object_store takes it
        out.append(str(key))
    return sorted(out)


def with_secrets_hidden(options: Optional[dict]) -> dict:
    """`options` with every credential's value a `Secret` (shown as <redacted>). Pure."""
    return {str(k): Secret(v) if is_secret_key(str(k)) else str(v) for k, v in (options or {}).items()}


def spark_hadoop_conf(options: Optional[dict]) -> dict:
    """Spark's Hadoop settings for the same store from bcemb's storage options. Empty without such options:
    Spark then takes credentials as it does by default (instance role, environment, the provider chain).
    Values keep their type (`Secret` stays hidden). Pure.

    S3 (the S3A connector, `spark.hadoop.fs.s3a.*`): endpoint, region, path-style access for a custom endpoint,
    plain http, keys and the matching credentials provider.

    Azure (the ABFS driver, `spark.hadoop.fs.azure.*`): the account key, for the account's DFS and Blob host
    names (`abfs[s]://c@<account>.dfs...` and `...blob...` locations; WASB reads the Blob one). An emulator-style
    endpoint (`azure_storage_endpoint: http://127.0.0.1:10000/devstoreaccount1`, the account in the path, as
    Azurite serves it; or azure_storage_use_emulator) becomes `fs.azure.abfs.endpoint` (host:port: ABFS then
    puts the account in the path too), plain http for an http endpoint, and the Blob service for a flat
    namespace (`fs.azure.fns.account.service.type=BLOB`, `fs.azure.account.hns.enabled=false`): object_store's
    endpoint is a Blob endpoint, and Azurite serves no DFS (ADLS Gen2) API.

    GCS (the GCS connector, `spark.hadoop.fs.gs.*`): a service-account key file (`google_service_account_path`)
    -> the connector's JSON key file auth; a key's `gcs_base_url` (object_store's custom endpoint, e.g. an
    emulator) -> `fs.gs.storage.root.url`, its `disable_oauth` (or google_skip_signature) -> no auth."""
    s3, _ = store_options("s3://", options)
    client = {k.lower(): v for k, v in (options or {}).items()}
    out: dict = {}
    h = "spark.hadoop.fs.s3a."
    endpoint = s3.get("aws_endpoint")
    if endpoint:
        out[h + "endpoint"] = endpoint
        plain = str(endpoint).startswith("http://") or str(client.get("aws_allow_http", client.get(
            "allow_http", ""))).lower() == "true"
        if plain:
            out[h + "connection.ssl.enabled"] = "false"
        virtual = str(s3.get("aws_virtual_hosted_style_request", "false")).lower() == "true"
        out[h + "path.style.access"] = "false" if virtual else "true"
    region = s3.get("aws_region") or s3.get("aws_default_region")
    if region:
        out[h + "endpoint.region"] = region
    key_id, secret = s3.get("aws_access_key_id"), s3.get("aws_secret_access_key")
    token = s3.get("aws_session_token") or s3.get("aws_token")
    if key_id and secret:
        out[h + "access.key"] = key_id
        out[h + "secret.key"] = secret
        if token:
            out[h + "session.token"] = token
            out[h + "aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.TemporaryAWSCredentialsProvider"
        else:
            out[h + "aws.credentials.provider"] = "org.apache.hadoop.fs.s3a.SimpleAWSCredentialsProvider"
    out.update(_spark_azure(options))
    out.update(_spark_gcs(options))
    return out


def _spark_azure(options: Optional[dict]) -> dict:
    """The ABFS driver's settings (`spark_hadoop_conf`'s Azure part). Pure."""
    az = _azure(options)
    out: dict = {}
    h = "spark.hadoop.fs.azure."
    if az["account"] and az["key"]:
        for service in ("dfs", "blob"):
            out[f"{h}account.key.{az['account']}.{service}.core.windows.net"] = az["key"]
    if _emulator_style(az["endpoint"]):
        url = urlsplit(str(az["endpoint"]))
        out[h + "abfs.endpoint"] = f"{url.hostname}:{url.port or (80 if url.scheme == 'http' else 443)}"
        if url.scheme == "http":
            out[h + "always.use.https"] = "false"
            # ABFS's default Apache HTTP client needs its TLS socket factory, which it sets up only for https
            # ("SSL socket factory may not be null" over http); the JDK's client has no such need
            out[h + "networking.library"] = "JDK_HTTP_URL_CONNECTION"
        out[h + "fns.account.service.type"] = "BLOB"
        out[h + "account.hns.enabled"] = "false"
    return out


def _spark_gcs(options: Optional[dict]) -> dict:
    """The GCS connector's settings (`spark_hadoop_conf`'s GCS part). Pure."""
    g = _gcs(options)
    out: dict = {}
    h = "spark.hadoop.fs.gs."
    if g["path"]:
        out[h + "auth.type"] = "SERVICE_ACCOUNT_JSON_KEYFILE"
        out[h + "auth.service.account.json.keyfile"] = g["path"]
    if g["base_url"]:
        out[h + "storage.root.url"] = str(g["base_url"]).rstrip("/") + "/"
    if g["anonymous"]:
        out[h + "auth.type"] = "UNAUTHENTICATED"
    return out


def local_path(location: str) -> Optional[str]:
    """The absolute local path of a location on this machine's filesystem: a plain path (relative: against the
    working directory) or a file: URI (`file:/x`, `file:///x`, `file://localhost/x`, as Hadoop writes them);
    None for any other URI (s3a://, abfss://, gs://, dbfs:/ ...). Pure."""
    if location.startswith("file:"):
        rest = location[len("file:"):]
        if rest.startswith("//"):
            rest = "/" + rest[2:].partition("/")[2]  # file://<host>/path: the host is this machine
        return "/" + rest.lstrip("/")
    scheme = location.split(":", 1)[0] if ":" in location else ""
    if "://" in location or (len(scheme) > 1 and location[len(scheme) + 1:].startswith("/") and scheme.isalpha()):
        return None
    return os.path.abspath(location)


def object_store(location: str, storage_options: Optional[dict], mkdir: bool = False):
    """An obstore store rooted at `location`: a local path or file: URI (`local_path`), or an object-store URI
    (s3a:// is read as s3://) with `storage_options` translated by `store_options`. `mkdir`: create a local
    directory that does not exist yet."""
    from obstore.store import LocalStore, from_url

    path = local_path(location)
    if path is not None:
        return LocalStore(prefix=path, mkdir=mkdir)
    uri = "s3://" + location[len("s3a://"):] if location.startswith("s3a://") else location
    config, client = store_options(location, storage_options)
    return from_url(uri, config=config, client_options=client)
