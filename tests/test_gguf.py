"""llama.cpp GGUF files (model/formats/gguf.py): the tiny checkpoint converted by llama.cpp's own converter
(convert_hf_to_gguf.py, LM with --no-mtp and the mmproj in its 4x and 16x forms) and quantized by llama-quantize;
loaded, they give the logits of our model run on the weights the gguf package dequantizes from the same files."""

from __future__ import annotations

import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from minicpmv.checkpoint import load_model, resolve
from minicpmv.errors import CheckpointError, InvalidInputError
from minicpmv.model import quant
from minicpmv.model.formats import gguf as ours
from minicpmv.model.kernels import PackedLinear
from tests.tiny import REAL, convert_to_gguf, link_tree, llama_cpp, llama_quantize, llama_quantize_built, user

KINDS = ("F32", "Q8_0", "Q4_0", "Q4_K_M")


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    """{kind: LM file} each in its own directory beside the 16x mmproj; "4x": the F32 LM beside the 4x mmproj."""
    root = tmp_path_factory.mktemp("gguf")
    four = root / "ckpt-4x"  # the converter takes the mode from preprocessor_config.json
    link_tree(tiny_dir, four)
    for name in ("preprocessor_config.json", "processor_config.json"):
        config = json.loads((four / name).read_text())
        section = config.setdefault("image_processor", {}) if name == "processor_config.json" else config
        section["downsample_mode"] = "4x"
        (four / name).unlink()  # (a hard link to the shared file)
        (four / name).write_text(json.dumps(config))
    (root / "Q8_0").mkdir()
    conversions = [(tiny_dir, root / "lm-F32.gguf", {}), (tiny_dir, root / "mmproj-16x.gguf", {"mmproj": True}),
                   (four, root / "mmproj-4x.gguf", {"mmproj": True}),
                   (tiny_dir, root / "Q8_0" / "lm-Q8_0.gguf", {"outtype": "q8_0"})]  # the converter writes Q8_0
    llama_cpp()  # fetched once, before the conversions run side by side
    with ThreadPoolExecutor(2) as pool:  # each conversion is a process of its own, mostly start-up
        lm, mm16, mm4, _ = pool.map(lambda c: convert_to_gguf(c[0], c[1], **c[2]), conversions)
    out = {}
    for kind in KINDS:
        d = root / kind
        d.mkdir(exist_ok=True)
        path = d / f"lm-{kind}.gguf"
        if kind == "F32":
            os.link(lm, path)
        elif kind != "Q8_0":  # (Q8_0 was written by the converter)
            if not llama_quantize_built():
                continue
            llama_quantize(lm, path, kind)
        os.link(mm16, d / "mmproj-16x.gguf")
        out[kind] = path
    (root / "4x").mkdir()
    os.link(lm, root / "4x" / "lm.gguf")
    os.link(mm4, root / "4x" / "mmproj-4x.gguf")
    out["4x"] = root / "4x" / "lm.gguf"
    return out


def lm_file(files: dict, kind: str) -> Path:
    """Q4_0 and Q4_K_M files need llama.cpp's llama-quantize, built only on request (10-45 min on 2 cores)."""
    if kind not in files:
        pytest.skip(f"{kind}: llama-quantize is not built (scripts/fetch_llama_cpp.sh without --converter-only)")
    return files[kind]


def logits(model, ids):
    return model(ids, [model.new_state()], all_logits=True)


def dequantized_reference(tiny_dir: Path, lm: Path, mmproj: Path):
    """Our model from the original checkpoint with every tensor replaced by what the gguf package dequantizes from
    the GGUF files (mapped to our names and un-transformed)."""
    net = load_model(tiny_dir, dtype="float32", progress=False)
    weights = net.state_dict()
    for path in (lm, mmproj):
        f = ours.File(path)
        for name, t in f.tensors.items():
            w = gguf.quants.dequantize(np.ascontiguousarray(t.raw), gguf.GGMLQuantizationType(t.kind))
            w = np.asarray(w, dtype=np.float32).reshape(tuple(reversed(t.shape)))
            target = ours.our_name(name)
            with torch.no_grad():
                weights[target].copy_(torch.from_numpy(ours.restore(target, w, net.cfg)))
    return net


