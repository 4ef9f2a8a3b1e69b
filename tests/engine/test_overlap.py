"""Overlapped steps (kvserve/engine/overlap.py) give the tokens of synchronous steps, on the CPU (the
logic is the GPU's; there the device computes while the host lands the previous step)."""
import pytest
import torch

from kvserve.config import CacheConfig, EngineConfig
from kvserve.engine.engine import Engine
from kvserve.engine.request import SamplingParams
from kvserve.engine.runner import ModelRunner


def run(engine, requests, abort_after=None):
    """(token ids, text, finish reason, logprobs) per request; abort_after: (request index, step)
    aborted then."""
    ids = [engine.add_request(p, q) for p, q in requests]
    done, step = {}, 0
    while engine.has_unfinished():
        if abort_after and step == abort_after[1]:
            engine.abort(ids[abort_after[0]])
        for o in engine.step():
            if o.finished:
                c = o.outputs[0] if o.outputs else None
                done[o.request_id] = c and (c.token_ids, c.text, c.finish_reason,
                                            [(lp.token_id, round(lp.logprob, 3)) for lp in c.logprobs or []])
        step += 1
    engine.kv.check_integrity([])
    return [done.get(i) for i in ids]


def counting(engine):
    """Counts the overlapped launches (and checks each lands once)."""
    launches = []
    launch = engine.overlap._launch
    engine.overlap._launch = lambda *a: launches.append(1) or launch(*a)
    return launches


def prompts(n, shared=0):
    """Ragged prompts, the first `shared` tokens common to all (prefix-cache hits)."""
    return [[7 + j for j in range(shared)] + [100 + 13 * i + j for j in range(2 + 9 * i % 37)] for i in range(n)]


def with_stops(requests, outputs):
    """The requests again, most now stopping inside what they generated: at a stop token, a stop
    string, or max_tokens, so that overlapped steps run past a stop."""
    out = []
    for i, ((prompt, params), (tokens, text, _, _)) in enumerate(zip(requests, outputs)):
        cut = 1 + i % 4
        stops = dict(stop_token_ids=[tokens[cut]]) if i % 3 == 0 else \
            dict(stop=[text[len(text) // 2:len(text) // 2 + 3]]) if i % 3 == 1 else dict(max_tokens=cut + 1)
        out.append((prompt, SamplingParams(**(dict(temperature=0, max_tokens=params.max_tokens) | stops))))
    return out


def greedy(i):
    return SamplingParams(temperature=0, max_tokens=6 + 3 * (i % 5))


@pytest.mark.parametrize("pages,budget", [(256, 512), (24, 64)])  # roomy; preemption and chunked prefill
def test_overlapped_steps_give_the_synchronous_outputs(make_engine, pages, budget):
    requests = [(p, greedy(i)) for i, p in enumerate(prompts(12, shared=20))]
    requests = with_stops(requests, run(make_engine(overlap_schedule=False), requests))
    sync = make_engine(num_pages=pages, max_tokens_per_step=budget, overlap_schedule=False)
    expected = run(sync, requests)
    assert {reason for _, _, reason, _ in expected} == {"stop", "length"}
    engine = make_engine(num_pages=pages, max_tokens_per_step=budget, overlap_schedule=True)
    launches = counting(engine)
    assert run(engine, requests) == expected
    assert len(launches) > 10
    if pages > 100:  # nothing evicted: the same pages were published to the prefix cache
        assert engine.kv.prefix.pages.keys() == sync.kv.prefix.pages.keys()


def test_seeded_sampling_is_the_same_with_overlap(make_engine):
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=i, max_tokens=12) for i in range(6)]
    requests = list(zip(prompts(6), params))
    expected = run(make_engine(overlap_schedule=False), requests)
    assert run(make_engine(overlap_schedule=True), requests) == expected


def test_logprobs_land_with_their_tokens(make_engine):
    """Logprobs are computed on the device at sampling and land with the ids: the same values as
    synchronous steps give, greedy and sampled, and the steps still overlap."""
    params = [SamplingParams(temperature=0, max_tokens=7, logprobs=3),
              SamplingParams(temperature=0.8, seed=4, max_tokens=9, logprobs=1),
              SamplingParams(temperature=0, max_tokens=8)]
    requests = list(zip(prompts(3), params))

    def logprobs(engine):
        ids = [engine.add_request(p, q) for p, q in requests]
        done = {}
        while engine.has_unfinished():
            done |= {o.request_id: o.outputs[0] for o in engine.step() if o.finished}
        return [(done[i].token_ids, [(lp.token_id, round(lp.logprob, 4), [(t, round(v, 4)) for t, v in lp.top_logprobs])
                                     for lp in done[i].logprobs or []]) for i in ids]
    on = make_engine(overlap_schedule=True)
    launches = counting(on)
    got = logprobs(on)
    assert got == logprobs(make_engine(overlap_schedule=False))
    assert len(got[0][1]) == 7 and len(got[0][1][0][2]) == 3 and len(launches) >= 7


def test_requests_that_need_the_host_run_synchronously_beside_overlapped_ones(make_engine):
    """Penalties and min_tokens need each token on the host before the next step: a batch holding
    one lands the pending step first. The others overlap before and after."""
    special = [SamplingParams(temperature=0, max_tokens=3, logprobs=2),
               SamplingParams(temperature=0, max_tokens=4, repetition_penalty=1.3),
               SamplingParams(temperature=0, max_tokens=3, min_tokens=3)]
    requests = [(p, greedy(i)) for i, p in enumerate(prompts(8))]
    requests = with_stops(requests, run(make_engine(overlap_schedule=False), requests))[:4] + requests[4:]
    requests += list(zip(prompts(3, shared=5), special))
    expected = run(make_engine(overlap_schedule=False), requests)
    engine = make_engine(overlap_schedule=True)
    launches = counting(engine)
    assert run(engine, requests) == expected
    assert launches


def test_an_abort_while_a_step_is_in_flight_loses_nothing(make_engine):
    requests = [(p, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)) for p in prompts(5)]
    expected = run(make_engine(overlap_schedule=False), requests, abort_after=(2, 4))
    got = run(make_engine(overlap_schedule=True), requests, abort_after=(2, 4))
    assert got[2] is None or got[2][2] == "abort"
    assert got[:2] + got[3:] == expected[:2] + expected[3:]


