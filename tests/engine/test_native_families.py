"""kvserve/native/decode.c on Qwen3 (per-head q/k RMSNorm before RoPE), Phi-3 (fused q/k/v and
gate/up tensors, longrope, a sliding window, partial rotary) and Gemma 2 (attention softcapping, alternating windows)
from GGUF files, against
transformers on the file's values and against PyTorch's layers on the same quantized weights."""
import functools

import pytest
import torch

from engine.test_native_gemma3 import EXACT, IDS, file_models
from model.paged_forward import paged_logits
from tiny_models import make_family_model

LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(8)],
            "long_factor": [1.0 + 2.0 * i for i in range(8)]}
VARIANTS = {
    "qwen3": ("qwen3", dict(head_dim=32)),
    # within original_max_position_embeddings (as tests/model/test_families.py): short factors, attention factor
    "phi3-longrope": ("phi3", dict(max_position_embeddings=256, original_max_position_embeddings=64,
                                   rope_scaling=dict(LONGROPE))),
    "phi3-window": ("phi3", dict(sliding_window=8)),
    "phi3-partial": ("phi3", dict(partial_rotary_factor=0.5)),  # Phi-4-mini rotates 3/4 of each head
    # caps small enough to bite on random weights, alternating windowed and global layers
    "gemma2": ("gemma2", dict(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=32, sliding_window=8,
                              tie_word_embeddings=True, attn_logit_softcapping=1.0, final_logit_softcapping=1.0)),
}


@functools.cache
def models(variant: str, qtype: str):
    arch, overrides = VARIANTS[variant]
    return file_models(make_family_model(arch, **overrides), variant, qtype)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("chunk", [[13, 6], 40])  # chunks then decodes; one pass
def test_native_step_matches_transformers(variant, chunk):
    hf, model = models(variant, "Q8_0")
    with torch.no_grad():
        expected = hf(torch.tensor([IDS])).logits[0]
    got = paged_logits(model, IDS, page_size=4, chunk=chunk, native_decode=True)
    assert (got - expected).abs().max().item() < 2e-3  # activations as two int8 digits a group
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("qtype", EXACT[:1] + ["Q4_0"])
def test_native_step_matches_the_torch_layers(variant, qtype):
    """The same model through PyTorch's layers (the executor's fallback for sparse policies)."""
    _, model = models(variant, qtype)
    torch_path = paged_logits(model, IDS, page_size=4, chunk=[13, 6])
    native = paged_logits(model, IDS, page_size=4, chunk=[13, 6], native_decode=True)
    assert (native - torch_path).abs().max().item() < 2e-3
    assert torch.equal(native.argmax(-1), torch_path.argmax(-1))
