"""/v1/completions with echo and logprobs (OpenAI's legacy prompt scoring) through the official openai
client: the prompt's token logprobs equal a log-softmax of transformers' logits on the server's model."""
import pytest
import torch

from server_util import MODEL

PROMPT = "The sky is blue and the grass is green"


@pytest.fixture(scope="module")
def expected(http_module):
    """The prompt's ids and the reference's [P, vocab] logprobs (the server's tiny_model, rebuilt in transformers)."""
    from tiny_models import make_hf_model
    ids = http_module.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    hf = make_hf_model("llama", vocab_size=49152, max_position_embeddings=2048)
    with torch.no_grad():
        return ids, hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


@pytest.fixture(scope="module")
def http_module(live_server):
    import httpx
    with httpx.Client(base_url=live_server.url, headers=live_server.headers(), timeout=60) as client:
        yield client


def check_prompt_part(lp, expected, k):
    ids, ref = expected
    p = len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None and lp.text_offset[0] == 0
    for pos in range(1, p):
        assert abs(lp.token_logprobs[pos] - ref[pos - 1, ids[pos]].item()) < 1e-3
        assert len(lp.top_logprobs[pos]) <= k
        assert max(lp.top_logprobs[pos].values()) == pytest.approx(ref[pos - 1].max().item(), abs=1e-3)
    offsets = lp.text_offset[:p]
    assert offsets == [sum(len(t) for t in lp.tokens[:i]) for i in range(p)]


def test_echo_scores_the_prompt_with_max_tokens_0(client, expected):
    r = client.completions.create(model=MODEL, prompt=PROMPT, echo=True, logprobs=2, max_tokens=0)
    choice = r.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(expected[0])
    assert len(choice.logprobs.tokens) == len(expected[0]) and "".join(choice.logprobs.tokens) == PROMPT
    check_prompt_part(choice.logprobs, expected, 2)
    # token ids as the prompt, without logprobs: the text only
    r = client.completions.create(model=MODEL, prompt=expected[0], echo=True, max_tokens=0)
    assert r.choices[0].text == PROMPT and r.choices[0].logprobs is None and r.usage.completion_tokens == 0


def test_echo_with_generation_joins_prompt_and_completion_logprobs(client, expected):
    kw = dict(model=MODEL, prompt=PROMPT, logprobs=2, max_tokens=5, temperature=0, extra_body={"ignore_eos": True})
    plain = client.completions.create(**kw).choices[0]
    echoed = client.completions.create(echo=True, **kw).choices[0]
    p = len(expected[0])
    assert echoed.text == PROMPT + plain.text
    lp = echoed.logprobs
    assert len(lp.tokens) == p + 5
    check_prompt_part(lp, expected, 2)
    assert lp.tokens[p:] == plain.logprobs.tokens
    assert lp.token_logprobs[p:] == pytest.approx(plain.logprobs.token_logprobs, abs=1e-4)
    assert lp.text_offset[p:] == [o + len(PROMPT) for o in plain.logprobs.text_offset]
    # streamed: the first chunk carries the echo and its logprobs, the pieces add up to the whole
    chunks = [c.choices[0] for c in client.completions.create(echo=True, stream=True, **kw) if c.choices]
    assert "".join(c.text for c in chunks) == echoed.text
    assert [t for c in chunks if c.logprobs for t in c.logprobs.tokens] == lp.tokens
    assert [o for c in chunks if c.logprobs for o in c.logprobs.text_offset] == lp.text_offset


def test_max_tokens_0_needs_echo(client):
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=0)
    assert e.value.body["param"] == "max_tokens"
