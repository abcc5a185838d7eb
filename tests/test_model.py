"""Our network against the transformers reference: names and shapes, fp32 logits, incremental decoding, greedy."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from minicpmv.checkpoint import load_model
from minicpmv.config import ModelConfig
from minicpmv.errors import InvalidInputError
from minicpmv.model.minicpmv import MiniCPMV
from minicpmv.model.state import Snapshots
from tests.tiny import (
    REAL,
    SMALL,
    prompt_with_placeholders,
    reference_checkpoint,
    to_patches,
    tokens_per_unit,
)

TOL = 1e-4


def official_config_dir():
    """../shared/reference/minicpm-v-4.6 beside the checkout, else the package's verbatim copy of the same file."""
    from importlib import resources
    from pathlib import Path

    shared = Path(__file__).resolve().parents[2] / "shared" / "reference" / "minicpm-v-4.6"
    vendored = Path(str(resources.files("minicpmv") / "assets"))
    if shared.exists():
        assert (shared / "config.json").read_bytes() == (vendored / "config.json").read_bytes()
        return shared
    return vendored


def test_meta_model_has_the_official_tensor_names_shapes_and_parameter_count():
    from transformers import MiniCPMV4_6Config, MiniCPMV4_6ForConditionalGeneration

    directory = official_config_dir()
    with torch.device("meta"):
        ours = MiniCPMV(ModelConfig.from_file(directory))
        ref = MiniCPMV4_6ForConditionalGeneration(MiniCPMV4_6Config.from_pretrained(directory))
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert our_shapes == ref_shapes
    assert len(our_shapes) == 780 and "lm_head.weight" in our_shapes  # 779 stored tensors + the tied head
    assert ours.lm_head.weight is ours.model.language_model.embed_tokens.weight
    assert sum(p.numel() for p in ours.parameters()) == 1_300_428_016  # parameters() counts tied ones once


def image_inputs(sizes_wh: list[tuple[int, int]], mode: str, max_slice_nums: int = 9, seed: int = 0):
    """Pixel patches and target sizes for synthetic images, from the reference image processor."""
    from transformers import MiniCPMV4_6ImageProcessor

    processor = MiniCPMV4_6ImageProcessor()
    rng = np.random.default_rng(seed)
    pixels, sizes = [], []
    for w, h in sizes_wh:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out = processor(image, downsample_mode=mode, max_slice_nums=max_slice_nums, return_tensors="pt")
        pixels.append(out["pixel_values"])
        sizes.append(out["target_sizes"])
    return torch.cat(pixels, dim=-1), torch.cat(sizes)


def compare_logits(variant, ids, pixel_values=None, target_sizes=None, mode="16x", video=False):
    ref, directory = reference_checkpoint(variant)
    ours = load_model(directory)
    kwargs = {}
    features = None
    if pixel_values is not None:
        key = "pixel_values_videos" if video else "pixel_values"
        kwargs = {key: pixel_values, f"target_sizes{'_videos' if video else ''}": target_sizes, "downsample_mode": mode}
        features = ours.encode_images(to_patches(pixel_values), target_sizes, mode)
    with torch.no_grad():
        expected = ref(input_ids=ids[None], **kwargs).logits[0]
    got = ours(
        ids,
        [ours.new_state()],
        image_features=None if video else features,
        video_features=features if video else None,
        all_logits=True,
    )
    assert got.shape == expected.shape
    diff = (got - expected).abs().max().item()
    assert diff <= TOL, f"max abs logit difference {diff}"
    return ours


