"""End to end on the real default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers
loading the same file."""
from pathlib import Path

import pytest
import torch

from kvserve import LLM, SamplingParams
from kvserve.native.decode import NativeDecoder
from model.paged_forward import paged_logits

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden press adapted from those used to make "
    "wine. Before his invention, books were copied by hand, which made them rare and expensive. "
    "Within a few decades, printing shops had spread to more than two hundred cities across Europe, "
    "and millions of books had been produced. The effects were profound: literacy rates rose, "
    "scientific ideas circulated faster than ever before, and the Reformation used pamphlets to "
    "reach ordinary people. Historians still debate how quickly these changes unfolded, but few "
    "doubt that the press changed how knowledge was shared, stored and trusted for centuries. "
    "In the centuries that followed, presses grew larger and faster. Steam power arrived in the "
    "early nineteenth century, allowing newspapers to print thousands of sheets every hour, and "
    "the rotary press later fed continuous rolls of paper through cylinders. Cheap newspapers "
    "created a mass reading public, while publishers learned to sell advertising to pay for them. "
    "Today most text is read on screens, yet the habits formed by print remain: we still expect "
    "pages, titles, authors, editions and the quiet authority of a finished, fixed document. "
    "Libraries followed a similar path. Early collections were chained to desks in monasteries and "
    "universities, because each volume represented months of labour. As printed books became "
    "cheaper, private libraries grew in the houses of merchants and lawyers, and subscription "
    "libraries let members share the cost of new titles. In the nineteenth century many towns opened "
    "free public libraries, often paid for by wealthy donors who believed that reading would improve "
    "workers and strengthen democracy. Librarians developed catalogues, classification schemes and "
    "reading rooms, and they argued about whether novels were worth buying at all. The card catalogue, "
    "with its long wooden drawers, became a symbol of orderly knowledge. Later, computers replaced the "
    "cards with databases, and search engines taught readers to expect an answer in seconds rather "
    "than an afternoon. Yet libraries did not disappear. They became places to study, to borrow "
    "laptops, to attend classes and to meet neighbours, and many of them now lend tools, seeds and "
    "musical instruments as well as books. Their history shows that a technology for storing text "
    "also shapes the buildings, jobs and customs that grow around it, and that those customs can "
    "outlast the machines that first made them possible. The same pattern can be seen in maps, "
    "music and money: each moved from scarce handmade objects to cheap copies, and then to signals "
    "that live inside networks. At every stage people worried that something valuable would be lost, "
    "and at every stage they found new uses that nobody had predicted."
)
CHATS = ["What is the capital of France?", "Write a haiku about the sea.",
         "Explain in one sentence what a prime number is."]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(smollm2_path, dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def reference(smollm2_path):
    from transformers import AutoModelForCausalLM
    path = Path(smollm2_path)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference_logits(llm, reference):
    ids = llm.tokenizer.encode(TEXT)[:500]
    assert len(ids) == 500
    with torch.no_grad():
        return ids, reference(torch.tensor([ids])).logits[0]


def perplexity(logits: torch.Tensor, ids: list[int]) -> float:
    return torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:])).exp().item()


# 1: a token a step, as decode runs: PyTorch ops around kvserve/native/qmatmul.c, or all of it in
# decode.c, which also takes prompt chunks (128: 8 blocks of its block attention)
@pytest.mark.parametrize("chunk, native_decode", [(128, False), (1, False), (1, True), (128, True)])
def test_quantized_weights_keep_accuracy(smollm2_path, reference_logits, chunk, native_decode):
    """Weights held as int4 (the GGUF's Q4_1 blocks) and int8 (embeddings), bf16 activations."""
    model = LLM(smollm2_path, dtype="bfloat16", quantization="auto").engine.model
    assert type(model.layers[0].mlp.down_proj).__name__ == "QuantizedLinear"
    ids, ref = reference_logits
    if native_decode and not NativeDecoder.supports(model):
        pytest.skip("no native decode kernel here (no C compiler or no AVX2)")
    ours = paged_logits(model, ids, chunk=chunk, native_decode=native_decode)
    agreement = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
    ratio = perplexity(ours, ids) / perplexity(ref, ids)
    assert agreement >= 0.98 and abs(ratio - 1) <= 0.01, (agreement, ratio)


def test_logits_match_transformers(llm, reference):
    ids = llm.tokenizer.encode(TEXT)[:200]
    assert len(ids) == 200
    ours = paged_logits(llm.engine.model, ids)
    with torch.no_grad():
        ref = reference(torch.tensor([ids])).logits[0]
    assert (ours.argmax(-1) == ref.argmax(-1)).all()
    assert (ours - ref).abs().max() < 1e-2 * (ref.max() - ref.min())


def test_greedy_chat_matches_transformers(llm, reference):
    params = SamplingParams(temperature=0, max_tokens=32)
    outs = llm.chat([[{"role": "user", "content": c}] for c in CHATS], params, use_tqdm=False)
    for chat, out in zip(CHATS, outs):
        prompt = llm.tokenizer.encode(llm.apply_chat_template([{"role": "user", "content": chat}]),
                                      add_special_tokens=False)
        with torch.no_grad():
            ref = reference.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()


def test_answers_paris(llm):
    out = llm.chat([{"role": "user", "content": CHATS[0]}], SamplingParams(temperature=0, max_tokens=32),
                   use_tqdm=False)
    assert "Paris" in out[0].outputs[0].text
