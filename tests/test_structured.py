"""Constrained decoding on the tiny random model: JSON schemas, regex, choice, Lark, thinking, tool calls, batching,
jump-forward, errors (Python API; the server spellings are in test_server_structured.py)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from minicpmv.engine.engine import EngineConfig
from minicpmv.engine.sampling import SamplingParams, StructuredOutputs
from minicpmv.errors import InvalidInputError
from minicpmv.llm import LLM
from minicpmv.output.constraints import allowed_tokens, apply_bitmask, fill_bitmask, mask_words
from minicpmv.output.tool_grammar import tool_call_grammar
from tests.tiny import user

S, I = {"type": "string", "maxLength": 6}, {"type": "integer", "minimum": -50, "maximum": 50}


def obj(props: dict, required: list | None = None) -> dict:
    return {"type": "object", "properties": props, "required": list(props) if required is None else required,
            "additionalProperties": False}


# Bounded strings, numbers and arrays: a random model closes a free string only by chance (1 token in ~1000), and
# greedy on random weights writes 0.0000... forever where a number's digits are free (multipleOf bounds them; binary fractions keep jsonschema exact).
SCHEMAS = [
    obj({"name": S}),
    obj({"age": I, "name": S}),
    obj({"color": {"enum": ["red", "green", "blue"]}}),
    obj({"ok": {"type": "boolean"}, "none": {"type": "null"}}),
    obj({"price": {"type": "number", "minimum": 0, "maximum": 100, "multipleOf": 0.25}}),
    obj({"n": {"type": "integer", "minimum": 3, "maximum": 5}, "m": {"type": "integer", "exclusiveMaximum": 2, "minimum": -2}}),
    obj({"tags": {"type": "array", "items": S, "minItems": 1, "maxItems": 3}}),
    obj({"grid": {"type": "array", "items": {"type": "array", "items": {"enum": [0, 1]}, "maxItems": 2}, "minItems": 2, "maxItems": 2}}),
    obj({"user": obj({"id": I, "email": {"type": "string", "pattern": "^[a-z]{1,5}@[a-z]{1,5}\\.com$"}})}),
    obj({"a": obj({"b": obj({"c": {"enum": ["x", "y"]}})})}),
    obj({"opt": S, "req": I}, required=["req"]),
    obj({"x": I, "y": I, "z": I}, required=[]),
    obj({"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"}}),
    obj({"v": {"anyOf": [I, {"type": "boolean"}, {"type": "string", "maxLength": 3}]}}),
    obj({"items": {"type": "array", "items": obj({"sku": {"type": "string", "pattern": "^[0-9]{4}$"}, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}), "maxItems": 2}}),
    obj({"status": {"const": "done"}, "count": {"type": "integer", "minimum": 0, "maximum": 3}}),
    obj({"date": {"type": "string", "pattern": "^20[0-9]{2}-[01][0-9]-[0-3][0-9]$"}}),
    obj({"short": {"type": "string", "minLength": 2, "maxLength": 4}}),
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 2, "maxItems": 4},
    obj({"kind": {"anyOf": [obj({"cat": S}), obj({"dog": I})]}}),
    {"type": "integer", "minimum": 10, "maximum": 99},
    {"enum": ["yes", "no", 3, None]},
    obj({"ratio": {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.125}, "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3}}),
]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, dtype="float32", progress=False, engine_config=EngineConfig(max_num_seqs=48, max_waiting=512))


def json_params(schema, seed, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 160)
    kw.setdefault("temperature", 1.0)
    return SamplingParams(seed=seed, structured=StructuredOutputs(json=schema), **kw)


def test_200_requests_over_23_schemas_all_validate(llm):
    """Greedy on varied prompts (a random draw costs ~2-10 ms per token on the 248k vocabulary), one in four sampled;
    a repetition penalty keeps the random model from writing 0.000000... forever."""
    assert len(SCHEMAS) >= 20
    jobs = [(SCHEMAS[i % len(SCHEMAS)], i) for i in range(200)]
    params = [json_params(s, i, temperature=1.0 if i % 4 == 0 else 0) for s, i in jobs]
    results = llm.chat([[user(f"Give me JSON number {i}.")] for i in range(200)], params)
    failed = [(seed, r.finish_reason, r.text) for (schema, seed), r in zip(jobs, results) if r.finish_reason != "stop"]
    assert not failed, [(s, r, t[:80]) for s, r, t in failed]
    for (schema, seed), r in zip(jobs, results):
        jsonschema.validate(json.loads(r.text), schema)
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", r.text))  # compact: no space outside strings
    assert len({r.text for r in results}) > 2 * len(SCHEMAS)  # not one fixed answer per schema


def test_regex_choice_and_lark(llm):
    specs = [StructuredOutputs(regex=r"[0-9]{3}-[a-z]{2,4}"), StructuredOutputs(choice=["red", "green", "blue"]),
             StructuredOutputs(grammar='start: "(" num ("+" num){1,3} ")"\nnum: /[1-9][0-9]?/')]
    checks = [lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", t), lambda t: t in ("red", "green", "blue"),
              lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?){1,3}\)", t)]
    params = [SamplingParams(temperature=1.0, seed=s, max_tokens=40, structured=spec) for spec in specs for s in range(3)]
    results = llm.chat([[user("Answer.")]] * len(params), params)
    for i, r in enumerate(results):
        assert r.finish_reason == "stop" and checks[i // 3](r.text), r.text
    assert len({r.text for r in results[:3]}) > 1


def test_streamed_equals_non_streamed_for_the_same_seed(llm):
    for schema, seed in [(SCHEMAS[14], 7), (SCHEMAS[8], 8), (SCHEMAS[13], 9)]:
        whole = llm.chat([user("JSON please.")], json_params(schema, seed))[0]
        deltas = list(llm.chat_stream([user("JSON please.")], json_params(schema, seed)))
        assert "".join(d.text for d in deltas) == whole.text
        assert deltas[-1].result.token_ids == whole.token_ids and deltas[-1].finish_reason == "stop"


@pytest.mark.parametrize("overlap_masks", [True, False])  # masks filled beside the forward, or before it
def test_a_mixed_batch_gives_each_the_same_greedy_tokens_as_alone(llm, overlap_masks):
    llm.engine.config.overlap_masks = overlap_masks
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    constrained = [SamplingParams(temperature=0, max_tokens=60, structured=StructuredOutputs(json=SCHEMAS[i]))
                   for i in (1, 6, 14)]
    convs = [[user("One.")], [user("Two, a bit longer.")], [user("Three.")], [user("Four!")], [user("Five.")]]
    params = [free, constrained[0], free, constrained[1], constrained[2]]
    try:
        alone = [llm.chat(c, p)[0].token_ids for c, p in zip(convs, params)]
        together = [r.token_ids for r in llm.chat(convs, params)]
    finally:
        llm.engine.config.overlap_masks = True
    assert together == alone
    assert json.loads(llm.processor.tokenizer.decode(alone[1], skip_special_tokens=True)) is not None


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_jump_forward_gives_the_same_tokens_as_step_by_step(llm, temperature):
    schema = SCHEMAS[14]
    params = lambda seed: SamplingParams(temperature=temperature, seed=seed, max_tokens=120,
                                         structured=StructuredOutputs(json=schema))
    convs = [[user("Items.")]] * 4
    before = llm.engine.masks.forced
    fast = llm.chat(convs, [params(s) for s in range(4)])
    assert llm.engine.masks.forced > before  # keys and '","' were fed as chunks
    llm.engine.config.jump_forward = False
    try:
        slow = llm.chat(convs, [params(s) for s in range(4)])
    finally:
        llm.engine.config.jump_forward = True
    assert [r.token_ids for r in fast] == [r.token_ids for r in slow]
    assert [r.text for r in fast] == [r.text for r in slow]


def test_cut_by_max_tokens_mid_json_is_length(llm):
    r = llm.chat([user("Long JSON.")], json_params(SCHEMAS[14], 1, max_tokens=5))[0]
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    with pytest.raises(ValueError):
        json.loads(r.text)


def test_thinking_is_free_and_the_constraint_starts_after_think(llm, monkeypatch):
    """The tiny model never writes </think> by itself: its logits are nudged to do so at the 6th output token."""
    think_end = llm.processor.tokenizer.token_to_id("</think>")
    run = llm.engine.runner.run

    def nudged(batch, snapshots=None, **kw):
        logits = run(batch, snapshots, **kw).clone()
        for i, (seq, _) in enumerate(batch):
            if len(seq.output_ids) == 5:
                logits[i, think_end] = 1e4
        return logits

    monkeypatch.setattr(llm.engine.runner, "run", nudged)
    schema = SCHEMAS[1]
    r = llm.chat([user("Think, then JSON.")], json_params(schema, 3), enable_thinking=True)[0]
    assert r.finish_reason == "stop"
    assert r.reasoning and len(r.token_ids) > 6
    assert r.token_ids[5] == think_end
    jsonschema.validate(json.loads(r.text), schema)
    assert llm.processor.tokenizer.decode(r.token_ids[6:8]) .startswith("\n")  # the template's gap, then JSON


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_bitmask_forbids_exactly_the_cleared_bits(dtype):
    vocab = 32 * 5 + 7  # a partly used last word
    bitmask = torch.randint(-(2**31), 2**31 - 1, (3, mask_words(vocab)), dtype=torch.int32)
    bitmask[1] = 0
    bitmask[1, 2] = -(2**31)  # only the top bit: token 95
    bitmask[2] = -1
    logits = torch.randn(3, vocab).to(dtype)
    masked = logits.clone()
    apply_bitmask(masked, bitmask)
    for row in range(3):
        for token in range(vocab):
            allowed = (int(bitmask[row, token // 32]) >> (token % 32)) & 1
            assert masked[row, token] == (logits[row, token] if allowed else float("-inf")), (row, token)
    assert torch.isfinite(masked[1]).nonzero().flatten().tolist() == [95]
    assert torch.equal(allowed_tokens(bitmask, vocab), torch.isfinite(masked))


def test_special_tokens_stay_out_of_free_text(llm):
    tok = llm.processor.tokenizer
    constraint = llm.grammars.constraint(StructuredOutputs(regex="(.|\n)*"))
    bitmask = torch.empty((1, mask_words(llm.grammars.vocab_size)), dtype=torch.int32)
    fill_bitmask([constraint], bitmask)
    allowed = allowed_tokens(bitmask, llm.grammars.vocab_size)[0]
    assert allowed.sum() > 100_000  # free text inside the string ...
    for name in ("<|image_pad|>", "<|video_pad|>", "<think>", "</think>", "<tool_call>", "<|im_start|>", "<|vision_start|>"):
        assert not allowed[tok.token_to_id(name)], name  # ... but no special token


@pytest.mark.parametrize("spec, needle", [
    (dict(json={"type": "object", "properties": {"a": {"type": "strin"}}}), "strin"),
    (dict(json='{"type": '), "not valid JSON"),
    (dict(json={"$ref": "#/definitions/missing"}), "missing"),
    (dict(regex="[0-9"), "regex"),
    (dict(grammar="start: undefined_rule"), "undefined_rule"),
    (dict(json={"type": "string", "format": "no-such-format"}), "no-such-format"),
])
def test_a_grammar_that_does_not_compile_is_an_invalid_input_error(llm, spec, needle):
    with pytest.raises(InvalidInputError, match=re.escape(needle)) as info:
        llm.chat([user("x")], SamplingParams(max_tokens=4, structured=StructuredOutputs(**spec)))
    assert info.value.param == "structured"
    assert llm.chat([user("x")], SamplingParams(max_tokens=2))[0].finish_reason  # still serving


def test_structured_spec_checks():
    for bad in [{}, {"json": {}, "regex": "a"}, {"choice": []}, {"choice": ["a", ""]}, {"unknown": 1}, {"regex": 3}]:
        with pytest.raises(InvalidInputError):
            SamplingParams(structured=bad)
    assert SamplingParams(structured={"choice": ("a", "b")}).structured == StructuredOutputs(choice=["a", "b"])


def test_compiled_grammars_are_cached_by_text(llm):
    spec = StructuredOutputs(json=obj({"cache_me": I}))
    before = llm.grammars.compiles
    llm.grammars.constraint(spec)
    llm.grammars.constraint(StructuredOutputs(json=json.dumps(spec.json)))
    assert llm.grammars.compiles == before + 1


def test_a_tool_grammar_resolves_the_schemas_refs(llm):
    """Tool schemas made from pydantic models keep nested models under $defs; a parameter's value refers to them."""
    tool = {"type": "function", "function": {"name": "order", "parameters": {
        "$defs": {"Item": {"type": "object", "properties": {"n": {"type": "integer", "maximum": 3, "minimum": 0}},
                           "required": ["n"], "additionalProperties": False}},
        "type": "object", "required": ["item"], "properties": {"item": {"$ref": "#/$defs/Item"}}}}}
    constraint = llm.grammars.constraint(lark=tool_call_grammar([tool], "required", parallel=False))
    text = 'order>\n<parameter=item>\n{"n":2}\n</parameter>\n</function>\n'
    assert constraint.matcher.consume_tokens(llm.processor.tokenizer.encode(text))
    assert constraint.matcher.consume_tokens([llm.processor.tokenizer.token_to_id("</tool_call>")])
    assert constraint.matcher.is_accepting()
