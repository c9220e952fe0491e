"""Errors a user can act on.

Every `OffloadError` carries a one-line message that names the problem and the fix. The CLI
prints it as `error: <message>` and exits with status 2, without a traceback.
"""


class OffloadError(Exception):
    """Bad input or an environment problem the user can fix (CLI exit code 2)."""


class ConfigError(OffloadError):
    """A configuration value is invalid."""


class ModelLoadError(OffloadError):
    """A model path, alias or file cannot be used."""


class CapacityError(OffloadError):
    """The context does not fit into the memory budgets."""


class TierIOError(OffloadError):
    """A tier failed to store or return a chunk (disk full, I/O error, checksum mismatch)."""


class SessionFileError(OffloadError):
    """A saved session file is corrupt, truncated or belongs to another model."""


class SessionClosedError(OffloadError):
    """A session or chat was used after it (or its LLM) was closed."""
