"""LoRA adapters in the PEFT format, served per request on top of the loaded weights (plain or packed).

``load_adapter`` reads ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``) and checks every
tensor against the model: the target modules come from the tensor keys (``base_model.model.<module>.lora_A.weight``),
never from ``target_modules`` (ms-swift writes a regex there, and short names also match the vision tower).

``attach`` swaps each targeted linear for a ``LoRALinear`` (gpt-fast style: the model file stays unaware). On the
fast path a targeted linear lives inside a fused ``PackedLinear`` (gate+up, DeltaNet's four input projections,
attention's q/k/v): the wrapper adds the low-rank products to the matching column ranges of the packed output, and
for a fused activation (silu(gate) * up, the vision tower's tanh gelu) it takes the pre-activation output and
applies the activation itself. During a forward ``Registry.activate`` says which token rows use which adapter; rows
are grouped by adapter, two small matmuls per group per linear. Rows without an adapter cost nothing, and a batch
without any adapter rows runs exactly as before. A decode step stays in the fused decode kernel with adapter rows
too: each packed wrapper keeps its adapters in the kernel's layout as well (``kernels.pack_lora``), and each
adapter has a table of them for the decoder's linears (``Registry.tables``); the kernel adds every row's low-rank
products after the packed matmuls (csrc/kernels.cpp, linear_lora). Only the head's runs here then.

``merge`` folds one adapter into the weights instead (before packing): full speed, one adapter.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import math
import re
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minicpmv.errors import InvalidInputError
from minicpmv.model import kernels
from minicpmv.model.kernels import BLOCK, PackedLinear

CONFIG_FILE = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
KEY_PREFIX = "base_model.model."
KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")
VISION_PREFIXES = ("model.vision_tower.", "model.merger.")
# adapter_config.json fields naming LoRA variants we do not run (value that means "off" beside each).
UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "use_qalora": False,
               "layer_replication": None, "bias": "none", "modules_to_save": None, "trainable_token_indices": None,
               "alora_invocation_tokens": None, "arrow_config": None, "kasa_config": None, "monteclora_config": None,
               "velora_config": None, "use_bdlora": None, "target_parameters": None}
# Initialisations that also change the base weights: the adapter then needs a base we do not have.
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")


class AdapterError(InvalidInputError):
    """A LoRA adapter cannot be read, does not fit the base model, or uses a variant we do not support."""


@dataclass
class Site:
    """Where a checkpoint linear lives in the loaded model: the module computing it and its output columns."""

    host: str  # name of the nn.Linear / PackedLinear computing it
    offset: int  # first output column (in the unfused [gate | up] layout for silu_mul)
    out_features: int
    in_features: int


@dataclass
class LoRAWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float


@dataclass
class Adapter:
    name: str
    path: Path
    rank: int
    alpha: float
    modules: dict[str, LoRAWeights]  # checkpoint module name -> weights
    key: str = ""  # unique per load: what caches and sequences refer to
    config: dict = field(default_factory=dict)

    @property
    def touches_vision(self) -> bool:
        return any(m.startswith(VISION_PREFIXES) for m in self.modules)


_uids = itertools.count(1)


# -- reading ------------------------------------------------------------------------------------------------------
def _read_config(directory: Path) -> dict:
    file = directory / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{directory} is not a PEFT adapter: {CONFIG_FILE} is missing", param="lora_path") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"cannot read {file}: {exc}", param="lora_path") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{file} must hold a JSON object", param="lora_path")
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AdapterError(f"{file}: peft_type {config.get('peft_type')!r} is not supported (only LORA)", param="lora_path")
    for name, off in UNSUPPORTED.items():
        value = config.get(name, off)
        if value not in (off, None, False, [], {}) or (name == "bias" and value != "none"):
            raise AdapterError(f"{file}: {name}={value!r} is a LoRA variant this server does not run", param="lora_path")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(BASE_CHANGING_INITS):
        raise AdapterError(f"{file}: init_lora_weights={config['init_lora_weights']!r} adapters need their modified "
                           "base weights; convert it to a plain LoRA first (PEFT path_initial_model_for_weight_conversion)",
                           param="lora_path")
    return config


def _read_tensors(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    for name in WEIGHT_FILES:
        file = directory / name
        if not file.exists():
            continue
        try:
            if name.endswith(".safetensors"):
                from safetensors.torch import load_file

                return file, load_file(str(file))
            return file, torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated file, pickle that is not plain tensors
            raise AdapterError(f"cannot read adapter weights {file}: {exc}", param="lora_path") from None
    raise AdapterError(f"{directory} has no adapter weights ({' or '.join(WEIGHT_FILES)})", param="lora_path")


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rank_pattern / alpha_pattern: a key matches a module name by its dotted suffix (or as a regex)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?(?:{key})$", module):
            return value
    return default


def sites(model: nn.Module) -> dict[str, Site]:
    """Every checkpoint linear of ``model`` (plain or packed) -> where it is computed."""
    registry = getattr(model, "lora", None)
    if registry is not None and registry.sites:
        return registry.sites
    out = {}
    # remove_duplicate=False: a tied head shared with the embedding is last seen (and hosted) as ``lm_head``
    for name, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, LoRALinear):
            continue
        host = name[: -len(".base")] if name.endswith(".base") else name
        if isinstance(module, nn.Linear):
            out[name] = Site(host, 0, module.out_features, module.in_features)
        elif isinstance(module, PackedLinear):
            offset = 0
            for part, rows in module.parts:
                out[part] = Site(host, offset, rows, module.in_features)
                offset += rows
    return out


def load_adapter(path: str | Path, model: nn.Module, name: str | None = None, max_rank: int | None = None) -> Adapter:
    """Read and check a PEFT LoRA adapter against ``model``; weights in the model's dtype on its device."""
    directory = Path(path)
    if not directory.is_dir():
        raise AdapterError(f"LoRA adapter path {str(path)!r} is not a directory", param="lora_path")
    config = _read_config(directory)
    file, tensors = _read_tensors(directory)
    targets = sites(model)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        if not key.startswith(KEY_PREFIX):
            raise AdapterError(f"{file}: tensor {key!r} is not a PEFT LoRA tensor (expected {KEY_PREFIX}...)", param="lora_path")
        match = KEY.match(key[len(KEY_PREFIX):])
        if match is None:
            kind = "DoRA (lora_magnitude_vector)" if "lora_magnitude_vector" in key else (
                "LoRA on embeddings" if "lora_embedding" in key else "a LoRA bias" if ".lora_B" in key and key.endswith(".bias")
                else "not LoRA A/B weights")
            raise AdapterError(f"{file}: tensor {key!r} is {kind}, which this server does not support", param="lora_path")
        module = match["module"]
        if module not in targets:
            raise AdapterError(f"{file}: tensor {key!r} targets {module!r}, which is not a linear layer of this model",
                               param="lora_path")
        pairs.setdefault(module, {})[match["which"]] = tensor
    if not pairs:
        raise AdapterError(f"{file} holds no LoRA tensors", param="lora_path")
    dtype, device = model.dtype, model.device
    modules, ranks = {}, set()
    for module, ab in sorted(pairs.items()):
        site = targets[module]
        for which in "AB":
            if which not in ab:
                raise AdapterError(f"{file}: {KEY_PREFIX}{module}.lora_{which}.weight is missing", param="lora_path")
        a, b = ab["A"], ab["B"]
        r = a.shape[0] if a.dim() == 2 else -1
        if a.dim() != 2 or tuple(a.shape) != (r, site.in_features):
            raise AdapterError(f"{file}: tensor {KEY_PREFIX}{module}.lora_A.weight has shape {list(a.shape)}, expected "
                               f"[r, {site.in_features}]", param="lora_path")
        if tuple(b.shape) != (site.out_features, r):
            raise AdapterError(f"{file}: tensor {KEY_PREFIX}{module}.lora_B.weight has shape {list(b.shape)}, expected "
                               f"[{site.out_features}, {r}]", param="lora_path")
        if max_rank is not None and r > max_rank:
            raise AdapterError(f"{file}: tensor {KEY_PREFIX}{module}.lora_A.weight has rank {r}, above --max-lora-rank "
                               f"{max_rank}", param="lora_path")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        modules[module] = LoRAWeights(a.to(device=device, dtype=dtype).contiguous(),
                                      b.to(device=device, dtype=dtype).contiguous(), scale)
        ranks.add(r)
    return Adapter(name or directory.name, directory, max(ranks), float(config.get("lora_alpha", 8)), modules,
                   key=f"{name or directory.name}#{next(_uids)}", config=config)


