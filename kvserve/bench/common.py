"""Shared pieces of the benchmarks: the standard workload and the result table."""
import json
import random
from dataclasses import asdict, dataclass


def random_prompts(num: int, input_len: int, vocab_size: int, seed: int = 0,
                   shared_prefix: int = 0) -> list[list[int]]:
    """Random token prompts (throughput does not depend on which tokens); with shared_prefix,
    every prompt starts with the same shared_prefix tokens."""
    rng = random.Random(seed)
    lo, hi = 100, vocab_size - 100
    prefix = [rng.randrange(lo, hi) for _ in range(shared_prefix)]
    return [prefix + [rng.randrange(lo, hi) for _ in range(input_len)] for _ in range(num)]


@dataclass
class ThroughputResult:
    engine: str
    requests: int
    input_tokens: int
    output_tokens: int
    seconds: float

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds

    @property
    def input_tok_per_s(self) -> float:
        return self.input_tokens / self.seconds

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.seconds


def print_table(results: list[ThroughputResult], baseline: str) -> None:
    base = next(r for r in results if r.engine == baseline)
    print(f"{'engine':<28}{'req/s':>9}{'in tok/s':>11}{'out tok/s':>11}{'seconds':>9}  vs {baseline}")
    for r in results:
        ratio = r.output_tok_per_s / base.output_tok_per_s
        print(f"{r.engine:<28}{r.requests_per_s:>9.2f}{r.input_tok_per_s:>11.1f}{r.output_tok_per_s:>11.1f}"
              f"{r.seconds:>9.1f}  {ratio:.2f}x")


def to_json(results: list[ThroughputResult], **extra) -> str:
    return json.dumps({"results": [asdict(r) | {"output_tok_per_s": r.output_tok_per_s} for r in results]} | extra)
