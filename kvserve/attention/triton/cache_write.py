"""The step's new K/V rows into their pool slots: one program per token, all KV heads at once;
optionally with the rotary embedding of q and k fused in."""
import torch
import triton
import triton.language as tl


@triton.jit
def write_kv_kernel(K, V, KCache, VCache, Slots,
                    stride_kt, stride_kh, stride_vt, stride_vh, stride_ch, stride_cs,
                    HKV: tl.constexpr, BLOCK_H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0)
    # int64: a layer's cache can pass 2^31 elements
    slot = tl.load(Slots + t).to(tl.int64)
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    mask = (h[:, None] < HKV) & (d[None, :] < D)
    dst = h[:, None].to(tl.int64) * stride_ch + slot * stride_cs + d[None, :]
    k = tl.load(K + t * stride_kt + h[:, None] * stride_kh + d[None, :], mask=mask)
    tl.store(KCache + dst, k.to(KCache.dtype.element_ty), mask=mask)
    v = tl.load(V + t * stride_vt + h[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(VCache + dst, v.to(VCache.dtype.element_ty), mask=mask)


def write_kv(k, v, k_cache, v_cache, slots) -> None:
    """k/v [T, Hkv, D] (last dim contiguous) -> k_cache/v_cache [Hkv, slots, D] at slots [T]."""
    t, hkv, d = k.shape
    if t == 0:
        return
    write_kv_kernel[(t,)](k, v, k_cache, v_cache, slots,
                          k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                          k_cache.stride(0), k_cache.stride(1),
                          HKV=hkv, BLOCK_H=triton.next_power_of_2(hkv), D=d,
                          BLOCK_D=triton.next_power_of_2(d), num_warps=1 if hkv * d <= 1024 else 4)


@triton.jit
def rope_write_kv_kernel(QK, V, Cos, SignedSin, QOut, KCache, VCache, Slots,
                         stride_qkt, stride_qkh, stride_vt, stride_vh, stride_cos, stride_sin,
                         stride_qot, stride_qoh, stride_ch, stride_cs,
                         H: tl.constexpr, HKV: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HKV: tl.constexpr,
                         D: tl.constexpr):
    """Rotary embedding (rotate-half) of one token's q and k heads, q to QOut and k/v straight into
    their pool slot: the rotated k never goes through memory. QK holds the q heads then the k heads."""
    t = tl.program_id(0)
    d = tl.arange(0, D)
    rot = (d + D // 2) % D  # rotate_half: x[rot] * signed_sin, signed_sin = (-sin, sin)
    cos = tl.load(Cos + t * stride_cos + d).to(tl.float32)[None, :]
    sin = tl.load(SignedSin + t * stride_sin + d).to(tl.float32)[None, :]
    hq = tl.arange(0, BLOCK_HQ)[:, None]
    qmask = hq < H
    src = QK + t * stride_qkt + hq * stride_qkh
    x = tl.load(src + d[None, :], mask=qmask, other=0.0).to(tl.float32)
    xr = tl.load(src + rot[None, :], mask=qmask, other=0.0).to(tl.float32)
    tl.store(QOut + t * stride_qot + hq * stride_qoh + d[None, :], (x * cos + xr * sin).to(QOut.dtype.element_ty),
             mask=qmask)
    hk = tl.arange(0, BLOCK_HKV)[:, None]
    kmask = hk < HKV
    src = QK + t * stride_qkt + (H + hk) * stride_qkh
    x = tl.load(src + d[None, :], mask=kmask, other=0.0).to(tl.float32)
    xr = tl.load(src + rot[None, :], mask=kmask, other=0.0).to(tl.float32)
    slot = tl.load(Slots + t).to(tl.int64)
    dst = hk.to(tl.int64) * stride_ch + slot * stride_cs + d[None, :]
    tl.store(KCache + dst, (x * cos + xr * sin).to(KCache.dtype.element_ty), mask=kmask)
    v = tl.load(V + t * stride_vt + hk * stride_vh + d[None, :], mask=kmask)
    tl.store(VCache + dst, v.to(VCache.dtype.element_ty), mask=kmask)


def rope_write_kv(qk, v, cos, signed_sin, k_cache, v_cache, slots, num_heads: int):
    """qk [T, H + Hkv, D] (q heads then k heads, unrotated), v [T, Hkv, D], cos/signed_sin [T, (1,) D]
    as RotaryEmbedding.table gives them -> rotated q [T, H, D]; rotated k and v written at slots."""
    t, heads, d = qk.shape
    hkv = heads - num_heads
    assert d == triton.next_power_of_2(d) and d % 2 == 0, "fused RoPE wants a power-of-two head dim"
    q = torch.empty((t, num_heads, d), dtype=qk.dtype, device=qk.device)
    if t == 0:
        return q
    cos, signed_sin = cos.reshape(t, d), signed_sin.reshape(t, d)
    rope_write_kv_kernel[(t,)](qk, v, cos, signed_sin, q, k_cache, v_cache, slots,
                               qk.stride(0), qk.stride(1), v.stride(0), v.stride(1), cos.stride(0),
                               signed_sin.stride(0), q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
                               H=num_heads, HKV=hkv, BLOCK_HQ=triton.next_power_of_2(num_heads),
                               BLOCK_HKV=triton.next_power_of_2(hkv), D=d, num_warps=4)
    return q
