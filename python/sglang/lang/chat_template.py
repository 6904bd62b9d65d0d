"""Role text (`sgl.system/user/assistant`) from the model's chat template.

The server reports its chat template (`chat_template` in /get_model_info): the Hugging Face
Jinja template that its OpenAI chat endpoint applies. A program writes a conversation one
role at a time, so it needs, for a role and the messages before it, the text that goes
before the content and the text that goes after it. We get both by rendering the
template twice: the history alone, then the history plus the new message with a sentinel
as its content; the difference, split at the sentinel, is (prefix, suffix). Whatever the
template adds on its own (a default system prompt before the first user turn) lands in
the prefix, exactly where the template puts it.

`bos_token` renders empty: the server tokenizes /generate text with the tokenizer's special
tokens, so a template's BOS would be doubled. `eos_token` renders empty too (the server
does not report it); templates that close assistant turns with it lose that marker.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from typing import Optional

_SENTINEL = "\u2063sgl-role-content\u2063"


class ChatTemplate:
    """Base: `get_prefix_and_suffix(role, history)` and `stop_str` (added to every gen's stop)."""

    name = "base"
    stop_str: tuple[str, ...] = ()

    def get_prefix_and_suffix(self, role: str, history: list[dict]) -> tuple[str, str]:
        raise NotImplementedError


class FixedChatTemplate(ChatTemplate):
    """A template whose role text does not depend on the history."""

    def __init__(self, name: str, roles: dict[str, tuple[str, str]], stop_str: tuple[str, ...] = ()):
        self.name = name
        self.roles = roles
        self.stop_str = stop_str

    def get_prefix_and_suffix(self, role: str, history: list[dict]) -> tuple[str, str]:
        if role not in self.roles:
            raise ValueError(f"chat template {self.name!r} has no role {role!r}")
        return self.roles[role]


BUILTIN_TEMPLATES = {
    "default": FixedChatTemplate(
        "default",
        {
            "system": ("SYSTEM:", "\n"),
            "user": ("USER:", "\n"),
            "assistant": ("ASSISTANT:", "\n"),
        },
    ),
    "chatml": FixedChatTemplate(
        "chatml",
        {role: (f"<|im_start|>{role}\n", "<|im_end|>\n") for role in ("system", "user", "assistant")},
        stop_str=("<|im_end|>",),
    ),
}


def get_chat_template(name: str) -> ChatTemplate:
    if name not in BUILTIN_TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; built in: {', '.join(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[name]


class JinjaChatTemplate(ChatTemplate):
    """Role text derived from a Hugging Face Jinja chat template (see the module docstring)."""

    def __init__(self, source: str):
        self.name = "jinja"
        self.source = source
        self._template = _compile(source)
        # The assistant turn's closing text (e.g. "<|im_end|>") also stops a gen.
        try:
            _, suffix = self.get_prefix_and_suffix("assistant", [{"role": "user", "content": "hi"}])
        except ValueError:
            suffix = ""
        self.stop_str = (suffix.strip(),) if suffix.strip() else ()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        return self._template.render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token="", eos_token=""
        )

    def get_prefix_and_suffix(self, role: str, history: list[dict]) -> tuple[str, str]:
        return _split_role(self, role, tuple((m["role"], m["content"]) for m in history))

    def _delta(self, role: str, history: list[dict]) -> Optional[tuple[str, str]]:
        """(prefix, suffix) if the template renders `history + [role]` as an append to `history`."""
        before = self.render(history)
        after = self.render(history + [{"role": role, "content": _SENTINEL}])
        if not after.startswith(before) or after.count(_SENTINEL) != 1:
            return None
        prefix, suffix = after[len(before) :].split(_SENTINEL)
        return prefix, suffix


@functools.lru_cache(maxsize=256)
def _split_role(template: JinjaChatTemplate, role: str, history: tuple) -> tuple[str, str]:
    messages = [{"role": r, "content": c} for r, c in history]
    # The real history first; then a minimal one, for templates that render the whole
    # conversation differently as it grows or insist on alternating roles.
    minimal = [{"role": "user", "content": "hi"}] if role == "assistant" else []
    errors = []
    for candidate in (messages, minimal):
        try:
            found = template._delta(role, candidate)
        except Exception as exc:  # the template's raise_exception, or any Jinja error
            errors.append(str(exc))
            continue
        if found is not None:
            return found
    detail = f": {errors[-1]}" if errors else ""
    raise ValueError(
        f"the server's chat template cannot write a {role!r} message{detail}; "
        "use RuntimeEndpoint(url, chat_template_name='default') or start the server with --chat-template"
    )


def _compile(source: str):
    try:
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError as exc:  # pragma: no cover - jinja2 is a dependency
        raise ImportError("rendering chat templates needs jinja2: pip install jinja2") from exc

    def raise_exception(message: str):
        raise ValueError(message)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    # The same environment settings Hugging Face tokenizers render templates with.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.filters["tojson"] = tojson  # not Jinja's own, which escapes HTML characters
    return env.from_string(source)


def chat_template_for(model_info: dict, name: Optional[str] = None) -> ChatTemplate:
    """The template a RuntimeEndpoint uses: the named built-in, else the server's, else 'default'."""
    if name is not None:
        return get_chat_template(name)
    source = model_info.get("chat_template")
    if not source:
        return BUILTIN_TEMPLATES["default"]
    return JinjaChatTemplate(source)
