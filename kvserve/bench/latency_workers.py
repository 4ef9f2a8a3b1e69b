"""One engine's single-stream latency, measured in a process of its own so that its peak RSS is
its own. Run as a script by `kvserve bench latency`; prints one JSON line. The llama.cpp worker
imports only llama_cpp and the standard library, so it runs from llama-cpp-python's own venv."""
import argparse
import json
import resource
import statistics
import time

PREFILL_RUNS = 3  # the long prompt's timings in each process, of which the median counts


def median_prefill(run_once) -> float:
    """The median over PREFILL_RUNS of run_once(), which processes the long prompt afresh and
    returns its seconds."""
    return statistics.median(run_once() for _ in range(PREFILL_RUNS))


def peak_rss_mb() -> float:
    """This process's high-water RSS. Linux's ru_maxrss survives exec, so a child would report
    its parent's peak; /proc's VmHWM starts afresh with the new program."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def context_len(args, prompt: list[int], long_prompt: list[int]) -> int:
    """The tokens both engines' caches hold: the longest request of the run, at least 2048."""
    return max(2048, len(prompt) + args.output_len, len(long_prompt) + 1)


def run_llama_cpp(args, prompt: list[int], long_prompt: list[int]) -> dict:
    from llama_cpp import Llama
    runtime_rss = peak_rss_mb()
    llm = Llama(args.model, n_threads=args.threads, n_threads_batch=args.threads,
                n_ctx=context_len(args, prompt, long_prompt),
                n_batch=512, verbose=False)
    llm.eval(prompt[:8])  # warm-up

    def prefill_once():
        llm.reset()
        start = time.perf_counter()
        llm.eval(long_prompt)
        llm.sample(temp=0.0)
        return time.perf_counter() - start

    prefill = median_prefill(prefill_once)
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    token = llm.sample(temp=0.0)
    ttft = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.output_len - 1):  # EOS is not checked: a fixed number of tokens, like ignore_eos
        llm.eval([token])
        token = llm.sample(temp=0.0)
    decode = time.perf_counter() - start
    return dict(engine="llama.cpp (llama-cpp-python)", prefill_s=prefill, ttft_s=ttft, decode_s=decode,
                peak_rss_mb=peak_rss_mb(), runtime_rss_mb=runtime_rss, kv_cache_mb=None)


def run_kvserve(args, prompt: list[int], long_prompt: list[int]) -> dict:
    from kvserve.config import CacheConfig, EngineConfig
    from kvserve.engine.engine import Engine
    from kvserve.engine.request import SamplingParams
    from kvserve.kv.groups import KVGroups
    from kvserve.kv.windows import kv_windows
    from kvserve.model.loader import load_checkpoint
    from kvserve.process import tune_gc, tune_malloc
    tune_malloc()  # as the kvserve command does
    tune_gc()
    runtime_rss = peak_rss_mb()
    # a cache for the longest request of this benchmark, as llama.cpp's n_ctx is sized for it: its
    # pages in each KV group (a page holds one group's layers)
    config, _ = load_checkpoint(args.model)  # the config; a GGUF's weights are read lazily
    groups = len(KVGroups.from_windows(kv_windows(config)))
    pages = -(-context_len(args, prompt, long_prompt) // 16)
    engine = Engine(EngineConfig(model=args.model, dtype=args.dtype, quantization=args.quantization,
                                 threads=args.threads, compile=args.compile,
                                 cache=CacheConfig(num_pages=groups * pages)))

    def timed(ids, max_tokens):
        stamps = [time.perf_counter()]
        rid = engine.add_request(ids, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
        done = False
        while not done:
            for out in engine.step():
                if out.request_id == rid:
                    stamps.extend(time.perf_counter() for _ in range(len(out.outputs[0].token_ids) - len(stamps) + 1))
                    done = out.finished
        return stamps

    timed(prompt[:8], 4)  # warm-up

    def prefill_once():
        engine.kv.prefix and engine.kv.prefix.clear()  # no prefix hits between the runs
        stamps = timed(long_prompt, 1)
        return stamps[1] - stamps[0]

    prefill = median_prefill(prefill_once)
    stamps = timed(prompt, args.output_len)
    kv_mb = engine.pool.k.nbytes * 2 / 2**20
    return dict(engine="kvserve", prefill_s=prefill, ttft_s=stamps[1] - stamps[0], decode_s=stamps[-1] - stamps[1],
                peak_rss_mb=peak_rss_mb(), runtime_rss_mb=runtime_rss, kv_cache_mb=kv_mb)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("engine", choices=["kvserve", "llama.cpp"])
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--output-len", type=int, required=True)
    p.add_argument("--prompt", required=True, help="JSON [short prompt ids, long prompt ids]")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--quantization", default="auto")
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    prompt, long_prompt = json.loads(args.prompt)
    run = run_kvserve if args.engine == "kvserve" else run_llama_cpp
    print(json.dumps(run(args, prompt, long_prompt)))


if __name__ == "__main__":
    main()
