"""The decoder's pointwise work in Triton on CUDA: RMSNorm fused with the residual add before it, and
the gated MLP's activation times up. Each replaces two to four PyTorch kernels, which in a small
model's decode step cost more in launches than in memory traffic. `fuse_pointwise(model)` swaps them
in (select_executor does, for CUDA with triton); the CPU keeps the PyTorch modules. Rounding follows
the PyTorch ops they replace: the sum to the activation dtype, Llama's norm rounded before its weight
multiplies, Gemma's (1 + w) in float32."""
import torch
import triton
import triton.language as tl

from kvserve.model.layers import ACTIVATIONS, GatedMLP, RMSNorm


@triton.jit
def add_rms_norm_kernel(X, R, W, Out, ResOut, stride_x, stride_r, stride_o, stride_ro, n, eps,
                        HAS_RES: tl.constexpr, OFFSET: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        s = (s.to(tl.float32) + r.to(tl.float32)).to(Out.dtype.element_ty)
        tl.store(ResOut + row * stride_ro + cols, s, mask=mask)
    sf = s.to(tl.float32)
    normed = sf / tl.sqrt(tl.sum(sf * sf, axis=0) / n + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if OFFSET:  # Gemma: x * (1 + w) in float32
        y = normed * (1.0 + w)
    else:  # Llama: the normed row rounded to the activation dtype, then times w
        y = normed.to(Out.dtype.element_ty).to(tl.float32) * w
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def act_mul_kernel(GateUp, Out, stride_g, stride_o, inter, GELU: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(GateUp + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GateUp + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
    if GELU:  # tanh-approximated GELU; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        z = tl.minimum(tl.maximum(z, -15.0), 15.0)  # tanh is +-1 in float32 there; exp stays finite
        a = 0.5 * g * (2.0 * tl.sigmoid(2.0 * z))
    else:
        a = g * tl.sigmoid(g)
    # the activation rounded to the dtype before it multiplies, as two PyTorch ops round
    y = a.to(Out.dtype.element_ty).to(tl.float32) * u
    tl.store(Out + row * stride_o + cols, y.to(Out.dtype.element_ty), mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                 offset: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual), x + residual) over the last dim; residual None: (norm(x), x)."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    rows, n = x2.shape
    out = torch.empty_like(x2)
    res = x2 if residual is None else torch.empty_like(x2)
    r2 = x2 if residual is None else residual.reshape(-1, n)
    if rows:
        add_rms_norm_kernel[(rows,)](x2, r2, weight, out, res, x2.stride(0), r2.stride(0), out.stride(0),
                                     res.stride(0), n, eps, HAS_RES=residual is not None, OFFSET=offset,
                                     BLOCK=triton.next_power_of_2(n), num_warps=4 if n <= 4096 else 8)
    return out.view(shape), res.view(shape)


def act_mul(gate_up: torch.Tensor, gelu: bool) -> torch.Tensor:
    """act(gate) * up of gate_up [T, 2I] (gate first)."""
    rows, width = gate_up.shape
    inter = width // 2
    out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    if rows:
        act_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0), inter,
                                                          GELU=gelu, BLOCK=block, num_warps=4)
    return out


class TritonRMSNorm(RMSNorm):
    """An RMSNorm (or Gemma's, offset) whose add_norm and forward are one kernel."""

    def __init__(self, norm: RMSNorm):
        super().__init__(norm.weight.shape[0], norm.eps)
        self.weight = norm.weight
        self.offset = norm.offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_rms_norm(x, None, self.weight, self.eps, bool(self.offset))[0]

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return add_rms_norm(x, residual, self.weight, self.eps, bool(self.offset))


def _act_mul(gelu: bool):
    return lambda gate_up: act_mul(gate_up.contiguous(), gelu)


def fuse_pointwise(model) -> None:
    """Swaps the model's norms and gated MLPs' activations for the kernels above (q/k norms too:
    any leading shape is rows of the last dim)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, RMSNorm) and not isinstance(child, TritonRMSNorm) and \
                    child.weight.dim() == 1 and child.weight.is_contiguous():
                setattr(parent, name, TritonRMSNorm(child))
        if isinstance(parent, GatedMLP) and parent.act in (ACTIVATIONS["silu"], ACTIVATIONS["gelu_tanh"]):
            parent.act_mul = _act_mul(parent.act is ACTIVATIONS["gelu_tanh"])
