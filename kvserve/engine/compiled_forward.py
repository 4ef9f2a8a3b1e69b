"""`--compile`: the decoder through torch.compile, the CPU's stand-in for CUDA graphs.

Inductor fuses the norms, rotary embedding, residual adds and gating into a few C++ loops and
drops most per-op Python, which is a third of a single-stream decode step. Attention stays one
opaque custom op that calls the step's planned backend, so its Python plan never enters the
graph and one compiled graph serves every step of the same shape class."""
import time

import torch
from tqdm import tqdm

from kvserve.engine.request import SamplingParams

_backend = None  # the attention backend planned for the current step


# a plain Library op: its dispatch costs ~5 us less a call than torch.library.custom_op's wrapper
_lib = torch.library.Library("kvserve", "DEF")
_lib.define("paged_attention(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    # writes k/v into the KV pool, which no compiled code reads, so no mutation is declared
    return _backend.run(layer, q, k, v)


_lib.impl("paged_attention", _paged_attention, "CPU")
_lib.impl("paged_attention", _paged_attention, "CUDA")


@torch.library.register_fake("kvserve::paged_attention")
def _(q, k, v, layer):
    return torch.empty_like(q)


class _OpaqueAttention:
    def run(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return torch.ops.kvserve.paged_attention(q, k, v, layer)


def compile_forward(model):
    """model(ids, positions, attention) with the same signature, compiled on first use (tens of
    seconds on 2 cores each): one graph for one-token steps, one with a symbolic token count for
    the rest. The one-token graph has static shapes, since checking symbolic-shape guards costs
    ~0.7 ms a call, a tenth of a single-stream step."""
    opaque = _OpaqueAttention()
    # one compiled engine per process: graphs of an earlier model would match this one's calls
    # once guards are skipped
    torch.compiler.set_stance("default", skip_guard_eval_unsafe=False)
    torch._dynamo.reset()

    # two functions, not one compiled twice: dynamo keeps its graphs per code object and would
    # check both graphs' guards on every call
    def run_one(ids, positions):
        return model(ids, positions, opaque)

    def run_many(ids, positions):
        return model(ids, positions, opaque)
    # freezing: weights become constants of the graph, so they are neither inputs nor guarded
    torch._inductor.config.freezing = True
    one_token = torch.compile(run_one, dynamic=False)
    many_tokens = torch.compile(run_many, dynamic=True)

    def forward(ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
        global _backend
        _backend = attention
        return (one_token if len(ids) == 1 else many_tokens)(ids, positions)
    return forward


def warm_up(engine) -> None:
    """Compiles every graph before the first request: a prompt long enough for the unpacked-weight
    path, its one-token decode steps, and a short prompt. Then guards are no longer evaluated
    (they cost ~0.6 ms a call); dynamo still tells its cached graphs apart, and nothing else
    about the inputs can change."""
    start = time.perf_counter()
    token = engine.eos_token_ids[0] if engine.eos_token_ids else 0
    warm_ups = ((min(300, engine.max_model_len - 4), 2), (2, 1))  # (prompt tokens, output tokens)
    for prompt_len, max_tokens in tqdm(warm_ups, desc="compiling the decoder", unit="request", disable=None):
        rid = engine.add_request([token] * prompt_len,
                                 SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                                                attention="full"))
        while rid in engine.requests:
            engine.step()
    if engine.kv.prefix:
        engine.kv.prefix.clear()
        engine.kv.prefix.queried_tokens = engine.kv.prefix.hit_tokens = 0
    engine.runner.num_tokens_run = 0
    torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)
    tqdm.write(f"compiled the decoder in {time.perf_counter() - start:.0f}s")
