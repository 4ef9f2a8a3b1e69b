"""Engine: one step = schedule -> run the model -> sample -> append, detokenize, stop, free."""
import dataclasses
import itertools
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvserve.attention.policy import parse_attention
from kvserve.attention.sparse.streaming import droppable_pages
from kvserve.config import EngineConfig
from kvserve.engine.executors import select_executor
from kvserve.engine.offload import build_offload_pools, check_offload, stage_computed, sync_offloaded
from kvserve.engine.overlap import OverlapScheduler, overlap_schedule
from kvserve.engine.request import (CompletionOutput, FinishReason, Logprob, RequestOutput,
                                    SamplingParams, Sequence, SequenceStatus, now)
from kvserve.engine.runner import ModelRunner
from kvserve.engine.sampler import Sampler, SamplingRow, argmax_rows
from kvserve.engine.scheduler import Scheduler
from kvserve.engine.spec.speculator import Speculator
from kvserve.engine.spec.verify import verify
from kvserve.engine.structured import BitmaskApplier, GrammarCache
from kvserve.kv.groups import KVGroups
from kvserve.kv.manager import KVCacheManager
from kvserve.kv.pool import PagePool
from kvserve.kv.windows import kv_windows
from kvserve.model.families import model_class
from kvserve.model.loader import ModelLoadError, load_checkpoint, read_gguf, release_free_memory, resolve_model_path
from kvserve.model.random_weights import RandomWeights, shape_config, token_tokenizer
from kvserve.model.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("kvserve.engine")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence] = field(default_factory=list)
    arrival: float = 0.0
    first_token_time: float | None = None


