"""Constrained decoding with llguidance: grammars compiled from JSON schemas, regexes, choices and Lark, one matcher
per sequence, and the token bitmask applied to the logits before the sampler.

- :class:`GrammarCompiler` owns the llguidance tokenizer (built once, lazily, from our ``tokenizer.json``: ~3 s on
  the 248k vocabulary) and a cache of validated grammars keyed by their text. Added tokens (``<|image_pad|>``,
  ``<think>``, ``<|im_end|>``...) are special to llguidance, so free text inside a grammar never contains them.
- :class:`Constraint` is one sequence's matcher. With thinking it waits, unconstrained, for ``</think>``; the
  grammar then starts with the ``\\n\\n`` the chat template writes there.
- :func:`apply_bitmask` turns the packed mask (bit ``i % 32`` of word ``i // 32`` set = token ``i`` allowed) into
  ``-inf`` logits with a byte lookup table (no ``torch.compile``, works on CPU and CUDA).
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from minicpmv.engine.sampling import StructuredOutputs
from minicpmv.errors import InvalidInputError

JSON_OPTIONS = {"whitespace_flexible": False}  # compact JSON: "," and ":" with no free whitespace
THINK_GAP = "\n\n"  # what the chat template writes between </think> and the answer


def _lark_string(text: str) -> str:
    """A Lark string literal for ``text`` (JSON escapes are Lark escapes)."""
    return json.dumps(text, ensure_ascii=False)


def _lark_regex(pattern: str) -> str:
    return "/" + pattern.replace("/", "\\/") + "/"


def grammar_source(spec: StructuredOutputs) -> dict:
    """One llguidance grammar entry (``{"lark_grammar": ...}`` or ``{"json_schema": ...}``) for ``spec``."""
    import llguidance

    kind = spec.kind
    if kind in ("json", "json_object"):
        schema = {"type": "object"} if kind == "json_object" else spec.json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise InvalidInputError(f"{spec.param}: the JSON schema is not valid JSON: {exc}", param=spec.param) from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidInputError(f"{spec.param}: a JSON schema must be an object, got {type(schema).__name__}",
                                    param=spec.param)
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=dict(JSON_OPTIONS))
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(f"{spec.param}: the JSON schema cannot be used: {exc}", param=spec.param) from None
        return json.loads(text)["grammars"][0]
    if kind == "regex":
        return {"lark_grammar": f"start: {_lark_regex(spec.regex)}"}
    if kind == "choice":
        return {"lark_grammar": "start: " + " | ".join(_lark_string(c) for c in spec.choice)}
    return {"lark_grammar": spec.grammar}


def wrap_grammar(entry: dict, prefix: str = "") -> str:
    """The full llguidance grammar text: ``entry`` alone, or ``prefix`` (forced text) followed by it."""
    if not prefix:
        return json.dumps({"grammars": [entry]})
    body = {**entry, "name": "body"}
    return json.dumps({"grammars": [{"lark_grammar": f"start: {_lark_string(prefix)} @body"}, body]})


@dataclass(frozen=True)
class CompiledGrammar:
    text: str  # the llguidance grammar (JSON text): its cache key


_TOKENIZERS: dict[tuple, object] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _shared_tokenizer(tokenizer_json: str, vocab_size: int, eos: tuple[int, ...]):
    """One llguidance tokenizer per distinct tokenizer in the process (several LLMs over one checkpoint share it)."""
    import llguidance

    key = (hashlib.blake2b(tokenizer_json.encode(), digest_size=16).hexdigest(), vocab_size, eos)
    with _TOKENIZERS_LOCK:
        if key not in _TOKENIZERS:
            _TOKENIZERS[key] = llguidance.LLTokenizer(tokenizer_json, n_vocab=vocab_size, eos_token=list(eos))
        return _TOKENIZERS[key]


class GrammarCompiler:
    """Validates grammars against the tokenizer and caches them by text; makes matchers. Thread-safe."""

    def __init__(self, tokenizer_json: str, vocab_size: int, eos_token_ids: list[int], think_end_id: int | None,
                 cache_size: int = 256):
        self._tokenizer_json = tokenizer_json
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.think_end_id = think_end_id
        self._lock = threading.Lock()
        self._tokenizer = None
        self._cache: OrderedDict[str, CompiledGrammar] = OrderedDict()
        self.cache_size = cache_size
        self.compiles = 0  # grammars validated (cache misses)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> GrammarCompiler:
        """From a ``tokenizers.Tokenizer`` (its JSON is what llguidance reads)."""
        return cls(tokenizer.to_str(), vocab_size, eos_token_ids, tokenizer.token_to_id("</think>"))

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                self._tokenizer = _shared_tokenizer(self._tokenizer_json, self.vocab_size, tuple(self.eos_token_ids))
                self._tokenizer_json = ""  # 16 MB of text no longer needed
            return self._tokenizer

    def compile(self, text: str, param: str = "structured") -> CompiledGrammar:
        with self._lock:
            hit = self._cache.get(text)
            if hit is not None:
                self._cache.move_to_end(text)
                return hit
        import llguidance

        error = llguidance.LLMatcher.validate_grammar(text, self.tokenizer)
        if error:
            raise InvalidInputError(f"{param}: the grammar does not compile: {error.strip()}", param=param)
        compiled = CompiledGrammar(text)
        with self._lock:
            self.compiles += 1
            self._cache[text] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def constraint(self, spec: StructuredOutputs | None = None, *, lark: str | None = None,
                   after_think: bool = False) -> Constraint:
        """A fresh matcher for ``spec`` (or a Lark grammar); ``after_think``: free until ``</think>``."""
        entry = grammar_source(spec) if spec is not None else {"lark_grammar": lark}
        param = spec.param if spec is not None else "tool_choice"
        compiled = self.compile(wrap_grammar(entry, THINK_GAP if after_think else ""), param)
        return Constraint(self, compiled, waiting_for=self.think_end_id if after_think else None)


class Constraint:
    """One sequence's grammar state. ``active`` once the grammar applies (at once, or after ``</think>``)."""

    def __init__(self, compiler: GrammarCompiler, grammar: CompiledGrammar, waiting_for: int | None = None):
        import llguidance

        self.compiler = compiler
        self.matcher = llguidance.LLMatcher(compiler.tokenizer, grammar.text, log_level=0)
        if self.matcher.is_error():
            raise InvalidInputError(f"the grammar does not compile: {self.matcher.get_error()}")
        self.waiting_for = waiting_for

    def copy(self) -> Constraint:
        """The same grammar state, advanced independently from here (another choice of an n > 1 request)."""
        other = copy.copy(self)
        other.matcher = self.matcher.deep_copy()
        return other

    @property
    def active(self) -> bool:
        return self.waiting_for is None

    @property
    def done(self) -> bool:
        """The grammar is complete and admits nothing more (only an end token could follow)."""
        return self.active and self.matcher.is_stopped()

    def accept(self, token: int) -> None:
        if not self.active:
            if token == self.waiting_for:
                self.waiting_for = None
            return
        if self.matcher.is_stopped():  # the end token after a complete answer
            return
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"token {token} violates the output grammar: {self.matcher.get_error()}")

    def forced(self) -> list[int]:
        """Tokens the grammar admits as the only continuation (jump-forward); [] when there is a choice."""
        if not self.active or self.matcher.is_stopped():
            return []
        return list(self.matcher.compute_ff_tokens())


