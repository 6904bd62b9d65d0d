"""The HTTP server: SGLang's native API, the OpenAI-compatible API and Prometheus metrics.

Data flow: request -> FastAPI handler -> TokenizerManager (this process; validates, tokenizes)
-> ZMQ -> scheduler process -> ZMQ -> detokenizer process -> ZMQ -> TokenizerManager -> response.
A watchdog task checks the backend processes: if one dies, /health turns 503, in-flight
requests end with an error, and the server exits with a non-zero code.

Shutdown (SIGTERM/SIGINT): uvicorn stops accepting connections, new requests on open ones get
503, and in-flight requests run on for up to --graceful-shutdown-timeout seconds; then the rest
are aborted (finish_reason {"type": "abort", "message": "the server is shutting down"}) so every
client gets an answer, the backend processes are stopped, and the server exits 0. A signal during
start-up stops what was started and exits 0 too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Optional

import orjson
import uvicorn
import zmq
import zmq.asyncio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import PlainTextResponse, Response, StreamingResponse

from sglang import __version__
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.entrypoints.http_guards import (
    ABORT_BODY_DOC,
    ERROR_RESPONSES,
    GENERATE_BODY_DOC,
    GENERATE_RESPONSES,
    INFO_RESPONSES,
    PLAIN_TEXT,
    TEXT_OK,
    BodyLimitMiddleware,
    JSONRoute,
    dumps,
    install_error_handlers,
)
from sglang.srt.entrypoints.metrics import CONTENT_TYPE, ServerMetrics
from sglang.srt.entrypoints.openai.routes import mount_openai_routes
from sglang.srt.entrypoints.openai.serving import client_gone, collect, validation_error_response
from sglang.srt.entrypoints.openai.tool_parsers import tool_call_parser_for
from sglang.srt.entrypoints.subprocesses import Backend, run_other_node
from sglang.srt.managers.io_struct import GenerateReqInput, RequestError
from sglang.srt.managers.tokenizer_manager import Overloaded, TokenizerManager
from sglang.srt.model_loader import load_model_config_and_tokenizer
from sglang.srt.server_args import ServerArgs, check_rank_layout, sampling_defaults

logger = logging.getLogger(__name__)

SHUTDOWN_MESSAGE = "the server is shutting down"
# After the graceful deadline: how long the scheduler has to answer the aborts before the
# requests are ended here, and uvicorn's own backstop beyond that for connections to close.
_ABORT_GRACE_S = 2.0
_UVICORN_GRACE_S = 5.0

# Top-level /generate fields SGLang's clients send that this engine accepts and ignores when
# they hold their neutral value; anything else unknown is ignored as SGLang's server does.
_NEUTRAL_FIELDS = {"lora_path": None, "return_routed_experts": False, "image_data": None, "return_hidden_states": False}
_GENERATE_FIELDS = {f.name for f in dataclasses.fields(GenerateReqInput)}


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def error_response(
    status: int, message: str, err_type: str = "invalid_request_error", param: Optional[str] = None
) -> Response:
    return json_response({"error": {"message": message, "type": err_type, "param": param, "code": status}}, status)


def sse(data: Any) -> bytes:
    return b"data: " + (data if isinstance(data, bytes) else orjson.dumps(data)) + b"\n\n"


@dataclasses.dataclass
class ServerState:
    args: ServerArgs
    model_config: ModelConfig
    tokenizer_manager: TokenizerManager
    backend: Backend
    exit_code: int = 0
    server: Optional[uvicorn.Server] = None
    metrics: Optional[ServerMetrics] = None  # with --enable-metrics


def build_app(state: ServerState) -> FastAPI:
    tm = state.tokenizer_manager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx = zmq.asyncio.Context()
        send = ctx.socket(zmq.PUSH)
        send.connect(state.backend.ipc["scheduler"])
        recv = ctx.socket(zmq.PULL)
        recv.bind(state.backend.ipc["tokenizer"])
        tasks = [tm.attach(send, recv), asyncio.create_task(_watchdog(state)), asyncio.create_task(_drain(state))]
        logger.info("ready: serving %s on http://%s:%d", state.args.served_model_name, state.args.host, state.args.port)
        yield
        for t in tasks:
            t.cancel()
        ctx.destroy(linger=0)  # the backend processes are stopped by launch_server, after uvicorn

    app = FastAPI(lifespan=lifespan, title="sglang-tknp", version=__version__)
    app.state.server = state
    app.router.route_class = JSONRoute  # for the routes mounted later too (the OpenAI ones)
    app.add_middleware(BodyLimitMiddleware, max_bytes=state.args.max_request_bytes)  # after the key check
    install_error_handlers(app)

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        key = state.args.api_key
        if key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {key}":
            return error_response(401, "missing or invalid API key", "authentication_error")
        return await call_next(request)

    @app.exception_handler(Overloaded)
    async def on_overloaded(request: Request, exc: Overloaded):
        return overloaded_response(exc)  # raised through the OpenAI handlers

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        status, body = validation_error_response(exc)
        return json_response(body, status)

    dead = {503: {"description": "A backend process has died", **PLAIN_TEXT}}

    @app.get("/health", responses={**TEXT_OK, **dead})
    async def health() -> Response:
        if tm.dead_reason:
            return PlainTextResponse(tm.dead_reason, status_code=503)
        return PlainTextResponse("")

    @app.get("/health_generate", responses={**TEXT_OK, 401: ERROR_RESPONSES[401], **dead})
    async def health_generate() -> Response:
        if tm.dead_reason:
            return PlainTextResponse(tm.dead_reason, status_code=503)
        obj = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
        async for _ in tm.generate_request(obj):
            pass
        return PlainTextResponse("")

    @app.get("/get_model_info", responses=INFO_RESPONSES)
    @app.get("/model_info", responses=INFO_RESPONSES)
    async def model_info() -> dict:
        return {
            "model_path": state.model_config.model_path,
            "tokenizer_path": state.args.tokenizer_path or state.model_config.model_path,
            "is_generation": True,
            "served_model_name": state.args.served_model_name,
            "architecture": state.model_config.architecture,
            "chat_template": tm.chat_template or getattr(tm.tokenizer, "chat_template", None),
            # what a request gets for the sampling parameters it omits (--sampling-defaults)
            "default_sampling_params": tm.sampling_defaults,
        }

    @app.get("/get_server_info", responses=INFO_RESPONSES)
    @app.get("/server_info", responses=INFO_RESPONSES)
    async def server_info() -> dict:
        load = dataclasses.asdict(await tm.get_load())
        ranks = load.pop("ranks") or [load]  # under TKNP: one entry per rank
        for rank in ranks:
            rank.pop("ranks", None)
            rank.pop("placements", None)
        return {
            **state.args.to_dict(),
            **load,
            "version": __version__,
            "context_length": state.model_config.context_len,
            "internal_states": ranks,
            "cpu_binding": state.backend.info.get("cpu_binding"),
            "transport": state.backend.info.get("transport", {}),
        }

    @app.api_route(
        "/flush_cache",
        methods=["GET", "POST"],
        responses={**TEXT_OK, 401: ERROR_RESPONSES[401], 400: {"description": "Requests are running", **PLAIN_TEXT}},
    )
    async def flush_cache() -> Response:
        if await tm.flush_cache():
            return PlainTextResponse("Cache flushed.\n")
        return PlainTextResponse("Cache not flushed: requests are running.\n", status_code=400)

    @app.post(
        "/abort_request",
        responses={**TEXT_OK, **{code: ERROR_RESPONSES[code] for code in (400, 401, 413)}},
        openapi_extra=ABORT_BODY_DOC,
    )
    async def abort_request(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        rid = body.get("rid")
        if not isinstance(rid, str):
            return error_response(400, "rid: a request id string is required", param="rid")
        await tm.abort_request(rid)
        return PlainTextResponse("")

    @app.post("/generate", responses=GENERATE_RESPONSES, openapi_extra=GENERATE_BODY_DOC)
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        try:
            obj = _generate_input(body)
            stream = tm.generate_request(obj)
            if obj.stream:
                first = await anext(stream)  # validation errors surface here, before any byte is sent
            else:  # all results, unless the client leaves first: then its requests are aborted
                results = await collect(stream, lambda: client_gone(request.receive))
        except ValueError as exc:
            return error_response(400, str(exc), param=getattr(exc, "param", None))
        except Overloaded as exc:
            return overloaded_response(exc)
        except RuntimeError as exc:  # the backend is gone
            return error_response(503, str(exc), "service_unavailable")
        if obj.stream:
            return StreamingResponse(_stream_native(first, stream, obj.is_batch), media_type="text/event-stream")
        if results is None:
            return Response(status_code=499)  # nobody reads it: the client closed the connection
        if not obj.is_batch and len(results) == 1:
            data: Any = results[0][1]
        else:
            data = [r for _, r in sorted(results, key=lambda x: x[0])]
        return Response(await dumps(data, large=obj.return_logprob), media_type="application/json")

    @app.get("/metrics", responses={code: ERROR_RESPONSES[code] for code in (401, 404)})
    async def metrics() -> Response:
        if not state.args.enable_metrics:
            return error_response(
                404, "metrics are disabled; start the server with --enable-metrics", "not_found_error"
            )
        return Response(state.metrics.render(await tm.get_load()), media_type=CONTENT_TYPE)

    return app


def overloaded_response(exc: Overloaded) -> Response:
    """503 with Retry-After: too many requests are waiting, or the server is shutting down."""
    response = error_response(503, str(exc), "service_unavailable")
    response.headers["Retry-After"] = str(exc.retry_after)
    return response


async def _json_body(request: Request) -> dict | Response:
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError as exc:
        return error_response(400, f"malformed JSON body: {exc}")
    if not isinstance(body, dict):
        return error_response(400, "the request body must be a JSON object")
    return body


def _generate_input(body: dict) -> GenerateReqInput:
    for name, neutral in _NEUTRAL_FIELDS.items():
        if body.get(name, neutral) != neutral:
            raise RequestError(f"{name} is not supported by this server", name)
    fields = {k: v for k, v in body.items() if k in _GENERATE_FIELDS}
    for flag in ("stream", "return_logprob", "return_text_in_logprobs"):
        if flag in fields and not isinstance(fields[flag], bool):
            raise RequestError(f"{flag} must be a boolean", flag)
    for num in ("logprob_start_len", "top_logprobs_num"):
        value = fields.get(num)
        if isinstance(value, float) and value.is_integer():
            fields[num] = value = int(value)  # JSON does not tell 2 from 2.0
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise RequestError(f"{num} must be an integer", num)
    return GenerateReqInput(**fields)  # TokenizerManager.tokenize checks the other fields' types


async def _stream_native(first: tuple[int, dict], rest: AsyncIterator, is_batch: bool) -> AsyncIterator[bytes]:
    def chunk(item: tuple[int, dict]) -> bytes:
        index, result = item
        return sse({**result, "index": index} if is_batch else result)

    try:
        yield chunk(first)
        async for item in rest:
            yield chunk(item)
    except Exception as exc:  # after the headers went out, errors travel in the stream
        yield sse({"error": {"message": str(exc), "type": "internal_error"}})
    finally:
        await rest.aclose()
    yield b"data: [DONE]\n\n"


async def _watchdog(state: ServerState) -> None:
    while True:
        await asyncio.sleep(0.5)
        reason = state.backend.dead_process()
        if reason:
            logger.error("%s; failing in-flight requests and shutting down", reason)
            state.tokenizer_manager.fail_all(reason)
            state.exit_code = 1
            await asyncio.sleep(0.5)  # let the failed responses reach their clients
            if state.server is not None:
                state.server.should_exit = True
            return


async def _drain(state: ServerState) -> None:
    """Once uvicorn is shutting down: refuses new requests, gives those in flight until the
    graceful deadline, then aborts the rest and makes sure each one's client is answered."""
    tm, loop = state.tokenizer_manager, asyncio.get_running_loop()
    while state.server is None or not state.server.should_exit:
        await asyncio.sleep(0.1)
    tm.close(SHUTDOWN_MESSAGE)
    deadline = loop.time() + state.args.graceful_shutdown_timeout
    if tm.rid_to_state:
        logger.info(
            "shutting down: waiting up to %gs for %d requests",
            state.args.graceful_shutdown_timeout,
            len(tm.rid_to_state),
        )
    while tm.rid_to_state and loop.time() < deadline:
        await asyncio.sleep(0.1)
    if not tm.rid_to_state or tm.dead_reason:
        return
    logger.warning("aborting %d requests still running at the shutdown deadline", len(tm.rid_to_state))
    await tm.abort_all(SHUTDOWN_MESSAGE)  # the scheduler answers with what each generated so far
    deadline = loop.time() + _ABORT_GRACE_S
    while tm.rid_to_state and loop.time() < deadline:
        await asyncio.sleep(0.05)
    tm.end_all(SHUTDOWN_MESSAGE)


