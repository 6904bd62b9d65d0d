"""What keeps one HTTP request from costing the server more than it should, and makes every
error answer in one shape.

- `BodyLimitMiddleware`: a body over --max-request-bytes is a 413, decided from Content-Length
  or while the body streams in, before anything parses it.
- `JSONRoute`: routes that take a pydantic body parse it with orjson (strict UTF-8, no lone
  surrogates, bounded nesting) and require a JSON Content-Type, so malformed bodies are 400s
  in the error shape rather than FastAPI's {"detail": ...} or a 500.
- `install_error_handlers`: 404, 405 and unexpected exceptions in the same shape, and the
  OpenAPI document lists the error responses routes really return (`ERROR_RESPONSES`).
- `dumps`: large responses are serialized off the event loop, so /health stays responsive.

The error shape is OpenAI's: {"error": {"message", "type", "param", "code"}}.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable, Optional

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sglang.srt.entrypoints.openai.protocol import ErrorResponse
from sglang.srt.entrypoints.openai.serving import OpenAIError
from sglang.srt.managers.io_struct import MAX_TOP_LOGPROBS_NUM


def error_json(status: int, message: str, err_type: Optional[str] = None, param: Optional[str] = None) -> Response:
    body = OpenAIError(status, message, type=err_type, param=param).body()
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _error_doc(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# For FastAPI's `responses=`: what a route may answer besides its success.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    400: _error_doc("Invalid request: malformed JSON, a wrong field type or value (`param` names the field)"),
    401: _error_doc("Missing or invalid API key (with --api-key)"),
    404: _error_doc("Not found"),
    405: _error_doc("Method not allowed"),
    413: _error_doc("Request body larger than --max-request-bytes"),
    503: _error_doc("A backend process has died, or the server is overloaded or shutting down"),
}
GENERATE_RESPONSES = {code: ERROR_RESPONSES[code] for code in (400, 401, 413, 503)}
INFO_RESPONSES = {401: ERROR_RESPONSES[401]}
PLAIN_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
# A route whose success is plain text (SGLang's): declared here rather than with
# response_class=PlainTextResponse, which would document the JSON errors as text too.
TEXT_OK = {200: {"description": "OK", **PLAIN_TEXT}}


def _json_body_doc(schema: dict) -> dict:
    """`openapi_extra` for a route that parses its JSON body itself."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


_STRINGS = {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}}
_TOKEN_IDS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_NULL = {"type": "null"}


def _given(name: str) -> dict:
    return {"required": [name], "properties": {name: {"not": _NULL}}}


# SGLang's GenerateReqInput: one prompt or a batch (text or input_ids), one sampling dict or one
# per prompt. The sampling parameters are checked by the engine (unknown names are a 400).
GENERATE_BODY_DOC = _json_body_doc(
    {
        "type": "object",
        "oneOf": [_given("text"), _given("input_ids")],
        "properties": {
            "text": {"anyOf": [{"type": "string", "minLength": 1}, _STRINGS, _NULL]},
            "input_ids": {"anyOf": [_TOKEN_IDS, {"type": "array", "minItems": 1, "items": _TOKEN_IDS}, _NULL]},
            "sampling_params": {
                "anyOf": [{"type": "object"}, {"type": "array", "items": {"type": "object"}}, _NULL],
                "description": "max_new_tokens, temperature, top_p, top_k, stop, ... (SGLang's names)",
            },
            "rid": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}, _NULL]},
            "stream": {"type": "boolean"},
            "return_logprob": {"type": "boolean"},
            "logprob_start_len": {"type": ["integer", "null"]},
            "top_logprobs_num": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS_NUM},
            "return_text_in_logprobs": {"type": "boolean"},
        },
    }
)
ABORT_BODY_DOC = _json_body_doc({"type": "object", "required": ["rid"], "properties": {"rid": {"type": "string"}}})


class BodyLimitMiddleware:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before any handler runs.

    The body is read here (every handler reads it whole anyway) and replayed to the app; after
    it, `receive` is the server's own, so disconnect detection keeps working.
    """

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _may_have_body(scope):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left while sending
                chunks = None
                first: Message = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            if not message.get("more_body", False):
                first = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return first
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = f"the request body is larger than the server's limit of {self.max_bytes} bytes (--max-request-bytes)"
        await error_json(413, message, "invalid_request_error")(scope, receive, send)


def _header(scope: Scope, name: bytes) -> Optional[bytes]:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value
    return None


def _content_length(scope: Scope) -> Optional[int]:
    value = _header(scope, b"content-length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _may_have_body(scope: Scope) -> bool:
    return _header(scope, b"transfer-encoding") is not None or (_content_length(scope) or 0) > 0


class _OrjsonRequest(Request):
    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            # orjson.JSONDecodeError is a json.JSONDecodeError: FastAPI reports it as json_invalid
            self._json = orjson.loads(await self.body())
        return self._json


class JSONRoute(APIRoute):
    """An APIRoute whose pydantic body must come as JSON, parsed by orjson."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def parse_json_then_handle(request: Request) -> Response:
            if not is_json_content_type(request.headers.get("content-type")):
                return error_json(400, "the request body must be JSON, sent with Content-Type: application/json")
            return await handler(_OrjsonRequest(request.scope, request.receive))

        return parse_json_then_handle


def is_json_content_type(value: Optional[str]) -> bool:
    media_type = (value or "").split(";", 1)[0].strip().lower()
    return media_type == "application/json" or (media_type.startswith("application/") and media_type.endswith("+json"))


def install_error_handlers(app: FastAPI) -> None:
    """404 / 405 / unexpected errors in the error shape; no undocumented 422 in /openapi.json."""

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("Allow", "")
            message = f"method {request.method} is not allowed for {request.url.path}; allowed: {allowed}"
        else:
            message = str(exc.detail)
        response = error_json(exc.status_code, message, _http_error_type(exc.status_code))
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(Exception)
    async def on_unexpected_error(request: Request, exc: Exception) -> Response:
        # Starlette logs the traceback once this response is sent
        return error_json(500, f"internal error: {type(exc).__name__}: {exc}", "server_error")

    original_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            _drop_validation_error_docs(original_openapi())
        return app.openapi_schema

    app.openapi = openapi


def _http_error_type(status: int) -> str:
    return "not_found_error" if status == 404 else "invalid_request_error" if status < 500 else "server_error"


def _drop_validation_error_docs(schema: dict) -> None:
    # FastAPI documents a 422 for every route with a body; this server answers 400 instead.
    for path in schema.get("paths", {}).values():
        for operation in path.values():
            operation.get("responses", {}).pop("422", None)
    schemas = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)


async def dumps(data: Any, large: bool) -> bytes:
    """orjson bytes of `data`; in a thread when the caller expects it `large` (results with
    logprobs: one entry per position and top candidate), so that serializing it does not hold
    the event loop, and with it /health and every stream, for its whole duration."""
    if large:
        return await asyncio.to_thread(orjson.dumps, data)
    return orjson.dumps(data)
