"""Bodies of the OpenAI-compatible endpoints, as pydantic v2 models.

Requests are strict about JSON types (`"temperature": "0.5"` is a 400 naming the field, not a
silent conversion) and ignore unknown fields, since OpenAI clients pass extras through
`extra_body`. The SGLang extensions we honour (`ignore_eos`, `top_k`, ...) are declared fields
and go to the engine's sampling parameters. Ranges that OpenAI documents are checked here;
everything else is checked by the engine, whose ValueError becomes a 400 as well.

Responses follow OpenAI's shapes, plus SGLang's `matched_stop` on each choice.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WrapValidator, field_serializer
from pydantic_core import PydanticCustomError

# OpenAI's documented limits.
MAX_N = 128
MAX_CHAT_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5


def _one_of(description: str) -> WrapValidator:
    """Replaces pydantic's one-error-per-union-member report with a single readable one."""

    def validate(value: Any, handler: Any) -> Any:
        try:
            return handler(value)
        except ValidationError:
            raise PydanticCustomError("union_type", "must be " + description) from None

    return WrapValidator(validate)


# Empty prompts and stop strings are the engine's 400s; saying so here documents it.
Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Annotated[
    Union[Text, Annotated[list[Text], Field(min_length=1)], TokenIds, Annotated[list[TokenIds], Field(min_length=1)]],
    _one_of("a non-empty string, a list of them, a list of token ids or a list of lists of token ids"),
]
Stop = Annotated[Union[Text, list[Text], None], _one_of("a non-empty string, a list of them or null")]
LogitBias = dict[str, Annotated[float, Field(ge=-100, le=100)]]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: Optional[bool] = False
    # vLLM's and SGLang's extension: usage on every chunk, not only in a final one.
    continuous_usage_stats: Optional[bool] = False


class SamplingRequest(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions; None means "the default"."""

    model: Optional[str] = None
    n: Optional[int] = Field(1, ge=1, le=MAX_N)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, ge=0, le=1)
    stop: Stop = None
    seed: Optional[int] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    logit_bias: Optional[LogitBias] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    # SGLang extensions, passed to the engine under the same name (min_tokens excepted).
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    repetition_penalty: Optional[float] = None
    min_tokens: Optional[int] = None
    ignore_eos: Optional[bool] = None
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: Optional[bool] = None
    no_stop_trim: Optional[bool] = None
    # Any value is passed on: the engine answers "not supported yet" whatever its type.
    regex: Optional[Any] = None
    json_schema: Optional[Any] = None
    ebnf: Optional[Any] = None


class CompletionRequest(SamplingRequest):
    prompt: Prompt
    max_tokens: Optional[int] = Field(16, ge=0)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1)  # only n (the engine returns every sample)
    suffix: Optional[str] = None


class ContentPart(_Request):
    type: str
    text: Optional[str] = None


MessageContent = Annotated[
    Union[str, list[ContentPart], None],
    _one_of("a string, a list of content parts or null"),
]


class FunctionCall(_Request):
    name: Annotated[str, Field(min_length=1)]
    arguments: str  # a JSON object, as the model wrote it


class ToolCallMessage(_Request):
    """A tool call of an earlier assistant turn, sent back in the history."""

    id: Optional[str] = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Request):
    # "function" is OpenAI's deprecated name for a "tool" message.
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: MessageContent = None
    name: Optional[str] = None
    tool_calls: Optional[list[ToolCallMessage]] = None
    tool_call_id: Optional[str] = None


class FunctionDefinition(_Request):
    name: Annotated[str, Field(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: Optional[str] = None
    parameters: Optional[dict[str, Any]] = None  # a JSON schema of the arguments object
    strict: Optional[bool] = None


class Tool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(_Request):
    name: Annotated[str, Field(min_length=1)]


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: ToolChoiceFunction


ToolChoice = Annotated[
    Union[Literal["none", "auto", "required"], NamedToolChoice, None],
    _one_of('"none", "auto", "required" or {"type": "function", "function": {"name": ...}}'),
]


class JsonSchemaFormat(_Request):
    name: Annotated[str, Field(min_length=1)]
    # "schema" would shadow BaseModel.schema; the JSON name stays OpenAI's
    schema_: Optional[dict[str, Any]] = Field(None, alias="schema")
    description: Optional[str] = None
    strict: Optional[bool] = False


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: Optional[JsonSchemaFormat] = None


class ChatCompletionRequest(SamplingRequest):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Optional[int] = Field(None, ge=0)
    max_completion_tokens: Optional[int] = Field(None, ge=0)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_CHAT_TOP_LOGPROBS)
    response_format: Optional[ResponseFormat] = None
    tools: Optional[list[Tool]] = None
    # None: "auto" with tools, "none" without (OpenAI's default)
    tool_choice: ToolChoice = None
    parallel_tool_calls: Optional[bool] = True
    # Extra variables for the chat template (e.g. {"enable_thinking": false}).
    chat_template_kwargs: Optional[dict[str, Any]] = None
    # Continue the final assistant message instead of starting a new one; by default (None),
    # a conversation that ends with an assistant message is continued.
    continue_final_message: Optional[bool] = None


# ---- responses -------------------------------------------------------------------------------

FinishReason = Optional[str]  # "stop" | "length" | "tool_calls" | "abort" | None while running
MatchedStop = Union[int, str, None]


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy format; a prompt's first token has no logprob (None)."""

    tokens: list[str] = []
    token_logprobs: list[Optional[float]] = []
    top_logprobs: list[Optional[dict[str, float]]] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None
    matched_stop: MatchedStop = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChatLogprobs(BaseModel):
    content: Optional[list[ChatTokenLogprob]] = None


class ResponseFunctionCall(BaseModel):
    name: str
    arguments: str


class ResponseToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ResponseFunctionCall


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None
    tool_calls: Optional[list[ResponseToolCall]] = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None
    matched_stop: MatchedStop = None

    @field_serializer("message")
    def _message_without_null_tool_calls(self, message: ChatResponseMessage) -> dict:
        # OpenAI sends "tool_calls" only when there are some; "content" is null beside them.
        dumped = message.model_dump()
        if dumped["tool_calls"] is None:
            del dumped["tool_calls"]
        return dumped


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaFunctionCall(BaseModel):
    name: Optional[str] = None
    arguments: Optional[str] = None


class DeltaToolCall(BaseModel):
    """A piece of a streamed tool call: the first names it (id, type, name), later ones add to
    its arguments; `index` says which call of the message it belongs to."""

    index: int
    id: Optional[str] = None
    type: Optional[Literal["function"]] = None
    function: Optional[DeltaFunctionCall] = None


class DeltaMessage(BaseModel):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None
    tool_calls: Optional[list[DeltaToolCall]] = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatLogprobs] = None
    finish_reason: FinishReason = None
    matched_stop: MatchedStop = None

    @field_serializer("delta")
    def _delta_without_nulls(self, delta: DeltaMessage) -> dict:
        # OpenAI's deltas carry only what changed: {"role", "content": ""}, {"content"}, {}.
        return delta.model_dump(exclude_none=True)


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Optional[UsageInfo] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sglang"
    root: Optional[str] = None
    max_model_len: Optional[int] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[int] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo
