"""The options offload's commands share (model, tiers, attention, sampling), the config they build, and the
llama.cpp habits they answer: its common flags either work here (aliases) or get a one-line hint.

Nothing here imports torch: `--help` and option errors come back in well under a second."""
from __future__ import annotations

import click

from offload.config import OffloadConfig, env_overrides, load_yaml
from offload.errors import ConfigError


def _opt(*names, **kw):
    return click.option(*names, default=None, show_default=False, **kw)


# the model, its context and where its KV lives: offload-chat and any other command that loads a model
MODEL_OPTIONS = [
    _opt("-m", "--model", help="HF folder, .gguf file, alias (llama3-8b, llama3.1-8b, llama3-8b-1m, qwen2.5-7b-1m, "
         "mistral-7b) or repo id in the local HF cache. Default: smollm2-135m."),
    _opt("-c", "--ctx", "--ctx-size", "ctx",
         help="Context length in tokens: 8192, 128K, 1M. Default: the model's trained length (max 128K)."),
    _opt("--device", type=click.Choice(["auto", "cpu", "cuda"]), help="Compute device. Default: auto."),
    _opt("--dtype", type=click.Choice(["auto", "bfloat16", "float16", "float32"]), help="Weight/KV dtype."),
    _opt("--gpu-mem", help="GPU memory for KV, e.g. 6GiB. Default: detected."),
    _opt("--host-mem", help="Host RAM for KV, e.g. 48GiB. Default: detected."),
    _opt("--disk-mem", help="NVMe space for KV, e.g. 200GB. Default: free space in --disk-dir."),
    _opt("--disk-dir", help="Directory for spilled KV files (created 0700, removed on exit)."),
    _opt("--attention", type=click.Choice(["auto", "full", "sparse"]),
         help="Exact (full) or sparse retrieval attention."),
    _opt("--budget", help="Sparse attention budget per step and KV head: tokens (2K, the default), a mass "
         "threshold (p=0.75,floor=128,cap=2K) or a fraction (5%)."),
    # "auto" + offload.indexes.METHODS, spelled out: importing that package loads torch, and a typo must fail at once
    _opt("--index", type=click.Choice(["auto", "summary", "shadow", "ann"]),
         help="Sparse selection. auto (default): tokens ranked from low-rank key shadows with a 0.97 attention-mass "
         "cut where the shadows fit on the GPU (to ~192K on a 24 GB card), else whole chunks by summary bounds. "
         "summary / shadow / ann name the index (ann needs pip install offload[ann])."),
    _opt("--kv-dtype", type=click.Choice(["auto", "bf16", "int8", "int4"]),
         help="KV in host RAM and on disk: bf16 (default), int8 or int4 (compressed, lossy; fewer bytes over "
         "PCIe), auto (int8 once KV leaves the GPU)."),
    _opt("--select-unit", type=click.Choice(["chunk", "token"]),
         help="Sparse: attend whole chunks (default) or the best tokens of 4x as many candidate chunks."),
    _opt("--prefill", type=click.Choice(["exact", "sparse"]),
         help="Prefill attention: exact (default) or sparse (block-sparse history, faster at 128K+, lossy)."),
    _opt("--load-format", type=click.Choice(["auto", "dummy"]), help="dummy = random weights (benchmarks)."),
    _opt("--weights", type=click.Choice(["auto", "bf16", "q8_0", "q4"]),
         help="Weights on the GPU: auto (a GGUF's Q8_0/Q4_0/Q4_1/Q4_K/Q6_K blocks stay quantized), bf16 "
         "(dequantized at load), q8_0 or q4 (quantize any checkpoint at load; lossy)."),
]

# how each answer is sampled (offload.engine.sampling.SamplingParams); llama.cpp's spellings as aliases
SAMPLING_OPTIONS = [
    _opt("-n", "--max-new-tokens", "--n-predict", "max_new_tokens", type=int,
         help="Most tokens to generate per answer. Default: 256."),
    _opt("--temperature", "--temp", "temperature", type=float, help="0 = greedy (default)."),
    _opt("--top-p", type=float, help="Nucleus sampling mass. Default: 1 (off)."),
    _opt("--top-k", type=int, help="Sample among the k most likely tokens. Default: 0 (off)."),
    _opt("--min-p", type=float, help="Drop tokens below min-p x the top token's probability. Default: 0 (off)."),
    _opt("--repeat-penalty", "--repetition-penalty", "repetition_penalty", type=float,
         help="Divide the logits of tokens already in the context or answer (1.1 is typical). Default: 1 (off)."),
    _opt("--presence-penalty", type=float, help="Subtract from tokens present in the answer, -2..2. Default: 0."),
    _opt("--frequency-penalty", type=float, help="Subtract per occurrence in the answer, -2..2. Default: 0."),
    click.option("--stop", multiple=True, help="End the answer before this text (repeatable)."),
    _opt("--seed", type=int, help="Sampling seed."),
]


