"""The CPU fast path: packed-weight kernels against F.linear, the fused bf16 model against the plain one, weight-only
int8 / int4 quality and checkpoints, and the pure-PyTorch fallback when the C++ kernels are unavailable."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from minicpmv.checkpoint import load_model
from minicpmv.errors import CheckpointError
from minicpmv.model import kernels
from minicpmv.model.kernels import PackedLinear, interleave_gate_up
from minicpmv.model.quant import save_quantized
from tests.tiny import SMALL, reference_checkpoint

needs_kernels = pytest.mark.skipif(not kernels.available(), reason="needs a CPU with AVX-512 BF16 and a C++ compiler")


@pytest.fixture
def no_kernels(monkeypatch):
    """Pretend the C++ kernels could not be built (modules created inside the test use the fallback)."""
    monkeypatch.setattr(kernels, "_lib", None)
    monkeypatch.setattr(kernels, "_tried", True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# -- kernels -------------------------------------------------------------------------------------------------------
SHAPES = [(1, 64, 64), (2, 128, 130), (3, 96, 200), (4, 256, 64), (5, 64, 1000), (7, 192, 77), (8, 1024, 129),
          (13, 130, 70), (64, 320, 256), (600, 4096, 70)]  # (M, K, N): one to many rows, odd and unaligned sizes;
# the last runs in three row panels (256 rows of K = 4096 each, the last 88 rows)


@needs_kernels
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_bf16_kernel_equals_f_linear(m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    w, bias = torch.randn(n, k, generator=g) * 0.05, torch.randn(n, generator=g)
    x = torch.randn(m, k, generator=g).bfloat16()
    lin = PackedLinear(w, bias)
    expected = F.linear(x.float(), w.bfloat16().float(), bias)
    assert rel_err(lin(x, out_dtype=torch.float32), expected) < 1e-5  # same products, float32 sums
    assert rel_err(lin(x), expected) < 4e-3  # one bf16 rounding of the output
    assert lin(x).dtype == torch.bfloat16


@needs_kernels
@pytest.mark.parametrize("quant", ["int8", "int4"])
@pytest.mark.parametrize("m, k, n", SHAPES)
def test_quantized_kernels_equal_f_linear_on_the_dequantized_weight(quant, m, k, n):
    g = torch.Generator().manual_seed(m * k + n)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).bfloat16()
    lin = PackedLinear(w, quant=quant, group=32)
    expected = F.linear(x.float(), lin.dequantized(torch.float32))
    assert rel_err(lin(x, out_dtype=torch.float32), expected) < 1e-5
    assert rel_err(lin(x), expected) < 4e-3
    assert rel_err(expected, F.linear(x.float(), w)) < (0.01 if quant == "int8" else 0.15)  # the quantization itself


@needs_kernels
@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_fused_silu_mul_epilogue(quant):
    g = torch.Generator().manual_seed(0)
    gate, up = torch.randn(100, 128, generator=g) * 0.05, torch.randn(100, 128, generator=g) * 0.05
    x = torch.randn(3, 128, generator=g).bfloat16()
    lin = PackedLinear(interleave_gate_up(gate, up), quant=quant, act="silu_mul", out_features=100)
    w = lin.dequantized(torch.float32).view(-1, 2, 32, 128)
    gate_q, up_q = (w[:, i].reshape(-1, 128)[:100] for i in (0, 1))
    expected = F.silu(x.float() @ gate_q.T) * (x.float() @ up_q.T)
    assert rel_err(lin(x, out_dtype=torch.float32), expected) < 1e-5


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_rows_and_plain_layout_round_trip(quant):
    w = torch.randn(300, 130) * 0.05
    lin = PackedLinear(w, quant=quant, group=64)
    full = lin.dequantized(torch.float32)
    assert full.shape == (300, 130)
    ids = torch.tensor([0, 299, 64, 65, 17])
    assert torch.equal(lin.rows(ids), full[ids])
    q, s = lin.quantized()
    assert torch.equal(PackedLinear(q, quant=quant, group=64, scale=s).weight, lin.weight)


@pytest.mark.parametrize("quant", ["bf16", "int8", "int4"])
def test_fallback_without_kernels_matches_the_kernel(quant, no_kernels):
    g = torch.Generator().manual_seed(1)
    w, x = torch.randn(200, 256, generator=g) * 0.05, torch.randn(5, 256, generator=g).bfloat16()
    lin = PackedLinear(w, quant=quant)
    assert lin._kernel is None
    expected = F.linear(x.float(), lin.dequantized(torch.float32))
    assert rel_err(lin(x, out_dtype=torch.float32), expected) < 4e-3


# -- the fused bf16 model --------------------------------------------------------------------------------------------
def greedy_logits(model, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits after the prompt and after each of ``tokens`` fed one by one (teacher forcing)."""
    state = model.new_state()
    out = [model(prompt, [state])]
    out += [model(torch.tensor([t]), [state]) for t in tokens]
    return torch.cat(out)


@needs_kernels
def test_fused_bf16_decode_matches_the_plain_bf16_model_past_a_cache_resize():
    _, directory = reference_checkpoint("base")
    plain = load_model(directory, dtype="bfloat16", optimize=False)
    fast = load_model(directory, dtype="bfloat16")
    assert type(fast.model.language_model.layers[0].mlp).__name__ == "FusedMLP"
    assert fast.model.language_model.fused_decode is not None  # the whole decode step in one kernel
    prompt = torch.randint(0, SMALL.text, (250,), generator=torch.Generator().manual_seed(0))
    tokens = torch.randint(0, SMALL.text, (20,), generator=torch.Generator().manual_seed(1)).tolist()  # past 256 keys
    a, b = greedy_logits(plain, prompt, tokens), greedy_logits(fast, prompt, tokens)
    assert (a - b).abs().max().item() < 0.03  # measured 0.004: float32 inside the fused kernels, bf16 outside
    assert F.cosine_similarity(a, b, dim=-1).min().item() > 0.999


