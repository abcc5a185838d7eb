"""Incremental detokenization (never half a character, joins to the full decode) and stop strings over deltas."""

from __future__ import annotations

import random

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from minicpmv.engine.detokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer
from minicpmv.engine.stops import StopCheck, StopStringMatcher

SPECIALS = ["<|endoftext|>", "<|im_end|>"]
TEXTS = [
    "你好，世界！今天天气很好，我们去公园散步吧。生僻字：龘䶮𠀀鱻",
    "Emoji: 🤖🎉 family 👨‍👩‍👧 flag 🇨🇳 and ✓ done.",
    "Mixed 中文 and English, 日本語のテキスト, café naïve — 한국어 123.",
    "  leading spaces\nnew lines\tand tabs 😀😀😀 end",
]


def small_byte_level_bpe() -> Tokenizer:
    """A byte-level BPE so small that most multi-byte characters stay split across tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=SPECIALS
    )
    tokenizer.train_from_iterator(TEXTS * 3, trainer)
    return tokenizer


@pytest.fixture(scope="module", params=["small-bpe", "minicpmv-4.6"])
def tokenizer(request) -> Tokenizer:
    if request.param == "small-bpe":
        return small_byte_level_bpe()
    directory = request.getfixturevalue("tokenizer_dir")  # the rebuilt MiniCPM-V 4.6 tokenizer (tests/conftest.py)
    return Tokenizer.from_file(str(directory / "tokenizer.json"))


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    return ids


def stream(tokenizer: Tokenizer, ids: list[int], skip_special_tokens: bool = True, chunks=None) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=skip_special_tokens)
    if chunks is None:
        deltas = [detok.push(i) for i in ids]
    else:
        deltas, start = [], 0
        for size in chunks:
            deltas.append(detok.push(ids[start : start + size]))
            start += size
    return deltas + [detok.flush()]


def test_multi_byte_characters_really_are_split_across_tokens(tokenizer):
    for text in TEXTS[:2]:
        pieces = [tokenizer.decode([i]) for i in encode(tokenizer, text)]
        assert any(REPLACEMENT_CHAR in piece for piece in pieces), text


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_join_to_the_full_decode(tokenizer, text):
    ids = encode(tokenizer, text)
    deltas = stream(tokenizer, ids)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert deltas[-1] == ""  # nothing was left to flush: the text ends on a whole character


def test_pushing_several_ids_at_once(tokenizer):
    ids = encode(tokenizer, "".join(TEXTS))
    rng = random.Random(0)
    for _ in range(5):
        chunks = []
        while sum(chunks) < len(ids):
            chunks.append(rng.randint(1, 4))
        deltas = stream(tokenizer, ids, chunks=chunks)
        assert all(REPLACEMENT_CHAR not in d for d in deltas)
        assert "".join(deltas) == tokenizer.decode(ids)


def test_ids_ending_mid_character_are_released_by_flush(tokenizer):
    ids = encode(tokenizer, "ok 🤖")
    while REPLACEMENT_CHAR not in tokenizer.decode(ids):
        ids = ids[:-1]
    deltas = stream(tokenizer, ids)
    assert REPLACEMENT_CHAR not in "".join(deltas[:-1])
    assert deltas[-1].endswith(REPLACEMENT_CHAR)
    assert "".join(deltas) == tokenizer.decode(ids)


@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_are_skipped_or_kept(tokenizer, skip):
    text = "答案是 42 🎉<|im_end|>next<|endoftext|>"
    ids = encode(tokenizer, text)
    assert tokenizer.token_to_id("<|im_end|>") in ids
    joined = "".join(stream(tokenizer, ids, skip_special_tokens=skip))
    assert joined == tokenizer.decode(ids, skip_special_tokens=skip)
    assert joined == (text if not skip else "答案是 42 🎉next")


class CountingTokenizer:
    """Wraps a tokenizer to record how many ids each decode call sees."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer, self.window_sizes = tokenizer, []

    def decode(self, ids, skip_special_tokens=True):
        self.window_sizes.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


