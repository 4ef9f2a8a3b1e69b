"""Weight-only quantization: weights stay int8 or int4 in memory, activations stay bf16.

Two formats, each matching one of PyTorch's packed CPU kernels:
- int8: symmetric, one scale per output row (`aten._weight_int8pack_mm`); vocabulary tables
  keep groups of 32 (GGUF's Q8_0) for lookups and for rescoring the top logits;
- int4: asymmetric groups (32 by default) along the input dim, w = q * scale + min, q in 0..15
  (`aten._weight_int4pack_mm_for_cpu`, whose own rule is w = (q - 8) * scale + zero).
GGUF Q4_0, Q4_1, Q4_K (int4) and Q5_0, Q8_0 (int8) blocks are exactly such groups of 32, so they
are taken over bit for bit; any other weight is quantized here from its float values. A linear
int8 weight keeps its groups of 32 where kvserve/native's kernels run it (else one scale a row,
for PyTorch's kernel). Where they can be built, float32 activations go to those kernels instead,
on the same packed buffers: qmatmul.c for a single row (eager decode), gemm.c for more.
"""
import functools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from kvserve.native import qmatmul

GROUP = 32
MODES = ("auto", "none", "int8", "int4")
EXACT_GGUF_TYPES = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q5_0": "int8", "Q8_0": "int8"}
# `auto` on a GGUF: each linear weight from its own type, so no tensor loses more than its file did
# (Q6_K, Q5_K and float weights become int8 groups of 32: 8 bits lose little of 6)
AUTO_BY_GGUF_TYPE = {"Q4_0": "int4", "Q4_1": "int4", "Q4_K": "int4", "Q5_0": "int8", "Q8_0": "int8",
                     "Q5_K": "int8", "Q6_K": "int8", "F32": "int8", "F16": "int8", "BF16": "int8"}
# Above this many rows, unpacking an int4 weight to bf16 once and calling the bf16 matmul beats
# the int4 kernel, which re-unpacks the weight for every block of rows (1.1 ms to unpack
# a 3072 x 576 weight; the kernel costs ~11 us a row more than bf16, so it pays from ~200 rows).
INT4_DENSE_MIN_ROWS = 256


