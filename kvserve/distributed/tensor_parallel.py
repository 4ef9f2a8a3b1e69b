"""Megatron-style tensor parallelism for Llama-family models: each rank loads only its share.

`load_sharded` hands the model class a view of the checkpoint in which every tensor is already
cut to this rank's share, and a config of the rank's sizes, so the model is built at its local
shapes (GGUF and --random-weights are read one tensor at a time: a rank never holds more than its
share plus one whole tensor; a safetensors directory is read whole by the loader, then cut). Cuts:
- q/k/v and gate/up: column-parallel, i.e. this rank's output rows: its q heads and the KV heads
  they read (split when world <= num_kv_heads, else one KV head replicated on the ranks that
  share it), its slice of gate and of up;
- o_proj and down_proj: row-parallel, this rank's input columns (along whole quantization groups),
  then one all-reduce (`RowParallel`); a bias is added once, after it;
- embed_tokens: vocabulary-parallel (this rank's rows; masked lookup, then an all-reduce);
- lm_head: this rank's vocabulary rows, then an all-gather of the logits on every rank (the
  rescoring of top logits looks up rows of any token: one more small all-reduce).
The built model's config keeps the rank's heads, KV heads and intermediate size (the KV pool and
attention backends are built from it) and the global vocabulary.
"""
import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from kvserve.distributed.group import TPGroup
from kvserve.model.quant import QuantizedTensor


