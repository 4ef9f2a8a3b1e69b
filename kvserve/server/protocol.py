"""Pydantic models of the OpenAI API the server speaks, with vLLM's extensions where OpenAI has none.

Requests forbid unknown fields, as OpenAI does: a misspelt `max_token` is an error, not a default
silently used. OpenAI fields this server cannot honour (suffix) are declared so that they get a
precise "not supported" error instead of "unrecognized".
"""
import time
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, model_serializer, model_validator
from pydantic_core import PydanticCustomError

SEED_MAX = 2**63 - 1  # torch generators take 64 bits; the engine adds an offset per choice
MAX_TOP_LOGPROBS = 20


class _Request(BaseModel):
    # strict: JSON's types as they are (true is not max_tokens 1, "yes" not a boolean, "0.5" not a number)
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)

    @model_validator(mode="before")
    @classmethod
    def _whole_characters(cls, data):
        """JSON may escape half a UTF-16 surrogate pair ("\\ud800"), which no text encoding can carry."""
        where = lone_surrogate(data)
        if where is not None:
            raise PydanticCustomError("lone_surrogate", "{path} holds a lone UTF-16 surrogate, which is not a "
                                      "character (surrogates come in pairs)", {"path": where})
        return data


def lone_surrogate(value) -> str | None:
    """The path of the first string in value (JSON-like) that is not valid Unicode text, or None.
    A loop, not recursion: JSON nests as deep as its parser allows."""
    todo = [(value, "")]
    while todo:
        value, path = todo.pop()
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                return path or "a string"
        elif isinstance(value, dict):
            for key, item in reversed(value.items()):
                todo += [(item, f"{path}.{key}" if path else str(key)), (key, path or "a key")]
        elif isinstance(value, list):
            todo += [(item, f"{path}[{i}]") for i, item in reversed(list(enumerate(value)))]
    return None


class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk


class _SamplingRequest(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""
    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    seed: int | None = Field(None, ge=-SEED_MAX - 1, le=SEED_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    min_tokens: int = Field(0, ge=0)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    # kvserve's extension: decode attention policy, a name or {"policy": "magicpig", "K": 10, ...}
    attention: str | dict | None = None
    # vLLM's structured outputs (read by kvserve.server.structured_protocol)
    structured_outputs: dict | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # older vLLM clients name one; xgrammar is the only one here
    # vLLM's: requests share prefix-cache pages only when their salts are equal
    cache_salt: str | None = Field(None, min_length=1, max_length=1024)
    # kvserve's extension: false keeps this request off the server's --speculative decoding
    speculative: bool = True


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str


class ToolCall(_Request):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # None: an assistant's tool calls only (kvserve.server.tools)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    # what clients echo back of an assistant message of ours; not shown to the model
    refusal: str | None = Field(None, exclude=True)
    annotations: list | None = Field(None, exclude=True)
    function_call: dict | None = Field(None, exclude=True)
    audio: dict | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _content_given(self):
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"content is required for a {self.role} message without tool_calls")
        return self


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict | None = None  # read by kvserve.server.structured_protocol
    tools: list[dict] | None = None  # these three by kvserve.server.tools
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict | None = None  # extra variables for the template, e.g. {"enable_thinking": false}
    # vLLM's: continue_final_message (with add_generation_prompt false) has the model go on writing
    # the last message, e.g. an assistant reply begun by the caller
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    # declared so that they are accepted where they change nothing
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None


class CompletionRequest(_SamplingRequest):
    prompt: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    # OpenAI's default; null: up to the context length; 0 with echo: score the prompt, generate nothing
    max_tokens: int | None = Field(16, ge=0)
    echo: bool | None = False  # with logprobs, the prompt's tokens get theirs (the first: null)
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None
    response_format: dict | None = None  # vLLM takes it on completions too


class EmbeddingRequest(_Request):
    """OpenAI's /v1/embeddings. `input` is text only: token ids would have to be the embedder's own
    WordPiece ids, which no OpenAI client tokenizes to, so they get a clear 400 (kvserve.server.embeddings)."""
    model: str | None = None
    input: StrictStr | list[StrictStr] | list[StrictInt] | list[list[StrictInt]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


class TokenizeRequest(_Request):
    """vLLM's /tokenize: either a prompt or chat messages."""
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = True
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages
    return_token_strs: bool = False


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[StrictInt]


# ---- responses ---------------------------------------------------------------------------------

def _now() -> int:
    return int(time.time())


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[dict] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[dict] | None = None

    @model_serializer
    def _only_set(self) -> dict:  # OpenAI's deltas leave out what does not change
        return {k: v for k, v in (("role", self.role), ("content", self.content), ("tool_calls", self.tool_calls))
                if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32, as OpenAI's encoding_format=base64


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "kvserve"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str
