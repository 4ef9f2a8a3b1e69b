"""kvserve's decoder against transformers on the same random weights, from safetensors and GGUF."""
import pytest
import torch

from kvserve.model.llama import LlamaForCausalLM
from kvserve.model.loader import load_checkpoint
from kvserve.model.quant import QuantizedEmbedding
from model.paged_forward import paged_logits
from tiny_models import make_hf_model, save_hf_dir, write_gguf

IDS = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(1)).tolist()
ROPE_VARIANTS = {
    "llama": {},
    "qwen2": {},
    "llama-linear": {"rope_scaling": {"rope_type": "linear", "factor": 4.0}},
    "llama-llama3": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}},
    "llama-tied": {"tie_word_embeddings": True},
}


def reference_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


def kvserve_model(path):
    cfg, weights = load_checkpoint(str(path))
    return LlamaForCausalLM.from_weights(cfg, weights)


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_safetensors_matches_transformers(tmp_path, variant):
    hf = make_hf_model(variant.split("-")[0], **ROPE_VARIANTS[variant])
    model = kvserve_model(save_hf_dir(hf, tmp_path / "hf"))
    diff = (paged_logits(model, IDS) - reference_logits(hf, IDS)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gguf_f32_matches_transformers(tmp_path, arch):
    hf = make_hf_model(arch)
    model = kvserve_model(write_gguf(hf, tmp_path / "tiny.gguf"))
    diff = (paged_logits(model, IDS) - reference_logits(hf, IDS)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0"])
def test_quantized_gguf_matches_transformers_on_same_file(tmp_path, qtype):
    """Both sides dequantize the same file, so they must agree as closely as fp32 allows."""
    from transformers import AutoModelForCausalLM
    hf = make_hf_model("llama", hidden_size=128, intermediate_size=256)
    path = write_gguf(hf, tmp_path / f"tiny-{qtype}.gguf", qtype)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    diff = (paged_logits(kvserve_model(path), IDS) - reference_logits(ref, IDS)).abs().max().item()
    assert diff < 1e-4, diff


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_paged_decode_equals_one_full_forward(tmp_path, page_size, chunk):
    model = kvserve_model(save_hf_dir(make_hf_model("llama"), tmp_path / "hf"))
    full = paged_logits(model, IDS, page_size=16, shuffle_pages=False)
    paged = paged_logits(model, IDS, page_size=page_size, chunk=chunk)
    assert (paged - full).abs().max().item() < 1e-4


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("arch,qtype", [("llama", "Q4_0"), ("llama", "Q4_1"), ("qwen2", "Q4_1"), ("llama", "Q8_0")])
def test_weights_kept_quantized_match_transformers_on_same_file(tmp_path, arch, qtype):
    """int4 / int8 kernels with bf16 activations against transformers dequantizing the same file
    in fp32: only bf16 rounding separates them."""
    from transformers import AutoModelForCausalLM
    hf = make_hf_model(arch, hidden_size=128, intermediate_size=256, tie_word_embeddings=arch == "llama")
    path = write_gguf(hf, tmp_path / f"tiny-{qtype}.gguf", qtype)
    ref = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32)
    cfg, weights = load_checkpoint(str(path), "auto")
    model = LlamaForCausalLM.from_weights(cfg, weights, torch.bfloat16)
    kind = "int4" if qtype.startswith("Q4") else "int8"
    assert model.layers[0].self_attn.qkv_proj.kind == kind
    assert model.layers[1].mlp.gate_up_proj.kind == kind
    if model.lm_head_rows.kind != kind:  # a 4-bit table stays int4 where the int4 kernels take it
        assert kind == "int4" and not QuantizedEmbedding.int4_fits(weights["model.embed_tokens.weight"])
    ours, expected = paged_logits(model, IDS), reference_logits(ref, IDS)
    assert relative_error(ours, expected) < 2e-2
    assert (ours.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_float_checkpoint_quantized_at_load(tmp_path, mode):
    """The reference is transformers running the very weights our quantizer produced."""
    hf = make_hf_model("qwen2", hidden_size=128, intermediate_size=256)
    cfg, weights = load_checkpoint(str(save_hf_dir(hf, tmp_path / "hf")), mode)
    model = LlamaForCausalLM.from_weights(cfg, weights, torch.bfloat16)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            w = weights[name]
            p.copy_(w if isinstance(w, torch.Tensor) else w.dequantize())
    assert relative_error(paged_logits(model, IDS), reference_logits(hf, IDS)) < 2e-2
