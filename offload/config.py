"""One frozen configuration for a runtime instance, with size parsing and YAML / env layering.

Priority when layered by the CLI: command-line flags > OFFLOAD_* environment > YAML file > defaults.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from offload.errors import ConfigError
from offload.files import read_utf8

_TOKEN_SUFFIX = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
_BYTE_SUFFIX = {"": 1, "B": 1, "K": 1000, "KB": 1000, "KIB": 1 << 10, "M": 1000**2, "MB": 1000**2, "MIB": 1 << 20,
                "G": 1000**3, "GB": 1000**3, "GIB": 1 << 30, "T": 1000**4, "TB": 1000**4, "TIB": 1 << 40}

ATTENTION_MODES = ("auto", "full", "sparse")
LOAD_FORMATS = ("auto", "dummy")
DTYPES = ("auto", "bfloat16", "float16", "float32")
DEVICES = ("auto", "cpu", "cuda")
SELECT_UNITS = ("chunk", "token")
PREFILL_MODES = ("exact", "sparse")
TOKEN_REDUCES = ("max", "sum")
TOKEN_SCORES = ("keys", "shadow")   # how the token stage ranks its candidates
KV_DTYPES = ("auto", "bf16", "int8", "int4")
WEIGHTS = ("auto", "bf16", "q8_0", "q4")   # offload.model.loaders.build: how weights sit on the device
CONFIG_MAX_BYTES = 1 << 20      # an options file is a few hundred bytes; anything near this is not one
SEED_MAX = 2**64 - 1            # torch.Generator.manual_seed takes 64 bits
# fields whose default is None: what a set value may be (other fields take the type of their default)
_OPTIONAL_TYPES = {"ctx": (int, str), "gpu_mem": (int, str), "host_mem": (int, str), "disk_mem": (int, str),
                   "disk_dir": (str,), "streaming_heads": (dict,), "index_options": (dict,), "seed": (int,),
                   "prompt_cache": (str,), "prompt_cache_every": (int, str), "stop": (str, list, tuple),
                   "token_mass": (float, int)}
_ANY_TYPES = {"budget": (str, int, float, list)}
_TYPE_NAMES = {bool: "true or false", int: "a whole number", str: "a string", float: "a number", dict: "a mapping",
               list: "a list"}


def parse_tokens(value, what: str = "ctx") -> int:
    """'128K' -> 131072, '1M' -> 1048576 (binary suffixes for token counts), 4096 -> 4096."""
    if isinstance(value, bool):
        raise ConfigError(f"bad token count {value!r} for {what}: use a number like 8192, 128K or 1M")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)\s*", str(value), re.IGNORECASE)
    if not m:
        raise ConfigError(f"bad token count {value!r} for {what}: use a number like 8192, 128K or 1M")
    n = float(m.group(1)) * _TOKEN_SUFFIX[m.group(2).upper()]
    if n != int(n):
        raise ConfigError(f"bad token count {value!r} for {what}: it is not a whole number of tokens")
    return int(n)


def parse_bytes(value, what: str = "memory") -> int:
    """'20GiB' -> 20 * 2**30, '20GB' -> 20 * 10**9, 1024 -> 1024."""
    if isinstance(value, bool):
        raise ConfigError(f"bad memory size {value!r} for {what}: use a size like 20GiB or 512MB")
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B?)\s*", str(value), re.IGNORECASE)
    if not m or m.group(2).upper() not in _BYTE_SUFFIX:
        raise ConfigError(f"bad memory size {value!r} for {what}: use a size like 20GiB or 512MB")
    return int(float(m.group(1)) * _BYTE_SUFFIX[m.group(2).upper()])


@dataclass(frozen=True)
class OffloadConfig:
    model: str = "smollm2-135m"
    ctx: int | str | None = None          # tokens; None = the model's trained length, capped at 128K
    device: str = "auto"
    dtype: str = "auto"                   # auto = bfloat16 on CUDA, float32 on the CPU
    gpu_mem: int | str | None = None      # KV budget per tier; None = detect
    host_mem: int | str | None = None
    disk_mem: int | str | None = None
    disk_dir: str | None = None
    attention: str = "auto"               # auto: exact while the KV fits on the GPU, else sparse; CPU: exact
    # sparse: tokens ("2K", the default: the same cost at any ctx; "5%" was 52K tokens at 1M), a mass threshold
    # ("p=0.75,floor=128,cap=2K": per KV head the fewest chunks whose estimated mass reaches p; 1.66x the step
    # time at 128K, not yet shown more accurate at the same average: bench/RESULTS.md), a fraction, or a list
    budget: str | int | float | list = "2K"
    streaming_heads: dict | None = None   # sparse: {layer: [kv heads]} that attend to sinks + window only
    # sparse selection: auto (the accurate shadow-ranked token preset where its shadows fit on the GPU, else the
    # summary index over whole chunks: offload/selection.py) | summary | shadow | ann
    index: str = "auto"
    index_options: dict | None = None     # passed to the index, e.g. {"bounds": "int8"} or {"rank": 16}
    chunk_tokens: int = 32
    select_unit: str = "chunk"            # sparse: attend whole chunks, or the top tokens of the candidate chunks
    token_candidates: float = 4.0         # select_unit=token: candidate chunks = this x the budget's chunks
    token_reduce: str = "sum"             # select_unit=token: rank a token by the group's summed softmax or max q.k
    # select_unit=token, lossy, off by default (bench/RESULTS.md, issue 13): the budget's tokens become a cap and
    # each KV head attends the fewest candidate tokens whose softmax mass (with sinks + window) reaches this p
    token_mass: float | None = None
    token_floor: int = 0                  # token_mass: tokens a head attends at least (whatever the mass)
    # select_unit=token: how candidates are ranked. keys: their keys are read (over PCIe from the host) and scored
    # exactly. shadow (index shadow, lossy, off by default; bench/RESULTS.md, issue 13): ranked from the index's
    # low-rank key shadows on the GPU, and only the picked tokens' exact K and V rows are read (ShadowKV's idea)
    token_scores: str = "keys"
    policy: str = "lru"                   # which chunks stay on faster tiers: lru | attention
    # decode with a bf16 host tier: once per chunk of tokens, host chunks the steps kept selecting trade places
    # with GPU-pool chunks the policy ranks below them (exact: bytes are copied as they are; tiers/hot.py)
    promote_hot: bool = False
    kv_dtype: str = "bf16"                # KV in the host and disk tiers: bf16 (as computed) | int8 | int4
                                          # (compressed, lossy: bench/RESULTS.md, issue 12) | auto
    sink_tokens: int = 64                 # always attended and kept on the GPU (attention sinks)
    window_tokens: int = 256              # the local window: always attended and kept on the GPU
    load_format: str = "auto"
    weights: str = "auto"                 # auto: a GGUF's blocks stay quantized on a GPU | bf16 (dequantized)
                                          # | q8_0 | q4 (Q4_K): matrices quantized at load (lossy)
    prefill_chunk: int = 2048
    stream_chunk: int = 8192              # tokens per forward chunk of a long tiered prefill on CUDA (one that streams
                                          # history): each chunk reads the streamed history once, so larger is faster
    cuda_graph: bool = True               # capture decode steps in CUDA graphs (False: eager, e.g. to compare)
    prefill: str = "exact"                # exact | sparse (block-sparse history, lossy: bench/RESULTS.md, issue 11)
    prompt_cache: str | None = None       # CLI: a file that keeps the document's prefilled KV (offload.prompt_cache)
    prompt_cache_every: int | str | None = None   # checkpoint a long prefill every N tokens; None: 64K from 128K on
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    # the rest of offload.engine.sampling.SamplingParams (validated there): 0 / 1 turn each off
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: str | list | tuple | None = None    # stop strings: the answer ends before the first one

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass normalisation)
        if isinstance(self.model, os.PathLike):
            set_("model", os.fspath(self.model))
        _check_types(self)
        if self.ctx is not None:
            set_("ctx", parse_tokens(self.ctx, "--ctx"))
            if self.ctx <= 0:
                raise ConfigError(f"--ctx must be positive, got {self.ctx}; pass a size like 8K or 128K")
        for name in ("gpu_mem", "host_mem", "disk_mem"):
            v = getattr(self, name)
            if v is not None:
                set_(name, parse_bytes(v, "--" + name.replace("_", "-")))
                if getattr(self, name) < 0:
                    raise ConfigError(f"--{name.replace('_', '-')} must not be negative")
        for name, allowed in (("device", DEVICES), ("attention", ATTENTION_MODES),
                              ("load_format", LOAD_FORMATS), ("dtype", DTYPES), ("prefill", PREFILL_MODES),
                              ("kv_dtype", KV_DTYPES), ("weights", WEIGHTS)):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)!r} is not one of {', '.join(allowed)}")
        if self.temperature < 0:
            raise ConfigError(f"--temperature must be >= 0, got {self.temperature}; use 0 for greedy or e.g. 0.8")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"--top-p must be in (0, 1], got {self.top_p}; use e.g. 0.9, or 1 to turn it off")
        if self.seed is not None and not 0 <= self.seed <= SEED_MAX:
            raise ConfigError(f"--seed {self.seed} is outside 0..2**64-1; pass a seed in that range")
        if self.max_new_tokens < 0:
            raise ConfigError(f"--max-new-tokens must be >= 0, got {self.max_new_tokens}")
        _check_sampling(self)
        for name in ("sink_tokens", "window_tokens"):
            if int(getattr(self, name)) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.select_unit not in SELECT_UNITS:
            raise ConfigError(f"select_unit {self.select_unit!r} is not one of {', '.join(SELECT_UNITS)}")
        if self.token_reduce not in TOKEN_REDUCES:
            raise ConfigError(f"token_reduce {self.token_reduce!r} is not one of {', '.join(TOKEN_REDUCES)}")
        tc = self.token_candidates
        if isinstance(tc, bool) or not isinstance(tc, (int, float)) or not tc >= 1 or tc == float("inf"):
            raise ConfigError(f"token_candidates must be a number >= 1 (candidate chunks per budget chunk), got {tc!r}")
        _check_token_mass(self)
        if self.token_scores not in TOKEN_SCORES:
            raise ConfigError(f"token_scores {self.token_scores!r} is not one of {', '.join(TOKEN_SCORES)}")
        if self.token_scores == "shadow" and (self.select_unit != "token" or self.index not in ("shadow", "auto")):
            raise ConfigError("token_scores 'shadow' ranks the token stage's candidates from the shadow index: "
                              "set select_unit token and index shadow, or use token_scores keys")
        for name in ("chunk_tokens", "prefill_chunk", "stream_chunk"):
            if int(getattr(self, name)) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.prompt_cache_every is not None:
            set_("prompt_cache_every", parse_tokens(self.prompt_cache_every, "prompt_cache_every"))
            if self.prompt_cache_every < 0:
                raise ConfigError(f"prompt_cache_every must be >= 0 (0: save only at the end), got {self.prompt_cache_every}")
        # sparse selection: a bad budget (mass p outside (0, 1], floor above cap) or index option fails here,
        # before any weight loads, whatever attention mode ends up chosen
        from offload.indexes import Budget, check_index_options   # no torch unless index options need checking
        Budget.parse(self.budget, self.streaming_heads)
        if self.index == "auto" and self.index_options:
            raise ConfigError(f"index_options {_show(self.index_options)} need a named index; set --index summary, "
                              "shadow or ann")
        check_index_options(self.index, self.index_options or {})

    def replace(self, **kw) -> "OffloadConfig":
        return dataclasses.replace(self, **kw)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


def _show(value) -> str:
    """A short, bounded rendering of a user value for an error message."""
    return f"{type(value).__name__} {reprlib.repr(value)}"


def _check_types(cfg) -> None:
    """Each field holds a value of its kind, so later checks and parsers never meet a list where a number goes."""
    for f in fields(cfg):
        value, flag = getattr(cfg, f.name), "--" + f.name.replace("_", "-")
        if f.name in _OPTIONAL_TYPES:
            if value is None:
                continue
            want = _OPTIONAL_TYPES[f.name]
        elif f.name in _ANY_TYPES:
            want = _ANY_TYPES[f.name]
        elif isinstance(f.default, float):
            want = (int, float)
        else:
            want = (type(f.default),)
        if (isinstance(value, bool) and bool not in want) or not isinstance(value, want):
            named = [t for t in want if not (t is int and float in want)]      # int or float: "a number"
            kinds = " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in named))
            # both spellings: the CLI flag and the API / YAML key
            raise ConfigError(f"{flag} ({f.name}) must be {kinds}, got {_show(value)}; fix the value "
                              "(see offload-chat --help)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}; pass e.g. 0.8")
    for name in ("index_options", "streaming_heads"):
        value = getattr(cfg, name)
        if value is not None and not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise ConfigError(f"{name} keys must be names or numbers, got {_show(value)}; fix the mapping")
    for layer, heads in (cfg.streaming_heads or {}).items():
        if not isinstance(heads, list) or not all(isinstance(h, int) and not isinstance(h, bool) for h in heads):
            raise ConfigError(f"streaming_heads[{layer}] must be a list of KV head numbers, got {_show(heads)}; "
                              "write e.g. {3: [0, 1]}")


def _check_sampling(cfg) -> None:
    """The sampling keys through SamplingParams' own checks; its messages name the key, ours the flag too."""
    from offload.engine.sampling import SamplingParams   # lazy: sampling imports torch
    try:
        params = SamplingParams.from_config(cfg)
    except ConfigError as e:
        key = str(e).split(" ", 1)[0]
        flag = "--" + key.replace("_", "-")
        raise ConfigError(f"{flag} ({key}) {str(e).split(' ', 1)[1]}" if key in cfg.field_names() else str(e)) from None
    object.__setattr__(cfg, "stop", params.stop or None)


