"""Quantized weights (issue 16): block formats against gguf's own dequantizer, QuantWeight row operations,
GGUF files written with gguf's writer loaded quantized, --weights q8_0 / q4, bad files, and the GPU kernel."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fixtures_models import write_tiny_checkpoint
from offload.errors import ModelLoadError
from offload.model import qformats
from offload.model.config import ModelConfig
from offload.model.llama import LlamaModel
from offload.model.loaders import build, load_checkpoint
from offload.model.loaders.build import WeightPlan
from offload.model.qlinear import QuantWeight, linear

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize  # noqa: E402

FORMATS = list(qformats.SUPPORTED)
KEEP_ALL = frozenset(qformats.SUPPORTED)


def _gguf_type(fmt: str):
    return gguf.GGMLQuantizationType[fmt]


def _blocks(fmt: str, w: np.ndarray) -> np.ndarray:
    """File bytes of w in fmt: gguf's quantizer where it has one (Q8_0, Q4_0, Q4_1, Q5_0...), ours for K-quants."""
    if fmt not in ("Q4_K", "Q6_K"):
        return gguf_quantize(w.astype(np.float32), _gguf_type(fmt))
    return qformats.to_gguf_bytes(fmt, qformats.quantize(fmt, torch.from_numpy(w))).numpy()


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantize_is_bit_equal_to_gguf_on_random_blocks(fmt):
    """Random block bytes (any quant bits, finite scales) read back exactly as gguf.quants.dequantize reads them."""
    f, rng = qformats.FORMATS[fmt], np.random.default_rng(1)
    rows, cols = 6, 512
    raw = rng.integers(0, 256, (rows, cols // f.block, f.block_bytes), dtype=np.uint8)
    planes = qformats.from_gguf_bytes(fmt, torch.from_numpy(raw.reshape(rows, -1)))
    for name, off, n in f.fields:   # finite float16 scales where the format has them
        if name in ("d", "dm") or (fmt == "Q4_K" and name == "meta"):
            k = 2 if name == "d" else 4
            halves = (rng.standard_normal((rows, cols // f.block, k // 2)) * 0.01).astype(np.float16)
            raw[:, :, off:off + k] = halves.view(np.uint8)
    raw = raw.reshape(rows, -1)
    planes = qformats.from_gguf_bytes(fmt, torch.from_numpy(raw))
    expected = torch.from_numpy(gguf_dequantize(raw, _gguf_type(fmt)))
    assert torch.equal(qformats.dequantize(fmt, planes), expected)
    assert torch.equal(qformats.to_gguf_bytes(fmt, planes), torch.from_numpy(raw))


@pytest.mark.parametrize("fmt", ["Q8_0", "Q4_0", "Q4_1"])
def test_quantizer_writes_ggmls_bytes(fmt):
    w = np.random.default_rng(2).standard_normal((8, 1024)).astype(np.float32)
    ours = qformats.to_gguf_bytes(fmt, qformats.quantize(fmt, torch.from_numpy(w))).numpy()
    assert np.array_equal(ours, gguf_quantize(w, _gguf_type(fmt)))


@pytest.mark.parametrize("fmt, rival", [("Q4_K", "Q4_1"), ("Q6_K", "Q8_0")])
def test_k_quantizers_read_back_by_gguf_within_their_bits(fmt, rival):
    """Our Q4_K (4.5 bits) is about as close as gguf's Q4_1 (5 bits); Q6_K within 6x of Q8_0's error."""
    w = np.random.default_rng(3).standard_normal((16, 1024)).astype(np.float32)
    back = gguf_dequantize(_blocks(fmt, w), _gguf_type(fmt))
    ref = gguf_dequantize(gguf_quantize(w, _gguf_type(rival)), _gguf_type(rival))
    rmse, rival_rmse = np.sqrt(((back - w) ** 2).mean()), np.sqrt(((ref - w) ** 2).mean())
    assert rmse <= (1.1 if fmt == "Q4_K" else 6.0) * rival_rmse, (rmse, rival_rmse)


def _qw(fmt: str, rows: int, cols: int, seed: int) -> QuantWeight:
    w = torch.from_numpy(np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32))
    return QuantWeight.from_gguf(fmt, torch.from_numpy(_blocks(fmt, w.numpy())), cols)


def test_fused_rows_permutation_and_row_reads_match_the_dense_matrix():
    parts = [_qw("Q4_K", 64, 256, 0), _qw("Q4_K", 32, 256, 1), _qw("Q6_K", 32, 256, 2)]   # q|k|v of a Q4_K_M file
    fused = QuantWeight.cat(parts, "wqkv")
    dense = torch.cat([p.dequantize() for p in parts])   # dense: [128, 256]
    assert fused.formats == ("Q4_K", "Q6_K") and torch.equal(fused.dequantize(), dense)
    idx = torch.tensor([127, 0, 64, 95, 96, 3])
    assert torch.equal(fused[idx], dense[idx]) and torch.equal(fused[5:9], dense[5:9])
    assert torch.equal(fused[-8:], dense[-8:]) and torch.equal(fused[::7], dense[::7])
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(parts[0].permute_rows(perm).dequantize(), parts[0].dequantize()[perm])
    x = torch.randn(3, 256)
    assert torch.equal(linear(x, fused), F.linear(x, dense))


def _llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_PARTS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
# every block format, fused q|k|v and gate|up mixing formats as Q4_K_M files do
_TYPES = {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q8_0", "ffn_gate": "Q4_0",
          "ffn_up": "Q4_1", "ffn_down": "Q6_K", "token_embd": "Q8_0", "output": "Q4_K"}


def write_quant_gguf(path, model, types=_TYPES, corrupt: str | None = None):
    """A tiny Llama GGUF as llama.cpp writes one (q/k rows permuted), matrices quantized per `types`."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_block_count, cfg.num_hidden_layers), (w.add_context_length, cfg.max_position_embeddings),
                       (w.add_embedding_length, cfg.hidden_size), (w.add_feed_forward_length, cfg.intermediate_size),
                       (w.add_head_count, cfg.num_attention_heads), (w.add_head_count_kv, cfg.num_key_value_heads),
                       (w.add_layer_norm_rms_eps, cfg.rms_norm_eps), (w.add_rope_freq_base, 500000.0)):
        add(value)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(0x100 + i) for i in range(cfg.vocab_size)])
    w.add_token_types([1] * cfg.vocab_size)
    w.add_token_merges([])
    w.add_eos_token_id(2)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().copy()
        if name.startswith("model.layers."):
            layer, rest, kind = name.split(".")[2], ".".join(name.split(".")[3:-1]), name.split(".")[-1]
            stem = _GGUF_PARTS[rest]
            if stem in ("attn_q", "attn_k"):
                array = _llama_cpp_permute(array, cfg.num_attention_heads if stem == "attn_q" else cfg.num_key_value_heads)
            out = f"blk.{layer}.{stem}.{kind}"
        else:
            stem = {"model.embed_tokens.weight": "token_embd", "model.norm.weight": "output_norm",
                    "lm_head.weight": "output"}[name]
            out = f"{stem}.weight"
        fmt = types.get(stem) if array.ndim == 2 else None
        if fmt is None:
            w.add_tensor(out, array.astype(np.float32))
            continue
        blocks = _blocks(fmt, array)
        if out == corrupt:
            blocks = blocks.copy()
            blocks[0, 0:2] = np.array([np.nan], dtype=np.float16).view(np.uint8)   # the first block's scale
        w.add_tensor(out, blocks, raw_dtype=_gguf_type(fmt))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("qw"), "llama", hidden_size=256, intermediate_size=512,
                                 num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def quant_gguf(tiny, tmp_path_factory):
    return write_quant_gguf(tmp_path_factory.mktemp("qg") / "tiny.gguf", tiny.model)


KEEP = WeightPlan(KEEP_ALL, None, KEEP_ALL, None)        # what --weights auto does on a GPU


def _model(path, plan: WeightPlan | None = None, dtype=torch.float32):
    plan = plan or build.weight_plan("bf16", "cpu")
    ckpt = load_checkpoint(str(path), dtype, "cpu", keep=plan.keep, keep_head=plan.head_keep)
    mc = ModelConfig.from_hf(ckpt.hf_config)
    return LlamaModel.from_state_dict(mc, dict(ckpt.state_dict), torch.device("cpu"), dtype, quantize=plan.quantize,
                                      head_quantize=plan.head_quantize)


def _logits(model, ids):
    from offload.engine.dense import DenseAttention
    cfg = model.cfg
    attn = DenseAttention(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, 64, "cpu", model.dtype)
    cos, sin = model.rope(torch.arange(len(ids)))
    x = model.embed[torch.tensor(ids)].to(model.dtype)  # x: [T, H]
    attn.begin(len(ids))
    for i in range(cfg.num_layers):
        x = model.layer_forward(i, x, cos, sin, attn)
    attn.end()
    return model.logits(x)  # [T, V]


def test_gguf_kept_quantized_equals_the_file_dequantized(quant_gguf, tiny):
    """Every block format kept (mixed fusions, permuted q/k rows): the same logits, bit for bit, as the
    same file dequantized at load; a tenth of the bytes; the planner's count equals what loaded."""
    kept, dense = _model(quant_gguf, KEEP), _model(quant_gguf)
    assert isinstance(kept.layers[0].wqkv, QuantWeight) and kept.weight_format == "Q4_K+Q6_K+Q8_0+Q4_0+Q4_1"
    assert kept.layers[0].wqkv.formats == ("Q4_K", "Q6_K")
    ids = torch.randint(0, 320, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(_logits(kept, ids), _logits(dense, ids))
    assert kept.weight_bytes < 0.25 * dense.weight_bytes
    info = build.resolve(str(quant_gguf))
    planned = build.planned_weight_bytes(info, kept.cfg, torch.float32, "auto", torch.device("cuda"))
    cfg = kept.cfg
    scratch = 4 * cfg.hidden_size * ((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
                                     + cfg.num_heads * cfg.head_dim + 3 * cfg.intermediate_size)
    assert planned == kept.weight_bytes + scratch
    # on the CPU auto dequantizes (no quantized CPU kernels here): the planner counts dense bytes
    assert build.planned_weight_bytes(info, kept.cfg, torch.float32, "auto", torch.device("cpu")) == dense.weight_bytes


@pytest.mark.parametrize("weights, fmt, head", [("q8_0", "Q8_0", "Q8_0"), ("q4", "Q4_K", "Q6_K")])
def test_weights_flag_quantizes_a_dense_checkpoint(tiny, weights, fmt, head):
    """--weights q8_0 / q4 on an HF folder: layer matrices in fmt, the untied head in `head` (q4: Q6_K, as
    Q4_K_M files hold it); logits equal the model built from the same blocks dequantized, and stay near the
    unquantized model."""
    plan = build.weight_plan(weights, torch.device("cpu"))
    q = _model(tiny.path, plan)
    dense = _model(tiny.path)
    assert q.weight_format == fmt and q.embed.formats == (fmt,) and q.lm_head.formats == (head,)
    twin = _model(tiny.path)   # the same blocks dequantized into dense tensors
    for lw, qw in zip(twin.layers, q.layers):
        for field in ("wqkv", "wo", "w_gate_up", "w_down"):
            setattr(lw, field, getattr(qw, field).dequantize())
    twin.embed, twin.lm_head = q.embed.dequantize(), q.lm_head.dequantize()
    ids = torch.randint(0, 320, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    out = _logits(q, ids)
    assert torch.equal(out, _logits(twin, ids))
    ref = _logits(dense, ids)
    assert (out - ref).abs().max() < (0.05 if fmt == "Q8_0" else 0.5) * ref.abs().max()


def test_unsupported_type_is_refused_before_loading(tiny, tmp_path):
    """A Q5_0 matrix under weights=auto on a GPU: one line naming the type and the supported list, from the
    headers (planning), before any weight loads; --weights bf16 still dequantizes it."""
    path = write_quant_gguf(tmp_path / "q5.gguf", tiny.model, types={**_TYPES, "ffn_up": "Q5_0"})
    info = build.resolve(str(path))
    mc = ModelConfig.from_hf(info.hf_config)
    with pytest.raises(ModelLoadError) as e:
        build.planned_weight_bytes(info, mc, torch.bfloat16, "auto", torch.device("cuda"))
    msg = str(e.value)
    assert "Q5_0" in msg and "Q8_0, Q4_0, Q4_1, Q4_K, Q6_K" in msg and "--weights bf16" in msg and "\n" not in msg
    assert build.planned_weight_bytes(info, mc, torch.bfloat16, "bf16", torch.device("cuda")) > 0
    assert _model(path, frozenset()).weight_format == "float32"


def test_nan_block_scales_are_refused_at_load(tiny, tmp_path):
    path = write_quant_gguf(tmp_path / "nan.gguf", tiny.model, corrupt="blk.1.attn_output.weight")
    with pytest.raises(ModelLoadError, match="blk.1.attn_output|o_proj.*NaN"):
        _model(path, KEEP)
    with pytest.raises(ModelLoadError, match="NaN"):
        _model(path)   # dequantized at load: refused as well, not NaN weights


@pytest.mark.parametrize("weights", ["q8_0", "q4"])
def test_dummy_model_quantized_in_place_as_planned(tiny, weights):
    """load_format=dummy with --weights: random matrices quantized as they are made; the planner's count is
    exactly their bytes plus one layer's dense scratch."""
    info = build.resolve(str(tiny.path))
    mc = ModelConfig.from_hf(info.hf_config)
    plan = build.weight_plan(weights, "cpu")
    m = LlamaModel.random(mc, torch.device("cpu"), torch.float32, quantize=plan.quantize, head_quantize=plan.head_quantize)
    assert m.weight_format == plan.quantize and m.lm_head.formats == (plan.head_quantize,)
    scratch = 4 * mc.hidden_size * ((mc.num_heads + 2 * mc.num_kv_heads) * mc.head_dim
                                    + mc.num_heads * mc.head_dim + 3 * mc.intermediate_size)
    assert build.planned_weight_bytes(info, mc, torch.float32, weights, torch.device("cpu")) == m.weight_bytes + scratch


def test_smollm2_gguf_kept_quantized_end_to_end(smollm2_gguf):
    """The real Q4_1 file kept as it is (Q8_0 embedding, Q4_1 matrices): same logits as dequantized at load."""
    kept, dense = _model(smollm2_gguf, KEEP), _model(smollm2_gguf)
    assert kept.weight_format == "Q4_1" and isinstance(kept.embed, QuantWeight)
    assert kept.weight_bytes < 0.2 * dense.weight_bytes
    ids = list(range(100, 140))
    assert torch.equal(_logits(kept, ids), _logits(dense, ids))


# ---- GPU: the dequantize-GEMV kernel against its torch reference ------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype, defines", [(torch.bfloat16, ()), (torch.float32, ()), (torch.bfloat16, ("-DWQ_RPW=1",)),
                                            (torch.bfloat16, ("-DWQ_RPW=4", "-DWQ_UNROLL=4"))])
def test_gemv_kernel_matches_reference(fmt, dtype, defines, monkeypatch):
    """Every block format and x dtype, and the tuning variants the decode bench compares (rows per warp,
    units in flight), against the float32 torch reference; the prefill's dequantize kernel too."""
    from offload.kernels import _cupy_wquant, wquant
    monkeypatch.setattr(_cupy_wquant, "wquant_defines", defines)
    w = QuantWeight.cat([_qw(fmt, 300, 1024, 0), _qw("Q8_0", 20, 1024, 1)], "w").to("cuda")   # two parts
    x = torch.randn(1, 1024, device="cuda", dtype=dtype)
    assert wquant.supports(x, w)
    y = wquant.gemv(x, w)
    ref = (x.float() @ w.dequantize().t())   # float32 reference: [1, 320]
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(y.float(), ref, rtol=tol, atol=tol * ref.abs().max().item())
    dense = torch.full(tuple(w.shape), float("nan"), device="cuda", dtype=dtype)   # the prefill's scratch
    assert wquant.dequantize_into(w, dense)
    ref = w.dequantize(dtype)   # the kernel may fuse d*q - m into one FMA: last-bit differences only
    torch.testing.assert_close(dense, ref, rtol=1e-2 if dtype == torch.bfloat16 else 1e-6,
                               atol=(1e-3 if dtype == torch.bfloat16 else 1e-6) * ref.abs().max().item())


@pytest.mark.gpu
@pytest.mark.parametrize("weights", ["q8_0", "q4"])
def test_quantized_decode_graph_matches_dequantized_twin(weights):
    """The 8B-shaped layers are too big for a test; a small dummy model quantized on the GPU decodes in a CUDA
    graph (GEMV kernels captured) with logits close to the same blocks dequantized to bf16 (cuBLAS)."""
    from offload import LLM
    llm = LLM("smollm2-135m", load_format="dummy", device="cuda", ctx=256, weights=weights, show_progress=False)
    m = llm.model
    # SmolLM2's 576-wide rows are not whole Q4_K super-blocks: those fall back to Q4_1 (as llama.cpp does)
    assert set(m.weight_format.split("+")) == ({"Q8_0"} if weights == "q8_0" else {"Q4_K", "Q4_1"})
    ids = torch.randint(0, 1000, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    sess = llm.session()
    out = [sess.prefill(ids[:30])] + [sess.step(t) for t in ids[30:]]
    assert llm.stats.get("decode_mode") == "graph"
    for lw in m.layers:   # the twin: the same blocks, dequantized to bf16 dense tensors
        for f in ("wqkv", "wo", "w_gate_up", "w_down"):
            setattr(lw, f, getattr(lw, f).dequantize(torch.bfloat16))
    m.embed = m.lm_head = m.embed.dequantize(torch.bfloat16)
    twin = llm.session()
    ref = [twin.prefill(ids[:30])] + [twin.step(t) for t in ids[30:]]
    got, want = torch.stack(out), torch.stack(ref)
    # random weights give near-flat logits, so argmax is no measure here; the values must agree
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05 * want.abs().max().item())


def _assert_same_reader(path):
    from gguf import GGUFReader

    from offload.model.loaders.gguf_header import GGUFHeader
    ref, ours = GGUFReader(str(path)), GGUFHeader.read(path)
    assert set(ref.fields) == set(ours.fields)
    for key in ref.fields:
        assert ref.fields[key].contents() == ours.fields[key].contents(), key
    assert [t.name for t in ref.tensors] == [t.name for t in ours.tensors]
    for a, b in zip(ref.tensors, ours.tensors):
        assert (a.tensor_type, list(a.shape), int(a.n_bytes), int(a.data_offset)) == \
               (b.tensor_type, list(b.shape), b.n_bytes, b.data_offset), a.name
        assert a.data.dtype == b.data.dtype and np.array_equal(a.data, b.data), a.name


def test_fast_header_reader_matches_ggufreader(quant_gguf, smollm2_gguf):
    """issue 15: the GGUF is parsed once, by a one-pass reader (0.07 s instead of 2.4 s of CPU for SmolLM2's
    vocabulary); every field and tensor view equals gguf.GGUFReader's."""
    _assert_same_reader(quant_gguf)
    _assert_same_reader(smollm2_gguf)
