"""The experts of a SparseMoE layer on a GPU, in two Triton launches over tokens grouped by expert.

The (token, expert) pairs are sorted by expert and each expert's run padded to a whole block of
BLOCK_M rows; a program owns one block (so one expert) and a tile of output columns, and reads
only its expert's weights: experts no token chose cost one early exit. `gate_up_kernel` writes
SiLU(gate) * up per pair, `down_kernel` the down projection scaled by the pair's routing weight;
each token's k rows are then summed in PyTorch (no atomics: the same sum whatever the batch).
The layout is computed on the device from shapes alone (an upper bound of blocks, the unused ones
exit), with no host sync, so a decode step that uses it can be captured in a CUDA graph."""
import torch
import triton
import triton.language as tl

BLOCK_N = BLOCK_K = 64  # output columns and reduction depth of a program's tile


@triton.jit
def gate_up_kernel(X, W, Act, Pairs, BlockExpert, stride_xt, stride_we, stride_wn, stride_at,
                   num_pairs, TOP_K: tl.constexpr, I: tl.constexpr, H: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """Act[pair, n] = silu(x W_gate[e]^T) * (x W_up[e]^T) for the pairs of block program_id(0),
    columns n of tile program_id(1); W [E, 2I, H], gate rows first."""
    block = tl.program_id(0)
    expert = tl.load(BlockExpert + block)
    if expert < 0:
        return
    m = tl.arange(0, BLOCK_M)
    pairs = tl.load(Pairs + block * BLOCK_M + m)
    valid = pairs < num_pairs
    tokens = pairs // TOP_K
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < I
    w = W + expert.to(tl.int64) * stride_we
    gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < H
        x = tl.load(X + tokens[:, None] * stride_xt + k[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        wmask = kmask[:, None] & nmask[None, :]
        wg = tl.load(w + n[None, :] * stride_wn + k[:, None], mask=wmask, other=0.0)
        wu = tl.load(w + (n[None, :] + I) * stride_wn + k[:, None], mask=wmask, other=0.0)
        gate = tl.dot(x, wg, gate, input_precision=DOT_PREC)
        up = tl.dot(x, wu, up, input_precision=DOT_PREC)
    act = gate * tl.sigmoid(gate) * up
    tl.store(Act + pairs[:, None] * stride_at + n[None, :], act.to(Act.dtype.element_ty),
             mask=valid[:, None] & nmask[None, :])


@triton.jit
def down_kernel(Act, W, Out, Pairs, BlockExpert, Weights, stride_at, stride_we, stride_wn, stride_ot,
                num_pairs, I: tl.constexpr, H: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr):
    """Out[pair, n] = weight[pair] * (Act[pair] W_down[e]^T)[n]; W [E, H, I]."""
    block = tl.program_id(0)
    expert = tl.load(BlockExpert + block)
    if expert < 0:
        return
    m = tl.arange(0, BLOCK_M)
    pairs = tl.load(Pairs + block * BLOCK_M + m)
    valid = pairs < num_pairs
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = n < H
    w = W + expert.to(tl.int64) * stride_we
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, I, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < I
        a = tl.load(Act + pairs[:, None] * stride_at + k[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
        wd = tl.load(w + n[None, :] * stride_wn + k[:, None], mask=kmask[:, None] & nmask[None, :], other=0.0)
        acc = tl.dot(a, wd, acc, input_precision=DOT_PREC)
    scale = tl.load(Weights + pairs, mask=valid, other=0.0)
    tl.store(Out + pairs[:, None] * stride_ot + n[None, :], acc * scale[:, None],
             mask=valid[:, None] & nmask[None, :])


def block_layout(experts: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ids [T, k] -> (pairs [num_blocks * block_m]: pair ids (t * k + j) sorted by expert,
    each expert's run padded to whole blocks with T * k; block_expert [num_blocks]: the expert of
    each block, -1 past the used ones). Sizes depend on shapes only: no host sync."""
    flat = experts.flatten()
    num_pairs = flat.numel()
    num_blocks = -(-(num_pairs + num_experts * (block_m - 1)) // block_m)
    order = flat.argsort(stable=True)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat))
    starts = counts.cumsum(0) - counts
    padded = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded.cumsum(0)
    sorted_experts = flat[order]
    rank = torch.arange(num_pairs, device=flat.device) - starts[sorted_experts]  # place within its expert's run
    slots = (padded_ends - padded)[sorted_experts] + rank
    pairs = torch.full((num_blocks * block_m,), num_pairs, dtype=torch.int64, device=flat.device)
    pairs.scatter_(0, slots, order)
    block_starts = torch.arange(num_blocks, device=flat.device) * block_m
    block_expert = torch.searchsorted(padded_ends, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return pairs, block_expert


def fused_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w_gate_up: torch.Tensor,
              w_down: torch.Tensor, block_m: int | None = None) -> torch.Tensor:
    """x [T, H], routing weights and expert ids [T, k], w_gate_up [E, 2I, H], w_down [E, H, I] -> [T, H]."""
    t, h = x.shape
    top_k = experts.shape[1]
    num_experts, two_i, _ = w_gate_up.shape
    inter = two_i // 2
    # a decode step gives an expert a few rows; a prompt many
    block_m = block_m or (16 if t * top_k <= 4 * num_experts * 16 else 64)
    pairs, block_expert = block_layout(experts, num_experts, block_m)
    num_blocks, num_pairs = block_expert.numel(), t * top_k
    x, w_gate_up, w_down = x.contiguous(), w_gate_up.contiguous(), w_down.contiguous()
    act = torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(num_pairs, h, dtype=torch.float32, device=x.device)
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # tf32 only ever applies to fp32 dots
    gate_up_kernel[(num_blocks, triton.cdiv(inter, BLOCK_N))](
        x, w_gate_up, act, pairs, block_expert, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), act.stride(0),
        num_pairs, TOP_K=top_k, I=inter, H=h, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PREC=prec)
    down_kernel[(num_blocks, triton.cdiv(h, BLOCK_N))](
        act, w_down, out, pairs, block_expert, weights.flatten().float().contiguous(), act.stride(0),
        w_down.stride(0), w_down.stride(1), out.stride(0),
        num_pairs, I=inter, H=h, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PREC=prec)
    return out.view(t, top_k, h).sum(1).to(x.dtype)
