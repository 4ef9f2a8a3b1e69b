"""Chat and text completions: an OpenAI request -> token prompts and SamplingParams -> the engine
-> an OpenAI response, whole or streamed as server-sent events.

Everything a request can get wrong is checked here, before the engine sees it, so each mistake
gets its own status, parameter name and code; the engine's own checks remain the last line.
"""
import asyncio
import dataclasses
import hashlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import jinja2
from fastapi import Request
from fastapi.responses import Response, StreamingResponse

from kvserve.attention.policy import AttentionPolicy, parse_attention
from kvserve.engine.admission import Overloaded, QueueTimeout
from kvserve.engine.async_engine import AsyncEngine, EngineUnavailable
from kvserve.engine.request import CompletionOutput, RequestOutput, SamplingParams
from kvserve.server.errors import OpenAIError
from kvserve.server.logprobs import TokenStrings, chat_logprobs, completion_logprobs, echo_logprobs, joined
from kvserve.server.metrics import ServerMetrics
from kvserve.server.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk,
                                     ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
                                     CompletionChoice, CompletionRequest, CompletionResponse, DeltaMessage,
                                     DetokenizeRequest, DetokenizeResponse, ErrorResponse, PromptTokensDetails,
                                     TokenizeRequest, TokenizeResponse, Usage)
from kvserve.server.structured_protocol import request_spec
from kvserve.server.tools import ToolPlan, ToolStream, finish_choice, plan_tools, template_messages, \
    template_renders_tools

log = logging.getLogger("kvserve.server")


@dataclass
class ServerConfig:
    model_name: str  # the id responses carry
    model_aliases: tuple[str, ...] = ()  # more ids requests may name (vLLM's --served-model-name A B)
    api_key: str | None = None
    max_model_len: int | None = None  # a context limit below the model's own
    max_tokens_limit: int | None = None  # per request; None: whatever the context leaves
    max_n: int = 16
    max_prompts: int = 256  # prompts in one /v1/completions request
    max_body_bytes: int = 8 * 2**20
    index_dir: str | None = None  # RAG collections; None: ~/.kvserve/index
    rag_cache_mb: float = 256.0  # cluster cache of each collection
    rag_nprobe: int = 8
    rag_prefetch_nprobe: int = 16
    prefix_cache_isolation: str = "none"  # none | per-key: each API key gets its own prefix cache

    def rag_registry(self):
        from kvserve.rag.collections import CollectionRegistry
        return CollectionRegistry(self.index_dir, int(self.rag_cache_mb * 2**20))


class ClientDisconnected(Exception):
    pass


class Job:
    """The engine requests behind one HTTP request (one per prompt), merged into one stream of
    (prompt index, cumulative output). Closing it aborts whatever is unfinished. With
    `scoring_only` (max_tokens 0), the one token the engine must sample is dropped from the outputs."""

    def __init__(self, engine: AsyncEngine, prompts: list[list[int]], params: SamplingParams, request_id: str,
                 metrics: ServerMetrics, scoring_only: bool = False):
        self.engine, self.metrics = engine, metrics
        self.scoring_only = scoring_only
        self.prompts = prompts
        self.last: dict[int, RequestOutput] = {}
        self._ids = [f"{request_id}-{i}" for i in range(len(prompts))]
        self._made_unfinished = 0  # tokens made by the prompts closed before their end
        self._queue: asyncio.Queue = asyncio.Queue()
        self._left = len(prompts)
        self._closed = False
        self._tasks = []
        if len(prompts) > 1:
            try:
                engine.queue.check_room(len(prompts), sum(map(len, prompts)))
            except (ValueError, Overloaded) as e:  # raised by next(), where the response is made
                self._queue.put_nowait((0, e))
                return
        batch = request_id if len(prompts) > 1 else None
        self._tasks = [asyncio.create_task(self._pump(engine, i, ids, params, self._ids[i], batch))
                       for i, ids in enumerate(prompts)]

    async def _pump(self, engine, i, ids, params, request_id, batch):
        try:
            async for out in engine.generate(ids, params, request_id, batch=batch):
                self._queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which owns the response
            self._queue.put_nowait((i, e))

    async def next(self) -> tuple[int, RequestOutput] | None:
        """The next output of any prompt; None once all are finished."""
        if self._left == 0:
            return None
        i, item = await self._queue.get()
        if isinstance(item, ValueError):
            raise OpenAIError(str(item), 400)
        if isinstance(item, (Overloaded, QueueTimeout)):
            raise load_error(item, self.metrics)
        if isinstance(item, EngineUnavailable):
            raise OpenAIError(str(item), 503, code="engine_failed")
        if isinstance(item, Exception):
            log.error("request failed in the engine: %s", item)
            raise OpenAIError(f"the engine failed on this request: {item}", 500, code="engine_error")
        if self.scoring_only:
            item = _prompt_only(item)
        self.last[i] = item
        if item.finished:
            self._left -= 1
            self.metrics.observe_finished(item)
        return i, item

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for t in self._tasks:
            t.cancel()
        for i, ids in enumerate(self.prompts):
            out = self.last.get(i)
            if out is not None and out.finished:
                continue
            # asked of the engine: a request answered whole has had no output yet
            made = self.engine.tokens_made(self._ids[i])
            if out is None and made is None:
                continue  # refused, or never reached the engine
            made = max(made or 0, sum(len(o.token_ids) for o in out.outputs) if out else 0)
            self._made_unfinished += made
            self.metrics.observe_aborted(len(ids), made)

    @property
    def completion_tokens(self) -> int:
        return self._made_unfinished + sum(len(o.token_ids) for out in self.last.values() if out.finished
                                           for o in out.outputs)


