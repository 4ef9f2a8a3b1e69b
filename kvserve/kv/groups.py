"""KV groups: layers that share a page table, so that windowed layers can give pages back while
global layers keep theirs (vLLM's hybrid KV cache manager, in small).

Layers are grouped by their sliding window (None: full attention) into groups of equal size, all
drawing pages from one pool whose page holds `slots` layers' K/V: layer l lives in slot
`slot_of[l]` of the pages of group `group_of[l]`, and each sequence has one page table per group.
Gemma 3's 5 local : 1 global layers make 6 groups of 3 layers (18 layers) in a 3-layer-per-page
pool; the 5 local groups hold about window / page_size pages each, the global one every page.
A model whose layers all share one window (Mistral) or none is a single group of all layers:
the pool and page table of a plain model."""
from dataclasses import dataclass


@dataclass(frozen=True)
class KVGroups:
    windows: list  # per group: its layers' sliding window, or None
    layers: list  # per group: its model layers, in slot order (the last group of a window may be short)
    slots: int  # layers per page

    @classmethod
    def from_windows(cls, windows: list) -> "KVGroups":
        by_window: dict = {}
        for layer, w in enumerate(windows):
            by_window.setdefault(w, []).append(layer)
        # as many layers per page as the rarest window has: no group holds two windows, and the
        # padding (slots a short group leaves unused) stays under one group per window
        size = min(len(layers) for layers in by_window.values())
        groups = [(w, layers[i:i + size]) for w, layers in by_window.items() for i in range(0, len(layers), size)]
        return cls([w for w, _ in groups], [layers for _, layers in groups], size)

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def group_of(self) -> list[int]:
        return [g for _, g in sorted((l, g) for g, layers in enumerate(self.layers) for l in layers)]

    @property
    def slot_of(self) -> list[int]:
        return [s for _, s in sorted((l, s) for layers in self.layers for s, l in enumerate(layers))]


def behind_window(next_kv_len: int, window: int | None, page_size: int) -> range:
    """Logical pages wholly before the window of every query from position next_kv_len - 1 on:
    a layer with that window never reads them again."""
    if window is None:
        return range(0)
    return range(max(0, next_kv_len - window) // page_size)
