"""offload-chat start-up on this machine: `--help`, an option error, and loading the default model.

    python bench/cli_startup.py --runs 5 --loads 3 --out bench/results/cli_startup.json

Each figure is a fresh process (what a user waits for): wall time and the CPU time the process used (user +
sys; less sensitive than wall time to other jobs sharing the cores), medians over the runs. The load figure
is LLM(device="cpu") of the default model (SmolLM2-135M GGUF) as timed by the runtime (llm.load_s), plus the
torch import it needs. The 1-minute load average before and after is recorded: a shared box inflates wall times.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

LOAD_CODE = """
import json, time
t0 = time.perf_counter()
import torch
t1 = time.perf_counter()
from offload import LLM
llm = LLM(device="cpu")
print(json.dumps({"import_torch_s": t1 - t0, "load_s": llm.load_s}))
"""


def timed(cmd: list[str], env: dict) -> tuple[float, float, subprocess.CompletedProcess]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done


def median_of(runs: int, cmd: list[str], env: dict, want_rc: int) -> dict:
    walls, cpus = [], []
    for _ in range(runs):
        wall, cpu, done = timed(cmd, env)
        assert done.returncode == want_rc, (cmd, done.returncode, done.stderr[-500:])
        walls.append(wall)
        cpus.append(cpu)
    return {"wall_s": statistics.median(walls), "cpu_s": statistics.median(cpus), "runs": runs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--loads", type=int, default=3)
    ap.add_argument("--out", default="bench/results/cli_startup.json")
    args = ap.parse_args()
    env = {**os.environ, "OFFLOAD_NO_PROGRESS": "1"}
    chat = [sys.executable, "-m", "offload.cli.main"]
    out = {"device": f"CPU ({os.cpu_count()} cores)", "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "loadavg_before": os.getloadavg()[0]}
    out["help"] = median_of(args.runs, chat + ["--help"], env, 0)
    out["option_error"] = median_of(args.runs, chat + ["--top-k", "-3", "-p", "x"], env, 2)
    loads = []
    for _ in range(args.loads):
        wall, cpu, done = timed([sys.executable, "-c", LOAD_CODE], env)
        assert done.returncode == 0, done.stderr[-500:]
        loads.append({**json.loads(done.stdout.strip().splitlines()[-1]), "process_wall_s": wall, "process_cpu_s": cpu})
    out["load_default_model"] = {k: statistics.median(r[k] for r in loads) for k in loads[0]}
    out["load_default_model"]["runs"] = args.loads
    out["loadavg_after"] = os.getloadavg()[0]
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{'what':<34} {'wall s':>8} {'cpu s':>8}")
    print(f"{'offload-chat --help':<34} {out['help']['wall_s']:8.2f} {out['help']['cpu_s']:8.2f}")
    print(f"{'offload-chat --top-k -3 (error)':<34} {out['option_error']['wall_s']:8.2f} {out['option_error']['cpu_s']:8.2f}")
    ld = out["load_default_model"]
    print(f"{'LLM() default model: load_s':<34} {ld['load_s']:8.2f}")
    print(f"{'  + import torch':<34} {ld['import_torch_s']:8.2f}")
    print(f"{'  whole process':<34} {ld['process_wall_s']:8.2f} {ld['process_cpu_s']:8.2f}")
    print(f"load average {out['loadavg_before']:.1f} -> {out['loadavg_after']:.1f} on {out['device']}")


if __name__ == "__main__":
    main()
