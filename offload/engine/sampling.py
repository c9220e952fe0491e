"""Greedy, temperature and top-p sampling with a seedable generator."""
from __future__ import annotations

import torch


class Sampler:
    def __init__(self, temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None):
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.gen = torch.Generator()
        self.gen.manual_seed(seed if seed is not None else torch.seed())

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: [V] float32 -> one token id."""
        if self.temperature <= 0.0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float().cpu() / self.temperature, dim=-1)  # probs: [V]
        if self.top_p < 1.0:
            sp, si = torch.sort(probs, descending=True)  # sp, si: [V]
            keep = torch.cumsum(sp, 0) - sp < self.top_p  # keep: [V]; the top token always stays
            sp = sp * keep
            return int(si[torch.multinomial(sp / sp.sum(), 1, generator=self.gen)])
        return int(torch.multinomial(probs, 1, generator=self.gen))
