"""Tune the dequantize-GEMV: every variant of offload/kernels/wgemv_table.py on the model's layer shapes.

    python bench/gemv_tune.py --out bench/out/gemv_tune.json --write-table bench/out/wgemv_table.py

Per block format and shape (M = 1 decode): each variant runs once against the float32 torch reference
(assert_close; a variant that fails to compile or is wrong is reported and skipped), then is timed in a CUDA
graph over enough copies of the matrix to beat the L2. GB/s counts the quantized bytes read; x_of_copy is that
over a device-to-device copy's rate (read + write bytes) measured in the same process; cuBLAS bf16 on the same
shape is a row too. The JSON's "table" holds the fastest variant per (format, shape class) (the least total
time over the class's shapes); --write-table renders wgemv_table.py with it, for the lead to copy in.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
import traceback
from datetime import date

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import device_name, event_ms, graph_ms, print_table  # noqa: E402

FORMATS = ("Q4_K", "Q8_0", "Q6_K", "Q4_1", "Q4_0")   # what --weights q4 / q8_0 and Q4_K_M files use first


def layer_shapes(model: str) -> list[tuple[str, int, int]]:
    """(label, rows, cols): the fused matrices decode reads, the vocabulary, and k/v and up alone."""
    from offload.model.loaders.build import arch_config
    a = arch_config(model)
    H, I, D = a["hidden_size"], a["intermediate_size"], a["head_dim"]
    hq, hkv = a["num_attention_heads"], a["num_key_value_heads"]
    return [("qkv", (hq + 2 * hkv) * D, H), ("o", H, hq * D), ("gate_up", 2 * I, H), ("down", H, I),
            ("lm_head", a["vocab_size"], H), ("kv", hkv * D, H), ("up", I, H)]


LAYER = ("qkv", "o", "gate_up", "down")   # one decoder layer's reads


def copy_ceiling() -> float:
    """GB/s of a 1 GiB device-to-device copy, read + write bytes."""
    src = torch.ones(1 << 28, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = event_ms(lambda: dst.copy_(src), 10)
    return 2 * (1 << 30) / ms / 1e6


def precompile(variants, fmts, dtype, workers: int) -> dict[tuple[str, str], str]:
    """Compile every (variant, format) kernel, several at a time; the compile errors by (variant name, format)."""
    from offload.kernels import _backend
    from offload.kernels.wquant import _CODES
    _backend()   # loads CuPy
    from offload.kernels import _cupy_wquant
    jobs = [(v, _CODES[f], dtype) for v in variants for f in fmts]
    errs = _cupy_wquant.precompile(jobs, torch.cuda.current_device(), workers)
    names = {_CODES[f]: f for f in fmts}
    return {(v.name, names[code]): e for (v, code, _), e in errs.items()}


def copies_of(w, n: int):
    from offload.model.qlinear import Part, QuantWeight
    return [w] + [QuantWeight([Part(p.fmt, {k: t.clone() for k, t in p.planes.items()}) for p in w.parts], w.cols)
                  for _ in range(n - 1)]


def _sticky(e: Exception) -> bool:
    """A CUDA error that leaves the context unusable (every later call would fail too)."""
    text = str(e)
    return any(k in text for k in ("illegal memory access", "illegal address", "unspecified launch failure",
                                   "CUDA_ERROR_ILLEGAL", "misaligned address", "device-side assert"))


def _record(rec: dict, rows_file: str | None) -> None:
    if rows_file:
        with open(rows_file, "a") as fh:
            fh.write(json.dumps(rec) + "\n")


def run_shape(fmt, label, rows, cols, variants, x, args, ceiling, compile_errs, done=frozenset()) -> list[dict]:
    from offload.kernels import _cupy_wquant, wgemv_table, wquant
    from offload.model.qlinear import QuantWeight
    torch.manual_seed(0)
    dense = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * 0.02   # dense: [rows, cols]
    w = QuantWeight.quantize(fmt, dense)
    assert isinstance(w, QuantWeight) and w.formats == (fmt,), f"{fmt} does not fit {cols} columns"
    ref = x.float() @ w.dequantize(torch.float32).t()   # ref: [1, rows] float32
    n = max(1, math.ceil(args.min_mib * 2**20 / w.nbytes))
    ws = copies_of(w, n)
    cls = wgemv_table.shape_class(rows, cols)
    base = {"weights": fmt, "shape": label, "rows": rows, "cols": cols, "class": cls, "copies": n}
    out = []
    for v in variants:
        if (fmt, label, v.name) in done:
            continue
        row = {**base, "variant": v.name}
        err = compile_errs.get((v.name, fmt))
        _record({"start": [fmt, label, v.name]}, args.rows_file)
        try:
            if err:
                raise RuntimeError(f"compile: {err}")
            _cupy_wquant.forced_variant = v
            y = wquant.gemv(x, w)
            torch.cuda.synchronize()
            torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
            ms = graph_ms(lambda: [wquant.gemv(x, c) for c in ws], args.reps) / n
            row.update(ms=ms, gb_per_s=w.nbytes / ms / 1e6, x_of_copy=w.nbytes / ms / 1e6 / ceiling)
        except Exception as e:   # report it, keep going with the next variant
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if args.verbose:
                traceback.print_exc()
            if _sticky(e):   # the parent reruns this format without the variant
                _record(row, args.rows_file)
                _line(row)
                sys.exit(3)
        finally:
            _cupy_wquant.forced_variant = None
        out.append(row)
        _record(row, args.rows_file)
        _line(row)
    cublas = (fmt == args.formats.split(",")[0] or args.cublas_every) and not args.no_cublas
    if cublas and ("bf16", label, "cublas") not in done:
        ms = graph_ms(lambda: torch.nn.functional.linear(x, dense), args.reps)   # dense bf16, the same shape
        out.append({**base, "weights": "bf16", "variant": "cublas", "copies": 1, "ms": ms,
                    "gb_per_s": dense.numel() * 2 / ms / 1e6, "x_of_copy": dense.numel() * 2 / ms / 1e6 / ceiling})
        _record(out[-1], args.rows_file)
        _line(out[-1])
    return out


def _line(r: dict) -> None:
    what = (f"{r['ms'] * 1e3:8.1f} us {r['gb_per_s']:6.0f} GB/s {100 * r['x_of_copy']:5.1f}% of copy"
            if "ms" in r else r.get("error", ""))
    print(f"{r['weights']:5} {r['shape']:8} {r['variant']:14} {what}", flush=True)


def best_table(rows: list[dict], fmts) -> tuple[dict, list[dict]]:
    """The fastest variant per (format, class): least summed ms over the class's shapes. A variant that failed
    on any shape of the format (wrong, crashed, did not compile) is not picked anywhere: it has a bug."""
    from offload.kernels import wgemv_table
    table, summary = {}, []
    for fmt in fmts:
        table[fmt] = {}
        bad = {r["variant"] for r in rows if r["weights"] == fmt and "error" in r}
        for cls in wgemv_table.CLASSES:
            mine = [r for r in rows if r["weights"] == fmt and r["class"] == cls and r["variant"] not in bad]
            shapes = {r["shape"] for r in mine}
            if not shapes:
                continue
            total = {}
            for name in dict.fromkeys(r["variant"] for r in mine):
                got = [r for r in mine if r["variant"] == name and "ms" in r]
                if {r["shape"] for r in got} == shapes:
                    total[name] = (sum(r["ms"] for r in got), sum(r["gb_per_s"] * r["ms"] for r in got))
            if not total:
                continue
            name = min(total, key=lambda k: total[k][0])
            table[fmt][cls] = name
            ms, mb = total[name]
            summary.append({"weights": fmt, "class": cls, "best": name, "ms": ms, "gb_per_s": mb / ms,
                            "shapes": ",".join(sorted(shapes))})
    return table, summary


def layer_rows(rows, table, ceiling) -> list[dict]:
    """One decoder layer (qkv, o, gate_up, down) and lm_head per format: the table's picks against wgemv.cu's own
    table (v2_table: what runs where the tensor-core kernel does not apply) and against v1."""
    from offload.kernels import wgemv_table
    out = []
    for fmt, picks in table.items():
        for name in ("table", "v2_table", "v1r2u2"):
            chosen = {"table": picks, "v2_table": wgemv_table.V2_TABLE.get(fmt, {})}.get(name)
            got = []
            for label in LAYER + ("lm_head",):
                r = next((r for r in rows if r["weights"] == fmt and r["shape"] == label and "ms" in r and
                          r["variant"] == (chosen.get(r["class"]) if chosen is not None else name)), None)
                got.append(r)
            if any(r is None for r in got[:4]):
                continue
            ms = sum(r["ms"] for r in got[:4])
            rate = sum(r["gb_per_s"] * r["ms"] for r in got[:4]) / ms   # MB read / ms = GB/s
            out.append({"weights": fmt, "variant": name, "layer_ms": ms, "layer_gb_per_s": rate,
                        "layer_x_of_copy": rate / ceiling,
                        "lm_head_x_of_copy": got[4]["x_of_copy"] if got[4] else None})
    return out


def render_table(table: dict, source: str, note: str) -> str:
    """wgemv_table.py's source with its TABLE block replaced by `table` (classes it lacks keep their entry)."""
    from offload.kernels import wgemv_table
    merged = {f: {**wgemv_table.TABLE.get(f, {}), **table.get(f, {})} for f in {*wgemv_table.TABLE, *table}}
    q = json.dumps
    lines = []
    for f in sorted(merged):
        items = [f"{q(c)}: {q(merged[f][c])}" for c in wgemv_table.CLASSES if c in merged[f]]
        rows = [", ".join(items[i:i + 3]) for i in range(0, len(items), 3)]   # lines under 120 characters
        lines.append(f"    {q(f)}: {{" + (",\n" + " " * (len(q(f)) + 7)).join(rows) + "},\n")
    body = f"# {note}\nTABLE: dict[str, dict[str, str]] = {{\n" + "".join(lines) + "}\n"
    return re.sub(r"(# --- TABLE .*?---\n).*?(# --- end TABLE ---)", lambda m: m.group(1) + body + m.group(2),
                  source, flags=re.S)


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as fh:
        return [json.loads(line) for line in fh if line.strip()]


