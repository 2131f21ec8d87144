"""Object-store settings: bcemb's `storage_options` turned into what each storage library takes.

bcemb takes one set of storage options, named as the Rust `object_store` crate names them (the keys
delta-rs and obstore take: aws_access_key_id, aws_region, aws_endpoint, aws_allow_http, ...; with or
without the `aws_` prefix, any case). pyarrow's S3FileSystem names its arguments otherwise and shares
no key with them but `region`; this module is the one place that maps them. Pure: no I/O.
"""

from __future__ import annotations

from typing import Optional

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
