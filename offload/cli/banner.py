"""The one-line banner offload-chat prints on stderr after loading: model, ctx, the real device, and where the
weights and the KV of each tier sit."""
from __future__ import annotations


def device_name(device) -> str:
    """"NVIDIA H200" on CUDA, "CPU" on the CPU (never "GPU" for a CPU run)."""
    if device.type == "cuda":
        import torch
        return torch.cuda.get_device_name(device)
    return device.type.upper()


def _size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n / 2**30:.1f} GiB"
    return f"{n / 2**20:.0f} MiB" if n >= 1 << 20 else f"{n / 2**10:.0f} KiB"


def _tokens(n: int) -> str:
    return f"{n >> 20}M" if n % (1 << 20) == 0 else f"{n >> 10}K" if n % (1 << 10) == 0 else str(n)


def weight_bytes(llm) -> int:
    """Device bytes of the weights: what the planner was given (quantized blocks at their size), else the
    architecture's count at the load dtype."""
    counted = getattr(llm.spec, "weight_bytes", None)
    if counted is not None:
        return counted
    from offload.backends import weight_bytes as arch_bytes
    return arch_bytes(llm.model_config, llm.dtype)


def kv_tiers(llm) -> str:
    """KV per tier: "KV 0.4 GiB: CPU RAM 0.4 GiB" or "KV 16 GiB: NVIDIA H200 2.0 GiB + host 14 GiB int8 + disk ..."."""
    plan = llm.plan
    where = device_name(llm.device) + (" RAM" if llm.device.type == "cpu" else "")
    if plan is None:
        return f"KV on {where}"
    cold = f" {plan.kv_dtype}" if plan.kv_dtype != "bf16" else ""   # how the host and disk tiers hold it
    parts = [f"{where} {_size(plan.gpu_bytes)}"]
    if plan.host_bytes:
        parts.append(f"host {_size(plan.host_bytes)}{cold}")
    if plan.disk_bytes:
        parts.append(f"disk {_size(plan.disk_bytes)}{cold}" + (f" ({plan.disk_dir})" if plan.disk_dir else ""))
    index = f"; sparse index {_size(plan.index_bytes)}" if getattr(plan, "index_bytes", 0) else ""
    return f"KV {_size(plan.kv_bytes)}: " + " + ".join(parts) + index


def banner(llm) -> str:
    from offload.backends import mode
    dev = device_name(llm.device)
    dtype = str(llm.dtype).replace("torch.", "")
    kind = getattr(llm.config, "weights", "auto")
    held = dtype if kind in ("auto", "bf16") else f"{kind} blocks"
    held = getattr(getattr(llm, "model", None), "weight_format", None) or held   # what loaded: Q4_1, Q4_K+Q6_K..
    attention = mode(llm.spec, llm.plan)
    chosen = getattr(llm.plan, "selection", ())       # index auto: the preset the planner chose
    if attention == "sparse" and chosen:
        from offload.selection import describe
        attention += f" ({describe(chosen)})"
    return (f"offload | model {llm.name} | ctx {_tokens(llm.ctx)} | device {dev} | weights {_size(weight_bytes(llm))} "
            f"({held}) on {dev} | {kv_tiers(llm)} | attention {attention} | compute {dtype} "
            f"| loaded in {llm.load_s:.1f}s")
