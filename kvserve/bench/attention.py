"""kvserve bench attention: the Triton paged-attention kernels against torch's SDPA on the same data.

Decode: one query token per sequence over (batch x KV length) paged K/V (shuffled pages); time per
call and achieved bandwidth (K/V bytes read / time), beside SDPA over the same K/V laid out dense
(the query heads of a KV head as SDPA's query rows, so it reads K/V once, as the kernel does).
Prefill: one dense causal prompt, TFLOP/s of each. Only torch and triton are imported, so it runs
on a GPU host without the serving stack (also as `python -m kvserve.bench.attention`).
--device cpu runs tiny sizes under triton's interpreter: a smoke test, not a measurement."""
import argparse
import os
import random
import sys
import time

import torch
import torch.nn.functional as F

from kvserve.args import at_least_one, token_lengths

CUDA_DEFAULTS = dict(batches=[1, 16, 64, 256], kv_lens=[1024, 4096, 32768], prefill_lens=[1024, 4096])
CPU_DEFAULTS = dict(batches=[1, 3], kv_lens=[40], prefill_lens=[24])
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                   help="cpu: tiny sizes under TRITON_INTERPRET=1, to exercise the command")
    p.add_argument("--batches", type=token_lengths, default=None, help="decode batch sizes (default 1,16,64,256)")
    p.add_argument("--kv-lens", type=token_lengths, default=None, help="decode KV lengths (default 1024,4096,32768)")
    p.add_argument("--prefill-lens", type=token_lengths, default=None, help="prompt lengths (default 1024,4096)")
    p.add_argument("--num-heads", type=at_least_one, default=None, help="query heads (default 32; cpu 4)")
    p.add_argument("--num-kv-heads", type=at_least_one, default=None, help="KV heads (default 8; cpu 2)")
    p.add_argument("--head-dim", type=at_least_one, default=None, help="default 128; cpu 64")
    p.add_argument("--page-size", type=at_least_one, default=16)
    p.add_argument("--dtype", default=None, choices=list(DTYPES), help="default bfloat16; cpu float16")
    p.add_argument("--max-kv-tokens", type=at_least_one, default=1 << 22,
                   help="skip decode cases with more KV tokens than this (memory)")
    p.add_argument("--iters", type=at_least_one, default=None, help="timed calls per case (default 20; cpu 1)")
    p.add_argument("--tiles", default="", help="kernel settings to change, e.g. prefill_block_m=64,decode_warps=8 "
                   "(fields of kvserve.attention.triton.config.Tiles)")
    p.add_argument("--sweep", action="store_true",
                   help="time alternative tile settings on the first decode and prefill cases instead")


