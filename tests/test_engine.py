"""The engine through the public API: batching equals running alone equals transformers, prefix reuse,
sampling and stopping, cancellation, and a bounded queue under load."""

from __future__ import annotations

import random

import pytest

from minicpmv.engine.engine import Engine, EngineConfig
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.errors import ContextLengthError, InvalidInputError, QueueFullError
from minicpmv.llm import LLM, ChatOptions
from tests.tiny import eventually, image, reference_greedy, user

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


CONVERSATIONS = [
    ({"messages": [user("Tell me a story.")]}),
    ({"messages": [user(image(448, 448, 1), "What is this?")], "downsample_mode": "16x"}),
    ({"messages": [user(image(640, 480, 2), "Describe it.")], "downsample_mode": "4x"}),
    ({"messages": [user(image(300, 200, 3), image(800, 600, 4), image(224, 224, 5), "Compare them.")]}),
]


def test_mixed_batch_equals_each_alone_and_transformers(llm, reference_processor, clip):
    conversations = CONVERSATIONS + [{"messages": [user(clip, "What happens?")]}]
    together = llm.chat(conversations, GREEDY)
    assert [r.usage.image_tokens > 0 for r in together] == [False, True, True, True, False]
    assert together[-1].usage.video_tokens > 0
    assert together[1].usage.image_tokens != together[2].usage.image_tokens
    for conv, batched in zip(conversations, together):
        alone = LLM.chat(llm, [conv], GREEDY)[0]
        assert batched.token_ids == alone.token_ids
        assert batched.finish_reason == "length" and len(batched.token_ids) == GREEDY.max_tokens
        assert batched.token_ids == reference_greedy(reference_processor, llm, conv, GREEDY.max_tokens)


def test_second_turn_reuses_prefix_state_and_image_features(llm, tiny_dir):
    photo = image(800, 600, 7)
    turn1 = [user(photo, "What is in the picture?")]
    first = llm.chat(turn1, GREEDY)[0]
    engine = llm.engine
    encoded, prefilled = engine.runner.encoded, engine.prefilled_tokens
    turn2 = turn1 + [{"role": "assistant", "content": first.text}] + [user("And the colours?")]
    second = llm.chat(turn2, GREEDY)[0]
    assert engine.runner.encoded == encoded  # the image was not encoded again
    cached = second.usage.cached_tokens
    assert cached > first.usage.image_tokens  # the reused prefix covers the image
    assert engine.prefilled_tokens - prefilled == second.usage.prompt_tokens - cached  # only the new suffix ran
    cold = LLM(tiny_dir, dtype="float32", progress=False).chat(turn2, GREEDY)[0]
    assert cold.usage.cached_tokens == 0
    assert second.token_ids == cold.token_ids


def own_engine(llm, **config) -> Engine:
    """An engine of its own over the LLM's model, stepped by the test (the LLM's engine belongs to its thread)."""
    tok = llm.processor.tokenizer
    return Engine(llm.model, tok.backend, llm.eos_token_ids, tok.im_start_id, EngineConfig(**config))


def test_a_prompt_runs_in_one_forward_and_leaves_its_turn_start_state(llm):
    engine = own_engine(llm)
    seq = llm.prepare([user("Hi there")], SamplingParams(temperature=0, max_tokens=1), llm.default_options)
    engine.add(seq)
    steps = 0
    while seq.finish_reason is None:
        engine.step()
        steps += 1
    assert steps == 1 and 0 < seq.snapshot_at < seq.num_prompt  # the snapshot point lies inside the one chunk
    assert len(engine.prefix_cache) == 1


