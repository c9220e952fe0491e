"""Accuracy cost of sparse prefill over *streamed* history (engine/staging.py), on SmolLM2 at small sizes.

    python bench/fidelity_streamed_prefill.py --window 1024 [bench/fidelity_prefill.py options]

A tiered sparse session whose decode budget covers the whole context (so decode is exact) and whose prefill
window is shrunk to --window tokens, so most of each prompt's history is streamed from the store, as past 128K
tokens of an 8B model. `exact` streams it all; `sparse@t` picks streamed chunks through the layer's index
(SparsePrefill.stream_tokens per KV head and query block) and block-sparse attention inside the window.
Everything else (cases, parts, JSON) is bench/fidelity_prefill.py's.
"""
from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    window = 1024
    if "--window" in sys.argv:
        i = sys.argv.index("--window")
        window = int(sys.argv[i + 1])
        del sys.argv[i:i + 2]
    import fidelity_prefill as fp

    import offload.backends as backends
    from offload import LLM

    def window_bytes(p):            # window tokens of one layer at the plan's KV layout
        return window * p.chunk_bytes // p.chunk_tokens

    backends.prefill_stage_bytes = window_bytes
    fp.LLM = functools.partial(LLM, attention="sparse", budget="16K", sink_tokens=64, window_tokens=256)
    fp.main()


if __name__ == "__main__":
    main()
