"""Checkpoints quantized by other tools (GPTQ, AWQ, bitsandbytes NF4, GGUF), loaded without those tools.

``detect(path)`` names a checkpoint's format (None for our own safetensors, plain or ``quant.save_quantized``);
``load_model`` builds ``MiniCPMV`` from it. Each format module has one job: ``read(source, cfg, dense)`` turns the
checkpoint's tensors into a ``Loaded``: dense float tensors under our module names, plus, for the language model's
quantized linears, a ``quant.Grouped`` each (values, scales, zero-point offsets) that ``fast.optimize`` packs for
the int4 or int8 kernels. With ``dense`` (a float32 load, or off the CPU) every quantized weight is dequantized
instead: the exact reference. What was dequantized is logged and reported (``Loaded.info``: the start-up summary,
``/v1/models``).
"""

from __future__ import annotations

import importlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minicpmv.errors import CheckpointError

log = logging.getLogger(__name__)

# format name -> module (in this package) with ``read(source: Path, cfg, dense: bool, progress) -> Loaded``
FORMATS = {"gptq": "gptq", "awq": "awq", "bnb-nf4": "bnb", "gguf": "gguf"}
QUANT_METHODS = {"gptq": "gptq", "awq": "awq", "bitsandbytes": "bnb-nf4"}  # config.json quantization_config


@dataclass
class Loaded:
    """A foreign checkpoint read into what our loader consumes."""

    format: str
    tensors: dict[str, torch.Tensor]  # dense tensors by our checkpoint names (any float dtype; cast at load)
    quantized: dict = field(default_factory=dict)  # linear name -> quant.Grouped, packed by fast.optimize
    types: Counter = field(default_factory=Counter)  # stored tensor type ("gptq int4 g128", "bf16", ...) -> count
    dequantized: list[str] = field(default_factory=list)  # quantized linears/tensors turned dense at load
    notes: list[str] = field(default_factory=list)  # anything else the user should know (requantized parts, ...)
    config: object | None = None  # a ModelConfig where the checkpoint carries its own (GGUF)

    def info(self) -> dict:
        """What the start-up summary and /v1/models say about the weights."""
        return {"format": self.format, "types": dict(sorted(self.types.items())),
                "quantized_linears": len(self.quantized), "kernels": self.kernels(),
                "dequantized": _summarize(self.dequantized), "notes": list(self.notes)}

    def kernels(self) -> str:
        """The kernels the quantized linears go into: "int4", "int8", "int4 / int8" ("quantized" for none)."""
        return " / ".join(sorted({f"int{q.bits}" for q in self.quantized.values()})) or "quantized"

    def summary(self) -> str:
        types = ", ".join(f"{n} x{c}" for n, c in sorted(self.types.items()))
        parts = [f"{self.format} checkpoint: {types}", f"{len(self.quantized)} linears into the {self.kernels()} kernels"]
        if self.dequantized:
            parts.append(f"dequantized at load: {_summarize(self.dequantized)}")
        return "; ".join(parts + self.notes)

    def take_the_rest(self, files, used: set[str]) -> None:
        """Every tensor of ``files`` a reader did not use or replace, as stored (norms, the vision tower, ...)."""
        for name in files.names():
            if name not in used and name not in self.tensors:
                t = files.get(name)
                self.types[str(t.dtype).replace("torch.", "")] += 1
                self.tensors[name] = t


def _summarize(names: list[str]) -> str:
    """Layer-indexed names folded: 'model.language_model.layers.*.mlp.down_proj (24)'."""
    folded = Counter(re.sub(r"\.\d+\.", ".*.", n) for n in names)
    return ", ".join(n if c == 1 else f"{n} ({c})" for n, c in sorted(folded.items()))


