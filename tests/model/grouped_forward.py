"""Runs a model with sliding-window layers over per-group page tables, chunk by chunk, the way the
engine does: the KVCacheManager allocates each group's pages and gives back those behind each
windowed group's window after every chunk. Pages given back are filled with NaN (and re-zeroed
when handed out again), so a backend that reads one spoils the logits."""
import torch

from kvserve.attention.grouped import GroupedAttention
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.torch_ref import TorchRefAttention
from kvserve.engine.executors import attention_kwargs
from kvserve.engine.request import SamplingParams, Sequence
from kvserve.kv.groups import KVGroups
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.pool import PagePool
from tiny_models import make_family_model

W, PAGE = 8, 4
# 5 local and 2 global layers: groups of 2 layers, the last local group one layer short
LAYER_TYPES = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
               "sliding_attention", "sliding_attention", "full_attention"]
ROPE = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}


def make_grouped_gemma3():
    """A tiny random Gemma 3 (transformers) with window W: layers [0, 1], [3, 4], [5] local, [2, 6] global."""
    return make_family_model("gemma3", num_hidden_layers=7, layer_types=LAYER_TYPES, head_dim=16,
                             query_pre_attn_scalar=16, sliding_window=W, tie_word_embeddings=True,
                             rope_parameters=ROPE)


def window_bound(groups: KVGroups, kv_len: int, page_size: int) -> int:
    """Pages a sequence of kv_len tokens may hold after a release: every page for a global group,
    the window's pages (over page boundaries) and the next token's page for a windowed one."""
    return sum(-(-kv_len // page_size) if w is None else min(-(-kv_len // page_size), -(-w // page_size) + 1)
               for w in groups.windows)


def grouped_logits(model, ids: list[int], page_size: int, chunk: list[int] | None = None,
                   backend_cls=TorchRefAttention, backend_kwargs=None, held: list | None = None) -> torch.Tensor:
    """Logits at every position of ids: chunks of the given sizes (default: one pass), then one
    token a step. held: gets (kv_len, pages held) after each chunk, counted from the pool."""
    cfg = model.config
    device = next(model.parameters()).device
    groups = KVGroups.from_windows(cfg.layer_windows())
    pool = PagePool(groups.slots, len(groups) * (-(-len(ids) // page_size)) + 4, page_size, cfg.num_kv_heads,
                    cfg.head_dim, model.dtype, device)
    kv = KVCacheManager(pool, enable_prefix_caching=False, groups=groups)
    kwargs = attention_kwargs(cfg) | (backend_kwargs or {})
    attn = GroupedAttention([backend_cls(pool, cfg.num_heads, cfg.head_dim, **(kwargs | dict(windows=[w] * groups.slots)))
                             for w in groups.windows], groups)
    seq = Sequence(0, "r", 0, ids, SamplingParams(), 0.0)
    sizes = (chunk or [len(ids)]) + [1] * len(ids)
    out = []
    with torch.inference_mode():
        for size in sizes:
            start = seq.num_computed_tokens
            end = min(start + size, len(ids))
            if start == end:
                break
            assert kv.allocate(seq, end)
            attn.plan(*(AttentionMetadata.build([end - start], [table], [end], page_size) for table in seq.tables))
            hidden = model(torch.tensor(ids[start:end], device=device), torch.arange(start, end, device=device), attn)
            out.append(model.compute_logits(hidden))
            seq.num_computed_tokens = end
            before = {p for table in seq.tables for p in table if p >= 0}
            kv.release_windows(seq)
            for p in before - {p for table in seq.tables for p in table if p >= 0}:
                pool.k[:, :, p * page_size:(p + 1) * page_size] = float("nan")
                pool.v[:, :, p * page_size:(p + 1) * page_size] = float("nan")
                pool.zeroed[p] = False
            if held is not None:
                held.append((end, pool.num_pages - pool.num_free))
            kv.check_integrity([seq])
    return torch.cat(out)
