"""Decode attention over paged K/V, read in place through the page table.

One program per (work item, KV head): a work item is a range of one request's KV positions (the
whole sequence, or one split of a long one), and the program answers every query head of its KV
head at once (GQA), so each K/V row is loaded once for the group. Splits write their partial
output and its log-sum-exp; `merge_kernel` combines them."""
import triton
import triton.language as tl

from kvserve.attention.triton.tiles import attend_range


@triton.jit
def decode_kernel(Q, KCache, VCache, Out, Lse,
                  ItemReq, ItemStart, ItemEnd, ReqRow, ReqPageStart, KvIndices,
                  stride_qt, stride_qh, stride_ch, stride_cs, stride_ot, stride_oh, stride_lt,
                  scale_log2,
                  GROUP: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
                  BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, SPLIT: tl.constexpr,
                  DOT_PREC: tl.constexpr, SOFTCAP: tl.constexpr):
    item = tl.program_id(0)
    kvh = tl.program_id(1)
    req = tl.load(ItemReq + item)
    start = tl.load(ItemStart + item)
    end = tl.load(ItemEnd + item)
    row = tl.load(ReqRow + req)
    page0 = tl.load(ReqPageStart + req)

    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    dmask = d < D
    heads = kvh * GROUP + g
    # the group's heads as rows of one tile (padded to 16, the smallest tl.dot)
    q = tl.load(Q + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
                mask=gmask[:, None] & dmask[None, :], other=0.0)
    k_base = KCache + kvh.to(tl.int64) * stride_ch
    v_base = VCache + kvh.to(tl.int64) * stride_ch
    pages = KvIndices + page0

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    # whole blocks without masks, then the ragged tail
    full_end = start + (end - start) // BLOCK_N * BLOCK_N
    acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, pages, start, full_end, start, end, g, 0,
                                 stride_cs, scale_log2, D, BLOCK_D, BLOCK_N, PAGE_SIZE, MASKED=False,
                                 CAUSAL=False, WINDOWED=False, SOFTCAP=SOFTCAP, DOT_PREC=DOT_PREC)
    acc, l_i, m_i = attend_range(acc, l_i, m_i, q, k_base, v_base, pages, full_end, end, start, end, g, 0,
                                 stride_cs, scale_log2, D, BLOCK_D, BLOCK_N, PAGE_SIZE, MASKED=True,
                                 CAUSAL=False, WINDOWED=False, SOFTCAP=SOFTCAP, DOT_PREC=DOT_PREC)

    out = acc / l_i[:, None]
    mask = gmask[:, None] & dmask[None, :]
    if SPLIT:  # partial state of this item, merged later
        tl.store(Out + item * stride_ot + heads[:, None] * stride_oh + d[None, :], out, mask=mask)
        tl.store(Lse + item * stride_lt + heads, (m_i + tl.log2(l_i)) * 0.6931471805599453, mask=gmask)
    else:
        tl.store(Out + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                 out.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def merge_kernel(PartOut, PartLse, Out, ReqRow, MergeIndptr,
                 stride_pt, stride_ph, stride_lt, stride_ot, stride_oh, shared_base,
                 D: tl.constexpr, BLOCK_D: tl.constexpr, MAX_PARTS: tl.constexpr,
                 HAS_SHARED: tl.constexpr):
    """One program per (request, query head): its partial states (rows lo:hi of the partial
    buffers, plus row shared_base + request for a cascade's shared prefix) merged by LSE."""
    r = tl.program_id(0)
    h = tl.program_id(1)
    lo = tl.load(MergeIndptr + r)
    hi = tl.load(MergeIndptr + r + 1)
    j = lo + tl.arange(0, MAX_PARTS)
    jmask = j < hi
    d = tl.arange(0, BLOCK_D)
    dmask = d < D
    lse = tl.load(PartLse + j * stride_lt + h, mask=jmask, other=float("-inf"))
    o = tl.load(PartOut + j[:, None] * stride_pt + h * stride_ph + d[None, :],
                mask=jmask[:, None] & dmask[None, :], other=0.0)
    m = tl.max(lse, 0)
    if HAS_SHARED:
        lse_s = tl.load(PartLse + (shared_base + r) * stride_lt + h)
        o_s = tl.load(PartOut + (shared_base + r) * stride_pt + h * stride_ph + d, mask=dmask, other=0.0)
        m = tl.maximum(m, lse_s)
    w = tl.exp(lse - m)
    num = tl.sum(o * w[:, None], 0)
    den = tl.sum(w, 0)
    if HAS_SHARED:
        w_s = tl.exp(lse_s - m)
        num += o_s * w_s
        den += w_s
    row = tl.load(ReqRow + r)
    tl.store(Out + row * stride_ot + h * stride_oh + d, (num / den).to(Out.dtype.element_ty), mask=dmask)