def test_text_only_logits_match_reference():
    ids = torch.randint(0, SMALL.text, (150,), generator=torch.Generator().manual_seed(1))
    compare_logits("base", ids)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_one_image_logits_match_reference(mode):
    pixels, sizes = image_inputs([(448, 448)], mode)
    ids = prompt_with_placeholders(tokens_per_unit(sizes, mode))
    compare_logits("base", ids, pixels, sizes, mode)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_several_sliced_images_logits_match_reference(mode):
    pixels, sizes = image_inputs([(800, 600), (1000, 300), (224, 224)], mode)
    assert len(sizes) > 3  # slices present
    ids = prompt_with_placeholders(tokens_per_unit(sizes, mode))
    compare_logits("base", ids, pixels, sizes, mode)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_units_encode_alike_alone_or_together(dtype, monkeypatch):
    """The tower runs units in groups (attention never crosses units): grouping must not change a feature."""
    _, directory = reference_checkpoint("base")
    model = load_model(directory, dtype=dtype)
    pixel_values, target_sizes = image_inputs([(1084, 820), (448, 448)], "16x")
    patches = to_patches(pixel_values)
    monkeypatch.setattr(MiniCPMV, "UNIT_GROUP_PATCHES", 10**9)
    together = model.encode_images(patches, target_sizes)
    monkeypatch.setattr(MiniCPMV, "UNIT_GROUP_PATCHES", 1)
    alone = model.encode_images(patches, target_sizes)
    assert len(target_sizes) == 8 and together.shape == alone.shape
    assert (together.float() - alone.float()).abs().max().item() <= (1e-5 if dtype == "float32" else 0.0)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_snapshot_taken_partway_through_a_chunk_equals_the_state_after_that_prefix(dtype):
    """The prefix cache's turn-start state comes out of the forward that crosses it, beside another sequence."""
    _, directory = reference_checkpoint("base")
    model = load_model(directory, dtype=dtype)
    ids = torch.randint(0, SMALL.text, (40,), generator=torch.Generator().manual_seed(3))
    other = torch.randint(0, SMALL.text, (7,), generator=torch.Generator().manual_seed(4))
    state, neighbour = model.new_state(), model.new_state()
    model(ids[:5], [state])
    snapshots = Snapshots({0: 20, 1: 7})  # the neighbour's chunk ends at its point: nothing to keep there
    model(torch.cat([ids[5:35], other]), [state, neighbour], lengths=[30, 7], snapshots=snapshots)
    assert list(snapshots.states) == [0] and snapshots.states[0].length == 25 and state.length == 35
    expected = model.new_state()
    model(ids[:25], [expected])
    got = snapshots.states[0]
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == "float32" else {"atol": 0.05, "rtol": 0.02}
    for a, b in zip(got.keys + got.values, expected.keys + expected.values):
        torch.testing.assert_close(a.float(), b[:, :25].float(), **tol)
    for a, b in zip(got.conv + got.recurrent, expected.conv + expected.recurrent):
        torch.testing.assert_close(a.float(), b.float(), **tol)
    torch.testing.assert_close(model(ids[25:40], [got]), model(ids[25:40], [expected]), **tol)


def test_asymmetric_grid_image_matches_reference():
    from transformers import MiniCPMV4_6ImageProcessor

    image = np.random.default_rng(3).integers(0, 256, (820, 1084, 3), dtype=np.uint8)
    out = MiniCPMV4_6ImageProcessor()(image, return_tensors="pt")
    assert [list(g) for g in out["grids"]] == [[2, 3]]
    ids = prompt_with_placeholders(tokens_per_unit(out["target_sizes"], "16x"))
    compare_logits("base", ids, out["pixel_values"], out["target_sizes"], "16x")


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_video_frames_match_reference(mode):
    from transformers import MiniCPMV4_6VideoProcessor

    frames = np.random.default_rng(4).integers(0, 256, (4, 120, 160, 3), dtype=np.uint8)
    out = MiniCPMV4_6VideoProcessor()(
        videos=[frames], do_sample_frames=False, max_slice_nums=1, downsample_mode=mode, return_tensors="pt"
    )
    sizes = out["target_sizes_videos"]
    ids = prompt_with_placeholders(tokens_per_unit(sizes, mode), token=SMALL.video)
    compare_logits("base", ids, out["pixel_values_videos"], sizes, mode, video=True)


@pytest.mark.parametrize("mode", ["16x", "4x"])
def test_merger_times_2_matches_reference(mode):
    # Two merge rounds need patch grids divisible by 8 (16x) or 4 (4x): 448x448 gives 32x32.
    pixels, sizes = image_inputs([(448, 448), (224, 224)], mode)
    ids = prompt_with_placeholders(tokens_per_unit(sizes, mode, merger_times=2))
    compare_logits("merger_times_2", ids, pixels, sizes, mode)


def test_other_insert_layer_matches_reference():
    pixels, sizes = image_inputs([(448, 448)], "16x")
    ids = prompt_with_placeholders(tokens_per_unit(sizes, "16x"))
    compare_logits("insert_layer_2", ids, pixels, sizes, "16x")


def test_untied_head_and_equal_delta_heads_match_reference():
    pixels, sizes = image_inputs([(600, 400)], "16x")
    ids = prompt_with_placeholders(tokens_per_unit(sizes, "16x"))
    ours = compare_logits("untied_equal_heads", ids, pixels, sizes, "16x")
    assert ours.lm_head.weight is not ours.model.language_model.embed_tokens.weight


