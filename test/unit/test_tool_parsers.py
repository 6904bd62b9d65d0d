"""Tool calls: the chat formats' parsers, streamed content held back around a call's opening,
and what `tools` + `tool_choice` ask of the engine (no server)."""

import json

import jsonschema
import pytest
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest
from sglang.srt.entrypoints.openai.serving import OpenAIError
from sglang.srt.entrypoints.openai.tool_parsers import (
    TOOL_CALL_FORMATS,
    ParsedToolCall,
    ToolCallStream,
    format_for_template,
    tool_call_parser_for,
)
from sglang.srt.entrypoints.openai.tools import ToolChoiceStream, tool_plan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}
CALL = ParsedToolCall("get_weather", '{"city": "Paris"}')


@pytest.mark.parametrize(
    "parser, text, content, calls",
    [
        ("qwen25", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', None, [CALL]),
        (
            "qwen25",
            'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            "Let me check.",
            [CALL, ParsedToolCall("get_time", "{}")],
        ),
        # a call cut short by max_tokens keeps its (complete) JSON
        ("qwen25", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}', None, [CALL]),
        ("llama3", '{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL]),
        ("llama3", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', None, [CALL]),
        (
            "llama3",
            '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
            None,
            [CALL, ParsedToolCall("get_time", "{}")],
        ),
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]', None, [CALL]),
        ("mistral", 'Sure. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "Sure.", [CALL]),
        # arguments written as a JSON string are accepted
        ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}]', None, [CALL]),
    ],
)
def test_formats_parse_their_calls(parser, text, content, calls):
    got_content, got_calls = TOOL_CALL_FORMATS[parser].parse(text)
    assert got_calls == calls
    assert (got_content or None) == content


@pytest.mark.parametrize(
    "parser, text",
    [
        ("qwen25", "The weather is nice."),
        ("qwen25", "I would write <tool_call> here, but no."),  # a marker without a call is content
        ("qwen25", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par'),  # broken JSON
        ("qwen25", '<tool_call>{"name": "f", "arguments": {}}</tool_call> and then text'),
        ("llama3", "{not json"),
        ("llama3", '{"city": "Paris"}'),  # no name
        ("llama3", '{"name": "f", "parameters": [1, 2]}'),  # arguments not an object
        ("mistral", "[TOOL_CALLS] oops"),
    ],
)
def test_text_without_a_wellformed_call_is_all_content(parser, text):
    assert TOOL_CALL_FORMATS[parser].parse(text) == (text, [])


def test_every_parser_the_flag_offers_exists():
    from sglang.srt.server_args import TOOL_CALL_PARSERS

    assert TOOL_CALL_PARSERS == tuple(TOOL_CALL_FORMATS)


def test_formats_are_picked_from_the_chat_template_when_unambiguous():
    assert format_for_template("{{ '<tool_call>' }}{{ tool_call | tojson }}").name == "qwen25"
    assert format_for_template("{{ '[TOOL_CALLS]' }}").name == "mistral"
    assert format_for_template("<|start_header_id|>ipython<|end_header_id|>").name == "llama3"
    assert format_for_template("{{ messages }}") is None
    assert format_for_template("<tool_call> [TOOL_CALLS]") is None  # two formats: none is assumed
    assert tool_call_parser_for(None, {"default": "x", "tool_use": "<tool_call>"}) == "qwen25"
    assert tool_call_parser_for("mistral", "<tool_call>") == "mistral"  # the flag wins
    assert tool_call_parser_for(None, None) is None


def _stream(fmt_name: str, pieces: list[str]) -> str:
    stream, text, sent = ToolCallStream(TOOL_CALL_FORMATS[fmt_name]), "", ""
    for piece in pieces:
        text += piece
        sent += stream.feed(text)
    return sent


def test_streamed_content_stops_before_a_call_and_holds_a_possible_marker():
    pieces = ["Let", " me", " check", ".\n<tool", "_call>", '\n{"name": "get_weather"']
    assert _stream("qwen25", pieces) == "Let me check.\n"
    assert _stream("qwen25", ["Hello", " <to"]) == "Hello "  # "<to" may still open a call
    assert _stream("qwen25", ["Hello", " <to", "p>"]) == "Hello <top>"  # it did not
    assert _stream("llama3", ["  ", '{"na']) == ""  # leading whitespace, then a bare JSON call
    assert _stream("llama3", ["  ", "Hi"]) == "  Hi"
    assert _stream("mistral", ["Sure. [TOOL", "_CALLS] [{"]) == "Sure. "


def _request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "hi"}], **fields})


