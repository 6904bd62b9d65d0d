"""How `select` decides between choices, given the server's logprobs of each choice's tokens.

Each method gets, per choice, the logprob entries `[logprob, token_id, token_text]` of the
tokens that belong to the choice (see RuntimeEndpoint.select for how they are found) and
their mean (`normalized_prompt_logprobs`), and returns a ChoicesDecision.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional


@dataclasses.dataclass
class ChoicesDecision:
    decision: str
    meta_info: Optional[dict[str, Any]] = None


def _values(entries: list[list[Any]]) -> list[float]:
    """The logprobs of a choice's entries; an unknown one (null: no context before it) counts 0."""
    return [e[0] if e[0] is not None else 0.0 for e in entries]


def mean_logprob(entries: list[list[Any]]) -> float:
    """Token-length-normalized logprob of one choice; -inf when no token of it could be scored."""
    known = [e[0] for e in entries if e[0] is not None]
    return sum(known) / len(known) if known else -math.inf


def _first_best(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)


class ChoicesSamplingMethod:
    """Base class; subclasses implement __call__."""

    requires_unconditional_logprobs = False

    def __call__(
        self,
        *,
        choices: list[str],
        normalized_prompt_logprobs: list[float],
        input_token_logprobs: list[list[Any]],
        output_token_logprobs: list[list[Any]],
        unconditional_token_logprobs: Optional[list[list[Any]]] = None,
    ) -> ChoicesDecision:
        raise NotImplementedError


def _meta(normalized, inputs, outputs, **extra) -> dict[str, Any]:
    return {
        "normalized_prompt_logprobs": normalized,
        "input_token_logprobs": inputs,
        "output_token_logprobs": outputs,
        **extra,
    }


class TokenLengthNormalized(ChoicesSamplingMethod):
    """The choice whose tokens have the highest mean logprob (the default)."""

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ) -> ChoicesDecision:
        best = _first_best(normalized_prompt_logprobs)
        return ChoicesDecision(
            choices[best], _meta(normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs)
        )


class GreedyTokenSelection(ChoicesSamplingMethod):
    """Compare choices token by token, keeping those with the best logprob at each position.

    A choice shorter than the others is padded with its own mean, so a prefix of a longer
    choice competes on its average rather than dropping out.
    """

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ) -> ChoicesDecision:
        width = max(len(entries) for entries in input_token_logprobs)
        rows = []
        for entries in input_token_logprobs:
            values = _values(entries)
            pad = sum(values) / len(values) if values else -math.inf
            rows.append(values + [pad] * (width - len(values)))
        alive = list(range(len(choices)))
        for pos in range(width):
            top = max(rows[i][pos] for i in alive)
            alive = [i for i in alive if rows[i][pos] == top]
            if len(alive) == 1:
                break
        meta = _meta(
            normalized_prompt_logprobs, input_token_logprobs, output_token_logprobs, greedy_logprob_matrix=rows
        )
        return ChoicesDecision(choices[alive[0]], meta)


class UnconditionalLikelihoodNormalized(ChoicesSamplingMethod):
    """The choice whose tokens gain the most, on average, from the prompt: mean of
    (logprob given the prompt - logprob of the choice's tokens on their own)."""

    requires_unconditional_logprobs = True

    def __call__(
        self,
        *,
        choices,
        normalized_prompt_logprobs,
        input_token_logprobs,
        output_token_logprobs,
        unconditional_token_logprobs=None,
    ) -> ChoicesDecision:
        if unconditional_token_logprobs is None:
            raise ValueError("unconditional_likelihood_normalized needs unconditional token logprobs")
        scores = []
        for cond, uncond in zip(input_token_logprobs, unconditional_token_logprobs):
            if len(cond) != len(uncond):
                raise ValueError(f"{len(cond)} conditional but {len(uncond)} unconditional logprobs for one choice")
            gains = [c - u for c, u in zip(_values(cond), _values(uncond))]
            scores.append(sum(gains) / len(gains) if gains else -math.inf)
        meta = _meta(
            normalized_prompt_logprobs,
            input_token_logprobs,
            output_token_logprobs,
            unconditional_token_logprobs=unconditional_token_logprobs,
            normalized_unconditional_prompt_logprobs=scores,
        )
        return ChoicesDecision(choices[_first_best(scores)], meta)


token_length_normalized = TokenLengthNormalized()
greedy_token_selection = GreedyTokenSelection()
unconditional_likelihood_normalized = UnconditionalLikelihoodNormalized()
