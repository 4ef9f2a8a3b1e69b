"""Static decode attention (the buffers CUDA graphs replay) against attention in float64: ragged
lengths, batches padded to a bucket, page sizes 1 and 16, GQA; the PyTorch reference and the
Triton kernel (under the interpreter without a GPU)."""
import importlib.util
import random

import pytest
import torch


from kvserve.attention.static_decode import StaticDecodeAttention  # noqa: E402
from kvserve.kv.pool import PagePool  # noqa: E402

BACKENDS = ["torch"] + (["triton"] if importlib.util.find_spec("triton") else [])
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def backend(name):
    if name == "torch":
        return StaticDecodeAttention
    from kvserve.attention.triton.static import TritonStaticDecode
    return TritonStaticDecode


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("page_size,hkv,group,d", [(16, 2, 1, 64), (1, 1, 4, 32), (16, 2, 4, 128)])
def test_static_decode_matches_float64(name, page_size, hkv, group, d):
    rng = random.Random(page_size + group)
    torch.manual_seed(0)
    dtype, max_batch, max_pages = torch.float32, 8, -(-70 // page_size)
    kv_lens = [1, 5, 33, 70, 17][:3 if page_size == 1 else 5]
    pool = PagePool(1, max_batch * max_pages + 1, page_size, hkv, d, dtype, DEVICE)
    free = pool.allocate(pool.num_pages)
    rng.shuffle(free)
    scratch = free.pop()
    tables = [[free.pop() for _ in range(-(-n // page_size))] for n in kv_lens]
    pool.k.normal_()
    pool.v.normal_()
    attn = backend(name)(pool, hkv * group, d, max_batch, max_pages, scratch)
    bucket = 4 if len(kv_lens) <= 4 else 8  # padding rows past the batch
    attn.plan([[t] for t in tables], kv_lens, bucket)
    q, k, v = (torch.randn(bucket, h, d, device=DEVICE) for h in (hkv * group, hkv, hkv))
    out = attn.run(0, q, k, v).cpu()
    q, k, v = q.cpu(), k.cpu(), v.cpu()
    for i, (pages, n) in enumerate(zip(tables, kv_lens)):
        slots = torch.tensor([pages[p // page_size] * page_size + p % page_size for p in range(n)])
        keys, values = pool.k[0].cpu()[:, slots].double(), pool.v[0].cpu()[:, slots].double()  # [Hkv, n, D]
        assert torch.equal(keys[:, -1].float(), k[i]) and torch.equal(values[:, -1].float(), v[i])
        qi = q[i].double().view(hkv, group, d)
        probs = (qi @ keys.transpose(1, 2) * d ** -0.5).softmax(-1)
        torch.testing.assert_close(out[i].double(), (probs @ values).reshape(-1, d), atol=2e-5, rtol=2e-5)
    # the padding rows wrote the scratch page's first slot only
    assert torch.equal(pool.k[0][:, scratch * page_size].cpu(), k[bucket - 1])


@pytest.mark.parametrize("name,dtype", [("torch", torch.float32)] + [(n, dt) for n in BACKENDS if n == "triton"
                                                                     for dt in (torch.float32, torch.float16)])
@pytest.mark.parametrize("page_size", [1, 4])
def test_static_decode_over_kv_groups(name, dtype, page_size):
    """Three KV groups (window 5 on layers 0, 1, 4, 5; full on 2, 3) in a pool of two slots a page:
    each layer reads its group's own table at its slot. The windowed groups' pages before the
    window are -1 (given back), which the buffers point at the scratch page: for the Triton kernel,
    which reads only the window, the scratch page is NaN."""
    from kvserve.kv.groups import KVGroups
    windows = [5, 5, None, None, 5, 5]
    groups = KVGroups.from_windows(windows)
    assert len(groups) == 3 and groups.slots == 2
    rng = random.Random(page_size)
    torch.manual_seed(page_size)
    hkv, group, d, max_batch = 2, 2, 32, 4
    kv_lens = [13, 1, 6]
    max_pages = -(-16 // page_size)
    pool = PagePool(groups.slots, 3 * 3 * max_pages + 2, page_size, hkv, d, dtype, DEVICE)
    free = pool.allocate(pool.num_pages)
    rng.shuffle(free)
    scratch = free.pop()
    pool.k.normal_()
    pool.v.normal_()
    tables = []  # per sequence, per group
    for n in kv_lens:
        seq = []
        for w in groups.windows:
            pages = [free.pop() for _ in range(-(-n // page_size))]
            gone = 0 if w is None else max(0, n - w) // page_size  # wholly before the window
            seq.append([-1] * gone + pages[gone:])
        tables.append(seq)
    if name == "triton":
        pool.k[:, :, scratch * page_size:(scratch + 1) * page_size] = float("nan")
        pool.v[:, :, scratch * page_size:(scratch + 1) * page_size] = float("nan")
    attn = backend(name)(pool, hkv * group, d, max_batch, max_pages, scratch, windows=windows, groups=groups)
    attn.plan(tables, kv_lens, len(kv_lens))
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    for layer, w in enumerate(windows):
        g, slot = groups.group_of[layer], groups.slot_of[layer]
        q, k, v = (torch.randn(len(kv_lens), h, d, device=DEVICE, dtype=dtype) for h in (hkv * group, hkv, hkv))
        out = attn.run(layer, q, k, v).cpu()
        for i, n in enumerate(kv_lens):
            first = 0 if w is None else max(0, n - w)
            pages = tables[i][g]
            slots = torch.tensor([pages[p // page_size] * page_size + p % page_size for p in range(first, n)])
            keys, values = pool.k[slot].cpu()[:, slots].double(), pool.v[slot].cpu()[:, slots].double()
            assert torch.equal(keys[:, -1], k[i].cpu().double())
            qi = q[i].cpu().double().view(hkv, group, d)
            probs = (qi @ keys.transpose(1, 2) * d ** -0.5).softmax(-1)
            torch.testing.assert_close(out[i].double(), (probs @ values).reshape(-1, d), atol=tol, rtol=tol)


def test_rows_kept_between_plans_match_a_fresh_plan():
    """plan() rewrites only the rows whose page list changed: over random steps (tables growing a
    page, pages given back as -1, a table cut and regrown to its old length with other pages, rows
    shifting as sequences leave, buckets shrinking to padding) every column a row reads, its
    length and its slots equal those of a plan made from nothing; in a full group and in a
    windowed one (columns from the window's first page on)."""
    from kvserve.kv.groups import KVGroups
    rng = random.Random(0)
    page, max_batch, max_pages, window = 4, 8, 6, 6
    groups = KVGroups.from_windows([None, window])
    pool = PagePool(groups.slots, 64, page, 1, 8, torch.float32, "cpu")
    scratch = pool.allocate(1)[0]

    def new_table(n):
        return [[rng.randrange(1, 64) for _ in range(-(-n // page))] for _ in groups.windows]
    kept = StaticDecodeAttention(pool, 1, 8, max_batch, max_pages, scratch, windows=[None, window], groups=groups)
    lens = [rng.randrange(1, 12) for _ in range(max_batch)]
    tables = [new_table(n) for n in lens]
    for step in range(300):
        for i, seq in enumerate(tables):
            lens[i] = min(lens[i] + 1, max_pages * page)
            for g, table in enumerate(seq):
                while len(table) < -(-lens[i] // page):
                    table.append(rng.randrange(1, 64))
                change = rng.random()
                if change < 0.05 and len(table) > 1:
                    table[rng.randrange(len(table) - 1)] = -1  # behind a sliding window
                elif change < 0.1:
                    keep = len(table)
                    del table[max(1, keep - 1):]
                    table.extend(rng.randrange(1, 64) for _ in range(keep - len(table)))
        if rng.random() < 0.1 and len(tables) > 1:
            i = rng.randrange(len(tables))
            del tables[i], lens[i]
        elif rng.random() < 0.1 and len(tables) < max_batch:
            lens.append(rng.randrange(1, 12))
            tables.append(new_table(lens[-1]))
        bucket = next(b for b in (1, 2, 4, 8) if b >= len(tables))
        kept.plan(tables, lens, bucket)
        fresh = StaticDecodeAttention(pool, 1, 8, max_batch, max_pages, scratch, windows=[None, window],
                                      groups=groups)
        fresh.plan(tables, lens, bucket)
        for g, w in enumerate(groups.windows):
            for row, length in enumerate(lens + [1] * (bucket - len(lens))):
                first, used = (0 if w is None else max(0, length - w) // page), -(-length // page)
                assert kept.block_table[g, row, first:used].tolist() == fresh.block_table[g, row, first:used].tolist(), \
                    (step, g, row)
        assert torch.equal(kept.kv_lens[:bucket], fresh.kv_lens[:bucket])
        assert torch.equal(kept.slots[:, :bucket], fresh.slots[:, :bucket])
