"""offload: long-context LLM inference on one consumer GPU with a tiered KV cache and sparse attention.

    from offload import LLM
    llm = LLM("smollm2-135m", ctx="8K")
    print(llm.generate("The capital of France is", max_new_tokens=8))
"""
from offload.config import OffloadConfig, parse_bytes, parse_tokens
from offload.errors import (CapacityError, ConfigError, ModelLoadError, OffloadError, SessionClosedError,
                            SessionFileError, TierIOError)

# LLM, Session, Chat and SamplingParams load on first use (PEP 562): importing them pulls in torch (1-4 s),
# which `offload-chat --help` and option errors must not wait for
_LAZY = {"LLM": "offload.api", "Session": "offload.api", "Chat": "offload.api",
         "SamplingParams": "offload.engine.sampling"}

__all__ = ["LLM", "Session", "Chat", "SamplingParams", "OffloadConfig", "parse_tokens", "parse_bytes",
           "OffloadError", "ConfigError", "ModelLoadError", "CapacityError", "TierIOError", "SessionFileError",
           "SessionClosedError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'offload' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
