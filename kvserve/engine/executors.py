"""Executors: how one device runs a step's forward. The engine picks one at start
(`select_executor`) rather than branching inside every step.

- `TorchExecutor`: PyTorch ops on any device; attention through the planned backend, non-full
  decodes through PolicyAttention, optionally torch.compile'd.
- `NativeExecutor`: the CPU with int4 / int8-group weights: a step is one C call
  (kvserve/native/decode.c; on a tensor-parallel rank, its shard, with the all-reduces called back
  between layers); sparse-policy decodes' attention in the global layers is called back into
  PolicyAttention.run_rows, the rest of their layers stay in C. Tensor-parallel ranks and MagicPIG
  offload send a step with a policy decode to the TorchExecutor.
- `StaticDecodeExecutor` (static_executor.py): CUDA with triton, unless enforce_eager:
  decode-only steps replay a CUDA graph captured per batch bucket (Triton decode over static
  buffers); other steps go to its TorchExecutor, whose dense attention is TritonAttention.
"""
import os
from dataclasses import dataclass, field

import torch

from kvserve.attention.grouped import GroupedAttention
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.sparse.backend import PolicyAttention
from kvserve.attention.torch_ref import TorchRefAttention
from kvserve.attention.triton import available as triton_available
from kvserve.engine.prompt_logprobs import PromptSpan
from kvserve.engine.request import Sequence
from kvserve.kv.groups import KVGroups
from kvserve.kv.windows import kv_windows
from kvserve.native.decode import NativeDecoder
from kvserve.native.lists import on_device


