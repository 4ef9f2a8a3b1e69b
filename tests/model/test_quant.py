"""Weight-only quantized kernels against a float64 reference of the dequantized weights, and GGUF
blocks against gguf-py's own dequantizer."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from kvserve.model.quant import (INT4_DENSE_MIN_ROWS, QuantizedEmbedding, QuantizedLinear, QuantizedTensor, VocabProjection,
                                 _int4_pack_block, _unpack_int4, from_gguf_blocks, quantize)
from kvserve.native import qmatmul


def reference(x: torch.Tensor, qt: QuantizedTensor) -> torch.Tensor:
    """x rounded to bf16 (the kernels' input) times the dequantized weight, in float64."""
    return x.to(torch.bfloat16).double() @ qt.dequantize().double().t()


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("seed", range(6))
def test_int4_kernel_matches_dequantized_weights(seed):
    g = torch.Generator().manual_seed(seed)
    group = [32, 64, 128][seed % 3]
    n = 16 * int(torch.randint(1, 20, (), generator=g))
    k = group * int(torch.randint(1, 6, (), generator=g))
    qt = quantize(torch.randn(n, k, generator=g), "int4", group)
    assert qt.group == group
    lin = QuantizedLinear(qt)
    assert lin.kind == "int4"
    for m in (1, 7, 64):
        x = torch.randn(m, k, generator=g)
        # bf16 scales and outputs: errors of a few 1e-3, as for any bf16 matmul
        assert rel_err(lin(x), reference(x, qt)) < 1e-2


@pytest.mark.parametrize("seed", range(4))
def test_int8_kernel_matches_dequantized_weights(seed):
    g = torch.Generator().manual_seed(seed)
    n, k = (int(v) for v in torch.randint(1, 300, (2,), generator=g))
    k = k if seed % 2 else 16 * (k // 16 + 1)
    qt = quantize(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g), "int8")
    bias = torch.randn(n, generator=g)
    lin = QuantizedLinear(qt, bias)
    assert lin.kind == ("int8" if k % 16 == 0 else "bf16")  # the int8 kernel needs widths of 16
    x = torch.randn(5, k, generator=g)
    assert rel_err(lin(x), reference(x, qt) + bias.double()) < 1e-2


def test_quantization_error_is_bounded():
    w = torch.randn(64, 256)
    for kind, levels in (("int8", 254), ("int4", 15)):
        qt = quantize(w, kind)
        step = qt.scale.repeat_interleave(qt.group, 1)
        assert ((qt.dequantize() - w).abs() <= step / 2 + 1e-6).all(), kind
        assert (qt.dequantize() - w).abs().max() > 0  # it did quantize
        assert int(qt.q.max()) - int(qt.q.min()) <= levels


def test_many_rows_use_the_unpacked_weight_with_the_same_result():
    qt = quantize(torch.randn(128, 96), "int4")
    lin = QuantizedLinear(qt)
    assert lin.unpack_block, "the packed layout of this CPU is not known"
    torch.testing.assert_close(lin.dense_weight().float(), qt.dequantize(), atol=0.05, rtol=0.01)
    x = torch.randn(INT4_DENSE_MIN_ROWS, 96)
    assert rel_err(lin(x), reference(x, qt)) < 1e-2
    if lin.native_int4:  # qmatmul.c's one-pass unpack gives PyTorch ops' values exactly
        native = lin.dense_weight(torch.float32)
        lin.native_int4 = False
        assert torch.equal(native, lin.dense_weight(torch.float32))


def test_rows_the_int4_packer_cannot_take_fall_back_to_int8():
    qt = quantize(torch.randn(40, 64), "int4")
    lin = QuantizedLinear(qt)
    assert lin.kind == "int8"
    x = torch.randn(3, 64)
    assert rel_err(lin(x), reference(x, qt)) < 2e-2


def test_concatenating_mixed_kinds_gives_int8():
    a, b = quantize(torch.randn(32, 64), "int4"), quantize(torch.randn(16, 64), "int8")
    both = QuantizedTensor.cat([a, b])
    assert both.kind == "int8" and both.shape == (48, 64)
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]),
                               atol=0.02, rtol=0)


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q5_0", "Q8_0"])
def test_gguf_blocks_are_taken_bit_for_bit(type_name):
    w = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    blocks = gguf_quantize(w, qtype)
    qt = from_gguf_blocks(blocks, type_name, w.shape)
    assert qt.group == 32
    expected = torch.from_numpy(gguf_dequantize(blocks, qtype).reshape(w.shape))
    assert torch.equal(qt.dequantize(), expected)


