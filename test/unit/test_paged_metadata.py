"""Page tables for paged attention (paged_metadata), checked three ways on CPU: exact arrays for a
hand-built batch; FlashInfer's semantics (paged_attention_ref) fed with them against the
torch_native backend for prefill, chunked prefill after a cached prefix, decode and mixed
batches at page sizes 1 and 16; and FlashInferAttnBackend's wiring, run on a stand-in flashinfer
module built on the same reference (the real kernels need a GPU)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pytest
import torch
from paged_attention_ref import paged_attention
from sglang.srt.layers.attention.base import AttentionShape
from sglang.srt.layers.attention.paged_metadata import PagedKVMetadata, build_paged_kv_metadata
from sglang.srt.layers.attention.registry import create_attention_backend
from sglang.srt.layers.attention.torch_native import TorchNativeAttnBackend
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
from sglang.srt.model_executor.cuda_graph_runner import pad_decode_batch
from sglang.srt.model_executor.forward_batch import ForwardBatch, ForwardMode

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 4, 2, 8
NUM_LAYERS = 2

# (kv_len, extend_len) per request. Lengths straddle page boundaries at page size 16
# (16, 32: full last page; 17, 33: one token on a fresh page).
CASES = {
    "prefill": [(0, 7), (0, 19), (0, 1), (0, 32)],
    "chunked_prefill": [(13, 9), (32, 16), (5, 30), (16, 1)],
    "decode": [(20, 1), (15, 1), (31, 1), (32, 1), (0, 1)],
    "mixed": [(20, 1), (7, 12), (33, 1), (0, 5), (16, 17)],
}


@dataclass
class Batch:
    forward_batch: ForwardBatch
    q: torch.Tensor  # [T, H, D]
    k: torch.Tensor  # [T, Hkv, D]
    v: torch.Tensor


def make_batch(
    reqs: list[tuple[int, int]], page_size: int, kv_dtype: torch.dtype = torch.float32, seed: int = 0
) -> Batch:
    """A batch over a random KV pool whose requests own shuffled whole pages (page 0 unused), in
    shuffled req_to_token rows; prefix tokens already hold random k/v, as a cached prefix would."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in reqs]
    pages_needed = sum(-(-s // page_size) for s in seq_lens)
    num_pages = pages_needed + 3  # spare pages whose garbage must never be read
    pool = MHATokenToKVPool(num_pages * page_size, kv_dtype, NUM_KV_HEADS, HEAD_DIM, NUM_LAYERS, page_size=page_size)
    for buf in pool.k_buffer + pool.v_buffer:
        buf.copy_(torch.randn(buf.shape, generator=gen))
    req_pool = ReqToTokenPool(len(reqs) + 3, max(seq_lens) + 1)
    rows = torch.randperm(req_pool.size, generator=gen)[: len(reqs)]
    free_pages = (torch.randperm(num_pages, generator=gen) + 1).tolist()
    out_cache_loc, positions = [], []
    for row, (kv_len, extend_len) in zip(rows.tolist(), reqs):
        seq_len = kv_len + extend_len
        pages = torch.tensor([free_pages.pop() for _ in range(-(-seq_len // page_size))])
        slots = (pages.repeat_interleave(page_size) * page_size + torch.arange(page_size).repeat(len(pages)))[:seq_len]
        req_pool.write(row, 0, slots)
        out_cache_loc.append(slots[kv_len:])
        positions.append(torch.arange(kv_len, seq_len))
    extend_lens = [e for _, e in reqs]
    num_tokens = sum(extend_lens)
    fb = ForwardBatch(
        forward_mode=ForwardMode.of(extend_lens),
        input_ids=torch.zeros(num_tokens, dtype=torch.int64),
        positions=torch.cat(positions),
        out_cache_loc=torch.cat(out_cache_loc),
        req_pool_indices=rows,
        seq_lens=torch.tensor(seq_lens),
        seq_lens_cpu=seq_lens,
        kv_lens=[p for p, _ in reqs],
        extend_lens=extend_lens,
        sample_indices=torch.tensor(extend_lens).cumsum(0) - 1,
        req_to_token_pool=req_pool,
        token_to_kv_pool=pool,
    )
    q = torch.randn(num_tokens, NUM_HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, generator=gen)
    return Batch(fb, q, k, v)


def make_layer(layer_id: int = 0) -> RadixAttention:
    return RadixAttention(NUM_HEADS, HEAD_DIM, HEAD_DIM**-0.5, NUM_KV_HEADS, layer_id)


def shape_for(batch: Batch) -> AttentionShape:
    kv_dtype = batch.forward_batch.token_to_kv_pool.get_kv_buffer(0)[0].dtype
    return AttentionShape.of([make_layer()], batch.q.dtype, kv_dtype)


def run_torch_native(batch: Batch, layer: RadixAttention) -> torch.Tensor:
    backend = TorchNativeAttnBackend(shape_for(batch), "cpu")
    batch.forward_batch.attn_backend = backend
    backend.init_forward_metadata(batch.forward_batch)
    return backend.forward(batch.q, batch.k, batch.v, layer, batch.forward_batch)


def run_reference(batch: Batch, meta: PagedKVMetadata, layer: RadixAttention) -> torch.Tensor:
    """FlashInfer's semantics over the pool as torch_native left it (new k/v written)."""
    k_cache, v_cache = batch.forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id)
    paged = [c.view(-1, meta.page_size, NUM_KV_HEADS, HEAD_DIM) for c in (k_cache, v_cache)]
    out = paged_attention(
        batch.q, *paged, meta.qo_indptr, meta.kv_indptr, meta.kv_indices, meta.kv_last_page_len, layer.scaling
    )
    return out.flatten(1)


def test_arrays_of_a_hand_built_batch():
    # page size 4; request A (row 2): 6 tokens on pages 3, 7; request B (row 0): 4 tokens on page 2
    req_pool = ReqToTokenPool(3, 8)
    req_pool.write(2, 0, torch.tensor([12, 13, 14, 15, 28, 29]))
    req_pool.write(0, 0, torch.tensor([8, 9, 10, 11]))
    fb = ForwardBatch(
        forward_mode=ForwardMode.EXTEND,
        input_ids=torch.zeros(5, dtype=torch.int64),
        positions=torch.tensor([2, 3, 4, 5, 3]),
        out_cache_loc=torch.tensor([14, 15, 28, 29, 11]),
        req_pool_indices=torch.tensor([2, 0]),
        seq_lens=torch.tensor([6, 4]),
        seq_lens_cpu=[6, 4],
        kv_lens=[2, 3],
        extend_lens=[4, 1],
        sample_indices=torch.tensor([3, 4]),
        req_to_token_pool=req_pool,
    )
    meta = build_paged_kv_metadata(fb, page_size=4)
    assert meta.qo_indptr.tolist() == [0, 4, 5]
    assert meta.kv_indptr.tolist() == [0, 2, 3]
    assert meta.kv_indices.tolist() == [3, 7, 2]
    assert meta.kv_last_page_len.tolist() == [2, 4]
    one = build_paged_kv_metadata(fb, page_size=1)
    assert one.kv_indptr.tolist() == [0, 6, 10]
    assert one.kv_indices.tolist() == [12, 13, 14, 15, 28, 29, 8, 9, 10, 11]
    assert one.kv_last_page_len.tolist() == [1, 1]


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_reference_on_metadata_matches_torch_native(case: str, page_size: int):
    batch = make_batch(CASES[case], page_size)
    layer = make_layer(layer_id=1)
    expected = run_torch_native(batch, layer)
    meta = build_paged_kv_metadata(batch.forward_batch, page_size)
    assert meta.kv_indices.min() >= 1, "page 0 is reserved"
    torch.testing.assert_close(run_reference(batch, meta, layer), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
def test_torch_native_metadata_follows_the_batch_device(case: str):
    """Every tensor torch_native builds sits on the batch's device: a factory call that forgets it
    lands on the default device, made `meta` here, and then meets the batch's CPU tensors (on a
    GPU it landed on the CPU and met CUDA ones, as the first GPU session found)."""
    batch = make_batch(CASES[case], page_size=1)
    backend = TorchNativeAttnBackend(shape_for(batch), "cpu")
    with torch.device("meta"):
        backend.init_forward_metadata(batch.forward_batch)
    meta = batch.forward_batch.attn_metadata
    tensors = [meta.single_kv_slots, meta.single_mask, meta.single_rows] + [s.mask for s in meta.extends]
    assert all(t.device.type == "cpu" for t in tensors if t is not None)
    torch.testing.assert_close(
        backend.forward(batch.q, batch.k, batch.v, make_layer(), batch.forward_batch),
        run_torch_native(make_batch(CASES[case], page_size=1), make_layer()),
    )


def test_a_wrong_last_page_len_is_caught():
    """The comparison above can fail: one token short in the last page changes the output."""
    batch = make_batch(CASES["chunked_prefill"], page_size=16)
    layer = make_layer()
    expected = run_torch_native(batch, layer)
    meta = build_paged_kv_metadata(batch.forward_batch, 16)
    # keep the last query's own key so a causal row cannot end up empty (NaN)
    meta.kv_last_page_len = torch.where(meta.kv_last_page_len > 1, meta.kv_last_page_len - 1, meta.kv_last_page_len)
    assert not torch.allclose(run_reference(batch, meta, layer), expected, atol=1e-3)


@pytest.fixture
def flashinfer_backend_for(fake_flashinfer):
    """FlashInferAttnBackend for a batch's shape, imported through the registry against the
    stand-in flashinfer."""
    return lambda batch: create_attention_backend("flashinfer", shape_for(batch), "cpu")


@pytest.mark.parametrize("page_size", [1, 16])
@pytest.mark.parametrize("case", list(CASES))
def test_flashinfer_backend_wiring_matches_torch_native(flashinfer_backend_for, case: str, page_size: int):
    native_batch = make_batch(CASES[case], page_size, kv_dtype=torch.bfloat16)
    batch = make_batch(CASES[case], page_size, kv_dtype=torch.bfloat16)  # same seed: same pool
    backend = flashinfer_backend_for(batch)
    batch.forward_batch.attn_backend = backend
    backend.init_forward_metadata(batch.forward_batch)
    for layer in (make_layer(0), make_layer(1)):
        out = backend.forward(batch.q, batch.k, batch.v, layer, batch.forward_batch)
        torch.testing.assert_close(out, run_torch_native(native_batch, layer), atol=1e-5, rtol=1e-5)
        # k/v of the new tokens went into the pool, at the same slots torch_native wrote them
        for mine, native in zip(
            batch.forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id),
            native_batch.forward_batch.token_to_kv_pool.get_kv_buffer(layer.layer_id),
        ):
            assert torch.equal(mine, native)
    used, unused = backend._decode_wrapper, backend._prefill_wrapper
    if case != "decode":
        used, unused = unused, used
    assert (used.num_plans, used.num_runs) == (1, 2), "planned once per batch, run by every layer"
    assert (unused.num_plans, unused.num_runs) == (0, 0)


def test_flashinfer_backend_replans_for_each_batch(flashinfer_backend_for):
    backend = None
    for seed in (1, 2):
        batch = make_batch(CASES["decode"], 16, kv_dtype=torch.float16, seed=seed)
        backend = backend or flashinfer_backend_for(batch)
        backend.init_forward_metadata(batch.forward_batch)
        backend.forward(batch.q, batch.k, batch.v, make_layer(), batch.forward_batch)
    assert backend._decode_wrapper.num_plans == 2


def test_flashinfer_backend_rejects_a_float32_kv_cache(flashinfer_backend_for):
    batch = make_batch(CASES["decode"], 1, kv_dtype=torch.float32)
    with pytest.raises(ValueError, match="--attention-backend flashinfer needs a 16-bit KV cache"):
        flashinfer_backend_for(batch)


@pytest.mark.parametrize("page_size", [1, 16])
def test_flashinfer_backend_cuda_graph_path(flashinfer_backend_for, page_size: int):
    """CUDA-graph mode, as CudaGraphRunner drives it: a bucket's wrapper (fixed buffers) is
    planned at capture over static buffers of padding requests, re-planned before the replay
    for a padded decode batch copied into them, and the real rows match torch_native."""
    native_batch = make_batch(CASES["decode"], page_size, kv_dtype=torch.bfloat16)
    batch = make_batch(CASES["decode"], page_size, kv_dtype=torch.bfloat16)
    fb, bucket = batch.forward_batch, 8
    backend = flashinfer_backend_for(batch)
    backend.init_cuda_graph_state(bucket, fb.req_to_token_pool.max_context_len, fb.token_to_kv_pool)
    padded = pad_decode_batch(fb, bucket, fb.req_to_token_pool.padding_row)
    zeros = lambda: torch.zeros(bucket, dtype=torch.int64)  # noqa: E731
    static = dataclasses.replace(
        padded,
        input_ids=zeros(),
        positions=zeros(),
        out_cache_loc=zeros(),
        req_pool_indices=torch.full((bucket,), fb.req_to_token_pool.padding_row),
        seq_lens=torch.ones(bucket, dtype=torch.int64),
        seq_lens_cpu=[1] * bucket,
        kv_lens=[0] * bucket,
        extend_lens=[1] * bucket,
    )
    layer = make_layer()
    backend.init_forward_metadata_capture(static)
    q0 = torch.zeros(bucket, NUM_HEADS, HEAD_DIM)
    kv0 = torch.zeros(bucket, NUM_KV_HEADS, HEAD_DIM)
    backend.forward(q0, kv0, kv0, layer, static)  # the warmup before capture

    for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens"):
        getattr(static, name).copy_(getattr(padded, name))
    backend.init_forward_metadata_replay(padded)
    pad_rows = lambda x: torch.cat([x, x.new_zeros((bucket - x.shape[0], *x.shape[1:]))])  # noqa: E731
    # what the captured kernels compute on replay: the capture's metadata, the buffers' tables
    out = backend.forward(pad_rows(batch.q), pad_rows(batch.k), pad_rows(batch.v), layer, static)
    torch.testing.assert_close(out[: fb.batch_size], run_torch_native(native_batch, layer), atol=1e-5, rtol=1e-5)
    wrapper = backend._graph_wrappers[bucket]
    assert wrapper.graph_buffers is not None and wrapper.num_plans == 2, "planned at capture, then per replay"
    assert backend._decode_wrapper.num_plans == 0, "the eager decode wrapper is not involved"