def _prompt_only(out: RequestOutput) -> RequestOutput:
    """out without what was generated: an echo of max_tokens 0 answers with the prompt alone."""
    outputs = [CompletionOutput(o.index, "", [], "length" if o.finish_reason else None, None,
                                [] if o.logprobs is not None else None) for o in out.outputs]
    return dataclasses.replace(out, outputs=outputs)


def load_error(e: Overloaded | QueueTimeout, metrics: ServerMetrics) -> OpenAIError:
    """A request refused for load: 429 (queue full) or 503 (waited too long), counted by reason."""
    metrics.rejected.labels(e.reason).inc()
    status, code = (429, "server_busy") if isinstance(e, Overloaded) else (503, "queue_timeout")
    return OpenAIError(str(e), status, code=code, retry_after=e.retry_after)


async def until_disconnect(request: Request, awaitable):
    """Awaits `awaitable` unless the client goes away first (then it is cancelled)."""
    task = asyncio.ensure_future(awaitable)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task in done:
        return task.result()
    raise ClientDisconnected()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def tenant_digest(authorization: str) -> str:
    """A tenant's name in cache salts: a digest of its bearer token, never the token itself."""
    scheme, _, token = authorization.partition(" ")
    token = token.strip() if scheme.lower() == "bearer" else ""
    return hashlib.sha256(token.encode()).hexdigest()[:32]


def _json(model) -> Response:
    return Response(model.model_dump_json(), media_type="application/json")


