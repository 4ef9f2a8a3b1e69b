"""StreamingLLM's attention sinks: the first `sink` tokens plus a window of the latest ones.

Keys keep the rotary positions they were written with; only which keys are read changes. The pages
wholly between the sinks and the window are never read again, so they go back to the pool."""
import torch


def kept_positions(kv_len: int, sink: int, window: int) -> torch.Tensor:
    """KV positions a decode at kv_len - 1 attends to (the new token is always among them), on the
    CPU: the page table that maps them to slots is there."""
    head = min(sink, kv_len)
    tail = max(head, kv_len - max(window, 1))
    return torch.cat([torch.arange(head, device="cpu"), torch.arange(tail, kv_len, device="cpu")])


def droppable_pages(next_kv_len: int, sink: int, window: int, page_size: int) -> range:
    """Logical pages no decode from next_kv_len on will read: after the sink pages, before the window."""
    first = -(-sink // page_size)
    end = max(0, next_kv_len - max(window, 1)) // page_size
    return range(first, max(first, end))
