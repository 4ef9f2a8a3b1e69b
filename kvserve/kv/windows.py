"""Sliding-window attention as KV memory sees it: which pages no layer will read again.

A layer with window W lets a query at position p read keys p-W+1..p only. Where every layer has
one, pages wholly before (next position - largest window + 1) are dead for good and can go back to
the pool, as streaming attention's are. Where some layers read everything (Gemma 3's global
layers), one page table serves all layers and nothing can go."""


def kv_windows(model_config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), from ModelConfig.layer_windows (a list,
    or a method returning one); a config without it is full attention everywhere."""
    windows = getattr(model_config, "layer_windows", None)
    windows = windows() if callable(windows) else windows
    return list(windows) if windows else [None] * model_config.num_layers


def shared_window(windows: list[int | None]) -> int | None:
    """The span every layer's reads fit in (the largest window), or None where a layer has none."""
    return None if not windows or None in windows else max(windows)
