"""Mounts the OpenAI-compatible endpoints (/v1/...) on the server's FastAPI app."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from sglang.srt.entrypoints.http_guards import ERROR_RESPONSES, GENERATE_RESPONSES, dumps
from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sglang.srt.entrypoints.openai.serving import ClientGone, OpenAIError, client_gone, model_card, models_list
from sglang.srt.entrypoints.openai.serving_chat import chat_completions
from sglang.srt.entrypoints.openai.serving_completions import completions
from sglang.srt.managers.tokenizer_manager import TokenizerManager

_MODEL_RESPONSES = {code: ERROR_RESPONSES[code] for code in (401, 404)}


async def _respond(result: Any, large: bool = False) -> Response:
    if isinstance(result, dict):
        return Response(await dumps(result, large), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream")


def _error(exc: OpenAIError) -> Response:
    return Response(orjson.dumps(exc.body()), status_code=exc.status_code, media_type="application/json")


async def _serve(handler: Any, tm: TokenizerManager, body: Any, request: Request) -> Response:
    try:
        result = await handler(tm, body, lambda: client_gone(request.receive))
    except OpenAIError as exc:
        return _error(exc)
    except ClientGone:
        return Response(status_code=499)  # nobody reads it: the client closed the connection
    # logprobs (an int for completions, where 0 still asks for them) make responses large
    return await _respond(result, large=body.logprobs not in (None, False))


def mount_openai_routes(app: FastAPI, tm: TokenizerManager) -> None:
    @app.get("/v1/models", responses={401: ERROR_RESPONSES[401]})
    async def list_models() -> Response:
        return await _respond(models_list(tm))

    @app.get("/v1/models/{model_id:path}", responses=_MODEL_RESPONSES)
    async def get_model(model_id: str) -> Response:
        try:
            return await _respond(model_card(tm, model_id))
        except OpenAIError as exc:
            return _error(exc)

    @app.post("/v1/completions", responses={**GENERATE_RESPONSES, 404: ERROR_RESPONSES[404]})
    async def v1_completions(body: CompletionRequest, request: Request) -> Response:
        return await _serve(completions, tm, body, request)

    @app.post("/v1/chat/completions", responses={**GENERATE_RESPONSES, 404: ERROR_RESPONSES[404]})
    async def v1_chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await _serve(chat_completions, tm, body, request)
