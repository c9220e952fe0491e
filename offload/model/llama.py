"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2) in plain torch.

Weights are fused per layer (q|k|v and gate|up) so a decode step launches few kernels. Attention
goes through `AttentionBackend`: the model never sees where KV lives.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from offload.attention import AttentionBackend
from offload.errors import ModelLoadError
from offload.kernels import fused
from offload.model.config import ModelConfig
from offload.model.qlinear import QuantWeight, Scratch, linear
from offload.model.rope import rope_inv_freq


@dataclass
class LayerWeights:
    """Matrices are dense tensors or QuantWeights (kept in a GGUF block format, offload.model.qlinear)."""
    attn_norm: torch.Tensor   # [H]
    wqkv: torch.Tensor        # [(Hq + 2*Hkv) * D, H]
    bqkv: torch.Tensor | None  # [(Hq + 2*Hkv) * D]
    wo: torch.Tensor          # [H, Hq * D]
    mlp_norm: torch.Tensor    # [H]
    w_gate_up: torch.Tensor   # [2 * I, H]
    w_down: torch.Tensor      # [H, I]


_SLOTS = {"wqkv": "wqkv", "wo": "wo", "w_gate_up": "gate_up", "w_down": "down"}


def _cat_rows(parts: list, dtype: torch.dtype, slot: str):
    """Fuse row blocks (q|k|v, gate|up): all dense -> torch.cat; all quantized -> one QuantWeight; mixed
    (a dense F16 tensor beside quantized ones) -> dense."""
    if all(isinstance(p, QuantWeight) for p in parts):
        return QuantWeight.cat(parts, slot)
    return torch.cat([p.dequantize(dtype) if isinstance(p, QuantWeight) else p for p in parts])


