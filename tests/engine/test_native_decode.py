"""kvserve/native/decode.c: a whole decode step in C gives the logits of the PyTorch layers."""
import random

import pytest
import torch

from kvserve.model.llama import LlamaForCausalLM
from kvserve.model.loader import load_checkpoint
from kvserve.native.decode import NativeDecoder
from model.paged_forward import paged_logits
from tiny_models import make_hf_model, write_gguf


def int4_model(tmp_path, arch="llama", dtype=torch.float32):
    hf = make_hf_model(arch, hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    cfg, weights = load_checkpoint(str(write_gguf(hf, tmp_path / "tiny.gguf", "Q4_0")), "auto")
    model = LlamaForCausalLM.from_weights(cfg, weights, dtype)
    if not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    return model


@pytest.mark.parametrize("arch, dtype", [("llama", torch.float32), ("qwen2", torch.float32),  # qwen2: q/k/v biases
                                         ("llama", torch.bfloat16)])  # a bf16 KV cache
@pytest.mark.parametrize("chunk", [1, 7, 40])  # decode tokens; prompt chunks (of several blocks), causal within
def test_native_decode_gives_the_torch_layers_logits(tmp_path, arch, dtype, chunk):
    model = int4_model(tmp_path, arch, dtype)
    ids = torch.randint(3, 256, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    # 4-token pages, shuffled: the page table is walked, not a contiguous slice. A token a step is
    # the reference: PyTorch's own int4 kernel, which several rows take, rounds activations to bf16
    expected = paged_logits(model, ids, page_size=4, chunk=1)
    got = paged_logits(model, ids, page_size=4, chunk=chunk, native_decode=True)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    # logits near the top are rescored in fp32, the rest keep the int8 lm_head's bf16 rounding;
    # in bf16 PyTorch rounds activations after every op, where the kernel keeps them in fp32
    top_tol, tol = (1e-4, 1e-2) if dtype == torch.float32 else (3e-2, 5e-2)
    torch.testing.assert_close(got.amax(-1), expected.amax(-1), atol=top_tol, rtol=top_tol)
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


def test_a_batch_of_decodes_gives_each_sequence_s_own_logits(tmp_path):
    """Decodes of sequences of different lengths in one call, each over its own shuffled pages."""
    from kvserve.kv.pool import PagePool
    model = int4_model(tmp_path)
    cfg, g = model.config, torch.Generator().manual_seed(2)
    seqs = [torch.randint(3, 256, (n,), generator=g).tolist() for n in (9, 30, 17)]
    expected = torch.stack([paged_logits(model, ids, page_size=4, chunk=1)[-1] for ids in seqs])
    pool = PagePool(cfg.num_layers, 40, 4, cfg.num_kv_heads, cfg.head_dim, model.dtype)
    pages = pool.allocate(pool.num_pages)
    random.Random(1).shuffle(pages)
    decoder = NativeDecoder(model, pool)
    tables = [pages[0:3], pages[3:11], pages[11:16]]
    with torch.inference_mode():
        for ids, table in zip(seqs, tables):  # each prompt but its last token
            for start in range(0, len(ids) - 1, 8):
                end = min(start + 8, len(ids) - 1)
                # rows=[]: no hidden states wanted, the last layer writes K/V and stops
                assert decoder(ids[start:end], list(range(start, end)), table, [0] * (end - start), rows=[]).numel() == 0
        flat = [p for t in tables for p in t]
        last = ([ids[-1] for ids in seqs], [len(ids) - 1 for ids in seqs], flat, [0, 3, 11])
        got = model.compute_logits(decoder(*last))
        assert torch.equal(model.compute_logits(decoder(*last, rows=[0, 2])), got[[0, 2]])
    assert torch.equal(got.argmax(-1), expected.argmax(-1))
    torch.testing.assert_close(got, expected, atol=1e-2, rtol=1e-2)


def test_engine_runs_decode_steps_natively(tmp_path, smollm2_tokenizer):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine
    from kvserve.engine.executors import NativeExecutor
    from kvserve.engine.request import SamplingParams
    model = int4_model(tmp_path)

    def generate(engine, prompts):
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        ids = [engine.add_request(p, params) for p in prompts]
        done = {}
        while engine.has_unfinished():
            done |= {o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished}
        return [done[i] for i in ids]

    # the reference: PyTorch layers, a token a step
    reference = Engine(EngineConfig(cache=CacheConfig(num_pages=64), scheduler=SchedulerConfig(1, 64)),
                       model=model, tokenizer=smollm2_tokenizer)
    reference.runner.executor = reference.runner.executor.fallback  # the PyTorch executor
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 60))]
    expected = [generate(reference, [p])[0] for p in prompts]

    engine = Engine(EngineConfig(cache=CacheConfig(num_pages=64)), model=model, tokenizer=smollm2_tokenizer)
    assert isinstance(engine.runner.executor, NativeExecutor)
    decoder, calls = engine.runner.executor.decoder, []

    def counted(*args, **kwargs):
        calls.append(args)
        return decoder(*args, **kwargs)
    engine.runner.executor.decoder = counted
    assert [generate(engine, [p])[0] for p in prompts[:2]] == expected[:2]
    assert len(calls) == 2 * 8  # every step of a lone stream: its whole prompt, then 7 decodes
    calls.clear()
    assert generate(engine, prompts) == expected  # three streams at once
    assert [len(c[0]) for c in calls] == [48] + [3] * 7  # their prompts in one step, then 7 decode steps


def test_without_c_kernels_the_pytorch_twins_run(tmp_path, monkeypatch):
    """No compiler (or KVSERVE_NATIVE=0): PyTorch's int4 and int8 kernels, a per-row lm_head."""
    from kvserve.model.quant import QuantizedLinear
    from kvserve.native import qmatmul
    ids = torch.randint(3, 256, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    expected = paged_logits(int4_model(tmp_path), ids, chunk=1, native_decode=True)
    monkeypatch.setattr(qmatmul, "_kernels", lambda: None)
    twin = LlamaForCausalLM.from_weights(*load_checkpoint(str(tmp_path / "tiny.gguf"), "auto"), torch.float32)
    assert isinstance(twin.lm_head, QuantizedLinear) and not NativeDecoder.supports(twin)
    got = paged_logits(twin, ids, chunk=1)
    # PyTorch's kernels round activations to bf16
    torch.testing.assert_close(got, expected, atol=0.05, rtol=0.05)
