"""Loading checkpoints: layouts, dtypes, and a clear error for every kind of broken or missing file."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from minicpmv import checkpoint
from minicpmv.checkpoint import load_model, resolve
from minicpmv.errors import CheckpointError
from tests.tiny import reference_checkpoint


@pytest.fixture
def ckpt(tmp_path):
    """A writable copy of the tiny reference checkpoint."""
    _, source = reference_checkpoint("base")
    target = tmp_path / "ckpt"
    shutil.copytree(source, target)
    return target


def logits(model, ids):
    return model(ids, [model.new_state()], all_logits=True)


def test_sharded_checkpoint_with_index_loads_the_same_weights(tmp_path):
    ref, single_dir = reference_checkpoint("base")
    ref.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    ids = torch.arange(20)
    assert torch.equal(logits(load_model(tmp_path), ids), logits(load_model(single_dir), ids))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_dtypes(ckpt, dtype):
    model = load_model(ckpt, dtype=dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, dtype)}
    assert torch.isfinite(logits(model, torch.arange(10))).all()


def test_unknown_dtype_is_refused(ckpt):
    with pytest.raises(CheckpointError, match="dtype must be one of"):
        load_model(ckpt, dtype="int3")


def test_truncated_weight_file_names_the_file(ckpt):
    path = ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_model(ckpt)


def test_garbage_weight_file_names_the_file(ckpt):
    (ckpt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="cannot read weight file .*model.safetensors"):
        load_model(ckpt)


def rewrite(ckpt, edit):
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_and_misshaped_tensors_are_all_named_in_one_error(ckpt):
    def edit(t):
        del t["model.language_model.norm.weight"]
        del t["model.merger.mlp.0.linear_2.bias"]
        t["model.vision_tower.post_layernorm.weight"] = torch.zeros(3)
        t["model.extra.weight"] = torch.zeros(1)

    rewrite(ckpt, edit)
    with pytest.raises(CheckpointError) as info:
        load_model(ckpt)
    message = str(info.value)
    assert "model.language_model.norm.weight" in message
    assert "model.merger.mlp.0.linear_2.bias" in message
    assert "model.vision_tower.post_layernorm.weight has shape [3], expected [64]" in message
    assert "unexpected tensors: model.extra.weight" in message


def test_mtp_tensors_are_ignored_like_the_reference_does(ckpt):
    rewrite(ckpt, lambda t: t.update({"mtp.fc.weight": torch.zeros(2, 2)}))
    load_model(ckpt)


def test_missing_weight_files(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ckpt)
    (ckpt / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "model-00001.safetensors"}}))
    with pytest.raises(CheckpointError, match="model-00001.safetensors"):
        load_model(ckpt)


def test_bad_config(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, "model_type": "llava"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'llava'"):
        load_model(ckpt)
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(ckpt)
    for broken, message in [
        ("[1, 2]", "must hold a JSON object, not list"),
        (json.dumps({**cfg, "text_config": [1]}), "text_config in config.json must be an object"),
        (json.dumps({**cfg, "text_config": {**cfg["text_config"], "hidden_size": "64"}}), "hidden_size must be of type int"),
        (json.dumps({**cfg, "vision_config": {**cfg["vision_config"], "window_kernel_size": 2}}), "window_kernel_size"),
    ]:
        (ckpt / "config.json").write_text(broken)
        with pytest.raises(CheckpointError, match=message):
            load_model(ckpt)
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(ckpt)


def test_not_a_directory_nor_a_repo_id(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        resolve(str(tmp_path / "nowhere"))


def test_repo_id_from_local_cache(monkeypatch, ckpt):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        calls.append(local_files_only)
        return str(ckpt)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    assert resolve("openbmb/MiniCPM-V-4.6") == ckpt
    assert calls == [True]  # found in the cache: no download attempted


def test_repo_id_offline_says_what_to_do(monkeypatch):
    from huggingface_hub.errors import LocalEntryNotFoundError

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False):
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        raise ConnectionError("network is unreachable")

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    with pytest.raises(CheckpointError) as info:
        resolve("openbmb/MiniCPM-V-4.6")
    message = str(info.value)
    assert "could not be downloaded" in message and "minicpmv download openbmb/MiniCPM-V-4.6" in message
    with pytest.raises(CheckpointError, match="not in the local Hugging Face cache"):
        resolve("openbmb/MiniCPM-V-4.6", download=False)


def test_progress_bar_is_shown_when_asked(ckpt, capsys):
    load_model(ckpt, progress=True)
    assert "loading weights" in capsys.readouterr().err
    load_model(ckpt, progress=False)
    assert "loading weights" not in capsys.readouterr().err


def test_weight_files_helper_prefers_the_index(ckpt):
    assert checkpoint.weight_files(ckpt) == [ckpt / "model.safetensors"]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_packing_releases_the_checkpoint_file_pages_and_leaves_other_memory_alone(tmp_path):
    from safetensors import safe_open

    from minicpmv.model.fast import release_file_pages

    def resident_file_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssFile:")) / 1024

    data = torch.randn(4096, 1024)  # 16 MB
    save_file({"w": data}, str(tmp_path / "w.safetensors"))
    mapped = safe_open(str(tmp_path / "w.safetensors"), framework="pt").get_tensor("w")
    assert torch.equal(mapped, data)  # every page read
    before = resident_file_mb()
    anonymous = data.clone()
    release_file_pages([mapped, anonymous])
    assert resident_file_mb() < before - 12
    assert torch.equal(mapped, data) and torch.equal(anonymous, data)  # read back from the file; a copy untouched
