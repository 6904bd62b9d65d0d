"""OpenAI tool calling for /v1/chat/completions: what `tools` and `tool_choice` ask of the
engine, and how the output becomes `tool_calls`.

- `none` (the default without tools): the tools are not shown to the model.
- `auto` (the default with tools): the chat template shows the tools; the output is parsed in
  the model's own format (tool_parsers.py), and whatever is not a call stays content.
- `required` and a named function: the output is constrained by a JSON schema (xgrammar), so
  the calls always parse and their arguments validate against the functions' `parameters`:
  for a named function the output is its arguments object; for `required`, a list of
  `{"name", "parameters"}` objects, one entry per call. Neither depends on a parser, so they
  work with any chat template.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Optional

from sglang.srt.constrained.grammar_backend import check_grammar
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, NamedToolChoice, Tool
from sglang.srt.entrypoints.openai.serving import bad_request
from sglang.srt.entrypoints.openai.tool_parsers import ParsedToolCall, ToolCallFormat, ToolCallStream, json_values

# The arguments of a function that declares no parameters.
_ANY_OBJECT = {"type": "object"}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolPlan:
    """What one chat request's tools ask for."""

    mode: str  # "none", "auto", "required" or "named"
    tools: list[Tool] = field(default_factory=list)
    fmt: Optional[ToolCallFormat] = None  # auto: the format calls are parsed in (None: no parsing)
    function: Optional[str] = None  # named: the function
    schema: Optional[str] = None  # required/named: the JSON schema the output follows

    @property
    def changes_output(self) -> bool:
        """Whether the output is turned into tool calls (else it is plain content)."""
        return self.mode in ("required", "named") or (self.mode == "auto" and self.fmt is not None)

    def template_tools(self) -> Optional[list[dict]]:
        """The tools as the chat template takes them (OpenAI's shape, as HF templates expect)."""
        if self.mode == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]

    def sampling_params(self, tokenizer: Any) -> dict[str, Any]:
        if self.schema is not None:
            return {"json_schema": self.schema}
        if self.fmt is not None and _has_special_marker(tokenizer, self.fmt):
            return {"skip_special_tokens": False}  # else the detokenizer drops the call's marker
        return {}

    def parse(self, text: str) -> tuple[Optional[str], list[ParsedToolCall]]:
        """(content, calls) of a finished choice; text that holds no valid call is content."""
        try:
            if self.mode == "named":
                return None, [ParsedToolCall(self.function, _arguments(json.loads(text)))]
            if self.mode == "required":
                (entries,) = json_values(text)
                return None, [ParsedToolCall(e["name"], _arguments(e["parameters"])) for e in entries]
        except (ValueError, TypeError, KeyError):  # cut short by max_tokens
            return text, []
        if self.fmt is None:
            return text, []
        content, calls = self.fmt.parse(text)
        return (content or None) if calls else content, calls


def _arguments(value: Any) -> str:
    if not isinstance(value, dict):
        raise ValueError("arguments must be an object")
    return json.dumps(value, ensure_ascii=False)


def _has_special_marker(tokenizer: Any, fmt: ToolCallFormat) -> bool:
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return any(token.special and str(token) in fmt.markers for token in added.values())