def test_the_device_copy_of_pending_ids_matches_the_host_one(make_engine):
    """On a GPU the pending ids stay on the device (StepBatch.carried, written by carry_into); here
    the same index write runs on CPU tensors against ids resolved on the host."""
    from kvserve.engine.static_executor import StaticDecodeExecutor
    engine = make_engine(overlap_schedule=False)
    for p in prompts(3):
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()  # the prompts
    scheduled = engine.scheduler.schedule().scheduled
    pending = torch.tensor([5, 0, 9, 4])
    for row, (seq, _) in enumerate(scheduled):
        seq.token_ids.pop()  # its last token pending at row 2 - row of pending
        seq.num_pending, seq.pending_row = 1, 2 - row
    host = ModelRunner.batch(scheduled)
    host.carry(pending)
    assert host.ids == [9, 0, 5] and host.carried is None
    device = ModelRunner.batch(scheduled)
    device.carried = (torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0]), pending)  # what carry() makes on a GPU
    static = StaticDecodeExecutor(engine.model, engine.pool, engine.runner.executor, 4, engine.max_model_len)
    with torch.inference_mode():
        for executor in (engine.runner.executor, static):
            torch.testing.assert_close(executor.execute(device), executor.execute(host))


def test_overlap_is_on_by_default_for_a_gpu_only(tiny_model, smollm2_tokenizer):
    from kvserve.engine.overlap import overlap_schedule
    assert not overlap_schedule(EngineConfig(), "cpu", None)
    assert overlap_schedule(EngineConfig(), "cuda", None)
    assert not overlap_schedule(EngineConfig(speculative="ngram"), "cuda", None)
    with pytest.raises(ValueError, match="speculative"):
        Engine(EngineConfig(overlap_schedule=True, speculative="ngram", cache=CacheConfig(num_pages=64)),
               model=tiny_model, tokenizer=smollm2_tokenizer)


