"""The engine end to end on a tiny random model with the real SmolLM2 tokenizer."""
import random

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.request import SamplingParams


def run(engine, prompts, params):
    ids = [engine.add_request(p, params if isinstance(params, SamplingParams) else params[i])
           for i, p in enumerate(prompts)]
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[i] for i in ids]


def prompts(n, seed=0, low=3, high=60):
    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(rng.randint(low, high))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def assert_pages_balanced(engine):
    engine.kv.check_integrity([])
    cached = len(engine.kv.prefix) if engine.kv.prefix else 0
    assert engine.pool.num_free + cached == engine.pool.num_pages


def test_batch_equals_each_prompt_alone(make_engine):
    ps = prompts(16)
    batched = run(make_engine(), ps, GREEDY)
    for p, out in zip(ps, batched):
        alone = run(make_engine(), [p], GREEDY)[0]
        assert out.outputs[0].token_ids == alone.outputs[0].token_ids
        assert len(out.outputs[0].token_ids) == 12
    
def test_seeded_sampling_is_independent_of_batch(make_engine):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=10, ignore_eos=True)
    target = prompts(1, seed=5)[0]
    alone = run(make_engine(), [target], params)[0].outputs[0].token_ids
    others = prompts(5, seed=6)
    mixed = run(make_engine(), others[:2] + [target] + others[2:],
                [SamplingParams(temperature=0.7, seed=i, max_tokens=7) for i in range(2)] + [params] +
                [SamplingParams(temperature=1.0, max_tokens=9) for _ in range(3)])
    assert mixed[2].outputs[0].token_ids == alone


def test_prefix_cache_computes_only_the_suffix(make_engine):
    engine = make_engine(page_size=16)
    prefix = prompts(1, seed=3, low=48, high=48)[0]  # three full pages
    run(engine, [prefix + [500, 501]], GREEDY)
    before = engine.runner.num_tokens_run
    out = run(engine, [prefix + [600, 601, 602]], SamplingParams(temperature=0, max_tokens=1))[0]
    assert engine.runner.num_tokens_run - before == 3
    assert out.num_cached_tokens == 48
    assert_pages_balanced(engine)


def test_chunked_prefill_matches_one_pass(make_engine):
    prompt = prompts(1, seed=9, low=1000, high=1000)[0]
    params = SamplingParams(temperature=0, max_tokens=4, logprobs=5, ignore_eos=True)
    one = run(make_engine(max_tokens_per_step=2048), [prompt], params)[0].outputs[0]
    chunked = run(make_engine(max_tokens_per_step=128), [prompt], params)[0].outputs[0]
    assert chunked.token_ids == one.token_ids
    for a, b in zip(chunked.logprobs, one.logprobs):
        assert abs(a.logprob - b.logprob) < 1e-4
        assert [t for t, _ in a.top_logprobs] == [t for t, _ in b.top_logprobs]


def test_shared_prefix_requests_wait_for_one_prefill(make_engine):
    """Waiting requests with a common prefix are admitted after its first prefill (BatchLLM)."""
    engine = make_engine()
    prefix = prompts(1, seed=4, low=64, high=64)[0]
    outs = run(engine, [prefix + [i + 100] for i in range(8)], GREEDY)
    assert sum(o.num_cached_tokens for o in outs) == 7 * 64
    assert_pages_balanced(engine)


