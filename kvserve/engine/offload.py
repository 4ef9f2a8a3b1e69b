"""MagicPIG with offload, the engine's part: its pools, which requests may use it, and the copies of
K/V rows into the offload pools (before a step those a sequence took from the prefix cache, after it
the new ones) with the release of the main-pool pages that decodes then read from there (the sampled
layers from CPU memory, the dense layers from the dense pool)."""
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.offload_pools import OffloadPools


def build_offload_pools(policy, model_config, cache_config, dtype, device, available_ram: int) -> OffloadPools:
    mc = model_config
    host_bytes, _ = OffloadPools.bytes_per_page(mc.num_layers, policy.dense_layers, cache_config.page_size,
                                                mc.num_kv_heads, mc.head_dim, dtype)
    pages = cache_config.offload_pages
    if pages is None:
        # default: half the free RAM, at most 64 GiB (pinning memory beside a GPU takes seconds per 10 GiB)
        budget = (cache_config.offload_kv_gb * 2**30 if cache_config.offload_kv_gb is not None
                  else min(available_ram / 2, 64 * 2**30))
        pages = max(1, int(budget // max(1, host_bytes)))
    return OffloadPools(mc.num_layers, policy.dense_layers, pages, cache_config.page_size, mc.num_kv_heads,
                        mc.head_dim, dtype, device)


def check_offload(policy, pools: OffloadPools | None, n: int) -> None:
    """A request may offload when the engine was started with offload and the same dense layers."""
    if not policy.offload:
        return
    if pools is None:
        raise ValueError("attention offload needs the engine started with it (--attention magicpig:offload=true)")
    layers = pools.host_index.keys() | pools.dense_index.keys()
    if tuple(sorted({i for i in policy.dense_layers if i in layers})) != pools.dense_layers:
        raise ValueError(f"attention offload: dense_layers must be the engine's {list(pools.dense_layers)}")
    if n > 1:
        raise ValueError("attention offload takes n=1")


def stage_computed(kv: KVCacheManager, scheduled) -> None:
    """Each offloaded sequence's computed rows not staged yet go to the offload pools: before a step
    those it took from the prefix cache (a preempted sequence readmitted with every computed token
    cached decodes in that very step, sampling them), after it the new ones."""
    if kv.offload is None:
        return
    for seq, _ in scheduled:
        if seq.offload is not None and not seq.finished:
            kv.offload.stage(kv.pool, seq.pages, seq.offload, seq.num_computed_tokens)


def sync_offloaded(kv: KVCacheManager, scheduled) -> None:
    """After a step: stage_computed; once only decodes are left, a sequence's main-pool pages between
    the sinks and the sampled range's end are given back."""
    stage_computed(kv, scheduled)
    if kv.offload is None:
        return
    page = kv.page_size
    for seq, _ in scheduled:
        if seq.offload is None or seq.finished or len(seq.token_ids) - seq.num_computed_tokens > 1:
            continue
        p = seq.policy
        next_len = seq.num_computed_tokens + 1
        # as PolicyAttention plans it: positions [sink, end) are sampled, or read from the dense pool
        end = min(seq.num_prompt_tokens, next_len - p.window, next_len - 1)
        kv.release_pages(seq, range(-(-p.sink // page), max(0, end) // page))