class Engine:
    def __init__(self, config: EngineConfig, model=None, tokenizer=None, draft_model=None):
        self.config = config
        self.default_attention = parse_attention(config.attention)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.tp = self._join_tensor_parallel(config, model)
        if self.tp is not None:
            config = self.config = dataclasses.replace(config, device=self.tp.device)
        self.device = resolve_device(config.device, model)
        # ranks > 0 of a tensor-parallel engine never see text
        ids_only = config.random_weights or (self.tp is not None and self.tp.rank > 0)
        tokenizer_error = None
        if tokenizer is None and not ids_only:
            # before the model, so that building a large vocabulary's merges never shares the peak with the weights
            try:
                tokenizer = load_tokenizer(config.model)
            except ModelLoadError as e:  # a broken checkpoint: the model's own error, if any, says more
                tokenizer_error = e
            release_free_memory()
        if model is None:
            dtype = resolve_dtype(config.dtype, self.device)
            if config.random_weights:
                model_cfg = shape_config(config.random_weights)
                quantization = config.quantization if self.device == "cpu" else "none"
                weights = RandomWeights(model_cfg, dtype, self.device, config.seed, quantization)
            else:
                # the packed kernels are CPU-only: elsewhere "auto" keeps float weights
                quantization = "none" if config.quantization == "auto" and self.device != "cpu" else config.quantization
                model_cfg, weights = load_checkpoint(config.model, quantization)
            try:
                if self.tp is not None:  # this rank's share only
                    from kvserve.distributed.tensor_parallel import load_sharded
                    model = load_sharded(model_class(model_cfg), model_cfg, weights, dtype, self.device, self.tp)
                else:
                    model = model_class(model_cfg).from_weights(model_cfg, weights, dtype, self.device)
            except ValueError as e:  # a checkpoint whose tensors do not make this model
                raise ModelLoadError(f"cannot build the model from {config.model or 'the default model'}: {e}") \
                    from None
            del weights
        if tokenizer_error is not None:
            raise tokenizer_error
        if tokenizer is None:
            tokenizer = token_tokenizer(model.config.vocab_size)
        read_gguf.cache_clear()
        release_free_memory()
        self.model, self.tokenizer = model, tokenizer
        mc = model.config
        if (config.max_model_len or 0) > mc.max_position_embeddings:  # as vLLM refuses it: untrained positions
            raise ValueError(f"max_model_len {config.max_model_len} is above the model's context length "
                             f"{mc.max_position_embeddings}")
        self.max_model_len = config.max_model_len or mc.max_position_embeddings
        self.context_capped = False  # max_model_len lowered to what the KV cache holds (_cap_context)
        self.eos_token_ids = list(tokenizer.eos_token_ids or mc.eos_token_ids)
        cache = config.cache
        kv_dtype = model.dtype
        # layers grouped by sliding window, each group with its own page tables in one pool whose
        # page holds `slots` layers: windowed groups give back the pages behind their window
        self.kv_groups = KVGroups.from_windows(kv_windows(mc))
        self._check_groups(config, self.kv_groups)
        page_bytes = PagePool.bytes_per_page(self.kv_groups.slots, cache.page_size, mc.num_kv_heads, mc.head_dim,
                                             kv_dtype)
        most_useful = len(self.kv_groups) * config.scheduler.max_num_seqs * self.max_model_len // cache.page_size
        num_pages = cache.num_pages or default_num_pages(cache.kv_cache_gb, page_bytes, self.device, most_useful)
        if self.tp is not None:  # one page table for all ranks: as many pages as the smallest fits
            num_pages = self.tp.min_int(num_pages)
        self.pool = PagePool(self.kv_groups.slots, num_pages, cache.page_size, mc.num_kv_heads, mc.head_dim,
                             kv_dtype, self.device)
        self.offload = build_offload_pools(self.default_attention, mc, cache, kv_dtype, self.device,
                                           _available_ram()) if self.default_attention.offload else None
        self.kv = KVCacheManager(self.pool, cache.enable_prefix_caching, self.offload, self.kv_groups)
        self.scheduler = Scheduler(config.scheduler, self.kv)
        executor = select_executor(model, self.pool, self.device, config.compile,
                                   config.scheduler.max_num_seqs, config.enforce_eager, self.kv_groups,
                                   reduce=self.tp.all_reduce if self.tp is not None else None)
        if self.tp is not None:
            from kvserve.distributed.executor import TensorParallelExecutor
            executor = TensorParallelExecutor(executor, model, self.pool, self.tp, len(self.kv_groups))
        self.runner = ModelRunner(model, executor)
        self._cap_context(config.scheduler.max_num_batched_tokens)
        if self.runner.policy_attention is not None:
            self.runner.policy_attention.offload = self.offload
        self.sampler = Sampler()
        self.speculator = self._speculator(config, draft_model) if config.speculative else None
        self.grammars = GrammarCache(tokenizer, mc.vocab_size, self.eos_token_ids)
        self._bitmasks = BitmaskApplier(mc.vocab_size, self.grammars.json_safe)
        self.requests: dict[str, _RequestState] = {}
        self._forking: set[str] = set()  # requests with n > 1 whose other sequences are not forked yet
        # whether any KV group has a sliding window, or a request may stream: pages to give back after a step
        self._releases = any(w is not None for w in self.kv_groups.windows) \
            or self.default_attention.policy == "streaming"
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self.overlap = OverlapScheduler(self) if overlap_schedule(config, self.device, self.tp) else None
        if config.compile:
            from kvserve.engine.compiled_forward import warm_up
            warm_up(self)

    @staticmethod
    def _join_tensor_parallel(config: EngineConfig, model):
        """The TPGroup of a tensor-parallel engine (spawning or joining its ranks), else None. Under
        torchrun (RANK and WORLD_SIZE set) even one rank goes through the group: `torchrun
        --nproc-per-node 1 -m kvserve ... -tp 1` checks the NCCL path on a single GPU."""
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if config.tensor_parallel_size == 1 and not torchrun:
            return None
        if model is not None or config.compile:
            raise ValueError("tensor parallelism builds its own sharded model and runs eagerly "
                             "(no model=..., no --compile)")
        if not parse_attention(config.attention).is_full:
            raise ValueError("attention policies other than full are not supported with tensor parallelism")
        from kvserve.distributed.group import join, threads_per_rank
        group = join(config)
        torch.set_num_threads(threads_per_rank(config.threads, config.tensor_parallel_size))
        return group

    @staticmethod
    def _check_groups(config: EngineConfig, groups: KVGroups) -> None:
        """What a model with sliding-window layers or several KV groups cannot run yet."""
        if parse_attention(config.attention).offload and any(w is not None for w in groups.windows):
            raise ValueError("MagicPIG offload copies every layer's K/V to its own pools through one page table: "
                             "it needs a model without sliding-window layers")

    @property
    def failure(self) -> str | None:
        """Why the engine cannot run any more steps (a tensor-parallel rank failed), else None."""
        return self.tp.failure if self.tp is not None else None

    def close(self) -> None:
        """Stops the other tensor-parallel ranks (nothing to do for a single-process engine)."""
        if self.tp is not None:
            self.runner.executor.close()

    def _speculator(self, config: EngineConfig, draft_model=None) -> Speculator:
        method, k = config.speculative, config.num_speculative_tokens
        if method == "ngram":
            from kvserve.engine.spec.ngram import NgramProposer
            proposer = NgramProposer()
        elif method == "self":
            from kvserve.engine.spec.self_draft import SelfDraftProposer
            proposer = SelfDraftProposer(self.runner, self.kv, config.speculative_window)
        elif method == "draft":
            from kvserve.engine.spec.draft_model import DraftModelProposer
            if draft_model is None:
                if not config.speculative_model:
                    raise ValueError("--speculative draft needs --speculative-model")
                draft_cfg, weights = load_checkpoint(config.speculative_model, config.quantization)
                draft_model = model_class(draft_cfg).from_weights(draft_cfg, weights, self.model.dtype, self.device)
            proposer = DraftModelProposer(draft_model, self.model, self.pool.num_pages, self.pool.page_size,
                                          self.device)
        else:
            raise ValueError(f"speculative must be one of ngram, self, draft; got {method!r}")
        return Speculator(proposer, k, self.max_model_len)

    # ---- requests ----------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, priority: int = 0) -> str:
        """Validates and queues a request; raises ValueError for bad input, changing nothing."""
        params = params or SamplingParams()
        if params.attention is None and not self.default_attention.is_full:
            params = dataclasses.replace(params, attention=self.default_attention)
        request_id = request_id or f"req-{next(self._request_ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_prompt(ids, params)
        check_offload(params.attention or self.default_attention, self.offload, params.n)
        grammar = self.grammars.matcher(params.structured) if params.structured is not None else None
        state = _RequestState(request_id, text, ids, params, arrival=now())
        seq = Sequence(next(self._seq_ids), request_id, 0, ids, params, state.arrival, priority)
        self._init_seq(seq)
        seq.grammar = grammar
        state.seqs.append(seq)
        self.requests[request_id] = state
        if params.n > 1:
            self._forking.add(request_id)
        if params.attention is not None and params.attention.policy == "streaming":
            self._releases = True
        self.scheduler.add(seq)
        return request_id

    def _cap_context(self, chunk: int) -> None:
        """The context length: at most what the pool holds of one sequence (run in chunks of `chunk`),
        as llama.cpp caps n_ctx, so that a request that fits alone always finishes. Otherwise it
        would evict itself and start over for good once it outgrew the pool."""
        free = self.pool.num_pages - len(self.pool.reserved)
        low, high = 0, self.max_model_len
        while low < high:
            mid = (low + high + 1) // 2
            low, high = (mid, high) if self.kv.pages_for(mid, chunk) <= free else (low, mid - 1)
        if low < self.max_model_len:
            log.warning("the KV cache (%d pages of %d tokens) holds %d tokens of one sequence: the context "
                        "length is that, not the model's %d (more pages: --num-pages, --kv-cache-gb)",
                        free, self.pool.page_size, low, self.max_model_len)
            self.max_model_len, self.context_capped = low, True

    def _check_prompt(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if any(not 0 <= t < vocab for t in [*(params.logit_bias or {}), *params.stop_token_ids]):
            raise ValueError(f"logit_bias and stop_token_ids keys must be token ids in [0, {vocab})")
        if self.tp is not None and params.attention is not None and not params.attention.is_full:
            raise ValueError("attention policies other than full are not supported with tensor parallelism")
        layers = self.model.config.num_layers
        if params.attention is not None and any(i >= layers for i in params.attention.dense_layers):
            raise ValueError(f"attention dense_layers {list(params.attention.dense_layers)} name layers past the "
                             f"model's {layers} (0-{layers - 1})")
        room = 1 if params.attention is not None and params.attention.unbounded else (params.max_tokens or 1)
        if len(ids) + room > self.max_model_len:
            held = " (what the KV cache holds)" if self.context_capped else ""
            raise ValueError(f"prompt ({len(ids)} tokens) plus max_tokens ({params.max_tokens}) exceeds "
                             f"the context length {self.max_model_len}{held}")
        scheduler = self.config.scheduler
        if not scheduler.enable_chunked_prefill and len(ids) > scheduler.max_num_batched_tokens:
            raise ValueError(f"prompt ({len(ids)} tokens) is longer than max_num_batched_tokens "
                             f"({scheduler.max_num_batched_tokens}), and chunked prefill is off")

    def _init_seq(self, seq: Sequence) -> None:
        if seq.params.seed is not None:
            # child i of a seeded request draws from its own stream; child 0 uses the seed itself
            # on the CPU, whatever the device: one uniform a step, sent with the batch's in one copy
            seq.generator = torch.Generator().manual_seed(seq.params.seed + 1_000_003 * seq.index)
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params.skip_special_tokens,
                                                 prompt_ids=seq.token_ids[:seq.num_prompt_tokens])

    def abort(self, request_id: str) -> None:
        state = self.requests.pop(request_id, None)
        self._forking.discard(request_id)
        for seq in state.seqs if state else []:
            if not seq.finished:
                self.scheduler.finish(seq)
                seq.finish_reason = FinishReason.ABORT

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or (self.overlap is not None and self.overlap.pending is not None)

    # ---- one step ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running, len(self.scheduler.waiting))
        scheduled = self.scheduler.schedule().scheduled
        if self.overlap is not None:
            return self._outputs(self.overlap.step(scheduled))
        return self._outputs(self._run(scheduled, {})) if scheduled else []

    def _run(self, scheduled: list[tuple[Sequence, int]], touched: dict) -> dict:
        """Runs the scheduled tokens, samples and appends: touched (request id -> its state, or the
        RequestOutput of its failure) gets every request this step changed."""
        failed: dict[str, Exception] = {}
        # grammar masks of the rows sampled this step: filled on a thread while the model runs
        self._bitmasks.fill_ahead([s.grammar for s, n in scheduled
                                   if s.grammar is not None and s.num_computed_tokens + n == len(s.token_ids)])
        stage_computed(self.kv, scheduled)
        logits, sampled = self._execute(scheduled, failed)
        drafted = []
        if self.speculator is not None and any(s.draft_token_ids for s in sampled):
            logits, sampled, drafted = self._split_drafted(logits, sampled)
        page_size = self.pool.page_size
        for seq, n in scheduled:
            if seq.draft_token_ids:
                continue  # computed up to what verification keeps (_verify_drafts)
            if not failed or seq.request_id not in failed:
                seq.num_computed_tokens += n
                if seq.num_computed_tokens // page_size > len(seq.page_hashes):  # a page was filled
                    self.kv.cache_computed_pages(seq)
        seqs = sampled
        if self._forking:  # requests with n > 1 whose prompt may end this step
            rows, seqs = list(range(len(sampled))), list(sampled)
            for row, seq in enumerate(sampled):
                if seq.params.n > 1:
                    children = self._fork_children(seq)
                    rows += [row] * len(children)
                    seqs += children
            if len(rows) > len(sampled):
                logits = logits[rows]
        ids, tokens = self._sample(logits, seqs, failed)
        touched.update({rid: self._fail(rid, e) for rid, e in failed.items()})
        self._append_all(seqs, ids, tokens, failed, touched)
        if drafted:
            self._verify_drafts(*drafted, failed, touched)
        if self.speculator is not None:
            self.speculator.prompts_done(sampled)
        if self._releases:
            self._release_streamed_pages(scheduled)
        sync_offloaded(self.kv, scheduled)
        return touched

    def _append_all(self, seqs: list[Sequence], ids: list, tokens: list | None, failed: dict, touched: dict) -> None:
        """Appends each sequence's sampled token; touched maps each request to its state (or to the
        RequestOutput of its failure)."""
        requests, append = self.requests, self._append
        for i, seq in enumerate(seqs):
            rid = seq.request_id
            state = requests.get(rid)
            if state is None or (failed and rid in failed):
                continue
            try:
                append(seq, ids[i], state, tokens[i] if tokens is not None else None)
            except Exception as e:  # e.g. a detokenizer error: this request only
                touched[rid] = self._fail(rid, e)
                continue
            touched[rid] = state

    def _execute(self, scheduled, failed: dict, pending_ids=None) -> tuple[torch.Tensor, list[Sequence]]:
        """Runs the step; if it raises, runs each sequence alone (rewriting the same K/V slots is
        harmless) so that only the requests that fail by themselves fail. pending_ids: ModelRunner.execute's."""
        try:
            return self.runner.execute(scheduled, pending_ids)
        except Exception as e:
            if len(scheduled) == 1:
                failed[scheduled[0][0].request_id] = e
                return torch.empty(0, self.model.config.vocab_size), []
        logits, sampled = [], []
        for item in scheduled:
            try:
                part, seqs = self.runner.execute([item], pending_ids)
            except Exception as e:
                failed[item[0].request_id] = e
                continue
            logits.append(part)
            sampled += seqs
        return (torch.cat(logits) if logits else torch.empty(0, self.model.config.vocab_size)), sampled

    @staticmethod
    def _split_drafted(logits: torch.Tensor, sampled: list[Sequence]):
        """(logits, sequences) of the plain rows, and (logits, sequences) of the drafted ones."""
        plain, drafted, plain_seqs, drafted_seqs, row = [], [], [], [], 0
        for seq in sampled:
            n = 1 + len(seq.draft_token_ids)
            (drafted if n > 1 else plain).extend(range(row, row + n))
            (drafted_seqs if n > 1 else plain_seqs).append(seq)
            row += n
        return logits[plain], plain_seqs, (logits[drafted], drafted_seqs)

    def _verify_drafts(self, logits: torch.Tensor, seqs: list[Sequence], failed: dict, touched: dict) -> None:
        """Appends each draft's accepted tokens and the target's next one (a stop or max_tokens
        inside the run drops the rest), then rolls the K/V of rejected tokens back: they lie past
        num_computed_tokens, in pages trimmed here, and were never published to the prefix cache."""
        try:
            results = verify(logits, seqs, self.eos_token_ids)
        except Exception:
            results = []
            for i, seq in enumerate(seqs):  # isolate the sequence that fails
                try:
                    results += verify(logits[self._rows_of(seqs, i)], [seq], self.eos_token_ids)
                except Exception as e:
                    failed[seq.request_id] = e
                    touched[seq.request_id] = self._fail(seq.request_id, e)
                    results.append(None)
        for seq, tokens in zip(seqs, results):
            proposed, seq.draft_token_ids = len(seq.draft_token_ids), []
            state = self.requests.get(seq.request_id)
            if tokens is None or state is None or seq.finished:
                continue
            self.speculator.record(seq, proposed, len(tokens) - 1, len(tokens))
            try:
                for tok in tokens:
                    self._append(seq, tok.token_id, state, tok)
                    if seq.finished:
                        break
            except Exception as e:
                touched[seq.request_id] = self._fail(seq.request_id, e)
                continue
            touched[seq.request_id] = state
            if not seq.finished:
                seq.num_computed_tokens = len(seq.token_ids) - 1
                self.kv.trim(seq, len(seq.token_ids))
                self.kv.cache_computed_pages(seq)

    @staticmethod
    def _rows_of(seqs: list[Sequence], i: int) -> slice:
        start = sum(1 + len(s.draft_token_ids) for s in seqs[:i])
        return slice(start, start + 1 + len(seqs[i].draft_token_ids))

    def _sample(self, logits: torch.Tensor, seqs: list[Sequence], failed: dict) -> tuple[list, list | None]:
        """Each sequence's token id (None where sampling failed), and its SampledToken where any
        sequence asked for logprobs (else None)."""
        constrained = [i for i, s in enumerate(seqs) if s.grammar is not None and s.request_id not in failed]
        if constrained:  # masked in place: this step's logits are read only by this sampling
            try:
                self._bitmasks.apply(logits, constrained, [seqs[i].grammar for i in constrained])
            except Exception:
                for i in constrained:  # isolate the matcher that fails
                    try:
                        self._bitmasks.apply(logits, [i], [seqs[i].grammar])
                    except Exception as e:
                        failed[seqs[i].request_id] = e
        if all(s.argmax_only for s in seqs):  # the common greedy batch: ids, no per-row objects
            try:
                return argmax_rows(logits).tolist(), None
            except Exception:
                pass  # the rows one by one below name the one that fails
        rows = self.sampling_rows(seqs)
        try:
            tokens = self.sampler(logits, rows)
        except Exception:
            tokens = []
            for i, row in enumerate(rows):  # isolate the row that fails
                try:
                    tokens += self.sampler(logits[i:i + 1], [row])
                except Exception as e:
                    failed[seqs[i].request_id] = e
                    tokens.append(None)
        return [t if t is None else t.token_id for t in tokens], tokens

    def sampling_rows(self, seqs: list[Sequence]) -> list[SamplingRow]:
        return [SamplingRow(s.params, s.token_ids, s.num_prompt_tokens, s.generator, self.eos_token_ids) for s in seqs]

    def _release_streamed_pages(self, scheduled) -> None:
        """Each KV group whose layers have a sliding window gives back the pages behind it, prompt
        chunks included (a chunk reads only its own window), under any policy (windowed layers keep
        their window). Streaming requests also give back, in the global groups, the pages between
        their sinks and window once their prompt is in (a prefill chunk still reads every earlier
        page); other policies may read any page of a global group."""
        for seq, _ in scheduled:
            p = seq.params.attention
            if seq.finished:
                continue
            self.kv.release_windows(seq)
            if p is not None and p.policy == "streaming" and seq.num_computed_tokens >= seq.num_prompt_tokens:
                pages = droppable_pages(seq.num_computed_tokens + 1, p.sink, p.window, self.pool.page_size)
                for g, window in enumerate(self.kv_groups.windows):
                    if window is None:
                        self.kv.release_pages(seq, pages, g)

    def _fail(self, request_id: str, error: Exception) -> RequestOutput:
        state = self.requests.get(request_id)
        self.abort(request_id)
        prompt_ids = state.prompt_token_ids if state else []
        return RequestOutput(request_id, state.prompt if state else None, prompt_ids, [], True,
                             error=f"{type(error).__name__}: {error}")

    def _fork_children(self, parent: Sequence) -> list[Sequence]:
        """At the end of a prompt of a request with n > 1, its other n-1 sequences share its pages."""
        state = self.requests[parent.request_id]
        if parent.index != 0:
            return []
        self._forking.discard(parent.request_id)  # its first sample: now or never
        if len(state.seqs) == state.params.n or parent.output_token_ids:
            return []
        children = []
        for i in range(1, state.params.n):
            child = Sequence(next(self._seq_ids), parent.request_id, i, state.prompt_token_ids,
                             parent.params, parent.arrival, parent.priority)
            self._init_seq(child)
            # the parent has no output yet: its matcher's copy is the child's start
            child.grammar = parent.grammar.fork() if parent.grammar is not None else None
            child.prompt_logprobs = parent.prompt_logprobs  # the request's, complete by now
            state.seqs.append(child)
            if self.kv.fork(parent, child):
                self.scheduler.add_running(child)
                children.append(child)
            else:  # no page for the copy: it queues and recomputes (mostly prefix hits)
                self.scheduler.add(child)
        return children

    def _append(self, seq: Sequence, token: int, state: _RequestState, tok=None) -> None:
        """tok: the SampledToken, read for its logprobs where the request asked for them."""
        if state.first_token_time is None:
            state.first_token_time = now()
        seq.token_ids.append(token)
        if seq.grammar is not None and not seq.grammar.accept_token(token):
            raise RuntimeError(f"the grammar rejected token {token}")  # a masking bug: this request fails
        p = seq.params
        if p.logprobs is not None:
            seq.logprobs.append(Logprob(token, tok.logprob, tok.top_logprobs or []))
        delta = seq.detokenizer.add_token(token)
        if delta:
            seq.text += delta
        reason = self._stop_reason(seq, token, len(delta))
        if reason is not None:
            if reason is FinishReason.LENGTH:
                seq.text += seq.detokenizer.flush()  # held-back text, less a last incomplete character
            seq.finish_reason = reason
            self.scheduler.finish(seq)

    def _stop_reason(self, seq: Sequence, token: int, new_chars: int) -> FinishReason | None:
        p = seq.params
        num_out = len(seq.token_ids) - seq.num_prompt_tokens
        if num_out >= p.min_tokens:
            # a stop token's text is not the output's (as vLLM leaves it out), nor is what it completes
            stop_token = token in self.eos_token_ids and not p.ignore_eos
            if not stop_token and p.stop_token_ids and token in p.stop_token_ids:
                seq.stop_reason, stop_token = token, True
            if stop_token:
                if seq.stop_reason is None or not p.include_stop_str_in_output:  # EOS's text never
                    seq.text = seq.text[:len(seq.text) - new_chars]
                return FinishReason.STOP
            for stop in p.stop:
                # only a match ending in the new text is new
                at = seq.text.find(stop, max(0, len(seq.text) - len(stop) - new_chars + 1))
                if at >= 0:
                    seq.text = seq.text[:at + (len(stop) if p.include_stop_str_in_output else 0)]
                    seq.stop_reason = stop
                    return FinishReason.STOP
        if p.max_tokens is not None and num_out >= p.max_tokens:
            return FinishReason.LENGTH
        if len(seq.token_ids) >= self.max_model_len and not seq.policy.unbounded:
            return FinishReason.LENGTH
        return None

    def _outputs(self, touched: dict) -> list[RequestOutput]:
        """The step's outputs: failures as they are, each streamed request's state, each finished
        one. A request of one sequence (most) is built here inline, as _output builds it: at batch
        256 this loop is a fifth of a decode step's host time."""
        outs, finished_status = [], SequenceStatus.FINISHED
        for t in touched.values():
            if type(t) is RequestOutput:
                outs.append(t)
                continue
            seqs, params = t.seqs, t.params
            if len(seqs) != 1 or params.n != 1:
                if params.output_kind == "cumulative" or self._finished(t):
                    outs.append(self._output(t))
                continue
            seq = seqs[0]
            finished = seq.status is finished_status
            if finished:
                self.requests.pop(t.request_id, None)
            elif params.output_kind != "cumulative":
                continue
            text, reason = seq.text, seq.finish_reason
            if params.stop and not finished:  # hold back what may become a stop string
                text = text[:max(0, len(text) - max(len(s) for s in params.stop) + 1)]
            completion = CompletionOutput(seq.index, text, seq.token_ids[seq.num_prompt_tokens:],
                                          reason.value if reason is not None else None, seq.stop_reason,
                                          seq.logprobs if params.logprobs is not None else None)
            outs.append(RequestOutput(t.request_id, t.prompt, t.prompt_token_ids, [completion], finished,
                                      seq.num_cached_tokens, {"arrival": t.arrival, "first_token": t.first_token_time,
                                                              "finished": now() if finished else None}, None,
                                      None if params.prompt_logprobs is None else [None, *seq.prompt_logprobs]))
        return outs

    def _output(self, state: _RequestState) -> RequestOutput:
        seqs = state.seqs if len(state.seqs) == 1 else sorted(state.seqs, key=lambda s: s.index)
        outs = [self._completion(seq) for seq in seqs]
        finished = self._finished(state)
        if finished:
            self.requests.pop(state.request_id, None)
        metrics = {"arrival": state.arrival, "first_token": state.first_token_time,
                   "finished": now() if finished else None}
        prompt_logprobs = None if state.params.prompt_logprobs is None else [None, *seqs[0].prompt_logprobs]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, outs, finished,
                             seqs[0].num_cached_tokens, metrics, prompt_logprobs=prompt_logprobs)

    @staticmethod
    def _finished(state: _RequestState) -> bool:
        return len(state.seqs) == state.params.n and all(s.status is SequenceStatus.FINISHED for s in state.seqs)

    @staticmethod
    def _completion(seq: Sequence) -> CompletionOutput:
        text, p = seq.text, seq.params
        if p.stop and seq.status is not SequenceStatus.FINISHED:  # hold back what may become a stop string
            text = text[:max(0, len(text) - max(len(s) for s in p.stop) + 1)]
        return CompletionOutput(seq.index, text, seq.token_ids[seq.num_prompt_tokens:],
                                seq.finish_reason.value if seq.finish_reason else None,
                                seq.stop_reason, seq.logprobs if p.logprobs is not None else None)