def mask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def fill_bitmask(constraints: list[Constraint], bitmask: torch.Tensor, executor=None) -> None:
    """Write each constraint's next-token mask into row i of ``bitmask`` ([n, words] int32, CPU, contiguous).

    llguidance releases the GIL while it works, so this can run beside the model's forward."""
    if executor is not None and len(constraints) > 1:
        rows = bitmask.shape[1] * 4
        executor.unsafe_compute_mask_ptr([(c.matcher, i) for i, c in enumerate(constraints)],
                                         bitmask.data_ptr(), rows, bitmask.shape[0])
        return
    for i, c in enumerate(constraints):
        row = bitmask[i]
        c.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * 4)


_TABLES: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def _byte_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """[256, 8]: for each mask byte, 0 for its allowed tokens and -inf for the others."""
    table = _TABLES.get((device, dtype))
    if table is None:
        bits = (torch.arange(256).unsqueeze(-1) >> torch.arange(8)) & 1
        table = _TABLES[(device, dtype)] = torch.zeros(256, 8, dtype=dtype).masked_fill(bits == 0, float("-inf")).to(device)
    return table


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """Set the logits of tokens the mask forbids to -inf, in place ([n, vocab] and [n, words]).

    Each mask byte looks up its 8 additive values (0 or -inf) in a table: two vector ops over the vocabulary,
    ~0.1 ms a row on the 248k vocabulary on a CPU."""
    n, vocab = logits.shape
    codes = bitmask.to(logits.device, non_blocking=True).contiguous().view(torch.uint8).int()  # little-endian bytes
    add = torch.nn.functional.embedding(codes, _byte_table(logits.device, logits.dtype)).view(n, -1)
    logits.add_(add[:, :vocab])


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[n, vocab] bool from a packed [n, words] int32 mask (for tests and tools; the engine uses apply_bitmask)."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=torch.int32, device=bitmask.device)) & 1
    return (bits == 1).reshape(bitmask.shape[0], -1)[:, :vocab_size]