def main(args) -> int:
    cpu = args.device == "cpu"
    if cpu:  # before the kernels are defined
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        print("kvserve bench attention: no CUDA device (use --device cpu for the interpreter smoke run)",
              file=sys.stderr)
        return 2
    defaults = CPU_DEFAULTS if cpu else CUDA_DEFAULTS
    batches = args.batches or defaults["batches"]
    kv_lens = args.kv_lens or defaults["kv_lens"]
    prefill_lens = args.prefill_lens or defaults["prefill_lens"]
    h = args.num_heads or (4 if cpu else 32)
    hkv = args.num_kv_heads or (2 if cpu else 8)
    d = args.head_dim or (64 if cpu else 128)
    dtype = DTYPES[args.dtype or ("float16" if cpu else "bfloat16")]
    iters = args.iters or (1 if cpu else 20)
    if h % hkv:
        print("kvserve bench attention: --num-heads must be a multiple of --num-kv-heads", file=sys.stderr)
        return 2
    from kvserve.attention.triton.config import Tiles
    try:
        tiles = Tiles.default(dtype, d).with_(args.tiles)
    except ValueError as e:
        print(f"kvserve bench attention: {e}", file=sys.stderr)
        return 2
    shape = dict(h=h, hkv=hkv, d=d, page=args.page_size, dtype=dtype, device=args.device, iters=iters, tiles=tiles)
    dtype_name = str(dtype).removeprefix("torch.")
    print(f"attention: {h} query heads, {hkv} KV heads, head dim {d}, {dtype_name}, "
          f"page {args.page_size}, {torch.cuda.get_device_name() if not cpu else 'cpu (interpreter)'}")
    if not cpu:
        print(f"device copy bandwidth: {copy_bandwidth() / 1e9:.0f} GB/s (read + write)")
    print("speedup: SDPA's time over Triton's (above 1: Triton is faster)")
    if args.sweep:
        return sweep(batches[0], kv_lens[0], prefill_lens[0], shape)
    print(f"tiles: {tiles}")
    print(f"\n{'decode':<8}{'batch':>6}{'kv len':>8}{'triton us':>11}{'GB/s':>8}{'sdpa us':>10}{'GB/s':>8}"
          f"{'speedup':>9}{'max err':>9}")
    for batch in batches:
        for kv_len in kv_lens:
            if batch * kv_len > args.max_kv_tokens:
                print(f"{'':<8}{batch:>6}{kv_len:>8}  skipped (over --max-kv-tokens)")
                continue
            t_tri, t_ref, err = bench_decode(batch, kv_len, **shape)
            nbytes = 2 * batch * kv_len * hkv * d * dtype.itemsize
            print(f"{'':<8}{batch:>6}{kv_len:>8}{t_tri * 1e6:>11.1f}{nbytes / t_tri / 1e9:>8.0f}"
                  f"{t_ref * 1e6:>10.1f}{nbytes / t_ref / 1e9:>8.0f}{t_ref / t_tri:>8.2f}x{err:>9.1e}")
    print(f"\n{'prefill':<8}{'len':>6}{'triton ms':>12}{'TFLOP/s':>9}{'sdpa ms':>10}{'TFLOP/s':>9}"
          f"{'speedup':>9}{'max err':>9}")
    for length in prefill_lens:
        t_tri, t_ref, err = bench_prefill(length, **shape)
        flops = 4 * length * length * d * h / 2  # QK^T and PV, causal half
        print(f"{'':<8}{length:>6}{t_tri * 1e3:>12.3f}{flops / t_tri / 1e12:>9.1f}{t_ref * 1e3:>10.3f}"
              f"{flops / t_ref / 1e12:>9.1f}{t_ref / t_tri:>8.2f}x{err:>9.1e}")
    return 0