def kv_heads_of(rank: int, world: int, num_heads: int, num_kv_heads: int) -> tuple[range, range]:
    """(q heads, KV heads) of a rank. Raises ValueError where heads do not divide over ranks."""
    if num_heads % world:
        raise ValueError(f"{num_heads} attention heads do not divide over {world} tensor-parallel ranks")
    if num_kv_heads % world and world % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads and {world} tensor-parallel ranks: one must divide the other")
    per = num_heads // world
    q = range(rank * per, (rank + 1) * per)
    if world <= num_kv_heads:
        kv_per = num_kv_heads // world
        return q, range(rank * kv_per, (rank + 1) * kv_per)
    group = num_heads // num_kv_heads  # q heads per KV head; a rank's q heads are within one group
    return q, range(q.start // group, q.start // group + 1)


def vocab_rows(rank: int, world: int, vocab: int) -> range:
    """A rank's rows of the vocabulary: equal blocks of ceil(vocab / world), the last one short."""
    per = -(-vocab // world)
    return range(min(rank * per, vocab), min((rank + 1) * per, vocab))


@dataclasses.dataclass
class RankShare:
    """What one rank holds of a model of config `cfg`."""
    q_heads: range
    kv_heads: range
    inter: range
    vocab: range

    @classmethod
    def of(cls, cfg, rank: int, world: int) -> "RankShare":
        q, kv = kv_heads_of(rank, world, cfg.num_heads, cfg.num_kv_heads)
        if cfg.intermediate_size % world:
            raise ValueError(f"intermediate size {cfg.intermediate_size} does not divide over {world} ranks")
        per = cfg.intermediate_size // world
        return cls(q, kv, range(rank * per, (rank + 1) * per), vocab_rows(rank, world, cfg.vocab_size))

    def local_config(self, cfg):
        return dataclasses.replace(cfg, num_heads=len(self.q_heads), num_kv_heads=len(self.kv_heads),
                                   intermediate_size=len(self.inter), vocab_size=len(self.vocab))


class ShardedWeights(Mapping):
    """Checkpoint name -> this rank's cut of the tensor (float or QuantizedTensor), made when asked."""

    def __init__(self, weights: Mapping, cfg, share: RankShare):
        self.weights, self.share = weights, share
        d = cfg.head_dim
        q, kv = share.q_heads, share.kv_heads
        # (dim, range) per projection: dim 0 = output rows, 1 = input columns
        self.cuts = {"q_proj": (0, range(q.start * d, q.stop * d)), "k_proj": (0, range(kv.start * d, kv.stop * d)),
                     "v_proj": (0, range(kv.start * d, kv.stop * d)), "o_proj": (1, range(q.start * d, q.stop * d)),
                     "gate_proj": (0, share.inter), "up_proj": (0, share.inter), "down_proj": (1, share.inter),
                     "embed_tokens": (0, share.vocab), "lm_head": (0, share.vocab)}

    def __getitem__(self, name: str):
        value = self.weights[name]
        parts = name.split(".")
        cut = self.cuts.get(parts[-2]) if len(parts) >= 2 else None
        if cut is None or (parts[-1] == "bias" and cut[0] == 1):  # a row-parallel bias stays whole
            return value
        return _cut(value, *cut, name)

    def __iter__(self):
        return iter(self.weights)

    def __len__(self) -> int:
        return len(self.weights)


def _cut(value, dim: int, r: range, name: str):
    if not isinstance(value, QuantizedTensor):
        return value[r.start:r.stop] if dim == 0 else value[:, r.start:r.stop]
    if dim == 0:
        return value.rows(slice(r.start, r.stop))
    if value.scale.shape[1] == 1:  # one scale a row: any columns
        return QuantizedTensor(value.kind, value.q[:, r.start:r.stop], value.scale, value.min)
    g = value.group
    if r.start % g or r.stop % g:
        raise ValueError(f"{name} is quantized in groups of {g}: it cannot be cut at columns {r.start}:{r.stop}; "
                         f"use fewer tensor-parallel ranks")
    pick = lambda t: None if t is None else t[:, r.start // g:r.stop // g]  # noqa: E731
    return QuantizedTensor(value.kind, value.q[:, r.start:r.stop], pick(value.scale), pick(value.min))


@torch.no_grad()
def load_sharded(model_cls, cfg, weights: Mapping, dtype, device, group: TPGroup):
    """`model_cls.from_weights` (LlamaForCausalLM's interface) at this rank's share, wired with
    the collectives that make its outputs the whole model's."""
    share = RankShare.of(cfg, group.rank, group.world)
    model = model_cls.from_weights(share.local_config(cfg), ShardedWeights(weights, cfg, share), dtype, device)
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (hasattr(attn, "o_proj") and hasattr(mlp, "down_proj")):
            raise NotImplementedError(f"tensor parallelism knows Llama's layer layout only, not {type(layer).__name__}")
        attn.o_proj = RowParallel(attn.o_proj, group)
        mlp.down_proj = RowParallel(mlp.down_proj, group)
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, share.vocab, group)
    if model.lm_head_rows is not None:  # quantized: the int8 table serves lm_head (and, tied, embed)
        model.lm_head_rows = VocabParallelEmbedding(model.lm_head_rows, share.vocab, group)
    # the rescoring of a float model reads lm_head.weight[tokens]: rows by global id, gathered
    model.lm_head = VocabParallelHead(model.lm_head, share.vocab, cfg.vocab_size, group,
                                      VocabParallelEmbedding(model.lm_head, share.vocab, group))
    model.config = dataclasses.replace(model.config, vocab_size=cfg.vocab_size)
    model.tensor_parallel = group
    return model


# ---- the parallel modules -------------------------------------------------------------------

class RowParallel(nn.Module):
    """A projection over this rank's input columns, summed over ranks, then the bias (once)."""

    def __init__(self, linear: nn.Module, group: TPGroup):
        super().__init__()
        self.bias, linear.bias = linear.bias, None
        self.inner, self.group = linear, group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.group.all_reduce(self.inner(x))
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """This rank's rows of the table; ids outside them look up zeros, and the sum over ranks is
    each id's row."""

    def __init__(self, table: nn.Module, rows: range, group: TPGroup):
        super().__init__()
        self.table, self.start, self.stop, self.group = table, rows.start, rows.stop, group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(self._local(ids, lambda t: self.table(t)))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows (QuantizedEmbedding's interface, used to rescore top logits)."""
        return self.group.all_reduce(self._local(ids, lambda t: self.table.rows(t)))

    def __getitem__(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows by global index: `lm_head.weight[tokens]` of a float model's rescoring."""
        return self.group.all_reduce(self._local(ids, lambda t: nn.functional.embedding(t, self.table.weight)))

    def _local(self, ids: torch.Tensor, lookup) -> torch.Tensor:
        mine = (ids >= self.start) & (ids < self.stop)
        out = lookup(torch.where(mine, ids - self.start, 0))
        return out * mine.unsqueeze(-1).to(out.dtype)


class VocabParallelHead(nn.Module):
    """Logits of this rank's vocabulary rows, padded to an equal block, all-gathered."""

    def __init__(self, local: nn.Module, rows: range, vocab: int, group: TPGroup, weight_rows: nn.Module):
        super().__init__()
        self.local, self.vocab, self.group = local, vocab, group
        self.block = -(-vocab // group.world)
        self.pad = self.block - len(rows)
        self.weight = weight_rows  # indexable by global token ids (compute_logits' rescoring)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        if self.pad:
            y = nn.functional.pad(y, (0, self.pad))
        return self.group.all_gather_last(y)[..., :self.vocab]
