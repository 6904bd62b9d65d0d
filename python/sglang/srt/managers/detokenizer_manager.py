"""Token ids -> text, incrementally, per request.

Decoding only the new ids would break words and multi-byte characters that span tokens, so each
request keeps two offsets into its ids: text is decoded from `prefix_offset` (a few tokens of
context) and only what goes beyond the decode of `prefix_offset..read_offset` is new. Text that
ends in an incomplete UTF-8 sequence (U+FFFD) waits for the next token.

While a request runs, text that could be the start of one of its stop strings is held back, so
a streaming client never sees part of a stop string that is later trimmed. When it finishes on a
stop string, the text is cut before it; on a stop token, that token's text is dropped (unless
`no_stop_trim`).

A request whose text cannot be decoded is finished here with an "abort" reason (internal error);
the other requests of the batch, and the process, go on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any

from sglang.srt.managers.io_struct import BatchStrOut, BatchTokenIDOut, ReqOutput, ReqStrOutput

logger = logging.getLogger(__name__)


@dataclass
class _DecodeState:
    stops: list[str]
    ids: list[int] = field(default_factory=list)
    text: str = ""  # decoded so far (complete characters only)
    sent: int = 0  # characters of `text` already sent
    prefix_offset: int = 0
    read_offset: int = 0


class DetokenizerManager:
    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.states: dict[str, _DecodeState] = {}
        # Requests failed here while the scheduler still runs them: their later outputs are
        # dropped (the client already has its abort) until the final one arrives.
        self.failed: set[str] = set()

    def forget(self, rid: str) -> None:
        self.states.pop(rid, None)

    def handle(self, batch: BatchTokenIDOut) -> BatchStrOut:
        outputs = []
        for out in batch.outputs:
            if out.rid in self.failed:
                if out.finished_reason is not None:
                    self.failed.discard(out.rid)
                continue
            try:
                outputs.append(ReqStrOutput(out, self._text_delta(out)))
            except Exception as exc:
                logger.exception("detokenizing request %s failed", out.rid)
                self.states.pop(out.rid, None)
                if out.finished_reason is None:
                    self.failed.add(out.rid)
                reason = {"type": "abort", "message": f"internal error: {type(exc).__name__}: {exc}"}
                outputs.append(ReqStrOutput(dataclasses.replace(out, finished_reason=reason), ""))
        return BatchStrOut(outputs)

    def _decode(self, ids: list[int], out: ReqOutput) -> str:
        return self.tokenizer.decode(
            ids,
            skip_special_tokens=out.skip_special_tokens,
            spaces_between_special_tokens=out.spaces_between_special_tokens,
        )

    def _text_delta(self, out: ReqOutput) -> str:
        state = self.states.get(out.rid)
        if state is None:
            state = self.states[out.rid] = _DecodeState(stops=list(out.stop_strings))
        state.ids += out.new_token_ids
        if out.finished_reason is None:
            self._advance(state, out)
            visible = len(state.text) - _held_back(state.text, state.stops)
        else:
            state.text = self._final_text(state, out)
            visible = len(state.text)
            self.states.pop(out.rid, None)
        delta = state.text[state.sent : visible] if visible > state.sent else ""
        state.sent = max(state.sent, visible)
        return delta

    def _advance(self, state: _DecodeState, out: ReqOutput) -> None:
        before = self._decode(state.ids[state.prefix_offset : state.read_offset], out)
        after = self._decode(state.ids[state.prefix_offset :], out)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            state.text += after[len(before) :]
            state.prefix_offset = state.read_offset
            state.read_offset = len(state.ids)

    def _final_text(self, state: _DecodeState, out: ReqOutput) -> str:
        ids = state.ids
        matched = out.finished_reason.get("matched")
        if isinstance(matched, int) and not out.no_stop_trim and ids and ids[-1] == matched:
            ids = ids[:-1]
        text = self._decode(ids, out)
        if isinstance(matched, str) and not out.no_stop_trim:
            pos = text.find(matched)
            if pos >= 0:
                text = text[:pos]
        return text


def _held_back(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that may be the beginning of a stop string."""
    held = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:k]):
                held = k
                break
    return held


def run_detokenizer_process(args: Any, ipc: dict[str, str], ready_pipe: Any) -> None:
    """Entry point of the detokenizer process: BatchTokenIDOut in, BatchStrOut out."""
    import zmq

    from sglang.srt.managers.io_struct import decode, encode
    from sglang.srt.model_loader import load_tokenizer, resolve_model_path
    from sglang.srt.utils import configure_logging, kill_with_parent

    kill_with_parent()
    configure_logging(args.log_level, prefix="detokenizer")
    try:
        manager = DetokenizerManager(load_tokenizer(resolve_model_path(args.model_path), args.tokenizer_path))
    except Exception as exc:
        ready_pipe.send({"error": f"{type(exc).__name__}: {exc}"})
        return
    ctx = zmq.Context()
    recv = ctx.socket(zmq.PULL)
    recv.bind(ipc["detokenizer"])
    send = ctx.socket(zmq.PUSH)
    send.connect(ipc["tokenizer"])
    ready_pipe.send({})
    while True:
        data = recv.recv()
        try:
            reply = encode(manager.handle(decode(data)))
        except Exception:  # a message it cannot read: drop it, keep serving the others
            logger.exception("the detokenizer dropped a message it could not handle")
            continue
        send.send(reply)
