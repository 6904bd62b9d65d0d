"""Tensor parallelism, applied to a built model in one place (the models never see it).

`shard_model` takes a model built on the meta device (shapes, no storage) and turns it into
TP rank r's piece before any weight exists, so a rank never holds more than its share:

  qkv_proj, gate_up_proj  column-parallel: every output block (q, k, v; gate, up) keeps its
                          r-th slice, so a rank computes whole heads and whole MLP columns;
  o_proj, down_proj       row-parallel: the r-th slice of the input features; the partial
                          outputs are summed over the group (one all-reduce each) and the
                          bias is added once, after the sum;
  embed_tokens            vocab-parallel: rows [r V', (r+1) V') with V' = ceil(V / tp); a rank
                          embeds the ids it owns, zeros elsewhere, and the sum is exact;
  the LM head             the same vocab rows (shared when tied); the logits are all-gathered
                          and cut back to V columns;
  attention modules       num_heads and num_kv_heads divided by tp (the KV pool of a rank
                          holds its heads only).

Each replaced module cuts the full checkpoint tensor it is given at load time, so the model's
`load_weights` is unchanged. Across TKNP ranks the same head slice travels: TP rank r of the
root sends q/k/v of its heads to TP rank r of each attention rank.

TP changes float rounding (a row-parallel matmul sums its partial products in another order),
so outputs agree with --tp-size 1 to rounding, not bit for bit; TKNP on top of a given TP size
changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sglang.srt.layers.linear import Linear, MergedLinear

if TYPE_CHECKING:
    from sglang.srt.distributed.parallel_state import ParallelState
    from sglang.srt.distributed.shm_comm import ShmGroup


@dataclass(frozen=True)
class TpGroup:
    """This rank's place in its TP group; the groups are None only for a size of 1."""

    rank: int = 0
    size: int = 1
    group: Optional[dist.ProcessGroup] = None  # for activations, on the model's device
    cpu_group: Optional[dist.ProcessGroup] = None  # for small control values (gloo)
    shm: Optional["ShmGroup"] = None  # activations on shared memory (CPU, every rank on one host)

    @classmethod
    def of(cls, state: "ParallelState") -> "TpGroup":
        return cls(state.coords.tp, state.layout.tp_size, state.tp_group, state.tp_cpu_group, state.tp_shm)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.shm is not None and x.is_contiguous():
            self.shm.all_reduce(x)
            return x
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return x

    def all_gather_cols(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, C] on every rank -> [N, size * C], rank order
        if self.shm is not None:
            return torch.cat(self.shm.all_gather(x).unbind(0), dim=-1)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def slice_of(self, full: int) -> tuple[int, int]:
        """(start, length) of this rank's part of `full` rows split evenly (full % size == 0)."""
        assert full % self.size == 0, f"{full} rows do not split over {self.size} TP ranks"
        length = full // self.size
        return self.rank * length, length

    def padded_slice_of(self, full: int) -> tuple[int, int]:
        """(start, length) for a split that may not be even: ceil(full / size) rows each, the last
        rank's part padded past `full` (vocabularies rarely divide)."""
        length = -(-full // self.size)
        return self.rank * length, length


class ColumnParallelLinear(MergedLinear):
    """Each output block keeps its r-th slice; no communication (outputs stay split)."""

    def __init__(self, full: MergedLinear, tp: TpGroup):
        local = [tp.slice_of(size)[1] for size in full.output_sizes]
        super().__init__(full.in_features, local, list(full.shards), bias=full.bias is not None)
        self.tp = tp

    def load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        start, length = self.tp.slice_of(loaded.shape[0])
        super().load_shard(param, loaded.narrow(0, start, length), shard_id)


class RowParallelLinear(Linear):
    """The r-th slice of the input features; outputs summed over the group, then the bias."""

    bias_in_matmul = False

    def __init__(self, full: Linear, tp: TpGroup):
        super().__init__(tp.slice_of(full.in_features)[1], full.out_features, bias=full.bias is not None)
        self.tp = tp

    def load_param(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        if param.dim() == 2:  # the weight; the bias is whole on every rank
            start, length = self.tp.slice_of(loaded.shape[1])
            loaded = loaded.narrow(1, start, length)
        _copy(param, loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.tp.all_reduce(self.matmul(x))
        return out + self.bias if self.bias is not None else out


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + length) of the vocabulary; the group's sum is the full embedding."""

    def __init__(self, full: nn.Embedding, tp: TpGroup):
        super().__init__()
        self.num_embeddings = full.num_embeddings
        self.start, length = tp.padded_slice_of(full.num_embeddings)
        self.weight = nn.Parameter(torch.empty(length, full.embedding_dim), requires_grad=False)
        self.tp = tp

    def load_param(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        _copy(param, _vocab_rows(loaded, self.start, param.shape[0]), name)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        owned = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        out = out * owned.unsqueeze(-1).to(out.dtype)
        return self.tp.all_reduce(out)


class VocabParallelLMHead(Linear):
    """An untied LM head's vocab rows; the logits processor gathers the columns."""

    def __init__(self, full: Linear, tp: TpGroup):
        start, length = tp.padded_slice_of(full.out_features)
        super().__init__(full.in_features, length)
        self.start = start

    def load_param(self, param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
        _copy(param, _vocab_rows(loaded, self.start, param.shape[0]), name)


def _vocab_rows(loaded: torch.Tensor, start: int, length: int) -> torch.Tensor:
    rows = loaded[start : start + length]
    if rows.shape[0] < length:  # the last rank's padding: rows past the vocabulary score 0
        rows = torch.cat((rows, rows.new_zeros(length - rows.shape[0], *rows.shape[1:])))
    return rows


def _copy(param: nn.Parameter, loaded: torch.Tensor, name: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(
            f"checkpoint tensor '{name}' has shape {tuple(loaded.shape)}, expected {tuple(param.shape)} on this TP rank"
        )
    param.data.copy_(loaded)


def shard_model(model: nn.Module, tp: TpGroup) -> None:
    """Makes a meta-device model TP rank `tp.rank`'s piece of itself (see the module docstring)."""
    assert tp.size > 1
    for module in list(model.modules()):
        if hasattr(module, "qkv_proj") and hasattr(module, "attn"):  # an attention block
            module.num_heads //= tp.size
            module.num_kv_heads //= tp.size
            module.q_size //= tp.size
            module.kv_size //= tp.size
            module.attn.num_heads = module.num_heads
            module.attn.num_kv_heads = module.num_kv_heads
        for name, child in list(module.named_children()):
            if name in ("qkv_proj", "gate_up_proj"):
                setattr(module, name, ColumnParallelLinear(child, tp))
            elif name in ("o_proj", "down_proj"):
                setattr(module, name, RowParallelLinear(child, tp))
            elif name == "embed_tokens":
                setattr(module, name, VocabParallelEmbedding(child, tp))
            elif name == "lm_head":
                setattr(module, name, VocabParallelLMHead(child, tp))
    model.logits_processor.tp = tp
