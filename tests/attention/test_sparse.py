"""Sparse decode attention: policy parsing, MagicPIG's tables and estimator, top-k, streaming windows."""
import pytest
import torch

from kvserve.attention.merge import attention_with_lse
from kvserve.attention.metadata import AttentionMetadata
from kvserve.attention.policy import AttentionPolicy, parse_attention
from kvserve.attention.sparse import magicpig
from kvserve.attention.sparse.backend import PolicyAttention
from kvserve.attention.sparse.streaming import droppable_pages, kept_positions
from kvserve.attention.sparse.topk import topk_attention
from kvserve.attention.torch_ref import TorchRefAttention
from kvserve.kv.pool import PagePool

H, HKV, D = 4, 2, 16


def test_policy_parsing():
    assert parse_attention(None).policy == "full"
    assert parse_attention("streaming") == AttentionPolicy("streaming", window=1020)
    p = parse_attention("magicpig:K=8,L=100,dense_layers=0;3")
    assert (p.K, p.L, p.window, p.dense_layers) == (8, 100, 64, (0, 3))
    p = parse_attention({"policy": "magicpig", "K": 10, "L": 150, "sink": 4, "window": 64})
    assert p == parse_attention('{"policy": "magicpig"}')
    assert parse_attention({"policy": "topk", "k": 7, "dense_layers": []}).dense_layers == ()
    assert parse_attention("magicpig:min_coverage=0.25").min_coverage == 0.25
    for bad in ["nope", "magicpig:K=0", "magicpig:L", {"policy": "topk", "budget": 1}, {"K": 3}, 5,
                "magicpig:min_coverage=2", "magicpig:min_coverage=x",
                {"policy": "streaming", "window": -1}, {"policy": "magicpig", "dense_layers": "x"}, "{bad json"]:
        with pytest.raises(ValueError):
            parse_attention(bad)


def _codes(hkv, t, L, K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << K, (hkv, t, L), generator=g, dtype=torch.int16)


def _sampled_pairs(tables, qcodes):
    """(head, id) pairs that a decode step samples, given the query's codes."""
    h, n_keys = qcodes.shape[0], tables.num_keys + tables.num_extra
    found = torch.empty(h, n_keys, dtype=torch.int32)
    q, cache, K, L = torch.randn(h, D), torch.randn(HKV, n_keys, D), tables.K, qcodes.shape[1]
    proj = magicpig.projections(D, K, L, seed=0, layer=0)  # unused: the codes are given
    _, _, n = magicpig.sampled_decode(q, cache, cache, torch.arange(n_keys), torch.arange(0), cache.mean(1), tables,
                                      proj, magicpig.projection_panels(proj), D ** -0.5, K, L, qcodes, found)
    heads, ids = torch.nonzero((found < 0).cumsum(1) == 0, as_tuple=True)  # up to each row's -1
    assert len(ids) == n
    return heads, found[heads, ids].long()


def _native(name):
    if magicpig._kernel(name) is None:
        pytest.skip("no C compiler: the PyTorch twins run instead")


@pytest.mark.parametrize("native", [False, True])
@pytest.mark.parametrize("K, num_heads, t, L", [(2, H, 300, 12), (4, H, 300, 12), (3, 130, 300, 12),  # 130: the C
                                                (2, H, 40_000, 3)])  # kernel reuses tags of 63 heads; 40k: 16-bit ids