def resolve_device(device: str, model=None) -> str:
    """`auto`: a given model's own device, else CUDA where a GPU is visible, else the CPU."""
    if device != "auto":
        return device
    if model is not None:
        tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
        if tensor is not None:
            return str(tensor.device)
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """`auto` is bfloat16 where the hardware computes it natively (several times faster than
    float32 matmuls on AVX512-BF16/AMX CPUs and on GPUs), else float32."""
    if dtype != "auto":
        return DTYPES[dtype]
    if str(device).startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def load_tokenizer(model: str | None) -> Tokenizer:
    path = resolve_model_path(model)
    try:
        return Tokenizer.from_dir(path) if path.is_dir() else Tokenizer.from_gguf(read_gguf(path))
    except Exception as e:
        raise ModelLoadError(f"cannot load the tokenizer of {path.name}: {e}") from None


def default_num_pages(kv_cache_gb: float | None, page_bytes: int, device: str, most_useful: int) -> int:
    """KV pages from --kv-cache-gb, else a quarter of free memory (capped at 4 GB and at what
    max_num_seqs full-length sequences could use)."""
    if kv_cache_gb is not None:
        return max(1, int(kv_cache_gb * 2**30 // page_bytes))
    if str(device).startswith("cuda"):
        free = torch.cuda.mem_get_info()[0] * 0.8
    else:
        free = min(_available_ram() / 4, 4 * 2**30)
    return max(16, min(int(free // page_bytes), most_useful))


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
