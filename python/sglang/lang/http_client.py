"""The frontend's HTTP calls: JSON requests and Server-Sent-Event streams over urllib.

Standard library only, so `import sglang` and the frontend stay light. Every call has a
timeout (seconds between bytes, so a stream that stalls fails too), and every failure is a
`ServerError` naming the URL and what the server said.
"""

from __future__ import annotations

import json
import socket
import ssl
import urllib.error
import urllib.request
from typing import Any, Iterator, Optional


class ServerError(RuntimeError):
    """A request to the server failed: unreachable, timed out, or answered an error."""

    def __init__(self, url: str, message: str, status: Optional[int] = None):
        self.url = url
        self.status = status
        self.message = message
        where = f"{url} answered {status}" if status is not None else f"{url} failed"
        super().__init__(f"{where}: {message}")


def request(
    url: str,
    body: Optional[dict] = None,
    *,
    method: Optional[str] = None,
    api_key: Optional[str] = None,
    timeout: float,
    ssl_context: Optional[ssl.SSLContext] = None,
) -> Any:
    """One call; returns the decoded JSON answer (or the text when it is not JSON)."""
    with _open(url, body, method, api_key, timeout, ssl_context) as resp:
        raw = _read(url, resp)
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return raw.decode("utf-8", "replace")


def stream_events(
    url: str, body: dict, *, api_key: Optional[str] = None, timeout: float, ssl_context: Optional[ssl.SSLContext] = None
) -> Iterator[dict]:
    """POST `body` and yield each `data: {...}` event until `data: [DONE]`.

    An `{"error": ...}` event (the server failed after the stream started) raises.
    """
    with _open(url, body, "POST", api_key, timeout, ssl_context) as resp:
        while True:
            try:
                line = resp.readline()
            except (OSError, socket.timeout) as exc:
                raise ServerError(url, f"stream interrupted: {exc}") from exc
            if not line:
                raise ServerError(url, "the stream ended without 'data: [DONE]'")
            line = line.decode("utf-8").rstrip("\r\n")
            if not line.startswith("data:"):
                continue  # blank separators; SSE comments
            payload = line[5:].strip()
            if payload == "[DONE]":
                return
            event = json.loads(payload)
            if isinstance(event, dict) and "error" in event:
                raise ServerError(url, _error_message(event))
            yield event


def ssl_context_for(verify: Any) -> Optional[ssl.SSLContext]:
    """`verify` as in requests: None/True (default checks), False (no checks), or a CA bundle path."""
    if verify is None or verify is True:
        return None
    if verify is False:
        return ssl._create_unverified_context()
    return ssl.create_default_context(cafile=verify)


def _open(
    url: str,
    body: Optional[dict],
    method: Optional[str],
    api_key: Optional[str],
    timeout: float,
    ssl_context: Optional[ssl.SSLContext],
):
    data = None if body is None else json.dumps(body).encode("utf-8")
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json; charset=utf-8"
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    req = urllib.request.Request(url, data=data, headers=headers, method=method or ("GET" if data is None else "POST"))
    try:
        return urllib.request.urlopen(req, timeout=timeout, context=ssl_context)
    except urllib.error.HTTPError as exc:
        raw = _read(url, exc)
        raise ServerError(url, _error_message(_decode(raw)), exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, (socket.timeout, TimeoutError)):
            raise ServerError(url, f"no answer within {timeout:g} s") from exc
        raise ServerError(url, f"cannot reach the server ({reason})") from exc


def _read(url: str, resp) -> bytes:
    try:
        return resp.read()
    except (OSError, socket.timeout) as exc:
        raise ServerError(url, f"reading the answer failed: {exc}") from exc


def _decode(raw: bytes) -> Any:
    text = raw.decode("utf-8", "replace")
    try:
        return json.loads(text)
    except ValueError:
        return text.strip()


def _error_message(content: Any) -> str:
    """The server's own words: `{"error": {"message": ...}}` (native and OpenAI), else the body."""
    if isinstance(content, dict):
        err = content.get("error", content)
        if isinstance(err, dict) and "message" in err:
            return str(err["message"])
        if isinstance(err, str):
            return err
        return json.dumps(content)
    return str(content) or "(empty answer)"
