"""offload: long-context LLM inference on one consumer GPU with a tiered KV cache and sparse attention.

    from offload import LLM
    llm = LLM("smollm2-135m", ctx="8K")
    print(llm.generate("The capital of France is", max_new_tokens=8))
"""
from offload.api import LLM, Chat, Session
from offload.config import OffloadConfig, parse_bytes, parse_tokens
from offload.errors import (CapacityError, ConfigError, ModelLoadError, OffloadError, SessionClosedError,
                            SessionFileError, TierIOError)

__all__ = ["LLM", "Session", "Chat", "OffloadConfig", "parse_tokens", "parse_bytes", "OffloadError",
           "ConfigError", "ModelLoadError", "CapacityError", "TierIOError", "SessionFileError",
           "SessionClosedError"]
__version__ = "0.1.0"
