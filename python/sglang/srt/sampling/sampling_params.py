"""Per-request sampling parameters, with SGLang's names and defaults.

A request's `sampling_params` dict goes through three steps, in this order:
`SamplingParams.from_dict` (types; unknown keys and unsupported features are rejected),
`normalize` (canonical forms: stop strings as a list, temperature 0 as greedy), and
`verify` (value ranges against the model's vocabulary). Every failure is a ValueError whose
message names the offending field, so the server can return it to the client as a 400.

The ranges keep every value the sampler sees finite in float32: a repetition penalty of 1e-300
rounds to 0 and a bias of 1e300 to inf, and either turns a row of probabilities into NaN. The
sampler copes with non-finite logits anyway (sampler.py), but a request should not get there.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

from sglang.srt.constrained.grammar_backend import GRAMMAR_KINDS, check_grammar

# A request may ask for at most this many samples (each is a full request in the scheduler).
MAX_N = 128
# Dividing a logit by a penalty under this scales it by more than 100: no sampling use, and
# far from the float32 underflow (1e-300 rounds to 0) that turns logits into inf and NaN.
MIN_REPETITION_PENALTY = 0.01
MAX_REPETITION_PENALTY = 2.0
# Above this temperature every distribution is uniform to float32 precision anyway.
MAX_TEMPERATURE = 1e4
# OpenAI's logit_bias range; from_dict clamps values into it, as OpenAI does.
MAX_LOGIT_BIAS = 100.0
# top_k beyond the vocabulary means "all of it"; this bound only keeps the value an int32.
MAX_TOP_K = (1 << 31) - 1
# sampling_seed is an int64 on the device (seeds of n > 1 samples are seed + i, wrapped).
MAX_SAMPLING_SEED = (1 << 63) - 1
# Stop conditions are tested on every generated token, and stop strings on the decoded tail.
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024
# custom_params is opaque JSON; its depth is bounded so that no walk over it can recurse deeply.
MAX_CUSTOM_PARAMS_DEPTH = 32
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
    custom_params: Optional[dict[str, Any]] = None  # a JSON object; accepted for compatibility, unused
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
        grammars = [name for name in GRAMMAR_KINDS if getattr(self, name) is not None]
        if len(grammars) > 1:
            raise ValueError(f"{' and '.join(grammars)} are mutually exclusive: set at most one of them")
        stop_regex = self.stop_regex
        if stop_regex and any(stop_regex if isinstance(stop_regex, list) else [stop_regex]):
            raise ValueError("stop_regex is not supported yet")

    def check_grammar(self) -> None:
        """Raises ValueError naming the field when the grammar (regex/json_schema/ebnf) does
        not parse; the scheduler compiles it against the vocabulary later."""
        for kind in GRAMMAR_KINDS:
            text = getattr(self, kind)
            if text is not None:
                check_grammar(kind, text)

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
        _check(
            0 <= self.temperature <= MAX_TEMPERATURE,
            f"temperature must be >= 0 (and at most {MAX_TEMPERATURE:g})",
            self.temperature,
        )
        _check(0 < self.top_p <= 1, "top_p must be in (0, 1]", self.top_p)
        _check(
            self.top_k == -1 or 1 <= self.top_k <= MAX_TOP_K,
            f"top_k must be -1 or >= 1 (and at most {MAX_TOP_K})",
            self.top_k,
        )
        _check(0 <= self.min_p <= 1, "min_p must be in [0, 1]", self.min_p)
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            _check(-2 <= value <= 2, f"{name} must be in [-2, 2]", value)
        _check(
            MIN_REPETITION_PENALTY <= self.repetition_penalty <= MAX_REPETITION_PENALTY,
            f"repetition_penalty must be in [{MIN_REPETITION_PENALTY}, {MAX_REPETITION_PENALTY:g}]",
            self.repetition_penalty,
        )
        if self.sampling_seed is not None:
            _check(
                0 <= self.sampling_seed <= MAX_SAMPLING_SEED,
                "sampling_seed must be an integer in [0, 2**63)",
                self.sampling_seed,
            )
        _check(self.max_new_tokens >= 0, "max_new_tokens must be >= 0", self.max_new_tokens)
        _check(
            0 <= self.min_new_tokens <= self.max_new_tokens,
            f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}]",
            self.min_new_tokens,
        )
        _check(1 <= self.n <= MAX_N, f"n must be in [1, {MAX_N}]", self.n)
        self.check_grammar()
        _check_stop_strings(self.stop)
        stop_token_ids = self.stop_token_ids or ()
        _check(
            len(stop_token_ids) <= MAX_STOP_TOKEN_IDS,
            f"stop_token_ids must hold at most {MAX_STOP_TOKEN_IDS} ids",
            len(stop_token_ids),
        )
        for token_id in stop_token_ids:
            _check(
                0 <= token_id < vocab_size,
                f"stop_token_ids must be in [0, {vocab_size})",
                token_id,
            )
        for key, value in (self.logit_bias or {}).items():
            _check(0 <= int(key) < vocab_size, f"logit_bias keys must be in [0, {vocab_size})", key)
            _check(
                -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS,
                f"logit_bias values must be in [{-MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
                value,
            )
        if self.custom_params is not None:
            _check_custom_params("custom_params", self.custom_params)

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


def _check_stop_strings(stop: Optional[Union[str, list[str]]]) -> None:
    stops = [stop] if isinstance(stop, str) else stop or []
    _check(
        len(stops) <= MAX_STOP_STRINGS,
        f"stop must hold at most {MAX_STOP_STRINGS} strings",
        len(stops),
    )
    for s in stops:
        _check(
            len(s) <= MAX_STOP_STRING_CHARS,
            f"stop strings must be at most {MAX_STOP_STRING_CHARS} characters",
            len(s),
        )


def _check_custom_params(name: str, value: Any) -> None:
    """`value` must be a JSON object (str keys; str, int64, finite float, bool, None, list and
    object values) nested at most MAX_CUSTOM_PARAMS_DEPTH deep; walked without recursion."""
    if not isinstance(value, dict):
        raise _type_error(name, "a JSON object", value)
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > MAX_CUSTOM_PARAMS_DEPTH:
                raise ValueError(f"{name} must be nested at most {MAX_CUSTOM_PARAMS_DEPTH} levels deep")
            if isinstance(node, dict):
                if not all(isinstance(k, str) for k in node):
                    raise ValueError(f"{name} keys must be strings")
                children = node.values()
            else:
                children = node
            stack.extend((child, depth + 1) for child in children)
        elif isinstance(node, float):
            if not math.isfinite(node):
                raise ValueError(f"{name} must not hold NaN or infinity, got {node!r}")
        elif isinstance(node, int) and not isinstance(node, bool):
            # what the message codec (orjson) can carry
            if not -(1 << 63) <= node < 1 << 64:
                raise ValueError(f"{name} integers must fit in 64 bits, got {node!r}")
        elif node is not None and not isinstance(node, (str, bool)):
            raise _type_error(name, "JSON (objects, arrays, strings, numbers, booleans, null)", node)


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


def _as_str(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _type_error(name, "a str", value)
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
        bias[str(token_id)] = min(max(float(amount), -MAX_LOGIT_BIAS), MAX_LOGIT_BIAS)
    return bias


def _as_stop_strings(name: str, value: Any) -> Union[str, list[str]]:
    stop = _as_str_or_str_list(name, value)
    _check_stop_strings(stop)
    return stop


def _as_custom_params(name: str, value: Any) -> dict[str, Any]:
    _check_custom_params(name, value)
    return value


_CONVERTERS: dict[str, Callable[[str, Any], Any]] = {
    "max_new_tokens": _as_int,
    "min_new_tokens": _as_int,
    "stop": _as_stop_strings,
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
    "regex": _as_str,
    "json_schema": _as_str,
    "ebnf": _as_str,
    "logit_bias": _as_logit_bias,
    "custom_params": _as_custom_params,
}

_FIELD_NAMES = [f.name for f in dataclasses.fields(SamplingParams) if f.init]
assert set(_CONVERTERS) == set(_FIELD_NAMES), "every user-facing field needs a converter"