def test_seeded_sampling_is_reproducible(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=10, ignore_eos=True)
    a = llm.chat([user("Hi")], params)[0]
    b = llm.chat([[user("Other")], [user("Hi")]], params)[1]  # different batch company
    c = llm.chat([user("Hi")], SamplingParams(temperature=1.0, top_p=0.9, seed=124, max_tokens=10, ignore_eos=True))[0]
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def run_raw(llm, messages, params) -> Sequence:
    """Run one request; its ``text`` is the raw detokenized output."""
    seq = llm.prepare(messages, params, llm.default_options)
    for _ in llm.outputs(seq):
        pass
    return seq


def test_stop_string_spanning_tokens_stops_exactly(llm):
    varied = dict(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)  # greedy tiny models repeat one token
    free = run_raw(llm, [user("Say something.")], SamplingParams(**varied))
    pieces = [llm.processor.tokenizer.decode([t]) for t in free.output_ids]
    assert "".join(pieces) == free.text
    # A stop string that starts inside the 3rd token's text and ends inside a later one.
    start = len(pieces[0]) + len(pieces[1]) + max(len(pieces[2]) - 1, 0)
    stop = free.text[start : start + 6]
    assert len(stop) == 6 and len(pieces[2]) < 6
    stopped = run_raw(llm, [user("Say something.")], SamplingParams(**varied, stop=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.text == free.text[: free.text.find(stop)]
    assert stopped.output_ids == free.output_ids[: len(stopped.output_ids)] and len(stopped.output_ids) < 24


def test_stop_strings_wait_for_min_tokens(llm):
    varied = dict(temperature=1.0, seed=3, max_tokens=24, ignore_eos=True)
    free = run_raw(llm, [user("Say something.")], SamplingParams(**varied))
    first = llm.processor.tokenizer.decode(free.output_ids[:1])  # a stop string found in the very first token
    at_once = run_raw(llm, [user("Say something.")], SamplingParams(**varied, stop=[first]))
    assert at_once.text == "" and len(at_once.output_ids) == 1
    stopped = run_raw(llm, [user("Say something.")], SamplingParams(**varied, stop=[first], min_tokens=4))
    assert len(stopped.output_ids) >= 4 and stopped.text.startswith(first)
    assert stopped.output_ids == free.output_ids[: len(stopped.output_ids)]
    # A stop that starts before min_tokens and completes after it still stops the output, exactly there.
    pieces = [llm.processor.tokenizer.decode([t]) for t in free.output_ids]
    start = len(pieces[0]) - 1
    spanning = free.text[start : len(pieces[0]) + len(pieces[1]) + 1]
    assert free.text.find(spanning) == start
    cut = run_raw(llm, [user("Say something.")], SamplingParams(**varied, stop=[spanning], min_tokens=3))
    assert cut.finish_reason == "stop" and cut.text == free.text[:start] and len(cut.output_ids) == 3


def test_finish_reasons(llm):
    free = llm.chat([user("Go.")], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert free.finish_reason == "length" and len(free.token_ids) == 8
    stop_id = free.token_ids[4]
    first = free.token_ids.index(stop_id)
    stopped = llm.chat([user("Go.")], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[stop_id]))[0]
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free.token_ids[: first + 1]


def test_prompt_longer_than_context_is_refused(tiny_dir):
    small = LLM(tiny_dir, dtype="float32", progress=False, engine_config=EngineConfig(max_model_len=64))
    with pytest.raises(ContextLengthError, match="context holds 64 tokens"):
        small.chat([user("word " * 100)], GREEDY)
    assert small.chat([user("Hi")], SamplingParams(temperature=0, max_tokens=5))[0].token_ids


def test_unknown_option_and_bad_messages(llm):
    with pytest.raises(InvalidInputError, match="unknown chat option"):
        llm.chat([user("Hi")], GREEDY, downsample="4x")
    with pytest.raises(InvalidInputError):
        llm.chat([{"role": "user", "content": [{"type": "image", "image": b"not an image"}]}], GREEDY)


def test_cancelled_stream_frees_its_state(llm):
    stream = llm.chat_stream([user("Count.")], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    next(stream)
    next(stream)
    seq = next(iter(llm.engine.scheduler.running))
    assert seq.state is not None
    stream.close()
    assert eventually(lambda: seq.finish_reason == "abort")
    assert seq.state is None and len(llm.engine.scheduler) == 0


def test_stream_deltas_join_to_the_final_text(llm):
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    deltas = list(llm.chat_stream([user("Write.")], params, enable_thinking=True))
    final = deltas[-1].result
    assert final is not None and deltas[-1].finish_reason == "length"
    assert "".join(d.reasoning for d in deltas) == (final.reasoning or "")
    assert "".join(d.text for d in deltas) == (final.text or "")
    assert final.token_ids == llm.chat([user("Write.")], params, enable_thinking=True)[0].token_ids


def test_200_requests_through_a_small_queue(tiny_dir):
    llm = LLM(
        tiny_dir,
        dtype="float32",
        progress=False,
        engine_config=EngineConfig(max_num_seqs=4, max_waiting=6, max_num_batched_tokens=128),
    )
    engine, rng = llm.engine, random.Random(0)
    prompt_ids = llm.prepare([user("Hello there")], None, llm.default_options).prompt_ids
    accepted, rejected = [], 0
    for i in range(200):
        seq = Sequence(
            prompt_ids + [rng.randrange(1000, 5000) for _ in range(rng.randrange(0, 40))],
            SamplingParams(temperature=0.8, seed=i, max_tokens=rng.randrange(1, 6), ignore_eos=True),
        )
        try:
            engine.add(seq)
            accepted.append(seq)
        except QueueFullError:
            rejected += 1
        if i % 3 == 0:
            engine.step()
    while engine.has_work():
        engine.step()
    assert rejected > 0 and len(accepted) + rejected == 200
    assert all(s.finish_reason == "length" and 1 <= len(s.output_ids) <= 5 for s in accepted)
    assert all(s.state is None and not s.features for s in accepted)
    assert len(engine.scheduler) == 0
    assert engine.prefix_cache.bytes <= engine.prefix_cache.max_bytes


def test_streams_and_chat_calls_interleave_without_losing_output(llm):
    a = llm.chat_stream([user("first")], GREEDY)
    b = llm.chat_stream([user("second")], GREEDY)
    got_a = [next(a)]
    got_b = list(b)  # steps the engine for both streams; a's outputs wait for it
    other = llm.chat([user("third")], SamplingParams(temperature=0, max_tokens=3))[0]
    got_a += list(a)
    ids = [t for d in got_a for t in d.token_ids]
    assert ids == got_a[-1].result.token_ids == llm.chat([user("first")], GREEDY)[0].token_ids
    assert got_b[-1].result.token_ids == llm.chat([user("second")], GREEDY)[0].token_ids
    assert len(other.token_ids) == 3


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda llm: llm.chat([user("x")], {"max_tokens": 2}), "sampling_params must be a SamplingParams"),
        (lambda llm: list(llm.chat_stream([[user("a")], [user("b")]])), "chat_stream takes one conversation"),
        (lambda llm: llm.chat([user("x")], enable_thinking="false"), "enable_thinking must be True or False"),
        (lambda llm: llm.chat([user("x")], tool_choice="sometimes"), "tool_choice must be"),
        (lambda llm: llm.chat([user("x")], tools=[{"type": "function", "function": {"name": "a<b"}}]), "function.name"),
        (lambda llm: LLM(llm.name, max_slice_nums=0), "max_slice_nums must be an integer in"),
        (lambda llm: LLM(llm.name, device="tpu"), "device must be"),
        (lambda llm: LLM(llm.name, engine_config={"max_num_seqs": 2}), "engine_config must be an EngineConfig"),
        (lambda llm: EngineConfig(max_num_seqs=0), "max_num_seqs must be an integer >= 1"),
        (lambda llm: llm.chat([[user("ok")], [{"role": "user", "content": [{"type": "image", "image": "/no/such.png"}]}]]),
         "conversation 1: .*not found"),
        (lambda llm: llm.chat([{"role": "user", "content": [{"type": "image", "image": image(8, 8, 0), "text": "hi"}]}]),
         "either text or image"),
    ],
)
def test_bad_api_input_is_a_typed_error(llm, call, message):
    with pytest.raises(InvalidInputError, match=message):
        call(llm)


