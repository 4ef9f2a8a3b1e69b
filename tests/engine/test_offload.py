"""MagicPIG with offload through the engine, the "GPU" side on the CPU: the split (host pool, dense
pool, staged copies, the CPU part merged with the device part) decodes what MagicPIG without offload
decodes, the main pool keeps only sinks, window and generated tokens, and page accounting balances
on all three pools after random workloads with preemption and aborts."""
import random

import pytest
import torch

from kvserve.engine.request import SamplingParams
from strict_devices import strict_devices

GREEDY = dict(temperature=0, ignore_eos=True)
POLICY = "magicpig:K=4,L=30,sink=4,window=8,dense_layers=0;2"


@pytest.fixture(scope="module")
def model():
    """A random 4-layer Llama: layers 0 and 2 dense, 1 and 3 sampled."""
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import hf_config
    from tiny_models import make_hf_model
    hf = make_hf_model("llama", vocab_size=512, num_hidden_layers=4, max_position_embeddings=256, seed=7)
    config = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    return LlamaForCausalLM.from_weights(hf_config(config), hf.state_dict())


def _engine(model, tokenizer, attention, num_pages=128, offload_pages=None, prefix=True, max_seqs=8):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine
    cfg = EngineConfig(cache=CacheConfig(4, num_pages, None, prefix, offload_pages=offload_pages),
                       scheduler=SchedulerConfig(256, max_seqs), attention=attention)
    return Engine(cfg, model=model, tokenizer=tokenizer)


def _run(engine, prompts, max_tokens=20, attention=None):
    ids = [engine.add_request(p, SamplingParams(max_tokens=max_tokens, attention=attention, **GREEDY))
           for p in prompts]
    return _finish(engine, ids)


def _finish(engine, ids):
    """Steps the engine until every request is done: their output tokens."""
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out
    return [done[i].outputs[0].token_ids for i in ids]


def _prompts(n, seed=0, lengths=(30, 70)):
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(rng.randrange(*lengths))] for _ in range(n)]


def test_offload_decodes_what_magicpig_on_the_device_decodes(model, smollm2_tokenizer):
    prompts = _prompts(3)
    on_device = _engine(model, smollm2_tokenizer, POLICY)
    split = _engine(model, smollm2_tokenizer, POLICY + ",offload=true", offload_pages=128)
    expected = _run(on_device, prompts)
    assert _run(split, prompts) == expected
    pa, pb = on_device.runner.policy_attention, split.runner.policy_attention
    assert pa.sampled_pairs == pb.sampled_pairs > 0  # the same keys sampled
    assert pb.offloaded.seconds["cpu_sampled"] > 0
    split.kv.check_integrity([])
    assert split.offload.host.num_free == split.offload.host.num_pages


def test_layers_below_min_coverage_attend_densely_with_offload_too(model, smollm2_tokenizer):
    """min_coverage=1: every sampled layer falls back to dense attention, on the device and on the
    host alike, which then decode full attention's tokens and read every key."""
    prompts = _prompts(3)
    full = _run(_engine(model, smollm2_tokenizer, "full"), prompts)
    for policy, pages in ((POLICY, None), (POLICY + ",offload=true", 128)):
        engine = _engine(model, smollm2_tokenizer, policy + ",min_coverage=1", offload_pages=pages)
        assert _run(engine, prompts) == full, policy
        pa = engine.runner.policy_attention
        assert pa.sampled_pairs == 0 and pa.keys_read == pa.keys_total > 0


@pytest.mark.parametrize("policy", [POLICY, POLICY + ",offload=true", "streaming:sink=4,window=8"])
def test_a_cached_prompt_s_last_token_is_computed_as_uncached(model, smollm2_tokenizer, policy):
    """A prefix hit leaves the last prompt token alone in its step. It is still the prompt's: full
    attention, its K/V staged for offload, not a policy decode (offload then sampled rows that had
    not reached the host yet: SmolLM2's passkey with offload fell from 100% to 0-25%)."""
    prompt = _prompts(1, seed=3, lengths=(41, 42))[0]  # 10 pages of 4 and one token
    offload = 128 if "offload" in policy else None
    cold = _run(_engine(model, smollm2_tokenizer, policy, offload_pages=offload, prefix=False), [prompt])
    warm = _engine(model, smollm2_tokenizer, policy, offload_pages=offload)
    _run(warm, [prompt], attention=policy.replace(",offload=true", ""))  # caches the prompt's pages
    hits = warm.kv.prefix.hit_tokens
    assert _run(warm, [prompt]) == cold
    assert warm.kv.prefix.hit_tokens - hits == 40


