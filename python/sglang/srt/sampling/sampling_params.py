"""Per-request sampling parameters, with SGLang's names and defaults.

A request's `sampling_params` dict goes through three steps, in this order:
`SamplingParams.from_dict` (types; unknown keys and unsupported features are rejected),
`normalize` (canonical forms: stop strings as a list, temperature 0 as greedy), and
`verify` (value ranges against the model's vocabulary). Every failure is a ValueError whose
message names the offending field, so the server can return it to the client as a 400.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

# A request may ask for at most this many samples (each is a full request in the scheduler).
MAX_N = 128
# Below this temperature a request is greedy; SGLang uses the same cut-off.
GREEDY_TEMPERATURE_EPS = 1e-6


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    min_new_tokens: int = 0
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[Union[list[int], set[int]]] = None
    stop_regex: Optional[Union[str, list[str]]] = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1: the whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    sampling_seed: Optional[int] = None
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    # Token id (as a decimal string, the JSON form) -> value added to that token's logit.
    logit_bias: Optional[dict[str, float]] = None
    custom_params: Optional[Any] = None  # accepted for compatibility; unused
    # Set by `normalize` from the tokenizer: the longest stop string in tokens, which tells
    # the detokenizer how many trailing tokens may still turn into a stop string.
    stop_str_max_len: int = field(default=0, init=False)

    @classmethod
    def from_dict(cls, d: Optional[dict[str, Any]]) -> SamplingParams:
        """Parses a client's dict; a None value means "use the default"."""
        if d is not None and not isinstance(d, dict):
            raise ValueError(f"sampling_params must be a dict, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        for key, value in (d or {}).items():
            convert = _CONVERTERS.get(key)
            if convert is None:
                raise ValueError(f"unknown sampling parameter {key!r}")
            if value is not None:
                kwargs[key] = convert(key, value)
        params = cls(**kwargs)
        params.check_supported()
        return params

    @property
    def is_greedy(self) -> bool:
        """True when the next token is the argmax of the processed logits."""
        return self.top_k == 1 or self.temperature < GREEDY_TEMPERATURE_EPS

    def check_supported(self) -> None:
        """Rejects features this engine does not implement yet."""
        for name in ("regex", "json_schema", "ebnf"):
            if getattr(self, name) is not None:
                raise ValueError(f"{name}: structured output (regex/json_schema/ebnf) is not supported yet")
        stop_regex = self.stop_regex
        if stop_regex and any(stop_regex if isinstance(stop_regex, list) else [stop_regex]):
            raise ValueError("stop_regex is not supported yet")

    def normalize(self, tokenizer: Any = None) -> None:
        """Puts fields in canonical form; safe to call more than once."""
        if self.stop is None:
            self.stop = []
        elif isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        # A set: the scheduler tests every generated token against it.
        self.stop_token_ids = set(self.stop_token_ids or ())
        if self.temperature < GREEDY_TEMPERATURE_EPS:
            # SGLang's convention: greedy is top_k=1 at temperature 1, which never divides by 0.
            self.top_k = 1
            self.temperature = 1.0
        if tokenizer is not None and self.stop:
            self.stop_str_max_len = max(len(tokenizer.encode(s, add_special_tokens=False)) for s in self.stop)

    def verify(self, vocab_size: int) -> None:
        """Raises ValueError naming the first field outside its allowed range."""
        self.check_supported()
        _check(self.temperature >= 0, "temperature must be >= 0", self.temperature)
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(self.top_k == -1 or self.top_k >= 1, "top_k must be -1 or >= 1", self.top_k)
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, f"{name} must be in [-2, 2]", value)
        _check(
            0 < self.repetition_penalty <= 2,
            "repetition_penalty must be in (0, 2]",
            self.repetition_penalty,
        )
        _check(self.max_new_tokens >= 0, "max_new_tokens must be >= 0", self.max_new_tokens)
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}]",
            self.min_new_tokens,
        )
        _check(1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]", self.n)
        for token_id in self.stop_token_ids or ():
            _check(
                0 <= token_id < vocab_size,
                f"stop_token_ids must be in [0, {vocab_size})",
                token_id,
            )
        for key in self.logit_bias or {}:
            _check(0 <= int(key) < vocab_size, f"logit_bias keys must be in [0, {vocab_size})", key)

    def to_dict(self) -> dict[str, Any]:
        """The user-facing fields, JSON-serializable (stop_token_ids as a sorted list)."""
        out: dict[str, Any] = {}
        for name in _FIELD_NAMES:
            value = getattr(self, name)
            if isinstance(value, set):
                value = sorted(value)
            elif isinstance(value, (list, dict)):
                value = value.copy()
            out[name] = value
        return out


def _check(ok: bool, message: str, value: Any) -> None:
    # Written as `not ok` so that NaN, which fails every comparison, is rejected too.
    if not ok:
        raise ValueError(f"{message}, got {value!r}")


def _type_error(name: str, expected: str, value: Any) -> ValueError:
    return ValueError(f"sampling parameter {name!r} must be {expected}, got {type(value).__name__} {value!r}")


def _as_int(name: str, value: Any) -> int:
    # bool is a subclass of int, but `"max_new_tokens": true` is a client bug.
    if isinstance(value, bool) or not isinstance(value, int):
        raise _type_error(name, "an int", value)
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _type_error(name, "a float", value)
    return float(value)


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _type_error(name, "a bool", value)
    return value


def _as_str_or_str_list(name: str, value: Any) -> Union[str, list[str]]:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(s, str) for s in value):
        return list(value)
    raise _type_error(name, "a str or a list of str", value)


def _as_int_list(name: str, value: Any) -> list[int]:
    if isinstance(value, (list, tuple, set)):
        if all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return list(value)
    raise _type_error(name, "a list of int", value)


def _as_logit_bias(name: str, value: Any) -> dict[str, float]:
    if not isinstance(value, dict):
        raise _type_error(name, "a dict of token id -> float", value)
    bias: dict[str, float] = {}
    for key, amount in value.items():
        try:
            token_id = int(key)
        except (TypeError, ValueError):
            raise ValueError(f"sampling parameter {name!r} keys must be token ids, got {key!r}")
        if isinstance(key, (bool, float)) or not math.isfinite(_as_float(name, amount)):
            raise _type_error(name, "a dict of token id -> finite float", value)
        bias[str(token_id)] = float(amount)
    return bias


def _as_is(name: str, value: Any) -> Any:
    return value


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _as_int,
    "min_new_tokens": _as_int,
    "stop": _as_str_or_str_list,
    "stop_token_ids": _as_int_list,
    "stop_regex": _as_str_or_str_list,
    "temperature": _as_float,
    "top_p": _as_float,
    "top_k": _as_int,
    "min_p": _as_float,
    "frequency_penalty": _as_float,
    "presence_penalty": _as_float,
    "repetition_penalty": _as_float,
    "ignore_eos": _as_bool,
    "skip_special_tokens": _as_bool,
    "spaces_between_special_tokens": _as_bool,
    "no_stop_trim": _as_bool,
    "n": _as_int,
    "sampling_seed": _as_int,
    # Any non-null value is rejected by check_supported, whatever its type.
    "regex": _as_is,
    "json_schema": _as_is,
    "ebnf": _as_is,
    "logit_bias": _as_logit_bias,
    "custom_params": _as_is,
}

_FIELD_NAMES = [f.name for f in dataclasses.fields(SamplingParams) if f.init]
assert set(_CONVERTERS) == set(_FIELD_NAMES), "every user-facing field needs a converter"
