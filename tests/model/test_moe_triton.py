"""The Triton experts against SparseMoE's grouped PyTorch path on the same routing. Without a GPU
the kernels run under triton's interpreter, in float32 and float16 (its bf16 tl.dot is wrong)."""

import pytest
import torch

pytest.importorskip("triton")

from kvserve.config import ModelConfig  # noqa: E402
from kvserve.model.moe import SparseMoE, route  # noqa: E402
from kvserve.model.moe_triton import block_layout, fused_moe  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_moe(experts=8, top_k=2, hidden=64, inter=48, dtype=torch.float32) -> SparseMoE:
    cfg = ModelConfig("mixtral", 256, hidden, inter, 1, 4, 2, 16, num_experts=experts, num_experts_per_tok=top_k,
                      moe_intermediate_size=inter)
    torch.manual_seed(0)
    moe = SparseMoE(cfg)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(0.2 * torch.randn_like(p))
    return moe.to(DEVICE, dtype)


def test_block_layout_pads_each_expert_to_whole_blocks():
    experts = torch.tensor([[3, 0], [3, 1], [0, 3], [3, 2]])  # pairs 0..7; expert 3 has 4, 0 has 2
    pairs, block_expert = block_layout(experts, 5, 4)
    assert block_expert.tolist() == [0, 1, 2, 3, -1, -1, -1, -1][:len(block_expert)]
    sentinel = 8
    assert pairs[:16].tolist() == [1, 4, sentinel, sentinel, 3, sentinel, sentinel, sentinel,
                                   7, sentinel, sentinel, sentinel, 0, 2, 5, 6]
    assert (pairs[16:] == sentinel).all()


@pytest.mark.parametrize("tokens,dtype,block_m", [(1, torch.float32, None), (5, torch.float32, None),
                                                  (37, torch.float32, 16), (37, torch.float16, 16)])
def test_triton_experts_match_grouped_torch(tokens, dtype, block_m):
    """Odd widths (I = 48 against 64-column tiles), a token alone, and experts nobody chose."""
    moe = random_moe(dtype=dtype)
    x = torch.randn(tokens, 64, device=DEVICE).to(dtype)
    with torch.no_grad():
        weights, experts = route(moe.gate(x), moe.top_k, moe.normalize)
        ours = fused_moe(x, weights, experts, moe.experts_gate_up, moe.experts_down, block_m)
        expected = (moe._grouped(x.float(), experts).view(tokens, 2, -1) if dtype == torch.float32 else
                    moe.float()._grouped(x.float(), experts).view(tokens, 2, -1))
        expected = (expected * weights[..., None].float()).sum(1)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    torch.testing.assert_close(ours.float(), expected, rtol=tol, atol=tol)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_sparse_moe_on_cuda_takes_the_triton_path(dtype, tol, tokens):
    """SparseMoE.forward on a GPU (the Triton kernels) against its grouped PyTorch path on the same
    device, dtype and routing."""
    moe = random_moe(experts=16, top_k=4, hidden=128, inter=96, dtype=dtype)
    x = torch.randn(tokens, 128, device=DEVICE).to(dtype)
    with torch.no_grad():
        weights, experts = route(moe.gate(x), moe.top_k, moe.normalize)
        expected = (moe._grouped(x, experts).view(tokens, 4, -1).float() * weights[..., None]).sum(1)
        got = moe(x).float()
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