def test_a_preempted_decode_whose_pages_are_cached_reads_staged_rows(model, smollm2_tokenizer):
    """Preempted, then readmitted with every computed token cached: its next token is a policy decode
    at once, in the step that takes the cached pages. The rows it samples are staged to the host first,
    so it decodes what it would have without the preemption. (A window of 1: the sampled range is the
    whole prompt from the first decode on, so tables rebuilt after the preemption are the same.)"""
    policy = POLICY.replace("window=8", "window=1") + ",offload=true"
    prompt = _prompts(1, seed=4, lengths=(41, 42))[0]
    expected = _run(_engine(model, smollm2_tokenizer, policy, offload_pages=128), [prompt])
    engine = _engine(model, smollm2_tokenizer, policy, offload_pages=128)
    rid = engine.add_request(prompt, SamplingParams(max_tokens=20, **GREEDY))
    seq = engine.requests[rid].seqs[0]
    while not (len(seq.token_ids) > len(prompt) + 4 and (len(seq.token_ids) - 1) % 4 == 0):
        engine.step()
    engine.scheduler.preempt(seq)  # its pages, all full, stay in the prefix cache
    hits, cached = engine.kv.prefix.hit_tokens, len(seq.token_ids) - 1
    assert _finish(engine, [rid]) == expected
    assert engine.kv.prefix.hit_tokens - hits == cached


def test_teacher_forced_logits_with_offload_are_magicpig_s(model, smollm2_tokenizer):
    """kvserve eval longctx's forced_logits runs the steps itself: offload's rows reach its pools there
    too (they did not: SmolLM2's top-1 agreement with full under offload read 19%)."""
    from kvserve.attention.policy import parse_attention
    from kvserve.eval.longctx import forced_logits
    engine = _engine(model, smollm2_tokenizer, POLICY + ",offload=true", offload_pages=128)
    ids = _prompts(1, seed=5, lengths=(60, 61))[0]
    on_device = forced_logits(engine, ids, 40, parse_attention(POLICY))
    split = forced_logits(engine, ids, 40, parse_attention(POLICY + ",offload=true"))
    torch.testing.assert_close(split, on_device, atol=1e-5, rtol=1e-5)


def test_main_pool_keeps_only_the_sinks_window_and_generated_tokens(model, smollm2_tokenizer):
    engine = _engine(model, smollm2_tokenizer, POLICY + ",offload=true", offload_pages=64, prefix=False)
    rid = engine.add_request(list(range(10, 90)), SamplingParams(max_tokens=6, **GREEDY))
    seq = engine.requests[rid].seqs[0]
    engine.step()  # the prompt
    held = sum(p >= 0 for p in seq.pages)
    assert held <= 1 + 3 + 1  # the sink page, the window's pages, the page being filled
    assert len(seq.offload.host) == len(seq.offload.dense) == 80 // 4 and seq.offload.synced == 80
    while engine.has_unfinished():
        assert all(o.error is None for o in engine.step())
    engine.kv.check_integrity([])


def test_offload_runs_with_every_tensor_on_its_pool_device(model, smollm2_tokenizer):
    """The split's index and copy path under strict_devices(): its decode steps make no tensor on
    the default device (only its prefill, through the dense backend, runs outside)."""
    engine = _engine(model, smollm2_tokenizer, POLICY + ",offload=true", offload_pages=64)
    rid = engine.add_request(list(range(10, 60)), SamplingParams(max_tokens=4, **GREEDY))
    engine.step()  # the prompt
    pa = engine.runner.policy_attention
    plan, run = pa.plan, pa.run
    pa.plan = lambda *a: _strict(plan, *a)
    pa.run = lambda *a: _strict(run, *a)
    while engine.has_unfinished():
        assert all(o.error is None for o in engine.step())
    assert rid not in engine.requests and pa.offloaded.seconds["cpu_sampled"] > 0


