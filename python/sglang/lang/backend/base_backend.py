"""What the interpreter needs from a backend: generation, selection, prefix caching."""

from __future__ import annotations

from typing import Any, Iterator

from sglang.lang.chat_template import ChatTemplate, get_chat_template
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from sglang.lang.ir import SglSamplingParams


class BaseBackend:
    """A backend turns an executor's text so far (`s.text_`) into generated text.

    `s` is the StreamExecutor asking; backends read only `s.text_` from it.
    """

    def get_chat_template(self) -> ChatTemplate:
        return get_chat_template("default")

    def generate(self, s: Any, sampling_params: SglSamplingParams) -> tuple[str, dict]:
        """The generated text and its meta info."""
        raise NotImplementedError

    def generate_stream(self, s: Any, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        """(new text, meta info so far) pieces as they are generated."""
        raise NotImplementedError

    def select(
        self, s: Any, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        raise NotImplementedError

    def cache_prefix(self, prefix: str) -> None:
        """Ask the server to compute and keep the KV cache of `prefix` (an optimization)."""

    def flush_cache(self) -> bool:
        raise NotImplementedError

    def get_server_info(self) -> dict:
        raise NotImplementedError
