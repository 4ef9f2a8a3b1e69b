"""A GGUF of a model family at a real shape with random weights, carrying a donor GGUF's tokenizer
(default: the packaged SmolLM2's), so that `kvserve bench latency FILE` can time kvserve against
llama.cpp on a family no packaged model has. Uses gguf-py and transformers, as the tests do.

    .venv/bin/python scripts/random_family_gguf.py qwen3 /tmp/qwen3-0.6b-q8_0.gguf
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
SHAPES = {  # the published configs' dims, with the donor's vocabulary
    "qwen3": dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=40960),  # Qwen3-0.6B
    "phi3": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=32, max_position_embeddings=4096),  # Phi-3-mini-4k
}


def main():
    import gguf
    from tiny_models import make_family_model, write_family_gguf

    from kvserve.model.loader import resolve_model_path
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("family", choices=SHAPES)
    p.add_argument("out")
    p.add_argument("--qtype", default="Q8_0", help="GGUF type of the 2-D weights (Q8_0, Q4_0, F16 ...)")
    p.add_argument("--layers", type=int, help="fewer layers than the real model's")
    p.add_argument("--tokenizer-from", help="GGUF whose tokenizer to copy (default: the packaged model)")
    args = p.parse_args()
    donor = gguf.GGUFReader(str(resolve_model_path(args.tokenizer_from)))
    fields = {k: f for k, f in donor.fields.items()  # bos/eos: the writer sets those
              if k.startswith("tokenizer.") and not k.endswith(("bos_token_id", "eos_token_id"))}
    vocab = len(fields["tokenizer.ggml.tokens"].data)
    shape = SHAPES[args.family] | ({"num_hidden_layers": args.layers} if args.layers else {})
    print(f"building a random {args.family} model of {shape} ...", flush=True)
    model = make_family_model(args.family, vocab_size=vocab, tie_word_embeddings=True, **shape)

    def add_tokenizer(writer, *a, **k):  # the donor's tokenizer fields, as they are
        for key, f in fields.items():
            value = f.contents()
            vtype = f.types[0]
            if vtype == gguf.GGUFValueType.ARRAY:
                writer.add_array(key, value)
            else:
                writer.add_key_value(key, value, vtype)
    original = gguf.GGUFWriter.add_vocab_size
    gguf.GGUFWriter.add_vocab_size = lambda w, n: (original(w, n), add_tokenizer(w))
    print(f"writing {args.out} ({args.qtype}) ...", flush=True)
    write_family_gguf(model, Path(args.out), args.qtype)


if __name__ == "__main__":
    main()
