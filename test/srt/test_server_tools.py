"""OpenAI tool calling through a real server and the official `openai` client, on a tiny
random-weight Qwen2 with a tool-capable chat template in Qwen2.5's format (so the server picks
the qwen25 parser from it). Random weights cannot choose to call a tool, so `required` and
named choices are checked through their grammar, and `auto` through a regex that makes the
model write a call in its own format."""

import json
import re

import jsonschema
import openai
import pytest
import requests
from conftest import ServerProcess
from transformers import AutoTokenizer

pytestmark = pytest.mark.slow  # a server process

# Qwen2.5's tool format: tools in the system turn, calls in <tool_call> blocks, results in a
# user turn of <tool_response> blocks.
TEMPLATE = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You are a helpful assistant.{% endif %}

# Tools

You may call one or more functions. Their signatures are in <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each call, return a JSON object with the function name and arguments in <tool_call></tool_call> tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' %}
{%- elif message.role == 'tool' %}
{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}<|im_start|>user{% endif %}
<tool_response>
{{ message.content }}
</tool_response>
{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}<|im_end|>
{% endif %}
{%- else %}<|im_start|>{{ message.role }}
{{ message.content }}
{%- for call in message.tool_calls or [] %}
<tool_call>
{"name": "{{ call.function.name }}", "arguments": {{ call.function.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_PARAMS},
    },
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two integers",
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer", "minimum": -999, "maximum": 999},
                    "b": {"type": "integer", "minimum": -999, "maximum": 999},
                },
                "required": ["a", "b"],
                "additionalProperties": False,
            },
        },
    },
]
PARAMS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
GREEDY = {"temperature": 0, "max_tokens": 96}


@pytest.fixture(scope="module")
def model_dir(make_tiny_model):
    return make_tiny_model("qwen2", seed=5)


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    template = tmp_path_factory.mktemp("template") / "qwen_tools.jinja"
    template.write_text(TEMPLATE)
    args = ["--model-path", str(model_dir), "--dtype", "float32", "--max-total-tokens", "8192"]
    # random weights loop on JSON whitespace when they may (see test_engine_grammar.py)
    proc = ServerProcess([*args, "--chat-template", str(template), "--constrained-json-disable-any-whitespace"])
    proc.template = TEMPLATE
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused")


def _check_calls(message, names=None):
    assert message.tool_calls, message
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        assert names is None or call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), PARAMS[call.function.name])
    assert len({call.id for call in message.tool_calls}) == len(message.tool_calls)


def test_parser_is_picked_from_the_template(server):
    info = requests.get(server.url + "/get_server_info", timeout=10).json()
    assert info["tool_call_parser"] == "qwen25"


def test_required_and_named_tool_choice_round_trip(client, server, model_dir):
    reply = client.chat.completions.create(
        model="default",
        messages=QUESTION,
        tools=TOOLS,
        tool_choice="required",
        parallel_tool_calls=False,  # a random model may otherwise add calls until max_tokens
        n=2,
        seed=1,
        temperature=1.0,
        max_tokens=96,
    )
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls" and choice.message.content is None, choice
        _check_calls(choice.message)
        assert len(choice.message.tool_calls) == 1

    named = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model="default", messages=QUESTION, tools=TOOLS, tool_choice=named, **GREEDY)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message, names={"get_weather"})
    assert len(choice.message.tool_calls) == 1

    # the call and its result go back in the history; the template renders both
    call = choice.message.tool_calls[0]
    history = QUESTION + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 21}'},
    ]
    final = client.chat.completions.create(model="default", messages=history, tools=TOOLS, tool_choice="none", **GREEDY)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rendered = tokenizer.apply_chat_template(
        [*QUESTION, {**history[1], "tool_calls": [_template_call(call)]}, history[2]],
        chat_template=server.template,
        tokenize=False,
        add_generation_prompt=True,
    )
    assert '<tool_response>\n{"temperature": 21}\n</tool_response>' in rendered
    assert f'"arguments": {call.function.arguments}' in rendered
    assert final.usage.prompt_tokens == len(tokenizer.encode(rendered, add_special_tokens=False))
    assert final.choices[0].message.tool_calls is None and final.choices[0].finish_reason in ("stop", "length")


def _template_call(call) -> dict:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.function.name, "arguments": json.loads(call.function.arguments)},
    }


def _streamed(client, **kwargs):
    """(content, {index: call}, finish_reason) assembled from a stream as OpenAI's SDK users do."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": None, "name": None, "arguments": ""})
                call["id"] = delta.id or call["id"]
                if delta.function is not None:
                    call["name"] = delta.function.name or call["name"]
                    call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, calls, finish


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_streamed_tool_calls_match_the_whole_response(client, tool_choice):
    args = dict(model="default", messages=QUESTION, tools=TOOLS, tool_choice=tool_choice, parallel_tool_calls=False)
    args.update(GREEDY)
    whole = client.chat.completions.create(**args).choices[0]
    content, calls, finish = _streamed(client, **args)
    assert finish == "tool_calls" == whole.finish_reason and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (t.function.name, json.loads(t.function.arguments)) for t in whole.message.tool_calls
    ]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_auto_parses_a_call_written_in_the_models_format(client):
    # a regex stands in for a model that decides to call: it writes Qwen2.5's format itself
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "celsius"}}\n</tool_call>'
    args = dict(model="default", messages=QUESTION, tools=TOOLS, **GREEDY)
    extra = {"regex": "Let me check\\.\n" + re.escape(call)}
    whole = client.chat.completions.create(**args, extra_body=extra).choices[0]
    assert whole.finish_reason == "tool_calls" and whole.message.content == "Let me check."
    (parsed,) = whole.message.tool_calls
    assert parsed.function.name == "get_weather"
    assert json.loads(parsed.function.arguments) == {"city": "Lyon", "unit": "celsius"}
    content, calls, finish = _streamed(client, **args, extra_body=extra)
    assert finish == "tool_calls" and content == "Let me check.\n"
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Lyon", "unit": "celsius"})
    ]

    # without a call the reply is plain content, streamed whole
    plain = client.chat.completions.create(**args, extra_body={"regex": "No <tool"}).choices[0]
    assert plain.message.content == "No <tool" and plain.message.tool_calls is None and plain.finish_reason == "stop"
    assert _streamed(client, **args, extra_body={"regex": "No <tool"}) == ("No <tool", {}, "stop")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice.function.name",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"messages": QUESTION + [{"role": "tool", "content": "21"}]},
            "messages[1].tool_call_id",
        ),
    ],
)
def test_bad_tool_requests_are_400s_naming_the_field(server, body, param):
    r = requests.post(server.url + "/v1/chat/completions", json={"messages": QUESTION, **body}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text