@needs_kernels
def test_fused_batched_decode_equals_separate_runs():
    _, directory = reference_checkpoint("untied_equal_heads")
    model = load_model(directory, dtype="bfloat16")
    ids = torch.randint(0, SMALL.text, (40,), generator=torch.Generator().manual_seed(2))
    s1, s2 = model.new_state(), model.new_state()
    model(ids[:5], [s1])
    model(ids, [s2])
    c1, c2 = s1.clone(), s2.clone()
    batched = model(torch.tensor([3, 4]), [s1, s2], lengths=[1, 1])
    assert torch.equal(batched[0], model(torch.tensor([3]), [c1])[0])
    assert torch.equal(batched[1], model(torch.tensor([4]), [c2])[0])


# -- quantization ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["base", "untied_equal_heads"])
def test_int8_agrees_with_bf16_over_256_greedy_steps_and_int4_is_reported(variant, capsys):
    _, directory = reference_checkpoint(variant)
    bf16 = load_model(directory, dtype="bfloat16")
    prompt = torch.randint(0, SMALL.text, (32,), generator=torch.Generator().manual_seed(0))
    state, logits, tokens = bf16.new_state(), [], []
    logits.append(bf16(prompt, [state]))
    for _ in range(255):
        tokens.append(int(logits[-1][0].argmax()))
        logits.append(bf16(torch.tensor([tokens[-1]]), [state]))
    reference = torch.cat(logits)
    report = {}
    for quant in ("int8", "int4"):
        got = greedy_logits(load_model(directory, dtype="bfloat16", quantization=quant), prompt, tokens)
        top1 = (got.argmax(-1) == reference.argmax(-1)).float().mean().item()
        cosine = F.cosine_similarity(got, reference, dim=-1).mean().item()
        report[quant] = {"top1": round(top1, 4), "cosine": round(cosine, 5)}
    with capsys.disabled():
        print(f"\n{variant}: agreement with bf16 over 256 greedy steps: {json.dumps(report)}")
    assert report["int8"]["top1"] >= 0.95 and report["int8"]["cosine"] >= 0.99
    assert report["int4"]["cosine"] >= 0.9  # measured 0.987 (base)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_checkpoint_round_trip_gives_identical_logits(quant, tmp_path):
    _, directory = reference_checkpoint("untied_equal_heads")
    model = load_model(directory, dtype="bfloat16", quantization=quant)
    save_quantized(model, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization"]["method"] == quant
    loaded = load_model(tmp_path / "q", dtype="bfloat16")
    assert loaded.quantization == quant
    ids = torch.arange(30)
    assert torch.equal(model(ids, [model.new_state()], all_logits=True), loaded(ids, [loaded.new_state()], all_logits=True))


def test_quantized_checkpoint_is_smaller_and_refuses_another_method(tmp_path):
    _, directory = reference_checkpoint("base")
    save_quantized(load_model(directory, dtype="bfloat16", quantization="int4"), tmp_path / "q")
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < (directory / "model.safetensors").stat().st_size / 2
    with pytest.raises(CheckpointError, match="quantized as int4"):
        load_model(tmp_path / "q", dtype="bfloat16", quantization="int8")
    with pytest.raises(CheckpointError, match="needs dtype bfloat16"):
        load_model(directory, dtype="float32", quantization="int8")


@pytest.mark.parametrize("section", ["int8", [1], {"method": "int4", "group_size": None}, {"method": "int3"}])
def test_a_malformed_quantization_section_or_group_size_is_a_checkpoint_error(section, tmp_path):
    _, directory = reference_checkpoint("base")
    shutil.copytree(directory, tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**config, "quantization": section}))
    with pytest.raises(CheckpointError, match="quantization section"):
        load_model(tmp_path / "q", dtype="bfloat16")
    with pytest.raises(CheckpointError, match="group_size must be one of"):
        load_model(directory, dtype="bfloat16", quantization="int4", group_size=0)


def test_quantized_model_runs_without_kernels(no_kernels):
    _, directory = reference_checkpoint("base")
    model = load_model(directory, dtype="bfloat16", quantization="int8")
    assert all(m._kernel is None for m in model.modules() if isinstance(m, PackedLinear))
    logits = model(torch.arange(20), [model.new_state()])
    assert torch.isfinite(logits).all()


@needs_kernels
@pytest.mark.parametrize("seqlens, d", [([64], 72), ([37, 100, 5], 72), ([130], 16), ([1, 2, 200], 128)])
def test_block_attention_equals_sdpa_per_block(seqlens, d):
    g = torch.Generator().manual_seed(sum(seqlens))
    heads, n = 3, sum(seqlens)
    qkv = torch.randn(n, 3, heads, d, generator=g).bfloat16()
    q, k, v = qkv.unbind(1)
    got = kernels.attention_blocks(q, k, v, seqlens)
    parts, start = [], 0
    for length in seqlens:
        qs, ks, vs = (t[start : start + length].transpose(0, 1).float() for t in (q, k, v))
        parts.append(F.scaled_dot_product_attention(qs, ks, vs).transpose(0, 1).reshape(length, -1))
        start += length
    assert rel_err(got, torch.cat(parts)) < 6e-3  # bf16 output, bf16 attention weights for the value sum