@pytest.mark.parametrize("arrival", [2, 3, 4, 5])
def test_a_request_that_needs_the_host_arriving_mid_stream(make_engine, arrival):
    """It lands the step in flight before its own runs; sequences that stopped at that step's tokens
    (already scheduled again) drop out of the synchronous step."""
    base = [(p, greedy(i)) for i, p in enumerate(prompts(8))]
    base = with_stops(base, run(make_engine(overlap_schedule=False), base))
    late = (prompts(1, shared=3)[0], SamplingParams(temperature=0, max_tokens=5, logprobs=1))

    def run_with_late(engine):
        ids = [engine.add_request(p, q) for p, q in base]
        done, step = {}, 0
        while engine.has_unfinished():
            if step == arrival:
                ids.append(engine.add_request(*late))
            done |= {o.request_id: (o.outputs[0].token_ids, o.outputs[0].text) for o in engine.step() if o.finished}
            step += 1
        engine.kv.check_integrity([])
        return [done[i] for i in ids]
    assert run_with_late(make_engine(overlap_schedule=True)) == run_with_late(make_engine(overlap_schedule=False))


def test_the_c_step_gives_the_same_tokens_with_overlap(tmp_path, smollm2_tokenizer):
    from kvserve.engine.executors import NativeExecutor
    from tiny_models import make_hf_model, write_gguf
    path = write_gguf(make_hf_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2),
                      tmp_path / "tiny.gguf", "Q4_0")
    requests = [([3 + (5 * i + j) % 250 for j in range(4 + 7 * i)], greedy(i)) for i in range(6)]

    def engine(overlap):
        e = Engine(EngineConfig(model=str(path), overlap_schedule=overlap, cache=CacheConfig(num_pages=128)),
                   tokenizer=smollm2_tokenizer)
        if not isinstance(e.runner.executor, NativeExecutor):
            pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
        return e
    on = engine(True)
    launches = counting(on)
    assert run(on, requests) == run(engine(False), requests)
    assert launches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("eager", [False, True])  # CUDA graphs (ids carried into their static input) or not
def test_cuda_overlapped_steps_give_the_synchronous_tokens(eager):
    from kvserve.config import SchedulerConfig

    def engine(overlap):
        return Engine(EngineConfig(random_weights="tiny", dtype="float32", device="cuda", enforce_eager=eager,
                                   overlap_schedule=overlap, scheduler=SchedulerConfig(max_num_seqs=8)))
    requests = [([5 + i + j for j in range(4 + 9 * i)], greedy(i)) for i in range(10)]
    requests = with_stops(requests, run(engine(False), requests))
    requests += [(p, SamplingParams(temperature=0.8, top_p=0.9, seed=i, max_tokens=9, logprobs=2))
                 for i, p in enumerate(prompts(4))]
    on = engine(True)
    launches = counting(on)
    assert run(on, requests) == run(engine(False), requests)
    assert launches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_launches_never_wait_for_the_device():
    """A launched step queues its forward, sampling (greedy; drawn with top-p and logprobs) and copies
    without a device-to-host wait (torch's sync debug mode reports any), or the host could not run
    ahead of the GPU. bf16: the logits' fp32 rescoring runs too."""
    import warnings

    from kvserve.config import SchedulerConfig
    engine = Engine(EngineConfig(random_weights="tiny", dtype="bfloat16", device="cuda", overlap_schedule=True,
                                 scheduler=SchedulerConfig(max_num_seqs=8)))
    launch, syncs = engine.overlap._launch, []

    def watched(*args):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return launch(*args)
            finally:
                torch.cuda.set_sync_debug_mode(0)
                syncs.extend(str(w.message) for w in caught if "synchroniz" in str(w.message))
    engine.overlap._launch = watched
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1, logprobs=2, max_tokens=12, ignore_eos=True)]
    run(engine, [(p, params[i % 2]) for i, p in enumerate(prompts(5))])
    assert not syncs, syncs[:3]