def launch_server(args: ServerArgs) -> int:
    """Runs the server until SIGINT/SIGTERM or a backend failure; returns the exit code."""
    _stop_on_signal()
    model_config, tokenizer = load_model_config_and_tokenizer(
        args.model_path, args.tokenizer_path, args.dtype, args.context_length, args.device
    )
    args.served_model_name = args.served_model_name or model_config.name
    check_rank_layout(args, model_config)
    if args.node_rank > 0:
        return run_other_node(args)  # node 0 serves HTTP for every node
    chat_template = _read_chat_template(args.chat_template)
    # resolved here so that /get_server_info reports the format in use
    args.tool_call_parser = tool_call_parser_for(args.tool_call_parser, chat_template or tokenizer.chat_template)
    sock = _bind(args.host, args.port)  # before the slow start-up: a busy port fails fast
    backend = Backend(args)
    try:
        return _serve(args, model_config, tokenizer, chat_template, sock, backend.start())
    finally:
        backend.shutdown()  # also after an error or a signal during start-up
        sock.close()


def _serve(
    args: ServerArgs,
    model_config: ModelConfig,
    tokenizer: Any,
    chat_template: Optional[str],
    sock: socket.socket,
    backend: Backend,
) -> int:
    logger.info(
        "model %s (%s, %s, %s), KV cache %d tokens, max %d running requests",
        model_config.architecture,
        model_config.model_path,
        str(model_config.dtype).replace("torch.", ""),
        args.device,
        backend.info["max_total_num_tokens"],
        backend.info["max_running_requests"],
    )
    tm = TokenizerManager(
        tokenizer,
        model_config.vocab_size,
        model_config.context_len,
        args.random_seed,
        served_model_name=args.served_model_name,
        chat_template=chat_template,
        sampling_defaults=sampling_defaults(args, model_config),
        grammar_backend=args.grammar_backend,
        # a request lives on one TKNP rank, and may be placed on the smallest
        kv_capacity=min(rank["max_total_num_tokens"] for rank in backend.info["ranks"]),
        page_size=args.page_size,
        model_path=model_config.model_path,
        max_running_requests=backend.info["max_running_requests"],
        max_queued_requests=args.max_queued_requests,
        tool_call_parser=args.tool_call_parser,
    )
    state = ServerState(args, model_config, tm, backend)
    if args.enable_metrics:
        state.metrics = ServerMetrics(args.served_model_name)
        tm.metrics = state.metrics.requests
    app = build_app(state)
    mount_openai_routes(app, tm)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        log_level=args.log_level,
        timeout_keep_alive=5,
        access_log=False,
        timeout_graceful_shutdown=args.graceful_shutdown_timeout + _ABORT_GRACE_S + _UVICORN_GRACE_S,
    )
    state.server = uvicorn.Server(config)
    # uvicorn handles SIGTERM/SIGINT while it runs and re-raises the signal after it has shut
    # down, into the handlers it found: these only ask it to stop (a no-op by then, and a signal
    # before uvicorn took over is not lost), so a requested stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: setattr(state.server, "should_exit", True))
    state.server.run(sockets=[sock])
    return state.exit_code


def _stop_on_signal() -> None:
    """Until uvicorn takes the signals over: SIGTERM/SIGINT end start-up with exit code 0, through
    the `finally` blocks that stop the backend processes and remove their socket directory."""

    def stop(sig: int, frame: Any) -> None:
        logger.info("%s during start-up: stopping", signal.Signals(sig).name)
        raise SystemExit(0)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def _read_chat_template(path: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    try:
        with open(path) as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"--chat-template: cannot read {path}: {exc.strerror}") from None


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"--port: cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(1024)
    sock.set_inheritable(True)
    return sock
