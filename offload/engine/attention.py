"""Moved to `offload.attention`; this name stays for importers that have not switched yet."""
from offload.attention import AttentionBackend, PersistableKV  # noqa: F401
