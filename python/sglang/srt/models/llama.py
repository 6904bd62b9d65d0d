"""The Llama family decoder (Llama 2/3, SmolLM2, Mistral), and the base Qwen2/Qwen3 extend.

The model knows nothing of batching, KV memory or parallelism: attention is a RadixAttention
call, whose backend (and, under token parallelism, the wrapper around it) does the rest.
q/k/v and gate/up are stored merged, so each layer runs four matmuls.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from sglang.srt.layers.activation import SiluAndMul
from sglang.srt.layers.cpu_decode_layer import CpuDecodeLayer
from sglang.srt.layers.layernorm import RMSNorm
from sglang.srt.layers.linear import Linear, MergedLinear
from sglang.srt.layers.logits_processor import LogitsProcessor, LogitsProcessorOutput
from sglang.srt.layers.radix_attention import RadixAttention
from sglang.srt.layers.rotary_embedding import get_rope
from sglang.srt.model_executor.forward_batch import ForwardBatch

# checkpoint name piece -> (merged parameter name piece, shard id)
_STACKED_PARAMS = [
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", "gate"),
    ("up_proj", "gate_up_proj", "up"),
]


class LlamaMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedLinear(hidden_size, [intermediate_size] * 2, ["gate", "up"])
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class LlamaAttention(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: nn.Module, biases: tuple[bool, bool], qk_norm: bool):
        super().__init__()
        qkv_bias, o_bias = biases
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(
            config.hidden_size, [self.q_size, self.kv_size, self.kv_size], ["q", "k", "v"], bias=qkv_bias
        )
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=o_bias)
        if qk_norm:
            self.q_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, eps=config.rms_norm_eps)
        self.qk_norm = qk_norm
        self.rotary_emb = rotary_emb
        self.attn = RadixAttention(self.num_heads, self.head_dim, self.head_dim**-0.5, self.num_kv_heads, layer_id)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        # q: [T, H, D], k/v: [T, Hkv, D]
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        return self.o_proj(self.attn(q, k, v, forward_batch))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: Any, layer_id: int, rotary_emb: nn.Module, biases: tuple[bool, bool], qk_norm: bool):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_id, rotary_emb, biases, qk_norm)
        self.mlp = LlamaMLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.fused_decode: CpuDecodeLayer | None = None

    def use_cpu_kernels(self, ops: Any) -> bool:
        # after its sublayers switched (use_cpu_kernels visits leaves first)
        self.fused_decode = CpuDecodeLayer.of(ops, self)
        return self.fused_decode is not None

    def forward(
        self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None, forward_batch: ForwardBatch
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused_decode is not None and self.fused_decode.takes(hidden, forward_batch):
            return self.fused_decode(positions, hidden, residual, forward_batch)
        if residual is None:
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, forward_batch)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: Any, max_position: int, biases: tuple[bool, bool], qk_norm: bool):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            config.vocab_size, config.hidden_size, _weight=torch.empty(config.vocab_size, config.hidden_size)
        )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rotary_emb = get_rope(head_dim, max_position, config)  # shared by every layer
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, i, self.rotary_emb, biases, qk_norm) for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        self.rotary_emb.prepare(positions, hidden.dtype)
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, forward_batch)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    # Subclasses switch on the variations of the family: q/k RMSNorm per head, and biases.
    qk_norm = False

    @staticmethod
    def attention_biases(config: Any) -> tuple[bool, bool]:
        """(bias on q/k/v, bias on o_proj)."""
        bias = bool(getattr(config, "attention_bias", False))
        return bias, bias

    def __init__(self, config: Any, max_position: int):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config, max_position, self.attention_biases(config), self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if not self.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.logits_processor = LogitsProcessor(config.vocab_size)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.tie_word_embeddings else self.lm_head.weight

    @torch.no_grad()
    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch
    ) -> LogitsProcessorOutput:
        hidden = self.model(input_ids, positions, forward_batch)
        return self.logits_processor(hidden, self.lm_head_weight, forward_batch)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copies checkpoint tensors (Hugging Face names) into the parameters; all must be covered."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name or (self.tie_word_embeddings and name == "lm_head.weight"):
                continue
            for ckpt_piece, merged_piece, shard_id in _STACKED_PARAMS:
                if f".{ckpt_piece}." in name:
                    merged_name = name.replace(f".{ckpt_piece}.", f".{merged_piece}.")
                    module = self.get_submodule(merged_name.rsplit(".", 1)[0])
                    module.load_shard(params[merged_name], tensor, shard_id)
                    loaded.add(f"{merged_name}:{shard_id}")
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor '{name}' matches no parameter of {type(self).__name__}")
                param = params[name]
                # a tensor-parallel layer cuts its own part out of the full tensor
                load_param = getattr(self.get_submodule(name.rpartition(".")[0]), "load_param", None)
                if load_param is not None:
                    load_param(param, tensor, name)
                elif param.shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint tensor '{name}' has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                    )
                else:
                    param.data.copy_(tensor)
                loaded.add(name)
        missing = [n for n in self._expected_weight_keys() if n not in loaded]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} tensors, e.g. {', '.join(missing[:3])}")

    def _expected_weight_keys(self) -> list[str]:
        keys = []
        for name, module in self.named_modules():
            if isinstance(module, MergedLinear):
                keys += [
                    f"{name}.{p}:{sid}" for p, _ in module.named_parameters(recurse=False) for sid in module.shards
                ]
            else:
                keys += [f"{name}.{p}" if name else p for p, _ in module.named_parameters(recurse=False)]
        return keys


class MistralForCausalLM(LlamaForCausalLM):
    pass


EntryClass = [LlamaForCausalLM, MistralForCausalLM]
