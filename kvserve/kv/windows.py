"""Sliding-window attention as KV memory sees it: each layer's window.

A layer with window W lets a query at position p read keys p-W+1..p only, so the pages wholly
before (next position - W + 1) are dead for that layer for good. kv/groups.py groups layers by
window, each group with its own page tables, so that a windowed group gives those pages back
while a global one (Gemma 3's) keeps its own."""


def kv_windows(model_config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from ModelConfig.layer_windows (a list,
    or a method returning one); a config without it is full attention everywhere."""
    windows = getattr(model_config, "layer_windows", None)
    windows = windows() if callable(windows) else windows
    return list(windows) if windows else [None] * model_config.num_layers
