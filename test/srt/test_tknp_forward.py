"""TKNP and TP forwards across real processes (gloo): every rank gets the logits it would get
from a plain single-rank forward of its own requests; weights live on the root's TP ranks only,
each holding its shard."""

import pytest
import torch
from conftest import run_ranks

pytestmark = pytest.mark.slow  # ranks as processes

PROMPTS = [[5 + 3 * i + j for j in range(n)] for i, n in enumerate([17, 9, 30, 1, 12])]
DECODE_STEPS = 4


def _run_requests(runner_forward, runner, prompts, rank_reqs):
    """Prefill this rank's prompts (one chunk of two steps for the longest), then greedy-decode;
    returns {prompt index: (token ids, last-step logits)}."""
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch, ScheduledReq
    from sglang.srt.mem_cache.kv_cache_manager import KVCacheManager
    from sglang.srt.sampling.sampling_params import SamplingParams

    kv = KVCacheManager(runner.req_to_token_pool, runner.allocator, runner.kv_pool, disable_radix_cache=True)
    params = SamplingParams(temperature=0, max_new_tokens=64)
    params.normalize()
    reqs = {i: Req(f"r{i}", prompts[i], params, seed=i) for i in rank_reqs}
    for req in reqs.values():
        assert kv.start(req)
    results = {i: ([], None) for i in reqs}

    def step(items):
        batch = ScheduleBatch(items) if items else None
        fb = None
        if batch is not None:
            slots = kv.alloc_extend([(it.req, it.extend_len) for it in items])
            fb = batch.to_forward_batch(slots)
        out = runner_forward(fb)
        if batch is None:
            return
        next_ids = out.next_token_logits.argmax(-1).tolist()
        rows = iter(range(len(next_ids)))
        for it in items:
            it.req.kv_len += it.extend_len
            if it.samples:
                row = next(rows)
                it.req.output_ids.append(next_ids[row])
                idx = int(it.req.rid[1:])
                results[idx] = (it.req.output_ids, out.next_token_logits[row].clone())

    # chunked prefill: the first 8 tokens of every prompt, then the rest with sampling
    step(
        [
            ScheduledReq(r, min(8, len(r.origin_input_ids) - 1), False)
            for r in reqs.values()
            if len(r.origin_input_ids) > 1
        ]
    )
    step([ScheduledReq(r, len(r.fill_ids) - r.kv_len, True) for r in reqs.values()])
    for _ in range(DECODE_STEPS):
        step([ScheduledReq(r, 1, True) for r in reqs.values()])
    return {i: (list(ids), logits) for i, (ids, logits) in results.items()}


def _runner(
    model_path, hold_weights, tp=None, page_size=1, dtype="float32", attention_backend="torch_native", **graph_args
):
    from sglang.srt.configs.model_config import ModelConfig
    from sglang.srt.layers.tensor_parallel import TpGroup
    from sglang.srt.model_executor.model_runner import ModelRunner

    cfg = ModelConfig.from_path(model_path, dtype=dtype)
    return ModelRunner(
        cfg,
        "cpu",
        attention_backend,
        0.5,
        max_total_tokens=1024,
        max_running_requests=8,
        hold_weights=hold_weights,
        tp=tp or TpGroup(),
        page_size=page_size,
        **graph_args,
    )


def _rank_main(rank, tknp, tp, all_to_all, overlap, page_size, init_file, model_path):
    from sglang.srt.distributed.parallel_state import RankLayout, destroy_distributed, init_distributed
    from sglang.srt.distributed.tknp_comm import TknpComm
    from sglang.srt.layers.tensor_parallel import TpGroup
    from sglang.srt.model_executor.tknp_runner import TknpModelRunner

    torch.set_num_threads(1)
    state = init_distributed(RankLayout(tknp_size=tknp, tp_size=tp), rank, f"file://{init_file}", "gloo")
    runner = _runner(model_path, hold_weights=state.coords.tknp == 0, tp=TpGroup.of(state), page_size=page_size)
    param_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters() if not p.is_meta)
    forward = runner.forward
    if tknp > 1:
        forward = TknpModelRunner(runner, TknpComm.of(state, use_all_to_all=all_to_all), two_batch_overlap=overlap)
    # shifted so the root is idle in some steps (tknp 2, 3) or all of them (tknp 6)
    mine = [i for i in range(len(PROMPTS)) if (i + 1) % tknp == state.coords.tknp]
    results = _run_requests(forward, runner, PROMPTS, mine)
    destroy_distributed()
    overlapped = getattr(forward, "overlapped_steps", 0)
    return param_bytes, {i: (ids, logits.tolist()) for i, (ids, logits) in results.items()}, overlapped