def _sse_headers() -> dict:
    return {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Serving:
    def __init__(self, engine: AsyncEngine, config: ServerConfig, metrics: ServerMetrics):
        self.engine, self.config, self.metrics = engine, config, metrics
        self.tokenizer = engine.engine.tokenizer
        self.vocab_size = engine.engine.model.config.vocab_size
        model_len = engine.engine.model.config.max_position_embeddings
        if (config.max_model_len or 0) > model_len:
            raise ValueError(f"--max-model-len {config.max_model_len} is above the model's context length {model_len}")
        self.max_model_len = min(config.max_model_len or engine.engine.max_model_len, engine.engine.max_model_len)
        self.strings = TokenStrings(self.tokenizer)
        # xgrammar's import and the vocabulary take seconds: not on the first structured request
        engine.engine.grammars.warm_up()

    # ---- checks -----------------------------------------------------------------------------

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.config.model_name and name not in self.config.model_aliases:
            raise OpenAIError(f"The model `{name}` does not exist.", 404, param="model", code="model_not_found")

    def _check_ids(self, ids: list[int], param: str) -> None:
        if any(not 0 <= t < self.vocab_size for t in ids):
            raise OpenAIError(f"{param} must hold token ids in [0, {self.vocab_size})", param=param,
                              code="invalid_value")

    def _attention(self, req) -> AttentionPolicy:
        """The request's attention policy (the engine's default when it names none)."""
        try:
            return parse_attention(req.attention) if req.attention is not None else self.engine.engine.default_attention
        except ValueError as e:
            raise OpenAIError(str(e), param="attention", code="invalid_value") from None

    def _max_tokens(self, requested: int | None, prompt_len: int, param: str, default: int | None = None,
                    unbounded: bool = False) -> int:
        """The request's max_tokens, checked; when it gives none, `default` (else all the room
        the context leaves), within the server's limit. An unbounded (streaming) request may
        generate past the context length."""
        limit, room = self.config.max_tokens_limit, self.max_model_len - prompt_len
        if unbounded and room >= 1:
            room = max(room, requested or 0)
        if requested is not None and limit is not None and requested > limit:
            raise OpenAIError(f"max_tokens ({requested}) is above this server's limit of {limit}",
                              param="max_tokens", code="invalid_value")
        if room < 1 or requested is not None and requested > room:
            asked = prompt_len + (requested or 1)
            raise OpenAIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                              f"requested {asked} tokens ({prompt_len} in the {param}, {asked - prompt_len} in the "
                              f"completion). Please reduce the length of the {param} or completion.",
                              param=param, code="context_length_exceeded")
        return requested if requested is not None else min(default or room, room, limit or room)

    def _cache_salt(self, req, request: Request) -> str | None:
        """The request's cache_salt; under per-key isolation prefixed by a digest of its API key,
        so that no salt a tenant picks reaches another tenant's cached pages."""
        if self.config.prefix_cache_isolation != "per-key":
            return req.cache_salt
        return f"{tenant_digest(request.headers.get('authorization', ''))}/{req.cache_salt or ''}"

    def _params(self, req, max_tokens: int, logprobs: int | None, attention: AttentionPolicy,
                cache_salt: str | None = None) -> SamplingParams:
        if req.n > self.config.max_n:
            raise OpenAIError(f"n ({req.n}) is above this server's limit of {self.config.max_n}", param="n",
                              code="invalid_value")
        if req.stream_options is not None and not req.stream:
            raise OpenAIError("The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                              param="stream_options", code="invalid_value")
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if any(not s for s in stop):
            raise OpenAIError("stop sequences must not be empty", param="stop", code="invalid_value")
        self._check_ids(req.stop_token_ids or [], "stop_token_ids")
        bias = {}
        for key, value in (req.logit_bias or {}).items():
            token = int(key) if key.strip().lstrip("-").isdigit() else None
            if token is None or not 0 <= token < self.vocab_size:
                raise OpenAIError(f"logit_bias keys must be token ids in [0, {self.vocab_size}), got {key!r}",
                                  param="logit_bias", code="invalid_value")
            bias[token] = value
        try:
            return SamplingParams(
                n=req.n, temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p, top_k=-1 if req.top_k is None else req.top_k,
                min_p=req.min_p or 0.0, repetition_penalty=req.repetition_penalty or 1.0,
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                logit_bias=bias or None, seed=req.seed, max_tokens=max_tokens, min_tokens=req.min_tokens,
                stop=stop, stop_token_ids=req.stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
                include_stop_str_in_output=req.include_stop_str_in_output,
                skip_special_tokens=req.skip_special_tokens, attention=attention, cache_salt=cache_salt,
                speculative=req.speculative,
                # a response that is not streamed reads the final output only
                output_kind="cumulative" if req.stream else "final_only")
        except ValueError as e:
            raise OpenAIError(str(e), code="invalid_value") from None

    async def _constrain(self, params: SamplingParams, spec, tools: ToolPlan | None = None) -> SamplingParams:
        """params with the request's output constraint, compiled here (off the engine's thread,
        within the compile time limit) so that a bad or slow grammar is a 400 before the engine."""
        changes, param = {}, "tools"
        if tools is not None and tools.skip_special_tokens is not None:
            changes["skip_special_tokens"] = tools.skip_special_tokens
        if spec is not None:
            spec, param = spec
            try:
                await asyncio.to_thread(self.engine.engine.grammars.compile, spec)
            except ValueError as e:
                where = " (the grammar comes from the tools' parameters, forced by tool_choice)" \
                    if param == "tools" else ""
                raise OpenAIError(f"{e}{where}", param=param, code="invalid_value") from None
            changes["structured"] = spec
        try:
            return dataclasses.replace(params, **changes) if changes else params
        except ValueError as e:
            raise OpenAIError(str(e), param=param, code="invalid_value") from None

    def _running_usage(self, req, job: Job) -> Usage | None:
        """vLLM's stream_options.continuous_usage_stats: the usage so far, in every chunk."""
        if req.stream_options and req.stream_options.continuous_usage_stats:
            return self._usage(list(job.last.values()))
        return None

    def _usage(self, outs: list[RequestOutput]) -> Usage:
        prompt = sum(len(o.prompt_token_ids) for o in outs)
        completion = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                     prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(o.num_cached_tokens for o in outs)))

    # ---- chat ------------------------------------------------------------------------------

    def _chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                     tools: ToolPlan | None = None, template_kwargs: dict | None = None,
                     continue_final_message: bool = False) -> list[int]:
        plain = [{**m.model_dump(exclude_none=True), "role": "system" if m.role == "developer" else m.role}
                 for m in messages]  # the tokenizer joins text parts
        in_template = template_renders_tools(self.tokenizer.chat_template)
        plain = template_messages(plain, tools, in_template)
        reserved = {"messages", "add_generation_prompt", "tokenize", "continue_final_message"} \
            & set(template_kwargs or {})
        if reserved:
            raise OpenAIError(f"chat_template_kwargs cannot set {sorted(reserved)[0]!r}", param="chat_template_kwargs")
        extra = {**(template_kwargs or {})}
        if tools is not None and tools.in_template:
            extra["tools"] = tools.tools
        try:
            return self.tokenizer.apply_chat_template(plain, add_generation_prompt=add_generation_prompt, tokenize=True,
                                                      continue_final_message=continue_final_message, **extra)
        except (ValueError, jinja2.TemplateError) as e:
            raise OpenAIError(f"cannot apply the chat template: {e}", param="messages") from None

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        tools = plan_tools(req, self.tokenizer.chat_template)
        spec = request_spec(req, req.response_format)
        if tools is not None and tools.structured is not None:
            if spec is not None:
                raise OpenAIError(f"tool_choice {tools.mode!r} cannot be combined with {spec[1]}", param=spec[1],
                                  code="invalid_value")
            spec = (tools.structured, "tools")
        if req.top_logprobs is not None and not req.logprobs:
            raise OpenAIError("top_logprobs requires logprobs to be true", param="top_logprobs")
        prompt = await asyncio.to_thread(self._chat_prompt, req.messages, req.add_generation_prompt, tools,
                                         req.chat_template_kwargs, req.continue_final_message)
        request.state.prompt_tokens = len(prompt)
        attention = self._attention(req)
        max_tokens = self._max_tokens(req.max_completion_tokens or req.max_tokens, len(prompt), "messages",
                                      unbounded=attention.unbounded)
        params = self._params(req, max_tokens, (req.top_logprobs or 0) if req.logprobs else None, attention,
                              self._cache_salt(req, request))
        params = await self._constrain(params, spec, tools)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        job = Job(self.engine, [prompt], params, rid, self.metrics)
        return await self._respond(request, job, req.stream,
                                   lambda first: self._chat_chunks(req, rid, job, first, tools),
                                   lambda outs: self._chat_response(req, rid, outs, tools))

    def _chat_response(self, req: ChatCompletionRequest, rid: str, outs: list[RequestOutput],
                       tools: ToolPlan | None = None):
        choices = []
        for o in outs[0].outputs:
            content, calls, reason = finish_choice(o.text, o.finish_reason, tools) if tools else \
                (o.text, None, o.finish_reason)
            choices.append(ChatChoice(index=o.index, message=AssistantMessage(content=content, tool_calls=calls),
                                      logprobs=ChatLogprobs(content=chat_logprobs(self.strings, o.logprobs or []))
                                      if req.logprobs else None, finish_reason=reason))
        return ChatCompletionResponse(id=rid, model=self.config.model_name, choices=choices, usage=self._usage(outs))

    async def _chat_chunks(self, req: ChatCompletionRequest, rid: str, job: Job,
                           first: tuple[int, RequestOutput], tools: ToolPlan | None = None) -> AsyncIterator[str]:
        created, n = int(time.time()), req.n
        streams = [ToolStream(tools) for _ in range(n)] if tools else None

        def chunk(choices, usage=None) -> str:
            return ChatCompletionChunk(id=rid, created=created, model=self.config.model_name, choices=choices,
                                       usage=usage or self._running_usage(req, job)).model_dump_json()

        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(n)])
        chars, tokens, done = [0] * n, [0] * n, [False] * n
        item = first
        while item is not None:
            choices = []
            for o in item[1].outputs:
                if done[o.index]:
                    continue
                delta, new = o.text[chars[o.index]:], (o.logprobs or [])[tokens[o.index]:]
                if not (delta or new or o.finish_reason):
                    continue
                chars[o.index], tokens[o.index] = len(o.text), len(o.logprobs or [])
                done[o.index] = o.finish_reason is not None
                calls, reason = None, o.finish_reason
                if streams:  # tool calls: under "auto" content until a call may begin, the calls at the end
                    delta, calls = streams[o.index].feed(delta)
                    if done[o.index]:
                        rest, more, reason = streams[o.index].finish(o.finish_reason)
                        delta, calls = delta + rest, calls + more
                    if not (delta or calls or new or done[o.index]):
                        continue
                choices.append(ChatChunkChoice(
                    index=o.index, delta=DeltaMessage(content=delta if delta or not done[o.index] else None,
                                                      tool_calls=calls or None),
                    logprobs=ChatLogprobs(content=chat_logprobs(self.strings, new)) if req.logprobs else None,
                    finish_reason=reason))
            if choices:
                yield chunk(choices)
            item = await job.next()
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], self._usage(list(job.last.values())))

    # ---- completions -------------------------------------------------------------------------

    def _completion_prompts(self, prompt) -> tuple[list[list[int]], list[str | None]]:
        """Token ids of each prompt, and its text when it came as text."""
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise OpenAIError("prompt must not be empty", param="prompt", code="invalid_value")
        if len(prompt) > self.config.max_prompts:
            raise OpenAIError(f"at most {self.config.max_prompts} prompts per request", param="prompt",
                              code="invalid_value")
        ids = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]
        for p in ids:
            if not p:
                raise OpenAIError("prompt must not be empty", param="prompt", code="invalid_value")
            self._check_ids(p, "prompt")
        return ids, [p if isinstance(p, str) else None for p in prompt]

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self.check_model(req.model)
        if req.suffix is not None:
            raise OpenAIError("suffix is not supported by this server", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise OpenAIError("best_of other than n is not supported by this server", param="best_of")
        scoring_only = req.max_tokens == 0
        if scoring_only and not req.echo:
            raise OpenAIError("max_tokens 0 is only allowed with echo (to score the prompt)", param="max_tokens",
                              code="invalid_value")
        prompts, texts = await asyncio.to_thread(self._completion_prompts, req.prompt)
        request.state.prompt_tokens = sum(map(len, prompts))
        given = "max_tokens" in req.model_fields_set  # unset: OpenAI's 16; an explicit null: up to the context
        attention = self._attention(req)
        # max_tokens 0: the engine samples one token, which Job drops (vLLM does the same)
        max_tokens = self._max_tokens((1 if scoring_only else req.max_tokens) if given else None,
                                      max(map(len, prompts)), "prompt", default=None if given else req.max_tokens,
                                      unbounded=attention.unbounded)
        params = self._params(req, max_tokens, req.logprobs, attention, self._cache_salt(req, request))
        if req.echo and req.logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
        params = await self._constrain(params, request_spec(req, req.response_format))
        echoes = [(t if t is not None else self.tokenizer.decode(p, req.skip_special_tokens)) if req.echo else ""
                  for p, t in zip(prompts, texts)]
        rid = f"cmpl-{uuid.uuid4().hex}"
        job = Job(self.engine, prompts, params, rid, self.metrics, scoring_only)
        return await self._respond(request, job, req.stream,
                                   lambda first: self._completion_chunks(req, rid, job, first, echoes),
                                   lambda outs: self._completion_response(req, rid, outs, echoes))

    def _completion_response(self, req: CompletionRequest, rid: str, outs: list[RequestOutput], echoes: list[str]):
        choices = []
        for i, out in enumerate(outs):
            for o in out.outputs:
                lps = self._completion_logprobs(req, out, o.logprobs, len(echoes[i]), echo=True)
                choices.append(CompletionChoice(index=i * req.n + o.index, text=echoes[i] + o.text, logprobs=lps,
                                                finish_reason=o.finish_reason))
        return CompletionResponse(id=rid, model=self.config.model_name, choices=choices, usage=self._usage(outs))

    def _completion_logprobs(self, req: CompletionRequest, out: RequestOutput, entries, offset: int,
                             echo: bool):
        """The choice's logprobs object (None unless asked), led by the prompt's when `echo` is on
        for this piece of text (its first chunk when streamed)."""
        if req.logprobs is None:
            return None
        lps = completion_logprobs(self.strings, entries or [], offset)
        if echo and req.echo:
            lps = joined(echo_logprobs(self.strings, out.prompt_token_ids, out.prompt_logprobs), lps)
        return lps

    async def _completion_chunks(self, req: CompletionRequest, rid: str, job: Job, first: tuple[int, RequestOutput],
                                 echoes: list[str]) -> AsyncIterator[str]:
        created, n = int(time.time()), req.n
        total = n * len(job.prompts)
        chars, tokens, done = [0] * total, [0] * total, [False] * total
        started = [False] * total
        offsets = [len(echoes[k // n]) for k in range(total)]

        def chunk(choices, usage=None) -> str:
            return CompletionResponse(id=rid, created=created, model=self.config.model_name, choices=choices,
                                      usage=usage or self._running_usage(req, job)).model_dump_json()

        item = first
        while item is not None:
            i, out = item
            choices = []
            for o in out.outputs:
                k = i * n + o.index
                if done[k]:
                    continue
                delta, new = o.text[chars[k]:], (o.logprobs or [])[tokens[k]:]
                if not (delta or new or o.finish_reason):
                    continue
                lps = self._completion_logprobs(req, out, new, offsets[k], echo=not started[k])
                offsets[k] += sum(len(t) for t in lps.tokens[-len(new):]) if lps and new else 0
                if not started[k]:
                    delta, started[k] = echoes[i] + delta, True
                chars[k], tokens[k] = len(o.text), len(o.logprobs or [])
                done[k] = o.finish_reason is not None
                choices.append(CompletionChoice(index=k, text=delta, logprobs=lps, finish_reason=o.finish_reason))
            if choices:
                yield chunk(choices)
            item = await job.next()
        if req.stream_options and req.stream_options.include_usage:
            yield chunk([], self._usage([job.last[i] for i in sorted(job.last)]))

    # ---- shared ------------------------------------------------------------------------------

    async def _respond(self, request: Request, job: Job, stream: bool | None, chunks, whole) -> Response:
        """Streams `chunks(first output)` as events, or answers `whole(final outputs)` once done."""
        if stream:
            return await self._stream(request, job, chunks)
        try:
            outs = await until_disconnect(request, self._collect(job))
        except ClientDisconnected:
            return Response(status_code=499)
        finally:
            job.close()  # before counting: the cancelled collector may not have closed it yet
            request.state.completion_tokens = job.completion_tokens
        return _json(whole(outs))

    async def _collect(self, job: Job) -> list[RequestOutput]:
        finals = {}
        while (item := await job.next()) is not None:
            if item[1].finished:
                finals[item[0]] = item[1]
        return [finals[i] for i in range(len(job.prompts))]

    async def _stream(self, request: Request, job: Job, chunks) -> Response:
        """Waits for the first output, so that a request the engine refuses still gets its 4xx
        status; then streams. Leaving the stream early (client gone) closes the job: abort."""
        try:
            first = await until_disconnect(request, job.next())
        except ClientDisconnected:
            job.close()
            return Response(status_code=499)
        except BaseException:
            job.close()
            raise

        async def events():
            try:
                async for payload in chunks(first):
                    yield f"data: {payload}\n\n"
            except OpenAIError as e:
                yield f"data: {ErrorResponse(error=e.info()).model_dump_json()}\n\n"
            except Exception as e:  # noqa: BLE001 - the status is sent; report it in the stream
                log.exception("stream failed")
                err = OpenAIError(f"internal server error: {type(e).__name__}", 500)
                yield f"data: {ErrorResponse(error=err.info()).model_dump_json()}\n\n"
            except BaseException:  # closed or cancelled mid-stream: the client left (logged as 499)
                request.state.client_left = True
                raise
            finally:
                job.close()
                request.state.completion_tokens = job.completion_tokens
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=_sse_headers())

    # ---- tokenizer endpoints -------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> Response:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise OpenAIError("give exactly one of prompt and messages", param="prompt")
        if req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens is not False)
        else:
            ids = self._chat_prompt(req.messages, req.add_generation_prompt)
            if req.add_special_tokens and self.tokenizer.add_bos and ids[:1] != [self.tokenizer.bos_token_id]:
                ids.insert(0, self.tokenizer.bos_token_id)
        strs = [self.tokenizer.id_to_token(t) or "" for t in ids] if req.return_token_strs else None
        return _json(TokenizeResponse(count=len(ids), max_model_len=self.max_model_len, tokens=ids,
                                      token_strs=strs))

    def detokenize(self, req: DetokenizeRequest) -> Response:
        self.check_model(req.model)
        self._check_ids(req.tokens, "tokens")
        return _json(DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens)))
