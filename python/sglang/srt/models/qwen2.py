"""Qwen2: the Llama decoder with biases on q/k/v (and none on o_proj)."""

from typing import Any

from sglang.srt.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    @staticmethod
    def attention_biases(config: Any) -> tuple[bool, bool]:
        return True, False


EntryClass = [Qwen2ForCausalLM]
