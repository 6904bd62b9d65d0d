"""Our models against Hugging Face transformers' own implementations, on the same weights (fp32)."""

import pytest
import torch
import transformers
from sglang.srt.configs.model_config import ModelConfig
from sglang.srt.layers.cpu_kernels import sgl_kernel_ops
from sglang.srt.model_executor.forward_batch import ForwardBatch, ForwardMode
from sglang.srt.model_executor.model_runner import ModelRunner

pytestmark = pytest.mark.slow  # tiny models in this engine and in transformers

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n",
    "Once upon a time, in a land far away, there lived a dragon who",
]

ARCHS = [
    pytest.param("llama", {}, id="llama-gqa-untied"),
    pytest.param("llama", {"tie_word_embeddings": True, "num_key_value_heads": 4}, id="llama-mha-tied"),
    pytest.param(
        "llama",
        {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 256,
            },
            "rope_theta": 500000.0,
        },
        id="llama3-rope",
    ),
    pytest.param("mistral", {"sliding_window": None}, id="mistral"),
    pytest.param("qwen2", {}, id="qwen2-qkv-bias"),
    pytest.param("qwen3", {"head_dim": 32}, id="qwen3-qk-norm"),
]


def _runner(path, attention_backend: str) -> ModelRunner:
    cfg = ModelConfig.from_path(str(path), dtype="float32")
    return ModelRunner(cfg, "cpu", attention_backend, 0.5, max_total_tokens=2048, max_running_requests=8)


def _prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    row, slots, out = _prefill(runner, ids)
    runner.allocator.free(slots)
    runner.req_to_token_pool.free(row)
    return out


def _prefill(runner: ModelRunner, ids: list[int]) -> tuple[int, torch.Tensor, torch.Tensor]:
    """Prefills one request: its req_to_token row, its KV slots (both still held) and all its logits."""
    n = len(ids)
    row = runner.req_to_token_pool.alloc()
    slots = runner.allocator.alloc(n)
    runner.req_to_token_pool.write(row, 0, slots)
    batch = ForwardBatch(
        forward_mode=ForwardMode.EXTEND,
        input_ids=torch.tensor(ids),
        positions=torch.arange(n),
        out_cache_loc=slots,
        req_pool_indices=torch.tensor([row]),
        seq_lens=torch.tensor([n]),
        seq_lens_cpu=[n],
        kv_lens=[0],
        extend_lens=[n],
        sample_indices=torch.tensor([n - 1]),
        return_all_logits=True,
    )
    return row, slots, runner.forward(batch).all_logits


def _hf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


@pytest.mark.parametrize("arch,overrides", ARCHS)
def test_prefill_logits_and_greedy_match_transformers(make_tiny_model, arch, overrides):
    from sglang import Engine

    path = make_tiny_model(arch, **overrides)
    hf = _hf(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    # the plain-torch reference and the native kernels (sgl_kernel) alike
    for backend in ("torch_native", "cpu"):
        runner = _runner(path, backend)
        assert (
            runner.attn_backend.__class__.__name__
            == {"torch_native": "TorchNativeAttnBackend", "cpu": "CpuAttnBackend"}[backend]
        )
        for prompt in PROMPTS:
            ids = tok.encode(prompt)
            with torch.no_grad():
                ref = hf(torch.tensor([ids])).logits[0]
            ours = _prefill_logits(runner, ids)
            assert (ours - ref).abs().max().item() <= 1e-3, backend

    engine = Engine(model_path=str(path), dtype="float32", max_total_tokens=4096)
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    outs = engine.generate(PROMPTS, params)  # one batch: prefills of different lengths, then batched decode
    for prompt, out in zip(PROMPTS, outs):
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids) :].tolist()
        assert out["output_ids"] == ref, prompt
        assert out["meta_info"]["completion_tokens"] == 16
    engine.shutdown()


