"""Diagnostic: offload's fp32 decode on CUDA against the CPU path, step by step (tiny random Llama)."""
import os, sys, tempfile, torch
sys.path.insert(0, "tests")
from fixtures_models import write_tiny_checkpoint
from offload import LLM
tiny = write_tiny_checkpoint(tempfile.mkdtemp(), "llama", num_key_value_heads=2)
ids = torch.randint(0, 320, (400,), generator=torch.Generator().manual_seed(0)).tolist()
outs = {}
for dev, graph in (("cpu", "0"), ("cuda", "1"), ("cuda-eager", "0")):
    os.environ["OFFLOAD_NO_CUDA_GRAPH"] = "1" if graph == "0" else "0"
    s = LLM(str(tiny.path), device=dev.split("-")[0], dtype="float32", ctx=512).session()
    print(dev, s.llm.model.embed.device, s.engine.use_graph)
    rows = [s.prefill(ids[:300]).cpu()]
    for t in ids[300:]:
        rows.append(s.step(t).cpu())
    outs[dev] = (torch.stack(rows), s)
a = outs["cpu"][0]
for dev in ("cuda", "cuda-eager"):
    b = outs[dev][0]
    print(dev, "per-step rel", [round(((a[i] - b[i]).norm() / a[i].norm()).item(), 5) for i in range(0, a.shape[0], 5)])
sc, sg = outs["cpu"][1], outs["cuda"][1]
for layer in range(0):
    kc, vc = sc.attn.read_kv(layer)
    kg, vg = sg.attn.read_kv(layer)
    print("layer", layer, "len", kc.shape, kg.shape, "k rel per pos (last 12)",
          [round(((kc[:, p] - kg[:, p].cpu()).norm() / kc[:, p].norm()).item(), 6) for p in range(298, 310)])
