"""Checkpoints quantized by other tools: GPTQ (v1 / v2, symmetric or not, act-order, 4- and 8-bit), AWQ GEMM and
bitsandbytes NF4, loaded without those tools (minicpmv/model/formats).

The GPTQ and AWQ checkpoints come from the reference packers in tests/tiny.py (written from the libraries' layouts,
separate from the loader; scripts/crosscheck_gptqmodel.py checks both layouts against GPTQModel's own code), the
NF4 one from bitsandbytes itself. Each has a dense twin: the same model with the dequantized weights as a plain
checkpoint. float32 loads must equal the twin (ours and transformers'); bfloat16 loads run the int4 kernels with
zero points and must stay with the bf16 twin.
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from minicpmv.checkpoint import load_model
from minicpmv.errors import CheckpointError
from minicpmv.model import formats, kernels
from minicpmv.model.kernels import PackedLinear
from tests.tiny import LM_TARGETS, REAL, bnb_checkpoint, link_tree, quantized_checkpoint

VARIANTS = {  # name -> (kind, settings)
    "gptq_v1_sym_g32": ("gptq", {"group": 32}),
    "gptq_v2_asym_g64": ("gptq", {"group": 64, "sym": False, "v2": True}),
    "gptq_v1_asym_act_order": ("gptq", {"group": 32, "sym": False, "act_order": True}),
    "gptq_8bit": ("gptq", {"bits": 8, "group": 32, "sym": False}),
    "gptq_g16": ("gptq", {"group": 16, "sym": False}),
    "gptq_head": ("gptq", {"group": 32, "head": True}),
    "awq_gemm_g32": ("awq", {"group": 32}),
}
KERNEL_VARIANTS = ["gptq_v1_sym_g32", "gptq_v2_asym_g64", "gptq_v1_asym_act_order", "gptq_head", "awq_gemm_g32"]
PROMPT = torch.randint(0, 1000, (24,), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant-formats")
    return {name: quantized_checkpoint(kind, root / name, **settings) for name, (kind, settings) in VARIANTS.items()}


def logits(model, ids=PROMPT):
    with torch.no_grad():
        return model(ids, [model.new_state()], all_logits=True).float()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_float32_load_equals_the_dequantized_weights_in_ours_and_transformers(name, checkpoints):
    from transformers import MiniCPMV4_6ForConditionalGeneration

    quantized, dense = checkpoints[name]
    assert formats.detect(quantized) == VARIANTS[name][0] and formats.detect(dense) is None
    ours = logits(load_model(quantized))
    assert (ours - logits(load_model(dense))).abs().max() < 1e-4
    reference = MiniCPMV4_6ForConditionalGeneration.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=PROMPT[None]).logits[0].float()
    assert (ours - expected).abs().max() < 1e-4


needs_kernels = pytest.mark.skipif(not kernels.available(), reason="needs the C++ kernels")


@needs_kernels
@pytest.mark.parametrize("name", KERNEL_VARIANTS)
def test_bfloat16_load_runs_the_int4_kernels_with_zero_points_and_stays_with_the_dequantized_model(name, checkpoints):
    quantized, dense = checkpoints[name]
    model, twin = load_model(quantized, dtype="bfloat16"), load_model(dense, dtype="bfloat16")
    lm = model.model.language_model
    packed = [m for m in lm.layers.modules() if isinstance(m, PackedLinear)]
    assert packed and all(m.quant == "int4" for m in packed)
    if VARIANTS[name][1].get("sym", True) and VARIANTS[name][0] == "gptq":  # every zero point 8: no offsets
        assert all(m.offset is None for m in packed)
    else:  # zero points in use, as per-group offsets in the kernels
        assert all(m.offset is not None and m.offset.float().abs().max() > 0 for m in packed)
    if VARIANTS[name][1].get("act_order"):  # inputs permuted at load, gathered before each matmul
        assert all(m.in_perm is not None for m in packed) and lm.fused_decode is None
    else:
        assert lm.fused_decode is not None  # the whole-step kernel takes the offsets too
    assert model.checkpoint_format["quantized_linears"] > 0 and not model.checkpoint_format["dequantized"]
    # bf16 weights (the twin) vs int4 values with bf16 scales and offsets: the same weights up to bf16 rounding of
    # the scales and offsets; logits within 2% (relative norm), and the same greedy tokens.
    a, b = logits(model), logits(twin)
    assert ((a - b).norm() / b.norm()) < 0.02
    assert model.greedy(PROMPT, 16) == twin.greedy(PROMPT, 16)


@needs_kernels
def test_8bit_and_other_group_sizes_are_dequantized_and_say_so(checkpoints, caplog):
    for name in ("gptq_8bit", "gptq_g16"):
        quantized, dense = checkpoints[name]
        with caplog.at_level("INFO", logger="minicpmv.model.formats"):
            model = load_model(quantized, dtype="bfloat16")
        info = model.checkpoint_format
        assert info["quantized_linears"] == 0 and "mlp.down_proj" in info["dequantized"]
        assert "dequantized at load" in caplog.text
        twin = load_model(dense, dtype="bfloat16")
        assert torch.equal(logits(model), logits(twin))  # the same bf16 weights, the same kernels


def test_bnb_nf4_double_quant_equals_bitsandbytes_dequantization(tmp_path):
    from transformers import MiniCPMV4_6ForConditionalGeneration

    quantized, dense = bnb_checkpoint(tmp_path / "nf4")
    assert formats.detect(quantized) == "bnb-nf4"
    model = load_model(quantized)
    ours = logits(model)
    assert (ours - logits(load_model(dense))).abs().max() < 1e-4  # bitsandbytes' own dequantize_4bit
    info = model.checkpoint_format
    assert info["format"] == "bnb-nf4" and "vision_tower" in info["dequantized"] and info["quantized_linears"] == 0
    reference = MiniCPMV4_6ForConditionalGeneration.from_pretrained(dense, dtype=torch.float32).eval()
    with torch.no_grad():
        assert (ours - reference(input_ids=PROMPT[None]).logits[0]).abs().max() < 1e-4
    if kernels.available():
        bf16 = load_model(quantized, dtype="bfloat16")
        assert bf16.greedy(PROMPT, 8) == load_model(dense, dtype="bfloat16").greedy(PROMPT, 8)


def test_transformers_with_bitsandbytes_loads_the_same_nf4_checkpoint_like_we_do(tmp_path, monkeypatch):
    """transformers + bitsandbytes (CPU) as the oracle on the checkpoint itself. bitsandbytes' CPU 4-bit matmul
    needs output widths its blocks divide: DeltaNet's 4-wide in_proj_a/b stay unquantized here."""
    from transformers import MiniCPMV4_6ForConditionalGeneration

    import tests.tiny

    monkeypatch.setattr(tests.tiny, "LM_TARGETS", LM_TARGETS.replace("|in_proj_a|in_proj_b", ""))
    quantized, _ = bnb_checkpoint(tmp_path / "nf4")
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["llm_int8_skip_modules"] = ["lm_head", "in_proj_a", "in_proj_b"]
    (quantized / "config.json").write_text(json.dumps(config))
    reference = MiniCPMV4_6ForConditionalGeneration.from_pretrained(quantized, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(input_ids=PROMPT[None]).logits[0]
    # bitsandbytes multiplies in its own CPU kernel: not bit-exact with a float32 matmul of its dequantized weight
    assert (logits(load_model(quantized)) - expected).abs().max() < 1e-2


def edit_config(directory, **section):
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config["quantization_config"].update(section)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("kind, change, message", [
    ("gptq", {"bits": 3}, "GPTQ 3-bit"),
    ("gptq", {"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ("gptq", {"dynamic": {"-:.*down_proj": {}}}, "dynamic"),
    ("awq", {"version": "GEMV"}, "AWQ version 'GEMV'"),
    ("awq", {"version": "gemv_fast"}, "AWQ version 'gemv_fast'"),
    ("awq", {"zero_point": False}, "zero_point"),
    ("gptq", {"quant_method": "hqq"}, "quant_method 'hqq'"),
])
def test_unsupported_variants_are_refused_by_name(kind, change, message, tmp_path):
    quantized, _ = quantized_checkpoint(kind, tmp_path / "q", group=32)
    edit_config(quantized, **change)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_model(quantized)


def test_bnb_8bit_is_refused_by_name(tmp_path):
    quantized, _ = quantized_checkpoint("gptq", tmp_path / "q", group=32)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="8-bit"):
        load_model(quantized)


def test_a_damaged_gptq_linear_is_named(tmp_path):
    from safetensors.torch import load_file, save_file

    quantized, _ = quantized_checkpoint("gptq", tmp_path / "q", group=32)
    tensors = load_file(str(quantized / "model.safetensors"))
    name = "model.language_model.layers.0.mlp.down_proj"
    del tensors[f"{name}.qzeros"]
    save_file(tensors, str(quantized / "model.safetensors"))
    with pytest.raises(CheckpointError, match=re.escape(f"{name}.qweight has no {name}.qzeros")):
        load_model(quantized)


@needs_kernels
@pytest.mark.parametrize("method", ["int4", "int8"])
def test_quantization_on_a_gptq_checkpoint_quantizes_only_what_the_file_left_dense(method, checkpoints):
    """GPTQModel leaves the tied head in bf16 (half a token's weight reads at 4 bits): ``quantization`` quantizes it
    with our own quantizer, exactly as on the bf16 checkpoint, and keeps the file's int4 linears as stored."""
    quantized, dense = checkpoints["gptq_v2_asym_g64"]
    with pytest.raises(CheckpointError, match="needs dtype bfloat16"):
        load_model(quantized, quantization=method)
    as_stored = load_model(quantized, dtype="bfloat16")
    model = load_model(quantized, dtype="bfloat16", quantization=method, group_size=32)
    ours = load_model(dense, dtype="bfloat16", quantization=method, group_size=32)
    assert as_stored.lm_head.quant == "bf16" and model.lm_head.quant == method
    assert torch.equal(model.lm_head.weight, ours.lm_head.weight) and torch.equal(model.lm_head.scale, ours.lm_head.scale)
    layers = [(a, b) for a, b in zip(as_stored.model.language_model.layers.modules(),
                                     model.model.language_model.layers.modules()) if isinstance(a, PackedLinear)]
    assert layers and all(b.quant == "int4" and b.group == 64 and torch.equal(a.weight, b.weight)
                          and torch.equal(a.offset, b.offset) for a, b in layers)
    assert f"quantized at load to {method}: lm_head" in model.checkpoint_format["notes"][-1]
    # the file as stored with our quantized head (and the tied embedding read from it) swapped in: the same logits
    from minicpmv.model.fast import PackedEmbedding

    as_stored.lm_head = ours.lm_head
    as_stored.model.language_model.embed_tokens = PackedEmbedding(ours.lm_head, torch.bfloat16)
    assert torch.equal(logits(model), logits(as_stored))


def test_llm_serves_a_gptq_checkpoint_and_says_what_was_loaded(tmp_path, tokenizer_dir):
    from minicpmv import LLM, SamplingParams
    from minicpmv.serve.app import model_card_extras
    from minicpmv.serve.config import ServerConfig
    from minicpmv.serve.logs import startup_summary

    quantized, _ = quantized_checkpoint("gptq", tmp_path / "gptq", vocab=REAL, group=32, sym=False)
    link_tree(tokenizer_dir, quantized, dirs_exist_ok=True)
    with LLM(quantized, progress=False) as llm:
        result = llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(max_tokens=4, ignore_eos=True))[0]
        assert len(result.token_ids) == 4
        config = ServerConfig(model_name="tiny-gptq")
        card = model_card_extras(llm, config)["weights_format"]
        assert card["format"] == "gptq" and card["types"]["gptq int4 g32 asym (gptq)"] == 25
        summary = startup_summary(llm, config)
        assert "quantization=gptq" in summary and "gptq int4 g32 asym (gptq) x25" in summary
        if kernels.available():
            assert llm.dtype == "bfloat16" and card["quantized_linears"] == 25 and card["dequantized"] == ""
