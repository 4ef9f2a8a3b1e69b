"""The inner loop shared by the decode and prefill kernels: online softmax over a range of one
sequence's KV positions, each block of BLOCK_N rows fetched in place through the page table."""
import triton
import triton.language as tl


@triton.jit
def attend_range(acc, l_i, m_i, q, k_base, v_base, pages, lo, hi, kv_end, q_pos, stride_cs, scale_log2,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                 MASKED: tl.constexpr, CAUSAL: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc [M, BLOCK_D], l_i/m_i [M] (running sum and max, log2 units) updated with q [M, BLOCK_D]
    against positions lo:hi; `pages` points at the sequence's page list. Unmasked ranges (whole
    blocks below kv_end and below every row's causal limit) load and score without masks; a
    MASKED range hides positions >= kv_end and, CAUSAL, those past q_pos [M] of each row."""
    d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            nmask = pos < kv_end
            page = tl.load(pages + pos // PAGE_SIZE, mask=nmask, other=0)
        else:
            page = tl.load(pages + pos // PAGE_SIZE)
        # int64: slot offsets of a large pool pass 2^31 elements
        off = (page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE)[:, None] * stride_cs + d[None, :]
        if MASKED:
            kv_mask = nmask[:, None] & (d[None, :] < D)
            k = tl.load(k_base + off, mask=kv_mask, other=0.0)
            v = tl.load(v_base + off, mask=kv_mask, other=0.0)
        elif BLOCK_D != D:
            k = tl.load(k_base + off, mask=d[None, :] < D, other=0.0)
            v = tl.load(v_base + off, mask=d[None, :] < D, other=0.0)
        else:
            k = tl.load(k_base + off)
            v = tl.load(v_base + off)
        s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * scale_log2
        if MASKED:
            visible = nmask[None, :]
            if CAUSAL:
                visible = visible & (pos[None, :] <= q_pos[:, None])
            s = tl.where(visible, s, float("-inf"))
        # callers order ranges so that every row has seen a visible position by its first block:
        # m_new is finite, and alpha = exp2(-inf) = 0 on the first
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i
