"""Attention policies on a model with several KV groups (a tiny Gemma 3: local layers with window W,
global layers): a policy applies to the global layers, each reading its own group's page table;
the local layers keep their window. A policy whose view covers the whole context gives
transformers' greedy tokens; a narrower one gives the logits of a contiguous reference that
attends, in the global layers, exactly the positions the policy keeps (torch_ref's attend), with
the pages the engine gives back poisoned with NaN."""
import random
from types import SimpleNamespace

import pytest
import torch

from engine.test_kv_groups import engine_for, greedy, hf_greedy, run
from kvserve.attention.policy import parse_attention
from kvserve.attention.torch_ref import attend, band_mask
from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.executors import select_executor
from kvserve.engine.request import SamplingParams, Sequence
from kvserve.engine.runner import ModelRunner
from kvserve.kv.groups import KVGroups
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.pool import PagePool
from kvserve.model.random_weights import token_tokenizer
from model.grouped_forward import PAGE, make_grouped_gemma3
from model.test_families import load
from tiny_models import make_family_model, save_hf_dir

WHOLE_VIEW = ["streaming:sink=4,window=1000", "topk:k=1000,window=2", "magicpig:K=1,L=2000,window=3"]


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory):
    hf = make_grouped_gemma3()
    return hf, load(save_hf_dir(hf, tmp_path_factory.mktemp("gemma3-policies")))


@pytest.mark.parametrize("policy", WHOLE_VIEW)
def test_a_policy_seeing_every_position_gives_transformers_tokens(gemma3, policy):
    """Per-request policies beside full requests in one batch, prompts past the window W, chunked:
    tokens equal transformers' and the pages balance after every step (run checks integrity)."""
    hf, model = gemma3
    rng = random.Random(7)
    prompts = [rng.choices(range(3, 256), k=n) for n in (30, 13, 22)]
    want = [[hf_greedy(hf, p, 20)] for p in prompts]
    engine = engine_for(model, max_tokens_per_step=16)
    attention = [policy, None, policy]
    requests = [(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, attention=a))
                for p, a in zip(prompts, attention)]
    assert run(engine, requests) == want
    pa = engine.runner.policy_attention
    assert len(pa.groups) == 4 and pa.keys_total > 0


@pytest.fixture(scope="module")
def gemma2(tmp_path_factory):
    """A tiny Gemma 2: windowed and global layers alternate; queries scaled up so that scores pass the cap."""
    hf = make_family_model("gemma2", num_hidden_layers=4, head_dim=16, query_pre_attn_scalar=16, sliding_window=8,
                           tie_word_embeddings=True, attn_logit_softcapping=1.0, final_logit_softcapping=1.0)
    with torch.no_grad():
        for layer in hf.model.layers:
            layer.self_attn.q_proj.weight.mul_(40)
    return hf, load(save_hf_dir(hf, tmp_path_factory.mktemp("gemma2-policies")))


@pytest.mark.parametrize("policy", WHOLE_VIEW)
def test_every_policy_caps_scores_as_gemma2_does(gemma2, policy):
    """Gemma 2's attention softcap holds in the global layers under every policy: tokens equal
    transformers' (a policy that skipped the cap would change them)."""
    hf, model = gemma2
    rng = random.Random(3)
    prompts = [rng.choices(range(3, 256), k=n) for n in (26, 17)]
    want = [[hf_greedy(hf, p, 16)] for p in prompts]
    requests = [(p, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, attention=policy)) for p in prompts]
    assert run(engine_for(model, max_tokens_per_step=16), requests) == want


def test_engine_default_policy_on_groups(gemma3):
    """--attention streaming on a grouped model: requests without their own policy take it."""
    hf, model = gemma3
    engine = Engine(EngineConfig(cache=CacheConfig(PAGE, 400, None, True), scheduler=SchedulerConfig(64, 4),
                                 attention="streaming:sink=4,window=1000"),
                    model=model, tokenizer=token_tokenizer(256))
    prompt = random.Random(2).choices(range(3, 256), k=25)
    assert run(engine, [(prompt, greedy(15))]) == [[hf_greedy(hf, prompt, 15)]]
    assert engine.runner.policy_attention.keys_total > 0


