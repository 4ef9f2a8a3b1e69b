"""Attention policies on the C step: a step with streaming, top-k or MagicPIG decodes stays in
kvserve/native/decode.c, which calls PolicyAttention.run_rows back for those rows' attention in the
global layers (windowed layers keep their window in C). The PyTorch step (TorchExecutor) is made to
raise, so every step here is the C one. References: the same requests under full attention (a
policy whose view covers the whole context), torch_ref's attention over the positions a narrower
view keeps (ContiguousReference), and the PyTorch step's logits (MagicPIG's sampling)."""
import random

import pytest
import torch

from engine.test_group_policies import ContiguousReference, policy_logits
from engine.test_kv_groups import engine_for, run
from kvserve.attention.policy import parse_attention
from kvserve.engine.executors import NativeExecutor, TorchExecutor
from kvserve.engine.request import SamplingParams
from kvserve.model.families import model_class
from kvserve.model.loader import load_checkpoint
from kvserve.native.decode import NativeDecoder
from model.grouped_forward import make_grouped_gemma3
from tiny_models import make_hf_model, save_hf_dir

WHOLE_VIEW = ["streaming:sink=4,window=1000", "topk:k=1000,window=2", "magicpig:K=1,L=2000,window=3"]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, tmp_path_factory):
    """int4 weights (decode.c's): a SmolLM2-style Llama (one KV group, every layer global) and a
    Gemma 3 (local layers with window 8, two global ones: four KV groups)."""
    if request.param == "llama":
        hf = make_hf_model("llama", hidden_size=128, intermediate_size=256, num_hidden_layers=3,
                           num_attention_heads=4, num_key_value_heads=2)
    else:
        hf = make_grouped_gemma3()
    cfg, weights = load_checkpoint(str(save_hf_dir(hf, tmp_path_factory.mktemp(request.param))), "int4")
    m = model_class(cfg).from_weights(cfg, weights, torch.float32)
    if not NativeDecoder.supports(m):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    return m


@pytest.fixture
def c_step_only(monkeypatch):
    def refuse(self, batch):
        raise AssertionError("a step left decode.c")
    monkeypatch.setattr(TorchExecutor, "execute", refuse)


@pytest.mark.parametrize("policy", WHOLE_VIEW)
def test_whole_view_policies_in_a_mixed_batch_give_the_full_tokens(model, policy, c_step_only):
    """Policy decodes beside full ones and prompt chunks (16 tokens a step, so chunks and decodes
    share steps, some chunks one token long) give the tokens of the same requests under full attention."""
    rng = random.Random(7)
    prompts = [rng.choices(range(3, 256), k=n) for n in (30, 13, 22, 9)]
    full = run(engine_for(model, max_tokens_per_step=16),
               [(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)) for p in prompts])
    engine = engine_for(model, max_tokens_per_step=16)
    assert isinstance(engine.runner.executor, NativeExecutor)
    attention = [policy, None, policy, policy]
    requests = [(p, SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, attention=a))
                for p, a in zip(prompts, attention)]
    assert run(engine, requests) == full
    pa = engine.runner.policy_attention
    assert pa.keys_total > 0 and pa.keys_read == pa.keys_total  # whole view: every key read


def one_token_reference(model, ids, prompt_len, keep):
    """ContiguousReference one token a step (PyTorch's int4 linears round several rows' activations
    to bf16, one row's not, like decode.c): the prompt causally, then decodes reading `keep`."""
    ref = ContiguousReference(model, keep)
    logits = []
    with torch.inference_mode():
        for p in range(len(ids)):
            ref.decode = p >= prompt_len
            out = model(torch.tensor([ids[p]]), torch.tensor([p]), ref)
            if ref.decode:
                logits.append(model.compute_logits(out))
    return torch.cat(logits)


def _streaming_keep(sink, window):
    def keep(layer, q, keys):
        kv_len = keys.shape[1]
        seen = torch.zeros(kv_len, dtype=torch.bool)
        seen[:sink] = True
        seen[max(0, kv_len - window):] = True
        return seen.expand(q.shape[0], kv_len)
    return keep


def _topk_keep(model, prompt_len, sink, window, k):
    scale, hkv = model.config.attention_scale, model.config.num_kv_heads

    def keep(layer, q, keys):  # q [H, D], keys [Hkv, S, D]
        kv_len = keys.shape[1]
        if layer == 0:  # dense_layers=0: the policy keeps layer 0 full (a local layer in the Gemma 3)
            return torch.ones(q.shape[0], kv_len, dtype=torch.bool)
        end = max(sink, min(prompt_len, kv_len - window, kv_len - 1))
        seen = torch.zeros(q.shape[0], kv_len, dtype=torch.bool)
        seen[:, :sink] = True
        seen[:, end:] = True
        if end > sink:
            grouped = keys.repeat_interleave(q.shape[0] // hkv, 0)[:, sink:end].float()
            top = (torch.einsum("hd,hsd->hs", q.float(), grouped) * scale).topk(min(k, end - sink), -1).indices
            seen.scatter_(1, top + sink, True)
        return seen
    return keep


@pytest.mark.parametrize("name", ["streaming", "topk"])
def test_narrower_views_read_their_positions_on_the_c_step(model, name, c_step_only):
    """A 40-token context, the prompt's 20 in chunks of 8: streaming (sink 4, window 6; its pages
    between given back and poisoned) and top-k (k 3 among the prompt) give the logits of torch_ref's
    attention over the kept positions in the global layers."""
    ids = random.Random(4).choices(range(3, 256), k=40)
    prompt_len = 20
    if name == "streaming":
        policy, keep = parse_attention("streaming:sink=4,window=6"), _streaming_keep(4, 6)
    else:
        policy = parse_attention("topk:k=3,sink=4,window=5,dense_layers=0")
        keep = _topk_keep(model, prompt_len, 4, 5, 3)
    want = one_token_reference(model, ids, prompt_len, keep)
    got, _ = policy_logits(model, ids, prompt_len, policy)
    assert not torch.isnan(got).any()
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
    full = one_token_reference(model, ids, prompt_len, lambda layer, q, keys: torch.ones(q.shape[0], keys.shape[1],
                                                                                            dtype=torch.bool))
    assert (full - want).abs().max() > 1e-2  # the view changed what the global layers read


def test_magicpig_on_the_c_step_gives_the_pytorch_step_s_logits(model, monkeypatch):
    """MagicPIG sampling a 60-token prompt (K=2, L=40: some keys left out): decodes on the C step
    give the logits the PyTorch step gives, with its tables built from the same cached keys."""
    ids = random.Random(5).choices(range(3, 256), k=76)
    policy = parse_attention("magicpig:K=2,L=40,sink=4,window=4,dense_layers=0")
    got, seq = policy_logits(model, ids, 60, policy)
    assert seq.attn_state is not None and seq.attn_state.layers
    monkeypatch.setattr(NativeExecutor, "execute", lambda self, batch: self.fallback.execute(batch))
    want, _ = policy_logits(model, ids, 60, policy)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
