"""The HTTP server: SGLang's native API, the OpenAI-compatible API and Prometheus metrics.

Data flow: request -> FastAPI handler -> TokenizerManager (this process; validates, tokenizes)
-> ZMQ -> scheduler process -> ZMQ -> detokenizer process -> ZMQ -> TokenizerManager -> response.
A watchdog task checks the backend processes: if one dies, /health turns 503, in-flight
requests end with an error, and the server exits with a non-zero code.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
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
from sglang.srt.entrypoints.openai.routes import mount_openai_routes
from sglang.srt.entrypoints.openai.serving import validation_error_response
from sglang.srt.entrypoints.subprocesses import Backend, run_other_node
from sglang.srt.managers.tokenizer_manager import GenerateReqInput, TokenizerManager
from sglang.srt.model_loader import load_model_config_and_tokenizer
from sglang.srt.server_args import ServerArgs, check_rank_layout

logger = logging.getLogger(__name__)

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


def build_app(state: ServerState) -> FastAPI:
    tm = state.tokenizer_manager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        ctx = zmq.asyncio.Context()
        send = ctx.socket(zmq.PUSH)
        send.connect(state.backend.ipc["scheduler"])
        recv = ctx.socket(zmq.PULL)
        recv.bind(state.backend.ipc["tokenizer"])
        tasks = [tm.attach(send, recv), asyncio.create_task(_watchdog(state))]
        logger.info("ready: serving %s on http://%s:%d", state.args.served_model_name, state.args.host, state.args.port)
        yield
        for t in tasks:
            t.cancel()
        ctx.destroy(linger=0)
        # Here, not after uvicorn returns: uvicorn re-raises SIGTERM/SIGINT once it has shut down.
        state.backend.shutdown()

    app = FastAPI(lifespan=lifespan, title="sglang-tknp", version=__version__)
    app.state.server = state

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        key = state.args.api_key
        if key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {key}":
            return error_response(401, "missing or invalid API key", "authentication_error")
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError):
        status, body = validation_error_response(exc)
        return json_response(body, status)

    @app.get("/health")
    async def health() -> Response:
        if tm.dead_reason:
            return PlainTextResponse(tm.dead_reason, status_code=503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        if tm.dead_reason:
            return PlainTextResponse(tm.dead_reason, status_code=503)
        obj = GenerateReqInput(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
        async for _ in tm.generate_request(obj):
            pass
        return Response(status_code=200)

    @app.get("/get_model_info")
    @app.get("/model_info")
    async def model_info() -> dict:
        return {
            "model_path": state.model_config.model_path,
            "tokenizer_path": state.args.tokenizer_path or state.model_config.model_path,
            "is_generation": True,
            "served_model_name": state.args.served_model_name,
            "architecture": state.model_config.architecture,
            "chat_template": tm.chat_template or getattr(tm.tokenizer, "chat_template", None),
        }

    @app.get("/get_server_info")
    @app.get("/server_info")
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
        }

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if await tm.flush_cache():
            return PlainTextResponse("Cache flushed.\n")
        return PlainTextResponse("Cache not flushed: requests are running.\n", status_code=400)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        rid = body.get("rid")
        if not isinstance(rid, str):
            return error_response(400, "rid: a request id string is required", param="rid")
        await tm.abort_request(rid)
        return Response(status_code=200)

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await _json_body(request)
        if isinstance(body, Response):
            return body
        try:
            obj = _generate_input(body)
            stream = tm.generate_request(obj)
            first = await anext(stream)  # validation errors surface here, before any byte is sent
        except ValueError as exc:
            return error_response(400, str(exc))
        except RuntimeError as exc:  # the backend is gone
            return error_response(503, str(exc), "service_unavailable")
        if obj.stream:
            return StreamingResponse(_stream_native(first, stream, obj.is_batch), media_type="text/event-stream")
        results = [first] + [item async for item in stream]
        if not obj.is_batch and len(results) == 1:
            return json_response(results[0][1])
        return json_response([r for _, r in sorted(results, key=lambda x: x[0])])

    @app.get("/metrics")
    async def metrics() -> Response:
        if not state.args.enable_metrics:
            return error_response(
                404, "metrics are disabled; start the server with --enable-metrics", "not_found_error"
            )
        return PlainTextResponse(_prometheus(await tm.get_load(), state.args.served_model_name))

    return app


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
            raise ValueError(f"{name} is not supported by this server")
    fields = {k: v for k, v in body.items() if k in _GENERATE_FIELDS}
    for flag in ("stream", "return_logprob", "return_text_in_logprobs"):
        if flag in fields and not isinstance(fields[flag], bool):
            raise ValueError(f"{flag} must be a boolean")
    for num in ("logprob_start_len", "top_logprobs_num"):
        if fields.get(num) is not None and (not isinstance(fields[num], int) or isinstance(fields[num], bool)):
            raise ValueError(f"{num} must be an integer")
    text = fields.get("text")
    if (
        text is not None
        and not isinstance(text, str)
        and not (isinstance(text, list) and all(isinstance(t, str) for t in text))
    ):
        raise ValueError("text must be a string or a list of strings")
    return GenerateReqInput(**fields)


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


def _prometheus(load: Any, model_name: str) -> str:
    """Prometheus text: one series per TKNP rank (a single rank 0 without TKNP)."""
    series: dict[tuple[str, str], list[str]] = {}
    for rank in load.ranks or [load]:
        label = f'{{model_name="{model_name}",tknp_rank="{rank.tknp_rank}"}}'
        hit_rate = rank.cache_hit_tokens / rank.prompt_tokens if rank.prompt_tokens else 0.0
        rows = [
            ("num_running_reqs", "gauge", rank.num_running_reqs),
            ("num_queue_reqs", "gauge", rank.num_waiting_reqs),
            ("num_used_tokens", "gauge", rank.kv_tokens_used),
            ("num_free_tokens", "gauge", rank.max_total_num_tokens - rank.kv_tokens_used),
            ("token_usage", "gauge", rank.kv_tokens_used / max(rank.max_total_num_tokens, 1)),
            ("cache_hit_rate", "gauge", hit_rate),
            ("max_total_num_tokens", "gauge", rank.max_total_num_tokens),
            ("prompt_tokens_total", "counter", rank.prompt_tokens),
            ("generation_tokens_total", "counter", rank.generation_tokens),
            ("cached_tokens_total", "counter", rank.cache_hit_tokens),
            ("num_retractions_total", "counter", rank.num_retractions),
        ]
        for i, placed in enumerate(load.placements):
            if i == rank.tknp_rank:
                rows.append(("tknp_placements_total", "counter", placed))
        for name, kind, value in rows:
            series.setdefault((name, kind), []).append(f"sglang:{name}{label} {value}")
    lines = []
    for (name, kind), samples in series.items():
        lines += [f"# TYPE sglang:{name} {kind}", *samples]
    return "\n".join(lines) + "\n"


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


def launch_server(args: ServerArgs) -> int:
    """Runs the server until SIGINT/SIGTERM or a backend failure; returns the exit code."""
    model_config, tokenizer = load_model_config_and_tokenizer(
        args.model_path, args.tokenizer_path, args.dtype, args.context_length, args.device
    )
    args.served_model_name = args.served_model_name or model_config.model_path
    check_rank_layout(args, model_config)
    if args.node_rank > 0:
        return run_other_node(args)  # node 0 serves HTTP for every node
    chat_template = _read_chat_template(args.chat_template)
    sock = _bind(args.host, args.port)  # before the slow start-up: a busy port fails fast
    backend = Backend(args).start()
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
    )
    tm.model_path = model_config.model_path
    state = ServerState(args, model_config, tm, backend)
    app = build_app(state)
    mount_openai_routes(app, tm)
    config = uvicorn.Config(app, loop="uvloop", log_level=args.log_level, timeout_keep_alive=5, access_log=False)
    state.server = uvicorn.Server(config)
    try:
        state.server.run(sockets=[sock])
    finally:
        backend.shutdown()
        sock.close()
    return state.exit_code


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
