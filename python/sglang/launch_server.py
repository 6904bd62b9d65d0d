"""python -m sglang.launch_server [--model-path PATH] [--host 127.0.0.1] [--port 30000] ...

Serves SGLang's native API and the OpenAI-compatible API. With no --model-path, the embedded
default model (SmolLM2-135M-Instruct) is served. A bad flag or start-up failure is one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import sys

from sglang.srt.server_args import ServerArgs


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = argparse.ArgumentParser(
        prog="python -m sglang.launch_server", description="SGLang-compatible server with token parallelism"
    )
    ServerArgs.add_cli_args(parser)
    return ServerArgs.from_cli_args(parser.parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from sglang.srt.entrypoints.http_server import launch_server
    from sglang.srt.entrypoints.subprocesses import BackendStartError
    from sglang.srt.utils import configure_logging

    try:
        args.resolve()
        configure_logging(args.log_level)
        return launch_server(args)
    except (ValueError, BackendStartError) as exc:  # ModelLoadError is a ValueError
        logging.getLogger(__name__).debug("start-up failed", exc_info=True)
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
