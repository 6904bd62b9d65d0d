"""The embedded default model (SmolLM2-135M-Instruct, Q4_1 GGUF) against transformers' own GGUF load."""

import os

import pytest
import torch
import transformers
from sglang.srt.model_loader import default_model_path

pytestmark = pytest.mark.slow  # the 135M default model, in this engine and in transformers

PROMPTS = ["The capital of France is", "Write a haiku about the sea.\n"]


@pytest.fixture(scope="module")
def hf_model():
    folder, name = os.path.split(default_model_path())
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.generation_config.eos_token_id = None
    return model.eval()


def test_default_model_greedy_32_tokens_match_transformers(engine_factory, hf_model):
    engine = engine_factory(dtype="float32")  # no model_path: the embedded default
    assert engine.model_config.architecture == "LlamaForCausalLM"
    outs = engine.generate(PROMPTS, {"temperature": 0, "max_new_tokens": 32, "ignore_eos": True})
    for prompt, out in zip(PROMPTS, outs):
        ids = engine.tokenizer.encode(prompt)
        with torch.no_grad():
            ref = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids) :]
        assert out["output_ids"] == ref.tolist(), prompt


def test_default_model_chat_template_and_eos(engine_factory):
    engine = engine_factory()
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 64})
    assert "Paris" in out["text"]
    assert out["meta_info"]["finish_reason"]["type"] == "stop"  # <|im_end|> ends the turn


def test_default_model_samples_with_its_recommended_parameters(engine_factory):
    # the README's first request sets no temperature: the model card's 0.2 / 0.9 apply, not 1.0
    engine = engine_factory()
    assert engine.tokenizer_manager.served_model_name == "SmolLM2-135M-Instruct"
    assert engine.tokenizer_manager.sampling_defaults == {"temperature": 0.2, "top_p": 0.9}
    prompt = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    seeds = range(4)
    omitted = engine.generate([prompt] * 4, [{"max_new_tokens": 16, "sampling_seed": s} for s in seeds])
    recommended = {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 16}
    explicit = engine.generate([prompt] * 4, [{**recommended, "sampling_seed": s} for s in seeds])
    assert [o["output_ids"] for o in omitted] == [o["output_ids"] for o in explicit]
    neutral = engine.generate(
        [prompt] * 4, [{"temperature": 1.0, "max_new_tokens": 16, "sampling_seed": s} for s in seeds]
    )
    assert [o["output_ids"] for o in neutral] != [o["output_ids"] for o in omitted], "the request's value wins"