def tool_plan(request: ChatCompletionRequest, fmt: Optional[ToolCallFormat]) -> ToolPlan:
    """The plan for a request, `fmt` being the server's tool-call format; a 400 for tools or a
    tool_choice that cannot be honoured."""
    tools = request.tools or []
    choice = request.tool_choice
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return ToolPlan("none")
    if not tools:
        raise bad_request(f"tool_choice {_describe(choice)} needs tools", "tool_choice")
    names = [tool.function.name for tool in tools]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise bad_request(f"tools[{i}].function.name {name!r} is used by two tools", f"tools[{i}].function.name")
    if choice == "auto":
        return ToolPlan("auto", tools, fmt=fmt)
    if _constrains_output(request):
        raise bad_request(
            f"tool_choice {_describe(choice)} and response_format/regex/json_schema/ebnf are mutually exclusive",
            "tool_choice",
        )
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not in tools", "tool_choice.function.name")
        index = names.index(name)
        return ToolPlan("named", tools, function=name, schema=_checked_parameters(tools[index], index))
    entries = [
        {
            "type": "object",
            "properties": {"name": {"const": tool.function.name}, "parameters": _parameters(tool)},
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    for i, tool in enumerate(tools):
        _checked_parameters(tool, i)
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": entries}}
    if request.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return ToolPlan("required", tools, schema=json.dumps(schema))


def _describe(choice: Any) -> str:
    return repr(choice) if isinstance(choice, str) else f"for function {choice.function.name!r}"


def _constrains_output(request: ChatCompletionRequest) -> bool:
    fmt = request.response_format
    return (fmt is not None and fmt.type != "text") or any(
        v is not None for v in (request.regex, request.json_schema, request.ebnf)
    )


def _parameters(tool: Tool) -> dict:
    return tool.function.parameters if tool.function.parameters is not None else _ANY_OBJECT


def _checked_parameters(tool: Tool, index: int) -> str:
    return checked_json_schema(_parameters(tool), f"tools[{index}].function.parameters")


def checked_json_schema(schema: dict, param: str) -> str:
    """`schema` as the engine's json_schema text; a 400 naming `param` when the grammar backend
    cannot compile it (the engine would say the same, naming its own field)."""
    text = json.dumps(schema)
    try:
        check_grammar("json_schema", text)
    except ValueError as exc:
        raise bad_request(str(exc), param) from None
    return text


def template_tool_calls(calls: list[Any]) -> list[dict]:
    """An assistant message's tool calls as chat templates read them: arguments as an object
    (templates serialize them themselves; a JSON string would be quoted twice)."""
    rendered = []
    for call in calls:
        try:
            arguments = json.loads(call.function.arguments)
        except ValueError:
            arguments = call.function.arguments  # not JSON: the template gets the text
        function = {"name": call.function.name, "arguments": arguments}
        rendered.append({"id": call.id, "type": "function", "function": function})
    return rendered


def call_deltas(calls: list[ParsedToolCall]) -> list[dict]:
    """OpenAI stream deltas for whole calls: each named and given its arguments at once."""
    return [
        {
            "index": i,
            "id": new_call_id(),
            "type": "function",
            "function": {"name": call.name, "arguments": call.arguments},
        }
        for i, call in enumerate(calls)
    ]


class ToolChoiceStream:
    """One streamed choice under a tool plan that changes its output: the content to send as
    text arrives, and the tool-call deltas.

    A named function's arguments stream as they are generated (the output is the arguments
    object); `required` and parsed (`auto`) calls are sent whole when the choice finishes."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self.content = ToolCallStream(plan.fmt) if plan.fmt is not None else None
        self.named_call_id: Optional[str] = None

    def step(self, new_text: str) -> tuple[str, list[dict]]:
        """(content, tool-call deltas) to send for the choice's next piece of text."""
        self.text += new_text
        if self.plan.mode == "named":
            deltas = []
            if self.named_call_id is None:
                self.named_call_id = new_call_id()
                function = {"name": self.plan.function, "arguments": ""}
                deltas.append({"index": 0, "id": self.named_call_id, "type": "function", "function": function})
            if new_text:
                deltas.append({"index": 0, "function": {"arguments": new_text}})
            return "", deltas
        if self.content is None:  # required: the output is JSON, sent as calls at the end
            return "", []
        return self.content.feed(self.text), []

    def finish(self) -> tuple[str, list[dict], bool]:
        """(content, tool-call deltas, whether the choice called tools) once it has finished."""
        content, calls = self.plan.parse(self.text)
        if self.plan.mode == "named":
            return "", [], bool(calls)  # the arguments went out as they came
        sent = self.content.sent if self.content is not None else 0
        if not calls:
            return self.text[sent:], [], False
        parts = self.plan.fmt.split(self.text) if self.plan.fmt is not None else None
        rest = self.text[sent : len(parts[0])] if parts is not None else ""
        return rest, call_deltas(calls), True
