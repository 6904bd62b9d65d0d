"""POST /v1/chat/completions: render the conversation with the model's chat template, then
generate from its token ids.

The prompt is rendered as text (`--chat-template` override, else the tokenizer's template) and
tokenized without special tokens, since the template already holds BOS where the model wants
one; the engine gets `input_ids`, so usage.prompt_tokens is exactly the rendered prompt's
length. A conversation ending with an assistant message is continued, not answered, unless
the request says `continue_final_message: false`.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Union

from jinja2 import TemplateError

from sglang.srt.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    ResponseFunctionCall,
    ResponseToolCall,
    TopLogprob,
)
from sglang.srt.entrypoints.openai.serving import (
    Disconnected,
    ResponseBuilder,
    bad_request,
    check_model,
    generate_all,
    num_samples,
    sampling_params,
    start_stream,
    token_text,
)
from sglang.srt.entrypoints.openai.tool_parsers import TOOL_CALL_FORMATS
from sglang.srt.entrypoints.openai.tools import (
    ToolChoiceStream,
    ToolPlan,
    checked_json_schema,
    new_call_id,
    template_tool_calls,
    tool_plan,
)
from sglang.srt.managers.io_struct import GenerateReqInput

# "developer" is OpenAI's newer name for "system", "function" its old one for "tool"; chat
# templates only know the latter.
_TEMPLATE_ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
    "function": "tool",
}
# apply_chat_template arguments that chat_template_kwargs must not override.
_RESERVED_TEMPLATE_ARGS = {
    "conversation",
    "chat_template",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
}
# apply_chat_template arguments that must be lists of objects (JSON schemas, documents).
_LIST_TEMPLATE_ARGS = ("tools", "documents")


async def chat_completions(
    tm: Any, request: ChatCompletionRequest, wait_disconnected: Optional[Disconnected] = None
) -> Union[dict, AsyncIterator[bytes]]:
    """The response dict, or (with stream) an async iterator of SSE bytes. Raises OpenAIError."""
    check_model(tm, request.model)
    _check_supported(request)
    plan = tool_plan(request, TOOL_CALL_FORMATS.get(tm.tool_call_parser or ""))
    input_ids = render_chat(tm, request, plan.template_tools())
    if request.max_completion_tokens is not None:
        max_tokens = request.max_completion_tokens
    elif request.max_tokens is not None:
        max_tokens = request.max_tokens
    else:
        # No limit: whatever the context has room for (too long a prompt is the engine's 400).
        max_tokens = max(tm.context_len - len(input_ids), 0)
    job = _Chat(tm, request, plan)
    params = sampling_params(request, max_tokens)
    tool_params = plan.sampling_params(tm.tokenizer)
    if request.skip_special_tokens is not None:
        tool_params.pop("skip_special_tokens", None)  # the client's own choice wins
    obj = GenerateReqInput(
        input_ids=input_ids,
        sampling_params={**params, **_response_format_params(request), **tool_params},
        rid=job.id,
        return_logprob=bool(request.logprobs),
        top_logprobs_num=(request.top_logprobs or 0) if request.logprobs else None,
        return_text_in_logprobs=True,
        stream=bool(request.stream),
    )
    if request.stream:
        return await start_stream(tm, obj, job.stream_chunks, job.end_chunks)
    return job.response(await generate_all(tm, obj, num_samples(request), wait_disconnected))


def _response_format_params(request: ChatCompletionRequest) -> dict[str, str]:
    """The grammar a response_format asks for, as the engine's json_schema parameter: any JSON
    object for json_object, the given schema (any JSON when it has none) for json_schema."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return {}
    if fmt.type == "json_object":
        return {"json_schema": '{"type": "object"}'}
    if fmt.json_schema is None:
        raise bad_request("response_format.json_schema is required for type json_schema", "response_format.json_schema")
    schema = fmt.json_schema.schema_ if fmt.json_schema.schema_ is not None else {}
    return {"json_schema": checked_json_schema(schema, "response_format.json_schema.schema")}


