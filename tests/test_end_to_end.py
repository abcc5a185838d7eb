"""Processor and encoder agree on every corpus image, and the whole pipeline's greedy tokens equal transformers'."""

from __future__ import annotations

import numpy as np
import pytest

from minicpmv.engine.sampling import SamplingParams
from tests.tiny import REAL, image, reference_greedy, user

CORPUS_WH = [(448, 448), (224, 224), (200, 100), (1084, 820), (365, 211), (153, 174), (1920, 1080), (3136, 3136),
             (4000, 60), (60, 4000)]


@pytest.mark.parametrize("max_slice_nums", [1, 9, 36])
@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_placeholder_count_equals_encoder_features_for_the_corpus(llm, mode, max_slice_nums):
    for w, h in CORPUS_WH:
        messages = [user(np.asarray(image(w, h)), "?")]
        out = llm.processor(messages, downsample_mode=mode, max_slice_nums=max_slice_nums)
        (processed,) = out.images
        features = llm.model.encode_images(processed.pixel_values, processed.target_sizes, mode)
        placeholders = int((out.input_ids == REAL.image).sum())
        assert placeholders == features.shape[0] == sum(processed.num_tokens_per_unit), (w, h)


@pytest.mark.parametrize("size", [(1084, 820), (365, 211), (4000, 60), (60, 4000)])
@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_greedy_end_to_end_equals_transformers(llm, reference_processor, size, mode):
    conv = {"messages": [user(np.asarray(image(*size, seed=3)), "What is this?")], "downsample_mode": mode}
    ours = llm.chat([conv], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0]
    assert ours.token_ids == reference_greedy(reference_processor, llm, conv, 8)
