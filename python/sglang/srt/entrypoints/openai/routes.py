"""Mounts the OpenAI-compatible endpoints on the server's FastAPI app."""

from __future__ import annotations

import time

from fastapi import FastAPI

from sglang.srt.managers.tokenizer_manager import TokenizerManager


def mount_openai_routes(app: FastAPI, tm: TokenizerManager) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": tm.served_model_name, "object": "model", "created": created, "owned_by": "sglang"}]}
