"""The static-buffer decode executor: on a GPU, each decode step is one CUDA graph replay.

Python launches a few hundred kernels per decode step, which leaves a GPU idle most of the time.
Decode-only steps (one token per sequence, full attention) are padded to a bucket size (1, 2, 4 ...
up to max_num_seqs) and run on buffers allocated once; on CUDA each bucket's forward is captured
at start-up and replayed. Steps with a prompt chunk or a sparse-policy decode run on `fallback`.
On the CPU the same buffers run eagerly, which is how the tests check it against the dynamic path.
"""
import time

import torch

from kvserve.attention.static_decode import StaticDecodeAttention
from kvserve.engine.executors import StepBatch
from kvserve.kv.groups import KVGroups
from kvserve.kv.windows import kv_windows
from kvserve.native.lists import int_tensor


def bucket_sizes(max_batch: int) -> list[int]:
    sizes = [1]
    while sizes[-1] < max_batch:
        sizes.append(min(2 * sizes[-1], max_batch))
    return sizes


class StaticDecodeExecutor:
    def __init__(self, model, pool, fallback, max_batch: int, max_len: int, use_graphs: bool = False,
                 attention_cls=StaticDecodeAttention, attention_kwargs: dict | None = None,
                 groups: KVGroups | None = None, buckets: list[int] | None = None):
        """groups: the pool's KV groups (default: the engine's, from the model's windows), one block
        table each in the static buffers. buckets: the batch sizes padded to (default bucket_sizes)."""
        self.model, self.fallback = model, fallback
        self.buckets = buckets or bucket_sizes(max_batch)
        cfg, device = model.config, pool.k.device
        self.scratch_page = pool.reserve()  # padding rows write here
        self.max_pages = -(-max_len // pool.page_size)
        # attention_kwargs: scale, windows, softcap, as every attention backend takes them
        self.attention = attention_cls(pool, cfg.num_heads, cfg.head_dim, max_batch, self.max_pages, self.scratch_page,
                                       **(attention_kwargs or {}),
                                       groups=groups or KVGroups.from_windows(kv_windows(cfg)))
        self.ids = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.positions = torch.zeros(max_batch, dtype=torch.long, device=device)
        self.graphs, self.outputs = {}, {}
        if use_graphs:
            self._capture()

    def takes(self, batch: StepBatch) -> bool:
        n = len(batch.ids)
        return (not batch.sparse and len(batch.scheduled) == n == len(batch.last_rows)
                and n <= self.buckets[-1] and max(batch.kv_lens) <= self.max_pages * self.attention.pool.page_size
                and not self.attention.prefers_eager(batch.kv_lens))

    def execute(self, batch: StepBatch) -> torch.Tensor:
        if not self.takes(batch):
            return self.fallback.execute(batch)
        n = len(batch.ids)
        bucket = next(b for b in self.buckets if b >= n)
        pad = [0] * (bucket - n)
        batch.carry_into(self.ids[:bucket].copy_(int_tensor(batch.ids + pad), non_blocking=True))
        self.positions[:bucket].copy_(int_tensor(batch.positions + pad), non_blocking=True)
        self.attention.plan([seq.tables for seq, _ in batch.scheduled], batch.kv_lens, bucket)
        if bucket in self.graphs:
            self.graphs[bucket].replay()
            return self.outputs[bucket][:n]
        return self.model(self.ids[:bucket], self.positions[:bucket], self.attention)[:n]

    @torch.inference_mode()
    def _capture(self) -> None:
        """One graph per bucket, largest first, sharing one memory pool."""
        start = time.perf_counter()
        mempool = torch.cuda.graph_pool_handle()
        for bucket in reversed(self.buckets):
            self.attention.plan([], [], bucket)  # every row padding: the capture writes the scratch page
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # a warm-up run outside the graph, as capture requires
                self.model(self.ids[:bucket], self.positions[:bucket], self.attention)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=mempool):
                self.outputs[bucket] = self.model(self.ids[:bucket], self.positions[:bucket], self.attention)
            self.graphs[bucket] = graph
        torch.cuda.synchronize()
        print(f"captured {len(self.graphs)} CUDA graphs (batch {self.buckets[0]}-{self.buckets[-1]}) "
              f"in {time.perf_counter() - start:.1f}s", flush=True)
