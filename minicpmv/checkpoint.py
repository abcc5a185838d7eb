"""Find a checkpoint (a directory or a Hugging Face repo id) and load it into ``MiniCPMV``.

The official ``model.safetensors`` loads unchanged: our module names are the checkpoint's tensor names. Every
problem with the files (missing, unexpected or mis-shaped tensors, truncated files) is reported in one
``CheckpointError`` that names what is wrong.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from minicpmv.config import ModelConfig
from minicpmv.errors import CheckpointError
from minicpmv.model import fast, formats, quant
from minicpmv.model.formats import weight_files
from minicpmv.model.minicpmv import MiniCPMV

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IGNORED = re.compile(r"^mtp\.")  # the multi-token-prediction head is not part of this model
REPO_FILES = ["*.json", "*.jinja", "*.safetensors", "*.txt", "*.model"]


def resolve(model: str | Path, download: bool = True, mmproj: str | Path | None = None) -> Path:
    """A local checkpoint directory for ``model``: the path itself, or a repo id from the local Hugging Face cache
    (downloaded first, with a progress bar, when it is not there and the network allows), or for a llama.cpp
    ``.gguf`` file the directory ``formats.gguf.prepare`` makes of it and its vision projector ``mmproj`` (found
    beside it unless given)."""
    if not isinstance(model, (str, os.PathLike)):
        raise CheckpointError(f"model must be a checkpoint directory or a Hugging Face repo id, got {model!r}")
    path = Path(model).expanduser()
    if str(path).endswith(".gguf"):
        from minicpmv.model.formats import gguf

        return gguf.prepare(path, mmproj)
    if mmproj is not None:
        raise CheckpointError(f"mmproj={str(mmproj)!r} is for a .gguf language model, not {model}")
    if path.is_dir():
        return path
    if path.exists() or str(model).startswith((".", "/", "~")) or str(model).count("/") != 1:
        raise CheckpointError(f"{model}: not a checkpoint directory and not a Hugging Face repo id (owner/name)")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(str(model), allow_patterns=REPO_FILES, local_files_only=True))
    except LocalEntryNotFoundError:
        pass
    if not download:
        raise CheckpointError(f"{model} is not in the local Hugging Face cache; run `minicpmv download {model}`")
    try:
        return Path(snapshot_download(str(model), allow_patterns=REPO_FILES))
    except Exception as exc:  # network errors come in many types; all mean the same thing to the user
        raise CheckpointError(
            f"{model} is not in the local Hugging Face cache and could not be downloaded ({type(exc).__name__}: "
            f"{exc}). On a machine with network access run `minicpmv download {model}` (or "
            f"`hf download {model}`) and copy the cache (~/.cache/huggingface/hub), or pass a local checkpoint "
            f"directory instead of the repo id."
        ) from None


def load_model(
    model: str | Path,
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    progress: bool | None = None,
    quantization: str | None = None,
    optimize: bool = True,
    group_size: int = 64,
) -> MiniCPMV:
    """Build ``MiniCPMV`` from a checkpoint directory or repo id, weights in ``dtype`` on ``device``.

    ``quantization`` ("int8" or "int4", bfloat16 on the CPU only) quantizes the language model's linear layers at
    load time (int4 in groups of ``group_size``); a checkpoint written by ``quant.save_quantized`` loads quantized
    without asking. On another tool's quantized checkpoint (GPTQ, AWQ, GGUF, ...) it quantizes only what that file
    left dense or we dequantize, the tied head above all; without it those stay bf16, as stored. ``optimize``
    packs a bfloat16 CPU model's weights for the fast kernels (``model/fast.py``).
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CheckpointError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
        dtype = DTYPES[dtype]
    device = torch.device(device)
    directory = resolve(model)
    cfg = ModelConfig.from_file(directory)
    if quantization not in (None, *quant.METHODS):
        raise CheckpointError(f"quantization must be one of {list(quant.METHODS)}, got {quantization!r}")
    foreign = formats.detect(directory)  # GPTQ, AWQ, bitsandbytes, GGUF: model/formats
    try:
        stored = None if foreign else quant.checkpoint_quantization(cfg.quantization)
    except ValueError as exc:
        raise CheckpointError(f"{directory / 'config.json'}: {exc}") from None
    if stored and quantization not in (None, stored[0]):
        raise CheckpointError(f"checkpoint {directory} is quantized as {stored[0]}, not {quantization}")
    method, group_size = (stored or (quantization, group_size))
    if method == "int4" and group_size not in quant.GROUP_SIZES:
        raise CheckpointError(f"int4 group_size must be one of {list(quant.GROUP_SIZES)}, got {group_size!r}")
    if method and (dtype != torch.bfloat16 or device.type != "cpu"):
        raise CheckpointError(f"{method} quantization needs dtype bfloat16 on the CPU")
    if foreign:
        return formats.load_model(foreign, directory, cfg, dtype, device, progress, optimize, method, group_size)
    with torch.device("meta"):
        net = MiniCPMV(cfg)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    quantized = {}  # stored tensor name -> (module, part)
    if stored:
        modules = dict(net.named_modules())
        for name in quant.quantized_names(net):
            shape = expected.pop(f"{name}.weight", None) or tuple(net.lm_head.weight.shape)
            for stored_name, stored_shape in quant.stored_shapes(name, shape, method, group_size).items():
                expected[stored_name] = stored_shape
                quantized[stored_name] = modules[name]
        if cfg.tie_word_embeddings:
            expected.pop("model.language_model.embed_tokens.weight")  # read from the quantized head

    files = weight_files(directory)
    handles = {}
    for f in files:
        try:
            handles[f] = safe_open(str(f), framework="pt", device="cpu")
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read weight file {f}: {exc} (truncated or corrupt download?)") from None
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f, h in handles.items():
        for name in h.keys():
            found[name] = (f, tuple(h.get_slice(name).get_shape()))

    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not IGNORED.match(n) and n != "lm_head.weight")
    shapes = sorted(n for n in set(expected) & set(found) if expected[n] != found[n][1])
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    for n in shapes:
        problems.append(f"tensor {n} has shape {list(found[n][1])}, expected {list(expected[n])}")
    if problems:
        raise CheckpointError(f"checkpoint {directory} does not match its config.json: " + "; ".join(problems))

    weights, parts = {}, {}
    for name in tqdm(sorted(expected), desc="loading weights", unit="tensor", disable=None if progress is None else not progress):
        f = found[name][0]
        try:
            tensor = handles[f].get_tensor(name)
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read tensor {name} from {f}: {exc}") from None
        if name in quantized:
            parts[name] = tensor
        else:
            weights[name] = tensor.to(device=device, dtype=dtype)
    net.load_state_dict(weights, strict=False, assign=True)
    if cfg.tie_word_embeddings:
        net.lm_head.weight = net.model.language_model.embed_tokens.weight
    for name, module in quantized.items():
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            quant.attach(module, parts[name], parts[f"{base}.scales"], method)
    net.checkpoint_dir = directory
    net.eval()
    del weights, parts, handles  # packing below frees each original as it goes
    if device.type == "cpu":
        fast.set_threads()
    if method or optimize:
        fast.optimize(net, method, group_size)
    return net
