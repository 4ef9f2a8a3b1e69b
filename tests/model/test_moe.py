"""Mixture-of-experts layers against transformers on the same random weights: Mixtral end to end
(safetensors, GGUF, quantized experts, the engine), and the MoE blocks of Qwen3-MoE and OLMoE."""
import dataclasses

import pytest
import torch

from kvserve.config import ModelConfig
from kvserve.model.llama import LlamaForCausalLM
from kvserve.model.loader import hf_config, load_checkpoint
from kvserve.model.moe import SparseMoE, route
from kvserve.model.quant import QuantizedLinear
from model.paged_forward import paged_logits
from model.tiny_moe import make_moe_model, write_mixtral_gguf
from tiny_models import save_hf_dir

IDS = torch.randint(3, 256, (48,), generator=torch.Generator().manual_seed(1)).tolist()


def reference_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


def kvserve_model(path, quantization="none", dtype=torch.float32):
    cfg, weights = load_checkpoint(str(path), quantization)
    return LlamaForCausalLM.from_weights(cfg, weights, dtype)


@pytest.fixture(scope="module")
def mixtral():
    return make_moe_model("mixtral")


@pytest.fixture(scope="module")
def mixtral_dir(mixtral, tmp_path_factory):
    return save_hf_dir(mixtral, tmp_path_factory.mktemp("mixtral") / "hf")


@pytest.mark.parametrize("chunk", [None, 5, 1])
def test_mixtral_matches_transformers(mixtral, mixtral_dir, chunk):
    """One pass over the prompt, chunked prefill, and token-by-token decode (the one-token path)."""
    model = kvserve_model(mixtral_dir)
    assert isinstance(model.layers[0].mlp, SparseMoE) and model.config.architecture == "mixtral"
    diff = (paged_logits(model, IDS, chunk=chunk) - reference_logits(mixtral, IDS)).abs().max().item()
    assert diff < 1e-4, diff


def test_mixtral_gguf_matches_transformers(mixtral, tmp_path):
    model = kvserve_model(write_mixtral_gguf(mixtral, tmp_path / "mixtral.gguf"))
    assert model.config.num_experts == 8 and model.config.num_experts_per_tok == 2
    diff = (paged_logits(model, IDS, chunk=7) - reference_logits(mixtral, IDS)).abs().max().item()
    assert diff < 1e-4, diff


def test_gguf_with_more_experts_used_than_it_has_is_refused(tmp_path):
    from kvserve.model.loader import ModelLoadError
    hf = make_moe_model("mixtral")
    hf.config.num_experts_per_tok = 9
    with pytest.raises(ModelLoadError, match="expert_used_count 9 must be 1 to expert_count 8"):
        load_checkpoint(str(write_mixtral_gguf(hf, tmp_path / "bad.gguf")))


