"""SamplingParams validation and the Sampler: greedy, seeded sampling, truncation, penalties, min_tokens, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from minicpmv.engine.sampler import SampleRow, Sampler, apply_penalties, make_generator
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import InvalidInputError

DEFAULT_STOP_TOKEN_IDS = (248044, 248046)  # <|endoftext|>, <|im_end|> in the real vocabulary

VOCAB = 64


def row(params: SamplingParams, prompt=(), output=(), seed: int | None = None) -> SampleRow:
    generator = None if params.greedy else make_generator(seed if seed is not None else params.seed)
    return SampleRow(params, list(prompt), list(output), generator)


def random_logits(batch: int, vocab: int = VOCAB, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 2


# --- SamplingParams ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("temperature", -0.1, "[0, 3.4e38]"),
        ("temperature", float("nan"), "[0, 3.4e38]"),
        ("temperature", "hot", "[0, 3.4e38]"),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("top_k", -2, "0 / -1"),
        ("top_k", 2.5, "0 / -1"),
        ("min_p", -0.1, "[0, 1]"),
        ("min_p", 1.1, "[0, 1]"),
        ("repetition_penalty", 0.0, "[1.2e-38, 3.4e38]"),
        ("repetition_penalty", -1.0, "[1.2e-38, 3.4e38]"),
        ("repetition_penalty", 1e-46, "[1.2e-38, 3.4e38]"),  # 0 in float32
        ("temperature", 1e39, "[0, 3.4e38]"),  # inf in float32
        ("presence_penalty", 2.5, "[-2, 2]"),
        ("presence_penalty", -2.01, "[-2, 2]"),
        ("frequency_penalty", 3.0, "[-2, 2]"),
        ("frequency_penalty", float("inf"), "[-2, 2]"),
        ("seed", 1.5, "integer"),
        ("seed", 2**63, "[-2**63, 2**63)"),  # would be the same seed as -2**63
        ("seed", -(2**63) - 1, "[-2**63, 2**63)"),
        ("max_tokens", 0, ">= 1"),
        ("max_tokens", -5, ">= 1"),
        ("max_tokens", 2.0, ">= 1"),
        ("min_tokens", -1, ">= 0"),
        ("stop", "", "non-empty"),
        ("stop", ["ok", ""], "non-empty"),
        ("stop", [3], "non-empty"),
        ("stop", ["a\ud800"], "valid Unicode"),
        ("stop_token_ids", [1, "2"], "integers >= 0"),
        ("stop_token_ids", [1.0], "integers >= 0"),
        ("stop_token_ids", [-1], "integers >= 0"),
        ("stop_token_ids", [True], "integers >= 0"),
        ("logprobs", -1, "[0, 20]"),
        ("logprobs", 21, "[0, 20]"),
        ("ignore_eos", "yes", "boolean"),
        ("skip_special_tokens", 1, "boolean"),
    ],
)
def test_bad_values_name_the_field_and_the_allowed_range(field, value, allowed):
    with pytest.raises(InvalidInputError) as info:
        SamplingParams(**{field: value})
    message = str(info.value)
    assert field in message and allowed in message


def test_min_tokens_may_not_exceed_max_tokens():
    with pytest.raises(InvalidInputError, match="min_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    assert SamplingParams(max_tokens=3, min_tokens=3).min_tokens == 3


def test_validate_rechecks_after_mutation():
    params = SamplingParams()
    params.top_p = 0.0
    with pytest.raises(InvalidInputError, match="top_p"):
        params.validate()


def test_defaults_and_normalisation():
    params = SamplingParams()
    assert (params.temperature, params.top_p, params.top_k, params.min_p) == (0.7, 1.0, 0, 0.0)
    assert params.stop == [] and params.stop_token_ids is None and params.max_tokens is None
    assert SamplingParams(stop="</answer>").stop == ["</answer>"]
    assert SamplingParams(stop=("a", "b"), stop_token_ids=(5, 6)).stop_token_ids == [5, 6]
    assert SamplingParams(temperature=0).greedy and not SamplingParams(temperature=0.1).greedy
    for edge in (dict(top_p=1.0), dict(min_p=1.0), dict(top_k=-1), dict(presence_penalty=-2), dict(logprobs=20)):
        SamplingParams(**edge)


def test_resolved_stop_token_ids():
    assert SamplingParams().resolved_stop_token_ids(DEFAULT_STOP_TOKEN_IDS) == [248044, 248046]
    assert SamplingParams(stop_token_ids=[7]).resolved_stop_token_ids(DEFAULT_STOP_TOKEN_IDS) == [7]
    assert SamplingParams(ignore_eos=True).resolved_stop_token_ids(DEFAULT_STOP_TOKEN_IDS) == []
    assert SamplingParams(ignore_eos=True, stop_token_ids=[7]).resolved_stop_token_ids(DEFAULT_STOP_TOKEN_IDS) == [7]


# --- greedy and seeded sampling ------------------------------------------------------------------


def test_greedy_is_argmax():
    logits = random_logits(5)
    out = Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, [row(SamplingParams(temperature=0)) for _ in range(5)])
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def draw(params: SamplingParams, steps: int = 12, seed: int = 0) -> list[int]:
    """A seeded request sampled alone over several steps (fresh logits per step)."""
    sampler, r = Sampler(DEFAULT_STOP_TOKEN_IDS), row(params)
    return [sampler(random_logits(1, seed=seed + step), [r]).token_ids[0] for step in range(steps)]


def test_seeded_sampling_is_reproducible_and_seeds_differ():
    params = SamplingParams(temperature=1.5, seed=1234)
    assert draw(params) == draw(params)
    flat = [draw(SamplingParams(temperature=5.0, seed=s), steps=10) for s in range(4)]
    assert len({tuple(tokens) for tokens in flat}) == 4


def test_seeded_request_ignores_its_batch_neighbours_and_position():
    target = SamplingParams(temperature=1.0, top_p=0.9, seed=42)
    alone = draw(target, steps=10)
    neighbours = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=0.8, top_k=5),
        SamplingParams(temperature=1.2, min_p=0.1, repetition_penalty=1.3, presence_penalty=0.5),
        SamplingParams(temperature=1.0),  # unseeded
    ]
    for position in (0, 2, 4):
        params = neighbours[:position] + [target] + neighbours[position:]
        rows = [row(p, prompt=[1, 2, 3]) for p in params]
        sampler, got = Sampler(DEFAULT_STOP_TOKEN_IDS), []
        for step in range(10):
            logits = random_logits(len(rows), seed=1000 + step)
            logits[position] = random_logits(1, seed=step)[0]  # the target row sees the same logits as alone
            out = sampler(logits, rows)
            got.append(out.token_ids[position])
            for r, token in zip(rows, out.token_ids):
                r.output_ids.append(token)
        assert got == alone, f"position {position}"


def test_sampling_frequencies_follow_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().unsqueeze(0)
    sampler, r = Sampler(DEFAULT_STOP_TOKEN_IDS), row(SamplingParams(temperature=1.0, seed=7))
    counts = torch.zeros(4)
    for _ in range(3000):
        counts[sampler(logits, [r]).token_ids[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


def test_temperature_sharpens():
    # temperature 0.5 squares the probabilities: [0.6, 0.4] -> [0.36, 0.16] / 0.52
    logits = torch.tensor([[math.log(0.6), math.log(0.4)]])
    sampler, r = Sampler(DEFAULT_STOP_TOKEN_IDS), row(SamplingParams(temperature=0.5, seed=3))
    share = sum(sampler(logits, [r]).token_ids[0] == 0 for _ in range(3000)) / 3000
    assert abs(share - 0.36 / 0.52) < 0.03


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = random_logits(6, seed=5)
    expected = logits.argmax(-1).tolist()
    for seed in range(5):
        for params in (SamplingParams(temperature=2.0, top_k=1), SamplingParams(temperature=2.0, top_p=1e-6)):
            assert Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, [row(params, seed=seed) for _ in range(6)]).token_ids == expected


def support(params: SamplingParams, probs: list[float], draws: int = 400) -> set[int]:
    logits = torch.tensor([probs]).log()
    sampler, r = Sampler(DEFAULT_STOP_TOKEN_IDS), row(params, seed=11)
    return {sampler(logits, [r]).token_ids[0] for _ in range(draws)}


def test_truncation_keeps_the_expected_tokens():
    probs = [0.5, 0.3, 0.15, 0.05]
    assert support(SamplingParams(temperature=1.0), probs) == {0, 1, 2, 3}
    assert support(SamplingParams(temperature=1.0, top_k=2), probs) == {0, 1}
    assert support(SamplingParams(temperature=1.0, top_k=-1), probs) == {0, 1, 2, 3}
    # top_p: keep the smallest head whose mass reaches p (0.5 + 0.3 >= 0.7)
    assert support(SamplingParams(temperature=1.0, top_p=0.7), probs) == {0, 1}
    assert support(SamplingParams(temperature=1.0, top_p=0.81), probs) == {0, 1, 2}
    # min_p: drop tokens below min_p * max prob (0.2 * 0.5 = 0.1)
    assert support(SamplingParams(temperature=1.0, min_p=0.2), probs) == {0, 1, 2}
    assert support(SamplingParams(temperature=1.0, min_p=0.55), probs) == {0, 1}
    assert support(SamplingParams(temperature=1.0, min_p=0.65), probs) == {0}
    # top-k runs before top-p: after top_k=3 the head is renormalised to [0.526, 0.316, 0.158]
    assert support(SamplingParams(temperature=1.0, top_k=3, top_p=0.84), probs) == {0, 1}


def test_min_p_runs_after_temperature():
    # temperature 0.5 squares probs to [0.25, 0.09, 0.0225, 0.0025]/Z: 0.09/0.25 = 0.36 < 0.4 drops token 1
    assert support(SamplingParams(temperature=0.5, min_p=0.4), [0.5, 0.3, 0.15, 0.05]) == {0}


def test_missing_generator_is_an_error_for_random_rows():
    with pytest.raises(ValueError, match="Generator"):
        Sampler(DEFAULT_STOP_TOKEN_IDS)(random_logits(1), [SampleRow(SamplingParams(temperature=1.0), [], [], None)])


# --- penalties ------------------------------------------------------------------------------------

LOGITS = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0]])


def test_repetition_penalty_divides_positive_and_multiplies_negative_seen_logits():
    r = row(SamplingParams(temperature=0, repetition_penalty=2.0), prompt=[0, 3], output=[1, 1])
    got = apply_penalties(LOGITS.clone(), [r])
    assert torch.equal(got, torch.tensor([[1.0, -2.0, 0.5, -6.0, 1.0]]))


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    r = row(params, prompt=[0, 4], output=[1, 1, 2])
    got = apply_penalties(LOGITS.clone(), [r])
    # token 1: -1 - 2*0.25 - 0.5; token 2: 0.5 - 0.25 - 0.5; prompt-only tokens 0 and 4 untouched
    assert torch.allclose(got, torch.tensor([[2.0, -2.0, -0.25, -3.0, 1.0]]))


def test_penalties_are_per_row_and_change_the_greedy_choice():
    logits = LOGITS.repeat(3, 1)
    input_copy = logits.clone()
    rows = [
        row(SamplingParams(temperature=0), output=[0]),
        row(SamplingParams(temperature=0, repetition_penalty=4.0), output=[0]),
        row(SamplingParams(temperature=0, frequency_penalty=-2.0), output=[3, 3, 3]),
    ]
    got = apply_penalties(logits, rows)
    assert torch.equal(logits, input_copy), "the input must not be modified"
    assert torch.equal(got[0], LOGITS[0])
    assert got[1, 0].item() == 0.5 and got[2, 3].item() == 3.0
    assert Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, rows).token_ids == [0, 4, 3]


# --- min_tokens -----------------------------------------------------------------------------------


def test_min_tokens_masks_explicit_stop_ids_until_reached():
    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0]])
    params = SamplingParams(temperature=0, min_tokens=2, stop_token_ids=[3, 2])
    assert Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, [row(params, output=[1])]).token_ids == [1]
    assert Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, [row(params, output=[1, 1])]).token_ids == [3]


def test_min_tokens_masks_the_model_default_stop_ids():
    vocab = max(DEFAULT_STOP_TOKEN_IDS) + 48
    logits = torch.zeros(2, vocab)
    logits[:, DEFAULT_STOP_TOKEN_IDS[0]] = 10.0
    logits[:, DEFAULT_STOP_TOKEN_IDS[1]] = 9.0
    logits[:, 17] = 1.0
    params = SamplingParams(temperature=0, min_tokens=1)
    out = Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, [row(params), row(params, output=[5])])
    assert out.token_ids == [17, DEFAULT_STOP_TOKEN_IDS[0]]


def test_min_tokens_applies_to_sampled_rows():
    logits = torch.tensor([[0.0, 0.0, 8.0, 8.0]])
    params = SamplingParams(temperature=1.0, min_tokens=5, stop_token_ids=[2, 3], seed=0)
    r = row(params)
    assert {Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, [r]).token_ids[0] for _ in range(50)} <= {0, 1}


# --- logprobs -------------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits():
    logits = random_logits(3, seed=9)
    best, runner_up = torch.topk(logits[0], 2).indices.tolist()
    logits[0, runner_up] = logits[0, best] - 0.01  # so the penalty on `best` must change the choice
    rows = [
        row(SamplingParams(temperature=0, logprobs=5, repetition_penalty=1.5), output=[int(logits[0].argmax())]),
        row(SamplingParams(temperature=1.0, logprobs=0, seed=1)),
        row(SamplingParams(temperature=1.0, seed=2)),
    ]
    out = Sampler(DEFAULT_STOP_TOKEN_IDS)(logits, rows)
    expected = logits.log_softmax(-1)

    first = out.logprobs[0]
    assert first.token_id == out.token_ids[0]
    assert math.isclose(first.logprob, expected[0, first.token_id].item(), abs_tol=1e-6)
    top = torch.topk(expected[0], 5)
    assert first.top_ids == top.indices.tolist()
    assert torch.allclose(torch.tensor(first.top_logprobs), top.values, atol=1e-6)
    assert first.rank == int((expected[0] > expected[0, first.token_id]).sum()) + 1
    # the penalty moved the choice away from the raw argmax, so it is not rank 1
    assert first.rank > 1

    second = out.logprobs[1]
    assert second.top_ids == [] and second.top_logprobs == []
    assert math.isclose(second.logprob, expected[1, out.token_ids[1]].item(), abs_tol=1e-6)
    assert out.logprobs[2] is None
