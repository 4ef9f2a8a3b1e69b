"""The fused pointwise kernels (model/pointwise_triton.py) against the PyTorch modules they replace,
under triton's interpreter on the CPU (float32 and float16; compiled for sm_90 in bf16 by
test_triton_compile.py), and whole models with them swapped in against the same models without."""
import copy
import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)

from kvserve.model.families import model_class  # noqa: E402
from kvserve.model.layers import GatedMLP, OffsetRMSNorm, RMSNorm  # noqa: E402
from kvserve.model.loader import load_checkpoint  # noqa: E402
from kvserve.model.pointwise_triton import TritonRMSNorm, fuse_pointwise  # noqa: E402
from model.paged_forward import paged_logits  # noqa: E402
from tiny_models import make_family_model, make_hf_model, save_hf_dir  # noqa: E402

interpreter = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs CPU tensors")
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm_cls", [RMSNorm, OffsetRMSNorm])
@pytest.mark.parametrize("rows,n", [(1, 64), (5, 96), (3, 576)])  # 96 and 576: not powers of two
def test_add_rms_norm_is_the_add_then_the_norm(dtype, norm_cls, rows, n, device="cpu"):
    g = torch.Generator().manual_seed(rows * n)
    norm = norm_cls(n, 1e-5).to(device)
    norm.weight.data = (1 + 0.1 * torch.randn(n, generator=g)).to(device, dtype)
    x, residual = (torch.randn(rows, n, generator=g).to(device, dtype) for _ in range(2))
    fused = TritonRMSNorm(norm)
    for r in (residual, None):
        (got, got_sum), (want, want_sum) = fused.add_norm(x, r), norm.add_norm(x, r)
        assert torch.equal(got_sum, want_sum)
        torch.testing.assert_close(got, want, atol=TOL[dtype], rtol=TOL[dtype])
    heads = torch.randn(rows, 4, n, generator=g).to(device, dtype)  # a q/k norm over each head's row
    torch.testing.assert_close(fused(heads), norm(heads), atol=TOL[dtype], rtol=TOL[dtype])


@interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("inter", [48, 1500])  # 1500: two blocks of columns, the second partial
def test_act_mul_is_the_activation_times_up(dtype, act, inter, device="cpu"):
    mlp = GatedMLP(16, inter, act)
    gate_up = torch.randn(3, 2 * inter, generator=torch.Generator().manual_seed(inter)).to(device, dtype) * 3
    want = mlp.act_mul(gate_up)
    fuse_pointwise(mlp)
    torch.testing.assert_close(mlp.act_mul(gate_up), want, atol=TOL[dtype], rtol=TOL[dtype])


@interpreter
@pytest.mark.parametrize("arch,overrides", [
    ("llama", {}), ("qwen3", dict(head_dim=32)),  # q/k norms per head
    ("gemma3", dict(num_hidden_layers=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"]))])  # offset and sandwich norms, GeGLU
def test_a_model_with_fused_pointwise_gives_its_logits(tmp_path, arch, overrides):
    hf = make_hf_model(arch) if arch == "llama" else make_family_model(arch, **overrides)
    cfg, weights = load_checkpoint(str(save_hf_dir(hf, tmp_path / arch)))
    model = model_class(cfg).from_weights(cfg, weights)
    fused = copy.deepcopy(model)
    fuse_pointwise(fused)
    assert any(isinstance(m, TritonRMSNorm) for m in fused.modules())
    ids = torch.randint(3, 256, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    # the prompt in chunks, then decodes
    torch.testing.assert_close(paged_logits(fused, ids, page_size=4, chunk=[9, 7]),
                               paged_logits(model, ids, page_size=4, chunk=[9, 7]), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_kernels_give_the_pytorch_ops(dtype):
    for norm_cls in (RMSNorm, OffsetRMSNorm):
        test_add_rms_norm_is_the_add_then_the_norm(dtype, norm_cls, 7, 4096, device="cuda")
    for act in ("silu", "gelu_tanh"):
        test_act_mul_is_the_activation_times_up(dtype, act, 14336, device="cuda")