def test_sampling_params_changed_after_creation_are_checked_again(llm):
    params = SamplingParams(max_tokens=4)
    params.temperature = float("nan")
    with pytest.raises(InvalidInputError, match="temperature"):
        llm.chat([user("x")], params)


def test_a_batch_of_conversations_shows_progress(llm, monkeypatch, capsys):
    monkeypatch.setattr(llm, "progress", True)
    llm.chat([[user(f"q{i}")] for i in range(3)], SamplingParams(temperature=0, max_tokens=2))
    err = capsys.readouterr().err
    assert "conversations: 100%" in err and "3/3" in err
    llm.chat([user("one")], SamplingParams(temperature=0, max_tokens=2))  # a single conversation: no bar
    assert "conversations" not in capsys.readouterr().err


def test_tool_choice_none_shows_the_model_no_tools(llm):
    tools = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    none = llm.prepare([user("x")], None, ChatOptions(tools=tools, tool_choice="none"))
    plain = llm.prepare([user("x")], None, ChatOptions())
    auto = llm.prepare([user("x")], None, ChatOptions(tools=tools))
    assert none.prompt_ids == plain.prompt_ids != auto.prompt_ids
    assert not none.parser.parses_tools and auto.parser.parses_tools


def test_state_memory_budget_admission_waits_refuses_and_is_never_exceeded(llm):
    from minicpmv.engine.memory import state_bytes

    cfg = llm.model.cfg.text
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    probe = llm.prepare([user("word " * 300)], params, llm.default_options)
    one = state_bytes(cfg, llm.model.dtype, probe.num_prompt + 40)
    budget = int(one * 2.5)  # two such sequences at once
    engine = own_engine(llm, max_state_bytes=budget)
    seqs = [llm.prepare([user(f"{i} " + "word " * 300)], params, llm.default_options) for i in range(6)]
    for s in seqs:
        engine.add(s)
    too_big = llm.prepare([user("word " * 300)], SamplingParams(max_tokens=20000), llm.default_options)
    with pytest.raises(InvalidInputError, match="state memory limit") as err:
        engine.add(too_big)
    assert err.value.param == "max_tokens"
    most_running, most_bytes = 0, 0
    while engine.has_work():
        engine.step()
        stats = engine.stats()
        most_running = max(most_running, stats.running)
        assert stats.state_bytes_reserved <= budget and stats.state_bytes <= budget
        actual = sum(s.state.nbytes() for s in engine.scheduler.running)
        assert actual <= sum(s.reserved_bytes for s in engine.scheduler.running)  # each stays within its reservation
        most_bytes = max(most_bytes, actual)
    assert most_running == 2 and all(s.finish_reason == "length" for s in seqs)
    assert 0 < most_bytes <= budget and engine.stats().state_bytes == 0


def test_logit_bias_in_the_sampler(llm):
    import torch

    from minicpmv.engine.sampler import SampleRow, Sampler, make_generator

    logits = torch.randn(2, 50)
    top = int(logits[0].argmax())
    ban = SamplingParams(temperature=0, logit_bias={top: -100})
    force = SamplingParams(temperature=1.0, logit_bias={7: 100})
    rows = [SampleRow(ban, [], []), SampleRow(force, [], [], make_generator(0))]
    out = Sampler([0])(logits, rows)
    assert out.token_ids[0] != top and out.token_ids[1] == 7
    with pytest.raises(InvalidInputError, match="logit_bias"):
        SamplingParams(logit_bias={1: 150})
