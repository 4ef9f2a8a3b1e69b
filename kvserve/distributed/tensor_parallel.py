"""Megatron-style sharding of an already-built Llama-family model, in place.

Per decoder layer:
- qkv_proj, gate_up_proj: column-parallel, i.e. this rank's output rows: its q heads and the KV
  heads they read (split when world <= num_kv_heads, else one KV head replicated on the ranks
  that share it), its slice of gate and of up;
- o_proj, down_proj: row-parallel (this rank's input columns, along whole quantization groups),
  then one all-reduce; a bias is added once, after it;
- embed_tokens: vocabulary-parallel (this rank's rows; masked lookup, then an all-reduce);
- lm_head: this rank's vocabulary rows, then an all-gather of the logits on every rank (so the
  rescoring of top logits, which looks up rows of any token, is one more small all-reduce).
The model's config is replaced by this rank's (heads, KV heads, intermediate size), so the KV
pool and attention backends built from it get the rank's KV heads; the vocabulary stays global.
The first version builds the whole model on every rank, then keeps its share: peak memory per
rank is the full model while loading.
"""
import copy
import dataclasses

import torch
from torch import nn

from kvserve.distributed.group import TPGroup
from kvserve.model.quant import QuantizedEmbedding, QuantizedLinear, QuantizedTensor, VocabProjection, _unpack_int4


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


@torch.no_grad()
def shard_model(model, group: TPGroup):
    """Cuts `model` (LlamaForCausalLM) to `group.rank`'s share, in place; returns it."""
    cfg, rank, world = model.config, group.rank, group.world
    q_heads, kv_heads = kv_heads_of(rank, world, cfg.num_heads, cfg.num_kv_heads)
    if cfg.intermediate_size % world:
        raise ValueError(f"intermediate size {cfg.intermediate_size} does not divide over {world} ranks")
    inter = cfg.intermediate_size // world
    d = cfg.head_dim
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if not (hasattr(attn, "qkv_proj") and hasattr(mlp, "gate_up_proj")):
            raise NotImplementedError(f"tensor parallelism knows Llama's layer layout only, not {type(layer).__name__}")
        rows = _head_rows(q_heads, 0, d) + _head_rows(kv_heads, cfg.num_heads * d, d) \
            + _head_rows(kv_heads, (cfg.num_heads + cfg.num_kv_heads) * d, d)
        attn.qkv_proj = _pick_rows(attn.qkv_proj, torch.tensor(rows))
        attn.o_proj = RowParallel(attn.o_proj, range(q_heads.start * d, q_heads.stop * d), group)
        attn.h, attn.hkv = len(q_heads), len(kv_heads)
        mine = range(rank * inter, (rank + 1) * inter)
        mlp.gate_up_proj = _pick_rows(mlp.gate_up_proj, torch.tensor(
            list(mine) + [cfg.intermediate_size + i for i in mine]))
        mlp.down_proj = RowParallel(mlp.down_proj, mine, group)
    _shard_vocab(model, group)
    model.config = dataclasses.replace(cfg, num_heads=len(q_heads), num_kv_heads=len(kv_heads),
                                       intermediate_size=inter)
    model.tensor_parallel = group
    return model


def _head_rows(heads: range, offset: int, d: int) -> list[int]:
    return list(range(offset + heads.start * d, offset + heads.stop * d))


# ---- the parallel modules -------------------------------------------------------------------

class RowParallel(nn.Module):
    """x[:, cols] W[:, cols]^T summed over ranks, then the bias (once)."""

    def __init__(self, linear: nn.Module, cols: range, group: TPGroup):
        super().__init__()
        self.bias = linear.bias
        self.inner = _pick_cols(linear, cols)
        self.group = group

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


def _shard_vocab(model, group: TPGroup) -> None:
    cfg = model.config
    rows = vocab_rows(group.rank, group.world, cfg.vocab_size)
    index = torch.arange(rows.start, rows.stop)
    embed = _pick_rows(model.embed_tokens, index)
    model.embed_tokens = VocabParallelEmbedding(embed, rows, group)
    if model.lm_head_rows is not None:  # quantized: the int8 table is lm_head's (and, tied, embed's)
        table = embed if cfg.tie_word_embeddings else _pick_rows(model.lm_head_rows, index)
        model.lm_head_rows = VocabParallelEmbedding(table, rows, group)
        local = VocabProjection(table) if isinstance(model.lm_head, VocabProjection) else \
            _pick_rows(model.lm_head, index)
    else:
        local = embed if cfg.tie_word_embeddings else _pick_rows(model.lm_head, index)
        if isinstance(local, nn.Embedding):  # tied float weights: one tensor serves both
            local = _linear_on(local.weight)
    # the rescoring of a float model reads lm_head.weight[tokens]: rows by global id, gathered
    model.lm_head = VocabParallelHead(local, rows, cfg.vocab_size, group, VocabParallelEmbedding(local, rows, group))


