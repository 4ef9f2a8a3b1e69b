"""Prefill and append attention over paged K/V: a tile of BLOCK_M query rows of one request and one
KV head (its tokens x the KV head's query heads) against that request's pages, through tl.dot.

A chunk of q_len rows whose request holds kv_len tokens (its own included) is causal with an
offset: row r sees KV positions <= kv_len - q_len + r, which covers whole prompts (offset 0),
chunked prefill and prefix-cache hits alike. WINDOWED, row r also sees only the last `window`
positions up to its own, and the tile reads nothing before its first row's window. Non-causal with
WRITE_LSE, the same kernel reads a prefix shared by all decodes once for all of them (cascade) and
leaves a state to merge."""
import triton
import triton.language as tl

from kvserve.attention.triton.tiles import attend_range


@triton.jit
def prefill_kernel(Q, KCache, VCache, Out, Lse,
                   TileReq, TileM0, ReqQStart, ReqQLen, ReqKvLen, ReqPageStart, KvIndices,
                   stride_qt, stride_qh, stride_ch, stride_cs, stride_ot, stride_oh, stride_lt,
                   scale_log2, window,
                   GROUP: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
                   CAUSAL: tl.constexpr, WRITE_LSE: tl.constexpr, WINDOWED: tl.constexpr,
                   SOFTCAP: tl.constexpr, DOT_PREC: tl.constexpr):
    tile = tl.program_id(0)
    kvh = tl.program_id(1)
    req = tl.load(TileReq + tile)
    m0 = tl.load(TileM0 + tile)
    q0 = tl.load(ReqQStart + req)
    q_len = tl.load(ReqQLen + req)
    kv_len = tl.load(ReqKvLen + req)
    page0 = tl.load(ReqPageStart + req)

    # rows pack (token, query head of this KV head) pairs, token-major: a KV head's query heads
    # share each K/V tile, and a short chunk still fills the tile's rows
    r = m0 + tl.arange(0, BLOCK_M)
    tok = r // GROUP
    head = kvh * GROUP + r % GROUP
    rmask = tok < q_len
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    q = tl.load(Q + (q0 + tok)[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    k_base = KCache + kvh.to(tl.int64) * stride_ch
    v_base = VCache + kvh.to(tl.int64) * stride_ch
    pages = KvIndices + page0

    q_pos = kv_len - q_len + tok  # after the cached prefix before this chunk
    first_pos = kv_len - q_len + m0 // GROUP  # the tile's first row's
    if CAUSAL:
        # blocks wholly at or before the tile's first token need no mask; the diagonal ones do,
        # and nothing past the tile's last token is read
        full_end = (first_pos + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(kv_len, kv_len - q_len + (m0 + BLOCK_M - 1) // GROUP + 1)
    else:
        full_end = kv_len // BLOCK_N * BLOCK_N
        hi = kv_len
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    kv_begin = 0
    mid = 0
    if WINDOWED:
        # masked from the first row's window start (nothing before it is read) up to whole blocks
        # inside the last row's window, unmasked from there to full_end, masked again to hi
        kv_begin = tl.maximum(first_pos - window + 1, 0)
        last_pos = kv_len - q_len + tl.minimum(q_len - 1, (m0 + BLOCK_M - 1) // GROUP)
        mid = tl.maximum(tl.minimum((tl.maximum(last_pos - window + 1, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N,
                                    full_end), kv_begin // BLOCK_N * BLOCK_N)
        full_end = tl.maximum(full_end, mid)
        acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, pages, kv_begin // BLOCK_N * BLOCK_N, mid,
                                     kv_begin, kv_len, q_pos, window, stride_cs, scale_log2, D, BLOCK_D, BLOCK_N,
                                     PAGE_SIZE, MASKED=True, CAUSAL=CAUSAL, WINDOWED=True, SOFTCAP=SOFTCAP,
                                     DOT_PREC=DOT_PREC)
    acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, pages, mid, full_end, kv_begin, kv_len, q_pos,
                                 window, stride_cs, scale_log2, D, BLOCK_D, BLOCK_N, PAGE_SIZE, MASKED=False,
                                 CAUSAL=CAUSAL, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, DOT_PREC=DOT_PREC)
    # without a window every row sees position 0 (or all of the first range), so none is all -inf
    acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, pages, full_end, hi, kv_begin, kv_len, q_pos,
                                 window, stride_cs, scale_log2, D, BLOCK_D, BLOCK_N, PAGE_SIZE, MASKED=True,
                                 CAUSAL=CAUSAL, WINDOWED=WINDOWED, SOFTCAP=SOFTCAP, DOT_PREC=DOT_PREC)

    out = acc / l_i[:, None]
    out_rows = q0 + tok
    tl.store(Out + out_rows[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
             out.to(Out.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    if WRITE_LSE:
        tl.store(Lse + out_rows * stride_lt + head, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=rmask)
