"""Per-request sampling options (OpenAI / vLLM names and meanings) and their validation."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import ClassVar

from minicpmv.errors import InvalidInputError

MAX_LOGPROBS = 20
MAX_PENALTY = 2.0
MAX_BIAS = 100
# Below this a temperature is treated as greedy: dividing logits by it would overflow float32.
GREEDY_TEMPERATURE = 1e-5
FLOAT32_TINY, FLOAT32_MAX = 1.2e-38, 3.4e38
SEED_MIN, SEED_END = -(2**63), 2**63  # distinct seeds stay distinct in torch.Generator.manual_seed (mod 2**64)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A number that stays finite in float32 (the sampler computes in float32)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= FLOAT32_MAX


def _is_valid_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:  # a lone surrogate
        return False


@dataclass
class StructuredOutputs:
    """A constraint on the answer (vLLM's ``structured_outputs``): exactly one of ``json`` (a JSON schema, dict or
    text), ``json_object`` (any JSON object), ``regex``, ``choice`` (one of these strings) or ``grammar`` (Lark).

    JSON is written compactly (no whitespace between tokens). With thinking enabled the reasoning stays free and the
    constraint applies from ``</think>`` on. ``param`` names the request field it came from, for error messages.
    """

    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False
    param: str = field(default="structured", compare=False)

    KINDS: ClassVar[tuple[str, ...]] = ("json", "regex", "choice", "grammar", "json_object")

    def __post_init__(self) -> None:
        if isinstance(self.choice, (tuple, Sequence)) and not isinstance(self.choice, str):
            self.choice = list(self.choice)
        self.validate()

    @classmethod
    def from_dict(cls, values: dict, param: str = "structured") -> StructuredOutputs:
        names = set(cls.KINDS)
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidInputError(f"{param}: unknown field(s) {unknown}; known: {sorted(names)}", param=param)
        return cls(**values, param=param)

    @classmethod
    def from_response_format(cls, value: dict, param: str = "response_format") -> StructuredOutputs | None:
        """OpenAI ``response_format``: ``{"type": "text"}`` (free), ``{"type": "json_object"}``, or
        ``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}, "strict": ..., "description": ...}}``."""
        if not isinstance(value, dict):
            raise InvalidInputError(f"{param} must be an object with a 'type', got {type(value).__name__}", param=param)
        kind = value.get("type")
        extra = sorted(set(value) - {"type", "json_schema"})
        if extra or (kind != "json_schema" and "json_schema" in value):
            raise InvalidInputError(f"{param}: unexpected field(s) {extra or ['json_schema']}", param=param)
        if kind == "text":
            return None
        if kind == "json_object":
            return cls(json_object=True, param=param)
        if kind != "json_schema":
            raise InvalidInputError(f"{param}.type must be 'text', 'json_object' or 'json_schema', got {kind!r}",
                                    param=param)
        spec = value.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidInputError(f"{param}.json_schema must be an object with 'name' and 'schema'", param=param)
        unknown = sorted(set(spec) - {"name", "schema", "strict", "description"})
        if unknown:
            raise InvalidInputError(f"{param}.json_schema: unknown field(s) {unknown}", param=param)
        if not isinstance(spec.get("name"), str) or not spec["name"]:
            raise InvalidInputError(f"{param}.json_schema.name must be a non-empty string", param=param)
        if spec.get("strict") not in (None, True, False):
            raise InvalidInputError(f"{param}.json_schema.strict must be a boolean", param=param)
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise InvalidInputError(f"{param}.json_schema.schema must be a JSON-schema object", param=param)
        return cls(json=schema, param=param)

    @property
    def kind(self) -> str:
        return next(k for k in self.KINDS if getattr(self, k) not in (None, False))

    def validate(self) -> None:
        given = [k for k in self.KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise InvalidInputError(
                f"{self.param} needs exactly one of {', '.join(self.KINDS)}, got {given or 'none'}", param=self.param)
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise InvalidInputError(f"{self.param}: json must be a JSON schema (an object or its JSON text), "
                                    f"got {type(self.json).__name__}", param=self.param)
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value or not _is_valid_unicode(value)):
                raise InvalidInputError(f"{self.param}: {name} must be a non-empty string", param=self.param)
        if self.choice is not None and (not isinstance(self.choice, list) or not self.choice or not all(
                isinstance(c, str) and c and _is_valid_unicode(c) for c in self.choice)):
            raise InvalidInputError(f"{self.param}: choice must be a non-empty list of non-empty strings", param=self.param)
        if not isinstance(self.json_object, bool):
            raise InvalidInputError(f"{self.param}: json_object must be a boolean", param=self.param)


@dataclass
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = None
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # logprobs of the prompt's tokens (each given the ones before), top-n beside
    skip_special_tokens: bool = True
    structured: StructuredOutputs | None = None  # constrained decoding (JSON schema, regex, choice, grammar)
    # token id -> added to its logit (OpenAI's logit_bias): -100 keeps the token out, +100 all but forces it
    logit_bias: dict[int, float] | None = None

    def __post_init__(self) -> None:
        for f in fields(self):  # numpy scalars (np.float32(0.7), np.int64(3)) become Python numbers
            value = getattr(self, f.name)
            if isinstance(value, numbers.Number) and not isinstance(value, (int, float)) and hasattr(value, "item"):
                setattr(self, f.name, value.item())
        if isinstance(self.structured, dict):  # SamplingParams(structured={"json": schema})
            self.structured = StructuredOutputs.from_dict(self.structured)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []
        elif isinstance(self.stop, Sequence):
            self.stop = list(self.stop)
        if isinstance(self.stop_token_ids, Sequence) and not isinstance(self.stop_token_ids, str):
            self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    def resolved_stop_token_ids(self, defaults: Sequence[int]) -> list[int]:
        """The ids that end this request: the explicit list, else the model's defaults (its EOS ids).

        ``ignore_eos`` drops the defaults (the model's end tokens) but keeps ids the caller listed.
        """
        if self.stop_token_ids is not None:
            return list(self.stop_token_ids)
        return [] if self.ignore_eos else list(defaults)

    def validate(self) -> None:
        def bad(name: str, rule: str) -> InvalidInputError:
            return InvalidInputError(f"{name} must be {rule}, got {getattr(self, name)!r}", param=name)

        if not _is_number(self.temperature) or self.temperature < 0:
            raise bad("temperature", "a number in [0, 3.4e38] (0 = greedy)")
        if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
            raise bad("top_p", "a number in (0, 1]")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise bad("top_k", "an integer >= 1, or 0 / -1 to disable")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise bad("min_p", "a number in [0, 1]")
        if not _is_number(self.repetition_penalty) or self.repetition_penalty < FLOAT32_TINY:  # divides logits
            raise bad("repetition_penalty", "a number in [1.2e-38, 3.4e38] (1 = off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -MAX_PENALTY <= value <= MAX_PENALTY:
                raise bad(name, f"a number in [-{MAX_PENALTY:g}, {MAX_PENALTY:g}]")
        if self.seed is not None and (not _is_int(self.seed) or not SEED_MIN <= self.seed < SEED_END):
            raise bad("seed", "an integer in [-2**63, 2**63) or null")
        if self.max_tokens is not None and (not _is_int(self.max_tokens) or self.max_tokens < 1):
            raise bad("max_tokens", "an integer >= 1 or null")
        if not _is_int(self.min_tokens) or self.min_tokens < 0:
            raise bad("min_tokens", "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"<= max_tokens ({self.max_tokens})")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s and _is_valid_unicode(s) for s in self.stop):
            raise bad("stop", "a non-empty string or a list of non-empty strings (valid Unicode)")
        if self.stop_token_ids is not None and (
            not isinstance(self.stop_token_ids, list) or not all(_is_int(t) and t >= 0 for t in self.stop_token_ids)
        ):
            raise bad("stop_token_ids", "a list of integers >= 0 or null")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "a boolean")
        if self.logprobs is not None and (not _is_int(self.logprobs) or not 0 <= self.logprobs <= MAX_LOGPROBS):
            raise bad("logprobs", f"an integer in [0, {MAX_LOGPROBS}] or null")
        if self.prompt_logprobs is not None and (
            not _is_int(self.prompt_logprobs) or not 0 <= self.prompt_logprobs <= MAX_LOGPROBS
        ):
            raise bad("prompt_logprobs", f"an integer in [0, {MAX_LOGPROBS}] or null")
        if not isinstance(self.skip_special_tokens, bool):
            raise bad("skip_special_tokens", "a boolean")
        if self.structured is not None:
            if not isinstance(self.structured, StructuredOutputs):
                raise bad("structured", "a StructuredOutputs or None")
            self.structured.validate()
        if self.logit_bias is not None and (
            not isinstance(self.logit_bias, dict)
            or not all(_is_int(t) and t >= 0 and _is_number(b) and -MAX_BIAS <= b <= MAX_BIAS for t, b in self.logit_bias.items())
        ):
            raise bad("logit_bias", f"a map of token ids (integers >= 0) to numbers in [-{MAX_BIAS}, {MAX_BIAS}]")
