"""offload-serve: an OpenAI-compatible HTTP server over one model (see offload.server.cli and README)."""
