"""Attention policies through the engine: per request, mixed in one batch, streaming past the
context length with its pages given back, and page accounting afterwards."""
import pytest

from kvserve.engine.request import SamplingParams

GREEDY = dict(temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def short_model():
    """The tiny random Llama with a 64-token context, so streaming can outrun it quickly."""
    from kvserve.model.llama import LlamaForCausalLM
    from kvserve.model.loader import hf_config
    from tiny_models import make_hf_model
    hf = make_hf_model("llama", vocab_size=49152, max_position_embeddings=64, seed=3)
    config = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    return LlamaForCausalLM.from_weights(hf_config(config), hf.state_dict())


def _engine(model, tokenizer, prefix=True, page_size=4, num_pages=64, attention="full"):
    from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
    from kvserve.engine.engine import Engine
    cfg = EngineConfig(cache=CacheConfig(page_size, num_pages, None, prefix), scheduler=SchedulerConfig(256, 8),
                       attention=attention)
    return Engine(cfg, model=model, tokenizer=tokenizer)


def _run(engine, prompts, params):
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            assert out.error is None, out.error
            if out.finished:
                done[out.request_id] = out
    return [done[i].outputs[0] for i in ids]


def test_bad_policy_is_a_value_error():
    with pytest.raises(ValueError):
        SamplingParams(attention="sparse")
    with pytest.raises(ValueError):
        SamplingParams(attention={"policy": "magicpig", "L": 0})


def test_streaming_chat_runs_past_the_context_and_gives_pages_back(short_model, smollm2_tokenizer):
    engine = _engine(short_model, smollm2_tokenizer, prefix=False)
    policy = {"policy": "streaming", "sink": 4, "window": 12}
    rid = engine.add_request(list(range(100, 120)), SamplingParams(max_tokens=150, attention=policy, **GREEDY))
    seq = engine.requests[rid].seqs[0]
    most_held = 0
    while engine.has_unfinished():
        outs = engine.step()
        assert all(o.error is None for o in outs)
        most_held = max(most_held, sum(p >= 0 for p in seq.pages))
    out = outs[0].outputs[0]
    assert len(out.token_ids) == 150 and out.finish_reason == "length"  # 170 tokens > 64
    assert most_held <= 1 + 4 + 1  # a sink page, the window's pages, the page being filled
    assert engine.pool.num_free == engine.pool.num_pages
    engine.kv.check_integrity([])
    with pytest.raises(ValueError):  # a full request still cannot outrun the context
        engine.add_request(list(range(100, 120)), SamplingParams(max_tokens=150))


def test_policies_that_cover_every_key_give_full_attention_tokens(short_model, smollm2_tokenizer):
    """streaming with a window over everything, topk with k over everything and magicpig with
    every key a candidate (K=1, L=2000) decode the same tokens as full attention."""
    engine = _engine(short_model, smollm2_tokenizer, page_size=16, num_pages=32)
    prompt = list(range(300, 330))
    full = _run(engine, [prompt], [SamplingParams(max_tokens=20, **GREEDY)])[0].token_ids
    for policy in ["streaming:sink=4,window=1000", "topk:k=1000,window=4",
                   "magicpig:K=1,L=2000,window=4,dense_layers=0"]:
        got = _run(engine, [prompt], [SamplingParams(max_tokens=20, attention=policy, **GREEDY)])[0].token_ids
        assert got == full, policy
    engine.kv.check_integrity([])


def test_dense_layers_past_the_model_are_refused(short_model, smollm2_tokenizer):
    engine = _engine(short_model, smollm2_tokenizer, page_size=16, num_pages=32)
    layers = short_model.config.num_layers
    with pytest.raises(ValueError, match=f"past the model's {layers}"):
        engine.add_request([1, 2, 3], SamplingParams(attention=f"magicpig:dense_layers=0;{layers}"))
    assert not engine.requests


def test_mixed_batch_gives_each_request_its_tokens_alone(short_model, smollm2_tokenizer):
    engine = _engine(short_model, smollm2_tokenizer, page_size=4, num_pages=128)
    prompts = [list(range(500 + 7 * i, 530 + 9 * i)) for i in range(4)]
    policies = [None, "magicpig:K=4,L=30,window=8", "streaming:sink=4,window=8", "topk:k=5,window=8"]
    params = [SamplingParams(max_tokens=24, attention=p, **GREEDY) for p in policies]
    alone = [_run(engine, [p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    together = [o.token_ids for o in _run(engine, prompts, params)]
    assert together == alone
    engine.kv.check_integrity([])
    assert engine.runner.policy_attention.keys_read < engine.runner.policy_attention.keys_total


def test_default_policy_from_the_engine_config(short_model, smollm2_tokenizer):
    engine = _engine(short_model, smollm2_tokenizer, attention="magicpig:window=8")
    rid = engine.add_request(list(range(100, 140)), SamplingParams(max_tokens=8, **GREEDY))
    assert engine.requests[rid].params.attention.policy == "magicpig"
    while engine.has_unfinished():
        assert all(o.error is None for o in engine.step())
    assert engine.runner.policy_attention.keys_total > 0
    engine.kv.check_integrity([])