def config_section(directory: Path, key: str) -> dict | None:
    """The object under ``key`` in the directory's config.json, else None."""
    try:
        raw = json.loads((directory / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    section = raw.get(key)
    return section if isinstance(section, dict) else None


def quantization_config(directory: Path) -> dict | None:
    return config_section(directory, "quantization_config")


def gguf_source(directory: Path) -> dict | None:
    """The ``gguf`` section of a directory ``gguf.prepare`` wrote for a .gguf file (its source files), else None."""
    return config_section(directory, "gguf")


def detect(path: str | Path) -> str | None:
    """The format of a checkpoint directory (or file): a name in ``FORMATS``, or None for our own formats. A
    ``quantization_config`` of a method we do not read is an error naming it."""
    path = Path(path)
    if not path.is_dir():
        return None
    if gguf_source(path) is not None:
        return "gguf"
    section = quantization_config(path)
    if section is None:
        return None
    method = str(section.get("quant_method", "")).lower()
    if method not in QUANT_METHODS:
        raise CheckpointError(f"{path / 'config.json'}: quantization_config quant_method {method!r} is not supported "
                              f"(supported: {', '.join(QUANT_METHODS)})")
    return QUANT_METHODS[method]


def reader(name: str):
    """The format module for ``name``."""
    if name not in FORMATS:
        raise CheckpointError(f"unknown checkpoint format {name!r}")
    return importlib.import_module(f"{__name__}.{FORMATS[name]}")


def load_model(name: str, source: Path, cfg, dtype: torch.dtype, device: torch.device, progress: bool | None,
               optimize: bool, quantization: str | None = None, group_size: int = 64):
    """``checkpoint.load_model`` for a foreign checkpoint: read it, check it against the model, load, pack. With
    ``quantization`` (bf16 on the CPU) the language model's linears the file left dense, or that were dequantized,
    are quantized by us (int4 in groups of ``group_size``); the file's own quantized weights stay as stored."""
    from minicpmv.model import fast, quant
    from minicpmv.model.minicpmv import MiniCPMV

    dense = dtype != torch.bfloat16 or device.type != "cpu"  # float32: everything dequantized (the exact reference)
    loaded = reader(name).read(source, cfg, dense=dense, progress=progress)
    cfg = loaded.config or cfg
    embed, head = loaded.tensors.get("model.language_model.embed_tokens.weight"), loaded.tensors.get("lm_head.weight")
    if cfg.tie_word_embeddings and ("lm_head" in loaded.quantized or (
            head is not None and embed is not None and not torch.equal(head.to(embed.dtype), embed))):
        cfg.tie_word_embeddings = False  # a head quantized on its own (GPTQModel's lm_head=True): no longer tied
    with torch.device("meta"):
        net = MiniCPMV(cfg)
    expected = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    for linear in loaded.quantized:
        expected.pop(f"{linear}.weight", None)
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    found = {k: tuple(v.shape) for k, v in loaded.tensors.items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(n for n in set(found) - set(expected) if not n.startswith("mtp.") and n != "lm_head.weight")
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    problems += [f"tensor {n} has shape {list(found[n])}, expected {list(expected[n])}"
                 for n in sorted(set(expected) & set(found)) if expected[n] != found[n]]
    modules = dict(net.named_modules())
    for linear, q in loaded.quantized.items():
        module = modules.get(linear)
        if not isinstance(module, torch.nn.Linear):
            problems.append(f"quantized weights for {linear}, which is not a linear layer of this model")
        elif q.shape != (module.out_features, module.in_features):
            problems.append(f"quantized {linear} has shape {list(q.shape)}, expected "
                            f"{[module.out_features, module.in_features]}")
    if problems:
        raise CheckpointError(f"{loaded.format} checkpoint {source} does not match the model: " + "; ".join(problems))
    net.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in loaded.tensors.items() if n in expected},
                        strict=False, assign=True)
    if cfg.tie_word_embeddings and "lm_head" not in loaded.quantized:
        net.lm_head.weight = net.model.language_model.embed_tokens.weight
    for linear, q in loaded.quantized.items():
        modules[linear].quantized = q
    if quantization:
        dense = [n for n in quant.quantized_names(net) if n not in loaded.quantized]
        if dense:
            loaded.notes.append(f"quantized at load to {quantization}: {_summarize(dense)}")
    net.checkpoint_dir = source if source.is_dir() else source.parent
    net.checkpoint_format = loaded.info()
    net.eval()
    log.info("%s", loaded.summary())
    if device.type == "cpu":
        fast.set_threads()
    if quantization:
        fast.optimize(net, quantization, group_size, keep_dense=False)
    elif loaded.quantized or optimize:
        fast.optimize(net, "int4" if loaded.quantized else None, 0)
    return net


def weight_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError) as exc:
            raise CheckpointError(f"{index} is not a valid safetensors index: {exc}") from None
        files = [directory / n for n in names]
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"weight files listed in {index.name} are missing: {', '.join(missing)}")
        return files
    single = directory / "model.safetensors"
    if not single.exists():
        raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    return [single]


class SafetensorsFiles:
    """The tensors of a directory's safetensors files, read on demand (a mapping name -> shape, ``get(name)``)."""

    def __init__(self, directory: Path):
        from safetensors import SafetensorError, safe_open


        self.directory, self._error = directory, (SafetensorError, OSError)
        self.handles, self.shapes = {}, {}
        for f in weight_files(directory):
            try:
                handle = safe_open(str(f), framework="pt", device="cpu")
            except self._error as exc:
                raise CheckpointError(f"cannot read weight file {f}: {exc} (truncated or corrupt download?)") from None
            for name in handle.keys():
                self.handles[name] = (f, handle)
                self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def names(self) -> list[str]:
        return sorted(self.shapes)

    def get(self, name: str) -> torch.Tensor:
        if name not in self.handles:
            raise CheckpointError(f"{self.directory}: tensor {name} is missing")
        f, handle = self.handles[name]
        try:
            return handle.get_tensor(name)
        except self._error as exc:
            raise CheckpointError(f"cannot read tensor {name} from {f}: {exc}") from None