def test_each_step_decodes_only_a_small_window(tokenizer):
    ids = encode(tokenizer, "".join(TEXTS) * 8)
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == tokenizer.decode(ids)
    # bounded by how many tokens one character (or a run of tokens straddling characters) needs, not by len(ids)
    assert len(ids) > 200 and max(counting.window_sizes) <= 16


# --- stop strings ----------------------------------------------------------------------------------


def run_stops(stops: list[str], deltas: list[str]) -> tuple[str, str | None, list[str]]:
    matcher = StopStringMatcher(stops)
    emitted, stop = [], None
    for delta in deltas:
        check = matcher.feed(delta)
        emitted.append(check.text)
        if check.stop is not None:
            stop = check.stop
            break
    emitted.append(matcher.flush())
    return "".join(emitted), stop, emitted


def test_stop_spanning_deltas_truncates_right_before_it():
    text, stop, emitted = run_stops(["</answer>"], ["The answer is 4", "2.</an", "swer> trailing"])
    assert (text, stop) == ("The answer is 42.", "</answer>")
    assert emitted[1] == "2."  # "</an" was held back, never emitted


def test_stop_over_many_single_character_deltas():
    text, stop, emitted = run_stops(["</answer>"], list("x</answer>y"))
    assert (text, stop) == ("x", "</answer>")
    assert emitted[:3] == ["x", "", ""]


def test_partial_match_that_diverges_is_released():
    matcher = StopStringMatcher(["</answer>"])
    assert matcher.feed("a </an") == StopCheck("a ")
    assert matcher.feed("other") == StopCheck("</another")
    assert matcher.feed(" <") == StopCheck(" ")
    assert matcher.flush() == "<"  # a partial match at the end is ordinary text
    assert matcher.stopped is None


def test_several_stop_strings_first_to_complete_wins():
    assert run_stops(["STOP", "\n\n"], ["line\n", "\nmore STOP"])[:2] == ("line", "\n\n")
    assert run_stops(["STOP", "\n\n"], ["line ST", "OP\n\n"])[:2] == ("line ", "STOP")
    # "bc" completes before "abcd" would, however the text is split
    for deltas in (["abcd"], ["a", "b", "c", "d"], ["ab", "cd"]):
        assert run_stops(["abcd", "bc"], ["x", *deltas])[:2] == ("xa", "bc")
    # two stops ending at once: the longer one (which started earlier) wins
    assert run_stops(["b", "ab"], ["xab"])[:2] == ("x", "ab")


def test_stop_at_the_very_start():
    assert run_stops(["<|stop|>"], ["<|st", "op|>hello"])[:2] == ("", "<|stop|>")
    assert run_stops(["Q"], ["Q"])[:2] == ("", "Q")


def test_no_stops_passes_text_through_and_nothing_after_a_stop():
    matcher = StopStringMatcher([])
    assert matcher.feed("abc") == StopCheck("abc") and matcher.flush() == ""
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("axb") == StopCheck("a", "x")
    assert matcher.feed("more") == StopCheck("") and matcher.flush() == ""


def test_result_does_not_depend_on_how_text_is_split():
    rng = random.Random(1)
    stops = ["</answer>", "###", "ab"]
    for _ in range(200):
        text = "".join(rng.choice(["a", "b", "#", "</", "answer>", "x", "中", "🤖"]) for _ in range(12))
        cuts = sorted(rng.sample(range(1, len(text)), k=min(4, len(text) - 1)))
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        char_by_char = run_stops(stops, list(text))[:2]
        assert run_stops(stops, deltas)[:2] == char_by_char
        out, stop = char_by_char
        if stop is None:
            assert out == text
        else:
            assert text.startswith(out + stop) and not any(s in out for s in stops)


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError):
        StopStringMatcher(["ok", ""])