# rows of the dense part after attention at a time: a long prefill chunk (engine/runner.py's stream_chunk) gets
# its attention in one piece, where size pays, and its MLP in pieces, where it only costs memory
MLP_ROWS = 2048


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """x: [T, H] -> [T, H]; statistics in fp32 as in the reference implementation."""
    xf = x.float()  # xf: [T, H]
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # xf: [T, H]
    return w * xf.to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [H, T, D], cos/sin: [T, D] -> [H, T, D] (rotate-half convention)."""
    half = x.shape[-1] // 2
    rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # rot: [H, T, D]
    return x * cos + rot * sin


# A decode row (T == 1) on CUDA takes one fused kernel (offload/kernels/fused.py) for each of these instead of
# the 2-8 launches of the torch form, which stays the reference and the path of prefill and the CPU.
def norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """rms_norm(x, w, eps): x: [T, H] -> [T, H]."""
    out = fused.rms_norm(x, w, eps) if x.shape[0] == 1 else None
    return rms_norm(x, w, eps) if out is None else out


def add_norm(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The residual add and the next norm: x, y: [T, H] -> (x + y, rms_norm(x + y, w, eps))."""
    both = fused.add_rms_norm(x, y, w, eps) if x.shape[0] == 1 else None
    if both is None:
        x = x + y  # x: [T, H]
        return x, rms_norm(x, w, eps)
    return both


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, hq: int, hkv: int):
    """qkv: [T, (Hq + 2Hkv) * D], cos/sin: [T, D] -> q: [Hq, T, D], k, v: [Hkv, T, D], RoPE on q and k."""
    T, D = cos.shape
    q, k, v = qkv.split([hq * D, hkv * D, hkv * D], dim=-1)
    v = v.view(T, hkv, D).transpose(0, 1)  # v: [Hkv, T, D]
    qk = fused.rope_qk(qkv, cos, sin, hq, hkv) if T == 1 else None
    if qk is not None:
        return (*qk, v)
    q = apply_rope(q.view(T, hq, D).transpose(0, 1), cos, sin)  # q: [Hq, T, D]
    k = apply_rope(k.view(T, hkv, D).transpose(0, 1), cos, sin)  # k: [Hkv, T, D]
    return q, k, v


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up: [T, 2I] -> F.silu(gate) * up: [T, I]."""
    out = fused.silu_mul(gate_up) if gate_up.shape[0] == 1 else None
    if out is None:
        gate, up = gate_up.chunk(2, dim=-1)  # gate, up: [T, I]
        out = F.silu(gate) * up  # out: [T, I]
    return out


class LlamaModel:
    def __init__(self, cfg: ModelConfig, embed: torch.Tensor, layers: list[LayerWeights],
                 norm: torch.Tensor, lm_head: torch.Tensor):
        self.cfg = cfg
        self.embed = embed      # embed: [V, H] (QuantWeight: embed[ids] dequantizes those rows)
        self.layers = layers
        self.norm = norm        # norm: [H]
        self.lm_head = lm_head  # lm_head: [V, H] (the embedding itself when tied)
        self.device = norm.device
        self.dtype = norm.dtype
        # quantized matrices dequantize into one scratch per slot for multi-token products (prefill)
        self.scratch = Scratch()
        for lw in layers:
            for field, slot in _SLOTS.items():
                w = getattr(lw, field)
                if isinstance(w, QuantWeight):
                    w.attach(slot, self.scratch, self.dtype)
        for w, slot in ((embed, "lm_head"), (lm_head, "lm_head")):
            if isinstance(w, QuantWeight):
                w.attach(slot, self.scratch, self.dtype)
        self.inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).to(self.device)  # [D/2] f64

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, cfg: ModelConfig, sd: dict[str, torch.Tensor], device, dtype,
                        progress=None, quantize: str | None = None,
                        head_quantize: str | None = None) -> "LlamaModel":
        """Build from HF parameter names; tensors are popped as they are fused to keep peak memory low.

        Values may be QuantWeights (a GGUF's blocks, kept). quantize: a block format ("Q8_0", "Q4_K") every
        dense layer matrix is quantized to on the device as it arrives (--weights q8_0 / q4); head_quantize:
        the same for the output head and a tied embedding."""
        def take(name: str, matrix: bool = False, fmt: str | None = quantize):
            if name not in sd:
                raise ModelLoadError(f"checkpoint lacks tensor {name!r}; the weights do not match config.json")
            t = sd.pop(name).to(device=device, dtype=dtype)
            if matrix and fmt and not isinstance(t, QuantWeight):
                t = QuantWeight.quantize(fmt, t)
            return t

        layers = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            wqkv = _cat_rows([take(p + f"self_attn.{n}_proj.weight", True) for n in "qkv"], dtype, "wqkv")
            bqkv = None
            if cfg.attention_bias:
                bqkv = torch.cat([take(p + f"self_attn.{n}_proj.bias") for n in "qkv"])
            layers.append(LayerWeights(
                attn_norm=take(p + "input_layernorm.weight"), wqkv=wqkv, bqkv=bqkv,
                wo=take(p + "self_attn.o_proj.weight", True),
                mlp_norm=take(p + "post_attention_layernorm.weight"),
                w_gate_up=_cat_rows([take(p + "mlp.gate_proj.weight", True), take(p + "mlp.up_proj.weight", True)],
                                    dtype, "gate_up"),
                w_down=take(p + "mlp.down_proj.weight", True)))
            if progress:
                progress(i)
        embed = take("model.embed_tokens.weight", True, head_quantize if cfg.tie_word_embeddings else quantize)
        if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
            lm_head = take("lm_head.weight", True, head_quantize)
        elif cfg.tie_word_embeddings or "lm_head.weight" not in sd:
            sd.pop("lm_head.weight", None)
            lm_head = embed
        return cls(cfg, embed, layers, take("model.norm.weight"), lm_head)

    @classmethod
    def random(cls, cfg: ModelConfig, device, dtype, seed: int = 0, quantize: str | None = None,
               head_quantize: str | None = None) -> "LlamaModel":
        """Random weights with the real architecture (load_format="dummy"), made directly on the device;
        quantize / head_quantize: layer matrices / the head (and a tied embedding) quantized to that block
        format one at a time (peak: one dense matrix)."""
        g = torch.Generator(device=device).manual_seed(seed)
        H, D, I = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
        qkv = (cfg.num_heads + 2 * cfg.num_kv_heads) * D

        def rnd(*shape, std=0.02, fmt=quantize):
            t = torch.randn(*shape, generator=g, device=device, dtype=dtype) * std
            return QuantWeight.quantize(fmt, t) if fmt and len(shape) == 2 else t

        def ones(n):
            return torch.ones(n, device=device, dtype=dtype)

        layers = [LayerWeights(ones(H), rnd(qkv, H), rnd(qkv) if cfg.attention_bias else None,
                               rnd(H, cfg.num_heads * D), ones(H), rnd(2 * I, H), rnd(H, I))
                  for _ in range(cfg.num_layers)]
        embed = rnd(cfg.vocab_size, H, fmt=head_quantize if cfg.tie_word_embeddings else quantize)
        lm_head = embed if cfg.tie_word_embeddings else rnd(cfg.vocab_size, H, fmt=head_quantize)
        return cls(cfg, embed, layers, ones(H), lm_head)

    @property
    def weight_bytes(self) -> int:
        """Bytes the parameters occupy (quantized matrices at their block size; the scratch not included)."""
        seen, total = set(), 0
        for t in [self.embed, self.norm, self.lm_head] + [
                x for lw in self.layers for x in vars(lw).values() if x is not None]:
            key = id(t) if isinstance(t, QuantWeight) else t.data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.nbytes if isinstance(t, QuantWeight) else t.numel() * t.element_size()
        return total

    @property
    def weight_format(self) -> str:
        """What the layers' matrices are held in: 'bfloat16', 'Q8_0', 'Q4_K+Q6_K', ..."""
        from offload.model.qlinear import weight_formats
        return "+".join(dict.fromkeys(f for lw in self.layers for s in _SLOTS for f in weight_formats(getattr(lw, s))))

    # ---- forward ------------------------------------------------------------------------------
    def rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """pos: [T] int64 -> cos, sin: [T, D]. Angles in float64: fp32 loses ~0.06 rad at 1M positions."""
        ang = pos.to(torch.float64)[:, None] * self.inv_freq[None, :]  # ang: [T, D/2]
        ang = torch.cat([ang, ang], dim=-1)  # ang: [T, D]
        return ang.cos().to(self.dtype), ang.sin().to(self.dtype)

    def layer_forward(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      attn: AttentionBackend) -> torch.Tensor:
        """x: [T, H] hidden states of layer i's input -> [T, H] output."""
        q, k, v = self.attn_inputs(i, x, cos, sin)
        return self.attn_output_mlp(i, x, attn.attend(i, q, k, v))

    def attn_inputs(self, i: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """x: [T, H] -> q: [Hq, T, D], k, v: [Hkv, T, D] (RoPE applied): the dense part before attention."""
        return self._qkv(i, norm(x, self.layers[i].attn_norm, self.cfg.rms_norm_eps), cos, sin)

    def _qkv(self, i: int, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """h: [T, H] normed input -> q: [Hq, T, D], k, v: [Hkv, T, D] (RoPE applied)."""
        w = self.layers[i]
        qkv = linear(h, w.wqkv, w.bqkv)  # qkv: [T, (Hq + 2Hkv) * D]
        return rope_qkv(qkv, cos, sin, self.cfg.num_heads, self.cfg.num_kv_heads)

    def attn_output_mlp(self, i: int, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """x: [T, H] layer input, o: [Hq, T, D] attention output -> [T, H]: the dense part after attention."""
        T = x.shape[0]
        if T > MLP_ROWS:   # a long prefill chunk: its [T, I] temporaries would dominate the GPU's activation memory
            out = torch.empty_like(x)  # out: [T, H]
            for a in range(0, T, MLP_ROWS):
                out[a:a + MLP_ROWS] = self.attn_output_mlp(i, x[a:a + MLP_ROWS], o[:, a:a + MLP_ROWS])
            return out
        x, y = self._attn_mlp(i, x, o)  # x, y: [T, H]
        return x + y  # [T, H]

    def _attn_mlp(self, i: int, x: torch.Tensor, o: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H], o: [Hq, T, D] -> (x plus the attention's projection, the MLP's output): the layer's output is
        their sum, which a decode step leaves to the next norm's kernel (_decode)."""
        cfg, w = self.cfg, self.layers[i]
        T = x.shape[0]
        a = linear(o.transpose(0, 1).reshape(T, cfg.num_heads * cfg.head_dim), w.wo)  # a: [T, H]
        x, h = add_norm(x, a, w.mlp_norm, cfg.rms_norm_eps)  # x, h: [T, H]
        return x, linear(silu_mul(linear(h, w.w_gate_up)), w.w_down)  # [T, H] each

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> float32 logits [T, V]."""
        return linear(norm(x, self.norm, self.cfg.rms_norm_eps), self.lm_head).float()

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """Token-major forward of a few tokens (decode, short chunks). ids, pos: [T] -> logits of the last: [V]."""
        cos, sin = self.rope(pos)  # cos, sin: [T, D]
        x = self.embed[ids]  # x: [T, H]
        if x.shape[0] == 1:
            return self._decode(x, cos, sin, attn)
        for i in range(self.cfg.num_layers):
            x = self.layer_forward(i, x, cos, sin, attn)
        return self.logits(x[-1:])[0]  # [V]

    def _decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionBackend) -> torch.Tensor:
        """layer_forward over every layer for one token x: [1, H], with each layer's last residual add done by the
        next norm (add_norm: one kernel on CUDA, the same ops as layer_forward elsewhere) -> logits [V]."""
        eps, y = self.cfg.rms_norm_eps, None  # y: [1, H] the last layer's MLP output, not yet added to x
        for i, w in enumerate(self.layers):
            x, h = (x, norm(x, w.attn_norm, eps)) if y is None else add_norm(x, y, w.attn_norm, eps)  # x, h: [1, H]
            q, k, v = self._qkv(i, h, cos, sin)  # q: [Hq, 1, D], k, v: [Hkv, 1, D]
            x, y = self._attn_mlp(i, x, attn.attend(i, q, k, v))  # x, y: [1, H]
        h = norm(x, self.norm, eps) if y is None else add_norm(x, y, self.norm, eps)[1]  # h: [1, H]
        return linear(h, self.lm_head).float()[0]  # [V]
