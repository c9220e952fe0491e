"""ShadowKV's key rebuild, simulated for the fidelity harness (issue 13, deliverable 3): what low-rank keys cost.

The suite methods kv:exact:rankR[post|joint] (bench/fidelity_variants.py) and bench/kv_quant_fidelity.py
--kv-dtypes rankR... fork a prefilled dense session and hook it with DenseKeyRebuild. Results: bench/RESULTS.md,
"ShadowKV's key rebuild, simulated".
"""
from __future__ import annotations

import torch

from kv_quant_fidelity import DenseRoundTrip
from offload.model.llama import apply_rope


class DenseKeyRebuild(DenseRoundTrip):
    """ShadowKV's key rebuild, simulated on a dense session (issue 13): keys of the chunks outside sinks + window
    are replaced by their rank-r reconstruction, values stay exact. The basis per layer and KV head is the top r
    directions of the keys present at the first sync (the prefilled prompt, where ShadowKV fits it), taken
    before RoPE (`rankR`: keys un-rotated by position, projected, rotated back) or after it (`rankRpost`, what
    the runtime's shadow index fits); `rankRjoint`: one pre-RoPE basis over all KV heads of a layer, as ShadowKV
    fits it (rank R of Hkv*D). No outlier chunks are kept exact (ShadowKV keeps a few)."""

    def __init__(self, sess, spec: str):
        super().__init__(sess, "bf16")
        self.model, self.post, self.joint = sess.llm.model, spec.endswith("post"), spec.endswith("joint")
        self.rank = int(spec.removeprefix("rank").removesuffix("post").removesuffix("joint"))
        self.basis = None                                                      # [L, Hkv, D, r] or [L, 1, Hkv*D, r]

    def _rope(self, a: int, b: int):
        return self.model.rope(torch.arange(a, b, device=self.attn.k.device))  # cos, sin: [n, D]

    def _unrotated(self, layer: int, a: int, b: int) -> torch.Tensor:
        """Keys [a, b) of a layer as the basis sees them: [Hkv, n, D], or [1, n, Hkv*D] for a joint basis."""
        k = self.attn.k[layer, :, a:b].float()                                 # k: [Hkv, n, D]
        if not self.post:
            cos, sin = self._rope(a, b)
            k = apply_rope(k, cos.float(), -sin.float())                       # rotation by -angle: pre-RoPE keys
        return k.transpose(0, 1).reshape(1, b - a, -1) if self.joint else k

    def sync(self) -> None:
        L, C = self.attn.k.shape[0], self.C
        if self.basis is None:
            n = self.attn.length
            self.basis = torch.stack([_top_directions(self._unrotated(layer, 0, n), self.rank) for layer in range(L)])
        cut = self.attn.length // C - self.n_window
        if cut <= self.done:
            return
        a, b = self.done * C, cut * C
        cos, sin = self._rope(a, b)
        for layer in range(L):
            u = self.basis[layer]                                              # u: [Hkv, D, r]
            k = self._unrotated(layer, a, b) @ u @ u.transpose(1, 2)           # k: [Hkv, n, D] rank r
            if self.joint:                                                     # [1, n, Hkv*D] -> [Hkv, n, D]
                k = k.reshape(b - a, -1, self.attn.k.shape[-1]).transpose(0, 1)
            if not self.post:
                k = apply_rope(k, cos.float(), sin.float())
            self.attn.k[layer, :, a:b] = k.to(self.attn.k.dtype)
        self.lossy_chunks += (cut - self.done) * L
        self.done = cut


def _top_directions(k: torch.Tensor, rank: int) -> torch.Tensor:
    """k [Hkv, N, D] -> orthonormal [Hkv, D, rank]: top eigenvectors of K^T K (uncentred, as the shadow index)."""
    _, vecs = torch.linalg.eigh(torch.bmm(k.transpose(1, 2), k).double())      # ascending eigenvalues
    return vecs.flip(-1)[..., :rank].to(k.dtype).contiguous()