@pytest.mark.parametrize("narrow", [True, False])
def test_bucket_tables_find_every_brute_force_candidate(K, num_heads, t, L, native, narrow, monkeypatch):
    group = num_heads // HKV
    codes = _codes(HKV, t, L, K)
    extra = _codes(HKV, 9, L, K, seed=1)
    qcodes = torch.randint(0, 1 << K, (num_heads, L))
    if native:
        _native("magicpig_decode")
    else:
        monkeypatch.setattr(magicpig, "_kernel", lambda name: None)
    if not narrow:
        monkeypatch.setattr(magicpig, "MAX_NARROW_KEYS", 0)
    tables = magicpig.BucketTables.build(codes, K)
    assert tables.narrow == narrow
    tables.add(extra[:, :4])
    tables.add(extra[:, 4:])  # the room grows
    heads, ids = _sampled_pairs(tables, qcodes)
    found = set(zip(heads.tolist(), ids.tolist()))
    every = torch.cat([codes, extra], 1)[torch.arange(num_heads) // group]  # [heads, T + 9, L]
    brute = torch.nonzero((every == qcodes[:, None, :]).sum(-1) >= 2).tolist()
    assert found == {tuple(x) for x in brute}
    assert len(ids) == len(found)  # no pair twice


def _full(q, keys, values, scale, softcap=None):
    out, lse = attention_with_lse(q.view(HKV, -1, 1, D), keys[:, None], values[:, None], scale, softcap=softcap)
    return out.reshape(H, D), lse.reshape(H)


def _sampled(q, keys, values, K, L, seed):
    """MagicPIG over all keys (no dense part), as the backend computes it."""
    proj = magicpig.projections(D, K, L, seed, 0)
    mean = keys.mean(1)
    tables = magicpig.BucketTables.build(magicpig.simhash(keys - mean[:, None], proj, K, L), K)
    heads, ids = magicpig.candidates(tables, magicpig.simhash(q, proj, K, L), H // HKV)
    kv = heads // (H // HKV)
    return magicpig.sampled_attention(q, keys[kv, ids], values[kv, ids], mean, heads, kv, D ** -0.5, K, L, H), ids


def test_magicpig_equals_full_when_every_key_is_a_candidate():
    torch.manual_seed(0)
    q, keys, values = torch.randn(H, D), torch.randn(HKV, 200, D), torch.randn(HKV, 200, D)
    (out, lse), ids = _sampled(q, keys, values, K=1, L=2000, seed=0)
    assert len(ids) == H * 200
    full, full_lse = _full(q, keys, values, D ** -0.5)
    assert (out - full).abs().max() < 1e-4
    assert (lse - (full_lse - torch.log(torch.tensor(1 + magicpig.W_EPS)))).abs().max() < 1e-4


def test_magicpig_estimate_is_unbiased():
    """Over many hash draws, the importance-weighted sums average to the full ones, although each
    draw samples only a few percent of the keys."""
    torch.manual_seed(1)
    keys, values = torch.randn(HKV, 512, D), torch.randn(HKV, 512, D)
    q = 2.5 * torch.nn.functional.normalize(keys[torch.arange(H) // (H // HKV), torch.arange(H) * 7], dim=-1) * D ** 0.5
    q = q + torch.randn(H, D)
    full, full_lse = _full(q, keys, values, D ** -0.5)
    z = torch.exp(full_lse)
    zs, nums, fraction = [], [], []
    for seed in range(300):
        (out, lse), ids = _sampled(q, keys, values, K=10, L=150, seed=seed)
        zs.append(torch.exp(lse.double()))
        nums.append(out.double() * torch.exp(lse.double())[:, None])
        fraction.append(len(ids) / (H * 512))
    z_mean = torch.stack(zs).mean(0)
    out_mean = torch.stack(nums).mean(0) / z_mean[:, None]
    assert sum(fraction) / len(fraction) < 0.2
    # eps in ln(w + eps) biases down a little the weight of keys seldom sampled
    assert ((z_mean - z) / z).abs().max() < 0.05, ((z_mean - z) / z)
    assert ((out_mean - full).norm(dim=-1) / full.norm(dim=-1)).max() < 0.1


@pytest.mark.parametrize("aligned", [2.5, 0.0])  # attention on a few keys LSH finds; spread out
def test_coverage_is_the_attention_mass_the_sampled_keys_carry_on_average(aligned):
    """magicpig.coverage (what min_coverage is compared with) against hash draws: the softmax
    weight of the keys each draw samples, averaged over draws."""
    torch.manual_seed(2)
    keys, values = torch.randn(HKV, 512, D), torch.randn(HKV, 512, D)
    q = aligned * torch.nn.functional.normalize(keys[torch.arange(H) // (H // HKV), torch.arange(H) * 7], dim=-1) \
        * D ** 0.5 + torch.randn(H, D)
    K, L = 6, 40
    weights = torch.softmax(torch.einsum("hd,htd->ht", q, keys[torch.arange(H) // (H // HKV)]) * D ** -0.5, -1)
    mass = torch.zeros(H)
    draws = 200
    for seed in range(draws):
        proj = magicpig.projections(D, K, L, seed, 0)
        mean = keys.mean(1)
        tables = magicpig.BucketTables.build(magicpig.simhash(keys - mean[:, None], proj, K, L), K)
        heads, ids = magicpig.candidates(tables, magicpig.simhash(q, proj, K, L), H // HKV)
        mass += torch.zeros(H).index_add_(0, heads, weights[heads, ids]) / draws
    predicted = magicpig.coverage(q, keys, keys.mean(1), D ** -0.5, K, L)
    assert (predicted - mass).abs().max() < 0.03, (predicted, mass)
    assert (predicted > 0.5).all() if aligned else (predicted < 0.5).all()


def test_topk_with_every_key_is_full():
    torch.manual_seed(2)
    q, keys, values = torch.randn(H, D), torch.randn(HKV, 50, D), torch.randn(HKV, 50, D)
    out, lse = topk_attention(q, keys, values, 50, D ** -0.5)
    full, full_lse = _full(q, keys, values, D ** -0.5)
    assert (out - full).abs().max() < 1e-5 and (lse - full_lse).abs().max() < 1e-5
    out, _ = topk_attention(q, keys, values, 5, D ** -0.5)
    assert (out - full).abs().max() > 1e-3


@pytest.mark.parametrize("cache_dtype, softcap", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 1.0)])
def test_topk_c_kernel_matches_the_pytorch_oracle(cache_dtype, softcap):
    """paged_attention.topk_decode over scattered pages against topk_attention over the gathered
    range [start, end), merged with full attention over the positions outside it."""
    from kvserve.attention.merge import grouped_attention_with_lse, merge_state
    from kvserve.native import paged_attention
    page, n = 4, 61
    pool = PagePool(1, 40, page, HKV, D, dtype=cache_dtype)
    if not paged_attention.available(pool.k):
        pytest.skip("no C compiler here")
    torch.manual_seed(5)
    pool.k.normal_()
    pool.v.normal_()
    pages = torch.randperm(40)[:-(-n // page)]
    slots = (pages[:, None] * page + torch.arange(page)).flatten()[:n]
    keys, values = pool.k[0][:, slots], pool.v[0][:, slots]
    q = 2 * torch.randn(H, D)
    for start, end, k in [(4, 50, 7), (4, 50, 1), (0, 61, 10), (4, 50, 46), (4, 50, 100), (3, 3, 5)]:
        got = paged_attention.topk_decode(q, pool.k[0], pool.v[0], pages.to(torch.int32), n, start, end, k, page,
                                          D ** -0.5, softcap)
        outside = torch.cat([torch.arange(start), torch.arange(end, n)])
        out, lse = grouped_attention_with_lse(q, keys[:, outside].float(), values[:, outside].float(), D ** -0.5,
                                              softcap)
        if end > start:
            out_s, lse_s = topk_attention(q, keys[:, start:end], values[:, start:end], k, D ** -0.5, softcap)
            out, lse = merge_state(out, lse, out_s, lse_s) if len(outside) else (out_s, lse_s)
        assert (got - out).abs().max() < 1e-4, (start, end, k)


def test_streaming_never_reads_a_dropped_page():
    sink, window, page = 4, 10, 4
    for next_len in range(1, 60):
        dropped = droppable_pages(next_len, sink, window, page)
        for kv_len in range(next_len, next_len + 30):
            kept = kept_positions(kv_len, sink, window)
            assert kv_len - 1 in kept.tolist() and len(kept) == min(kv_len, sink + window)
            assert not set((kept // page).tolist()) & set(dropped)


@pytest.mark.parametrize("page_size, softcap", [(1, None), (16, None), (16, 0.5)])
def test_policy_backend_decode_matches_full_when_nothing_is_dropped(page_size, softcap):
    """One step: a full decode, a prefill chunk, and magicpig/topk/streaming decodes whose budgets
    cover every key, over scattered pages, against the dense backend alone; with Gemma 2's score
    cap (small enough to change every softmax) in both."""
    torch.manual_seed(3)
    kv_lens = [40, 30, 50, 45, 37]
    q_lens = [1, 6, 1, 1, 1]
    pages_needed = [-(-n // page_size) for n in kv_lens]
    pool = PagePool(2, sum(pages_needed) + 3, page_size, HKV, D)
    free = pool.allocate(sum(pages_needed) + 3)
    free = [free[i] for i in torch.randperm(len(free)).tolist()]  # no sequence's pages in order
    tables = [[free.pop() for _ in range(n)] for n in pages_needed]
    for layer in range(2):
        pool.k[layer].normal_()
        pool.v[layer].normal_()
    q = torch.randn(sum(q_lens), H, D)
    k, v = torch.randn(sum(q_lens), HKV, D), torch.randn(sum(q_lens), HKV, D)
    meta = AttentionMetadata.build(q_lens, tables, kv_lens, page_size)
    ref = TorchRefAttention(pool, H, D, softcap=softcap)
    ref.plan(meta)
    expected = [ref.run(layer, q, k, v) for layer in range(2)]

    class Seq:
        def __init__(self, pages, policy, prompt):
            self.tables, self.params, self.num_prompt_tokens, self.attn_state = [pages], None, prompt, None
            self.policy = policy
    policies = [parse_attention("magicpig:K=1,L=2000,window=3,dense_layers=0"),
                parse_attention("topk:k=1000,window=2"), parse_attention("streaming:sink=4,window=4096")]
    seqs = [Seq(tables[i + 2], p, kv_lens[i + 2] - 1) for i, p in enumerate(policies)]
    dense_meta = AttentionMetadata.build(q_lens[:2], tables[:2], kv_lens[:2], page_size)
    backend = PolicyAttention(TorchRefAttention(pool, H, D, softcap=softcap), pool, H, D, softcap=softcap)
    backend.plan([dense_meta], [torch.arange(7)], [(7 + i, s, kv_lens[i + 2]) for i, s in enumerate(seqs)])
    for layer in range(2):
        out = backend.run(layer, q, k, v)
        assert (out - expected[layer]).abs().max() < 1e-4, layer
    assert seqs[0].attn_state is not None and 1 in seqs[0].attn_state.layers


@pytest.mark.parametrize("K, L", [(10, 150), (15, 7), (1, 3)])  # K * L: 1500 (padded to 1504), 105, 3
def test_hash_kernel_gives_the_sign_bits_of_the_projections(K, L):
    """Codes from the C kernel (panels) and from PyTorch's matmul, against float64 projections:
    equal wherever no projection of the table is within rounding of zero."""
    panels = magicpig.projection_panels(proj := magicpig.projections(D, K, L, seed=3, layer=1))
    if magicpig._kernel("magicpig_hash") is None or torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        pytest.skip("no C compiler or no AVX2: simhash's PyTorch ops run instead")
    x = torch.randn(HKV, 101, D, generator=torch.Generator().manual_seed(K))  # rows: not a multiple of 48
    exact = (x.double() @ proj.double()).view(HKV, 101, L, K)
    expected = ((exact > 0).long() << torch.arange(K)).sum(-1)
    clear = exact.abs().amin(-1) > 1e-4  # [HKV, 101, L]
    assert clear.float().mean() > 0.95
    by_kernel = magicpig.simhash(x, None, K, L, panels)  # no matrix for PyTorch: only the kernel can answer
    for codes in (by_kernel, magicpig.simhash(x, proj, K, L)):
        assert codes.shape == (HKV, 101, L) and codes.dtype == torch.int64
        assert torch.equal(codes[clear], expected[clear])


@pytest.mark.parametrize("cache_dtype, softcap", [(torch.float32, None), (torch.bfloat16, None), (torch.float32, 2.0)])
def test_magicpig_c_kernels_match_their_torch_twins(cache_dtype, softcap, monkeypatch):
    """Table building, and a decode step (hashing the query and the keys that left the window,
    candidates with keys outside the tables, and the weighted softmax read in place from a
    scattered cache, with and without dense keys), against the PyTorch ops the C kernels replace."""
    _native("magicpig_decode")
    torch.manual_seed(4)
    K, L, t, p, new, slots_total = 3, 20, 400, 7, 3, 1000
    codes, extra = _codes(HKV, t, L, K), _codes(HKV, p, L, K, seed=1)

    def fresh_tables():
        tables = magicpig.BucketTables.build(codes, K)
        tables.add(extra)
        return tables
    k_cache = torch.randn(HKV, slots_total, D).to(cache_dtype)
    v_cache = torch.randn(HKV, slots_total, D).to(cache_dtype)
    perm = torch.randperm(slots_total)
    slots, dense = perm[:t + p + new], perm[-30:]  # sampled keys (the last 3 new to the tables), keys every head reads
    q, mean = 3 * torch.randn(H, D), k_cache.float().mean(1)
    proj = magicpig.projections(D, K, L, seed=0, layer=0)
    panels = magicpig.projection_panels(proj)
    qcodes = magicpig.simhash(q, proj, K, L, panels)
    step = dict(key_mean=mean, proj=proj, panels=panels, scale=D ** -0.5, K=K, L=L, softcap=softcap)
    kernel = {}
    for dense_slots in (torch.arange(0), dense):
        tables = fresh_tables()
        kernel[len(dense_slots)] = magicpig.sampled_decode(q, k_cache, v_cache, slots, dense_slots, tables=tables,
                                                           qcodes=qcodes, **step)
        assert 0 < kernel[len(dense_slots)][2] < H * len(slots)
        new_codes = magicpig.simhash(k_cache[:, slots[-new:]].float() - mean[:, None], proj, K, L, panels)
        assert tables.num_extra == p + new and torch.equal(tables.extra_codes[:, p:].long(), new_codes)
    if magicpig._kernel("magicpig_hash") is not None and torch.backends.cpu.get_cpu_capability() != "DEFAULT":
        hashed = magicpig.sampled_decode(q, k_cache, v_cache, slots, dense, tables=fresh_tables(), **step)
        assert all(torch.equal(a, b) for a, b in zip(hashed[:2], kernel[30][:2])) and hashed[2] == kernel[30][2]
    # no candidate at all (no table): nothing, with weight zero when merged; or the dense keys alone
    out, lse, n = magicpig.sampled_decode(q, k_cache, v_cache, slots[:0], torch.arange(0),
                                          tables=magicpig.BucketTables.build(codes[:, :0], K), qcodes=qcodes, **step)
    assert n == 0 and not out.any() and torch.isneginf(lse).all()
    out, lse, _ = magicpig.sampled_decode(q, k_cache, v_cache, slots[:0], dense,
                                          tables=magicpig.BucketTables.build(codes[:, :0], K), qcodes=qcodes, **step)
    full_out, full_lse = _full(q, k_cache[:, dense].float(), v_cache[:, dense].float(), D ** -0.5, softcap)
    assert (out - full_out).abs().max() < 1e-4 and (lse - full_lse).abs().max() < 1e-4

    monkeypatch.setattr(magicpig, "_kernel", lambda name: None)
    twin_tables = magicpig.BucketTables.build(codes, K)
    assert torch.equal(tables.sorted_ids, twin_tables.sorted_ids) and torch.equal(tables.offsets, twin_tables.offsets)
    for dense_slots in (torch.arange(0), dense):  # the twin merges a separate dense attention
        out, lse, n = kernel[len(dense_slots)]
        twin_out, twin_lse, twin_n = magicpig.sampled_decode(q, k_cache, v_cache, slots, dense_slots,
                                                             tables=fresh_tables(), qcodes=qcodes, **step)
        assert n == twin_n and (out - twin_out).abs().max() < 1e-4 and (lse - twin_lse).abs().max() < 1e-4
