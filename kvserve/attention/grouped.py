"""GroupedAttention: one dense backend per KV group (kvserve/kv/groups.py) over the same pool.

plan(*metas) takes one AttentionMetadata per group (the same requests and lengths, each group's
own page table) and plans each group's backend once per step; run(layer, ...) per layer hands the
layer to its group's backend at the layer's slot in the pool's pages. The backends themselves are
the plain ones (TorchRefAttention, TritonAttention), built with the group's window on every slot."""
from kvserve.kv.groups import KVGroups


class GroupedAttention:
    def __init__(self, backends: list, groups: KVGroups):
        assert len(backends) == len(groups)
        self.backends = backends
        self.groups = groups
        self.route = [(backends[g], s) for g, s in zip(groups.group_of, groups.slot_of)]

    def plan(self, *metas) -> None:
        for backend, meta in zip(self.backends, metas, strict=True):
            backend.plan(meta)

    def run(self, layer: int, q, k, v):
        backend, slot = self.route[layer]
        return backend.run(slot, q, k, v)
