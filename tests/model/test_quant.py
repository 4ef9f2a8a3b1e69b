"""Weight-only quantized kernels against a float64 reference of the dequantized weights, and GGUF
blocks against gguf-py's own dequantizer."""
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

from kvserve.model.quant import (INT4_DENSE_MIN_ROWS, QuantizedEmbedding, QuantizedLinear, QuantizedTensor,
                                 from_gguf_blocks, quantize)


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


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_are_taken_bit_for_bit(type_name):
    w = np.random.default_rng(0).standard_normal((48, 128)).astype(np.float32)
    qtype = GGMLQuantizationType[type_name]
    blocks = gguf_quantize(w, qtype)
    qt = from_gguf_blocks(blocks, type_name, w.shape)
    assert qt.group == 32
    expected = torch.from_numpy(gguf_dequantize(blocks, qtype).reshape(w.shape))
    assert torch.equal(qt.dequantize(), expected)


def test_embedding_rows_are_the_dequantized_table():
    qt = quantize(torch.randn(100, 64), "int8", 32)
    table = QuantizedEmbedding(qt, torch.bfloat16)
    ids = torch.tensor([[3, 99], [0, 3]])
    assert torch.equal(table.rows(ids), qt.dequantize()[ids])
    assert table(ids).dtype == torch.bfloat16
