"""From final hidden states to the logits and logprobs a batch asked for.

Only the rows that need them go through the LM head: each sampling request's last row, and the
prompt rows whose next-token logprob was requested (`logprob_indices`). The latter are scored
in blocks so a long prompt never materializes a [prompt_len, vocab] matrix at once.
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import torch

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


class LogitsProcessor:
    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        # Under tensor parallelism (set by shard_model) the LM head holds a slice of the vocab
        # rows: a rank's logits are columns of the whole, gathered here.
        self.tp: Optional["TpGroup"] = None

    def __call__(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, batch: ForwardBatch) -> LogitsProcessorOutput:
        def logits_of(rows: torch.Tensor) -> torch.Tensor:
            logits = torch.matmul(rows, lm_head_weight.t()).float()
            if self.tp is not None:
                logits = self.tp.all_gather_cols(logits)[:, : self.vocab_size]
            return logits

        out = LogitsProcessorOutput(next_token_logits=logits_of(hidden[batch.sample_indices]))
        if batch.return_all_logits:
            out.all_logits = logits_of(hidden)
        if batch.logprob_indices is not None and batch.logprob_indices.numel() > 0:
            logprobs, top_vals, top_ids = [], [], []
            k = batch.input_top_logprobs_num
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
