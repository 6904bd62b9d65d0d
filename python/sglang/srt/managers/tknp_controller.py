"""The TKNP controller: places each request on one rank of the TKNP group.

It sits between the tokenizer side and the rank schedulers: tokenized requests arrive on the
socket a plain scheduler would own; each goes to exactly one rank, chosen by the placement
policy (and, under TP, to every TP replica of that rank); aborts and control requests go to
every rank, and control replies (from TP rank 0 of each rank) are merged into one. After every
batch of sends global rank 0 gets a `Tick` with the cumulative per-rank message counts, which
keeps the ranks' steps in agreement (see scheduler_process). With --tknp-size 1 and
--tp-size > 1 it runs too, with one rank to place on, to feed the TP replicas.

Placement policies (--load-balance-method):
  round_robin     ranks in turn;
  shortest_queue  the rank with the least KV in use, still to be allocated, and in flight
                  (placed but not yet counted by a report), relative to its capacity (the
                  root holds the weights, so its capacity is smaller);
  cache_aware     the rank whose approximate prefix tree matches the prompt longest, unless the
                  match is short or, counting the request, that rank would be much busier than
                  the least-loaded one would be; then shortest_queue decides.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import zmq

from sglang.srt.managers.io_struct import (
    AbortReq,
    FlushCacheReq,
    FlushCacheReqOutput,
    GetLoadReq,
    GetLoadReqOutput,
    LoadReport,
    Tick,
    TokenizedGenerateReqInput,
    decode,
    encode,
)
from sglang.srt.server_args import LOAD_BALANCE_METHODS
from sglang.srt.utils import configure_logging, kill_with_parent

logger = logging.getLogger(__name__)

# cache_aware: a match counts when it covers this share of the prompt (or this many tokens) ...
_CACHE_MATCH_RATIO = 0.5
_CACHE_MATCH_TOKENS = 256
# ... and, with the request placed, the matching rank would not be busier than the least-loaded
# rank (with the request placed there instead) by more than this share of capacity.
_BALANCE_SLACK = 0.25
# The approximate trees forget everything past this many tokens per rank (it is a hint only).
_TREE_MAX_TOKENS = 1 << 20


class ApproxPrefixTree:
    """Prompts placed on one rank, as a token trie; no KV, no eviction order, just a size cap."""

    def __init__(self) -> None:
        self.root: dict = {}
        self.size = 0

    def match(self, ids: list[int]) -> int:
        node, n = self.root, 0
        for t in ids:
            node = node.get(t)
            if node is None:
                break
            n += 1
        return n

    def insert(self, ids: list[int]) -> None:
        if self.size + len(ids) > _TREE_MAX_TOKENS:
            self.root, self.size = {}, 0
        node = self.root
        for t in ids:
            child = node.get(t)
            if child is None:
                child = node[t] = {}
                self.size += 1
            node = child


@dataclass
class RankState:
    capacity: int
    used: int = 0  # KV tokens in use at the last report
    pending: int = 0  # KV tokens its requests were still to allocate at that report
    placed: int = 0  # requests placed on this rank, ever
    # Requests the last report did not count yet, as (placement number, tokens), oldest first.
    # A report says how many requests the rank has received; those leave this list then, and
    # not before, so requests still in the socket are never forgotten.
    unreported: deque = field(default_factory=deque)
    tree: ApproxPrefixTree = field(default_factory=ApproxPrefixTree)

    def load(self) -> float:
        in_flight = sum(tokens for _, tokens in self.unreported)
        return (self.used + self.pending + in_flight) / max(self.capacity, 1)


class PlacementPolicy:
    def __init__(self, method: str, capacities: list[int]):
        assert method in LOAD_BALANCE_METHODS, method  # ServerArgs.resolve rejects the others
        self.method = method
        self.ranks = [RankState(c) for c in capacities]
        self._next = 0

    def place(self, req: TokenizedGenerateReqInput) -> int:
        if self.method == "round_robin":
            rank = self._next % len(self.ranks)
            self._next += 1
        elif self.method == "shortest_queue":
            rank = self._least_loaded()
        else:
            rank = self._cache_aware(req)
        state = self.ranks[rank]
        state.placed += 1
        # the part of the prompt the rank's cache will likely serve costs it no new KV
        tokens = len(req.input_ids) - state.tree.match(req.input_ids) + req.sampling_params.max_new_tokens
        state.unreported.append((state.placed, tokens))
        state.tree.insert(req.input_ids)
        return rank

    def _least_loaded(self) -> int:
        return min(range(len(self.ranks)), key=lambda r: (self.ranks[r].load(), r))

    def _cache_aware(self, req: TokenizedGenerateReqInput) -> int:
        ids = req.input_ids
        matches = [s.tree.match(ids) for s in self.ranks]
        best = max(range(len(self.ranks)), key=lambda r: (matches[r], -self.ranks[r].load()))
        long_enough = matches[best] > 0 and matches[best] >= min(_CACHE_MATCH_TOKENS, _CACHE_MATCH_RATIO * len(ids))
        least = self._least_loaded()

        def load_after(r: int) -> float:  # the rank's load if this request went there
            state = self.ranks[r]
            return state.load() + (len(ids) - matches[r] + req.sampling_params.max_new_tokens) / max(state.capacity, 1)

        balanced = load_after(best) - load_after(least) <= _BALANCE_SLACK
        return best if long_enough and balanced else least

    def update(self, load: GetLoadReqOutput) -> None:
        state = self.ranks[load.tknp_rank]
        state.used = load.kv_tokens_used
        state.pending = load.kv_tokens_pending
        while state.unreported and state.unreported[0][0] <= load.num_received_reqs:
            state.unreported.popleft()


def merge_loads(loads: list[GetLoadReqOutput], placements: list[int]) -> GetLoadReqOutput:
    """The group's load, with the per-rank entries kept: counters (ints) summed over the ranks,
    times (floats) the longest rank's, since the ranks step in lockstep and their forwards
    overlap (a sum would count each step once per rank)."""
    loads = sorted(loads, key=lambda x: x.tknp_rank)
    merged: dict[str, Any] = {}
    for f in dataclasses.fields(GetLoadReqOutput):
        if f.name == "tknp_rank":
            continue
        if f.type in ("int", int):
            merged[f.name] = sum(getattr(x, f.name) for x in loads)
        elif f.type in ("float", float):
            merged[f.name] = max((getattr(x, f.name) for x in loads), default=0.0)
    return GetLoadReqOutput(**merged, tknp_rank=0, ranks=loads, placements=list(placements))


def run_tknp_controller_process(args: Any, ipc: dict[str, str], ready_pipe: Any, capacities: list[int]) -> None:
    kill_with_parent()
    configure_logging(args.log_level, prefix="controller")
    ctx = zmq.Context()
    from_tokenizer = ctx.socket(zmq.PULL)
    from_tokenizer.bind(ipc["scheduler"])
    from_ranks = ctx.socket(zmq.PULL)
    from_ranks.bind(ipc["controller_in"])
    to_tokenizer = ctx.socket(zmq.PUSH)
    to_tokenizer.connect(ipc["tokenizer"])
    to_ranks = []  # per TKNP rank (a TP group, in TKNP rank order), a socket per TP replica
    for replica_ranks in args.rank_layout().tp_group_ranks():
        replicas = []
        for g in replica_ranks:
            sock = ctx.socket(zmq.PUSH)
            sock.bind(ipc[f"rank{g}"])  # bound here, on node 0: ranks on any node connect
            replicas.append(sock)
        to_ranks.append(replicas)
    controller = _Controller(PlacementPolicy(args.load_balance_method, capacities), to_ranks, from_ranks, to_tokenizer)
    ready_pipe.send({})
    poller = zmq.Poller()
    poller.register(from_tokenizer, zmq.POLLIN)
    poller.register(from_ranks, zmq.POLLIN)
    while True:
        for sock, _ in poller.poll():
            msg = decode(sock.recv())
            if sock is from_ranks:
                controller.on_rank_message(msg)
            else:
                controller.on_request(msg)


class _Controller:
    def __init__(self, policy: PlacementPolicy, to_ranks: list, from_ranks: Any, to_tokenizer: Any):
        self.policy = policy
        self.to_ranks = to_ranks
        self.from_ranks = from_ranks
        self.to_tokenizer = to_tokenizer
        self.counts = [0] * len(to_ranks)

    def _send(self, rank: int, msg: Any) -> None:
        data = encode(msg)
        for replica in self.to_ranks[rank]:  # TP replicas all compute the rank's steps
            replica.send(data)
        self.counts[rank] += 1

    def _tick(self) -> None:
        self.to_ranks[0][0].send(encode(Tick(list(self.counts))))

    def on_request(self, msg: Any) -> None:
        if isinstance(msg, TokenizedGenerateReqInput):
            self._send(self.policy.place(msg), msg)
        elif isinstance(msg, (AbortReq, FlushCacheReq, GetLoadReq)):
            for r in range(len(self.to_ranks)):
                self._send(r, msg)
        else:
            raise TypeError(f"controller got an unknown message {type(msg).__name__}")
        self._tick()
        if isinstance(msg, (FlushCacheReq, GetLoadReq)):
            self.to_tokenizer.send(
                encode(self._collect(FlushCacheReqOutput if isinstance(msg, FlushCacheReq) else GetLoadReqOutput))
            )

    def _collect(self, reply_type: type) -> Any:
        replies = []
        while len(replies) < len(self.to_ranks):
            msg = decode(self.from_ranks.recv())
            if isinstance(msg, reply_type):
                replies.append(msg)
            else:
                self.on_rank_message(msg)
        if reply_type is FlushCacheReqOutput:
            return FlushCacheReqOutput(all(r.success for r in replies))
        return merge_loads(replies, [s.placed for s in self.policy.ranks])

    def on_rank_message(self, msg: Any) -> None:
        if isinstance(msg, LoadReport):
            self.policy.update(msg.load)
        else:
            logger.warning("controller dropped an unexpected %s", type(msg).__name__)
