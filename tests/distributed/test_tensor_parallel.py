"""Tensor parallelism on the CPU (gloo, rank processes spawned by the engine): the same tokens
as one process, and each rank holding 1/N of the sharded weights and of the KV cache (it loads
only its share)."""
import pytest
import torch

from kvserve.config import CacheConfig, EngineConfig
from kvserve.distributed.tensor_parallel import kv_heads_of, vocab_rows
from kvserve.engine.engine import Engine
from kvserve.engine.request import SamplingParams
from kvserve.llm import LLM
from kvserve.model.random_weights import token_tokenizer
from tiny_models import make_hf_model, save_hf_dir, write_gguf

PROMPTS = [list(range(5, 40)), [30, 31, 32], [100, 7], list(range(200, 250))]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
MODELS = {
    "llama": dict(),  # 4 heads, 2 KV heads: at TP=4 each KV head is on two ranks
    "tied-vocab251": dict(vocab_size=251, tie_word_embeddings=True),
    "bias": dict(attention_bias=True),  # o_proj's bias is added once, after the all-reduce
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    made = {}

    def get(name):
        if name not in made:
            path = tmp_path_factory.mktemp(name)
            if name == "int4":
                made[name] = write_gguf(make_hf_model("llama"), path / "tiny.gguf", "Q4_0")
            else:
                made[name] = save_hf_dir(make_hf_model("llama", **MODELS[name]), path)
        return made[name]
    return get


def llm(path, tp, vocab=256):
    engine = Engine(EngineConfig(model=str(path), dtype="float32", tensor_parallel_size=tp,
                                 cache=CacheConfig(page_size=4, num_pages=96)), tokenizer=token_tokenizer(vocab))
    return LLM(engine=engine)


def tokens(outs):
    return [[list(c.token_ids) for c in o.outputs] for o in outs]


def test_heads_and_vocabulary_split():
    assert kv_heads_of(1, 2, 4, 2) == (range(2, 4), range(1, 2))
    assert kv_heads_of(3, 4, 4, 2) == (range(3, 4), range(1, 2))  # KV head 1 replicated on ranks 2, 3
    assert kv_heads_of(0, 8, 32, 8) == (range(0, 4), range(0, 1))
    with pytest.raises(ValueError):
        kv_heads_of(0, 3, 4, 2)
    assert [vocab_rows(r, 4, 251) for r in range(4)] == [range(0, 63), range(63, 126), range(126, 189), range(189, 251)]


@pytest.mark.parametrize("name,tp", [("llama", 2), ("llama", 4), ("tied-vocab251", 2), ("tied-vocab251", 4),
                                     ("bias", 2), ("int4", 2)])
def test_greedy_tokens_equal_one_process(model_dir, name, tp):
    path, vocab = model_dir(name), MODELS.get(name, {}).get("vocab_size", 256)
    with llm(path, 1, vocab) as one:
        want = tokens(one.generate(PROMPTS, GREEDY, use_tqdm=False))
        executor = type(one.engine.runner.executor)
    with llm(path, tp, vocab) as many:
        # the ranks run what one process runs (int4: the C step, its all-reduces called back from C)
        assert type(many.engine.runner.executor.inner) is executor
        assert tokens(many.generate(PROMPTS, GREEDY, use_tqdm=False)) == want


def test_seeded_sampling_and_forks_equal_one_process(model_dir):
    """n=3 forks the prompt's pages (copy-on-write of the partial page, repeated on rank 1)."""
    params = SamplingParams(temperature=0.9, top_p=0.9, seed=7, n=3, max_tokens=10, ignore_eos=True)
    with llm(model_dir("llama"), 1) as one:
        want = tokens(one.generate(PROMPTS[:2], params, use_tqdm=False))
    with llm(model_dir("llama"), 2) as two:
        assert tokens(two.generate(PROMPTS[:2], params, use_tqdm=False)) == want


def test_prompt_logprobs_equal_one_process(model_dir):
    """Rank 0 scores prompt rows a block of 256 at a time: rank 1 joins each block's vocabulary
    all-gather (a 300-token prompt: two blocks), beside a decoding sequence's sampled row."""
    prompts = [[3 + (i * 37) % 240 for i in range(300)], [30, 31, 32]]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, prompt_logprobs=2, logprobs=2),
              SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]
    got = []
    for tp in (1, 2):
        with llm(model_dir("llama"), tp) as one_or_two:
            outs = one_or_two.generate(prompts, params, use_tqdm=False)
            scored = outs[0].prompt_logprobs[1:]
            got.append((tokens(outs), [(lp.token_id, lp.logprob, lp.top_logprobs) for lp in scored]))
    (want_tokens, want_lps), (tp_tokens, tp_lps) = got
    assert tp_tokens == want_tokens and len(tp_lps) == len(want_lps) == 299
    for (t, lp, top), (want_t, want_lp, want_top) in zip(tp_lps, want_lps):
        assert t == want_t and lp == pytest.approx(want_lp, abs=1e-4)
        assert [i for i, _ in top] == [i for i, _ in want_top]


