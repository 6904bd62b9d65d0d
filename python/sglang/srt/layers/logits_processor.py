"""From final hidden states to the logits and logprobs a batch asked for.

Only the rows that need them go through the LM head: each sampling request's last row, and the
prompt rows whose next-token logprob was requested (`logprob_indices`). The latter are scored
in blocks so a long prompt never materializes a [prompt_len, vocab] matrix at once.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import nn

from sglang.srt.layers.linear import BF16LinearKernel, linear_kernel_max_rows
from sglang.srt.model_executor.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from sglang.srt.layers.tensor_parallel import TpGroup

_LOGPROB_BLOCK_ROWS = 256


@dataclass
class LogitsProcessorOutput:
    next_token_logits: torch.Tensor  # [S, V] float32
    input_token_logprobs: Optional[torch.Tensor] = None  # [R] float32
    input_top_logprobs: Optional[tuple[torch.Tensor, torch.Tensor]] = None  # values, ids: [R, k]
    all_logits: Optional[torch.Tensor] = None  # [T, V] float32, only when return_all_logits


# Rows up to which the LM head runs on sgl_kernel.linear where oneDNN has bf16 arithmetic (every
# size elsewhere: linear_kernel_max_rows): its 49K x 576 weight (SmolLM2) is past every cache,
# and oneDNN overtakes the kernel sooner than on the layers' linears (LINEAR_KERNEL_MAX_ROWS):
# 32 rows 4.5 ms against 5.1, 48 rows 6.4 against 6.2 (Zen 4, bf16).
HEAD_KERNEL_MAX_ROWS = 40


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        # Under tensor parallelism (set by shard_model) the LM head holds a slice of the vocab
        # rows: a rank's logits are columns of the whole, gathered here.
        self.tp: Optional["TpGroup"] = None
        # sgl_kernel's ops, once use_cpu_kernels switched them on
        self._ops: Optional[Any] = None
        self._head: Optional[tuple[torch.Tensor, BF16LinearKernel]] = None  # (weight, its packed form)

    def use_cpu_kernels(self, ops: Any) -> bool:
        self._ops = ops
        return True

    def _head_kernel(self, weight: torch.Tensor) -> Optional[BF16LinearKernel]:
        """The LM head prepacked for sgl_kernel.linear (the first call packs it: the head may be
        the tied embedding, which the processor does not own), or None where it cannot run."""
        if self._ops is None or weight.dtype != torch.bfloat16:
            return None
        if self._head is None or self._head[0] is not weight:
            self._head = (weight, BF16LinearKernel(self._ops, weight, None))
        return self._head[1]

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, batch: ForwardBatch) -> LogitsProcessorOutput:
        head = self._head_kernel(lm_head_weight)

        def logits_of(rows: torch.Tensor) -> torch.Tensor:
            if (
                head is not None
                and rows.dtype == torch.bfloat16
                and rows.shape[0] <= linear_kernel_max_rows(HEAD_KERNEL_MAX_ROWS)
            ):
                logits = head(rows, out_float=True)
            else:
                logits = torch.matmul(rows, lm_head_weight.t()).float()
            if self.tp is not None:
                logits = self.tp.all_gather_cols(logits)[:, : self.vocab_size]
            return logits

        out = LogitsProcessorOutput(next_token_logits=logits_of(hidden[batch.sample_indices]))
        if batch.return_all_logits:
            out.all_logits = logits_of(hidden)
        if batch.logprob_indices is not None and batch.logprob_indices.numel() > 0:
            logprobs, top_vals, top_ids = [], [], []
            # as the sampler clamps the output top-k: topk past the vocabulary would raise
            k = min(batch.input_top_logprobs_num, self.vocab_size)
            for start in range(0, batch.logprob_indices.numel(), _LOGPROB_BLOCK_ROWS):
                idx = batch.logprob_indices[start : start + _LOGPROB_BLOCK_ROWS]
                block = torch.log_softmax(logits_of(hidden[idx]), dim=-1)
                targets = batch.logprob_target_ids[start : start + _LOGPROB_BLOCK_ROWS]
                logprobs.append(block.gather(1, targets.unsqueeze(1)).squeeze(1))
                if k > 0:
                    vals, ids = block.topk(k, dim=-1)
                    top_vals.append(vals)
                    top_ids.append(ids)
            out.input_token_logprobs = torch.cat(logprobs)
            if k > 0:
                out.input_top_logprobs = (torch.cat(top_vals), torch.cat(top_ids))
        return out
