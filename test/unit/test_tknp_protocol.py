"""Round trips of every message a TKNP step sends between ranks (distributed/tknp_protocol.py).

Batches come from the scheduler's own ScheduleBatch.to_forward_batch, so the messages carry what
real steps carry: prefill chunks that sample nothing, decodes across page boundaries, and prompt
logprob rows with and without top logprobs.
"""

import pytest
import torch
from sglang.srt.distributed.tknp_protocol import (
    LogitsRows,
    StepHeader,
    pack_batch,
    pack_logits,
    pack_qkv,
    qkv_width,
    unpack_batch,
    unpack_logits,
    unpack_qkv,
)
from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, ScheduledReq
from sglang.srt.model_executor.forward_batch import ForwardMode
from sglang.srt.sampling.sampling_params import SamplingParams

VOCAB = 50


def _req(prompt_len: int, kv_len: int, output_len: int = 0, logprob_start: int = -1, top_k: int = 0) -> Req:
    req = Req(
        rid=f"r{prompt_len}-{kv_len}",
        origin_input_ids=[(7 * i + prompt_len) % VOCAB for i in range(prompt_len)],
        sampling_params=SamplingParams(max_new_tokens=8),
        seed=0,
        return_logprob=logprob_start >= 0,
        logprob_start_len=logprob_start,
        top_logprobs_num=top_k,
    )
    req.output_ids = [(3 * i + 1) % VOCAB for i in range(output_len)]
    req.kv_len = kv_len
    req.req_pool_idx = 0
    return req


def _batch(*items: tuple[Req, int, bool]):
    batch = ScheduleBatch([ScheduledReq(req, n, samples) for req, n, samples in items])
    return batch.to_forward_batch(torch.arange(batch.num_tokens(), dtype=torch.int64))


BATCHES = {
    "one decode": lambda: _batch((_req(5, 5, output_len=1), 1, True)),
    "one prefill": lambda: _batch((_req(9, 0), 9, True)),
    # pages of 16: decodes whose new token opens a page, ends one, and sits mid-page; a chunk
    # of 16 that stops at a page boundary and samples nothing
    "pages of 16": lambda: _batch(
        (_req(16, 16, output_len=1), 1, True),
        (_req(20, 31, output_len=12), 1, True),
        (_req(10, 24, output_len=15), 1, True),
        (_req(40, 16), 16, False),
    ),
    "logprob rows": lambda: _batch(
        (_req(12, 0, logprob_start=3, top_k=4), 12, True),
        (_req(30, 16, logprob_start=0), 8, False),
        (_req(6, 6, output_len=1), 1, True),
    ),
}


def test_an_empty_partition_sends_nothing():
    header = StepHeader.of(None)
    assert header == StepHeader.unpack([0, 0, 0, 0, 0])
    assert header.batch_len() == 0 and header.logits_len(VOCAB) == 0
    # it pads to the step's bucket when every other partition is a plain decode (graphs)
    assert header.is_plain_decode


@pytest.mark.parametrize("name", sorted(BATCHES))
def test_batch_round_trip(name):
    batch = BATCHES[name]()
    header = StepHeader.unpack(StepHeader.of(batch).pack())
    packed = pack_batch(batch)
    assert packed.dtype == torch.int64 and packed.numel() == header.batch_len()
    got = unpack_batch(packed, header)
    for field in ("input_ids", "positions", "seq_lens", "sample_indices"):
        assert torch.equal(getattr(got, field), getattr(batch, field)), field
    assert got.seq_lens_cpu == batch.seq_lens_cpu
    assert got.kv_lens == batch.kv_lens
    assert got.extend_lens == batch.extend_lens
    assert got.forward_mode == batch.forward_mode
    assert got.input_top_logprobs_num == batch.input_top_logprobs_num
    if batch.logprob_indices is None:
        assert got.logprob_indices is None and got.logprob_target_ids is None
    else:
        assert torch.equal(got.logprob_indices, batch.logprob_indices)
        assert torch.equal(got.logprob_target_ids, batch.logprob_target_ids)
    # slots and pool rows mean something only on the owner rank
    assert got.out_cache_loc.numel() == 0 and got.req_pool_indices.numel() == 0


def test_headers_say_which_steps_are_plain_decodes():
    assert StepHeader.of(BATCHES["one decode"]()).is_plain_decode
    assert BATCHES["one decode"]().forward_mode == ForwardMode.DECODE
    for name in ("one prefill", "pages of 16", "logprob rows"):
        assert not StepHeader.of(BATCHES[name]()).is_plain_decode, name