def test_mixtral_gguf_f16_matches_the_same_weights_rounded(tmp_path):
    """F16 stacked experts: the reference runs the same weights rounded to fp16."""
    mixtral = make_moe_model("mixtral")
    path = write_mixtral_gguf(mixtral, tmp_path / "mixtral-f16.gguf", "F16")
    with torch.no_grad():
        for name, p in mixtral.named_parameters():
            if p.dim() >= 2:
                p.copy_(p.half().float())
    diff = (paged_logits(kvserve_model(path), IDS) - reference_logits(mixtral, IDS)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("qtype,kind", [("Q4_0", "int4"), ("Q8_0", "int8")])
def test_mixtral_gguf_experts_kept_quantized(mixtral, tmp_path, qtype, kind):
    """Stacked Q4_0 / Q8_0 experts taken over block for block, one expert at a time, against the
    same file dequantized to fp32. fp32 activations: in bf16 a near-tie of the router can pick
    another expert for a token, which on random weights moves its logits by far more."""
    path = write_mixtral_gguf(mixtral, tmp_path / f"mixtral-{qtype}.gguf", qtype)
    model = kvserve_model(path, "auto")
    assert all(m.gate_up_proj.kind == kind and m.down_proj.kind == kind for m in model.layers[0].mlp.experts)
    ours, ref = paged_logits(model, IDS, chunk=8), paged_logits(kvserve_model(path), IDS)
    assert ((ours - ref).norm() / ref.norm()).item() < 2e-2


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_mixtral_experts_quantized_at_load(mixtral_dir, mode):
    """Every expert lands on the quantized kernels; the reference is transformers running the very
    weights our quantizer produced."""
    cfg, weights = load_checkpoint(str(mixtral_dir), mode)
    model = LlamaForCausalLM.from_weights(cfg, weights, torch.bfloat16)
    moe = model.layers[1].mlp
    assert moe.experts_gate_up is None and len(moe.experts) == 8
    assert all(isinstance(m.gate_up_proj, QuantizedLinear) and m.down_proj.kind == mode for m in moe.experts)
    hf = make_moe_model("mixtral")
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                prefix = name.rsplit(".", 1)[0].replace(".mlp.", ".block_sparse_moe.")
                per_expert = (("w1", "w3") if name.endswith("gate_up_proj") else ("w2",))
                p.copy_(torch.stack([torch.cat([weights[f"{prefix}.{e}.{w}.weight"].dequantize() for w in per_expert])
                                     for e in range(8)]))
            else:
                w = weights[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")]
                p.copy_(w if isinstance(w, torch.Tensor) else w.dequantize())
    ours, ref = paged_logits(model, IDS, chunk=8), reference_logits(hf, IDS)
    assert ((ours - ref).norm() / ref.norm()).item() < 2e-2


def test_engine_batch_equals_solo(mixtral_dir):
    """Two prompts decoded together give the tokens each gives alone (greedy)."""
    from kvserve.config import CacheConfig, EngineConfig
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    from kvserve.model.random_weights import token_tokenizer
    model = kvserve_model(mixtral_dir)
    engine = Engine(EngineConfig(cache=CacheConfig(num_pages=64)), model=model, tokenizer=token_tokenizer(256))
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [IDS[:9], IDS[20:41]]

    def run(batch):
        ids = [engine.add_request(p, params) for p in batch]
        done = {}
        while engine.has_unfinished():
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        return [done[i] for i in ids]
    solo = [run([p])[0] for p in prompts]
    assert run(prompts) == solo


def tiny_moe_config(**fields) -> ModelConfig:
    return dataclasses.replace(ModelConfig("mixtral", 256, 64, 64, 1, 4, 2, 16),
                               **({"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32} | fields))


def random_moe(cfg: ModelConfig) -> SparseMoE:
    torch.manual_seed(0)
    moe = SparseMoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.3 * (64 / cfg.hidden_size) ** 0.5 * torch.randn_like(p))  # outputs of the same size
    return moe


@pytest.fixture(params=["native", "torch"])
def expert_kernels(request, monkeypatch):
    """Float32 experts on moe.c (when it builds here) or on its PyTorch twin."""
    from kvserve.native import moe as native_moe
    if request.param == "torch":
        monkeypatch.setattr(native_moe, "available", lambda *tensors: False)
    elif native_moe._kernel() is None:
        pytest.skip("moe.c does not build here")
    return request.param


# (hidden, expert width): tails of the 8-wide vectors and 4-row blocks; wide enough to split between threads
SHAPES = [(64, 32), (61, 30), (256, 128)]


@pytest.mark.parametrize("hidden,width", SHAPES)
def test_token_output_does_not_depend_on_its_batch(expert_kernels, hidden, width):
    """A token's output alone (the one-token path) and among random others sharing its experts; on
    moe.c its experts' outputs bit for bit (the router is PyTorch's matmul, whose rounding may
    depend on the rows)."""
    moe = random_moe(tiny_moe_config(hidden_size=hidden, moe_intermediate_size=width))
    x = torch.randn(1, hidden)
    with torch.no_grad():
        alone = moe(x)
        for seed in range(3):
            others = torch.randn(37, hidden, generator=torch.Generator().manual_seed(seed))
            batch = torch.cat([others[:seed * 9], x, others[seed * 9:]])
            torch.testing.assert_close(moe(batch)[seed * 9], alone[0], rtol=1e-5, atol=1e-5 * alone.abs().max().item())
            if expert_kernels == "native":
                experts = route(moe.gate(batch), 2, True)[1]
                pairs = moe._pair_outputs(batch, experts).view(len(batch), 2, hidden)
                assert torch.equal(pairs[seed * 9], moe._pair_outputs(x, experts[seed * 9:seed * 9 + 1]))


@pytest.mark.parametrize("hidden,width", SHAPES)
@pytest.mark.parametrize("tokens", [1, 8, 23, 160])  # 160: past NATIVE_ROWS_PER_EXPERT, PyTorch ops
@pytest.mark.parametrize("normalize", [True, False])
def test_grouped_path_equals_a_dense_sum_over_experts(expert_kernels, normalize, tokens, hidden, width):
    """Against the definition: every expert run on every token, weighted by the top-k mask."""
    moe = random_moe(tiny_moe_config(norm_topk_prob=normalize, hidden_size=hidden, moe_intermediate_size=width))
    x = torch.randn(tokens, hidden)
    with torch.no_grad():
        probs = torch.softmax(moe.gate(x), -1)
        top = probs.topk(2, -1)
        mask = torch.zeros_like(probs).scatter(1, top.indices, top.values)
        if normalize:
            mask = mask / mask.sum(-1, keepdim=True)
        gate, up = torch.einsum("th,eih->eti", x, moe.experts_gate_up).chunk(2, -1)
        every = torch.einsum("eti,ehi->eth", torch.nn.functional.silu(gate) * up, moe.experts_down)
        expected = (every * mask.t()[..., None]).sum(0)
        torch.testing.assert_close(moe(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family,overrides", [("mixtral", {}), ("qwen3_moe", {"norm_topk_prob": True}),
                                              ("qwen3_moe", {"norm_topk_prob": False}), ("olmoe", {})])
def test_moe_block_matches_transformers(family, overrides, tmp_path):
    """The config fields hf_config reads, the checkpoint's per-expert names as saved to disk, and
    each layer's block against transformers' own block. Qwen3-MoE and OLMoE are read as if their
    attention were Llama's (their q/k norms are left out): only the MoE blocks are compared."""
    import json
    hf = make_moe_model(family, **overrides)
    save_hf_dir(hf, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    cfg = hf_config(config | {"architectures": ["LlamaForCausalLM"]} if family != "mixtral" else config)
    width = hf.config.moe_intermediate_size if family == "qwen3_moe" else hf.config.intermediate_size
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, width)
    assert cfg.norm_topk_prob == (family == "mixtral" or overrides.get("norm_topk_prob", False))
    _, weights = load_checkpoint(str(tmp_path), "none") if family == "mixtral" else (None, _safetensors(tmp_path))
    model = LlamaForCausalLM.from_weights(cfg, weights)
    x = torch.randn(1, 19, 64)
    with torch.no_grad():
        for i in range(2):
            torch.testing.assert_close(model.layers[i].mlp(x[0]), hf.model.layers[i].mlp(x)[0], rtol=1e-5, atol=1e-6)


def _safetensors(path) -> dict:
    from safetensors.torch import load_file
    return {k: v for f in path.glob("*.safetensors") for k, v in load_file(f).items()}


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_end_to_end_matches_transformers(family, tmp_path):
    hf = make_moe_model(family, norm_topk_prob=True)
    model = kvserve_model(save_hf_dir(hf, tmp_path / "hf"))
    diff = (paged_logits(model, IDS, chunk=5) - reference_logits(hf, IDS)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("chunk", [1, 7])
def test_native_decode_runs_int4_experts(tmp_path, chunk):
    """decode.c's router and grouped experts give the PyTorch layers' logits (one token a step, and
    chunks where several tokens share experts)."""
    from kvserve.native.decode import NativeDecoder
    hf = make_moe_model("mixtral", hidden_size=128, intermediate_size=64)
    model = kvserve_model(write_mixtral_gguf(hf, tmp_path / "mixtral-q4.gguf", "Q4_0"), "auto")
    if not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    expected = paged_logits(model, IDS, page_size=4, chunk=1)
    got = paged_logits(model, IDS, page_size=4, chunk=chunk, native_decode=True)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize("family", ["qwen3_moe", "olmoe"])
def test_native_decode_runs_qwen3_moe_and_olmoe(tmp_path, family):
    """decode.c over int4 experts with Qwen3-MoE's per-head q/k norms and renormalised top-k, and
    OLMoE's q/k norms over all heads."""
    from kvserve.native.decode import NativeDecoder
    hf = make_moe_model(family, hidden_size=128, intermediate_size=64, norm_topk_prob=family == "qwen3_moe")
    model = kvserve_model(save_hf_dir(hf, tmp_path / "hf"), "int4")
    if not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    expected = paged_logits(model, IDS, page_size=4, chunk=1)
    got = paged_logits(model, IDS, page_size=4, chunk=7, native_decode=True)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_config_fields_from_gguf_and_hf_metadata():
    from kvserve.model.moe import gguf_moe_fields, hf_moe_fields
    qwen3moe = {"qwen3moe.expert_count": 128, "qwen3moe.expert_used_count": 8, "qwen3moe.feed_forward_length": 6144,
                "qwen3moe.expert_feed_forward_length": 768}
    assert gguf_moe_fields(qwen3moe, "qwen3moe") == {"num_experts": 128, "num_experts_per_tok": 8,
                                                     "moe_intermediate_size": 768, "norm_topk_prob": True}
    assert gguf_moe_fields({"llama.feed_forward_length": 14336}, "llama") == {}  # a dense Llama
    with pytest.raises(ValueError, match="mlp_only_layers"):
        hf_moe_fields({"model_type": "qwen3_moe", "num_experts": 8, "num_experts_per_tok": 2,
                       "moe_intermediate_size": 32, "mlp_only_layers": [0]})


def test_compiled_forward_gives_eager_logits(mixtral_dir):
    """--compile: routing in the graph, the expert loops eager (a graph would recompile per expert)."""
    from engine.test_compiled_forward import Compiled
    model = kvserve_model(mixtral_dir)
    try:  # one token a step: one graph, whichever experts each step is routed to
        expected = paged_logits(model, IDS[:4], chunk=1)
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = paged_logits(Compiled(model), IDS[:4], chunk=1)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    finally:
        torch._dynamo.reset()
