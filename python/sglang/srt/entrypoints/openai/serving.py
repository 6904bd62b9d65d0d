"""What the OpenAI-compatible handlers share: errors, /v1/models, sampling parameters, usage,
and the server-sent-event stream.

Data flow of one request: the HTTP server validates the body into a `protocol` model and
calls `completions` / `chat_completions` (serving_completions.py, serving_chat.py). The
handler checks what pydantic cannot, builds a `GenerateReqInput` (SGLang's sampling parameter
names) and runs `TokenizerManager.generate_request`, which yields `(index, result)` with
cumulative text. A non-streaming call returns the response dict; a streaming call returns an
async iterator of SSE bytes that turns those cumulative results into OpenAI deltas. Every
failure is an `OpenAIError`, which the server renders with `error.status_code` and
`error.body()`; a failure after the stream started becomes one error event before `[DONE]`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable, Optional

import orjson

from sglang.srt.entrypoints.openai.protocol import (
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    SamplingRequest,
    UsageInfo,
)
from sglang.srt.managers.io_struct import GenerateReqInput
from sglang.srt.managers.tokenizer_manager import Overloaded

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}

SSE_DONE = b"data: [DONE]\n\n"


class OpenAIError(Exception):
    """A failed request, rendered as OpenAI's {"error": {...}} with `status_code`."""

    def __init__(self, status_code: int, message: str, type: Optional[str] = None, param: Optional[str] = None):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type or _ERROR_TYPES.get(status_code, "server_error")
        self.param = param

    def body(self) -> dict:
        info = ErrorInfo(message=self.message, type=self.type, param=self.param, code=self.status_code)
        return ErrorResponse(error=info).model_dump()


def bad_request(message: str, param: Optional[str] = None) -> OpenAIError:
    return OpenAIError(400, message, param=param)


def engine_rejected(exc: ValueError) -> OpenAIError:
    # The engine's RequestError names the field; its other ValueErrors name it in the message.
    return bad_request(str(exc), getattr(exc, "param", None))


def backend_unavailable(exc: RuntimeError) -> OpenAIError:
    # TokenizerManager raises RuntimeError when a backend process has died.
    return OpenAIError(503, str(exc), type="service_unavailable")


def validation_error_response(exc: Any) -> tuple[int, dict]:
    """(400, body) for a pydantic ValidationError or FastAPI's RequestValidationError.

    The message names each failing field by its path (`messages[0].content: ...`); `param` is
    the first one.
    """
    problems, first_path = [], None
    for error in exc.errors()[:3]:
        loc = list(error.get("loc", ()))
        if loc and loc[0] == "body":  # FastAPI prefixes where the value came from
            loc = loc[1:]
        if error.get("type") == "json_invalid":
            problems.append(f"the body is not valid JSON: {error.get('ctx', {}).get('error', error.get('msg'))}")
            continue
        path = _field_path(loc)
        first_path = first_path or path
        message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
        if not path:  # the body itself: missing, or not an object
            message = "the request body must be a JSON object"
        problems.append(f"{path}: {message}" if path else message)
    return 400, OpenAIError(400, "; ".join(problems) or "invalid request", param=first_path).body()


def _field_path(loc: list) -> Optional[str]:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


# ---- /v1/models ------------------------------------------------------------------------------


def _model_card(tm: Any) -> ModelCard:
    return ModelCard(
        id=tm.served_model_name,
        created=int(time.time()),
        root=getattr(tm, "model_path", None),
        max_model_len=tm.context_len,
    )


def models_list(tm: Any) -> dict:
    return ModelList(data=[_model_card(tm)]).model_dump()


def model_card(tm: Any, model_id: str) -> dict:
    """GET /v1/models/{model_id}; the route must accept slashes (`{model_id:path}`)."""
    if not model_id or not is_served_model(tm, model_id):
        raise OpenAIError(404, f"The model {model_id!r} does not exist", param="model")
    return _model_card(tm).model_dump()


def is_served_model(tm: Any, name: str) -> bool:
    # "default" names the one served model, as in SGLang's own examples.
    return name in (tm.served_model_name, getattr(tm, "model_path", None), "default")


def check_model(tm: Any, name: Optional[str]) -> None:
    # A missing model is accepted (one model is served); a wrong one is a 404, as OpenAI does.
    if name and not is_served_model(tm, name):
        raise OpenAIError(404, f"The model {name!r} does not exist", param="model")


# ---- request conversion ----------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sampling_params(request: SamplingRequest, max_new_tokens: int) -> dict[str, Any]:
    """The engine's sampling_params dict; fields the client left unset are left out."""
    params = {
        "max_new_tokens": max_new_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "n": request.n,
        "stop": request.stop,
        "sampling_seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "logit_bias": request.logit_bias,
        "top_k": request.top_k,
        "min_p": request.min_p,
        "repetition_penalty": request.repetition_penalty,
        "min_new_tokens": request.min_tokens,
        "ignore_eos": request.ignore_eos,
        "stop_token_ids": request.stop_token_ids,
        "skip_special_tokens": request.skip_special_tokens,
        "no_stop_trim": request.no_stop_trim,
        "regex": request.regex,
        "json_schema": request.json_schema,
        "ebnf": request.ebnf,
    }
    if request.top_p == 0:
        # OpenAI accepts top_p=0 and means "only the most likely token"; the engine wants
        # top_p in (0, 1], so say it the engine's way.
        params["top_p"] = None
        params["top_k"] = 1
    return {key: value for key, value in params.items() if value is not None}