def test_a_dropped_engine_stops_its_ranks_and_a_new_one_starts(model_dir):
    """An LLM dropped without close() stops its ranks when collected: the next one's group forms
    (it hung in new_group, the old ranks never having left)."""
    import gc
    for _ in range(2):
        two = llm(model_dir("llama"), 2)
        procs = list(two.engine.tp.procs)
        assert len(two.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8
        del two
        gc.collect()
        assert all(not p.is_alive() for p in procs)


def _weight_bytes(model) -> tuple[int, int]:
    """(all weight bytes, bytes of weights every rank keeps whole: the norms)."""
    total = replicated = 0
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        total += t.nbytes
        replicated += t.nbytes if "norm" in name else 0
    return total, replicated


def test_rank_holds_its_share_of_weights_and_kv(model_dir):
    with llm(model_dir("llama"), 1) as one:
        w1, rep = _weight_bytes(one.engine.model)
        kv1 = one.engine.pool.k.nbytes + one.engine.pool.v.nbytes
    with llm(model_dir("llama"), 2) as two:
        w2, rep2 = _weight_bytes(two.engine.model)
        kv2 = two.engine.pool.k.nbytes + two.engine.pool.v.nbytes
        assert two.engine.pool.num_pages == 96 and two.engine.model.config.num_kv_heads == 1
    assert rep2 == rep
    assert w2 - rep == pytest.approx((w1 - rep) / 2, rel=0.01)
    assert kv2 * 2 == kv1


def test_policies_other_than_full_are_refused(model_dir):
    with llm(model_dir("llama"), 2) as two:
        with pytest.raises(ValueError, match="tensor parallelism"):
            two.engine.add_request([1, 2, 3], SamplingParams(attention="streaming"))
        # the group still serves after the refusal
        assert len(two.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0].outputs[0].token_ids) == 8


def test_one_rank_under_torchrun_goes_through_the_group(model_dir, monkeypatch):
    """What `torchrun --nproc-per-node 1 -m kvserve ... -tp 1` runs (NCCL on a GPU, gloo here)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with llm(model_dir("llama"), 1) as plain:
        want = tokens(plain.generate(PROMPTS, GREEDY, use_tqdm=False))
    for name, value in dict(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
        monkeypatch.setenv(name, value)
    with llm(model_dir("llama"), 1) as grouped:
        assert grouped.engine.tp is not None and grouped.engine.tp.world == 1
        assert tokens(grouped.generate(PROMPTS, GREEDY, use_tqdm=False)) == want
        if torch.cuda.is_available():  # scripts/gpu_check.sh: the forward's collectives went through NCCL
            import torch.distributed as dist
            assert "nccl" in str(dist.get_backend(grouped.engine.tp.compute_group))