class _AliasRefused(Exception):
    pass


class _OptionsLoader(yaml.SafeLoader):
    """SafeLoader without anchors/aliases: a few lines of aliases can stand for billions of nodes
    ("billion laughs"), and an options file never needs them."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise _AliasRefused(f"line {mark.line + 1}")
        return super().compose_node(parent, index)


def load_yaml(path: str | os.PathLike) -> dict:
    """Read a YAML config; keys are field names (dashes allowed)."""
    p = Path(path)
    fix = "pass a YAML file of option: value lines to --config"
    text = read_utf8(p, "config file", fix, max_bytes=CONFIG_MAX_BYTES)
    try:
        data = yaml.load(text, Loader=_OptionsLoader)
    except _AliasRefused as e:
        raise ConfigError(f"config file {p} uses a YAML alias (*name, {e}), which can expand without bound; "
                          "write the value out instead") from None
    except yaml.YAMLError as e:
        first = str(e).splitlines()[0] if str(e) else "syntax error"
        raise ConfigError(f"config file {p} is not valid YAML ({first}); fix the file") from None
    except RecursionError:
        raise ConfigError(f"config file {p} nests too deeply; {fix}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must be a mapping of option: value, got {_show(data)}; {fix}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config file {p} has a key that is not an option name ({_show(bad[0])}); {fix}")
    out = {k.replace("-", "_"): v for k, v in data.items()}
    unknown = sorted(set(out) - set(OffloadConfig.field_names()))
    if unknown:
        raise ConfigError(f"config file {p} has unknown keys {', '.join(unknown)}; valid keys: "
                          f"{', '.join(OffloadConfig.field_names())}")
    return out


def _check_token_mass(cfg) -> None:
    """token_mass in (0, 1] with the token stage's summed-softmax ranking; token_floor an int >= 0 within a
    token budget (a fraction of the context is checked against the cap when it is known: the floor is clamped)."""
    p, floor = cfg.token_mass, cfg.token_floor
    if isinstance(floor, bool) or not isinstance(floor, int) or floor < 0:
        raise ConfigError(f"token_floor must be an integer >= 0 (tokens per KV head), got {floor!r}")
    if p is None:
        return
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise ConfigError(f"token_mass must be in (0, 1], got {p!r}; use e.g. 0.95, or unset it for a fixed count")
    if cfg.select_unit != "token":
        raise ConfigError("token_mass needs select_unit 'token' (it thresholds the token stage); set select_unit token")
    if cfg.token_reduce != "sum":
        raise ConfigError("token_mass needs token_reduce 'sum' (softmax shares), not 'max'; drop --token-reduce")
    if isinstance(cfg.budget, (int, str)) and not isinstance(cfg.budget, bool):
        try:
            cap = parse_tokens(cfg.budget, "budget")
        except Exception:       # a fraction or a mass budget: not a token count
            return
        if floor > cap:
            raise ConfigError(f"token_floor {floor} is above the cap of {cap} tokens (the budget); lower token_floor")


def env_overrides(environ=None) -> dict:
    """OFFLOAD_CTX=1M, OFFLOAD_GPU_MEM=6GiB, ... -> {field: value}."""
    environ = os.environ if environ is None else environ
    types = {f.name: f.type for f in fields(OffloadConfig)}
    out = {}
    for name in types:
        raw = environ.get("OFFLOAD_" + name.upper())
        if raw is None or raw == "":
            continue
        if name in ("temperature", "top_p", "token_candidates", "token_mass", "min_p", "repetition_penalty",
                    "presence_penalty",
                    "frequency_penalty"):
            out[name] = _num(raw, float, name)
        elif name in ("max_new_tokens", "seed", "chunk_tokens", "prefill_chunk", "stream_chunk", "sink_tokens",
                      "window_tokens", "token_floor",
                      "top_k"):
            out[name] = _num(raw, int, name)
        elif name == "cuda_graph":
            out[name] = raw.strip().lower() not in ("0", "false", "no", "off")
        else:
            out[name] = raw
    return out


def _num(raw: str, kind, name: str):
    try:
        return kind(raw)
    except ValueError:
        raise ConfigError(f"OFFLOAD_{name.upper()}={raw!r} is not a valid {kind.__name__}") from None


def check_disk_dir(disk_dir: str | None) -> None:
    """--disk-dir is a folder we may create files in (or can be created); checked before any weight loads."""
    if not disk_dir:
        return
    fix = "pass a writable folder to --disk-dir"
    probe = os.path.abspath(disk_dir)
    while not os.path.lexists(probe):      # the store creates missing folders: the nearest parent must allow it
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise ConfigError(f"--disk-dir {disk_dir}: {probe} is not a folder; {fix}")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--disk-dir {disk_dir}: {probe} is not writable by this user; {fix}")
