"""Prefill, decode and sampling over an `AttentionBackend`."""
