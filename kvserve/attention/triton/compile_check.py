"""Compiles the kernels for a CUDA GPU on a machine without one (triton ships ptxas), with the
tiles and constexprs TritonAttention, the Triton MoE and the fused pointwise kernels launch them
with. It catches what only the compiler sees and the CPU interpreter does not: bfloat16 code paths,
types carried through loops, constexpr branches, shared memory over the limit. Run with
TRITON_INTERPRET unset:

    python -m kvserve.attention.triton.compile_check [--arch 90] [--dtypes bf16,fp16,fp32]
"""
import argparse
import os
import sys
import time

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
INT_ARGS = ("ItemReq", "ItemStart", "ItemEnd", "ReqRow", "ReqPageStart", "KvIndices", "MergeIndptr",
            "TileReq", "TileM0", "ReqQStart", "ReqQLen", "ReqKvLen", "Slots")


def variants(dtype: str, head_dim: int = 128, group: int = 4, page_size: int = 16, num_kv_heads: int = 8):
    """(kernel, pointer types, constexprs, launch options) of every launch the backend makes."""
    import triton
    from kvserve.attention.triton.cache_write import rope_write_kv_kernel, write_kv_kernel
    from kvserve.attention.triton.config import Tiles
    from kvserve.attention.triton.decode import decode_kernel, merge_kernel
    from kvserve.attention.triton.prefill import prefill_kernel
    t = Tiles.default(DTYPES[dtype], head_dim)
    prec = "ieee" if dtype == "fp32" else "tf32"
    bd = triton.next_power_of_2(head_dim)
    data = {"Q": f"*{dtype}", "KCache": f"*{dtype}", "VCache": f"*{dtype}", "Lse": "*fp32",
            "PartOut": "*fp32", "PartLse": "*fp32", "scale_log2": "fp32"} | {n: "*i32" for n in INT_ARGS}
    for split, softcap in ((False, 0.0), (True, 0.0), (False, 50.0)):  # softcap: Gemma 2's
        yield (decode_kernel, data | {"Out": "*fp32" if split else f"*{dtype}"},
               dict(GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), D=head_dim, BLOCK_D=bd,
                    BLOCK_N=t.decode_block_n, PAGE_SIZE=page_size, SPLIT=split, DOT_PREC=prec, SOFTCAP=softcap),
               dict(num_warps=t.decode_warps, num_stages=t.decode_stages))
    # causal: prefill (windowed: a sliding window layer's, soft-capped too); not: a cascade's shared prefix
    for causal, windowed, softcap in ((True, False, 0.0), (True, True, 50.0), (False, False, 0.0)):
        yield (prefill_kernel, data | {"Out": f"*{dtype}" if causal else "*fp32"},
               dict(GROUP=group, D=head_dim, BLOCK_D=bd, BLOCK_M=t.prefill_block_m, BLOCK_N=t.prefill_block_n,
                    PAGE_SIZE=page_size, CAUSAL=causal, WRITE_LSE=not causal, WINDOWED=windowed,
                    SOFTCAP=softcap, DOT_PREC=prec),
               dict(num_warps=t.prefill_warps, num_stages=t.prefill_stages))
    for shared in (False, True):
        yield (merge_kernel, data | {"Out": f"*{dtype}"},
               dict(D=head_dim, BLOCK_D=bd, MAX_PARTS=64, HAS_SHARED=shared), dict(num_warps=1))
    yield (write_kv_kernel, {n: f"*{dtype}" for n in ("K", "V", "KCache", "VCache")} | {"Slots": "*i32"},
           dict(HKV=num_kv_heads, BLOCK_H=triton.next_power_of_2(num_kv_heads), D=head_dim, BLOCK_D=bd),
           dict(num_warps=4))
    yield (rope_write_kv_kernel, {n: f"*{dtype}" for n in ("QK", "V", "Cos", "SignedSin", "QOut", "KCache", "VCache")}
           | {"Slots": "*i32"}, dict(H=group * num_kv_heads, HKV=num_kv_heads, BLOCK_HQ=triton.next_power_of_2(
               group * num_kv_heads), BLOCK_HKV=triton.next_power_of_2(num_kv_heads), D=head_dim), dict(num_warps=4))