@dataclass
class StepBatch:
    """The step's tokens flattened in schedule order, built once for whichever executor runs it."""
    scheduled: list[tuple[Sequence, int]]  # (sequence, tokens run this step)
    ids: list[int]
    positions: list[int]
    q_lens: list[int]
    kv_lens: list[int]  # per sequence, this step's tokens included
    last_rows: list[int]  # rows whose hidden states are returned (ascending): each sampled sequence's
    # last token, and the prompt rows of sequences that score their prompt (prompt_spans)
    sampled: list[Sequence]  # the sequences that sample this step
    sparse: list[int]  # indices into scheduled of decodes under a non-full attention policy
    prompt_spans: list[PromptSpan] = field(default_factory=list)
    sample_index: list[int] | None = None  # where each sampled row is in last_rows; None: last_rows are all
    carried: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (rows, their ids' rows, ids): carry()

    def carry(self, pending_ids: torch.Tensor) -> None:
        """Each sequence with a pending token takes it from pending_ids (the previous step's sampled
        ids) at its pending_row: into self.ids at once where they are on the CPU (no wait there), else
        by an indexed copy on their device when the executor makes its input (carry_into)."""
        rows, src, at = [], [], 0
        for seq, n in self.scheduled:
            if seq.num_pending:  # a decode: one row
                rows.append(at)
                src.append(seq.pending_row)
            at += n + len(seq.draft_token_ids)
        if not rows:
            return
        if pending_ids.device.type == "cpu":
            values = pending_ids.tolist()
            for row, j in zip(rows, src):
                self.ids[row] = values[j]
            return
        device = pending_ids.device
        self.carried = (on_device(rows, device), on_device(src, device), pending_ids)

    def carry_into(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (this step's input on the device) with the carried rows written in; no host sync."""
        if self.carried is not None:
            rows, src, pending_ids = self.carried
            ids[rows] = pending_ids[src]
        return ids

    def policy_decodes(self) -> tuple[list[int], list[tuple[int, Sequence, int]]]:
        """Each scheduled sequence's first row (and the end), and (row, sequence, kv_len) of each
        policy decode: what PolicyAttention plans."""
        starts = [0]
        for n in self.q_lens:
            starts.append(starts[-1] + n)
        return starts, [(starts[i], self.scheduled[i][0], self.kv_lens[i]) for i in self.sparse]


class TorchExecutor:
    def __init__(self, model, attention, policy_attention, page_size: int, device, compile: bool = False,
                 num_groups: int = 1):
        self.model = model
        self.num_groups = num_groups  # KV groups: one page table each (a GroupedAttention where > 1)
        if compile:
            from kvserve.engine.compiled_forward import compile_forward
            self.forward = compile_forward(model)
        else:
            self.forward = model
        self.attention = attention
        self.policy_attention = policy_attention
        self.page_size = page_size
        self.device = device

    def execute(self, batch: StepBatch) -> torch.Tensor:
        """The final hidden states of batch.last_rows."""
        attention, forward = self._plan(batch)
        ids = batch.carry_into(on_device(batch.ids, self.device))
        hidden = forward(ids, on_device(batch.positions, self.device), attention)
        if len(batch.last_rows) == len(batch.ids):  # ascending and distinct: every row, in order
            return hidden
        return hidden[on_device(batch.last_rows, self.device)]

    def _plan(self, batch: StepBatch):
        """The step's planned attention backend and the forward to run it with."""
        if batch.sparse and self.policy_attention is not None:
            self.model.rope.ensure(max(batch.kv_lens))  # streaming runs past the context length
            return self._plan_policies(batch), self.model
        self.attention.plan(*(AttentionMetadata.build(batch.q_lens, [s.tables[g] for s, _ in batch.scheduled],
                                                      batch.kv_lens, self.page_size) for g in range(self.num_groups)))
        return self.attention, self.forward

    def _plan_policies(self, batch: StepBatch):
        """Full requests and prefills through the dense backend, each non-full decode by its policy
        (in the global layers: a windowed group's layers read every row by their window).
        Runs eagerly: the compiled graph is for the full-attention path only."""
        scheduled, q_lens, kv_lens = batch.scheduled, batch.q_lens, batch.kv_lens
        row_starts, decodes = batch.policy_decodes()
        sparse_set = set(batch.sparse)
        dense = [i for i in range(len(scheduled)) if i not in sparse_set]
        metas, rows = [], []
        for g, window in enumerate(self.policy_attention.groups.windows):
            read = dense if window is None else range(len(scheduled))
            metas.append(AttentionMetadata.build([q_lens[i] for i in read], [scheduled[i][0].tables[g] for i in read],
                                                 [kv_lens[i] for i in read], self.page_size) if read else None)
            rows.append(on_device([r for i in read for r in range(row_starts[i], row_starts[i + 1])], self.device))
        self.policy_attention.plan(metas, rows, decodes)
        return self.policy_attention


class NativeExecutor:
    def __init__(self, decoder: NativeDecoder, fallback: TorchExecutor, policy_attention: PolicyAttention | None = None):
        """policy_attention: what decoder's policy callback runs (PolicyAttention.run_rows); None:
        steps with policy decodes go to the fallback."""
        self.decoder = decoder
        self.num_groups = decoder.num_groups
        self.fallback = fallback
        self.policy_attention = policy_attention

    def execute(self, batch: StepBatch) -> torch.Tensor:
        policy_rows = None
        if batch.sparse:
            if self.policy_attention is None or any(batch.scheduled[i][0].policy.offload for i in batch.sparse):
                return self.fallback.execute(batch)  # offload's split reads run in PolicyAttention.run
            _, decodes = batch.policy_decodes()
            self.policy_attention.plan_decodes(decodes)
            policy_rows = [row for row, _, _ in decodes]
        page_starts, at = [], 0
        for seq, n in batch.scheduled:
            page_starts.extend([at] * n)
            at += len(seq.pages)
        # each KV group's tables one after the other (a sequence's tables all have its length)
        page_table = [p for g in range(self.num_groups) for seq, _ in batch.scheduled for p in seq.tables[g]]
        return self.decoder(batch.ids, batch.positions, page_table, page_starts, batch.last_rows,
                            policy_rows=policy_rows)


def attention_kwargs(cfg) -> dict:
    """What every attention backend takes from the model's config besides its shape."""
    return dict(scale=cfg.attention_scale, windows=cfg.layer_windows(), softcap=cfg.attn_softcap)


def native_layout(cfg) -> bool:
    """Whether kvserve/native/decode.c computes this model's layers: Llama's layout with SwiGLU
    (sliding windows, quantized experts, q/k norms per head or over all heads, partial rotary: the
    families NativeDecoder.supports names), or Gemma 2/3's (offset and sandwich norms, GeGLU,
    attention softcapping, Gemma 3's local RoPE table); a score scale is the config's."""
    return cfg.hidden_act == "silu" or cfg.architecture in ("gemma2", "gemma3")


def select_executor(model, pool, device, compile: bool = False, max_batch: int = 64, enforce_eager: bool = False,
                    groups: KVGroups | None = None, reduce=None):
    """The fastest executor this model runs on, on this device, with its attention backends.
    groups: the pool's KV groups (kvserve/kv/groups.py); several take a GroupedAttention (one backend
    per group), and the static (CUDA graph) decode one block table per group.
    reduce: a tensor-parallel rank's sum over ranks (TPGroup.all_reduce), which the C step calls
    between layers; with it, only executors that can join collectives are picked."""
    cfg = model.config
    groups = groups or KVGroups.from_windows(kv_windows(cfg))
    # KVSERVE_ATTENTION_BACKEND=torch keeps a GPU on the PyTorch reference (as vLLM's variable of that name)
    backend = os.environ.get("KVSERVE_ATTENTION_BACKEND", "triton")
    if backend not in ("triton", "torch"):
        raise ValueError(f"KVSERVE_ATTENTION_BACKEND must be 'triton' or 'torch', got {backend!r}")
    cuda_kernels = str(device).startswith("cuda") and triton_available() and backend == "triton"
    kwargs = attention_kwargs(cfg)
    if cuda_kernels:
        from kvserve.attention.triton import TritonAttention as backend_cls
        from kvserve.model.pointwise_triton import fuse_pointwise
        fuse_pointwise(model)  # norms with their residual add, act * up: one kernel each
    else:
        backend_cls = TorchRefAttention
    # one backend per group, each with its group's window on every slot of the pool's pages
    backends = [backend_cls(pool, cfg.num_heads, cfg.head_dim, **(kwargs | dict(windows=[w] * groups.slots)))
                for w in groups.windows]
    single = len(groups) == 1
    attention = backends[0] if single else GroupedAttention(backends, groups)
    # sparse policies run in PyTorch ops on any device (indices made on the host, moved once per
    # plan), on the global layers; windowed layers keep their window (PolicyAttention)
    dense = [TorchRefAttention(pool, cfg.num_heads, cfg.head_dim, **(kwargs | dict(windows=[w] * groups.slots)))
             for w in groups.windows]
    policy_attention = PolicyAttention(dense[0] if single else GroupedAttention(dense, groups), pool, cfg.num_heads,
                                       cfg.head_dim, kwargs["scale"], groups, kwargs["softcap"])
    torch_executor = TorchExecutor(model, attention, policy_attention, pool.page_size, device, compile, len(groups))
    if native_layout(cfg) and NativeDecoder.supports(model):
        # policy decodes called back from the C step; a tensor-parallel rank keeps them in PyTorch
        policies = policy_attention if reduce is None else None
        decoder = NativeDecoder(model, pool, reduce, groups, policies)
        return NativeExecutor(decoder, torch_executor, policies)
    if cuda_kernels and not enforce_eager and reduce is None:  # CUDA graphs cannot join collectives
        from kvserve.attention.triton.static import TritonStaticDecode
        from kvserve.engine.static_executor import StaticDecodeExecutor
        return StaticDecodeExecutor(model, pool, torch_executor, max_batch, cfg.max_position_embeddings,
                                    use_graphs=True, attention_cls=TritonStaticDecode, attention_kwargs=kwargs,
                                    groups=groups)
    return torch_executor