def _logits_rows(header: StepHeader, dtype: torch.dtype) -> LogitsRows:
    g = torch.Generator().manual_seed(header.samples * 31 + header.logprobs)
    logits = torch.randn(header.samples, VOCAB, generator=g).to(dtype)
    if not header.logprobs:
        return LogitsRows(logits)
    lps = -torch.rand(header.logprobs, generator=g)
    top = None
    if header.top_k:
        top = (
            -torch.rand(header.logprobs, header.top_k, generator=g),
            torch.randint(VOCAB, (header.logprobs, header.top_k)),
        )
    return LogitsRows(logits, lps, top)


@pytest.mark.parametrize("name", sorted(BATCHES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_round_trip(name, dtype):
    header = StepHeader.of(BATCHES[name]())
    rows = _logits_rows(header, dtype)
    floats, top_ids = pack_logits(rows)
    assert floats.dtype == torch.float32 and floats.numel() == header.logits_len(VOCAB)
    assert (top_ids is None) == (header.top_k == 0 or header.logprobs == 0)
    if top_ids is not None:
        assert top_ids.shape == (header.logprobs, header.top_k)
    got = unpack_logits(floats, top_ids, header, VOCAB)
    assert torch.equal(got.next_token_logits, rows.next_token_logits.float())
    if header.logprobs:
        assert torch.equal(got.input_token_logprobs, rows.input_token_logprobs)
    else:
        assert got.input_token_logprobs is None
    if header.logprobs and header.top_k:
        assert torch.equal(got.input_top_logprobs[0], rows.input_top_logprobs[0])
        assert torch.equal(got.input_top_logprobs[1], rows.input_top_logprobs[1])
    else:
        assert got.input_top_logprobs is None


def test_logprob_rows_of_a_chunk_that_samples_nothing():
    """A prefill chunk that scores prompt tokens but samples no token still gets its rows."""
    batch = _batch((_req(30, 16, logprob_start=0, top_k=2), 8, False))
    header = StepHeader.of(batch)
    assert header.samples == 0 and header.logprobs == 8 and header.top_k == 2
    rows = _logits_rows(header, torch.float32)
    got = unpack_logits(*pack_logits(rows), header, VOCAB)
    assert got.next_token_logits.shape == (0, VOCAB)
    assert torch.equal(got.input_top_logprobs[1], rows.input_top_logprobs[1])


@pytest.mark.parametrize("tokens", [0, 1, 7])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qkv_round_trip(tokens, dtype):
    heads, kv_heads, dim = 6, 2, 8
    q = torch.randn(tokens, heads, dim).to(dtype)
    k = torch.randn(tokens, kv_heads, dim).to(dtype)
    v = torch.randn(tokens, kv_heads, dim).to(dtype)
    packed = pack_qkv(q, k, v)
    assert packed.shape == (tokens, qkv_width(heads, kv_heads, dim)) and packed.dtype == dtype
    for got, want in zip(unpack_qkv(packed, heads, kv_heads, dim), (q, k, v)):
        assert torch.equal(got, want)


@pytest.mark.parametrize("tokens", [0, 1, 7])
def test_fused_qkv_packs_without_copy(tokens):
    """q/k/v that are the column blocks of one projection output are already a message: packing
    a row range of them gives a view of those rows (what the root sends a partition), and a
    message's row range unpacks to the same views."""
    heads, kv_heads, dim = 6, 2, 8
    width = qkv_width(heads, kv_heads, dim)
    fused = torch.randn(tokens + 3, width)
    q, k, v = fused.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    q, k, v = q.view(-1, heads, dim), k.view(-1, kv_heads, dim), v.view(-1, kv_heads, dim)
    rows = slice(2, 2 + tokens)
    packed = pack_qkv(q[rows], k[rows], v[rows])
    assert torch.equal(packed, fused[rows])
    if tokens:
        assert packed.data_ptr() == fused[rows].data_ptr()
    for got, want in zip(unpack_qkv(fused[rows], heads, kv_heads, dim), (q[rows], k[rows], v[rows])):
        assert torch.equal(got, want)
    # the blocks out of order, or copied: packed by concatenation, the same values
    swapped = pack_qkv(q[rows], v[rows], k[rows])
    assert torch.equal(swapped, torch.cat((q[rows].flatten(1), v[rows].flatten(1), k[rows].flatten(1)), dim=1))
    assert torch.equal(pack_qkv(q[rows].clone(), k[rows].clone(), v[rows].clone()), fused[rows])
