"""Mounts the OpenAI-compatible endpoints (/v1/...) on the server's FastAPI app."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

from sglang.srt.entrypoints.openai.protocol import ChatCompletionRequest, CompletionRequest
from sglang.srt.entrypoints.openai.serving import OpenAIError, model_card, models_list
from sglang.srt.entrypoints.openai.serving_chat import chat_completions
from sglang.srt.entrypoints.openai.serving_completions import completions
from sglang.srt.managers.tokenizer_manager import TokenizerManager


def _respond(result: Any) -> Response:
    if isinstance(result, dict):
        return Response(orjson.dumps(result), media_type="application/json")
    return StreamingResponse(result, media_type="text/event-stream")


def _error(exc: OpenAIError) -> Response:
    return Response(orjson.dumps(exc.body()), status_code=exc.status_code, media_type="application/json")


async def _serve(handler: Any, tm: TokenizerManager, request: Any) -> Response:
    try:
        return _respond(await handler(tm, request))
    except OpenAIError as exc:
        return _error(exc)


def mount_openai_routes(app: FastAPI, tm: TokenizerManager) -> None:
    @app.get("/v1/models")
    async def list_models() -> Response:
        return _respond(models_list(tm))

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> Response:
        try:
            return _respond(model_card(tm, model_id))
        except OpenAIError as exc:
            return _error(exc)

    @app.post("/v1/completions")
    async def v1_completions(request: CompletionRequest) -> Response:
        return await _serve(completions, tm, request)

    @app.post("/v1/chat/completions")
    async def v1_chat_completions(request: ChatCompletionRequest) -> Response:
        return await _serve(chat_completions, tm, request)