def test_placeholder_feature_count_mismatch_names_both_counts():
    _, directory = reference_checkpoint("base")
    ours = load_model(directory)
    pixels, sizes = image_inputs([(448, 448)], "16x")
    features = ours.encode_images(to_patches(pixels), sizes, "16x")
    ids = prompt_with_placeholders([features.shape[0] - 1])
    with pytest.raises(InvalidInputError, match=f"{features.shape[0] - 1} tokens, {features.shape[0]} features"):
        ours(ids, [ours.new_state()], image_features=features)


def test_prefill_then_steps_equal_full_forward_and_reference():
    ref, directory = reference_checkpoint("base")
    ours = load_model(directory)
    pixels, sizes = image_inputs([(448, 448)], "16x")
    features = ours.encode_images(to_patches(pixels), sizes, "16x")
    ids = torch.cat([prompt_with_placeholders([features.shape[0]]), torch.randint(0, SMALL.text, (40,))])
    with torch.no_grad():
        expected = ref(input_ids=ids[None], pixel_values=pixels, target_sizes=sizes).logits[0]
    full = ours(ids, [ours.new_state()], image_features=features, all_logits=True)
    n_prefill = len(ids) - 32
    first = n_prefill - 30  # two prefill chunks, the second resuming from the first's state across a 64 boundary
    state = ours.new_state()
    n_img = int((ids[:first] == SMALL.image).sum())
    parts = [ours(ids[:first], [state], image_features=features[:n_img], all_logits=True)]
    parts.append(ours(ids[first:n_prefill], [state], image_features=features[n_img:], all_logits=True))
    parts += [ours(ids[i : i + 1], [state]) for i in range(n_prefill, len(ids))]
    incremental = torch.cat(parts)
    assert state.length == len(ids)
    assert (incremental - full).abs().max().item() <= TOL
    assert (incremental - expected).abs().max().item() <= TOL


def test_batched_decode_of_different_lengths_equals_separate_runs():
    _, directory = reference_checkpoint("base")
    ours = load_model(directory)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, SMALL.text, (n,), generator=g) for n in (9, 70, 1)]
    states = [ours.new_state() for _ in prompts]
    alone = [ours(p, [s]) for p, s in zip(prompts, states)]
    # Mixed batch: one decode token for the first two, a whole prompt for a fresh third sequence.
    fresh = ours.new_state()
    nxt = torch.tensor([1, 2])
    batch_ids = torch.cat([nxt, prompts[1]])
    snapshot = [s.clone() for s in states[:2]]
    batched = ours(batch_ids, [states[0], states[1], fresh], lengths=[1, 1, len(prompts[1])])
    for i in range(2):
        single = ours(nxt[i : i + 1], [snapshot[i]])
        assert (batched[i] - single[0]).abs().max().item() <= TOL
    assert (batched[2] - alone[1][0]).abs().max().item() <= TOL


@pytest.mark.parametrize("with_image", [False, True])
def test_greedy_32_tokens_equal_reference_generate(with_image):
    ref, directory = reference_checkpoint("base")
    ours = load_model(directory)
    kwargs, features = {}, None
    if with_image:
        pixels, sizes = image_inputs([(640, 480)], "16x")
        kwargs = {"pixel_values": pixels, "target_sizes": sizes}
        features = ours.encode_images(to_patches(pixels), sizes, "16x")
        ids = prompt_with_placeholders([features.shape[0]])
    else:
        ids = torch.randint(0, SMALL.text, (40,), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        expected = ref.generate(
            input_ids=ids[None], max_new_tokens=32, min_new_tokens=32, do_sample=False, **kwargs
        )[0, len(ids) :].tolist()
    assert ours.greedy(ids, 32, image_features=features) == expected


def test_bfloat16_stays_close_to_float32():
    # The real vocabulary, where the argmax bound below was measured: the small one's random head has near-ties
    # (top-2 gaps of 3e-4, under bf16's rounding) at 2 of these 76 positions.
    _, directory = reference_checkpoint("base", REAL)
    fp32 = load_model(directory)
    bf16 = load_model(directory, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16
    pixels, sizes = image_inputs([(448, 448)], "16x")
    ids = prompt_with_placeholders(tokens_per_unit(sizes, "16x"), REAL.image, text=REAL.text)
    a = fp32(ids, [fp32.new_state()], image_features=fp32.encode_images(to_patches(pixels), sizes), all_logits=True)
    b = bf16(ids, [bf16.new_state()], image_features=bf16.encode_images(to_patches(pixels), sizes), all_logits=True)
    # Measured: max abs difference 0.0103 on logits up to 1.41, per-position cosine >= 0.9998, argmax agrees
    # everywhere. The bounds leave ~3x headroom for other CPUs' bf16 kernels.
    assert (a - b).abs().max().item() < 0.03
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min().item() > 0.999
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.98
