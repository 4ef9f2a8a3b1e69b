"""`kvserve serve` flags for tenant isolation and overload, kept in one place."""
import argparse

from kvserve.engine.admission import QueueLimits


def add_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("isolation and overload")
    g.add_argument("--prefix-cache-isolation", choices=["none", "per-key"], default="none",
                   help="per-key: requests share prefix-cache pages only with requests of the same API key")
    g.add_argument("--max-queued-requests", type=_positive(int), default=None,
                   help="prompts waiting to be scheduled before new requests get 429; a batch of prompts is queued "
                        "whole or not at all (default: unlimited)")
    g.add_argument("--max-queued-tokens", type=_positive(int), default=None,
                   help="prompt tokens waiting to be scheduled before new requests get 429 (default: unlimited)")
    g.add_argument("--queue-timeout", type=_positive(float), default=None,
                   help="seconds a request may wait to be scheduled before it gets 503 (default: none)")


def queue_limits(args) -> QueueLimits:
    return QueueLimits(args.max_queued_requests, args.max_queued_tokens, args.queue_timeout)


def _positive(kind):
    def parse(value: str):
        try:
            x = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None
        if not x > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
        return x
    return parse
