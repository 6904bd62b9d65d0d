"""Grammars for constrained decoding (`regex`, `json_schema`, `ebnf`), on xgrammar.

Data flow: the tokenizer manager checks a request's grammar text (`check_grammar`: syntax
only, no tokenizer) and rejects a bad one with a 400. The scheduler asks its rank's
`GrammarBackend` to compile it (`submit`: a future, compiled on a worker thread, cached by
(kind, text)), keeps the request in its grammar queue until the future is done, then gives the
request its own `Grammar` (a matcher over the compiled grammar). Each step the output
processor fills the next-token bitmask of every constrained row (the sampler sets the logits
of disallowed tokens to -inf) and feeds the sampled token back with `accept_token`; a
matcher that has accepted a stop token `is_terminated` and the request finishes.

xgrammar is imported lazily, so importing the scheduler does not load it.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Optional

import torch

# The sampling parameters that carry a grammar; a request may set at most one of them.
GRAMMAR_KINDS = ("regex", "json_schema", "ebnf")
DEFAULT_CACHE_SIZE = 256
# xgrammar prefixes its messages with "[time] /path/file.cc:line: "; clients need the rest.
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s+\S+:\d+:\s*")

GrammarKey = tuple[str, str]  # (kind, text)


def grammar_key(params: Any) -> Optional[GrammarKey]:
    """(kind, text) of the grammar a SamplingParams asks for, None when it asks for none."""
    for kind in GRAMMAR_KINDS:
        text = getattr(params, kind, None)
        if text is not None:
            return kind, text
    return None


def _compiler_message(exc: BaseException) -> str:
    return _LOG_PREFIX.sub("", str(exc).strip()).strip()


def check_grammar(kind: str, text: Any) -> None:
    """Raises ValueError naming `kind` when `text` is not a valid grammar of that kind.

    Parses without a tokenizer, which is cheap next to compiling against a vocabulary."""
    import json

    import xgrammar

    if not isinstance(text, str):
        raise ValueError(f"sampling parameter {kind!r} must be a str, got {type(text).__name__}")
    if kind == "json_schema":
        try:
            json.loads(text)
        except ValueError as exc:
            raise ValueError(f"json_schema is not valid JSON: {exc}") from None
    parse = {
        "regex": xgrammar.Grammar.from_regex,
        "json_schema": xgrammar.Grammar.from_json_schema,
        "ebnf": xgrammar.Grammar.from_ebnf,
    }[kind]
    try:
        parse(text)
    except Exception as exc:  # xgrammar raises RuntimeError with the parser's message
        raise ValueError(f"{kind} is not a valid grammar: {_compiler_message(exc)}") from None


def allocate_bitmask(num_rows: int, vocab_size: int) -> torch.Tensor:
    """[num_rows, ceil(vocab_size / 32)] int32 on the CPU, every token allowed: bit j of word w
    stands for token 32 * w + j (xgrammar's layout)."""
    return torch.full((num_rows, (vocab_size + 31) // 32), -1, dtype=torch.int32)


def allows_other_than(bitmask_row: torch.Tensor, token_ids: list[int]) -> bool:
    """Whether a bitmask row (int32 words) allows any token outside `token_ids`."""
    row = bitmask_row.clone()
    for token in token_ids:
        word, bit = divmod(token, 32)
        if word < row.numel():
            clear = ~(1 << bit) & 0xFFFFFFFF  # as an int32: the same 32 bits, signed
            row[word] &= clear - (1 << 32) if clear >= 1 << 31 else clear
    return bool(row.any())


class Grammar:
    """One request's position in its grammar: which tokens may come next."""

    def __init__(self, compiled: Any):
        import xgrammar

        self._compiled = compiled
        self._matcher = xgrammar.GrammarMatcher(compiled)

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        """Writes the allowed next tokens into row `row` of the CPU int32 `bitmask` [B, ceil(V/32)]."""
        self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept_token(self, token: int) -> bool:
        """Advances past `token`; False (and no change) when the grammar does not allow it."""
        return self._matcher.accept_token(token)

    def is_terminated(self) -> bool:
        """Whether the grammar has ended: a stop token was accepted after a complete match."""
        return self._matcher.is_terminated()

    def rebuild(self, tokens: Iterable[int]) -> None:
        """A fresh matcher fed `tokens` (a request's output so far); raises ValueError when the
        grammar rejects one of them."""
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(self._compiled)
        for i, token in enumerate(tokens):
            if not self._matcher.accept_token(token):
                raise ValueError(f"the grammar rejects output token {i} ({token})")


class GrammarBackend:
    """Compiles grammars against one tokenizer and vocabulary, off the caller's thread."""

    def __init__(
        self,
        tokenizer_info: Any,
        num_workers: int = 1,
        cache_size: int = DEFAULT_CACHE_SIZE,
        any_whitespace: bool = True,
    ):
        """`tokenizer_info`: an xgrammar.TokenizerInfo (the vocabulary and its stop tokens);
        `any_whitespace`: JSON may hold any whitespace between its tokens (SGLang's default),
        else only the single spaces of ", " and ": "."""
        import xgrammar

        # xgrammar's own cache is off: ours keys by request text and holds futures, so two
        # requests with one grammar share a single compile even while it runs.
        self._compiler = xgrammar.GrammarCompiler(tokenizer_info, max_threads=1, cache_enabled=False)
        self._pool = ThreadPoolExecutor(max_workers=num_workers, thread_name_prefix="grammar")
        self._cache: OrderedDict[GrammarKey, Future] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self.vocab_size = tokenizer_info.vocab_size
        self.any_whitespace = any_whitespace
        self.num_cache_hits = 0

    @classmethod
    def from_tokenizer(
        cls, tokenizer: Any, vocab_size: int, stop_token_ids: Optional[Iterable[int]] = None, **kwargs: Any
    ) -> GrammarBackend:
        """From a Hugging Face tokenizer; `vocab_size` is the model's (its logits' width), which
        may exceed the tokenizer's; `stop_token_ids` end a grammar (default: the tokenizer's EOS)."""
        import xgrammar

        stops = sorted(stop_token_ids) if stop_token_ids else None
        info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        return cls(info, **kwargs)

    def submit(self, key: GrammarKey) -> Future:
        """A future of the compiled grammar for (kind, text); it raises ValueError if the
        grammar does not compile."""
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.num_cache_hits += 1
                return future
            future = self._pool.submit(self._compile, key)
            self._cache[key] = future
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
            return future

    def _compile(self, key: GrammarKey) -> Any:
        kind, text = key
        compile_fn = {
            "regex": self._compiler.compile_regex,
            "json_schema": lambda text: self._compiler.compile_json_schema(text, any_whitespace=self.any_whitespace),
            "ebnf": self._compiler.compile_grammar,
        }[kind]
        try:
            return compile_fn(text)
        except Exception as exc:
            raise ValueError(f"{kind} does not compile: {_compiler_message(exc)}") from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