def _check_supported(request: ChatCompletionRequest) -> None:
    fmt = request.response_format
    if fmt is not None and fmt.type != "text" and (request.regex or request.json_schema or request.ebnf):
        raise bad_request("response_format and regex/json_schema/ebnf are mutually exclusive", "response_format")
    if request.top_logprobs and not request.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")


def render_chat(tm: Any, request: ChatCompletionRequest, tools: Optional[list[dict]] = None) -> list[int]:
    """The prompt's token ids: the conversation (and `tools`, when given) through the chat
    template, then the tokenizer."""
    messages = template_messages(request.messages)
    ends_with_assistant = messages[-1]["role"] == "assistant"
    continue_final = request.continue_final_message
    if continue_final is None:
        continue_final = ends_with_assistant
    elif continue_final and not ends_with_assistant:
        raise bad_request("continue_final_message needs a final assistant message", "continue_final_message")
    extra = template_kwargs(request.chat_template_kwargs)
    if tools is not None:
        extra["tools"] = tools
    if tm.chat_template is None and not getattr(tm.tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; start the server with --chat-template", "messages")
    try:
        prompt = tm.tokenizer.apply_chat_template(
            messages,
            chat_template=tm.chat_template,
            tokenize=False,
            add_generation_prompt=not continue_final,
            continue_final_message=continue_final,
            **extra,
        )
    except (TemplateError, ValueError) as e:
        raise bad_request(f"the chat template rejected the messages: {e}", "messages") from e
    except Exception as e:  # the template runs on what the request passed it (chat_template_kwargs)
        param = "chat_template_kwargs" if extra else "messages"
        raise bad_request(f"the chat template failed on this request: {type(e).__name__}: {e}", param) from e
    return tm.tokenizer.encode(prompt, add_special_tokens=False)


def template_kwargs(kwargs: Optional[dict[str, Any]]) -> dict[str, Any]:
    """chat_template_kwargs minus the arguments the server sets; those that apply_chat_template
    itself interprets must have its types."""
    extra = {k: v for k, v in (kwargs or {}).items() if k not in _RESERVED_TEMPLATE_ARGS}
    for name in _LIST_TEMPLATE_ARGS:
        value = extra.get(name)
        if value is not None and not (isinstance(value, list) and all(isinstance(v, dict) for v in value)):
            raise bad_request(f"chat_template_kwargs.{name} must be a list of objects", f"chat_template_kwargs.{name}")
    return extra


def template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """The messages as the chat template sees them: {"role", "content": str}, plus an assistant
    turn's "tool_calls" and a tool result's "tool_call_id" and "name"."""
    if not messages:
        raise bad_request("messages must not be empty", "messages")
    rendered = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        role = _TEMPLATE_ROLES.get(message.role)
        if role is None:
            raise bad_request(
                f"{where}.role must be one of {', '.join(_TEMPLATE_ROLES)}, got {message.role!r}", f"{where}.role"
            )
        entry: dict[str, Any] = {"role": role, "content": _content_text(message.content, where)}
        if message.tool_calls:
            if role != "assistant":
                raise bad_request(f"{where}.tool_calls: only assistant messages have tool calls", f"{where}.tool_calls")
            entry["tool_calls"] = template_tool_calls(message.tool_calls)
        if message.role == "tool":
            if not message.tool_call_id:
                raise bad_request(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id")
            entry["tool_call_id"] = message.tool_call_id
        if role == "tool" and message.name:
            entry["name"] = message.name
        rendered.append(entry)
    return rendered


def _content_text(content: Any, where: str) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        part_where = f"{where}.content[{j}]"
        if part.type != "text":
            raise bad_request(f"{part_where}: content of type {part.type!r} is not supported", f"{part_where}.type")
        if part.text is None:
            raise bad_request(f"{part_where}.text is required for a text part", f"{part_where}.text")
        texts.append(part.text)
    return "\n".join(texts)


class _Chat(ResponseBuilder):
    """One request's response assembly, for the whole result or chunk by chunk."""

    id_prefix = "chatcmpl"
    chunk_object = "chat.completion.chunk"
    response_model = ChatCompletionResponse

    def __init__(self, tm: Any, request: ChatCompletionRequest, plan: ToolPlan):
        super().__init__(tm, request)
        self.with_logprobs = bool(request.logprobs)
        self.num_top_logprobs = request.top_logprobs or 0
        self.plan = plan
        # per streamed choice, when the tools change what is sent
        self.tool_streams: dict[int, ToolChoiceStream] = {}

    def _logprobs(self, entries: list, tops: list) -> Optional[ChatLogprobs]:
        if not self.with_logprobs:
            return None
        return chat_logprobs(self.tm, entries, tops, self.num_top_logprobs)

    def choice(self, index: int, result: dict, finish_reason: Optional[str], matched: Any) -> ChatChoice:
        meta = result["meta_info"]
        content, calls = result["text"], None
        if self.plan.changes_output:
            content, parsed = self.plan.parse(content)
            if parsed:
                calls = [
                    ResponseToolCall(
                        id=new_call_id(), function=ResponseFunctionCall(name=c.name, arguments=c.arguments)
                    )
                    for c in parsed
                ]
                finish_reason = "tool_calls" if finish_reason == "stop" else finish_reason
        return ChatChoice(
            index=index,
            message=ChatResponseMessage(content=content, tool_calls=calls),
            logprobs=self._logprobs(meta.get("output_token_logprobs") or [], meta.get("output_top_logprobs") or []),
            finish_reason=finish_reason,
            matched_stop=matched,
        )

    def stream_chunks(self, index: int, result: dict) -> list[dict]:
        step = self.tracker.step(index, result)
        if step is None:
            return []
        chunks = []
        if step.first:
            chunks.append(self.chunk(_stream_choice(index, {"role": "assistant", "content": ""})))
        text, calls, finish_reason = step.text, [], step.finish_reason
        if self.plan.changes_output:
            tools = self.tool_streams.setdefault(index, ToolChoiceStream(self.plan))
            text, calls = tools.step(step.text)
            if finish_reason is not None:
                rest, end_calls, called = tools.finish()
                text, calls = text + rest, calls + end_calls
                finish_reason = "tool_calls" if called and finish_reason == "stop" else finish_reason
        if text or (self.with_logprobs and step.logprobs):
            logprobs = self._logprobs(step.logprobs, step.top_logprobs)
            chunks.append(self.chunk(_stream_choice(index, {"content": text}, logprobs)))
        if calls:
            chunks.append(self.chunk(_stream_choice(index, {"tool_calls": calls})))
        if finish_reason is not None:
            chunks.append(self.chunk(_stream_choice(index, {}, None, finish_reason, step.matched_stop)))
        return chunks


def _stream_choice(
    index: int,
    delta: dict,
    logprobs: Optional[ChatLogprobs] = None,
    finish_reason: Optional[str] = None,
    matched_stop: Any = None,
) -> dict:
    """A ChatStreamChoice as a dict, built directly: this runs once per streamed token."""
    return {
        "index": index,
        "delta": delta,
        "logprobs": None if logprobs is None else logprobs.model_dump(),
        "finish_reason": finish_reason,
        "matched_stop": matched_stop,
    }


def chat_logprobs(tm: Any, entries: list, tops: list, num_top: int) -> ChatLogprobs:
    """OpenAI's chat logprobs for engine entries [logprob, token_id, text] and their top lists."""
    content = []
    for position, (logprob, token_id, text) in enumerate(entries):
        top = tops[position] if position < len(tops) else None
        token = token_text(tm, token_id, text)
        alternatives = [_top_logprob(tm, *candidate) for candidate in (top or [])[:num_top]]
        content.append(
            ChatTokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=alternatives)
        )
    return ChatLogprobs(content=content)


def _top_logprob(tm: Any, logprob: float, token_id: int, text: Optional[str]) -> TopLogprob:
    token = token_text(tm, token_id, text)
    return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))