def run_child(args) -> None:
    """Measure args.formats, appending every row to args.rows_file (skipping what it already holds)."""
    from offload.kernels import wgemv_table
    fmts = args.formats.split(",")
    variants = (wgemv_table.CANDIDATES if args.variants == "all"
                else tuple(wgemv_table.parse(n) for n in args.variants.split(",")))
    shapes = [s for s in layer_shapes(args.model) if args.shapes == "all" or s[0] in args.shapes.split(",")]
    old = _read_rows(args.rows_file) if args.rows_file else []
    done = frozenset((r["weights"], r["shape"], r["variant"]) for r in old if "variant" in r)
    ceiling = next((r["ceiling"] for r in old if "ceiling" in r), None) or copy_ceiling()
    _record({"ceiling": ceiling}, args.rows_file)
    print(f"copy ceiling {ceiling:.0f} GB/s (read + write)", flush=True)
    t0 = time.perf_counter()
    compile_errs = precompile(variants, fmts, torch.bfloat16, args.compile_workers)
    compile_s = time.perf_counter() - t0
    _record({"compile_s": compile_s}, args.rows_file)
    print(f"compiled {len(variants)} variants x {len(fmts)} formats in {compile_s:.1f} s; "
          f"{len(compile_errs)} failed", flush=True)
    for k, e in compile_errs.items():
        print("compile error", k, e, flush=True)
    x = {c: torch.randn(1, c, device="cuda", dtype=torch.bfloat16) for c in {s[2] for s in shapes}}
    for fmt in fmts:
        for label, r, c in shapes:
            run_shape(fmt, label, r, c, variants, x[c], args, ceiling, compile_errs, done)


def run_isolated(args, fmts) -> None:
    """One child process per format; a child that dies (or exits on a sticky CUDA error) is rerun without the
    variant it was measuring, which gets an error row."""
    import subprocess
    passed = ["--model", args.model, "--shapes", args.shapes, "--variants", args.variants, "--min-mib",
              str(args.min_mib), "--reps", str(args.reps), "--compile-workers", str(args.compile_workers),
              "--rows-file", args.rows_file] + (["--cublas-every"] if args.cublas_every else []) + \
             (["--verbose"] if args.verbose else [])
    shapes = {s[0]: s for s in layer_shapes(args.model)}
    deadline = time.monotonic() + (args.time_budget or 1e9)
    for k, fmt in enumerate(fmts):
        for _ in range(8):
            cublas = [] if k == 0 or args.cublas_every else ["--no-cublas"]   # cuBLAS bf16 once per shape
            try:
                rc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--formats", fmt, *cublas,
                                     *passed], timeout=max(1.0, deadline - time.monotonic())).returncode
            except subprocess.TimeoutExpired:
                print(f"time budget spent during {fmt}: the table keeps what was measured", flush=True)
                return
            if rc == 0:
                break
            recs = _read_rows(args.rows_file)
            finished = {(r["weights"], r["shape"], r["variant"]) for r in recs if "variant" in r}
            started = [tuple(r["start"]) for r in recs if "start" in r]
            lost = next((t for t in reversed(started) if t not in finished), None)
            if lost is None:
                print(f"{fmt}: the child failed (rc {rc}) outside a variant; giving up on {fmt}", flush=True)
                break
            _, label, name = lost
            from offload.kernels import wgemv_table
            _, r, c = shapes[label]
            row = {"weights": fmt, "shape": label, "rows": r, "cols": c, "class": wgemv_table.shape_class(r, c),
                   "variant": name, "error": f"killed the process (rc {rc})"}
            _record(row, args.rows_file)
            _line(row)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--shapes", default="all", help="labels (qkv,o,gate_up,down,lm_head,kv,up) or all")
    ap.add_argument("--variants", default="all", help="names (see wgemv_table.CANDIDATES) or all")
    ap.add_argument("--min-mib", type=float, default=256, help="bytes of copies cycled per timing (beat the L2)")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--compile-workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--cublas-every", action="store_true", help="time cuBLAS bf16 with every format, not once")
    ap.add_argument("--time-budget", type=float, default=0, help="seconds; stop measuring then, keep the rows so far")
    ap.add_argument("--in-process", action="store_true", help="no child process per format (a crash ends the run)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--rows-file", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--no-cublas", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--out", default="bench/out/gemv_tune.json")
    ap.add_argument("--write-table", default=None, help="write wgemv_table.py with the fastest picks here")
    args = ap.parse_args()
    if args.child:
        return run_child(args)
    from offload.kernels import wgemv_table
    fmts = args.formats.split(",")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    args.rows_file = os.path.abspath(args.out) + ".rows.jsonl"
    if os.path.exists(args.rows_file):
        os.remove(args.rows_file)
    if args.in_process:
        run_child(args)
    else:
        run_isolated(args, fmts)
    recs = _read_rows(args.rows_file)
    rows = [r for r in recs if "variant" in r]
    ceiling = next((r["ceiling"] for r in recs if "ceiling" in r), float("nan"))
    compile_s = [r["compile_s"] for r in recs if "compile_s" in r]
    table, summary = best_table(rows, fmts)
    layers = layer_rows(rows, table, ceiling)
    failed = sorted({(r["variant"], r["weights"], r["error"][:100]) for r in rows if "error" in r})
    doc = {"bench": "gemv_tune", "date": date.today().isoformat(), "device": device_name(),
           "copy_gb_per_s": ceiling, "compile_s": compile_s, "table": table, "best": summary, "layers": layers,
           "failed": [list(f) for f in failed], "args": vars(args), "rows": rows}
    with open(args.out, "w") as fh:
        json.dump(doc, fh, indent=1)
    if args.write_table:
        import inspect
        with open(args.write_table, "w") as fh:
            note = f"The fastest per class in bench/gemv_tune.py on {doc['device']}, {doc['date']}."
            fh.write(render_table(table, inspect.getsource(wgemv_table), note))
    for f in failed[:40]:
        print("FAILED", *f)
    print(f"\ncopy ceiling {ceiling:.0f} GB/s; best per (format, shape class) (ms summed over the class's shapes):")
    print_table(summary)
    print("\none layer (qkv + o + gate_up + down): the table's picks against wgemv.cu's table and v1r2u2:")
    print_table(layers)
    print(f"\nwrote {args.out}" + (f" and {args.write_table}" if args.write_table else "") + f" ({doc['device']})")


if __name__ == "__main__":
    main()