def paged_case(q_lens, kv_lens, h, hkv, d, page, dtype, device, tiles):
    """A one-layer pool holding the K/V of kv_lens over shuffled pages, the planned backend, and the
    same K/V dense [batch, Hkv, S, D] (all kv_lens equal)."""
    from kvserve.attention.metadata import AttentionMetadata
    from kvserve.attention.triton import TritonAttention
    from kvserve.kv.pool import PagePool
    per_seq = -(-kv_lens[0] // page)
    pool = PagePool(1, per_seq * len(kv_lens), page, hkv, d, dtype, device)
    pages = list(range(pool.num_pages))
    random.Random(0).shuffle(pages)
    tables = [pages[i * per_seq:(i + 1) * per_seq] for i in range(len(kv_lens))]
    pool.k.normal_(), pool.v.normal_()
    meta = AttentionMetadata.build(q_lens, tables, kv_lens, page)
    attn = TritonAttention(pool, h, d, tiles=tiles)
    attn.plan(meta)
    slots = torch.cat([meta.token_slots(i, 0, n) for i, n in enumerate(kv_lens)]).to(device)
    dense = [c[0][:, slots].view(hkv, len(kv_lens), kv_lens[0], d).transpose(0, 1).contiguous()
             for c in (pool.k, pool.v)]
    return attn, dense


def bench_decode(batch, kv_len, h, hkv, d, page, dtype, device, iters, tiles):
    attn, (k, v) = paged_case([1] * batch, [kv_len] * batch, h, hkv, d, page, dtype, device, tiles)
    q = torch.randn(batch, h, d, dtype=dtype, device=device)
    qg = q.view(batch, hkv, h // hkv, d)  # a KV head's query heads as SDPA's query rows
    out = attn.attend(0, q)
    ref = F.scaled_dot_product_attention(qg, k, v).reshape(batch, h, d)
    err = (out.float() - ref.float()).abs().max().item()
    return (timeit(lambda: attn.attend(0, q), iters, device),
            timeit(lambda: F.scaled_dot_product_attention(qg, k, v), iters, device), err)


def bench_prefill(length, h, hkv, d, page, dtype, device, iters, tiles):
    attn, (k, v) = paged_case([length], [length], h, hkv, d, page, dtype, device, tiles)
    q = torch.randn(length, h, d, dtype=dtype, device=device)
    # SDPA's flash kernel wants K/V with every query head: expanded once, outside the timing
    qs = q.transpose(0, 1)[None]
    ks, vs = (x.repeat_interleave(h // hkv, 1) for x in (k, v))
    out = attn.attend(0, q)
    ref = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)[0].transpose(0, 1)
    err = (out.float() - ref.float()).abs().max().item()
    return (timeit(lambda: attn.attend(0, q), iters, device),
            timeit(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True), iters, device), err)


# alternatives --sweep times: (block_n, warps, stages) of decode; (block_m, block_n, warps, stages) of prefill
DECODE_SWEEP = [(n, w, st) for n in (32, 64, 128) for w in (4, 8) for st in (2, 3)]
PREFILL_SWEEP = [(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3),
                 (128, 128, 8, 2), (64, 32, 4, 3), (128, 64, 4, 3)]


def sweep(batch, kv_len, length, shape) -> int:
    """Each alternative on one decode and one prefill case; a setting that fails to compile
    (shared memory) is reported and skipped."""
    from dataclasses import replace
    base, h, hkv, d, itemsize = shape["tiles"], shape["h"], shape["hkv"], shape["d"], shape["dtype"].itemsize
    print(f"decode sweep, batch {batch} x {kv_len}:")
    for n, w, st in DECODE_SWEEP:
        tiles = replace(base, decode_block_n=n, decode_warps=w, decode_stages=st)
        label = f"  block_n={n:<4} warps={w} stages={st}"
        try:
            t, _, err = bench_decode(batch, kv_len, **shape | {"tiles": tiles})
        except Exception as e:  # noqa: BLE001 - out of resources and the like: next setting
            print(f"{label}  failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        print(f"{label}  {t * 1e6:9.1f} us  {2 * batch * kv_len * hkv * d * itemsize / t / 1e9:6.0f} GB/s"
              f"  err {err:.1e}")
    print(f"prefill sweep, causal {length}:")
    for m, n, w, st in PREFILL_SWEEP:
        tiles = replace(base, prefill_block_m=m, prefill_block_n=n, prefill_warps=w, prefill_stages=st)
        label = f"  block_m={m:<4} block_n={n:<4} warps={w} stages={st}"
        try:
            t, _, err = bench_prefill(length, **shape | {"tiles": tiles})
        except Exception as e:  # noqa: BLE001
            print(f"{label}  failed: {type(e).__name__}: {str(e)[:100]}")
            continue
        print(f"{label}  {t * 1e3:8.3f} ms  {2 * length * length * d * h / t / 1e12:6.1f} TFLOP/s  err {err:.1e}")
    return 0


def timeit(fn, iters: int, device: str) -> float:
    """Seconds per call: after a warm-up (compiles), CUDA events around iters calls."""
    fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters
    for _ in range(2):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def copy_bandwidth(nbytes: int = 1 << 30) -> float:
    """Bytes moved per second (read + write) by a device-to-device copy: the practical HBM peak."""
    src = torch.empty(nbytes // 2, dtype=torch.float16, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), 10, "cuda")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m kvserve.bench.attention", description=__doc__)
    add_args(parser)
    sys.exit(main(parser.parse_args()))