def test_magicpig_offload_is_refused_on_windowed_models(gemma3):
    _, model = gemma3
    with pytest.raises(ValueError, match="without sliding-window layers"):
        Engine(EngineConfig(cache=CacheConfig(PAGE, 400, None, False), attention="magicpig:offload=true"),
               model=model, tokenizer=token_tokenizer(256))
    engine = engine_for(model)
    with pytest.raises(ValueError, match="offload"):
        engine.add_request([5, 6, 7], SamplingParams(attention="magicpig:offload=true"))


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_policy_decodes_beside_the_c_step(family, request, tmp_path):
    """int4 weights: full steps run in decode.c, policy decodes called back from it over the same
    group tables (Gemma 2: with its score cap); a whole-view streaming request gives the full
    request's tokens."""
    from kvserve.engine.executors import NativeExecutor
    from kvserve.model.families import model_class
    from kvserve.model.loader import load_checkpoint
    from kvserve.native.decode import NativeDecoder
    hf, _ = request.getfixturevalue(family)
    cfg, weights = load_checkpoint(str(save_hf_dir(hf, tmp_path)), "int4")
    model = model_class(cfg).from_weights(cfg, weights, torch.float32)
    if not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    engine = engine_for(model, max_tokens_per_step=16)
    assert isinstance(engine.runner.executor, NativeExecutor)
    prompt = random.Random(9).choices(range(3, 256), k=27)
    requests = [(prompt, SamplingParams(temperature=0, max_tokens=25, ignore_eos=True, attention=a))
                for a in (None, "streaming:sink=4,window=1000")]
    [[full], [streamed]] = run(engine, requests)
    assert streamed == full and engine.runner.policy_attention.keys_total > 0


# ---- a narrower view against a contiguous reference ---------------------------------------------

class ContiguousReference:
    """Attention over every position's K/V kept contiguously per layer (no pages): prompt rows
    causal and windowed; a decode row reads its window in a local layer and, in a global layer,
    the positions `keep(layer, q, keys)` picks (a bool mask [H, kv_len])."""

    def __init__(self, model, keep):
        cfg = model.config
        self.windows, self.scale, self.softcap = cfg.layer_windows(), cfg.attention_scale, cfg.attn_softcap
        self.keep = keep
        self.k = [None] * cfg.num_layers
        self.v = [None] * cfg.num_layers
        self.decode = False

    def run(self, layer, q, k, v):
        kt, vt = k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, Hkv, T, D]
        self.k[layer] = kt if self.k[layer] is None else torch.cat([self.k[layer], kt], 2)
        self.v[layer] = vt if self.v[layer] is None else torch.cat([self.v[layer], vt], 2)
        n, total = q.shape[0], self.k[layer].shape[2]
        pos = torch.arange(total)
        mask = band_mask(pos[total - n:], pos, self.windows[layer])  # [T, S]
        if self.decode and self.windows[layer] is None:
            mask = self.keep(layer, q[0], self.k[layer][0]) & mask  # [H, S]: one query row, per head
            mask = mask[None, :, None, :]
        out = attend(q.transpose(0, 1)[None], self.k[layer], self.v[layer], self.scale, self.softcap, mask)
        return out[0].transpose(0, 1)


def reference_logits(model, ids, prompt_len, keep):
    ref = ContiguousReference(model, keep)
    logits = []
    with torch.inference_mode():
        model(torch.tensor(ids[:prompt_len]), torch.arange(prompt_len), ref)
        ref.decode = True
        for p in range(prompt_len, len(ids)):
            logits.append(model.compute_logits(model(torch.tensor([ids[p]]), torch.tensor([p]), ref)))
    return torch.cat(logits)