@pytest.mark.parametrize(
    "tknp,tp,all_to_all,overlap,page_size",
    [
        (2, 1, False, False, 1),
        (3, 1, True, False, 1),
        (6, 1, False, False, 1),
        (6, 1, True, False, 1),
        (1, 2, False, False, 1),
        (2, 2, True, False, 1),
        (3, 1, False, False, 16),
        (2, 1, False, True, 1),
        (3, 1, False, True, 16),
        (6, 1, False, True, 1),
        (2, 2, False, True, 1),
    ],
    ids=[
        "tknp2",
        "tknp3-a2a",
        "tknp6",
        "tknp6-a2a",
        "tp2",
        "tknp2xtp2-a2a",
        "tknp3-page16",
        "tknp2-tbo",
        "tknp3-tbo-page16",
        "tknp6-tbo",
        "tknp2xtp2-tbo",
    ],
)
def test_parallel_forward_matches_single_rank(make_tiny_model, tmp_path, tknp, tp, all_to_all, overlap, page_size):
    """TKNP gives the single-rank logits bit for bit in effect (1e-4); TP to rounding (its
    row-parallel sums run in another order), with the same greedy tokens. `a2a`: the
    scatter/gather NCCL uses (all_to_all_single with split sizes), run here on gloo. `tbo`:
    two-batch overlap, decode steps in two micro-batches whose forwards take turns on the root.
    `page16`: the ranks' pools hand out pages of 16 slots (the reference keeps pages of one)."""
    model_path = str(make_tiny_model("llama", seed=4))
    ref = _runner(model_path, True)
    reference = _run_requests(ref.forward, ref, PROMPTS, range(len(PROMPTS)))
    full_bytes = sum(p.numel() * p.element_size() for p in ref.model.parameters())

    world = tknp * tp
    got = run_ranks(_rank_main, world, tknp, tp, all_to_all, overlap, page_size, str(tmp_path / "init"), model_path)
    # global rank = tknp_rank * tp + tp_rank: the first tp ranks are the root's shards
    root_bytes = [got[r][0] for r in range(tp)]
    assert all(0 < b < full_bytes * (0.6 if tp > 1 else 1.01) for b in root_bytes), (
        f"root shards {root_bytes} of {full_bytes}"
    )
    assert all(got[r][0] == 0 for r in range(tp, world)), "only the root holds weights"
    # the decode steps split (each has requests for both micro-batches); the root counts them
    assert [got[r][2] for r in range(world)] == [DECODE_STEPS if overlap else 0] * tp + [0] * (world - tp)
    # TP replicas of a TKNP rank return the same thing
    for r in range(world):
        first = got[r - r % tp][1]
        assert {i: ids for i, (ids, _) in got[r][1].items()} == {i: ids for i, (ids, _) in first.items()}
    # with tknp 6 the root owns no request and rank 4's only prompt is one token: empty partitions
    merged = {i: res for r, (_, results, _) in got.items() if r % tp == 0 for i, res in results.items()}
    assert sorted(merged) == list(range(len(PROMPTS)))
    for i, (ids, logits) in reference.items():
        assert merged[i][0] == ids, f"prompt {i}"
        assert torch.allclose(torch.tensor(merged[i][1]), logits, atol=1e-4), f"prompt {i}"


def _tp_fused_main(rank, init_file, model_path):
    from sglang.srt.distributed.parallel_state import RankLayout, destroy_distributed, init_distributed
    from sglang.srt.layers.tensor_parallel import TpGroup

    torch.set_num_threads(1)
    state = init_distributed(RankLayout(tp_size=2), rank, f"file://{init_file}", "gloo")
    results = []
    for fused in (True, False):
        runner = _runner(model_path, True, tp=TpGroup.of(state), dtype="bfloat16", attention_backend="cpu")
        for layer in runner.model.model.layers:
            assert layer.fused_decode is not None and layer.fused_decode.tp is not None
            if not fused:
                layer.fused_decode = None
        results.append(_run_requests(runner.forward, runner, PROMPTS, range(len(PROMPTS))))
    fused, plain = results
    destroy_distributed()
    return [{i: (ids, logits.float().tolist()) for i, (ids, logits) in r.items()} for r in (fused, plain)]


