"""Prefill and append attention over paged K/V: a tile of BLOCK_M query rows of one request and one
query head against that request's pages, through tl.dot.

A chunk of q_len rows whose request holds kv_len tokens (its own included) is causal with an
offset: row r sees KV positions <= kv_len - q_len + r, which covers whole prompts (offset 0),
chunked prefill and prefix-cache hits alike. Non-causal with WRITE_LSE, the same kernel reads a
prefix shared by all decodes once for all of them (cascade) and leaves a state to merge."""
import triton
import triton.language as tl


@triton.jit
def prefill_kernel(Q, KCache, VCache, Out, Lse,
                   TileReq, TileM0, ReqQStart, ReqQLen, ReqKvLen, ReqPageStart, KvIndices,
                   stride_qt, stride_qh, stride_ch, stride_cs, stride_ot, stride_oh, stride_lt,
                   scale_log2,
                   GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // GROUP
    req = tl.load(TileReq + tile)
    m0 = tl.load(TileM0 + tile)
    q0 = tl.load(ReqQStart + req)
    q_len = tl.load(ReqQLen + req)
    kv_len = tl.load(ReqKvLen + req)
    page0 = tl.load(ReqPageStart + req)

    rows = m0 + tl.arange(0, BLOCK_M)
    rmask = rows < q_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + (q0 + rows)[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    k_base = KCache + kvh.to(tl.int64) * stride_ch
    v_base = VCache + kvh.to(tl.int64) * stride_ch

    offset = kv_len - q_len  # the cached prefix before this chunk
    if CAUSAL:  # nothing past the tile's last row is visible
        hi = tl.minimum(kv_len, offset + m0 + BLOCK_M)
    else:
        hi = kv_len
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(0, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        nmask = pos < kv_len
        page = tl.load(KvIndices + page0 + pos // PAGE_SIZE, mask=nmask, other=0).to(tl.int64)
        off = (page * PAGE_SIZE + pos % PAGE_SIZE)[:, None] * stride_cs + d[None, :]
        kv_mask = nmask[:, None] & dmask[None, :]
        k = tl.load(k_base + off, mask=kv_mask, other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * scale_log2
        visible = nmask[None, :]
        if CAUSAL:
            visible = visible & (pos[None, :] <= (offset + rows)[:, None])
        # every row sees position 0, so no row is all -inf after the first block
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + off, mask=kv_mask, other=0.0).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    out = acc / l_i[:, None]
    out_rows = q0 + rows
    tl.store(Out + out_rows[:, None] * stride_ot + h * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    if WRITE_LSE:
        tl.store(Lse + out_rows * stride_lt + h, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)