def policy_logits(model, ids, prompt_len, policy, chunk=8):
    """The engine's executor and page release over one sequence: the prompt in chunks, then each
    token of ids after it as a decode under `policy`; pages given back are poisoned with NaN."""
    cfg = model.config
    groups = KVGroups.from_windows(cfg.layer_windows())
    pool = PagePool(groups.slots, len(groups) * (-(-len(ids) // PAGE)) + 4, PAGE, cfg.num_kv_heads, cfg.head_dim)
    kv = KVCacheManager(pool, enable_prefix_caching=False, groups=groups)
    runner = ModelRunner(model, select_executor(model, pool, "cpu", groups=groups))
    engine = SimpleNamespace(kv=kv, pool=pool, kv_groups=groups)  # what the engine's release reads
    seq = Sequence(0, "r", 0, ids[:prompt_len], SamplingParams(attention=policy), 0.0)
    logits = []
    for p in range(prompt_len, len(ids) + 1):
        while seq.num_computed_tokens < len(seq.token_ids):
            n = min(chunk, len(seq.token_ids) - seq.num_computed_tokens)
            assert kv.allocate(seq, seq.num_computed_tokens + n)
            out, _ = runner.execute([(seq, n)])
            seq.num_computed_tokens += n
            before = {q for t in seq.tables for q in t if q >= 0}
            Engine._release_streamed_pages(engine, [(seq, n)])
            for q in before - {q for t in seq.tables for q in t if q >= 0}:
                pool.k[:, :, q * PAGE:(q + 1) * PAGE] = float("nan")
                pool.v[:, :, q * PAGE:(q + 1) * PAGE] = float("nan")
                pool.zeroed[q] = False
            kv.check_integrity([seq])
        if p > prompt_len:
            logits.append(out)
        if p < len(ids):
            seq.token_ids.append(ids[p])
    return torch.cat(logits), seq


def test_streaming_narrower_than_the_context_reads_its_positions_in_global_layers(gemma3):
    """sink 4 + window 6 over a 40-token context: global layers read those 10 positions, local
    layers their window of 8; the global group holds the sink and window pages only."""
    _, model = gemma3
    ids = random.Random(4).choices(range(3, 256), k=40)
    policy = parse_attention("streaming:sink=4,window=6")

    def keep(layer, q, keys):
        kv_len = keys.shape[1]
        seen = torch.zeros(kv_len, dtype=torch.bool)
        seen[:4] = True
        seen[kv_len - 6:] = True
        return seen.expand(q.shape[0], kv_len)
    want = reference_logits(model, ids, 20, keep)
    got, seq = policy_logits(model, ids, 20, policy)
    assert not torch.isnan(got).any()
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()
    full = reference_logits(model, ids, 20, lambda layer, q, keys: torch.ones(q.shape[0], keys.shape[1], dtype=bool))
    assert (full - want).abs().max() > 1e-2  # the view changed what the global layers read
    global_group = seq.tables[KVGroups.from_windows(model.config.layer_windows()).windows.index(None)]
    assert sum(p >= 0 for p in global_group) <= 1 + 3  # the sink page and the window's (6 tokens: <= 3 pages)


def test_topk_narrower_than_the_context_keeps_each_heads_top_keys(gemma3):
    """topk k=3 with sink 4 and window 5: in a global layer each query head reads the sink, the
    window and its 3 highest-scoring keys among the prompt positions in between."""
    _, model = gemma3
    ids = random.Random(6).choices(range(3, 256), k=36)
    prompt_len, sink, window, k = 24, 4, 5, 3
    policy = parse_attention(f"topk:k={k},sink={sink},window={window},dense_layers=0")
    scale = model.config.attention_scale
    hkv = model.config.num_kv_heads

    def keep(layer, q, keys):  # q [H, D], keys [Hkv, S, D]
        kv_len = keys.shape[1]
        end = max(sink, min(prompt_len, kv_len - window, kv_len - 1))
        seen = torch.zeros(q.shape[0], kv_len, dtype=torch.bool)
        seen[:, :sink] = True
        seen[:, end:] = True
        if end > sink:
            scores = torch.einsum("hd,hsd->hs", q.float(), keys.repeat_interleave(q.shape[0] // hkv, 0)[:, sink:end].float())
            top = (scores * scale).topk(min(k, end - sink), -1).indices + sink
            seen.scatter_(1, top, True)
        return seen
    want = reference_logits(model, ids, prompt_len, keep)
    got, _ = policy_logits(model, ids, prompt_len, policy)
    assert (got - want).abs().max() < 1e-4, (got - want).abs().max()


# ---- self speculation -------------------------------------------------------------------------

def _int4(hf, tmp_path):
    from kvserve.model.families import model_class
    from kvserve.model.loader import load_checkpoint
    from kvserve.native.decode import NativeDecoder
    cfg, weights = load_checkpoint(str(save_hf_dir(hf, tmp_path)), "int4")
    model = model_class(cfg).from_weights(cfg, weights, torch.float32)
    if not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    return model


def _spec_engine(model, spec, page=PAGE, pages=400):
    return Engine(EngineConfig(cache=CacheConfig(page, pages, None, True), scheduler=SchedulerConfig(64, 4),
                               speculative=spec, speculative_window=4, num_speculative_tokens=3),
                  model=model, tokenizer=token_tokenizer(256))


def test_self_drafts_on_the_c_step_shorten_every_groups_table(gemma3, tmp_path):
    """One-token pages: the C step's shortened tables (every group's alike) give the draft logits
    PolicyAttention gives with the streaming view on the global layers and the window on the
    local ones; the view covers the widest window and a page (8 + 1 > speculative_window 4)."""
    from kvserve.engine.executors import NativeExecutor
    hf, _ = gemma3
    model = _int4(hf, tmp_path)
    engine = _spec_engine(model, "self", page=1, pages=2048)
    assert isinstance(engine.runner.executor, NativeExecutor) and len(engine.kv_groups) == 4
    proposer = engine.speculator.proposer
    assert proposer.policy.window == 9 and proposer.min_context == 4 * (4 + 9)
    prompt = random.Random(11).choices(range(3, 256), k=60)
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=5))
    seq = engine.scheduler.waiting[0]
    engine.step()  # the prompt's K/V; the local groups give back the pages behind their window
    assert engine.kv.allocate(seq, 70)
    assert any(p < 0 for p in seq.tables[0])  # local group 0 holds -1 below its window
    assert seq.num_computed_tokens == 60 and len(seq.token_ids) == 61
    positions, ids = [60, 61, 62], [seq.token_ids[60], 5, 6]  # the drafts' positions, past the view
    native = proposer._forward(ids, [seq] * 3, positions)
    proposer.native = None
    policy = torch.cat([proposer._forward([t], [seq], [p]) for t, p in zip(ids, positions)])
    assert torch.allclose(native, policy, atol=2e-3, rtol=1e-3), (native - policy).abs().max()


@pytest.mark.parametrize("native", [False, True])
def test_self_speculation_keeps_greedy_tokens_on_groups(gemma3, tmp_path, native):
    """A 70-token context (past min_context 64: the drafts run), 30 tokens: equal to plain decoding
    (and to transformers' for float weights); drafts were verified and the pages balance."""
    hf, model = gemma3
    if native:
        model = _int4(hf, tmp_path)
    rng = random.Random(12)
    prompts = [rng.choices(range(3, 256), k=70), rng.choices(range(3, 256), k=20) * 4]
    requests = [(p, greedy(30)) for p in prompts]
    want = run(_spec_engine(model, None), requests)
    if not native:
        assert want == [[hf_greedy(hf, p, 30)] for p in prompts]
    engine = _spec_engine(model, "self")
    assert engine.speculator.proposer.min_context == 64
    assert run(engine, requests) == want
    assert engine.speculator.stats.rounds > 0


# ---- draft-model speculation --------------------------------------------------------------------

@pytest.mark.parametrize("draft", ["itself", "gemma3", "llama"])
def test_draft_model_speculation_on_groups(gemma3, tmp_path, draft):
    """A grouped target (tiny Gemma 3) with a draft model: itself (every draft accepted), another
    random Gemma 3 (a grouped draft pool: shadows keep every group's pages) or a Llama (one group):
    tokens equal transformers' and the target's pages balance after every step."""
    from tiny_models import make_hf_model
    hf, model = gemma3
    if draft == "itself":
        draft_model = model
    elif draft == "gemma3":
        draft_model = load(save_hf_dir(make_grouped_gemma3_seeded(5), tmp_path))
    else:
        draft_model = load(save_hf_dir(make_hf_model("llama", seed=5), tmp_path))
    engine = Engine(EngineConfig(cache=CacheConfig(PAGE, 400, None, True), scheduler=SchedulerConfig(64, 4),
                                 speculative="draft", num_speculative_tokens=3),
                    model=model, tokenizer=token_tokenizer(256), draft_model=draft_model)
    rng = random.Random(13)
    prompts = [rng.choices(range(3, 256), k=n) for n in (30, 12)]
    assert run(engine, [(p, greedy(25)) for p in prompts]) == [[hf_greedy(hf, p, 25)] for p in prompts]
    stats = engine.speculator.stats
    assert stats.rounds > 0
    if draft == "itself":
        assert stats.accepted == stats.proposed > 0
    if draft == "gemma3":
        assert len(engine.speculator.proposer.kv.groups) == 4


def make_grouped_gemma3_seeded(seed):
    from model.grouped_forward import LAYER_TYPES, ROPE, W
    from tiny_models import make_family_model
    return make_family_model("gemma3", seed=seed, num_hidden_layers=7, layer_types=LAYER_TYPES, head_dim=16,
                             query_pre_attn_scalar=16, sliding_window=W, tie_word_embeddings=True,
                             rope_parameters=ROPE)


def test_draft_model_speculation_on_the_c_step(gemma3, tmp_path):
    """int4 target and draft on decode.c, both grouped: greedy tokens equal plain decoding's."""
    hf, _ = gemma3
    model = _int4(hf, tmp_path)
    prompts = [random.Random(14).choices(range(3, 256), k=26)]
    want = run(_spec_engine(model, None), [(p, greedy(25)) for p in prompts])
    engine = Engine(EngineConfig(cache=CacheConfig(PAGE, 400, None, True), scheduler=SchedulerConfig(64, 4),
                                 speculative="draft", num_speculative_tokens=3),
                    model=model, tokenizer=token_tokenizer(256), draft_model=model)
    assert run(engine, [(p, greedy(25)) for p in prompts]) == want
    assert engine.speculator.stats.accepted > 0


def test_eval_error_probe_reads_each_layer_s_own_group(gemma3):
    """kvserve eval longctx's ErrorProbe measures a policy's decode against full attention over that
    layer's KV group's pages (it read group 0's, a local group, -1 behind the window after a prefix
    hit: Gemma 3 270M's continuation crashed). A policy that sees every position errs by nothing."""
    from kvserve.eval.longctx import ErrorProbe, forced_logits
    _, model = gemma3
    engine = engine_for(model, prefix=True, max_tokens_per_step=16)
    ids = random.Random(3).choices(range(3, 256), k=60)
    forced_logits(engine, ids, 40, parse_attention("full"))  # caches the prompt's pages, as the eval does
    probe = ErrorProbe(engine.runner.policy_attention)
    forced_logits(engine, ids, 40, parse_attention(WHOLE_VIEW[0]))
    probe.restore()
    assert sorted(probe.errors) == [2, 6]  # the global layers
    assert max(e for errors in probe.errors.values() for e in errors) < 1e-3
