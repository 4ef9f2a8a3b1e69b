"""kvserve bench fuzz-gguf: corrupted GGUF files against the loader. Each case must load fine or
raise ModelLoadError, within a second, with no other exception, no hang and bounded memory.

The seed file is a tiny Llama with a byte-level tokenizer written with the `gguf` package (F32
norms, F16 and Q8_0 matrices); cases mutate its header (bytes, integer fields set to edge values,
inserted or deleted bytes), truncate it, or flip bits of the tensor data.
"""
import argparse
import contextlib
import io
import json
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

EDGE = (0, 1, 2, 3, 4, 7, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1)


def write_seed(path: Path, seed: int = 0) -> int:
    """The tiny valid GGUF all cases start from; returns where its tensor data starts."""
    import gguf
    import numpy as np
    from kvserve.model.tokenizer import _bytes_to_unicode
    rng = np.random.default_rng(seed)
    hidden, ff, heads, kv_heads, layers = 64, 128, 4, 2, 2
    tokens = [c for _, c in sorted(_bytes_to_unicode().items())] + ["Ġt", "he"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_merges(["Ġ t", "h e"])
    w.add_token_types([1] * len(tokens))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def add(name, *shape):
        a = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        kind = [None, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.Q8_0][len(add.names) % 3]
        if len(shape) == 1 or kind is None:
            w.add_tensor(name, a)
        elif kind == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, kind), raw_dtype=kind)
        add.names.append(name)
    add.names = []
    add("token_embd.weight", len(tokens), hidden)
    add("output_norm.weight", hidden)
    d = hidden // heads
    for i in range(layers):
        b = f"blk.{i}."
        add(b + "attn_norm.weight", hidden)
        add(b + "ffn_norm.weight", hidden)
        add(b + "attn_q.weight", hidden, hidden)
        add(b + "attn_k.weight", kv_heads * d, hidden)
        add(b + "attn_v.weight", kv_heads * d, hidden)
        add(b + "attn_output.weight", hidden, hidden)
        add(b + "ffn_gate.weight", ff, hidden)
        add(b + "ffn_up.weight", ff, hidden)
        add(b + "ffn_down.weight", hidden, ff)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    from kvserve.model.gguf_file import GGUFFile
    return min(t.offset for t in GGUFFile(path).tensors)


def mutate(data: bytes, header: int, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.choice((1, 1, 1, 2, 3))):
        kind = rng.randrange(6)
        end = min(header, len(b)) or 1
        r = rng.random()  # the counts at the start and the tensor infos at the end are the structure
        at = rng.randrange(min(end, 128)) if r < 0.3 else \
            rng.randrange(max(0, end - 1200), end) if r < 0.7 else rng.randrange(end)
        if kind == 0:  # random bytes
            for i in range(rng.randint(1, 8)):
                if at + i < len(b):
                    b[at + i] = rng.randrange(256)
        elif kind == 1:  # an integer field set to an edge value
            width = rng.choice((4, 8))
            value = rng.choice(EDGE + (len(b), len(b) - at, rng.randrange(2**width))) % 2**width
            b[at:at + width] = struct.pack("<Q" if width == 8 else "<I", value)
        elif kind == 2:  # truncated
            b = b[:rng.randrange(len(b))]
        elif kind == 3:  # bytes inserted into the header
            b[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        elif kind == 4:  # bytes deleted from the header
            del b[at:at + rng.randint(1, 16)]
        else:  # bit flips anywhere, the tensor data included
            for _ in range(rng.randint(1, 32)):
                if b:
                    b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


class Hang(BaseException):  # not an Exception: the loader's handlers must not swallow it
    pass


def load(path: Path) -> None:
    """What `kvserve serve` does with a model file before serving: weights, model, tokenizer."""
    from kvserve.engine.engine import load_tokenizer
    from kvserve.model.families import model_class
    from kvserve.model.loader import ModelLoadError, load_checkpoint, read_gguf
    try:
        cfg, weights = load_checkpoint(str(path), "auto")
        try:
            model_class(cfg).from_weights(cfg, weights)
        except ValueError as e:  # as the Engine reports it
            raise ModelLoadError(str(e)) from None
        load_tokenizer(str(path))
    finally:
        read_gguf.cache_clear()


def run(cases: int, seed: int = 0, hang_seconds: float = 5.0, workdir: Path | None = None) -> dict:
    """Runs the cases; returns counts by outcome, the crashes and the slowest cases."""
    import torch
    from kvserve.model.loader import ModelLoadError
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        seed_path = Path(tmp) / "seed.gguf"
        header = write_seed(seed_path)
        data = seed_path.read_bytes()
        load(seed_path)  # the seed itself loads
        case_path = Path(tmp) / "case.gguf"
        rng = random.Random(seed)
        outcomes, kinds, crashes, slowest = Counter(), Counter(), [], []
        rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

        def on_alarm(*_):
            raise Hang()
        previous = signal.signal(signal.SIGALRM, on_alarm)
        try:
            for case in range(cases):
                case_path.write_bytes(mutate(data, header, rng))
                start = time.perf_counter()
                signal.setitimer(signal.ITIMER_REAL, hang_seconds)
                try:
                    quiet = io.StringIO()
                    with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet):  # progress lines
                        load(case_path)
                    outcome = "loaded"
                except ModelLoadError as e:
                    outcome = "ModelLoadError"
                    what = re.sub(r"\d+", "N", str(e).replace(str(case_path), "FILE").replace("case.gguf", "FILE"))
                    kinds[re.sub(r"['\"(\[].*", "", what)[:64].strip()] += 1
                except Hang:
                    outcome = "hang"
                    crashes.append({"case": case, "error": f"no answer in {hang_seconds} s"})
                except Exception as e:  # noqa: BLE001 - what the fuzzer looks for
                    outcome = "crash"
                    crashes.append({"case": case, "error": f"{type(e).__name__}: {e}"[:300]})
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                seconds = time.perf_counter() - start
                outcomes[outcome] += 1
                slowest = sorted(slowest + [(seconds, case)], reverse=True)[:5]
        finally:
            signal.signal(signal.SIGALRM, previous)
        rss_end = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"cases": cases, "seed": seed, "outcomes": dict(outcomes), "crashes": crashes[:20],
            "num_crashes": len(crashes), "slowest_s": [[round(s, 3), c] for s, c in slowest],
            "errors": dict(kinds.most_common(12)),
            "over_1s": sum(1 for s, _ in slowest if s > 1.0),
            "peak_rss_growth_mib": round((rss_end - rss_start) / 1024, 1)}


def replay(seed: int, case: int, out: Path) -> Path:
    """Writes case `case` of seed `seed` to `out`, to debug it alone."""
    with tempfile.TemporaryDirectory() as tmp:
        header = write_seed(Path(tmp) / "seed.gguf")
        data = (Path(tmp) / "seed.gguf").read_bytes()
    rng = random.Random(seed)
    for _ in range(case):
        mutate(data, header, rng)
    out.write_bytes(mutate(data, header, rng))
    return out


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hang-seconds", type=float, default=5.0, help="a case running longer counts as a hang")
    p.add_argument("--replay", type=int, default=None, metavar="CASE", help="write this case to --out and stop")
    p.add_argument("--out", default="fuzz-case.gguf")


def main(args) -> int:
    if args.replay is not None:
        print(replay(args.seed, args.replay, Path(args.out)))
        return 0
    report = run(args.cases, args.seed, args.hang_seconds)
    print(json.dumps(report))
    return 1 if report["num_crashes"] else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    add_args(parser)
    sys.exit(main(parser.parse_args()))