def num_samples(request: SamplingRequest) -> int:
    return request.n or 1


# ---- results ---------------------------------------------------------------------------------


def finish_reason_of(meta: dict) -> tuple[Optional[str], Any]:
    """(OpenAI finish_reason, matched_stop) from the engine's meta_info.

    An aborted request that produced nothing is an error; one with output ends with "abort",
    as SGLang's server answers.
    """
    reason = meta.get("finish_reason")
    if reason is None:
        return None, None
    kind = reason.get("type")
    if kind == "abort":
        if not meta.get("completion_tokens"):
            status = reason.get("status_code") or 500
            raise OpenAIError(status, reason.get("message") or "the request was aborted")
        return "abort", None
    if kind == "stop":
        return "stop", reason.get("matched")
    return kind, None


@dataclass
class UsageCounter:
    """Token counts over all choices; a prompt counts once however many samples it has."""

    n: int
    prompt_tokens: dict[int, int] = field(default_factory=dict)
    cached_tokens: dict[int, int] = field(default_factory=dict)
    completion_tokens: dict[int, int] = field(default_factory=dict)

    def record(self, index: int, meta: dict) -> None:
        prompt = index // self.n
        self.prompt_tokens[prompt] = meta.get("prompt_tokens", 0)
        cached = meta.get("cached_tokens") or 0
        self.cached_tokens[prompt] = max(self.cached_tokens.get(prompt, 0), cached)
        self.completion_tokens[index] = meta.get("completion_tokens", 0)

    def usage(self) -> UsageInfo:
        prompt, completion = sum(self.prompt_tokens.values()), sum(self.completion_tokens.values())
        return UsageInfo(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )


async def generate_all(
    tm: Any, obj: GenerateReqInput, num_choices: int, wait_disconnected: Optional[Disconnected] = None
) -> list[dict]:
    """Runs a non-streaming request; the final result of every choice, by index."""
    results: list[Optional[dict]] = [None] * num_choices
    try:
        items = await collect(tm.generate_request(obj), wait_disconnected)
    except ValueError as e:
        raise engine_rejected(e) from e
    except Overloaded:
        raise  # the server answers 503 with Retry-After
    except RuntimeError as e:
        raise backend_unavailable(e) from e
    if items is None:
        raise ClientGone()
    for index, result in items:
        results[index] = result
    if any(r is None for r in results):
        raise OpenAIError(500, "the engine returned fewer results than requested")
    return results  # type: ignore[return-value]


# Returns once the client has gone (see `client_gone`).
Disconnected = Callable[[], Awaitable[Any]]


class ClientGone(Exception):
    """The client of a non-streaming request disconnected; its requests were aborted."""


async def client_gone(receive: Callable[[], Awaitable[dict]]) -> None:
    """Returns when the ASGI connection reports the client gone; call it once the body is read
    (then a disconnect is all that can arrive). Starlette's Request.is_disconnected() cannot
    be used here: behind a BaseHTTPMiddleware its non-blocking check never sees the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect(results: AsyncIterator, wait_disconnected: Optional[Disconnected] = None) -> Optional[list]:
    """Every item of `results`, or None when `wait_disconnected()` returns first: the iteration
    is then cancelled, and TokenizerManager.generate_request aborts the requests it still runs
    (as a streaming response does when its consumer is closed)."""

    async def drain() -> list:
        return [item async for item in results]

    if wait_disconnected is None:
        return await drain()
    work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(wait_disconnected())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        return work.result() if work.done() else None
    finally:
        for task in (work, watch):
            task.cancel()
        await asyncio.gather(work, watch, return_exceptions=True)


def token_text(tm: Any, token_id: int, text: Optional[str]) -> str:
    """A logprob entry's token as text (the engine sends it with return_text_in_logprobs)."""
    return text if text is not None else tm.tokenizer.decode([token_id])


# ---- streaming -------------------------------------------------------------------------------


def sse(payload: dict) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


@dataclass
class ChoiceProgress:
    """What a stream has already sent of one choice."""

    text_len: int = 0
    num_logprobs: int = 0
    started: bool = False
    finished: bool = False


@dataclass
class Step:
    """What is new in one choice since the last event."""

    first: bool
    text: str
    logprobs: list  # new output [logprob, token_id, text] entries
    top_logprobs: list  # their top-k lists (None where the engine had none)
    finish_reason: Optional[str]
    matched_stop: Any