def _linear_on(weight: torch.Tensor) -> nn.Linear:
    with torch.device("meta"):
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    lin.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight, requires_grad=False)
    return lin


# ---- cutting float and quantized modules ---------------------------------------------------

def _pick_rows(module: nn.Module, rows: torch.Tensor) -> nn.Module:
    """The module restricted to these output rows (embedding rows for tables)."""
    if isinstance(module, nn.Embedding):
        return nn.Embedding(len(rows), module.embedding_dim, _weight=_param(module.weight[rows]))
    if isinstance(module, nn.Linear):
        lin = _linear_on(_param(module.weight[rows]))
        lin.bias = None if module.bias is None else _param(module.bias[rows])
        return lin
    if isinstance(module, QuantizedEmbedding):
        return QuantizedEmbedding(QuantizedTensor("int8", module.weight_q[rows], module.group_scales[rows]),
                                  module.dtype)
    if isinstance(module, VocabProjection):
        return VocabProjection(_pick_rows(module.table, rows))
    if isinstance(module, QuantizedLinear):
        bias = None if module.bias is None else module.bias[rows].clone()
        return _requant_linear(module, _unpacked(module).rows(rows), bias)
    raise NotImplementedError(f"cannot shard a {type(module).__name__}")


def _pick_cols(module: nn.Module, cols: range) -> nn.Module:
    """The module restricted to these input columns, without its bias (added after the reduce)."""
    if isinstance(module, nn.Linear):
        return _linear_on(_param(module.weight[:, cols.start:cols.stop]))
    if isinstance(module, QuantizedLinear):
        qt = _unpacked(module)
        if qt.kind != "int4":  # one scale a row (or none): any columns
            return _requant_linear(module, QuantizedTensor(qt.kind, qt.q[:, cols.start:cols.stop], qt.scale), None)
        g = qt.group
        if cols.start % g or cols.stop % g:
            raise ValueError(f"a weight quantized in groups of {g} cannot be cut at columns "
                             f"{cols.start}:{cols.stop}; use fewer tensor-parallel ranks or --quantization int8")
        sub = QuantizedTensor(qt.kind, qt.q[:, cols.start:cols.stop], qt.scale[:, cols.start // g:cols.stop // g],
                              None if qt.min is None else qt.min[:, cols.start // g:cols.stop // g])
        return _requant_linear(module, sub, None)
    raise NotImplementedError(f"cannot shard a {type(module).__name__}")


def _param(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t.clone().contiguous(), requires_grad=False)


def _unpacked(m: QuantizedLinear) -> QuantizedTensor:
    """A QuantizedLinear's weight back in unpacked form, exactly (scales are held in bf16 by the
    kernels, so these are the values it computes with)."""
    if m.kind == "int8":  # one scale a row
        return QuantizedTensor("int8", m.weight_q, m.scales.float()[:, None])
    if m.kind == "bf16":
        return QuantizedTensor("bf16", m.weight_q, torch.ones(m.out_features, 1))
    if m.unpack_block is None:
        raise NotImplementedError("int4 weights in a packed layout this CPU's kernels do not document "
                                  "cannot be sharded; use --quantization int8")
    q = _unpack_int4(m.weight_q, m.out_features, m.in_features, m.unpack_block)
    scale, zero = m.scales[..., 0].t().float(), m.scales[..., 1].t().float()
    return QuantizedTensor("int4", q, scale, zero - 8 * scale)


def _requant_linear(like: QuantizedLinear, qt: QuantizedTensor, bias) -> nn.Module:
    if qt.kind == "bf16":  # kept dense (widths the int8 kernel cannot take)
        m = copy.copy(like)
        m._buffers = dict(m._buffers, weight_q=qt.q.contiguous())
        m.out_features, m.in_features = qt.q.shape
        m.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        return m
    return QuantizedLinear(qt, bias)