def test_stop_conditions(make_engine, smollm2_tokenizer):
    engine = make_engine()
    base = run(engine, prompts(1), SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))[0].outputs[0]
    # stop token id: ends at its first occurrence, which is kept in token_ids
    stop_id = base.token_ids[5]
    out = run(engine, prompts(1), SamplingParams(temperature=0, max_tokens=20, stop_token_ids=[stop_id]))[0]
    first = base.token_ids.index(stop_id)
    assert out.outputs[0].token_ids == base.token_ids[:first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    assert out.outputs[0].text == smollm2_tokenizer.decode(base.token_ids[:first])  # not the stop token's
    # stop string: text ends right before it
    text = base.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        out = run(engine, prompts(1), SamplingParams(temperature=0, max_tokens=20, stop=[stop]))[0].outputs[0]
        assert out.text == text[:text.index(stop)] and out.finish_reason == "stop"
    # min_tokens keeps generating past EOS
    eos = engine.eos_token_ids[0]
    out = run(engine, prompts(1), SamplingParams(temperature=0, max_tokens=8, min_tokens=7,
                                                 logit_bias={eos: 100.0}))[0].outputs[0]
    assert eos not in out.token_ids[:7] and out.token_ids[-1] == eos
    out = run(engine, prompts(1), SamplingParams(temperature=0, max_tokens=8, logit_bias={eos: 100.0}))[0]
    assert out.outputs[0].token_ids == [eos] and out.outputs[0].finish_reason == "stop"
    assert run(engine, prompts(1), GREEDY)[0].outputs[0].finish_reason == "length"


def test_n_choices_share_the_prompt(make_engine):
    engine = make_engine()
    before = engine.runner.num_tokens_run
    p = prompts(1, seed=2, low=40, high=40)[0]
    out = run(engine, [p], SamplingParams(n=4, temperature=1.0, seed=7, max_tokens=5, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2, 3]
    assert all(len(o.token_ids) == 5 for o in out.outputs)
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    assert engine.runner.num_tokens_run - before == 40 + 4 * 4  # prompt once, then 4 x 4 decodes
    assert_pages_balanced(engine)


def test_bad_requests_are_refused_without_side_effects(make_engine):
    engine = make_engine(num_pages=8)
    for prompt, params in [([], GREEDY), ([10**9], GREEDY), ([5] * 2000, GREEDY),
                           ([5] * 100, SamplingParams(max_tokens=2000))]:
        with pytest.raises(ValueError):
            engine.add_request(prompt, params)
    assert not engine.has_unfinished()
    with pytest.raises(ValueError):
        SamplingParams(temperature=-1)


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_random_workloads_balance_pages_and_survive_preemption(make_engine, data):
    """Arrivals over time, aborts, n > 1 and a pool small enough to preempt: every request
    ends, greedy outputs equal those of a roomy engine, and every page comes back; with
    overlapped steps or without."""
    seed = data.draw(st.integers(0, 10**6))
    rng = random.Random(seed)
    page_size = data.draw(st.sampled_from([1, 4, 16]))
    small = make_engine(num_pages=max(6, 120 // page_size), page_size=page_size,
                        max_tokens_per_step=data.draw(st.sampled_from([16, 64, 512])), max_seqs=8,
                        overlap_schedule=data.draw(st.booleans()))
    roomy = make_engine(num_pages=4096 // page_size, page_size=page_size)
    shared = prompts(1, seed=seed, low=20, high=20)[0]
    work = []
    for i in range(data.draw(st.integers(2, 10))):
        p = (shared if rng.random() < 0.5 else []) + prompts(1, seed=seed + i, low=1, high=30)[0]
        params = SamplingParams(temperature=0, max_tokens=rng.randint(1, 16), ignore_eos=True,
                                n=rng.choice([1, 1, 2, 3]))
        work.append((p, params, rng.randint(0, 6), rng.random() < 0.2))  # arrival step, aborted?
    expected = run(roomy, [p for p, *_ in work], [w[1] for w in work])
    ids, results, step = {}, {}, 0
    while len(ids) < len(work) or small.has_unfinished():
        for i, (p, params, arrival, abort) in enumerate(work):
            if arrival == step and i not in ids:
                ids[i] = small.add_request(p, params)
                if abort and rng.random() < 0.5:
                    small.abort(ids[i])
        for out in small.step():
            assert out.error is None, out.error
            if out.finished:
                results[out.request_id] = out
        if step == 8:
            for i, (_, _, _, abort) in enumerate(work):
                if abort and i in ids:
                    small.abort(ids[i])
        step += 1
        assert step < 2000, "workload did not finish"
    for i, (_, _, _, abort) in enumerate(work):
        out = results.get(ids[i])
        if out is None:
            assert abort
        else:
            assert [o.token_ids for o in out.outputs] == [o.token_ids for o in expected[i].outputs]
    assert_pages_balanced(small)


@pytest.mark.parametrize("overlap", [False, True])
def test_a_request_that_breaks_the_model_fails_alone(make_engine, monkeypatch, overlap):
    engine = make_engine(overlap_schedule=overlap)
    execute = engine.runner.execute
    poison = 31337

    def fragile(scheduled, pending_ids=None):
        if any(poison in seq.token_ids for seq, _ in scheduled):
            raise RuntimeError("kernel failure")
        return execute(scheduled, pending_ids)

    monkeypatch.setattr(engine.runner, "execute", fragile)
    good = prompts(3)
    expected = run(make_engine(), good, GREEDY)
    ids = [engine.add_request(p, GREEDY) for p in good[:2] + [[5, poison, 7]] + good[2:]]
    outs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outs[out.request_id] = out
    assert outs[ids[2]].error and "kernel failure" in outs[ids[2]].error
    assert [outs[i].outputs[0].token_ids for i in ids[:2] + ids[3:]] == [e.outputs[0].token_ids for e in expected]
    assert_pages_balanced(engine)


@pytest.mark.parametrize("bad", [dict(n=0), dict(n=1.5), dict(temperature=-0.1), dict(temperature=float("nan")),
                                 dict(temperature=float("inf")), dict(temperature="0.5"), dict(top_p=0),
                                 dict(top_k=-5), dict(top_k=1.5), dict(min_p=1.5), dict(repetition_penalty=0),
                                 dict(repetition_penalty=float("nan")), dict(presence_penalty=5),
                                 dict(frequency_penalty=-10), dict(max_tokens=0), dict(max_tokens=2.5),
                                 dict(min_tokens=5, max_tokens=2), dict(logprobs=-1), dict(seed=2**70),
                                 dict(stop=[None]), dict(stop_token_ids=["a"]), dict(logit_bias={"x": 1}),
                                 dict(logit_bias={5: 1000})])
def test_bad_sampling_params_are_refused(bad):
    with pytest.raises(ValueError, match=next(iter(bad)).split("_")[0]):
        SamplingParams(**bad)


def test_logit_bias_takes_the_api_s_string_keys():
    assert SamplingParams(logit_bias={"29": 100}).logit_bias == {29: 100.0}


def test_a_request_the_kv_cache_cannot_hold_is_refused_not_run_for_ever(make_engine):
    """A pool smaller than the model's context caps the context: a request that fits finishes (it
    used to evict itself and start over for good once it outgrew the pool), a longer one is refused."""
    engine = make_engine(num_pages=4)  # 64 tokens, the model's context 2048
    assert engine.max_model_len == 64
    rid = engine.add_request([5] * 10, SamplingParams(temperature=0, max_tokens=54, ignore_eos=True))
    with pytest.raises(ValueError, match="exceeds the context length 64 .what the KV cache holds"):
        engine.add_request([5] * 10, SamplingParams(temperature=0, max_tokens=55, ignore_eos=True))
    for _ in range(200):
        outs = {o.request_id: o for o in engine.step()}
        if rid in outs and outs[rid].finished:
            break
    assert len(outs[rid].outputs[0].token_ids) == 54 and not engine.has_unfinished()
    assert_pages_balanced(engine)


def test_max_model_len_lowers_the_context(make_engine):
    engine = make_engine(max_model_len=40)  # as vLLM's LLM(max_model_len=...)
    assert engine.max_model_len == 40
    with pytest.raises(ValueError, match="exceeds the context length 40"):
        engine.add_request([5] * 30, GREEDY)
    assert run(engine, [[5] * 28], GREEDY)[0].outputs[0].finish_reason == "length"
    model_len = engine.model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"above the model's context length {model_len}"):  # vLLM refuses it too
        make_engine(max_model_len=model_len + 1)


def test_a_prompt_longer_than_a_step_is_refused_without_chunked_prefill(make_engine):
    engine = make_engine(max_tokens_per_step=16)
    engine.config.scheduler = SchedulerConfig(16, 64, enable_chunked_prefill=False)
    with pytest.raises(ValueError, match="chunked prefill is off"):
        engine.add_request([5] * 17, GREEDY)
    assert not engine.has_unfinished()


@pytest.mark.parametrize("cls, bad, error", [
    (EngineConfig, dict(dtype="int3"), "dtype"), (EngineConfig, dict(device="tpu"), "device"),
    (CacheConfig, dict(page_size=0), "page_size"), (CacheConfig, dict(kv_cache_gb=0), "kv_cache_gb"),
    (SchedulerConfig, dict(max_num_seqs=0), "max_num_seqs"),
    (SchedulerConfig, dict(max_num_batched_tokens=0), "max_num_batched_tokens")])
def test_bad_engine_settings_are_refused_at_once(cls, bad, error):
    with pytest.raises(ValueError, match=error):
        cls(**bad)


def test_llm_refuses_mismatched_sampling_params(make_engine):
    from kvserve.llm import LLM
    llm = LLM(engine=make_engine())
    with pytest.raises(ValueError, match="2 sampling params for 3 prompts"):
        llm.generate(prompts(3), [GREEDY, GREEDY], use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_llm_runs_no_prompt_of_a_batch_with_a_refused_one(make_engine):
    """The prompts before the refused one are not left queued (they used to run into later calls,
    which then lost their own results)."""
    from kvserve.llm import LLM
    llm = LLM(engine=make_engine())
    for bad in ([], [10**9], None, [1.5]):
        with pytest.raises((ValueError, TypeError)):
            llm.generate([prompts(1)[0], bad], GREEDY, use_tqdm=False)
        assert not llm.engine.has_unfinished()
    p = prompts(2, seed=3)
    expected = [o.outputs[0].token_ids for o in llm.generate(p, GREEDY, use_tqdm=False)]
    got = llm.generate([{"prompt_token_ids": p[0]}, {"prompt": llm.get_tokenizer().decode(p[1])}], GREEDY,
                       use_tqdm=False)  # vLLM's TokensPrompt and TextPrompt
    assert got[0].outputs[0].token_ids == expected[0] and len(got[1].outputs[0].token_ids) == 12
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"text": "hi"}, GREEDY, use_tqdm=False)
    with pytest.raises(ValueError, match="'role' and 'content'"):
        llm.chat([{"role": "user"}], GREEDY, use_tqdm=False)


def test_final_only_outputs_come_once_and_match_cumulative(make_engine):
    ps = prompts(4, seed=11)
    cumulative = run(make_engine(), ps, GREEDY)
    engine = make_engine()
    final = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, output_kind="final_only")
    ids = [engine.add_request(p, final) for p in ps]
    seen = []
    while engine.has_unfinished():
        seen += engine.step()
    assert sorted(o.request_id for o in seen) == sorted(ids) and all(o.finished for o in seen)
    by_id = {o.request_id: o for o in seen}
    assert [by_id[i].outputs[0].token_ids for i in ids] == [o.outputs[0].token_ids for o in cumulative]
    with pytest.raises(ValueError, match="output_kind"):
        SamplingParams(output_kind="delta")


def test_streamed_outputs_hold_back_stop_strings_split_across_steps(make_engine, smollm2_tokenizer):
    """Each step's streamed output of a batch with stop strings that end in different tokens than
    they start: its text is a prefix of the final text and never shows the stop string, its ids
    a prefix of the final ids; the final output is the one a final-only request gets, with the
    text cut before the stop string and equal to the full decode of its tokens up to it."""
    engine = make_engine()
    ps = prompts(6, seed=5)
    bases = [o.outputs[0] for o in run(engine, ps, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))]
    stops = []
    for base in bases:  # a 3-character stop string from the middle of each continuation
        text = base.text
        stops.append(text[len(text) // 2:len(text) // 2 + 3])
    stops = [s if s.strip() else "zzz" for s in stops]
    streamed = {}
    for p, stop in zip(ps, stops):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]),
                           request_id=f"s{len(streamed)}")
        streamed[f"s{len(streamed)}"] = []
    while engine.has_unfinished():
        for out in engine.step():
            streamed[out.request_id].append(out)
    finals = run(engine, ps, [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                             output_kind="final_only") for stop in stops])
    for i, (base, stop) in enumerate(zip(bases, stops)):
        outs = streamed[f"s{i}"]
        last = outs[-1].outputs[0]
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
        assert last.text == (base.text[:base.text.index(stop)] if stop in base.text else base.text)
        assert last.text == smollm2_tokenizer.decode(last.token_ids)[:len(last.text)]
        for o in outs[:-1]:
            c = o.outputs[0]
            assert last.text.startswith(c.text) and stop not in c.text
            assert last.token_ids[:len(c.token_ids)] == c.token_ids and c.finish_reason is None
        assert finals[i].outputs[0].text == last.text and finals[i].outputs[0].token_ids == last.token_ids
        assert finals[i].outputs[0].finish_reason == last.finish_reason