class StreamTracker:
    """Turns the engine's cumulative results into per-choice deltas, and counts usage."""

    def __init__(self, n: int):
        self.choices: dict[int, ChoiceProgress] = {}
        self.usage = UsageCounter(n)

    def step(self, index: int, result: dict) -> Optional[Step]:
        """The news in `result`, or None for a choice that already finished."""
        progress = self.choices.setdefault(index, ChoiceProgress())
        if progress.finished:
            return None
        meta = result["meta_info"]
        self.usage.record(index, meta)
        finish_reason, matched = finish_reason_of(meta)
        text = result.get("text", "")
        logprobs = meta.get("output_token_logprobs") or []
        tops = meta.get("output_top_logprobs") or []
        new_logprobs = logprobs[progress.num_logprobs :]
        new_tops = list(tops[progress.num_logprobs : len(logprobs)])
        new_tops += [None] * (len(new_logprobs) - len(new_tops))
        step = Step(
            first=not progress.started,
            text=text[progress.text_len :],
            logprobs=new_logprobs,
            top_logprobs=new_tops,
            finish_reason=finish_reason,
            matched_stop=matched,
        )
        progress.started = True
        progress.text_len = max(progress.text_len, len(text))
        progress.num_logprobs = len(logprobs)
        progress.finished = finish_reason is not None
        return step


class ResponseBuilder:
    """Per-request state shared by the completion and chat response builders: ids, the stream's
    progress and usage, and the chunk envelope."""

    id_prefix = "cmpl"
    chunk_object = "text_completion"  # the "object" of a stream chunk
    response_model: type  # CompletionResponse or ChatCompletionResponse

    def __init__(self, tm: Any, request: SamplingRequest):
        self.tm = tm
        self.n = num_samples(request)
        self.id = new_id(self.id_prefix)
        self.created = int(time.time())
        self.tracker = StreamTracker(self.n)
        options = request.stream_options
        self.include_usage = bool(options and options.include_usage)
        self.continuous_usage = self.include_usage and bool(options.continuous_usage_stats)

    def chunk(self, choice: Optional[dict]) -> dict:
        """A chunk with one choice, or (choice None) the final usage chunk, which has none.

        Stream chunks are built as plain dicts, once per token per request: the protocol's
        chunk models (CompletionStreamResponse, ChatCompletionChunk) give their shape, and the
        unit tests check every chunk against them.
        """
        chunk = {
            "id": self.id,
            "object": self.chunk_object,
            "created": self.created,
            "model": self.tm.served_model_name,
            "choices": [] if choice is None else [choice],
        }
        # OpenAI sends "usage" only to clients that asked for it, null until the last chunk.
        if self.include_usage:
            usage = choice is None or self.continuous_usage
            chunk["usage"] = self.tracker.usage.usage().model_dump() if usage else None
        return chunk

    def response(self, results: list[dict]) -> dict:
        """The non-streaming response: one choice per result, usage counted once per prompt."""
        usage = UsageCounter(self.n)
        choices = []
        for index, result in enumerate(results):
            meta = result["meta_info"]
            usage.record(index, meta)
            finish_reason, matched = finish_reason_of(meta)
            choices.append(self.choice(index, result, finish_reason, matched))
        return self.response_model(
            id=self.id, created=self.created, model=self.tm.served_model_name, choices=choices, usage=usage.usage()
        ).model_dump()

    def choice(self, index: int, result: dict, finish_reason: Optional[str], matched: Any) -> Any:
        raise NotImplementedError

    def end_chunks(self) -> list[dict]:
        return [self.chunk(None)] if self.include_usage else []


async def start_stream(
    tm: Any,
    obj: GenerateReqInput,
    on_result: Callable[[int, dict], Iterable[dict]],
    on_end: Callable[[], Iterable[dict]],
) -> AsyncIterator[bytes]:
    """Starts generating and returns the SSE byte stream.

    The first result is awaited here, before any byte is sent, so that a request the engine
    rejects is still a plain 400 response rather than an error event in a 200 stream.
    `on_result(index, result)` gives the chunks for one engine result; `on_end()` the chunks
    after the last one (the usage chunk).
    """
    results = tm.generate_request(obj).__aiter__()
    try:
        first: Optional[tuple[int, dict]] = await results.__anext__()
    except StopAsyncIteration:
        first = None
    except ValueError as e:
        raise engine_rejected(e) from e
    except Overloaded:
        raise  # the server answers 503 with Retry-After
    except RuntimeError as e:
        raise backend_unavailable(e) from e
    return _events(results, first, on_result, on_end)


async def _events(results, first, on_result, on_end) -> AsyncIterator[bytes]:
    try:
        error: Optional[OpenAIError] = None
        try:
            if first is not None:
                for chunk in on_result(*first):
                    yield sse(chunk)
                async for index, result in results:
                    for chunk in on_result(index, result):
                        yield sse(chunk)
            for chunk in on_end():
                yield sse(chunk)
        except OpenAIError as e:
            error = e
        except ValueError as e:
            error = bad_request(str(e))
        except RuntimeError as e:
            error = backend_unavailable(e)
        except Exception as e:  # the stream has started: report it in-band, then end it
            logger.exception("error in an OpenAI stream")
            error = OpenAIError(500, f"internal error: {e}")
        if error is not None:
            yield sse(error.body())
        yield SSE_DONE
    finally:
        # On a client disconnect this aborts the requests still running.
        aclose = getattr(results, "aclose", None)
        if aclose is not None:
            await aclose()
