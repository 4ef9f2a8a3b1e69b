"""LLM: the offline API, shaped like vLLM's (`LLM(model).generate(prompts, SamplingParams(...))`)."""
import dataclasses
import threading

from tqdm import tqdm

from kvserve.config import CacheConfig, EngineConfig, SchedulerConfig
from kvserve.engine.engine import Engine
from kvserve.engine.request import RequestOutput, SamplingParams

Messages = list[dict]


class LLM:
    def __init__(self, model: str | None = None, *, dtype: str = "auto", quantization: str = "auto",
                 device: str = "auto",
                 threads: int | None = None, page_size: int = 16, num_pages: int | None = None,
                 kv_cache_gb: float | None = None, enable_prefix_caching: bool = True,
                 max_num_batched_tokens: int = 2048, max_num_seqs: int = 64,
                 enable_chunked_prefill: bool = True, attention="full", enforce_eager: bool = False,
                 tensor_parallel_size: int = 1, speculative: str | None = None, num_speculative_tokens: int = 4,
                 speculative_model: str | None = None, overlap_schedule: bool | None = None,
                 max_model_len: int | None = None, engine: Engine | None = None):
        self.engine = engine or Engine(EngineConfig(
            model=model, dtype=dtype, quantization=quantization, device=device, threads=threads,
            attention=attention, enforce_eager=enforce_eager, overlap_schedule=overlap_schedule,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            speculative=speculative, num_speculative_tokens=num_speculative_tokens, speculative_model=speculative_model,
            cache=CacheConfig(page_size, num_pages, kv_cache_gb, enable_prefix_caching),
            scheduler=SchedulerConfig(max_num_batched_tokens, max_num_seqs, enable_chunked_prefill)))
        self.tokenizer = self.engine.tokenizer
        self._lock = threading.Lock()  # one generate at a time: each steps the engine for all requests

    def close(self) -> None:
        """Stops the engine's other tensor-parallel ranks (a no-op with one process)."""
        self.engine.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def get_tokenizer(self):
        return self.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Runs every prompt through the engine as one batch; outputs in input order. A prompt is a
        string, a list of token ids, or (as vLLM's TextPrompt, TokensPrompt) {"prompt": text} or
        {"prompt_token_ids": ids}; prompts is one of these or a list of them. If one is refused, none runs."""
        if hasattr(prompts, "tolist"):  # a numpy array or tensor: ids, or rows of ids
            prompts = prompts.tolist()
        if isinstance(prompts, (str, dict)) or (isinstance(prompts, (list, tuple)) and prompts
                                                and hasattr(prompts[0], "__index__")):
            prompts = [prompts]  # one prompt
        if not isinstance(prompts, (list, tuple)):
            raise TypeError(f"prompts: a prompt or a list of them, got {type(prompts).__name__}")
        prompts = [_prompt(p) for p in prompts]
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        if not all(p is None or isinstance(p, SamplingParams) for p in params):
            raise TypeError("sampling_params must be a SamplingParams, a list of them, or None")
        # only finished outputs are read here: the engine need not build one per request per step
        params = [dataclasses.replace(p or SamplingParams(), output_kind="final_only") for p in params]
        ids: list[str] = []
        done: dict[str, RequestOutput] = {}
        with self._lock, tqdm(total=len(prompts), desc="generating", unit="req", disable=not use_tqdm or None) as bar:
            try:
                for p, sp in zip(prompts, params):
                    ids.append(self.engine.add_request(p, sp))
                while len(done) < len(ids):
                    for out in self.engine.step():
                        if out.error:
                            raise RuntimeError(f"request {out.request_id} failed: {out.error}")
                        if out.finished:
                            done[out.request_id] = out
                            bar.update(1)
            except BaseException:
                for rid in ids:
                    self.engine.abort(rid)
                raise
        return [done[rid] for rid in ids]

    def chat(self, messages: Messages | list[Messages],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             use_tqdm: bool = True, add_generation_prompt: bool = True,
             tools: list[dict] | None = None, chat_template_kwargs: dict | None = None,
             continue_final_message: bool = False) -> list[RequestOutput]:
        """`tools` (OpenAI function tools) go to the chat template, or, where it renders none, into a
        system message; constrain the output with SamplingParams(structured=...) to force a call.
        `chat_template_kwargs`: extra template variables, e.g. {"enable_thinking": False} for Qwen3.
        `continue_final_message` (with add_generation_prompt=False): the last message's turn is left
        open, for the model to go on writing it."""
        if continue_final_message:
            chat_template_kwargs = {**(chat_template_kwargs or {}), "continue_final_message": True}
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        for m in (m for c in conversations for m in c):
            if not isinstance(m, dict) or "role" not in m or (m.get("content") is None and not m.get("tool_calls")):
                raise ValueError(f"a chat message is a dict with 'role' and 'content' (or 'tool_calls'), got {m!r:.80}")
        prompts = [self._chat_prompt(c, add_generation_prompt, tools, chat_template_kwargs) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def _chat_prompt(self, messages: Messages, add_generation_prompt: bool, tools: list[dict] | None,
                     template_kwargs: dict | None = None) -> list[int]:
        template_kwargs = template_kwargs or {}
        if not tools:
            return self.tokenizer.apply_chat_template(messages, add_generation_prompt, tokenize=True, **template_kwargs)
        from types import SimpleNamespace
        from kvserve.server.tools import plan_tools, template_messages
        plan = plan_tools(SimpleNamespace(tools=tools, tool_choice="required", parallel_tool_calls=None),
                          self.tokenizer.chat_template)
        extra = {**template_kwargs, "tools": plan.tools} if plan.in_template else template_kwargs
        return self.tokenizer.apply_chat_template(template_messages(messages, plan, plan.in_template),
                                                  add_generation_prompt, tokenize=True, **extra)

    def apply_chat_template(self, messages: Messages, add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)


def _prompt(p) -> str | list[int]:
    """One prompt of LLM.generate as the engine takes it: text or token ids."""
    if isinstance(p, dict):
        if set(p) == {"prompt"}:
            p = p["prompt"]
        elif set(p) == {"prompt_token_ids"}:
            p = p["prompt_token_ids"]
        else:
            raise ValueError(f"a prompt dict holds 'prompt' (text) or 'prompt_token_ids', got keys {sorted(p)}")
    if isinstance(p, str):
        return p
    if not isinstance(p, (list, tuple)) and not hasattr(p, "tolist") \
            or not all(hasattr(t, "__index__") for t in p):  # ints, numpy's too
        raise TypeError(f"a prompt is a string, token ids or a dict of either, got {str(p)[:80]}")
    return [t.__index__() for t in p]