# -- serving unmerged ---------------------------------------------------------------------------------------------
class LoRALinear(nn.Module):
    """``base`` (an nn.Linear or a PackedLinear, fused or not) plus the low-rank products of the active adapters."""

    def __init__(self, base: nn.Module, registry: Registry):
        super().__init__()
        self.base = base
        self.registry = registry
        packed = isinstance(base, PackedLinear)
        self.act = base.act if packed else None
        self.width = base.out_features * (2 if self.act == "silu_mul" else 1)  # unfused output columns
        self.loras: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # adapter key -> (A^T [in, R], B^T [R, width])
        self.packed: dict[str, tuple[torch.Tensor, ...]] = {}  # adapter key -> kernels.pack_lora's (decode kernel)

    def add(self, key: str, parts: list[tuple[Site, LoRAWeights]]) -> None:
        """Stack the adapter's parts: one A for all of them, one B with each part's columns (scale folded in),
        both transposed and in float32 (small bf16 matmuls are several times slower on the CPU)."""
        a = torch.cat([w.a for _, w in parts]).float()
        b = torch.zeros(self.width, a.shape[0], dtype=torch.float32, device=a.device)
        col = 0
        for site, w in parts:
            r = w.a.shape[0]
            b[site.offset : site.offset + site.out_features, col : col + r] = w.b.float() * w.scale
            col += r
        self.loras[key] = (a.t().contiguous(), b.t().contiguous())  # [in, R], [R, width]
        if isinstance(self.base, PackedLinear) and kernels.available():
            self.packed[key] = kernels.pack_lora(self.base, a, b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        groups = [(self.loras[k], rows) for k, rows in self.registry.active if k in self.loras]
        if not groups:
            return self.base(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        y = self._pre_activation(x2) if self.act else self.base(x2)
        for (a, b), rows in groups:
            xs = x2 if rows is None else x2.index_select(0, rows)
            delta = ((xs.float() @ a) @ b).to(y.dtype)
            if rows is None:
                y += delta
            else:
                y.index_add_(0, rows, delta)
        if self.act == "silu_mul":
            half = self.width // 2
            y = F.silu(y[:, :half]) * y[:, half:]
        elif self.act == "gelu_tanh":
            y = F.gelu(y, approximate="tanh")
        return y.view(*shape[:-1], -1)

    def _pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """The packed matmul without its fused activation, in the plain layout ([gate | up] for silu_mul)."""
        base = self.base
        y = None
        x = base.gather(x)  # (a GPTQ act-order weight's input order)
        if base._kernel is not None and x.dtype == torch.bfloat16 and x.shape[-1] == base.k_pad:
            desc = kernels.LinearDesc.from_buffer_copy(base.desc)
            desc.act, desc.n_out = kernels.ACTS[None], base.n_rows
            x = x.contiguous()
            y = torch.empty(x.shape[0], base.n_rows, dtype=x.dtype)
            base._kernel(ctypes.byref(desc), x.data_ptr(), x.shape[0], x.stride(0), y.data_ptr(), base.n_rows, False)
        else:
            bias = None if base.bias is None else base.bias.to(x.dtype)
            y = F.linear(x, base.dequantized(x.dtype), bias)
        if self.act == "silu_mul":  # interleaved blocks of 32 gate rows then 32 up rows -> [gate | up]
            half = self.width // 2
            y = y.view(x.shape[0], -1, 2, BLOCK // 2).transpose(1, 2).reshape(x.shape[0], 2, -1)[:, :, :half]
            y = y.reshape(x.shape[0], -1)
        return y


class Registry:
    """The adapters loaded into one model, and which rows of the current forward use which."""

    def __init__(self, model: nn.Module, max_loras: int = 8, max_rank: int = 64):
        self.model = model
        self.max_loras, self.max_rank = max_loras, max_rank
        self.sites = sites(model)
        self.adapters: dict[str, Adapter] = {}  # name -> adapter
        self.tables: dict[str, ctypes.Array] = {}  # adapter key -> its sites on the fused decoder's linears
        self.active: list[tuple[str, torch.Tensor | None]] = []  # (adapter key, token rows or None = all)
        self.lock = threading.RLock()  # loading and unloading vs. a forward on the engine thread

    def names(self) -> list[str]:
        return list(self.adapters)

    def key(self, name: str | None) -> str | None:
        """The key a request for adapter ``name`` runs with (None: the base model)."""
        if name is None:
            return None
        adapter = self.adapters.get(name)
        if adapter is None:
            known = ", ".join(self.adapters) or "none loaded"
            raise InvalidInputError(f"LoRA adapter {name!r} is not loaded ({known})", param="lora")
        return adapter.key

    def get(self, key: str | None) -> Adapter | None:
        return next((a for a in self.adapters.values() if a.key == key), None) if key else None

    def load(self, name: str, path: str | Path) -> Adapter:
        if not isinstance(name, str) or not name or name in self.adapters:
            raise AdapterError(f"a LoRA adapter named {name!r} is already loaded" if name in self.adapters
                               else f"a LoRA adapter needs a non-empty name, got {name!r}", param="lora_name")
        if len(self.adapters) >= self.max_loras:
            raise AdapterError(f"{len(self.adapters)} LoRA adapters are loaded, the most --max-loras allows; "
                               "unload one first", param="lora_name")
        adapter = load_adapter(path, self.model, name, self.max_rank)
        self.add(adapter)
        return adapter

    def add(self, adapter: Adapter) -> None:
        by_host: dict[str, list[tuple[Site, LoRAWeights]]] = {}
        for module, weights in adapter.modules.items():
            site = self.sites[module]
            by_host.setdefault(site.host, []).append((site, weights))
        with self.lock:
            for host, parts in by_host.items():
                self._wrapper(host).add(adapter.key, parts)
            self.adapters[adapter.name] = adapter
            table = self._decode_table(adapter.key)
            if table is not None:
                self.tables[adapter.key] = table

    def unload(self, name: str) -> Adapter:
        """Remove an adapter: new requests cannot pick it; requests still running with it end with an error."""
        with self.lock:
            adapter = self.adapters.pop(name, None)
            if adapter is None:
                raise AdapterError(f"LoRA adapter {name!r} is not loaded", param="lora_name")
            for module in self.model.modules():
                if isinstance(module, LoRALinear):
                    module.loras.pop(adapter.key, None)
                    module.packed.pop(adapter.key, None)
            self.tables.pop(adapter.key, None)
        return adapter

    def _decode_table(self, key: str) -> ctypes.Array | None:
        """Adapter ``key``'s sites on the fused decoder's linears, in its order ([layer][proj, out, gate_up, down]);
        None without a fused decoder."""
        lm = self.model.model.language_model
        if lm.fused_decode is None:
            return None
        sites = []
        for layer in lm.layers:
            mixer = layer.linear_attn if layer.layer_type == "linear_attention" else layer.self_attn
            out = mixer.out_proj if layer.layer_type == "linear_attention" else mixer.o_proj
            for module in (mixer.fused_proj.linear, out, layer.mlp.gate_up, layer.mlp.down_proj):
                packed = module.packed.get(key) if isinstance(module, LoRALinear) else None
                if isinstance(module, LoRALinear) and key in module.loras and packed is None:
                    return None  # (no kernel form: the layers then run one by one)
                sites.append(kernels.lora_site(packed))
        return (kernels.LoraSiteDesc * len(sites))(*sites)

    def _wrapper(self, host: str) -> LoRALinear:
        parent_name, _, attr = host.rpartition(".")
        parent = self.model.get_submodule(parent_name) if parent_name else self.model
        module = getattr(parent, attr)
        if not isinstance(module, LoRALinear):
            module = LoRALinear(module, self)
            setattr(parent, attr, module)
        return module

    @contextmanager
    def activate(self, keys: list[str | None], lengths: list[int]):
        """During the block, token rows of sequence i (``lengths[i]`` tokens, back to back) use adapter ``keys[i]``."""
        with self.lock:
            for key in set(keys) - {None}:
                if self.get(key) is None:
                    raise InvalidInputError(f"LoRA adapter {key.rpartition('#')[0]!r} was unloaded", param="lora")
            groups: dict[str, list[int]] = {}
            start = 0
            for key, n in zip(keys, lengths):
                if key is not None:
                    groups.setdefault(key, []).extend(range(start, start + n))
                start += n
            device = self.model.device
            self.active = [(k, None if len(rows) == start else torch.tensor(rows, device=device))
                           for k, rows in groups.items()]
            lm = self.model.model.language_model
            fused = lm.fused_decode
            if self.active and fused is not None:
                if all(k in self.tables for k, _ in self.active) and max(lengths) == 1:  # a decode step: one row each
                    slot = {k: i for i, (k, _) in enumerate(self.active)}
                    tables = [ctypes.addressof(self.tables[k]) for k in slot]
                    fused.lora = (len(tables), (ctypes.c_void_p * len(tables))(*tables),
                                  (ctypes.c_int32 * len(keys))(*[slot.get(k, -1) for k in keys]))
                else:
                    lm.fused_decode = None
            try:
                yield
            finally:
                self.active = []
                if fused is not None:
                    fused.lora = None
                lm.fused_decode = fused


def registry(model: nn.Module, max_loras: int = 8, max_rank: int = 64) -> Registry:
    """The model's adapter registry (made on first use)."""
    reg = getattr(model, "lora", None)
    if reg is None:
        reg = model.lora = Registry(model, max_loras, max_rank)
    return reg


# -- merging ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def merge(model: nn.Module, adapter: Adapter) -> None:
    """W += scale * B @ A for every module of ``adapter``; ``model`` must not be packed yet (plain nn.Linear)."""
    modules = dict(model.named_modules())
    for name, w in adapter.modules.items():
        linear = modules.get(name)
        if name == "lm_head" and model.cfg.tie_word_embeddings:
            raise AdapterError("cannot merge a LoRA on lm_head into tied embeddings; serve the adapter unmerged")
        if not isinstance(linear, nn.Linear):
            raise AdapterError(f"cannot merge into {name!r}: it is not a plain linear layer (merge before packing)")
        delta = (w.b.float() @ w.a.float()) * w.scale
        linear.weight.data = (linear.weight.data.float() + delta).to(linear.weight.dtype)  # new memory, not the mmap


def load_merged(directory, adapter_path, dtype, device, progress=None, quantization=None) -> nn.Module:
    """Load the checkpoint with one adapter folded into its weights, then pack it (``checkpoint.load_model``)."""
    from minicpmv.checkpoint import load_model
    from minicpmv.model import fast

    model = load_model(directory, dtype=dtype, device=device, progress=progress, optimize=False)
    if getattr(model, "quantization", None) or model.cfg.quantization:
        raise AdapterError("--merge-lora needs an unquantized checkpoint (quantize at load time instead)")
    merge(model, load_adapter(adapter_path, model))
    return fast.optimize(model, quantization)
