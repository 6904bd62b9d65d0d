"""RuntimeEndpoint: a backend that talks to a running server over its native HTTP API.

Every call is one request to `/generate` (or `/get_model_info`, `/flush_cache`,
`/get_server_info`) with a timeout; failures raise `ServerError` with the URL and the
server's message. The request shapes are those of SGLang's own frontend
(see the project's notes on the native API), so this backend also works against SGLang.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from sglang.lang import http_client
from sglang.lang.backend.base_backend import BaseBackend
from sglang.lang.chat_template import ChatTemplate, chat_template_for
from sglang.lang.choices import ChoicesDecision, ChoicesSamplingMethod, mean_logprob
from sglang.lang.ir import SglSamplingParams

# Seconds a call may wait for the next byte from the server: a generous bound on one
# generation on a slow CPU, so that nothing ever waits forever.
DEFAULT_TIMEOUT = 600.0
# select() scores each choice from this many prompt tokens before it: room for the prompt's
# last tokens to merge with the choice when the two are tokenized together.
_SELECT_LOOKBACK = 3


class RuntimeEndpoint(BaseBackend):
    def __init__(
        self,
        base_url: str,
        api_key: Optional[str] = None,
        verify: Any = None,
        chat_template_name: Optional[str] = None,
        timeout: float = DEFAULT_TIMEOUT,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._http = {"api_key": api_key, "timeout": timeout, "ssl_context": http_client.ssl_context_for(verify)}
        self.model_info: dict = self._call("/get_model_info")
        self.chat_template: ChatTemplate = chat_template_for(self.model_info, chat_template_name)

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.base_url!r})"

    def get_model_name(self) -> str:
        return self.model_info["model_path"]

    def get_chat_template(self) -> ChatTemplate:
        return self.chat_template

    def flush_cache(self) -> bool:
        self._call("/flush_cache", method="POST")
        return True

    def get_server_info(self) -> dict:
        return self._call("/get_server_info")

    def cache_prefix(self, prefix: str) -> None:
        self._call("/generate", {"text": prefix, "sampling_params": {"max_new_tokens": 0}})

    def generate(self, s: Any, sampling_params: SglSamplingParams) -> tuple[str, dict]:
        out = self._call("/generate", _generate_body(s.text_, sampling_params))
        return out["text"], out["meta_info"]

    def generate_stream(self, s: Any, sampling_params: SglSamplingParams) -> Iterator[tuple[str, dict]]:
        body = {**_generate_body(s.text_, sampling_params), "stream": True}
        seen = 0  # the server streams the cumulative text
        for event in http_client.stream_events(self.base_url + "/generate", body, **self._http):
            text = event["text"]
            yield text[seen:], event["meta_info"]
            seen = len(text)

    def select(
        self, s: Any, choices: list[str], temperature: float, choices_method: ChoicesSamplingMethod
    ) -> ChoicesDecision:
        """Score each choice by the server's logprobs of its tokens after the text so far.

        1. Prefill the text alone: its token count P (and its KV, cached for step 2).
        2. One batch, `max_new_tokens: 0`, input logprobs from position P - lookback: the
           text + each choice, and the text alone. A choice's tokens are those where its
           token ids part from the text's own, so a choice that merges with the text's
           last token is scored on the merged token (and not on a token of the prompt).
        3. Only for methods that need it: the logprobs of each choice's tokens alone.
        """
        if temperature > 1e-5:
            raise ValueError(f"select picks the most likely choice; temperature must be 0, got {temperature}")
        text = s.text_
        if not text:
            raise ValueError("select needs some text before it: the choices are scored as its continuations")
        prefill = self._call("/generate", {"text": text, "sampling_params": {"max_new_tokens": 0}})
        start = max(prefill["meta_info"]["prompt_tokens"] - _SELECT_LOOKBACK, 0)
        outs = self._call_batch(
            {
                "text": [text + c for c in choices] + [text],
                "sampling_params": {"max_new_tokens": 0, "temperature": 0},
                "return_logprob": True,
                "return_text_in_logprobs": True,
                "logprob_start_len": start,
            }
        )
        *scored, alone = outs
        prompt_ids = [e[1] for e in alone["meta_info"]["input_token_logprobs"]]
        input_token_logprobs = []
        for out in scored:
            entries = out["meta_info"]["input_token_logprobs"]
            input_token_logprobs.append(entries[_first_difference(prompt_ids, [e[1] for e in entries]) :])
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            outs = self._call_batch(
                {
                    "input_ids": [[e[1] for e in entries] for entries in input_token_logprobs],
                    "sampling_params": {"max_new_tokens": 0},
                    "return_logprob": True,
                    "logprob_start_len": 0,
                }
            )
            unconditional = [o["meta_info"]["input_token_logprobs"] for o in outs]
        return choices_method(
            choices=choices,
            normalized_prompt_logprobs=[mean_logprob(e) for e in input_token_logprobs],
            input_token_logprobs=input_token_logprobs,
            output_token_logprobs=[o["meta_info"]["output_token_logprobs"] for o in scored],
            unconditional_token_logprobs=unconditional,
        )

    def _call(self, path: str, body: Optional[dict] = None, method: Optional[str] = None) -> Any:
        return http_client.request(self.base_url + path, body, method=method, **self._http)

    def _call_batch(self, body: dict) -> list:
        out = self._call("/generate", body)
        return out if isinstance(out, list) else [out]


def _generate_body(text: str, params: SglSamplingParams) -> dict:
    return {"text": text, "sampling_params": params.to_srt_kwargs(), **params.logprob_fields()}


def _first_difference(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))