def test_f32_file_holds_exactly_the_checkpoint(files, tiny_dir):
    """The converter's transforms (norms +1, A_log -> -exp, conv squeeze, value-head reorder) are undone exactly."""
    model = load_model(resolve(files["F32"]), dtype="float32", progress=False)
    original = load_model(tiny_dir, dtype="float32", progress=False)
    mine, theirs = model.state_dict(), original.state_dict()
    assert mine.keys() == theirs.keys()
    for name in theirs:
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-6, atol=1e-6, msg=name)
    ids = torch.randint(0, REAL.text, (16,), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits(model, ids), logits(original, ids), rtol=0, atol=1e-4)
    assert model.checkpoint_format["format"] == "gguf" and model.checkpoint_format["types"] == {"F32": 146}


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_K_M"])
def test_quantized_files_give_the_logits_of_their_dequantized_weights(files, tiny_dir, kind):
    lm = lm_file(files, kind)
    model = load_model(resolve(lm), dtype="float32", progress=False)
    info = model.checkpoint_format
    # Q4_K_M on tiny rows (64, 128 wide: not multiples of 256) is llama.cpp's per-tensor fallback, Q5_0 and Q8_0;
    # the Q4_K blocks themselves are checked in test_int4_decomposition_of_4_bit_blocks_is_exact
    assert {"Q8_0": "Q8_0", "Q4_0": "Q4_0", "Q4_K_M": "Q5_0"}[kind] in info["types"], info
    assert info["dequantized"], info  # float32: everything quantized is dequantized, and said so
    reference = dequantized_reference(tiny_dir, lm, lm.parent / "mmproj-16x.gguf")
    ids = torch.randint(0, REAL.text, (16,), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(logits(model, ids), logits(reference, ids), rtol=0, atol=1e-4)
    original = load_model(tiny_dir, dtype="float32", progress=False)
    assert not torch.equal(model.lm_head.weight, original.lm_head.weight)  # quantized for real


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0"])
def test_q8_0_and_q4_0_go_into_the_int8_and_int4_kernels_unchanged(files, tiny_dir, kind):
    lm = lm_file(files, kind)
    model = load_model(resolve(lm), dtype="bfloat16", progress=False)
    quant_kind = {"Q8_0": "int8", "Q4_0": "int4"}[kind]
    assert model.checkpoint_format["quantized_linears"] > 0 and model.checkpoint_format["kernels"] == quant_kind
    reference = dequantized_reference(tiny_dir, lm, lm.parent / "mmproj-16x.gguf")
    weights = reference.state_dict()
    checked = 0
    for module in model.modules():
        if isinstance(module, PackedLinear) and module.quant == quant_kind and len(module.parts) == 1 and module.act is None:
            (name, rows), = module.parts
            assert module.group == 32, name
            expected = weights[f"{name}.weight"]
            got = module.dequantized(torch.float32)
            if kind == "Q8_0":  # int8 values with their fp16 scales as float32: exact
                assert torch.equal(got, expected), name
            else:  # bf16 scales: 8 bits of precision per group
                assert ((got - expected).abs() <= expected.abs().amax(1, keepdim=True) * 2 ** -7).all(), name
            checked += 1
    assert checked >= 4
    ids = torch.randint(0, REAL.text, (16,), generator=torch.Generator().manual_seed(2))
    a, b = logits(model, ids).float(), logits(reference, ids)
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.99


def test_q8_0_decomposition_is_exact():
    """values * scales (our grouped int8 kernels' form, groups of 32) equal gguf's dequantization."""
    rows, cols = 3, 512
    raw = gguf.quants.quantize(np.random.default_rng(0).normal(size=(rows, cols)).astype(np.float32),
                               gguf.GGMLQuantizationType.Q8_0)
    values, scales = ours.int8_parts(raw, rows, cols)
    assert values.min() >= -127 and values.max() <= 127
    int8 = quant.Grouped(torch.from_numpy(values), torch.from_numpy(scales), None, 32, bits=8)
    expected = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0), dtype=np.float32))
    assert torch.equal(int8.dequantize(), expected)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q4_K"])