@dataclass
class QuantizedTensor:
    """A quantized [N, K] weight in unpacked form: what the loader makes and fusing concatenates."""
    kind: str  # "int8" | "int4"
    q: torch.Tensor  # int8 [N, K] (-127..127) or uint8 [N, K] (0..15)
    scale: torch.Tensor  # fp32 [N, K / group]
    min: torch.Tensor | None = None  # fp32 [N, K / group] (int4)

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def group(self) -> int:
        return self.q.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        n, k = self.q.shape
        w = self.q.view(n, k // self.group, self.group).float() * self.scale[..., None]
        return (w if self.min is None else w + self.min[..., None]).view(n, k)

    def requantize(self, kind: str, group: int | None = None) -> "QuantizedTensor":
        """Via float values, a block of rows at a time."""
        parts = [quantize(self.rows(slice(i, i + 4096)).dequantize(), kind, group)
                 for i in range(0, self.shape[0], 4096)]
        return QuantizedTensor.cat(parts) if len(parts) > 1 else parts[0]

    def rows(self, index) -> "QuantizedTensor":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return QuantizedTensor(self.kind, self.q[index], self.scale[index], pick(self.min))

    @staticmethod
    def cat(parts: list["QuantizedTensor"]) -> "QuantizedTensor":
        if len({(p.kind, p.group) for p in parts}) > 1:  # e.g. Q4_K_M's Q6_K v beside Q4_K q/k
            k = parts[0].shape[1]
            parts = [p.requantize("int8", GROUP if k % GROUP == 0 else None) for p in parts]
        mins = None if parts[0].min is None else torch.cat([p.min for p in parts])
        return QuantizedTensor(parts[0].kind, torch.cat([p.q for p in parts]),
                               torch.cat([p.scale for p in parts]), mins)


def quantize(w: torch.Tensor, kind: str, group: int | None = None) -> QuantizedTensor:
    """Round-to-nearest quantization of a float [N, K] weight; int8 defaults to one scale per
    row, int4 to groups of 32. Works through rows in blocks so that a vocabulary-sized table
    needs no fp32 temporaries of its own size."""
    n, k = w.shape
    group = group or (k if kind == "int8" else GROUP)
    if k % group:
        raise ValueError(f"the input dim {k} is not a multiple of the quantization group {group}")
    parts = [_quantize_rows(w[i:i + 4096].float(), kind, group) for i in range(0, n, 4096)]
    return QuantizedTensor.cat(parts) if len(parts) > 1 else parts[0]


def _quantize_rows(w: torch.Tensor, kind: str, group: int) -> QuantizedTensor:
    n, k = w.shape
    g = w.view(n, k // group, group)
    if kind == "int8":
        scale = g.abs().amax(-1).clamp_min(1e-12) / 127
        q = (g / scale[..., None]).round().clamp(-127, 127).to(torch.int8)
        return QuantizedTensor("int8", q.view(n, k), scale)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = ((hi - lo) / 15).clamp_min(1e-12)
    q = ((g - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)
    return QuantizedTensor("int4", q.view(n, k), scale, lo)


def from_gguf_blocks(data: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedTensor:
    """Q4_0 / Q4_1 / Q4_K / Q5_0 / Q8_0 rows of blocks -> groups of 32, no rounding (the scales are
    fp32 products of the file's fp16 and 6-bit factors)."""
    n, k = shape
    if type_name == "Q4_K":
        return _from_q4_k(data, n, k)
    header = {"Q4_1": 4, "Q5_0": 6}.get(type_name, 2)
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(n, k // GROUP, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q8_0":  # 32 int8, w = d * q
        q = blocks[..., header:].copy().view(np.int8).reshape(n, k)
        return QuantizedTensor("int8", torch.from_numpy(q), torch.from_numpy(d))
    # Q4_*, Q5_0: 16 bytes whose low nibbles are elements 0..15 and high nibbles 16..31
    nibbles = blocks[..., header:]
    q = np.concatenate([nibbles & 15, nibbles >> 4], -1)
    if type_name == "Q5_0":  # a 32-bit word of fifth bits (bit j: element j) first; w = d * (q - 16)
        high = blocks[..., 2:6].copy().view("<u4")[..., 0]
        q = q | (((high[..., None] >> np.arange(32, dtype=np.uint32)) & 1) << 4).astype(np.uint8)
        q = (q.astype(np.int16) - 16).astype(np.int8).reshape(n, k)
        return QuantizedTensor("int8", torch.from_numpy(q), torch.from_numpy(d))
    q = q.reshape(n, k)  # Q4_0: w = d * (q - 8); Q4_1: w = d * q + m
    m = -8 * d if type_name == "Q4_0" else blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    return QuantizedTensor("int4", torch.from_numpy(q), torch.from_numpy(d), torch.from_numpy(m))


def _from_q4_k(data: np.ndarray, n: int, k: int) -> QuantizedTensor:
    """Q4_K super-blocks of 256: fp16 d and dmin, 12 bytes of eight 6-bit (scale, min) pairs, then
    128 bytes in 4 runs of 32 whose low nibbles are one group of 32 and high nibbles the next;
    w = d * scale_j * q - dmin * min_j."""
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(n, k // 256, 144)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    dmin = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
    packed = blocks[..., 4:16].astype(np.uint8)
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    # groups 0-3: low 6 bits of bytes 0-3 (scales) and 4-7 (mins); groups 4-7: a nibble of bytes
    # 8-11 below the top 2 bits of bytes 0-3 (scales) and 4-7 (mins)
    scale = np.concatenate([a & 63, (c & 15) | ((a >> 6) << 4)], -1).astype(np.float32)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], -1).astype(np.float32)
    runs = blocks[..., 16:].reshape(n, k // 256, 4, 1, 32)
    q = np.concatenate([runs & 15, runs >> 4], 3).reshape(n, k)
    return QuantizedTensor("int4", torch.from_numpy(q),
                           torch.from_numpy((d[..., None] * scale).reshape(n, k // GROUP)),
                           torch.from_numpy((-dmin[..., None] * mins).reshape(n, k // GROUP)))


@functools.cache
def _int4_pack_block() -> int | None:
    """Rows per block of `_convert_weight_to_int4pack_for_cpu`'s layout, which follows the CPU's ISA
    (64 with AVX-512, 32 with AVX2), found by packing a probe; None if no known layout matches."""
    q = torch.randint(0, 16, (128, 32), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    for block in (64, 32, 16):
        try:
            if torch.equal(_unpack_int4(packed, 128, 32, block).int(), q):
                return block
        except RuntimeError:  # a layout of another shape (other ISAs): not one of these
            continue
    return None


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """Inverse of `_convert_weight_to_int4pack_for_cpu`: in each block of `block` output rows, byte
    (k, j) holds row j of column k in its low nibble and row block/2 + j in its high nibble."""
    b = packed.view(n // block, k, block // 2)
    return torch.cat([b & 15, b >> 4], -1).transpose(1, 2).reshape(n, k)


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) with W held by a PyTorch packed kernel; any activation dtype in and out."""

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        n, k = qt.shape
        # int8 groups run on our kernels (qmatmul.c, gemm.c) where they build
        self.int8_groups = (qt.kind == "int8" and qt.group != k and qmatmul.int8_available(k, qt.group)
                            and qmatmul.gemm_available(n, k, qt.group, None))
        if (qt.kind == "int4" and n % 16  # the int4 packer wants rows in multiples of 16
                or qt.kind == "int8" and qt.group != k and not self.int8_groups):  # PyTorch's: a scale a row
            qt = qt.requantize("int8")
        self.kind, self.group = qt.kind, qt.group
        self.out_features, self.in_features = qt.shape
        bf16 = torch.bfloat16
        if self.in_features % 16:  # the int8 kernel crashes on such widths: keep the values in bf16
            self.kind = "bf16"
            self.register_buffer("weight_q", qt.dequantize().to(bf16))
        elif self.int8_groups:  # int8 [N, K] and fp32 scales [N, K / G], as QuantizedEmbedding's
            self.register_buffer("weight_q", qt.q.contiguous())
            self.register_buffer("scales", qt.scale.float().contiguous())
        elif qt.kind == "int8":
            self.register_buffer("weight_q", qt.q.contiguous())
            self.register_buffer("scales", qt.scale[:, 0].to(bf16))
        else:
            self.register_buffer("weight_q", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
                qt.q.to(torch.int32).contiguous(), 1))
            # the kernel's zero is the value of q = 8
            zeros = qt.min + 8 * qt.scale
            self.register_buffer("scales", torch.stack([qt.scale.t(), zeros.t()], -1).to(bf16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # for many rows the weight is unpacked (where the packed layout is known) and multiplied in
        # bf16 if the CPU has native bf16, else in the activations' dtype (emulated bf16 is slow)
        block = _int4_pack_block() if self.kind == "int4" else None
        self.unpack_block = block if block and self.out_features % block == 0 else None
        self.native_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
        # single rows (eager decode) go to our AVX2 kernel (1.2-2x faster) where it can be built
        self.native_int4 = self.kind == "int4" and qmatmul.int4_available(
            self.out_features, self.in_features, self.group, self.unpack_block)
        # many rows: ours beats PyTorch's kernels in float32 and wherever bf16 is emulated
        self.native_gemm = self.kind == "int4" and self.unpack_block is not None and qmatmul.gemm_available(
            self.out_features, self.in_features, self.group, self.unpack_block)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        rows = x.numel() // k
        # not in compiled graphs: there the Python kernel would be an opaque op whose dispatch (~90 us)
        # costs more than it saves
        if self.int8_groups:
            if torch.compiler.is_compiling():  # no packed PyTorch kernel takes groups
                return self._finish(nn.functional.linear(x.reshape(-1, k), self.dense_weight(x.dtype)), x, lead)
            many = rows >= qmatmul.INT8_GEMM_MIN_ROWS
            y = (qmatmul.int8_gemm if many else qmatmul.int8_matmul)(x.reshape(-1, k), self.weight_q, self.scales)
            return self._finish(y, x, lead)
        if not torch.compiler.is_compiling():
            if self.native_int4 and rows <= qmatmul.MAX_ROWS:
                y = qmatmul.int4_matmul(x.reshape(-1, k), self.weight_q, self.scales, self.group, self.unpack_block)
                return self._finish(y, x, lead)
            if self.native_gemm and (x.dtype == torch.float32 or not self.native_bf16):
                y = qmatmul.int4_gemm(x.reshape(-1, k), self.weight_q, self.scales, self.group, self.unpack_block)
                return self._finish(y, x, lead)
        x2 = x.reshape(-1, k).to(torch.bfloat16).contiguous()  # the packed kernels ignore strides
        if self.kind == "bf16":
            y = nn.functional.linear(x2, self.weight_q)
        elif self.kind == "int8":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight_q, self.scales)
        elif rows >= INT4_DENSE_MIN_ROWS and self.unpack_block:
            dtype = torch.bfloat16 if self.native_bf16 else x.dtype
            y = nn.functional.linear(x.reshape(-1, k).to(dtype), self.dense_weight(dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight_q, self.group, self.scales)
        return self._finish(y, x, lead)

    def _finish(self, y: torch.Tensor, x: torch.Tensor, lead) -> torch.Tensor:
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).view(*lead, self.out_features)

    def dense_weight(self, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        """The weight [N, K] in `dtype`, rebuilt from the packed form (int4) or the int8 rows."""
        if self.kind == "bf16":
            return self.weight_q.to(dtype)
        if self.int8_groups:
            n, k = self.weight_q.shape
            return (self.weight_q.view(n, -1, self.group).to(dtype) * self.scales[..., None].to(dtype)).view(n, k)
        if self.kind == "int8":
            return self.weight_q.to(dtype) * self.scales[:, None].to(dtype)
        n, k = self.out_features, self.in_features
        if self.native_int4 and dtype == torch.float32:
            return qmatmul.int4_dequantize(self.weight_q, self.scales, n, k, self.group, self.unpack_block)
        q = _unpack_int4(self.weight_q, n, k, self.unpack_block).view(n, k // self.group, self.group).to(dtype)
        scale, zero = self.scales[..., 0].t()[..., None].to(dtype), self.scales[..., 1].t()[..., None].to(dtype)
        return ((q - 8) * scale + zero).view(n, k)

    def extra_repr(self) -> str:
        group = f", group {self.group}" if self.kind == "int4" or self.int8_groups else ""
        return f"{self.in_features}, {self.out_features}, {self.kind}{group}, bias={self.bias is not None}"


class QuantizedEmbedding(nn.Module):
    """A vocabulary table in groups of 32: int8 (Q8_0's exact values when the GGUF has them), or
    int4 where the GGUF's table is 4-bit (Q4_0, Q4_1) and the int4 kernels take its shape, whose
    logits then read half the bytes (Qwen3-0.6B's tied table: 57 -> 31 MB a decode step).
    Embedding lookups, and the fp32 rows with which the model rescores its top logits."""

    def __init__(self, qt: QuantizedTensor, dtype: torch.dtype):
        super().__init__()
        assert qt.kind in ("int8", "int4"), "vocabulary tables are held as int8 or int4"
        self.kind, self.dtype = qt.kind, dtype
        if self.kind == "int4":  # the projection's packed weight, and exact float scales for rows
            self.linear = QuantizedLinear(qt)
            self.block = self.linear.unpack_block
            self.register_buffer("group_scales", qt.scale.float().contiguous())
            self.register_buffer("group_mins", qt.min.float().contiguous())
            self.native = self.native_gemm = self.linear.native_int4 and self.linear.native_gemm
            return
        self.register_buffer("weight_q", qt.q.contiguous())
        self.register_buffer("group_scales", qt.scale.float().contiguous())
        self.native = qmatmul.int8_available(qt.shape[1], qt.group)
        self.native_gemm = self.native and qmatmul.gemm_available(qt.shape[0], qt.shape[1], qt.group, None)

    @staticmethod
    def int4_fits(qt: QuantizedTensor) -> bool:
        """An int4 table both int4 kernels take (else it is held as int8)."""
        n, k = qt.shape
        block = _int4_pack_block()
        return (qt.kind == "int4" and block is not None and qmatmul.int4_available(n, k, qt.group, block)
                and qmatmul.gemm_available(n, k, qt.group, block))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """fp32 rows [*ids.shape, K]."""
        scales = self.group_scales[ids]
        if self.kind == "int4":  # row r: nibble r % block of its block's bytes, column by column
            packed = self.linear.weight_q.view(-1, self.linear.in_features, self.block // 2)
            r = ids % self.block
            q = (packed[ids // self.block, :, r % (self.block // 2)] >> (4 * (r // (self.block // 2)))[..., None]) & 15
            group = q.shape[-1] // scales.shape[-1]
            w = q.float().view(*scales.shape, group) * scales[..., None] + self.group_mins[ids][..., None]
            return w.view(q.shape)
        q = self.weight_q[ids].float()
        group = self.weight_q.shape[1] // self.group_scales.shape[1]
        return (q.view(*scales.shape, group) * scales[..., None]).view(q.shape)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows(ids).to(self.dtype)


class VocabProjection(nn.Module):
    """x W^T on a QuantizedEmbedding's own int8 groups (qmatmul.c for a few rows, gemm.c for more):
    the lm_head of a quantized model with no second copy of the vocabulary, as PyTorch's int8 kernel
    wants one scale a row."""

    def __init__(self, table: QuantizedEmbedding):
        super().__init__()
        self.table = table

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """-> float32 [..., vocab]"""
        lead, k = x.shape[:-1], x.shape[-1]
        table, x2 = self.table, x.reshape(-1, k)
        if table.kind == "int4":  # QuantizedLinear's kernels: int4_matmul for one row, int4_gemm for more
            y = table.linear(x2.float())
            return y.view(*lead, y.shape[-1])
        many = table.native_gemm and x2.shape[0] >= qmatmul.INT8_GEMM_MIN_ROWS
        y = (qmatmul.int8_gemm if many else qmatmul.int8_matmul)(x2, table.weight_q, table.group_scales)
        return y.view(*lead, y.shape[-1])  # also for no rows (a step whose prompts are all unfinished)
