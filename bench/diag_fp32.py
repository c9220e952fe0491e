"""Diagnostic: fp32 decode on CUDA, step by step, against transformers (CPU and CUDA) and our CPU path."""
import sys, tempfile, torch
sys.path.insert(0, "tests")
from fixtures_models import write_tiny_checkpoint, run_session
from offload import LLM

def rel(a, b):
    return ((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm()).item()

def per_step(a, b):
    return [round(rel(a[i], b[i]), 6) for i in range(0, a.shape[0], 4)]

tiny = write_tiny_checkpoint(tempfile.mkdtemp(), "llama", num_key_value_heads=2)
ids = torch.randint(0, tiny.model.config.vocab_size, (400,), generator=torch.Generator().manual_seed(0)).tolist()
with torch.no_grad():
    hf_cpu = tiny.model(torch.tensor([ids])).logits[0, 299:].float()
    m = tiny.model.to("cuda")
    hf_cuda = m(torch.tensor([ids], device="cuda")).logits[0, 299:].float().cpu()
    # transformers' own incremental decode on CUDA
    out = m(torch.tensor([ids[:300]], device="cuda"), use_cache=True)
    pkv, rows = out.past_key_values, [out.logits[0, -1].float().cpu()]
    for t in ids[300:]:
        out = m(torch.tensor([[t]], device="cuda"), past_key_values=pkv, use_cache=True)
        pkv = out.past_key_values
        rows.append(out.logits[0, -1].float().cpu())
    hf_inc = torch.stack(rows)
print("hf cuda vs hf cpu", rel(hf_cuda, hf_cpu), per_step(hf_cuda, hf_cpu))
print("hf incremental cuda vs hf cpu", rel(hf_inc, hf_cpu), per_step(hf_inc, hf_cpu))
ours = {}
for name, dev, graph in (("cpu", "cpu", "0"), ("cuda-graph", "cuda", "1"), ("cuda-eager", "cuda", "0")):
    ours[name] = run_session(LLM(str(tiny.path), device=dev, dtype="float32", ctx=512, cuda_graph=graph == "1"),
                             ids, 300)
    print(name, "vs hf cpu", rel(ours[name][0], hf_cpu), per_step(ours[name][0], hf_cpu))
# one-shot prefill of growing prefixes on CUDA: does the last logit match?
for n in (301, 320, 360, 400):
    s = LLM(str(tiny.path), device="cuda", dtype="float32", ctx=512).session()
    print("cuda prefill", n, rel(s.prefill(ids[:n]), hf_cpu[n - 300]))
sc, sg = ours["cpu"][1], ours["cuda-eager"][1]
for layer in (0, 1, tiny.model.config.num_hidden_layers - 1):
    kc, vc = sc.attn.read_kv(layer)
    kg, vg = sg.attn.read_kv(layer)
    print("layer", layer, kc.shape, "k rel by pos", [round(rel(kg[:, p], kc[:, p]), 6) for p in range(296, 400, 8)])
    print("layer", layer, "v rel by pos", [round(rel(vg[:, p], vc[:, p]), 6) for p in range(296, 400, 8)])