def test_cpu_kernels_match_torch_native_in_bfloat16(make_tiny_model):
    """bf16: the native kernels (attention, norms, rotary, bf16 linear where the CPU has it) against
    the plain-torch reference on the same weights, to bf16 tolerance (head_dim 64, GQA 2)."""
    path = make_tiny_model(
        "llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2
    )
    tok = transformers.AutoTokenizer.from_pretrained(path)
    logits = {}
    for backend in ("torch_native", "cpu"):
        cfg = ModelConfig.from_path(str(path), dtype="bfloat16")
        runner = ModelRunner(cfg, "cpu", backend, 0.5, max_total_tokens=2048, max_running_requests=8)
        logits[backend] = [_prefill_logits(runner, tok.encode(p)) for p in PROMPTS]
    for ref, ours in zip(logits["torch_native"], logits["cpu"]):
        scale = ref.abs().max().item()
        assert (ours - ref).abs().max().item() <= 0.03 * scale
        # the greedy choice agrees wherever the reference's top two are not a near-tie
        top2 = ref.topk(2, dim=-1).values
        decisive = (top2[:, 0] - top2[:, 1]) > 0.03 * scale
        assert torch.equal(ours.argmax(-1)[decisive], ref.argmax(-1)[decisive])


@pytest.mark.skipif(sgl_kernel_ops() is None, reason="the fused decode layer runs on sgl_kernel")
@pytest.mark.parametrize(
    "arch,overrides",
    [
        pytest.param("llama", {}, id="llama-gqa"),
        pytest.param("qwen2", {}, id="qwen2-qkv-bias"),
        pytest.param("qwen3", {"head_dim": 64}, id="qwen3-qk-norm-not-fused"),
    ],
)
def test_fused_decode_layer_gives_the_layer_by_layer_bits(make_tiny_model, arch, overrides):
    """sgl_kernel.decode_layer runs a decoder layer's ops in the Python layers' order: the same
    logits and KV cache, bit for bit, over several decode steps of a batch (bf16)."""
    path = make_tiny_model(
        arch, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, **overrides
    )
    cfg = ModelConfig.from_path(str(path), dtype="bfloat16")
    runner = ModelRunner(cfg, "cpu", "cpu", 0.5, max_total_tokens=2048, max_running_requests=8)
    layers = list(runner.model.model.layers)
    fused = [layer.fused_decode for layer in layers]
    if arch == "qwen3":  # q/k norms between the ops: the layer-by-layer path only
        assert fused == [None] * len(layers)
        return
    assert all(f is not None for f in fused)

    g = torch.Generator().manual_seed(0)
    lens = [5, 17, 9]
    rows = [_prefill(runner, torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist())[0] for n in lens]
    k_cache, v_cache = runner.kv_pool.get_kv_buffer(len(layers) - 1)
    for _ in range(3):
        slots = runner.allocator.alloc(len(lens))
        for row, n, slot in zip(rows, lens, slots.tolist()):
            runner.req_to_token_pool.write(row, n, torch.tensor([slot]))
        new_lens = [n + 1 for n in lens]
        ids = torch.randint(0, cfg.vocab_size, (len(lens),), generator=g)

        def decode() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            batch = ForwardBatch(
                forward_mode=ForwardMode.DECODE,
                input_ids=ids,
                positions=torch.tensor(lens),
                out_cache_loc=slots,
                req_pool_indices=torch.tensor(rows),
                seq_lens=torch.tensor(new_lens),
                seq_lens_cpu=new_lens,
                kv_lens=lens,
                extend_lens=[1] * len(lens),
                sample_indices=torch.arange(len(lens)),
            )
            logits = runner.forward(batch).next_token_logits.clone()
            return logits, k_cache[slots].clone(), v_cache[slots].clone()

        for layer in layers:
            layer.fused_decode = None
        by_layer = decode()
        for layer, f in zip(layers, fused):
            layer.fused_decode = f
        assert all(torch.equal(a, b) for a, b in zip(decode(), by_layer))
        lens = new_lens
