"""chat_template_kwargs reach the chat template: Qwen3's enable_thinking switch, through the API and
LLM.chat, on a template that renders an empty think block when thinking is off."""
import pytest

THINK_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                  "{% if add_generation_prompt %}<|im_start|>assistant\n"
                  "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
                  "{% endif %}")
MESSAGES = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def think_template(live_server, monkeypatch):
    monkeypatch.setattr(live_server.engine.tokenizer, "chat_template", THINK_TEMPLATE)


def prompt_tokens(http, **extra) -> int:
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 1} | extra)
    assert r.status_code == 200, r.text
    return r.json()["usage"]["prompt_tokens"]


def test_enable_thinking_reaches_the_template(http, think_template, smollm2_tokenizer):
    thinking = prompt_tokens(http)
    assert prompt_tokens(http, chat_template_kwargs={"enable_thinking": True}) == thinking
    empty_think = len(smollm2_tokenizer.encode("<think>\n\n</think>\n\n", add_special_tokens=False))
    assert prompt_tokens(http, chat_template_kwargs={"enable_thinking": False}) == thinking + empty_think


def test_reserved_template_variables_are_refused(http, think_template):
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, "max_tokens": 1,
                                                 "chat_template_kwargs": {"messages": []}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "chat_template_kwargs"


def test_llm_chat_passes_chat_template_kwargs(make_engine, smollm2_tokenizer, monkeypatch):
    from kvserve import LLM, SamplingParams
    monkeypatch.setattr(smollm2_tokenizer, "chat_template", THINK_TEMPLATE)
    llm = LLM(engine=make_engine())
    params = SamplingParams(temperature=0, max_tokens=1)
    on, off = (llm.chat(MESSAGES, params, use_tqdm=False, chat_template_kwargs=kw)[0]
               for kw in (None, {"enable_thinking": False}))
    assert off.prompt_token_ids[:len(on.prompt_token_ids)] == on.prompt_token_ids
    assert smollm2_tokenizer.decode(off.prompt_token_ids[len(on.prompt_token_ids):]) == "<think>\n\n</think>\n\n"


def test_continue_final_message_leaves_the_last_turn_open(http, smollm2_tokenizer):
    """vLLM's continue_final_message: the model goes on writing the caller's begun assistant reply."""
    messages = MESSAGES + [{"role": "assistant", "content": "The answer is"}]
    closed = prompt_tokens(http, messages=messages, add_generation_prompt=False)
    assert prompt_tokens(http, messages=messages, add_generation_prompt=False, continue_final_message=True) == \
        closed - len(smollm2_tokenizer.encode("<|im_end|>\n", add_special_tokens=False))
    r = http.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, "max_tokens": 1,
                                                 "continue_final_message": True})
    assert r.status_code == 400 and "add_generation_prompt" in r.json()["error"]["message"]