def moe_variants(dtype: str, hidden: int = 2048, inter: int = 768, top_k: int = 8):
    """The two expert kernels of `fused_moe` at its decode and prefill block sizes (Qwen3-MoE's widths)."""
    from kvserve.model.moe_triton import BLOCK_K, BLOCK_N, down_kernel, gate_up_kernel
    prec = "ieee" if dtype == "fp32" else "tf32"
    ints = {"Pairs": "*i64", "BlockExpert": "*i64", "Weights": "*fp32"}
    for block_m in (16, 64):
        tiles = dict(I=inter, H=hidden, BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, DOT_PREC=prec)
        yield (gate_up_kernel, ints | {"X": f"*{dtype}", "W": f"*{dtype}", "Act": f"*{dtype}"},
               tiles | dict(TOP_K=top_k), {})
        yield down_kernel, ints | {"Act": f"*{dtype}", "W": f"*{dtype}", "Out": "*fp32"}, tiles, {}


def pointwise_variants(dtype: str, hidden: int = 4096, inter: int = 14336):
    """The fused norm (with and without the residual add, Llama's and Gemma's) and act * up (SiLU, GELU)."""
    import triton
    from kvserve.model.pointwise_triton import act_mul_kernel, add_rms_norm_kernel
    data = {n: f"*{dtype}" for n in ("X", "R", "W", "Out", "ResOut", "GateUp")} | {"eps": "fp32"}
    for has_res in (False, True):
        for offset in (False, True):
            yield (add_rms_norm_kernel, data, dict(HAS_RES=has_res, OFFSET=offset,
                                                   BLOCK=triton.next_power_of_2(hidden)), dict(num_warps=8))
    for gelu in (False, True):
        yield act_mul_kernel, data, dict(GELU=gelu, BLOCK=1024), dict(num_warps=4)


def compile_variant(kernel, types, constexprs, options, arch: int):
    """-> the compiled kernel's shared memory in bytes; raises on a compile error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {n: "constexpr" if n in constexprs else types.get(n, "i32") for n in kernel.arg_names}
    compiled = triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", arch, 32),
                              options=options)
    return compiled.metadata.shared


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m kvserve.attention.triton.compile_check", description=__doc__)
    p.add_argument("--arch", type=int, default=90, help="compute capability x10: 90 Hopper, 80 Ampere")
    p.add_argument("--dtypes", default="bf16,fp16,fp32")
    p.add_argument("--head-dims", default="128")
    p.add_argument("--smem-limit", type=int, default=227 * 1024, help="bytes of shared memory per block")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    failed = 0
    for dtype in args.dtypes.split(","):
        runs = [(f"d{d}", v) for d in map(int, args.head_dims.split(",")) for v in variants(dtype, d)]
        runs += [("moe", v) for v in moe_variants(dtype)] + [("pointwise", v) for v in pointwise_variants(dtype)]
        for label, (kernel, types, constexprs, options) in runs:
            start = time.perf_counter()
            flags = {k: v for k, v in constexprs.items()
                     if isinstance(v, bool) or k == "SOFTCAP" and v or k == "BLOCK_M" and label == "moe"}
            name = f"{kernel.__name__} {dtype} {label} {flags or ''}"
            try:
                smem = compile_variant(kernel, types, constexprs, options, args.arch)
            except Exception as e:  # report every variant, then fail
                print(f"FAIL {name}: {type(e).__name__}: {e}")
                failed += 1
                continue
            over = smem > args.smem_limit
            failed += over
            print(f"{'FAIL' if over else 'ok  '} {name}: {smem} B shared, {time.perf_counter() - start:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
