"""Qwen3, Gemma 2, Gemma 3, Phi-3 and Mistral's sliding window against transformers on the same
random weights: the prompt in one pass, chunked prefill then decodes over small scattered pages
(the sequence is several windows long), and the same weights written as GGUF."""
import pytest
import torch

from kvserve.model.families import model_class
from kvserve.model.loader import load_checkpoint
from model.paged_forward import paged_logits
from tiny_models import make_family_model, save_hf_dir, write_family_gguf

IDS = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(1)).tolist()
LONGROPE = {"rope_type": "longrope", "short_factor": [1.0 + 0.3 * i for i in range(4)],
            "long_factor": [1.0 + 2.0 * i for i in range(4)]}
VARIANTS = {
    "qwen3": ("qwen3", dict(head_dim=32)),  # head_dim from the config, not hidden / heads
    # pattern 6 (transformers' default and llama.cpp's): layers 0-4 slide with the local RoPE base,
    # layer 5 is global with rope_theta and linear scaling
    "gemma3": ("gemma3", dict(num_hidden_layers=6, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                              tie_word_embeddings=True,
                              rope_parameters={"full_attention": {"rope_type": "linear", "factor": 8.0,
                                                                  "rope_theta": 1_000_000.0},
                                               "sliding_attention": {"rope_type": "default",
                                                                     "rope_theta": 10_000.0}})),
    # a score scale other than head_dim's, and layer_types given
    "gemma3-scale": ("gemma3", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=8,
                                    layer_types=["sliding_attention", "full_attention"])),
    # caps small enough to bite on random weights; tied, as Gemma 2 is (llama.cpp has no output tensor for it)
    "gemma2": ("gemma2", dict(num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                              tie_word_embeddings=True,
                              attn_logit_softcapping=1.0, final_logit_softcapping=1.0)),
    # the prompt stays within original_max_position_embeddings: short factors, attention factor of 256/64
    "phi3-longrope": ("phi3", dict(partial_rotary_factor=0.5, max_position_embeddings=256,
                                   original_max_position_embeddings=64, rope_scaling=dict(LONGROPE))),
    "phi3-window": ("phi3", dict(sliding_window=8)),
    "mistral": ("mistral", dict(sliding_window=8)),
}
GGUF_VARIANTS = ["qwen3", "gemma3", "gemma2", "phi3-longrope", "phi3-window"]


def reference_logits(hf_model, ids):
    with torch.no_grad():
        return hf_model(torch.tensor([ids])).logits[0]


def load(path):
    cfg, weights = load_checkpoint(str(path))
    return model_class(cfg).from_weights(cfg, weights)


def tiny(variant):
    arch, overrides = VARIANTS[variant]
    return make_family_model(arch, **overrides)


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """variant -> (transformers model, kvserve model loaded from its saved directory)."""
    cache = {}

    def get(variant):
        if variant not in cache:
            hf = tiny(variant)
            cache[variant] = hf, load(save_hf_dir(hf, tmp_path_factory.mktemp(variant)))
        return cache[variant]
    return get


def max_diff(ours, ref):
    return (ours - ref).abs().max().item()


@pytest.mark.parametrize("variant", VARIANTS)
def test_one_pass_matches_transformers(hf_models, variant):
    hf, model = hf_models(variant)
    assert max_diff(paged_logits(model, IDS), reference_logits(hf, IDS)) < 1e-4


@pytest.mark.parametrize("variant", VARIANTS)
def test_chunked_prefill_then_decodes_match_transformers(hf_models, variant):
    """Chunks of 13 and 6 over 4-token pages, then one token a step: windows (8) cut through
    pages and chunks alike."""
    hf, model = hf_models(variant)
    assert max_diff(paged_logits(model, IDS, page_size=4, chunk=[13, 6]), reference_logits(hf, IDS)) < 1e-4


@pytest.mark.parametrize("variant", GGUF_VARIANTS)
def test_gguf_f32_matches_transformers(tmp_path, variant):
    hf = tiny(variant)
    model = load(write_family_gguf(hf, tmp_path / f"{variant}.gguf"))
    assert model.config.architecture == VARIANTS[variant][0]
    assert max_diff(paged_logits(model, IDS, page_size=4, chunk=[13]), reference_logits(hf, IDS)) < 1e-4


