"""The Python API: LLM, Session and Chat (see DESIGN.md, "Public API")."""
from __future__ import annotations

import time
import warnings
import weakref
from typing import Callable, Iterator

import torch

from offload import backends
from offload.config import OffloadConfig
from offload.engine.runner import Engine
from offload.engine.sampling import Sampler, SamplingParams, StopStrings
from offload.errors import CapacityError, ConfigError, SessionClosedError
from offload.files import utf8_text
from offload.model.config import ModelConfig
from offload.model.llama import LlamaModel
from offload.progress import prefill_progress

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
STATS_DEVICE_KEYS = ("kv_bytes_gpu",)   # backend key names that depend on the device; reported as kv_bytes_device


def pick_device(device: str) -> torch.device:
    if device in ("auto", None):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu or --device auto")
    return torch.device(device)


class PrefillCancelled(Exception):
    """Session.interrupt() asked to stop a prefill; the session was closed (its KV was half-written)."""


class LLM:
    """A loaded model plus the policy that places its KV. Sessions share the weights."""

    def __init__(self, model: str | None = None, ctx=None, device=None, gpu_mem=None, host_mem=None,
                 disk_dir=None, disk_mem=None, attention=None, load_format=None,
                 config: OffloadConfig | None = None, show_progress: bool | None = None,
                 before_load: Callable[["LLM"], None] | None = None, **options):
        """before_load(llm): called once the config, plan and tokenizer are known and before any weight loads
        (the CLI tokenizes its document there, so a too-long one is refused in a second, not after the load)."""
        from offload.model.loaders import build
        from offload.preflight import check_options

        given = {k: v for k, v in dict(model=model, ctx=ctx, device=device, gpu_mem=gpu_mem, host_mem=host_mem,
                                         disk_dir=disk_dir, disk_mem=disk_mem, attention=attention,
                                         load_format=load_format, **options).items() if v is not None}
        unknown = set(given) - set(OffloadConfig.field_names())
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(sorted(unknown))}; valid: {', '.join(OffloadConfig.field_names())}")
        self.config = cfg = (config or OffloadConfig()).replace(**given)
        self.device = pick_device(cfg.device)
        self.dtype = _DTYPES[cfg.dtype] if cfg.dtype != "auto" else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.show_progress = show_progress
        t0 = time.perf_counter()
        source = build.resolve(cfg.model, cfg.load_format)
        self.model_config: ModelConfig = ModelConfig.from_hf(source.hf_config)
        mc = self.model_config
        self.ctx = cfg.ctx or min(mc.max_position_embeddings, 128 * 1024)
        if self.ctx > mc.max_position_embeddings:
            warnings.warn(f"ctx {self.ctx} exceeds the model's trained length {mc.max_position_embeddings}; "
                          "quality past it is not guaranteed", stacklevel=2)
        check_options(cfg, mc, self.ctx, self.dtype)   # budget, index, disk dir: refuse before any weight loads
        self.spec = backends.RuntimeSpec(mc, self.ctx, self.device, self.dtype, cfg, build.planned_weight_bytes(
            source, mc, self.dtype, cfg.weights, self.device))
        self.plan = backends.plan(self.spec)     # before any weight is loaded: refuse early
        self.tokenizer = source.tokenizer
        self.name = source.name
        self.load_s = 0.0
        self._sessions: weakref.WeakSet = weakref.WeakSet()   # every open session (each owns its KV)
        self._closed = False
        if before_load is not None:
            before_load(self)
        self.model: LlamaModel = build.build_model(source, mc, self.device, self.dtype, cfg.load_format,
                                                     show_progress, cfg.weights)
        self.load_s = time.perf_counter() - t0
        self._last: Session | None = None       # the latest session of any kind: what `stats` reports
        self._stats: dict = {}

    # ---- sessions -----------------------------------------------------------------------------
    def session(self, **overrides) -> "Session":
        """A fresh sequence with its own KV cache. overrides: attention, budget, index, chunk_tokens, gpu_mem, ...

        Open sessions share the LLM's KV budget per tier (what the planner found or --gpu-mem/--host-mem/--disk-mem
        gave): each holds its plan's bytes until it is closed, and one that does not fit beside the others is
        refused (CapacityError) instead of overcommitting a tier."""
        if self._closed:
            raise SessionClosedError("this LLM was closed (llm.close()); create a new LLM to start sessions")
        cfg = self.config.replace(**overrides) if overrides else self.config
        p = self.plan if cfg is self.config else backends.plan(self.spec, cfg, weights_loaded=True)
        need = self._tier_bytes(p)
        # a session given its own budgets (fork(gpu_mem=..., disk_dir=...)) may use them: they bound it too
        self._check_room(need, tuple(max(a, b) for a, b in zip(self.plan.available, p.available)))
        try:
            attn = backends.make(self.spec, self.plan, cfg)
        except (torch.OutOfMemoryError, MemoryError, RuntimeError, OSError) as e:
            if not isinstance(e, (torch.OutOfMemoryError, MemoryError)) and "out of memory" not in str(e).lower() \
                    and getattr(e, "errno", None) != 12:    # ENOMEM from mmap / cudaHostRegister of the host slab
                raise
            # sessions coexist, each with its own KV; the planner sized one, so another may not fit beside it
            live = sum(1 for s in self._sessions if not s.closed)
            raise CapacityError(f"a new session's KV does not fit beside the {live} open session(s) "
                                f"({str(e).splitlines()[0][:80]}); close one (sess.close() / chat.close()) "
                                "or lower ctx") from None
        from offload import selection
        self._last = Session(self, attn, selection.apply(cfg, p), need)   # index "auto": what the planner chose
        self._sessions.add(self._last)
        return self._last

    @staticmethod
    def _tier_bytes(p) -> tuple[int, int, int]:
        return (p.gpu_bytes, p.host_bytes, p.disk_bytes)

    def _check_room(self, need: tuple[int, int, int], budget: tuple[int, int, int]) -> None:
        """Refuse a session whose planned KV does not fit what the open sessions leave of the tier budgets."""
        open_ = [s for s in self._sessions if not s.closed]
        held = [sum(s.tier_bytes[t] for s in open_) for t in range(3)]
        for t, name in enumerate(("GPU", "host", "disk")):
            if need[t] and held[t] + need[t] > budget[t]:
                raise CapacityError(
                    f"a new session needs {_mib(need[t])} of {name} KV but the {len(open_)} open session(s) hold "
                    f"{_mib(held[t])} of the {_mib(budget[t])} {name} budget; close one (sess.close() / "
                    "chat.close()), lower ctx or raise the tier's budget")

    def load_session(self, path) -> "Session":
        from offload.persist import load_session
        sess = self.session()
        try:
            load_session(sess, path)
        except BaseException:
            sess.close()
            raise
        return sess

    def load_chat(self, path) -> "Chat":
        """A chat saved with chat.save(path): its messages and KV, ready for the next send()."""
        from offload.chat import Chat
        return Chat.load(self, path)

    # ---- text ---------------------------------------------------------------------------------
    def generate(self, prompt, sampling_params: SamplingParams | list | None = None, **sampling):
        """Raw completion (no chat template). prompt: a str -> a str, or a list of str -> a list of str (one fresh
        session each, one after the other). sampling_params (one, or one per prompt) and/or keyword arguments:
        max_new_tokens / max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty,
        frequency_penalty, stop, seed."""
        if isinstance(prompt, (list, tuple)):
            params = sampling_params if isinstance(sampling_params, (list, tuple)) else [sampling_params] * len(prompt)
            if len(params) != len(prompt):
                raise ConfigError(f"{len(prompt)} prompts but {len(params)} sampling_params; pass one, or one per prompt")
            wanted = [self.sampling(p, **sampling) for p in params]   # every value checked before any work
            for p in prompt:
                self._encode(p)
            return ["".join(self.stream(p, s)) for p, s in zip(prompt, wanted)]
        return "".join(self.stream(prompt, sampling_params, **sampling))

    def stream(self, prompt: str, sampling_params: SamplingParams | None = None, **sampling) -> Iterator[str]:
        """Raw completion of `prompt` (no chat template) in a fresh session, yielded as text pieces; the session
        is closed when the generation ends, so other sessions and chats are never disturbed."""
        ids = self._encode(prompt)
        params = self.sampling(sampling_params, **sampling)
        sess = self.session()
        try:
            yield from sess.generate_text(ids, params)
        finally:
            sess.close()

    def chat(self, system: str | None = None) -> "Chat":
        from offload.chat import Chat
        return Chat(self, system)

    def sampling(self, params: SamplingParams | None = None, **values) -> SamplingParams:
        """The SamplingParams of a call: `params` (else the LLM's configured sampling) with `values` (None =
        keep) on top. Also accepts the old names: max_new_tokens for max_tokens."""
        if params is not None and not isinstance(params, SamplingParams):
            raise ConfigError(f"sampling_params must be an offload.SamplingParams, got {type(params).__name__}; "
                              "pass SamplingParams(temperature=..., ...) or keyword arguments")
        base = params if params is not None else SamplingParams.from_config(self.config)
        return base.override(**values)

    def _encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ConfigError("this model has no tokenizer (load_format='dummy'); pass token ids to session().prefill")
        text = utf8_text(text, "the prompt") if isinstance(text, str) else text
        if not isinstance(text, str):
            raise ConfigError(f"the prompt must be a str, got {type(text).__name__}; pass text")
        # user text: `<|im_start|>` typed by a user stays text, never a control token
        ids = self.tokenizer.encode(text, add_special_tokens=True, parse_special=False)
        if not ids:
            raise ConfigError("the prompt is empty; pass some text")
        return ids

    @property
    def stats(self) -> dict:
        out = {"model": self.name, "device": str(self.device), "ctx": self.ctx, "load_s": round(self.load_s, 3),
               "attention": backends.mode(self.spec, self.plan), "plan": self.plan.summary()}
        out.update(self._stats)
        out.update({"tokens": 0, "ttft_s": None, "ms_per_token": None})
        if self._last is not None:
            out.update(self._last.stats())
        for key in STATS_DEVICE_KEYS:          # one name on every device (the backend says gpu on CUDA)
            if key in out:
                out["kv_bytes_device"] = out.pop(key)
        return out

    def close(self) -> None:
        """Close every open session (their KV, spill files) and refuse new ones."""
        for sess in list(self._sessions):
            sess.close()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class Session:
    """One sequence: `prefill(ids)` and `step(id)` return float32 logits of the last position."""

    def __init__(self, llm: LLM, attn, config: OffloadConfig, tier_bytes: tuple[int, int, int] = (0, 0, 0)):
        self.llm, self.attn, self.config = llm, attn, config
        self.tier_bytes = tier_bytes        # (GPU, host, disk) KV bytes this session holds of the LLM's budget
        self.finish_reason: str | None = None   # of the last generation: "stop" (EOS / stop string) or "length"
        self.generated = 0                      # tokens sampled by the last generation
        # interrupt(): polled between prefill chunks; True cancels the prefill (PrefillCancelled) and closes the
        # session, whose KV is then half-written (a server stops a long prefill whose client went away)
        self.interrupt: Callable[[], bool] | None = None
        self.engine = Engine(llm.model, attn, prefill_chunk=config.prefill_chunk, use_cuda_graph=config.cuda_graph,
                             stream_chunk=config.stream_chunk)
        self.tokens: list[int] = []
        self._decode_s, self._decoded, self._ttft = 0.0, 0, None
        self.closed = False

    @property
    def length(self) -> int:
        self._check_open()
        return self.attn.length

    def _check_open(self) -> None:
        if self.closed:
            raise SessionClosedError("this session was closed (its KV is freed); start a new one with "
                                     "llm.session() or llm.chat()")

    def prefill(self, token_ids, prompt_cache=None) -> torch.Tensor:
        """prompt_cache: a file path; an empty session then resumes the prompt's cached KV (offload.prompt_cache)."""
        if prompt_cache is not None:
            from offload.prompt_cache import prefill_cached
            return prefill_cached(self, token_ids, prompt_cache)
        self._check_open()
        ids = [int(t) for t in token_ids]
        if not ids:
            raise ConfigError("prefill needs at least one token id")
        vocab = self.llm.model_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ConfigError(f"token id out of range [0, {vocab}); check the tokenizer matches the model")
        show = self.llm.show_progress if len(ids) > self.config.prefill_chunk else False   # short prompts: no bar
        with prefill_progress(self.llm.model_config, len(ids), self.llm.device, self.length, show) as upd:
            try:
                logits = self.engine.prefill(ids, progress=self._interruptible(upd))
            except PrefillCancelled:
                self.close()      # the KV is half-written: this session cannot go on
                raise
        self.tokens.extend(ids)
        self._ttft = self.engine.last_prefill_s
        return logits

    def _interruptible(self, upd):
        if self.interrupt is None:
            return upd
        stop = self.interrupt

        def update(done, total=None):
            if stop():
                raise PrefillCancelled("the prefill was cancelled (the session is closed); start a new session")
            upd(done, total)
        return update

    def step(self, token_id: int) -> torch.Tensor:
        self._check_open()
        if not 0 <= int(token_id) < self.llm.model_config.vocab_size:
            raise ConfigError(f"token id {token_id} out of range [0, {self.llm.model_config.vocab_size})")
        t0 = time.perf_counter()
        logits = self.engine.step(int(token_id))
        self._decode_s += time.perf_counter() - t0
        self._decoded += 1
        self.tokens.append(int(token_id))
        return logits

    def generate_ids(self, ids: list[int], params: SamplingParams | None = None, **sampling) -> Iterator[int]:
        """Prefill ids, then sample until EOS or max_tokens; yields each new id. params: SamplingParams, or
        keyword arguments (max_new_tokens, temperature, top_p, seed, ...) over the LLM's configured sampling."""
        p = self.llm.sampling(params, **sampling)
        eos = set(self.llm.tokenizer.eos_token_ids) if self.llm.tokenizer is not None else set()
        self.finish_reason, self.generated = None, 0
        room = self.llm.ctx - self.length - len(ids)
        n = min(p.max_tokens, max(0, room))
        sampler = Sampler(p, context_ids=self.tokens + list(ids))
        logits = self.prefill(ids)
        for i in range(n):
            tok = sampler(logits)
            self.generated += 1
            yield tok
            if tok in eos:
                self.finish_reason = "stop"
                return
            if i == n - 1:
                break
            logits = self.step(tok)
        self.finish_reason = "length"

    def generate_text(self, ids: list[int], params: SamplingParams | None = None, **sampling) -> Iterator[str]:
        """generate_ids as text pieces: EOS is not shown, and the text ends before a stop string (the stop
        string's tokens are in the KV). finish_reason says why it ended."""
        from offload.model.tokenizer import StreamDecoder
        p = self.llm.sampling(params, **sampling)
        dec = StreamDecoder(self.llm.tokenizer)
        stops = StopStrings(p.stop) if p.stop else None
        eos = set(self.llm.tokenizer.eos_token_ids)
        for tok in self.generate_ids(ids, p):
            if tok in eos:
                break
            piece = dec.push(tok)
            if stops is not None:
                piece = stops.push(piece)
            if piece:
                yield piece
            if stops is not None and stops.stopped:
                self.finish_reason = "stop"
                return
        tail = dec.flush()
        if stops is not None:
            tail = stops.push(tail) + ("" if stops.stopped else stops.flush())
            if stops.stopped:
                self.finish_reason = "stop"
        if tail:
            yield tail

    def fork(self, **overrides) -> "Session":
        """A new session holding a copy of this one's KV, e.g. fork(attention="sparse", budget="5%")."""
        self._check_open()
        other = self.llm.session(**overrides)
        other.attn.load_kv(self.attn.read_kv(layer) for layer in range(self.llm.model_config.num_layers))
        other.tokens = list(self.tokens)
        return other

    def save(self, path) -> None:
        from offload.persist import save_session
        self._check_open()
        save_session(self, path)

    def stats(self) -> dict:
        if self.closed:
            return dict(self._final_stats)
        out = {"tokens": self.attn.length, "ttft_s": None if self._ttft is None else round(self._ttft, 4),
               "ms_per_token": round(1000 * self._decode_s / self._decoded, 3) if self._decoded else None}
        out.update(self.engine.stats())
        out.update(self.attn.stats())
        return out

    def close(self) -> None:
        if not self.closed:
            self._final_stats = self.stats()   # llm.stats still reports a finished generate()
            self.closed = True
            self.attn.close()


def _mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


from offload.chat import Chat  # noqa: E402  (re-exported: offload.api.Chat)