def test_int4_decomposition_of_4_bit_blocks_is_exact(kind):
    """values * scales + offsets (our int4 kernels' form, groups of 32) equal gguf's dequantization."""
    rng = np.random.default_rng(0)
    rows, cols = 3, 512
    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "Q4_K":  # (gguf has no numpy Q4_K quantizer: random blocks with sane super-block scales)
        blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
        blocks[..., 0:4] = rng.uniform(1e-3, 1e-2, size=(rows, cols // 256, 2)).astype(np.float16).view(np.uint8)
        raw = blocks.reshape(rows, -1)
    else:
        raw = gguf.quants.quantize(rng.normal(size=(rows, cols)).astype(np.float32), qtype)
    values, scales, offsets = ours.int4_parts(kind, raw, rows, cols)
    assert values.min() >= -8 and values.max() <= 7
    int4 = quant.Grouped(torch.from_numpy(values), torch.from_numpy(scales), torch.from_numpy(offsets), 32)
    expected = torch.from_numpy(np.asarray(gguf.quants.dequantize(raw, qtype), dtype=np.float32))
    torch.testing.assert_close(int4.dequantize(), expected, rtol=1e-6, atol=1e-6)


def test_both_projector_modes(files, tiny_dir):
    """The 16x mmproj serves 16x and 4x; the 4x one (no window merger) serves 4x and refuses 16x by name."""
    original = load_model(tiny_dir, dtype="float32", progress=False)
    sixteen = load_model(resolve(files["F32"]), dtype="float32", progress=False)
    four = load_model(resolve(files["4x"]), dtype="float32", progress=False)
    g = torch.Generator().manual_seed(3)
    patches = torch.randn(2 * 8 * 8, 3 * 14 * 14, generator=g)
    sizes = torch.tensor([[8, 8], [8, 8]])
    for mode, models in (("16x", [sixteen]), ("4x", [sixteen, four])):
        expected = original.encode_images(patches, sizes, mode)
        for model in models:
            torch.testing.assert_close(model.encode_images(patches, sizes, mode), expected, rtol=0, atol=1e-5)
    assert json.loads((resolve(files["4x"]) / "preprocessor_config.json").read_text())["downsample_mode"] == "4x"


def test_llm_over_a_4x_gguf(files):
    from minicpmv.engine.sampling import SamplingParams
    from minicpmv.llm import LLM
    from minicpmv.serve.app import model_card_extras
    from minicpmv.serve.config import ServerConfig
    from minicpmv.serve.logs import startup_summary
    from tests.tiny import image

    directory = resolve(files["4x"])
    lm = ours.File(files["4x"])
    assert (directory / "chat_template.jinja").read_text() == lm.get("tokenizer.chat_template")  # the embedded one
    with LLM(files["4x"], dtype="float32", progress=False) as llm:
        [result] = llm.chat([[user(image(60, 40), "what is this?")]], SamplingParams(max_tokens=3, ignore_eos=True))
        assert len(result.token_ids) == 3 and result.usage.image_tokens > 0
        with pytest.raises(InvalidInputError, match="16x") as err:
            llm.chat([[user(image(60, 40), "hi")]], SamplingParams(max_tokens=2), downsample_mode="16x")
        assert err.value.param == "downsample_mode"
        config = ServerConfig(model_name="m")
        card = model_card_extras(llm, config)["weights_format"]
        assert card["format"] == "gguf" and card["types"] == {"F32": 130}  # (the 4x projector: no window merger)
        assert "weights=[gguf: F32 x130; 0 linears in the quantized kernels]" in startup_summary(llm, config)


def test_tokenizer_beside_the_file_is_checked_against_the_embedded_one(files, tiny_dir, tmp_path):
    for name in ("lm.gguf", "mmproj-16x.gguf"):
        os.link(files["F32"] if name == "lm.gguf" else files["F32"].parent / name, tmp_path / name)
    shutil.copy(tiny_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    assert (resolve(tmp_path / "lm.gguf") / "tokenizer.json").read_bytes() == (tiny_dir / "tokenizer.json").read_bytes()
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    vocab["Hello"], vocab["world"] = vocab["world"], vocab["Hello"]  # a different vocabulary
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"probe text .* position 0 on"):
        resolve(tmp_path / "lm.gguf")


def _set_tensor_type(path: Path, tensor: str, kind: int) -> None:
    """Rewrite one tensor's type in a GGUF header."""
    data = bytearray(path.read_bytes())
    name = tensor.encode()
    at = data.index(len(name).to_bytes(8, "little") + name) + 8 + len(name)
    dims = int.from_bytes(data[at : at + 4], "little")
    at += 4 + 8 * dims
    data[at : at + 4] = kind.to_bytes(4, "little")
    path.write_bytes(bytes(data))


def test_unknown_tensor_type_is_named(files, tmp_path):
    shutil.copy(files["F32"], tmp_path / "lm.gguf")
    os.link(files["F32"].parent / "mmproj-16x.gguf", tmp_path / "mmproj.gguf")
    _set_tensor_type(tmp_path / "lm.gguf", "output_norm.weight", 99)
    with pytest.raises(CheckpointError, match=r"output_norm.weight has GGUF type #99 \(unknown\)"):
        load_model(resolve(tmp_path / "lm.gguf"), dtype="float32", progress=False)


def test_missing_projector_and_wrong_files_are_named(files, tmp_path):
    os.link(files["F32"], tmp_path / "lm.gguf")
    with pytest.raises(CheckpointError, match="no vision projector"):
        resolve(tmp_path / "lm.gguf")
    with pytest.raises(CheckpointError, match="is a vision projector"):
        resolve(files["F32"].parent / "mmproj-16x.gguf")
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    with pytest.raises(CheckpointError, match="not a readable GGUF file"):
        resolve(tmp_path / "bad.gguf")
