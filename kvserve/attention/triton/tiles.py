"""The inner loop shared by the decode and prefill kernels: online softmax over a range of one
sequence's KV positions, each block of BLOCK_N rows fetched in place through the page table."""
import triton
import triton.language as tl

@triton.jit
def soft_cap(s, SOFTCAP: tl.constexpr):
    """s (scores in log2 units) <- SOFTCAP * tanh(s / SOFTCAP) in the same units (the cap scales
    with them); tanh(x) = 1 - 2 / (e^2x + 1), which saturates to +-1 without overflow."""
    cap = SOFTCAP * 1.4426950408889634
    return cap * (1.0 - 2.0 / (tl.exp2(s * (2.0 / SOFTCAP)) + 1.0))


@triton.jit
def attend_range(acc, l_i, m_i, q, k_base, v_base, pages, lo, hi, kv_begin, kv_end, q_pos, window, stride_cs,
                 scale_log2, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                 PAGE_SIZE: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOWED: tl.constexpr,
                 SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    """acc [M, BLOCK_D], l_i/m_i [M] (running sum and max, log2 units) updated with q [M, BLOCK_D]
    against positions lo:hi; `pages` points at the sequence's page list. Unmasked ranges (whole
    blocks in kv_begin:kv_end and within every row's causal limit and window) load and score without
    masks; a MASKED range reads nothing outside kv_begin:kv_end (pages before kv_begin may have been
    given back) and hides, CAUSAL, positions past q_pos [M] of each row and, WINDOWED, those at or
    before q_pos - window. SOFTCAP > 0: scores capped at +-SOFTCAP (tanh) before the softmax."""
    d = tl.arange(0, BLOCK_D)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        if MASKED:
            nmask = (pos < kv_end) & (pos >= kv_begin)
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
        if SOFTCAP > 0:
            s = soft_cap(s, SOFTCAP)
        if MASKED:
            visible = nmask[None, :]
            if CAUSAL:
                visible = visible & (pos[None, :] <= q_pos[:, None])
            if WINDOWED:
                visible = visible & (pos[None, :] > q_pos[:, None] - window)
            s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # callers order ranges so that every row has seen a visible position by its first block
        # (m_new finite, alpha = exp2(-inf) = 0 on the first), except under a window, whose start
        # may lie past a whole block for some rows: a zero reference keeps their exp2 at 0, not NaN
        m_ref = m_new
        if WINDOWED:
            if MASKED:
                m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
        m_i = m_new
    return acc, l_i, m_i