def test_gguf_f16_gemma3_matches_transformers_on_same_file(tmp_path):
    """F16 weights: transformers dequantizes the same file (its GGUF loader knows gemma3) when it
    can, else runs the f16-rounded weights."""
    hf = tiny("gemma3")
    path = write_family_gguf(hf, tmp_path / "gemma3-f16.gguf", "F16")
    with torch.no_grad():
        for p in hf.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    assert max_diff(paged_logits(load(path), IDS), reference_logits(hf, IDS)) < 1e-4


def test_longrope_long_factors_match_transformers():
    """Past original_max_position_embeddings the table takes the long factors (transformers' choice
    for a sequence that long), scaled by the same attention factor."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    hf = tiny("phi3-longrope")
    cfg, _ = load_checkpoint(str(save_hf_dir(hf, __import__("pathlib").Path(__import__("tempfile").mkdtemp()))))
    from kvserve.model.llama import make_rope
    rope = make_rope(cfg, cfg.rope_theta, cfg.rope_scaling, None, "cpu")
    short, factor = ROPE_INIT_FUNCTIONS["longrope"](hf.config, "cpu")
    long, _ = ROPE_INIT_FUNCTIONS["longrope"](hf.config, "cpu", seq_len=65)
    for positions, inv_freq in ((torch.arange(0, 64), short), (torch.arange(64, 200), long)):
        expected = torch.outer(positions.float(), inv_freq.float())
        torch.testing.assert_close(rope.cos[positions], expected.cos() * factor)
        torch.testing.assert_close(rope.sin[positions], expected.sin() * factor)


def test_full_width_qk_norm_equals_per_head_norm_of_one_head():
    """OLMoE's q/k norm runs over all heads at once; with one head (and one KV head) that is the
    per-head norm of Qwen3, so the two paths must agree on the same weights."""
    hf = make_family_model("qwen3", num_attention_heads=1, num_key_value_heads=1, head_dim=32)
    import tempfile
    from pathlib import Path
    cfg, weights = load_checkpoint(str(save_hf_dir(hf, Path(tempfile.mkdtemp()))))
    per_head = model_class(cfg).from_weights(cfg, weights)
    cfg.qk_norm = "full"
    full = model_class(cfg).from_weights(cfg, weights)
    assert full.layers[0].self_attn.q_norm.weight.shape == (32,)
    assert max_diff(paged_logits(full, IDS), paged_logits(per_head, IDS)) < 1e-5
    assert max_diff(paged_logits(per_head, IDS), reference_logits(hf, IDS)) < 1e-4


def test_select_executor_gives_every_backend_the_windows_scale_and_softcap(hf_models):
    """Gemma 2's local and global layers are two KV groups of 2 layers: a backend per group, with
    the group's window on both slots of the pool's pages; the mistral variant is one group."""
    from kvserve.attention.grouped import GroupedAttention
    from kvserve.engine.executors import TorchExecutor, select_executor
    from kvserve.kv.groups import KVGroups
    from kvserve.kv.pool import PagePool
    _, model = hf_models("gemma2")
    cfg = model.config
    groups = KVGroups.from_windows(cfg.layer_windows())
    pool = PagePool(groups.slots, 8, 4, cfg.num_kv_heads, cfg.head_dim)
    executor = select_executor(model, pool, "cpu", groups=groups)
    assert isinstance(executor, TorchExecutor)  # decode.c knows Llama's layers only
    assert isinstance(executor.attention, GroupedAttention) and executor.num_groups == 2
    assert executor.attention.route[2] == (executor.attention.backends[0], 1)  # layer 2: local, slot 1
    for backend, window in zip(executor.attention.backends, [8, None]):
        assert backend.windows == [window] * 2 and backend.softcap == 1.0 and backend.scale == 16 ** -0.5
    _, model = hf_models("mistral")
    cfg = model.config
    executor = select_executor(model, PagePool(cfg.num_layers, 8, 4, cfg.num_kv_heads, cfg.head_dim), "cpu")
    executor = getattr(executor, "fallback", executor)
    for backend in (executor.attention, executor.policy_attention.dense):
        assert backend.windows == [8] * cfg.num_layers