def test_tp_decode_layer_on_the_kernels_is_the_layer_by_layer_path(make_tiny_model, tmp_path):
    """In bf16 a TP rank's decode layer runs as sgl_kernel calls around its all-reduces
    (decode_layer_qkv, attention, o_proj, all-reduce, decode_layer_mlp, all-reduce): the same
    ops in the same order as the layer-by-layer path, so the same logits, bit for bit."""
    from sglang.srt.layers.cpu_kernels import sgl_kernel_ops

    if sgl_kernel_ops() is None:
        pytest.skip("sgl_kernel is not built here")
    model_path = str(make_tiny_model("llama", seed=4))
    got = run_ranks(_tp_fused_main, 2, str(tmp_path / "init"), model_path)
    for rank in range(2):
        fused, plain = got[rank]
        assert fused == plain, f"TP rank {rank}"


def _tknp_fused_main(rank, init_file, model_path, shm_prefix):
    from collections import Counter

    from sglang.srt.distributed.parallel_state import RankLayout, destroy_distributed, init_distributed
    from sglang.srt.distributed.tknp_comm import TknpComm
    from sglang.srt.layers import tknp_attention
    from sglang.srt.model_executor.tknp_runner import TknpModelRunner

    torch.set_num_threads(1)
    state = init_distributed(
        RankLayout(tknp_size=2), rank, f"file://{init_file}", "gloo", shm_prefix=shm_prefix, local_ranks=[0, 1]
    )
    assert state.tknp_shm is not None
    calls = Counter()

    def counted(name, fn, only_results=False):
        def call(*args):
            out = fn(*args)
            calls[name] += not only_results or out is not None
            return out

        return call

    backend = tknp_attention.TknpAttentionBackend
    backend.fused_exchange = counted("root", backend.fused_exchange, only_results=True)
    backend.forward = counted("attention", backend.forward)
    tknp_attention._serve_decode_fused = counted("rank", tknp_attention._serve_decode_fused)
    runs = []
    for path in ("layer", "attention", "python"):
        if path == "python":
            tknp_attention._fuses = lambda inner, comm: False
        runner = _runner(model_path, hold_weights=rank == 0, dtype="bfloat16", attention_backend="cpu")
        if path != "layer":
            for layer in runner.model.model.layers:
                layer.fused_decode = None
        forward = TknpModelRunner(runner, TknpComm.of(state))
        mine = [i for i in range(len(PROMPTS)) if i % 2 == rank]
        results = _run_requests(forward, runner, PROMPTS, mine)
        if rank == 0:  # the fused ops' own time (prefill's Python exchange adds to comm_seconds too)
            calls["fused_ns"] = int(forward.tknp_backend._fused_ns[1])
        runs.append((dict(calls), {i: (ids, logits.float().tolist()) for i, (ids, logits) in results.items()}))
        calls.clear()
    destroy_distributed()
    return runs


def test_tknp_decode_on_shared_memory_in_one_call_is_the_per_layer_path(make_tiny_model, tmp_path):
    """On shared memory with the `cpu` backend a decode layer's scatter, the root's own attention
    and the gather run as one sgl_kernel call on the root, with the rest of the layer where it
    runs on the kernels (`tknp_root_decode_layer`), else alone (`tknp_root_decode_attention`), and
    a whole forward's layers as one call on a rank (`tknp_rank_decode_layers`): the same messages
    and ops in the same order as the per-layer Python path, so the same logits, bit for bit (bf16)."""
    import uuid

    from sglang.srt.layers.cpu_kernels import sgl_kernel_ops

    if sgl_kernel_ops() is None:
        pytest.skip("sgl_kernel is not built here")
    model_path = str(make_tiny_model("llama", seed=4))
    prefix = f"sglang-test-{uuid.uuid4().hex[:8]}"
    got = run_ranks(_tknp_fused_main, 2, str(tmp_path / "init"), model_path, prefix)
    (layer_calls, layer), (attention_calls, attention), (python_calls, python) = got[0]
    # the root: whole layers (the backend's forward never runs in a decode), then the attention
    # alone, both fused; then Python, whose decode and prefill layers go through forward
    counts = (layer_calls, attention_calls)
    assert layer_calls["root"] > 0 and attention_calls["root"] == layer_calls["root"], counts
    assert attention_calls["attention"] - layer_calls["attention"] == layer_calls["root"], counts
    assert python_calls.get("root", 0) == 0 and python_calls["attention"] == attention_calls["attention"]
    assert layer_calls["fused_ns"] > 0 and attention_calls["fused_ns"] > 0, "the fused ops time their exchanges"
    assert python_calls["fused_ns"] == 0, counts
    assert layer == attention == python, "TKNP root"
    runs = [calls for calls, _ in got[1]]
    assert runs[0]["rank"] > 0 and runs[1]["rank"] == runs[0]["rank"] and "rank" not in runs[2], runs
    assert got[1][0][1] == got[1][1][1] == got[1][2][1], "TKNP rank 1"