def _strict(fn, *args):
    with strict_devices():
        return fn(*args)


def test_offload_requests_are_checked(model, smollm2_tokenizer):
    plain = _engine(model, smollm2_tokenizer, "full")
    with pytest.raises(ValueError, match="engine started"):
        plain.add_request([5] * 10, SamplingParams(attention=POLICY + ",offload=true"))
    split = _engine(model, smollm2_tokenizer, POLICY + ",offload=true", offload_pages=16)
    with pytest.raises(ValueError, match="dense_layers"):
        split.add_request([5] * 10, SamplingParams(attention="magicpig:offload=true,dense_layers=0"))
    with pytest.raises(ValueError, match="n=1"):
        split.add_request([5] * 10, SamplingParams(n=2))
    split.add_request([5] * 10, SamplingParams(attention="full", max_tokens=2))  # others run as usual
    while split.has_unfinished():
        split.step()


@pytest.mark.parametrize("seed", [0, 1])
def test_page_accounting_balances_on_every_pool_after_preemption_and_aborts(model, smollm2_tokenizer, seed):
    """Small pools (the main one and the host one each run out), requests with and without offload,
    some aborted mid-way: every step, each pool's ref counts equal its holders."""
    rng = random.Random(seed)
    engine = _engine(model, smollm2_tokenizer, POLICY + ",offload=true", num_pages=40, offload_pages=48)
    live, preempted = [], []
    preempt = engine.scheduler.preempt
    engine.scheduler.preempt = lambda seq: (preempted.append(seq.request_id), preempt(seq))
    for i, prompt in enumerate(_prompts(10, seed, lengths=(20, 80))):
        attention = None if i % 3 else "full"
        live.append(engine.add_request(prompt, SamplingParams(max_tokens=rng.randrange(4, 30), attention=attention,
                                                              **GREEDY)))
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        assert all(o.error is None for o in engine.step())
        if rng.random() < 0.05 and engine.requests:
            engine.abort(rng.choice(list(engine.requests)))
        seqs = engine.scheduler.running + engine.scheduler.waiting
        engine.kv.check_integrity(seqs)
    assert not engine.has_unfinished()
    engine.kv.check_integrity([])
    assert engine.offload.host.num_free == engine.offload.host.num_pages
    assert engine.offload.dense.num_free == engine.offload.dense.num_pages
    assert preempted


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA GPU")
def test_offload_on_cuda_decodes_what_magicpig_on_the_gpu_decodes():
    """On a GPU: the sampled layers' part on the CPU (pinned host pool, C kernel) against MagicPIG
    wholly on the GPU (its PyTorch twins), every other policy on the GPU too, pages balanced."""
    import torch
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import hf_config
    from kvserve.model.random_weights import token_tokenizer
    from tiny_models import make_hf_model
    hf = make_hf_model("llama", vocab_size=512, num_hidden_layers=4, max_position_embeddings=256, seed=7)
    config = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    model = LlamaForCausalLM.from_weights(hf_config(config), hf.state_dict(), torch.float32, "cuda")
    prompts, tokenizer = _prompts(3), token_tokenizer(512)  # no model files on a bare GPU host
    on_gpu = _engine(model, tokenizer, POLICY)
    split = _engine(model, tokenizer, POLICY + ",offload=true", offload_pages=128)
    assert split.offload.host.k.is_pinned() and split.offload.dense.k.device.type == "cuda"
    assert _run(split, prompts) == _run(on_gpu, prompts)
    for policy in ["streaming:sink=4,window=8", "topk:k=5,window=8"]:
        ids = [on_gpu.add_request(p, SamplingParams(max_tokens=8, attention=policy, **GREEDY)) for p in prompts]
        while on_gpu.has_unfinished():
            assert all(o.error is None for o in on_gpu.step()), policy
        assert not set(ids) & set(on_gpu.requests)
    on_gpu.kv.check_integrity([])
    split.kv.check_integrity([])
