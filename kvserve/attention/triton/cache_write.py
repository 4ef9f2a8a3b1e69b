"""The step's new K/V rows into their pool slots: one program per token, all KV heads at once."""
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
