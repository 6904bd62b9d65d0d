"""POST /v1/completions: OpenAI's text completion API over `TokenizerManager.generate_request`.

`prompt` may be one prompt (a string or a list of token ids) or several (a list of either);
with `n` samples each, choice `i * n + j` is sample j of prompt i, as OpenAI numbers them and
as the engine indexes its flattened requests.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Optional, Union

from sglang.srt.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
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
from sglang.srt.managers.io_struct import GenerateReqInput

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


async def completions(
    tm: Any, request: CompletionRequest, wait_disconnected: Optional[Disconnected] = None
) -> Union[dict, AsyncIterator[bytes]]:
    """The response dict, or (with stream) an async iterator of SSE bytes. Raises OpenAIError."""
    check_model(tm, request.model)
    n = num_samples(request)
    if request.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if request.best_of is not None and request.best_of != n:
        raise bad_request(f"best_of must equal n ({n}) when given, got {request.best_of}", "best_of")
    inputs, prompts = _split_prompt(request.prompt)
    job = _Completion(tm, request, prompts)
    max_tokens = request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
    echo_logprobs = bool(request.echo) and request.logprobs is not None
    obj = GenerateReqInput(
        **inputs,
        sampling_params=sampling_params(request, max_tokens),
        rid=[f"{job.id}-{i}" for i in range(len(prompts))] if len(prompts) > 1 else job.id,
        return_logprob=request.logprobs is not None,
        # Echoed logprobs start at the prompt's first token.
        logprob_start_len=0 if echo_logprobs else None,
        top_logprobs_num=request.logprobs,
        return_text_in_logprobs=True,
        stream=bool(request.stream),
    )
    if request.stream:
        return await start_stream(tm, obj, job.stream_chunks, job.end_chunks)
    return job.response(await generate_all(tm, obj, len(prompts) * n, wait_disconnected))


def _split_prompt(prompt: Any) -> tuple[dict, list[Union[str, list[int]]]]:
    """The engine's input field ({"text": ...} or {"input_ids": ...}) and the prompts as a list."""
    if isinstance(prompt, str):
        return {"text": prompt}, [prompt]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if isinstance(prompt[0], str):
        return {"text": prompt}, prompt
    if isinstance(prompt[0], int):
        return {"input_ids": prompt}, [prompt]
    return {"input_ids": prompt}, prompt


class _Completion(ResponseBuilder):
    """One request's response assembly, for the whole result or chunk by chunk."""

    id_prefix = "cmpl"
    chunk_object = "text_completion"
    response_model = CompletionResponse

    def __init__(self, tm: Any, request: CompletionRequest, prompts: list):
        super().__init__(tm, request)
        self.request = request
        self.prompts = prompts
        self.with_logprobs = request.logprobs is not None
        self.text_offsets: dict[int, int] = {}  # per choice: where its next logprob token starts

    def _echo(self, index: int) -> str:
        if not self.request.echo:
            return ""
        prompt = self.prompts[index // self.n]
        return prompt if isinstance(prompt, str) else self.tm.tokenizer.decode(prompt)

    def _echo_logprobs(self, meta: dict) -> tuple[list, list]:
        if not (self.request.echo and self.with_logprobs):
            return [], []
        entries = meta.get("input_token_logprobs") or []
        return list(entries), _pad(meta.get("input_top_logprobs"), len(entries))

    def choice(self, index: int, result: dict, finish_reason: Optional[str], matched: Any) -> CompletionChoice:
        logprobs = None
        if self.with_logprobs:
            meta = result["meta_info"]
            entries, tops = self._echo_logprobs(meta)
            output = meta.get("output_token_logprobs") or []
            entries += output
            tops += _pad(meta.get("output_top_logprobs"), len(output))
            logprobs, _ = legacy_logprobs(self.tm, entries, tops, self.request.logprobs, 0)
        return CompletionChoice(
            index=index,
            text=self._echo(index) + result["text"],
            logprobs=logprobs,
            finish_reason=finish_reason,
            matched_stop=matched,
        )

    def stream_chunks(self, index: int, result: dict) -> list[dict]:
        step = self.tracker.step(index, result)
        if step is None:
            return []
        text, entries, tops = step.text, step.logprobs, step.top_logprobs
        if step.first:
            echo_entries, echo_tops = self._echo_logprobs(result["meta_info"])
            text, entries, tops = self._echo(index) + text, echo_entries + entries, echo_tops + tops
        chunks = []
        if text or (self.with_logprobs and entries):
            logprobs = None
            if self.with_logprobs:
                logprobs, self.text_offsets[index] = legacy_logprobs(
                    self.tm, entries, tops, self.request.logprobs, self.text_offsets.get(index, 0)
                )
            chunks.append(self.chunk(_stream_choice(index, text, logprobs)))
        if step.finish_reason is not None:
            chunks.append(self.chunk(_stream_choice(index, "", None, step.finish_reason, step.matched_stop)))
        return chunks


def _stream_choice(
    index: int,
    text: str,
    logprobs: Optional[CompletionLogprobs],
    finish_reason: Optional[str] = None,
    matched_stop: Any = None,
) -> dict:
    """A CompletionChoice as a dict, built directly: this runs once per streamed token."""
    return {
        "index": index,
        "text": text,
        "logprobs": None if logprobs is None else logprobs.model_dump(),
        "finish_reason": finish_reason,
        "matched_stop": matched_stop,
    }


def _pad(tops: Optional[list], length: int) -> list:
    tops = list(tops or [])[:length]
    return tops + [None] * (length - len(tops))


def legacy_logprobs(
    tm: Any, entries: list, tops: list, num_top: int, text_offset: int
) -> tuple[CompletionLogprobs, int]:
    """OpenAI's legacy logprobs for engine entries [logprob, token_id, text], and the offset
    after the last token. Each top_logprobs dict holds the top-k plus the sampled token, as
    OpenAI documents; a prompt's first token has None for both its logprob and its top dict."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for (logprob, token_id, text), top in zip(entries, tops):
        token = token_text(tm, token_id, text)
        tokens.append(token)
        token_logprobs.append(logprob)
        offsets.append(text_offset)
        text_offset += len(token)
        if logprob is None:
            top_logprobs.append(None)
            continue
        candidates: dict[str, float] = {}
        for top_logprob, top_id, top_text in (top or [])[:num_top]:
            candidates.setdefault(token_text(tm, top_id, top_text), top_logprob)
        candidates.setdefault(token, logprob)
        top_logprobs.append(candidates)
    logprobs = CompletionLogprobs(
        tokens=tokens, token_logprobs=token_logprobs, top_logprobs=top_logprobs, text_offset=offsets
    )
    return logprobs, text_offset