def test_tool_choice_defaults_and_what_each_asks_of_the_engine():
    qwen = TOOL_CALL_FORMATS["qwen25"]
    assert tool_plan(_request(), qwen).mode == "none"
    assert tool_plan(_request(tools=[WEATHER], tool_choice="none"), qwen).template_tools() is None
    auto = tool_plan(_request(tools=[WEATHER]), qwen)
    assert auto.mode == "auto" and auto.schema is None and auto.template_tools() == [WEATHER]

    named = tool_plan(
        _request(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}}), None
    )
    assert named.mode == "named" and json.loads(named.schema) == {"type": "object"}  # no parameters: any object
    assert named.parse('{"x": 1}') == (None, [ParsedToolCall("get_time", '{"x": 1}')])

    required = tool_plan(_request(tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False), None)
    schema = json.loads(required.schema)
    one_call = [{"name": "get_weather", "parameters": {"city": "Paris"}}]
    jsonschema.validate(one_call, schema)
    for bad in ([], one_call * 2, [{"name": "get_weather", "parameters": {}}], [{"name": "nope", "parameters": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    assert required.parse(json.dumps(one_call)) == (None, [CALL])
    assert required.parse('[{"name": "get_weather", "param') == ('[{"name": "get_weather", "param', [])


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
        (
            {"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
            "tool_choice",
        ),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                "tool_choice": "required",
            },
            "tools[0].function.parameters",
        ),
    ],
)
def test_tools_that_cannot_be_honoured_are_400s_naming_the_field(fields, param):
    with pytest.raises(OpenAIError) as info:
        tool_plan(_request(**fields), None)
    assert info.value.status_code == 400 and info.value.param == param


def test_streams_send_named_arguments_as_they_come_and_other_calls_whole():
    tools = [WEATHER]
    named = ToolChoiceStream(
        tool_plan(_request(tools=tools, tool_choice={"type": "function", "function": {"name": "get_weather"}}), None)
    )
    content, first = named.step('{"city"')
    assert content == "" and first[0]["function"] == {"name": "get_weather", "arguments": ""} and first[0]["id"]
    assert first[1] == {"index": 0, "function": {"arguments": '{"city"'}}
    assert named.step(': "Paris"}') == ("", [{"index": 0, "function": {"arguments": ': "Paris"}'}}])
    assert named.finish() == ("", [], True)

    auto = ToolChoiceStream(tool_plan(_request(tools=tools), TOOL_CALL_FORMATS["qwen25"]))
    sent = ""
    for piece in [
        "Checking",
        ".\n<tool_call>\n",
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        "\n</tool_call>",
    ]:
        content, calls = auto.step(piece)
        sent += content
        assert calls == []
    rest, calls, called = auto.finish()
    assert sent + rest == "Checking.\n" and called
    assert [(c["index"], c["function"]) for c in calls] == [
        (0, {"name": "get_weather", "arguments": '{"city": "Paris"}'})
    ]

    plain = ToolChoiceStream(tool_plan(_request(tools=tools), TOOL_CALL_FORMATS["qwen25"]))
    assert plain.step("Hello <to") == ("Hello ", [])
    assert plain.finish() == ("<to", [], False)


def test_a_marker_that_is_a_special_token_is_kept_for_the_parser(tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    mistral = tool_plan(_request(tools=[WEATHER]), TOOL_CALL_FORMATS["mistral"])
    assert mistral.sampling_params(tokenizer) == {}  # "[TOOL_CALLS]" is plain text to this tokenizer
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    ids = tokenizer.encode("[TOOL_CALLS] [", add_special_tokens=False)
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "["  # what it would lose
    assert mistral.sampling_params(tokenizer) == {"skip_special_tokens": False}
    assert tool_plan(_request(tools=[WEATHER]), TOOL_CALL_FORMATS["qwen25"]).sampling_params(tokenizer) == {}