def test_q4_k_blocks_are_taken_bit_for_bit():
    """Q4_K super-blocks (random bits: every pattern of scales, mins and nibbles is valid) against
    gguf-py's dequantizer, which has no Q4_K quantizer to make real ones."""
    rng = np.random.default_rng(1)
    n, k = 32, 512
    blocks = rng.integers(0, 256, (n, k // 256, 144), dtype=np.uint8)
    factors = np.abs(rng.standard_normal((n, k // 256, 2))).astype(np.float16) * 0.01  # d, dmin
    blocks[..., 0:4] = factors.view(np.uint8)
    qt = from_gguf_blocks(blocks.reshape(n, -1), "Q4_K", (n, k))
    assert qt.kind == "int4" and qt.group == 32
    expected = gguf_dequantize(blocks.reshape(n, -1), GGMLQuantizationType.Q4_K).reshape(n, k)
    assert torch.equal(qt.dequantize(), torch.from_numpy(expected))


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_int8_group_linear_matches_dequantized_weights(rows):
    """Linear int8 weights in groups of 32 (GGUF's Q5_0 / Q8_0, `auto`) keep their groups on the
    native kernels: one row (qmatmul.c), a few, many (gemm.c)."""
    g = torch.Generator().manual_seed(rows)
    qt = quantize(torch.randn(96, 160, generator=g) * torch.rand(96, 1, generator=g), "int8", 32)
    bias = torch.randn(96, generator=g)
    lin = QuantizedLinear(qt, bias)
    if not lin.int8_groups:
        pytest.skip("int8 group kernels not built (no C compiler or no AVX2)")
    assert lin.kind == "int8" and lin.group == 32
    x = torch.randn(rows, 160, generator=g)
    expected = x.double() @ qt.dequantize().double().t() + bias.double()
    assert rel_err(lin(x), expected) < 1e-3  # two int8 digits per activation: near float
    assert rel_err(lin(x.to(torch.bfloat16)).float(), expected) < 1e-2
    torch.testing.assert_close(lin.dense_weight(torch.float32), qt.dequantize())


def test_embedding_rows_are_the_dequantized_table():
    qt = quantize(torch.randn(100, 64), "int8", 32)
    table = QuantizedEmbedding(qt, torch.bfloat16)
    ids = torch.tensor([[3, 99], [0, 3]])
    assert torch.equal(table.rows(ids), qt.dequantize()[ids])
    assert table(ids).dtype == torch.bfloat16


def test_int4_table_rows_and_logits_are_the_dequantized_table():
    """A 4-bit vocabulary table (GGUF Q4_0 / Q4_1) held as int4: exact rows for embeddings and the
    rescoring, logits through the int4 kernels (one row and many) on its bf16 scales."""
    qt = quantize(torch.randn(96, 64), "int4", 32)
    if not QuantizedEmbedding.int4_fits(qt):
        pytest.skip("int4 kernels not built (no C compiler or no AVX2)")
    table = QuantizedEmbedding(qt, torch.bfloat16)
    assert table.kind == "int4" and table.native
    ids = torch.tensor([[3, 95], [0, 3], [40, 63]])
    assert torch.equal(table.rows(ids), qt.dequantize()[ids])
    assert table(ids).dtype == torch.bfloat16
    _, exact = _int4_scales(qt)
    g = torch.Generator().manual_seed(0)
    for m in (1, 3, 9):
        x = torch.randn(m, 64, generator=g)
        assert rel_err(VocabProjection(table)(x), x.double() @ exact.t()) < 1e-4, m


def _pack_int4(q: torch.Tensor, block: int) -> torch.Tensor:
    """The inverse of _unpack_int4: `_convert_weight_to_int4pack_for_cpu`'s layout for `block` rows."""
    n, k = q.shape
    b = q.view(n // block, 2, block // 2, k).transpose(2, 3)  # [blocks, low/high half, k, block / 2]
    return (b[:, 0] | b[:, 1] << 4).to(torch.uint8).contiguous()


def _int4_scales(qt: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels' bf16 (scale, zero) pairs [K / G, N, 2] of an int4 weight, and the float64 values
    they give, w = (q - 8) * scale + zero."""
    zeros = qt.min + 8 * qt.scale
    scales = torch.stack([qt.scale.t(), zeros.t()], -1).to(torch.bfloat16).contiguous()
    exact = scales[..., 0].t().double().repeat_interleave(qt.group, 1) * (qt.q.double() - 8) + \
        scales[..., 1].t().double().repeat_interleave(qt.group, 1)
    return scales, exact


@pytest.mark.parametrize("block", [32, 64])  # the packer's rows per block with AVX2 / with AVX-512
def test_decode_kernel_matches_dequantized_weights(block):
    """kvserve/native/qmatmul.c, on both packed layouts: its two int8 digits per activation keep the
    error far below the bf16 activations of PyTorch's kernel."""
    if not qmatmul.int4_available(block, 64, 32, block):
        pytest.skip("int4 kernel not built (no C compiler or no AVX2)")
    g = torch.Generator().manual_seed(block)
    n, k, group = 4 * block, 192, 32
    qt = quantize(torch.randn(n, k, generator=g), "int4", group)
    assert torch.equal(_unpack_int4(_pack_int4(qt.q, block), n, k, block), qt.q)
    scales, exact = _int4_scales(qt)
    x = 3 * torch.randn(1, k, generator=g)
    x[0, 5] = 40  # an outlier sets its group's scale
    y = qmatmul.int4_matmul(x, _pack_int4(qt.q, block), scales, group, block)
    assert rel_err(y, x.double() @ exact.t()) < 1e-4
    if _int4_pack_block() == block:  # QuantizedLinear takes this path for one row
        lin = QuantizedLinear(qt)
        assert lin.native_int4
        assert rel_err(lin(x), x.double() @ exact.t()) < 1e-4


@pytest.mark.parametrize("block", [32, 64])
def test_decode_kernel_rows_come_out_as_each_row_alone(block):
    """qmatmul.c's int4 kernel for a few rows (a verification's k + 1, decode.c's small steps): the
    weights are unpacked once for up to 8 rows, and each row's result is bit for bit the one it has
    alone (so speculation's verification rows compute what plain decoding does), for 1-20 rows and
    groups of 32 and 128."""
    if not qmatmul.int4_available(block, 64, 32, block):
        pytest.skip("int4 kernel not built (no C compiler or no AVX2)")
    g = torch.Generator().manual_seed(7 + block)
    for group in (32, 128):
        n, k = 3 * block, 256
        qt = quantize(torch.randn(n, k, generator=g), "int4", group)
        scales, exact = _int4_scales(qt)
        w = _pack_int4(qt.q, block)
        x = torch.randn(20, k, generator=g)
        x[3, 7] = 40
        alone = torch.cat([qmatmul.int4_matmul(x[i:i + 1], w, scales, group, block) for i in range(20)])
        assert rel_err(alone, x.double() @ exact.t()) < 1e-4
        for m in (2, 5, 8, 9, 20):
            assert torch.equal(qmatmul.int4_matmul(x[:m], w, scales, group, block), alone[:m]), (group, m)


def _int8_table(n: int, k: int, group: int, g: torch.Generator):
    """Q8_0-style int8 rows (-128 included) with a scale per group, and their float64 values."""
    q = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    scales = torch.rand(n, k // group, generator=g) / 100
    return q, scales, q.double() * scales.double().repeat_interleave(group, 1)


@pytest.mark.parametrize("group", [32, 64])
def test_int8_logits_kernel_matches_dequantized_weights(group):
    """qmatmul.c's int8 kernel (the logits of one row) on Q8_0-style groups, -128 included."""
    if not qmatmul.int8_available(256, group):
        pytest.skip("int8 kernel not built (no C compiler or no AVX2)")
    g = torch.Generator().manual_seed(group)
    k = 256
    q, scales, exact = _int8_table(300, k, group, g)
    x = 3 * torch.randn(1, k, generator=g)
    x[0, 5] = 40
    y = qmatmul.int8_matmul(x, q, scales)
    assert rel_err(y, x.double() @ exact.t()) < 1e-4


@pytest.mark.parametrize("block", [32, 64])
def test_many_rows_kernel_matches_dequantized_weights(block):
    """gemm.c's int4 kernel on both packed layouts: int16 activations, rows in and out of its tiles
    (3 rows on AVX2; 8, or 6 over two panels, on AVX-512, odd panel counts per thread included),
    groups of 32 and 128, an outlier among the activations."""
    if not qmatmul.gemm_available(block, 128, 32, block):
        pytest.skip("gemm kernels not built (no C compiler or no AVX2)")
    g = torch.Generator().manual_seed(block)
    for group in (32, 128):
        n, k = 3 * block, 256
        qt = quantize(torch.randn(n, k, generator=g), "int4", group)
        scales, exact = _int4_scales(qt)
        for m in (2, 6, 7, 13, 64):
            x = torch.randn(m, k, generator=g)
            x[0, 5] = 40
            y = qmatmul.int4_gemm(x, _pack_int4(qt.q, block), scales, group, block)
            assert rel_err(y, x.double() @ exact.t()) < 1e-4, (group, m)
    if _int4_pack_block() == block:  # QuantizedLinear takes this path for float32 rows beyond one
        lin = QuantizedLinear(qt)
        assert lin.native_gemm
        x = torch.randn(9, k, generator=g)
        assert rel_err(lin(x), x.double() @ exact.t()) < 1e-4


@pytest.mark.parametrize("group", [32, 64])
def test_int8_many_rows_kernel_matches_dequantized_weights(group):
    """gemm.c's int8 kernel (the logits of a batch) on Q8_0-style groups, through VocabProjection:
    integer products on activations rounded to int16 per group, as the int4 kernel's."""
    if not qmatmul.gemm_available(304, 256, group, None):
        pytest.skip("gemm kernels not built (no C compiler or no AVX2)")
    g = torch.Generator().manual_seed(group)
    k = 256
    q, scales, exact = _int8_table(304, k, group, g)
    table = QuantizedEmbedding(QuantizedTensor("int8", q, scales), torch.float32)
    for m in (qmatmul.INT8_GEMM_MIN_ROWS, 13, 64):
        x = torch.randn(m, k, generator=g)
        assert rel_err(qmatmul.int8_gemm(x, q, scales), x.double() @ exact.t()) < 1e-4
        assert rel_err(VocabProjection(table)(x), x.double() @ exact.t()) < 1e-4
