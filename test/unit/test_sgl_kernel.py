"""sgl_kernel's operators against plain-torch references, on every ISA this CPU can run.

`make` builds the library before the tests run, so a missing build fails here rather than
skipping. References compute in float64 on the same (possibly bf16-rounded) inputs.
"""

from __future__ import annotations

import math

import pytest
import sgl_kernel
import torch
import torch.nn.functional as F

ops = sgl_kernel.ops
ISAS = sgl_kernel.supported_isas()
# q dtype, KV cache dtype: float32 everywhere, bf16 everywhere, float32 compute on a bf16 cache
ATTN_DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]


@pytest.fixture(params=ISAS)
def isa(request):
    before = sgl_kernel.isa()
    sgl_kernel.set_isa(request.param)
    yield request.param
    sgl_kernel.set_isa(before)


def _tol(dtype: torch.dtype) -> dict:
    return dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)


def test_the_best_isa_is_active_and_every_path_is_listed():
    assert sgl_kernel.isa() == ISAS[0]
    assert ISAS[-1] == "generic"
    with pytest.raises(RuntimeError, match="unknown ISA"):
        sgl_kernel.set_isa("sse9")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ops_run_on_torchs_threads(threads):
    # a build without OpenMP runs at::parallel_for inline: every op on one thread, silently
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert sgl_kernel.parallel_threads() == threads
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- elementwise ops


