"""Wall time of LLM(model) on the CPU: describe (config, tokenizer), plan, load the weights (issue 15: the
GGUF parsed once), and the process's CPU time (what a shared box inflates least). Run it in a fresh process
per sample; PYTHONPATH picks the checkout to time.

    python bench/load_time.py [--model smollm2-135m] [--weights auto]
"""
from __future__ import annotations

import argparse
import json
import resource
import time

t_start = time.perf_counter()
import torch  # noqa: E402,F401

from offload import LLM  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--model", default="smollm2-135m")
ap.add_argument("--weights", default=None)
args = ap.parse_args()
t0 = time.perf_counter()
opts = {"weights": args.weights} if args.weights else {}
llm = LLM(args.model, device="cpu", ctx=2048, show_progress=False, **opts)
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"import_s": round(t0 - t_start, 2), "load_s": round(time.perf_counter() - t0, 2),
                  "process_cpu_s": round(ru.ru_utime + ru.ru_stime, 2)}))
