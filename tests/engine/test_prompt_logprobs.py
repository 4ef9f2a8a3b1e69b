"""SamplingParams(prompt_logprobs=N): each prompt token's logprob and top-N, from every prefill chunk,
against a log-softmax of transformers' logits on the same tiny model."""
import pytest
import torch

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.request import SamplingParams, Sequence
from kvserve.engine.runner import ModelRunner
from kvserve.model.llama import LlamaForCausalLM
from kvserve.model.loader import hf_config
from kvserve.model.random_weights import token_tokenizer
from tiny_models import make_hf_model

VOCAB = 256


@pytest.fixture(scope="module")
def models():
    hf = make_hf_model("llama", vocab_size=VOCAB)
    config = hf.config.to_dict() | {"architectures": ["LlamaForCausalLM"]}
    return hf, LlamaForCausalLM.from_weights(hf_config(config), hf.state_dict())


def engine_for(model, tokens_per_step=512, prefix=True):
    return Engine(EngineConfig(cache=CacheConfig(4, 128, None, prefix), scheduler=SchedulerConfig(tokens_per_step, 8)),
                  model=model, tokenizer=token_tokenizer(model.config.vocab_size))


def run(engine, prompts, params):
    ids = [engine.add_request(p, params) for p in prompts]
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    return [done[i] for i in ids]


def reference(hf, prompt):
    with torch.no_grad():
        return hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)


def assert_matches(got, expected, prompt, k, atol=1e-4):
    assert len(got) == len(prompt) and got[0] is None
    for pos in range(1, len(prompt)):
        lp = got[pos]
        assert lp.token_id == prompt[pos]
        assert abs(lp.logprob - expected[pos - 1, prompt[pos]].item()) < atol
        assert len(lp.top_logprobs) == k
        top = expected[pos - 1].topk(k)
        torch.testing.assert_close(torch.tensor([v for _, v in lp.top_logprobs]), top.values, atol=atol, rtol=0)
        assert [t for t, _ in lp.top_logprobs] == top.indices.tolist()


PROMPTS = [[(7 * i + 3 * j) % (VOCAB - 3) + 3 for i in range(n)] for j, n in enumerate((37, 5, 2))]


@pytest.mark.parametrize("tokens_per_step", [512, 7])  # one pass; chunks of a few tokens, shared with others
def test_prompt_logprobs_equal_transformers(models, tokens_per_step):
    hf, model = models
    engine = engine_for(model, tokens_per_step)
    outs = run(engine, PROMPTS, SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=3, ignore_eos=True))
    for prompt, out in zip(PROMPTS, outs):
        assert_matches(out.prompt_logprobs, reference(hf, prompt), prompt, 3)
        assert len(out.outputs[0].token_ids) == 3
    # the sampled tokens are those of a request without prompt logprobs
    plain = run(engine_for(model, tokens_per_step), PROMPTS, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert [o.outputs[0].token_ids for o in outs] == [o.outputs[0].token_ids for o in plain]
    assert all(o.prompt_logprobs is None for o in plain)


def test_a_cached_prefix_is_recomputed_to_score_it(models):
    hf, model = models
    engine = engine_for(model)
    prompt = PROMPTS[0]
    run(engine, [prompt], SamplingParams(temperature=0, max_tokens=1))  # fills the prefix cache
    before = engine.runner.num_tokens_run
    out = run(engine, [prompt], SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0, n=2))[0]
    assert engine.runner.num_tokens_run - before == len(prompt)  # the whole prompt; the two choices sample its last row
    assert out.num_cached_tokens == 0
    assert_matches(out.prompt_logprobs, reference(hf, prompt), prompt, 0)
    engine.kv.check_integrity([])


def test_a_one_token_prompt_chunk_among_decodes_is_scored():
    """The decode-only batch path hands a step with a mid-prompt single-token chunk to the general one."""
    scoring = Sequence(0, "a", 0, [5, 6, 7, 8], SamplingParams(prompt_logprobs=1), 0.0)
    scoring.num_computed_tokens = 2  # the rows of positions 0 and 1 ran, scoring tokens 1 and 2
    scoring.prompt_logprobs = [None, None]  # stand-ins: only their number is read
    decoding = Sequence(1, "b", 0, [9, 10, 11], SamplingParams(), 0.0)
    decoding.num_computed_tokens = 2
    batch = ModelRunner.batch([(decoding, 1), (scoring, 1)])
    assert batch.last_rows == [0, 1] and batch.sample_index == [0] and batch.sampled == [decoding]
    span = batch.prompt_spans[0]
    assert (span.seq, span.first, span.position, span.count) == (scoring, 1, 2, 1)


def test_native_executor_scores_prompts_as_the_pytorch_one(tmp_path):
    from engine.test_native_decode import int4_model
    from kvserve.engine.executors import NativeExecutor
    model = int4_model(tmp_path)
    params = SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2, ignore_eos=True)
    native = engine_for(model, tokens_per_step=9)
    assert isinstance(native.runner.executor, NativeExecutor)
    torch_engine = engine_for(model, tokens_per_step=9)
    torch_engine.runner.executor = torch_engine.runner.executor.fallback
    for a, b in zip(run(native, PROMPTS, params), run(torch_engine, PROMPTS, params)):
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert x.token_id == y.token_id and abs(x.logprob - y.logprob) < 2e-2
            # the same top tokens with close scores (two within ~1e-5 of each other may trade places)
            top_x, top_y = dict(x.top_logprobs), dict(y.top_logprobs)
            assert top_x.keys() == top_y.keys() and all(abs(top_x[t] - top_y[t]) < 2e-2 for t in top_x)
