"""Processor and encoder agree on every corpus image, and the whole pipeline's greedy tokens equal transformers'."""

from __future__ import annotations

import numpy as np
import pytest

from minicpmv.engine.sampling import SamplingParams
from minicpmv.llm import LLM
from tests.test_engine import reference_greedy
from tests.tiny import IMAGE_TOKEN

CORPUS_WH = [(448, 448), (224, 224), (200, 100), (1084, 820), (365, 211), (153, 174), (1920, 1080), (3136, 3136),
             (4000, 60), (60, 4000)]


@pytest.fixture(scope="module")
def llm(tiny_dir):
    return LLM(tiny_dir, dtype="float32", progress=False)


def picture(w, h, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("max_slice_nums", [1, 9, 36])
@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_placeholder_count_equals_encoder_features_for_the_corpus(llm, mode, max_slice_nums):
    for w, h in CORPUS_WH:
        messages = [{"role": "user", "content": [{"type": "image", "image": picture(w, h)}, {"type": "text", "text": "?"}]}]
        out = llm.processor(messages, downsample_mode=mode, max_slice_nums=max_slice_nums)
        (image,) = out.images
        features = llm.model.encode_images(image.pixel_values, image.target_sizes, mode)
        placeholders = int((out.input_ids == IMAGE_TOKEN).sum())
        assert placeholders == features.shape[0] == sum(image.num_tokens_per_unit), (w, h)


@pytest.mark.parametrize("size", [(1084, 820), (365, 211), (4000, 60), (60, 4000)])
@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_greedy_end_to_end_equals_transformers(llm, tiny_dir, size, mode):
    conv = {"messages": [{"role": "user", "content": [{"type": "image", "image": picture(*size, seed=3)},
                                                      {"type": "text", "text": "What is this?"}]}],
            "downsample_mode": mode}
    ours = llm.chat([conv], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert ours.token_ids == reference_greedy(tiny_dir, llm, conv, 8)
