"""The HTTP guards without a server: the body size limit (as raw ASGI), and a non-streaming
result collection that stops, closing the engine's stream, when the client leaves."""

from __future__ import annotations

import asyncio

import orjson
from sglang.srt.entrypoints.http_guards import BodyLimitMiddleware, is_json_content_type
from sglang.srt.entrypoints.openai.serving import collect


def _run_asgi(app, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[int, bytes, list]:
    """(status, body, what the inner app received) for one POST sent in `chunks`."""
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages.append({"type": "http.disconnect"})
    sent, seen = [], []

    async def receive():
        return messages.pop(0)

    async def send(message):
        sent.append(message)

    async def inner(scope, receive, send):
        seen.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    scope = {"type": "http", "method": "POST", "path": "/generate", "headers": headers}
    asyncio.run(app(inner)(scope, receive, send))
    status = sent[0]["status"]
    return status, b"".join(m.get("body", b"") for m in sent[1:]), seen


def _limited(max_bytes):
    return lambda inner: BodyLimitMiddleware(inner, max_bytes=max_bytes)


def test_body_over_the_limit_is_413_by_content_length_or_while_streaming():
    status, body, seen = _run_asgi(_limited(10), [(b"content-length", b"11")], [b"x" * 11])
    assert status == 413 and not seen
    error = orjson.loads(body)["error"]
    assert error["code"] == 413 and "--max-request-bytes" in error["message"]
    # chunked: no Content-Length, the limit is crossed by the third chunk
    status, _, seen = _run_asgi(_limited(10), [(b"transfer-encoding", b"chunked")], [b"xxxx"] * 3)
    assert status == 413 and not seen


def test_body_within_the_limit_reaches_the_app_whole():
    status, body, seen = _run_asgi(_limited(10), [(b"transfer-encoding", b"chunked")], [b"abc", b"defg"])
    assert status == 200 and body == b"ok"
    assert seen == [{"type": "http.request", "body": b"abcdefg", "more_body": False}]


def test_json_content_types():
    assert is_json_content_type("application/json; charset=utf-8")
    assert is_json_content_type("application/vnd.api+json")
    assert not is_json_content_type(None) and not is_json_content_type("text/plain")


def test_collect_stops_and_closes_the_stream_when_the_client_leaves():
    closed = []

    async def endless():
        try:
            while True:
                await asyncio.sleep(0.01)
                yield 1
        finally:
            closed.append(True)  # TokenizerManager.generate_request sends its aborts here

    async def leaves_soon():
        await asyncio.sleep(0.05)

    assert asyncio.run(collect(endless(), leaves_soon)) is None
    assert closed == [True]

    async def three():
        for i in range(3):
            yield i

    async def stays():
        await asyncio.sleep(60)

    assert asyncio.run(collect(three(), stays)) == [0, 1, 2]
