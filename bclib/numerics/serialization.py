"""Pickle-free transform bytes: an npz archive (allow_pickle=False) with a JSON header, plus SHA-256.

The registry stores these bytes; executors and every reader load them with `transform_from_bytes`,
which verifies the checksum before parsing and never unpickles (numpy's `np.load(allow_pickle=False)`).
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from typing import Optional

import numpy as np

from bclib.errors import ChecksumError, TransformFormatError
from bclib.numerics.transforms import AffineTransform, LocalAffineTransform, ResidualMLPTransform, Transform

FORMAT_VERSION = 1


def transform_to_bytes(t: Transform) -> bytes:
    """npz bytes (no pickle): the arrays (float64) plus a JSON header with class, kind, dims, meta and format version.

    `t.meta` must be JSON-able (the fits record plain floats, lists and strings; non-finite floats as None).
    Raises TypeError for a meta that is not.
    """
    header = {
        "format_version": FORMAT_VERSION,
        "kind": t.kind,
        "class": type(t).__name__,
        "dim_in": t.dim_in,
        "dim_out": t.dim_out,
        "meta": t.meta,
    }
    buf = io.BytesIO()
    arrays = {k: np.ascontiguousarray(v, dtype=np.float64) for k, v in t.arrays().items()}
    arrays["__header__"] = np.frombuffer(json.dumps(header, sort_keys=True).encode(), dtype=np.uint8)
    # fixed timestamps so the same transform always gives the same bytes
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            arr_buf = io.BytesIO()
            np.lib.format.write_array(arr_buf, arrays[name], allow_pickle=False)
            zf.writestr(info, arr_buf.getvalue())
    return buf.getvalue()


def checksum(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def transform_from_bytes(data: bytes, expected_checksum: Optional[str] = None) -> Transform:
    """Load a transform (AffineTransform, ResidualMLPTransform or LocalAffineTransform, by the header's class, with
    its meta); the checksum is verified first, and no pickle is ever allowed.

    Raises ChecksumError for a checksum mismatch, TransformFormatError for bytes that are not a bcemb transform.
    """
    if expected_checksum is not None and checksum(data) != expected_checksum:
        raise ChecksumError(
            f"transform bytes have checksum {checksum(data)[:16]}…, expected {expected_checksum[:16]}…; "
            "the stored parameters were altered or truncated"
        )
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise TransformFormatError(f"transform bytes are not a valid npz archive: {exc}") from exc
    if "__header__" not in arrays:
        raise TransformFormatError("transform bytes lack the '__header__' entry")
    try:
        header = json.loads(arrays.pop("__header__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TransformFormatError(f"transform header is not valid JSON: {exc}") from exc
    if header.get("format_version") != FORMAT_VERSION:
        raise TransformFormatError(
            f"transform format version {header.get('format_version')} is not supported (expected {FORMAT_VERSION})"
        )
    cls_name = header.get("class")
    try:
        if cls_name == "AffineTransform":
            t: Transform = AffineTransform(arrays["weight"], arrays.get("bias"), header["kind"], header["meta"])
        elif cls_name == "ResidualMLPTransform":
            t = ResidualMLPTransform(**{k: arrays[k] for k in ("weight", "bias", "w1", "b1", "w2", "b2")},
                                     kind=header["kind"], meta=header["meta"])
        elif cls_name == "LocalAffineTransform":
            t = LocalAffineTransform(arrays["centroids"], float(arrays["temperature"].reshape(-1)[0]), arrays["weight"],
                                     arrays["bias"], kind=header["kind"], meta=header["meta"])
        else:
            raise TransformFormatError(f"unknown transform class {cls_name!r}")
    except KeyError as exc:
        raise TransformFormatError(f"transform bytes lack array or header field {exc}") from exc
    if (t.dim_in, t.dim_out) != (header["dim_in"], header["dim_out"]):
        raise TransformFormatError(
            f"transform header says {header['dim_in']}->{header['dim_out']} but arrays are {t.dim_in}->{t.dim_out}"
        )
    return t
