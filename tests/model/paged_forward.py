"""Runs a model over a paged cache in chunks, the way the engine does, without the engine."""
import random

import torch

from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.torch_ref import TorchRefAttention
from kvserve.engine.executors import attention_kwargs
from kvserve.kv.pool import PagePool
from kvserve.native.decode import NativeDecoder


def paged_logits(model, ids: list[int], page_size: int = 16, chunk: int | list[int] | None = None,
                 shuffle_pages: bool = True, native_decode: bool = False) -> torch.Tensor:
    """Logits at every position of ids, computed chunk by chunk over non-contiguous pages;
    chunk: a size, or the sizes of the first chunks (then one token a step: decodes);
    native_decode: chunks through kvserve/native/decode.c, as the engine's single stream."""
    cfg = model.config
    num_pages = -(-len(ids) // page_size)
    pool = PagePool(cfg.num_layers, 2 * num_pages + 3, page_size, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    pages = pool.allocate(pool.num_pages)
    if shuffle_pages:
        random.Random(0).shuffle(pages)
    pages = pages[:num_pages]
    attn = TorchRefAttention(pool, cfg.num_heads, cfg.head_dim, **attention_kwargs(cfg))
    sizes = chunk if isinstance(chunk, list) else [chunk or len(ids)] * len(ids)
    sizes = sizes + [1] * len(ids)
    starts = [0]
    while starts[-1] < len(ids):
        starts.append(starts[-1] + sizes[len(starts) - 1])
    decoder = NativeDecoder(model, pool) if native_decode else None
    out = []
    with torch.inference_mode():
        for start, end in zip(starts, starts[1:]):
            end = min(end, len(ids))
            if decoder:
                hidden = decoder(ids[start:end], list(range(start, end)), pages, [0] * (end - start))
            else:
                attn.plan(AttentionMetadata.build([end - start], [pages], [end], page_size))
                hidden = model(torch.tensor(ids[start:end]), torch.arange(start, end), attn)
            out.append(model.compute_logits(hidden))
    return torch.cat(out)
