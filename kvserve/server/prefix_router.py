"""Which data-parallel replica gets a prompt: the one holding the longest cached prefix of it
(SGLang's cache-aware routing idea), among equals the least loaded.

The router never asks the replicas what they cache: it remembers what it sent each one, as
chained hashes of page-sized token blocks (a block's hash covers every token before it, as the
engines' own page keys do), in a bounded LRU per replica. It is approximate on purpose: a replica
may have evicted a block the router still credits it with; that only costs a cache miss.
"""
from collections import OrderedDict
from dataclasses import dataclass, field


def block_hashes(ids: list[int], block: int) -> list[int]:
    """One hash per full block of `block` tokens, each covering the whole prefix up to it."""
    out, h = [], 0
    for i in range(0, len(ids) - block + 1, block):
        h = hash((h, tuple(ids[i:i + block])))
        out.append(h)
    return out


@dataclass
class ReplicaState:
    blocks: OrderedDict = field(default_factory=OrderedDict)  # prefix block hash -> None, LRU order
    load_tokens: int = 0  # prompt + max new tokens of the requests in flight there
    sent: int = 0  # requests sent, for spreading equal choices
    prefix_hit_tokens: int = 0  # prompt tokens routed to a replica that had them (router's view)


class PrefixRouter:
    def __init__(self, num_replicas: int, block: int = 16, max_blocks: int = 200_000):
        self.replicas = [ReplicaState() for _ in range(num_replicas)]
        self.block, self.max_blocks = block, max_blocks

    def choose(self, ids: list[int]) -> tuple[int, int]:
        """(replica, prompt tokens it is expected to hold already)."""
        hashes = block_hashes(ids, self.block)

        def matched(r: ReplicaState) -> int:
            n = 0
            for h in hashes:
                if h not in r.blocks:
                    break
                n += 1
            return n

        scores = [(-matched(r), r.load_tokens, r.sent, i) for i, r in enumerate(self.replicas)]
        best = min(scores)
        return best[3], -best[0] * self.block

    def start(self, replica: int, ids: list[int], max_new_tokens: int, hit_tokens: int) -> int:
        """Records a request sent to `replica`; returns the load to pass to `finish`."""
        r = self.replicas[replica]
        for h in block_hashes(ids, self.block):
            r.blocks[h] = None
            r.blocks.move_to_end(h)
        while len(r.blocks) > self.max_blocks:
            r.blocks.popitem(last=False)
        load = len(ids) + max_new_tokens
        r.load_tokens += load
        r.sent += 1
        r.prefix_hit_tokens += hit_tokens
        return load

    def finish(self, replica: int, load: int) -> None:
        self.replicas[replica].load_tokens -= load
