"""Named exceptions raised at bcemb's boundaries.

Every message says what is wrong, what was expected and, where it helps, what
to do. Jobs turn these into a one-line error and a non-zero exit code.
"""

from __future__ import annotations


class BcembError(Exception):
    """Base class for every error bcemb raises on purpose."""


class ConfigError(BcembError, ValueError):
    """A config file is missing, malformed, has unknown keys or wrong types."""


class MissingTableError(BcembError, LookupError):
    """An input Delta table (path or catalog name) does not exist."""


class MissingColumnError(BcembError, KeyError):
    """A table lacks a column the config names."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DimensionMismatchError(BcembError, ValueError):
    """Arrays or vectors do not have the dimension the transform expects."""


class InvalidVectorError(BcembError, ValueError):
    """A vector is null, has the wrong length or holds NaN/Inf."""


class ChecksumError(BcembError, ValueError):
    """Serialised transform bytes do not match their recorded checksum."""


class TransformFormatError(BcembError, ValueError):
    """Serialised transform bytes are not a valid bcemb transform."""


class RegistryError(BcembError, LookupError):
    """The transform registry lacks an active transform an edge needs."""


class InsufficientDataError(BcembError, ValueError):
    """Too few shared entities to fit or evaluate a transform."""