def apply_options(options):
    def decorate(f):
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


def build_config(config_path, flags: dict) -> OffloadConfig:
    """Flags > OFFLOAD_* environment > --config file > defaults; every value checked here, before any load."""
    values = load_yaml(config_path) if config_path else {}
    values.update(env_overrides())
    flags = dict(flags)
    if not flags.get("stop"):            # click gives () for a repeatable flag never given
        flags.pop("stop", None)
    else:
        flags["stop"] = list(flags["stop"])
    values.update({k: v for k, v in flags.items() if v is not None})
    return OffloadConfig(**values)


# ---- llama.cpp flags ---------------------------------------------------------------------------------------
_GPU_LAYERS = "weights always sit on the GPU here (offload tiers the KV: --gpu-mem, --host-mem, --disk-dir)"
# flag -> (how many values it takes, why it is not needed here): noted once on stderr and ignored
IGNORED = {
    **dict.fromkeys(("-ngl", "--n-gpu-layers", "--gpu-layers"), (1, _GPU_LAYERS)),
    **dict.fromkeys(("-t", "--threads", "-tb", "--threads-batch"), (1, "torch picks the CPU threads "
                                                                        "(set OMP_NUM_THREADS to change it)")),
    **dict.fromkeys(("-b", "--batch-size", "-ub", "--ubatch-size"), (1, "prefill runs in 2K-token chunks, 8K "
                                                                         "once it streams history (YAML "
                                                                         "prefill_chunk, stream_chunk)")),
    **dict.fromkeys(("-fa", "--flash-attn"), (0, "attention is fused on the GPU already")),
    **dict.fromkeys(("--mlock", "--no-mmap", "--mmap"), (0, "weights are read into GPU memory, not mapped")),
    **dict.fromkeys(("-cnv", "--conversation", "-i", "--interactive", "--color", "-no-cnv"),
                    (0, "offload-chat is interactive unless -p is given")),
}
# flag -> the fix: refused in one line (ignoring them would change the answer behind the user's back)
REFUSED = {
    **dict.fromkeys(("-ctk", "-ctv", "--cache-type-k", "--cache-type-v"),
                    "use --kv-dtype int8|int4 (the offloaded KV's dtype)"),
    **dict.fromkeys(("--mirostat", "--typical", "--repeat-last-n", "--dry-multiplier", "--xtc-probability",
                     "--grammar", "--grammar-file", "--json-schema", "-j"),
                    "this sampler is not offered; use --temp, --top-k, --top-p, --min-p, --repeat-penalty, "
                    "--presence-penalty, --frequency-penalty, --stop"),
    **dict.fromkeys(("--lora", "--lora-scaled", "--control-vector"), "adapters are not supported; merge them into "
                    "the weights first"),
    **dict.fromkeys(("-hf", "-hfr", "--hf-repo", "-hff", "--hf-file"),
                    "pass the repo id to -m (it must be in the HF cache: hf download REPO)"),
    **dict.fromkeys(("-sys", "--system-prompt"), "the system prompt is -s/--system here"),
    "-e": "escapes are not processed; write the text as it is",
}
_FA_VALUES = ("on", "off", "auto")


def screen_llama_flags(argv: list[str], valued: set[str]) -> tuple[list[str], list[str]]:
    """(argv without the ignored llama.cpp flags, one note per flag dropped); ConfigError for refused ones.
    valued: our options that take a value (their values are never screened: a prompt may say "-t")."""
    out, notes, i = [], [], 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            out += argv[i:]
            break
        name = word.split("=", 1)[0]
        if name in REFUSED:
            raise ConfigError(f"{name} is a llama.cpp option offload-chat does not have; {REFUSED[name]}")
        if name in IGNORED:
            takes, why = IGNORED[name]
            if "=" not in word and i + 1 < len(argv) and (takes or name in ("-fa", "--flash-attn")
                                                              and argv[i + 1] in _FA_VALUES):
                i += 1                           # its value goes too (-fa takes on|off|auto in newer llama.cpp)
            notes.append(f"note: {name} ignored: {why}")
        elif word in valued and i + 1 < len(argv):
            out += [word, argv[i + 1]]
            i += 1
        else:
            out.append(word)
        i += 1
    return out, notes
