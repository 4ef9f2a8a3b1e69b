"""Prometheus metrics of one server: its own registry, so several apps in one process (tests)
never share counters. Engine gauges are read when scraped, not pushed every step."""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from kvserve.engine.engine import Engine
from kvserve.engine.request import RequestOutput

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)


class ServerMetrics:
    def __init__(self, engine: Engine):
        self.engine = engine
        r = self.registry = CollectorRegistry()
        self.requests = Counter("kvserve_http_requests", "HTTP requests by endpoint and status",
                                ["method", "endpoint", "status"], registry=r)
        self.rejected = Counter("kvserve_requests_rejected", "Requests refused for load: queued_requests, "
                                "queued_tokens (429) or queue_timeout (503)", ["reason"], registry=r)
        self.prompt_tokens = Counter("kvserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("kvserve_generation_tokens", "Generated tokens", registry=r)
        self.ttft = Histogram("kvserve_time_to_first_token_seconds", "Time to first token",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("kvserve_time_per_output_token_seconds", "Time per output token after the first",
                              buckets=_TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("kvserve_e2e_request_latency_seconds", "Arrival to last token",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.rag_retrievals = Counter("kvserve_rag_retrievals", "RAG retrievals (/v1/retrieve and RAG chats)",
                                      registry=r)
        self.rag_seconds = Histogram("kvserve_rag_retrieval_seconds", "Embedding, HyDE passage and IVF search",
                                     buckets=_LATENCY_BUCKETS, registry=r)
        self.rag_search = Histogram("kvserve_rag_search_seconds", "IVF search alone", buckets=_LATENCY_BUCKETS,
                                    registry=r)
        self.rag_hits = Counter("kvserve_rag_cluster_hits", "IVF clusters a search found in the RAM cache", registry=r)
        self.rag_misses = Counter("kvserve_rag_cluster_misses", "IVF clusters a search read from disk", registry=r)
        self.rag_prefetched = Counter("kvserve_rag_prefetched_clusters",
                                      "IVF clusters read ahead by lookahead prefetching", registry=r)
        self.embedding_inputs = Counter("kvserve_embedding_inputs", "Texts embedded by /v1/embeddings", registry=r)
        self.embedding_tokens = Counter("kvserve_embedding_tokens", "Embedder tokens of those texts", registry=r)
        self.embedding_seconds = Histogram("kvserve_embedding_seconds", "Time to embed one /v1/embeddings request",
                                           buckets=_LATENCY_BUCKETS, registry=r)
        gauges = {
            "kvserve_requests_running": ("Requests with a sequence in the running batch", self._running),
            "kvserve_requests_waiting": ("Requests waiting to be scheduled", self._waiting),
            "kvserve_kv_pages_total": ("KV cache pages", lambda: engine.pool.num_pages),
            "kvserve_kv_pages_used": ("KV pages not free (requests and prefix cache)",
                                      lambda: engine.pool.num_pages - engine.pool.num_free),
            "kvserve_kv_pages_active": ("KV pages held by requests; 0 when idle", self._active_pages),
            "kvserve_kv_pages_cached": ("KV pages held by the prefix cache",
                                        lambda: len(engine.kv.prefix) if engine.kv.prefix else 0),
            "kvserve_prefix_cache_hit_rate": ("Prompt tokens served from the prefix cache / prompt tokens",
                                              lambda: engine.kv.prefix.hit_rate if engine.kv.prefix else 0.0),
        }
        spec = engine.speculator
        if spec is not None:  # speculative decoding since start
            gauges |= {
                "kvserve_spec_proposed_tokens": ("Draft tokens verified", lambda: spec.stats.proposed),
                "kvserve_spec_accepted_tokens": ("Draft tokens the target kept", lambda: spec.stats.accepted),
                "kvserve_spec_acceptance_rate": ("Accepted / proposed draft tokens",
                                                 lambda: spec.stats.acceptance_rate),
                "kvserve_spec_mean_accepted_length": ("Tokens per verification step (1 = plain decoding)",
                                                      lambda: spec.stats.mean_accepted_length),
            }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(_retrying(read))

    def observe_finished(self, out: RequestOutput) -> None:
        """One finished engine request: its tokens and latencies (engine clock)."""
        self.prompt_tokens.inc(len(out.prompt_token_ids))
        generated = [len(o.token_ids) for o in out.outputs]
        self.generation_tokens.inc(sum(generated))
        m = out.metrics
        arrival, first, done = m.get("arrival"), m.get("first_token"), m.get("finished")
        if arrival is None or first is None:
            return
        self.ttft.observe(first - arrival)
        if done is not None:
            self.e2e.observe(done - arrival)
            if max(generated, default=0) > 1:
                self.tpot.observe((done - first) / (max(generated) - 1))

    def observe_aborted(self, prompt_tokens: int, generated_tokens: int) -> None:
        """The tokens of a request stopped early (client gone, shutdown) were worked on too."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(generated_tokens)

    def observe_retrieval(self, timings: dict, cache: dict) -> None:
        """One RAG retrieval, from its `timings` and `cache` reports."""
        self.rag_retrievals.inc()
        self.rag_seconds.observe(timings["total_s"])
        self.rag_search.observe(timings["search_s"])
        self.rag_hits.inc(cache["hits"])
        self.rag_misses.inc(cache["misses"])
        self.rag_prefetched.inc(cache.get("prefetched") or 0)

    def observe_embedding(self, inputs: int, tokens: int, seconds: float) -> None:
        self.embedding_inputs.inc(inputs)
        self.embedding_tokens.inc(tokens)
        self.embedding_seconds.observe(seconds)

    def watch_queue(self, queue) -> None:
        """Gauges of the admission queue (kvserve.engine.admission) of the server's engine."""
        Gauge("kvserve_queued_requests", "Requests submitted and not yet scheduled",
              registry=self.registry).set_function(lambda: queue.requests)
        Gauge("kvserve_queued_tokens", "Prompt tokens of the queued requests",
              registry=self.registry).set_function(lambda: queue.tokens)

    def load(self, queue) -> dict:
        """What /health reports: the admission queue's counts and the engine's batch."""
        running, waiting = _retrying(self._running)(), _retrying(self._waiting)()
        return {"queued_requests": queue.requests, "queued_tokens": queue.tokens,
                "running": int(running) if running == running else None,  # NaN: a torn read
                "waiting": int(waiting) if waiting == waiting else None}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # The engine thread mutates these while a scrape reads them; a torn read only skews one sample.
    def _running(self) -> int:
        return len({s.request_id for s in list(self.engine.scheduler.running)})

    def _waiting(self) -> int:
        return len({s.request_id for s in list(self.engine.scheduler.waiting)})

    def _active_pages(self) -> int:
        used = self.engine.pool.num_pages - self.engine.pool.num_free
        prefix = self.engine.kv.prefix
        return used - (prefix.num_evictable() if prefix else 0)


def _retrying(read):
    def value() -> float:
        for _ in range(3):
            try:
                return float(read())
            except RuntimeError:  # a dict changed size mid-read on the engine thread
                continue
        return float("nan")
    return value