def _rmsnorm_ref(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.double()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (w.double() * h.to(x.dtype).double()).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(0, 64), (1, 576), (7, 100), (33, 896)])
def test_rmsnorm(isa, dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    out = torch.empty_like(x)
    ops.rmsnorm(out, x, w, 1e-6)
    torch.testing.assert_close(out, _rmsnorm_ref(x, w, 1e-6), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,hidden", [(1, 576), (5, 100), (17, 256)])
def test_fused_add_rmsnorm(isa, dtype, rows, hidden):
    g = torch.Generator().manual_seed(hidden)
    x = torch.randn(rows, hidden, generator=g).to(dtype)
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    w = torch.randn(hidden, generator=g).to(dtype)
    summed = x + residual  # rounded to dtype, as the engine's residual stream is
    x_k, res_k = x.clone(), residual.clone()
    ops.fused_add_rmsnorm(x_k, res_k, w, 1e-5)
    torch.testing.assert_close(res_k, summed, atol=0, rtol=0)
    torch.testing.assert_close(x_k, _rmsnorm_ref(summed, w, 1e-5), **_tol(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 128, 40])
def test_rotary_embedding_on_strided_q_k(isa, dtype, head_dim):
    g = torch.Generator().manual_seed(head_dim)
    tokens, hq, hk, max_pos = 9, 6, 2, 300
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    freqs = torch.outer(torch.arange(max_pos).float(), inv_freq)
    cos, sin = freqs.cos(), freqs.sin()
    # q and k are views into one fused qkv row, as the models produce them
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=g).to(dtype)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim : (hq + hk) * head_dim].view(tokens, hk, head_dim)
    pos = torch.randint(0, max_pos, (tokens,), generator=g)

    def ref(x):
        x = x.double()
        c, s = cos[pos].double().unsqueeze(1), sin[pos].double().unsqueeze(1)
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
        return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(dtype)

    q_ref, k_ref, v_before = ref(q), ref(k), qkv[:, (hq + hk) * head_dim :].clone()
    ops.rotary_embedding(pos, q, k, cos, sin)
    torch.testing.assert_close(q, q_ref, **_tol(dtype))
    torch.testing.assert_close(k, k_ref, **_tol(dtype))
    assert torch.equal(qkv[:, (hq + hk) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,width", [(0, 16), (1, 1536), (3, 100)])
def test_silu_and_mul(isa, dtype, rows, width):
    x = (4 * torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(width))).to(dtype)
    out = torch.empty(rows, width, dtype=dtype)
    ops.silu_and_mul(out, x)
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(out, F.silu(gate) * up, **_tol(dtype))


@pytest.mark.parametrize("n", [1, 7, 255, 256, 257, 1000, 49152])
def test_argmax_matches_torch(isa, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(9, n, generator=g)
    x[1] = 0.5  # all equal: the first
    x[2] = float("-inf")
    x[3, n // 2] = float("nan")
    x[4, n - 1] = float("inf")
    x[5, n // 3] = x[5, n - 1] = 10.0  # equal maxima in different blocks: the first
    x[6, -1] = float("nan")
    x[6, 0] = float("inf")
    x[7, n // 2] = float("-inf")
    out = ops.argmax(x[:, :n])
    assert out.dtype == torch.int64
    assert out.tolist() == torch.argmax(x, dim=-1).tolist()
    assert ops.argmax(x[8:8, :]).shape == (0,)


def test_argmax_takes_row_strides():
    x = torch.randn(4, 300)[:, :200]  # rows with a stride of 300
    assert ops.argmax(x).tolist() == torch.argmax(x, dim=-1).tolist()
    with pytest.raises(RuntimeError, match="float32"):
        ops.argmax(x.bfloat16())


@pytest.mark.parametrize(
    "src,cache", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)]
)
def test_store_kv(isa, src, cache):
    g = torch.Generator().manual_seed(0)
    k_cache = torch.zeros(40, 3, 64, dtype=cache)
    v_cache = torch.zeros(40, 3, 64, dtype=cache)
    kv = torch.randn(5, 2 * 3 * 64, generator=g).to(src)
    k, v = kv[:, : 3 * 64].view(5, 3, 64), kv[:, 3 * 64 :].view(5, 3, 64)
    loc = torch.tensor([7, 1, 39, 20, 21])
    ops.store_kv(k_cache, v_cache, loc, k, v)
    assert torch.equal(k_cache[loc], k.to(cache)) and torch.equal(v_cache[loc], v.to(cache))
    others = torch.ones(40, dtype=torch.bool)
    others[loc] = False
    assert not k_cache[others].any() and not v_cache[others].any()
    ops.store_kv(k_cache, v_cache, loc[:0], k[:0], v[:0])  # an empty batch writes nothing


# ---------------------------------------------------------------- paged attention


def _paged_pool(seq_lens: list[int], page_size: int, hkv: int, d: int, dtype, seed: int):
    """A KV pool whose requests hold shuffled pages, and the req_to_token table naming their slots."""
    g = torch.Generator().manual_seed(seed)
    pages_per_req = [math.ceil(n / page_size) for n in seq_lens]
    num_pages = sum(pages_per_req) + 3
    order = torch.randperm(num_pages, generator=g) + 1  # page 0 is the padding page
    max_len = max(seq_lens, default=1)
    req_to_token = torch.zeros(len(seq_lens) + 2, max_len + 5, dtype=torch.int64)
    rows = torch.randperm(len(seq_lens) + 2, generator=g)[: len(seq_lens)]
    taken = 0
    for i, n in enumerate(seq_lens):
        pages = order[taken : taken + pages_per_req[i]]
        taken += pages_per_req[i]
        slots = (pages.unsqueeze(1) * page_size + torch.arange(page_size)).flatten()[:n]
        req_to_token[rows[i], :n] = slots
    k_cache = torch.randn((num_pages + 1) * page_size, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn((num_pages + 1) * page_size, hkv, d, generator=g).to(dtype)
    return k_cache, v_cache, req_to_token, rows


def _attention_ref(q, k_cache, v_cache, req_to_token, rows, seq_lens, extend_lens, scale):
    """float64: request b's extend_lens[b] query rows are the last of its seq_lens[b] tokens."""
    out = torch.empty(q.shape, dtype=torch.float64)
    group = q.shape[1] // k_cache.shape[1]
    start = 0
    for b, (n, e) in enumerate(zip(seq_lens, extend_lens)):
        slots = req_to_token[rows[b], :n]
        k = k_cache[slots].double().repeat_interleave(group, dim=1)  # [S, H, D]
        v = v_cache[slots].double().repeat_interleave(group, dim=1)
        qb = q[start : start + e].double()
        s = torch.einsum("ehd,shd->hes", qb, k) * scale
        q_pos = torch.arange(n - e, n).unsqueeze(1)
        s = s.masked_fill(torch.arange(n).unsqueeze(0) > q_pos, float("-inf"))
        out[start : start + e] = torch.einsum("hes,shd->ehd", s.softmax(-1), v)
        start += e
    return out


@pytest.mark.parametrize("q_dtype,kv_dtype", ATTN_DTYPES)
@pytest.mark.parametrize(
    "head_dim,heads,kv_heads",
    [(64, 3, 3), (64, 9, 3), (128, 8, 2), (128, 16, 2), (64, 24, 2), (16, 4, 2), (80, 4, 1), (256, 2, 2)],
)
@pytest.mark.parametrize("page_size", [1, 16])
def test_decode_attention(isa, q_dtype, kv_dtype, head_dim, heads, kv_heads, page_size):
    seq_lens = [1, 17, 130, 5, 64, 333, 2]
    k_cache, v_cache, r2t, rows = _paged_pool(seq_lens, page_size, kv_heads, head_dim, kv_dtype, seed=heads)
    # q rows are views of a wider fused row, as the models produce them
    qkv = torch.randn(len(seq_lens), heads * head_dim + 7, generator=torch.Generator().manual_seed(1)).to(q_dtype)
    q = qkv[:, : heads * head_dim].view(-1, heads, head_dim)
    out = torch.empty(q.shape, dtype=q_dtype)
    scale = head_dim**-0.5
    ops.decode_attention(out, q, k_cache, v_cache, r2t, rows, torch.tensor(seq_lens), scale)
    ref = _attention_ref(q, k_cache, v_cache, r2t, rows, seq_lens, [1] * len(seq_lens), scale)
    torch.testing.assert_close(out.double(), ref, **_tol(q_dtype))


@pytest.mark.parametrize("q_dtype,kv_dtype", ATTN_DTYPES)
@pytest.mark.parametrize("seq_len", [1, 63, 64, 4000])
def test_decode_attention_splits_long_contexts(isa, q_dtype, kv_dtype, seq_len):
    # one request, one KV head: the context is split across threads and merged by log-sum-exp
    k_cache, v_cache, r2t, rows = _paged_pool([seq_len], 16, 1, 128, kv_dtype, seed=seq_len)
    q = torch.randn(1, 4, 128, generator=torch.Generator().manual_seed(2)).to(q_dtype)
    out = torch.empty_like(q)
    ops.decode_attention(out, q, k_cache, v_cache, r2t, rows, torch.tensor([seq_len]), 0.2)
    ref = _attention_ref(q, k_cache, v_cache, r2t, rows, [seq_len], [1], 0.2)
    torch.testing.assert_close(out.double(), ref, **_tol(q_dtype))


def test_decode_attention_empty_batch(isa):
    k_cache, v_cache, r2t, _ = _paged_pool([4], 1, 2, 64, torch.float32, seed=0)
    q = torch.empty(0, 4, 64)
    out = torch.empty_like(q)
    empty = torch.empty(0, dtype=torch.int64)
    ops.decode_attention(out, q, k_cache, v_cache, r2t, empty, empty, 0.125)
    ops.extend_attention(out, q, k_cache, v_cache, r2t, empty, empty, empty, empty, 0.125)


@pytest.mark.parametrize("q_dtype,kv_dtype", ATTN_DTYPES)
@pytest.mark.parametrize(
    "head_dim,heads,kv_heads", [(64, 3, 3), (64, 9, 3), (128, 8, 2), (128, 16, 2), (32, 4, 2), (96, 3, 1)]
)
@pytest.mark.parametrize("page_size", [1, 16])
def test_extend_attention_with_cached_prefixes(isa, q_dtype, kv_dtype, head_dim, heads, kv_heads, page_size):
    # prefill chunks after cached prefixes, a fresh prompt, and decodes, in one call
    seq_lens = [70, 33, 1, 100, 6]
    extend_lens = [70, 1, 1, 37, 5]
    k_cache, v_cache, r2t, rows = _paged_pool(seq_lens, page_size, kv_heads, head_dim, kv_dtype, seed=head_dim + heads)
    q = torch.randn(sum(extend_lens), heads, head_dim, generator=torch.Generator().manual_seed(3)).to(q_dtype)
    out = torch.empty_like(q)
    q_start = torch.tensor([0] + extend_lens[:-1]).cumsum(0)
    scale = head_dim**-0.5
    ops.extend_attention(
        out, q, k_cache, v_cache, r2t, rows, torch.tensor(seq_lens), torch.tensor(extend_lens), q_start, scale
    )
    ref = _attention_ref(q, k_cache, v_cache, r2t, rows, seq_lens, extend_lens, scale)
    torch.testing.assert_close(out.double(), ref, **_tol(q_dtype))


def test_attention_rejects_unsupported_shapes():
    k_cache, v_cache, r2t, rows = _paged_pool([4], 1, 2, 48, torch.float32, seed=0)
    q = torch.randn(1, 4, 48)
    with pytest.raises(RuntimeError, match="head_dim must be one of"):
        ops.decode_attention(torch.empty_like(q), q, k_cache, v_cache, r2t, rows, torch.tensor([4]), 0.1)
    k_cache, v_cache, r2t, rows = _paged_pool([4], 1, 3, 64, torch.float32, seed=0)
    q = torch.randn(1, 4, 64)
    with pytest.raises(RuntimeError, match="do not group"):
        ops.decode_attention(torch.empty_like(q), q, k_cache, v_cache, r2t, rows, torch.tensor([4]), 0.1)


# ---------------------------------------------------------------- bf16 linear
# Every ISA runs it: AVX512-BF16 with bf16 dot products, the others widening the weights to
# float32 (AVX2 takes rows 5 at a time, AVX-512 8: m covers whole passes and every remainder).


@pytest.mark.parametrize("m", [0, 1, 3, 5, 8, 13, 32])
@pytest.mark.parametrize(
    "n,k,bias", [(576, 576, False), (1536, 576, True), (100, 64, True), (48, 1536, False), (40, 70, True)]
)
def test_linear_matches_torch(isa, m, n, k, bias):
    g = torch.Generator().manual_seed(m * n + k)
    x = torch.randn(m, k, generator=g).bfloat16()
    w = (torch.randn(n, k, generator=g) / math.sqrt(k)).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    packed = ops.pack_linear_weight(w)
    bias_f = None
    if bias:
        bias_f = torch.zeros(packed.shape[0] * 16)
        bias_f[:n] = b.float()
    ref = x.double() @ w.double().t() + (b.double() if bias else 0)
    out = ops.linear(x, packed, bias_f, n, False)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)
    out32 = ops.linear(x, packed, bias_f, n, True)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, atol=1e-4, rtol=1e-4)


def test_linear_keeps_leading_dims_and_strided_rows(isa):
    w = torch.randn(64, 128).bfloat16()
    x = torch.randn(2, 3, 256).bfloat16()[..., :128]  # rows with a stride of 256
    out = ops.linear(x, ops.pack_linear_weight(w), None, 64, False)
    assert out.shape == (2, 3, 64)
    torch.testing.assert_close(out.float(), (x.float() @ w.float().t()), atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("arithmetic", [True, False])
def test_linear_layer_keeps_the_unpacked_weight_only_where_torch_takes_some_sizes(monkeypatch, arithmetic):
    """With bf16 arithmetic oneDNN runs the bf16 matmuls past LINEAR_KERNEL_MAX_ROWS from the
    unpacked weight; without it the kernel takes every size and the unpacked weight is freed
    (the memory plan, which sums parameters and buffers, then counts the packed one only)."""
    from sglang.srt.layers import linear

    monkeypatch.setattr(linear, "cpu_has_bf16_arithmetic", lambda: arithmetic)
    layer = linear.Linear(64, 40, bias=True)
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(40, 64, generator=g) / 8).bfloat16()
    b = torch.randn(40, generator=g).bfloat16()
    layer.weight.data, layer.bias.data = w.clone(), b.clone()
    assert layer.use_cpu_kernels(ops)
    assert layer.weight.numel() == (w.numel() if arithmetic else 0)
    held = sum(t.numel() for t in list(layer.parameters()) + list(layer.buffers()) if t.dtype == torch.bfloat16)
    assert held == layer.packed_weight.numel() + b.numel() + (w.numel() if arithmetic else 0)
    for rows in (1, 3, linear.LINEAR_KERNEL_MAX_ROWS + 30):
        x = torch.randn(rows, 64, generator=g).bfloat16()
        ref = x.double() @ w.double().t() + b.double()
        torch.testing.assert_close(layer(x).double(), ref, atol=3e-2, rtol=2e-2)
