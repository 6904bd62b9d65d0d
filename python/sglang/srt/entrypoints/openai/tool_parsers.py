"""Tool calls in a model's own chat format (`--tool-call-parser`): finding them in generated
text, and holding back streamed text that may turn out to be one.

Each format says how its models write a call once the chat template has shown them the tools:
- qwen25 (Qwen2.5/Qwen3, Hermes): `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
  one block per call;
- llama3 (Llama 3.1+ JSON tool calling): `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`, several separated by `;`;
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or the newer
  `[TOOL_CALLS]name[ARGS]{...}`.
Text before the first call is the message's content. Text that does not parse as calls is
all content: a model that merely mentions a marker is not calling a tool.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any, Optional

logger = logging.getLogger(__name__)
_DECODER = json.JSONDecoder()


@dataclass
class ParsedToolCall:
    name: str
    arguments: str  # a JSON object, re-serialized


class ToolCallFormat:
    name: str
    # Text that opens a call; what comes before the first one is content.
    markers: tuple[str, ...]
    # A call's JSON keys for its function name and its arguments (the first found wins).
    argument_keys: tuple[str, ...] = ("arguments", "parameters")

    def detects(self, template: str) -> bool:
        """Whether a chat template writes tool calls in this format."""
        raise NotImplementedError

    def undecided_tail(self, text: str) -> int:
        """How many characters at the end of `text` (which holds no call's opening) may still
        become one: the longest end that begins some marker."""
        longest = 0
        for marker in self.markers:
            for n in range(min(len(marker) - 1, len(text)), longest, -1):
                if text.endswith(marker[:n]):
                    longest = n
                    break
        return longest

    def split(self, text: str) -> Optional[tuple[str, str]]:
        """(content, the calls' text) when `text` holds a call's opening, else None."""
        positions = [p for p in (text.find(m) for m in self.markers) if p >= 0]
        if not positions:
            return None
        start = min(positions)
        return text[:start], text[start:]

    def parse_calls(self, calls_text: str) -> list[ParsedToolCall]:
        """The calls in the text `split` found; raises ValueError when it is not a list of calls."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        """(content, calls): the whole text as content when it holds no well-formed call."""
        parts = self.split(text)
        if parts is None:
            return text, []
        try:
            calls = self.parse_calls(parts[1])
        except ValueError:
            return text, []
        return (parts[0].strip(), calls) if calls else (text, [])

    def call(self, obj: Any) -> ParsedToolCall:
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            raise ValueError("a tool call is an object with a string name")
        arguments = next((obj[k] for k in self.argument_keys if k in obj), {})
        if isinstance(arguments, str):  # some models write the arguments as a JSON string
            arguments = json.loads(arguments)
        if not isinstance(arguments, dict):
            raise ValueError("a tool call's arguments are an object")
        return ParsedToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


def json_values(text: str, separators: str = "") -> list[Any]:
    """Consecutive JSON values in `text`, with whitespace and `separators` between them;
    raises ValueError on anything else."""
    values, pos = [], 0
    while True:
        while pos < len(text) and (text[pos].isspace() or text[pos] in separators):
            pos += 1
        if pos == len(text):
            return values
        value, pos = _DECODER.raw_decode(text, pos)
        values.append(value)


class Qwen25Format(ToolCallFormat):
    name = "qwen25"
    markers = ("<tool_call>",)
    _BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def detects(self, template: str) -> bool:
        return "<tool_call>" in template

    def parse_calls(self, calls_text: str) -> list[ParsedToolCall]:
        if self._BLOCK.sub("", calls_text).strip():
            raise ValueError("text between tool calls")
        return [self.call(json.loads(body)) for body in self._BLOCK.findall(calls_text)]


class Llama3Format(ToolCallFormat):
    name = "llama3"
    markers = ("<|python_tag|>",)

    def detects(self, template: str) -> bool:
        return "<|python_tag|>" in template or ("ipython" in template and "<|start_header_id|>" in template)

    def split(self, text: str) -> Optional[tuple[str, str]]:
        parts = super().split(text)
        if parts is not None:
            return parts[0], parts[1][len(self.markers[0]) :]
        # Llama 3.1 also answers with bare JSON when the tools are in the user's turn.
        return ("", text) if text.lstrip().startswith("{") else None

    def undecided_tail(self, text: str) -> int:
        # Leading whitespace may still be followed by a bare JSON call.
        return len(text) if not text.strip() else super().undecided_tail(text)

    def parse_calls(self, calls_text: str) -> list[ParsedToolCall]:
        return [self.call(value) for value in json_values(calls_text, separators=";")]


class MistralFormat(ToolCallFormat):
    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def detects(self, template: str) -> bool:
        return "[TOOL_CALLS]" in template

    def parse_calls(self, calls_text: str) -> list[ParsedToolCall]:
        calls = []
        for chunk in calls_text.split("[TOOL_CALLS]")[1:]:
            chunk = chunk.strip()
            if chunk.startswith("["):  # v3: a JSON list of calls
                for value in json_values(chunk):
                    if not isinstance(value, list):
                        raise ValueError("[TOOL_CALLS] is followed by a list")
                    calls += [self.call(v) for v in value]
            else:  # v11: name[ARGS]{...}
                name, sep, arguments = chunk.partition("[ARGS]")
                if not sep:
                    raise ValueError("[TOOL_CALLS] without [ARGS]")
                calls.append(self.call({"name": name.strip(), "arguments": json.loads(arguments)}))
        return calls


TOOL_CALL_FORMATS: dict[str, ToolCallFormat] = {f.name: f for f in (Llama3Format(), Qwen25Format(), MistralFormat())}


def format_for_template(template: Optional[str]) -> Optional[ToolCallFormat]:
    """The one format a chat template writes tool calls in; None when it shows none, or more
    than one could match."""
    if not template:
        return None
    found = [f for f in TOOL_CALL_FORMATS.values() if f.detects(template)]
    return found[0] if len(found) == 1 else None


def tool_call_parser_for(flag: Optional[str], template: Any) -> Optional[str]:
    """The server's tool-call format: `--tool-call-parser` when given, else the one the chat
    template writes (a tokenizer may carry several templates: its "tool_use" one, else its
    "default" one); logged, since clients see its effect only in their responses."""
    if flag is not None:
        return flag
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default")
    fmt = format_for_template(template if isinstance(template, str) else None)
    if fmt is not None:
        logger.info("tool calls are parsed as %s (from the chat template; --tool-call-parser overrides)", fmt.name)
    return fmt.name if fmt is not None else None


class ToolCallStream:
    """One streamed choice's content, minus whatever may be the start of a tool call.

    `feed(text)` takes the cumulative text and returns the content that is safe to send now:
    text from a marker on is held, and so is a tail that could still grow into one. At the end,
    the caller parses the whole text; what was held is either calls or the rest of the content.
    """

    def __init__(self, fmt: ToolCallFormat):
        self.fmt = fmt
        self.sent = 0  # characters of the text sent as content

    def feed(self, text: str) -> str:
        parts = self.fmt.split(text)
        safe = len(parts[0]) if parts is not None else len(text) - self.fmt.undecided_tail(text)
        if safe <= self.sent:
            return ""
        new, self.sent = text[self.sent : safe], safe
        return new
