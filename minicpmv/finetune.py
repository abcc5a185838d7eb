"""``minicpmv finetune MODEL DATA OUTPUT_DIR``: LoRA supervised fine-tuning on a JSONL of conversations.

Every assistant message is one training example: its history is turned into prompt ids by ``LLM.prepare``, the
very code the server runs (same template, downsample mode, slicing, thinking prefix), and the loss covers only
the answer's tokens and the ``<|im_end|>`` that ends it. Examples run as ragged batches (sequences back to back,
no padding) through our own model with trainable LoRA factors beside the frozen linears; each decoder layer is
recomputed in the backward pass (gradient checkpointing) unless turned off. The result is a PEFT-format adapter
(``adapter_config.json`` + ``adapter_model.safetensors``) that transformers + peft and our server load.

A run saves ``OUTPUT_DIR/checkpoint`` (adapter, optimizer, position in the data) every ``save_steps`` optimizer
steps and at each epoch's end; ``resume=True`` continues from it.
"""

from __future__ import annotations

import base64
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

from minicpmv.errors import InvalidInputError
from minicpmv.model.lora import KEY_PREFIX, VISION_PREFIXES
from minicpmv.model.state import HybridState

IM_END = 248046
LM_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "in_proj_qkv", "in_proj_z", "in_proj_a", "in_proj_b", "out_proj",
              "gate_proj", "up_proj", "down_proj")
VISION_LINEARS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2", "linear_1", "linear_2")
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
         "tool": "tool", "function": "tool", "observation": "tool"}


@dataclass
class FinetuneConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["all"])  # short linear names, or "all"
    freeze_vision: bool = False  # True: LoRA on the language model only
    epochs: int = 1
    lr: float = 1e-4
    batch_size: int = 1
    grad_accum: int = 1
    max_length: int = 4096
    warmup_ratio: float = 0.0
    lr_scheduler: str = "cosine"  # or "constant" (after the warmup)
    weight_decay: float = 0.0
    seed: int = 0
    gradient_checkpointing: bool = True
    save_steps: int = 0  # 0: at each epoch's end only
    enable_thinking: bool = False
    downsample_mode: str | None = None
    max_slice_nums: int | None = None

    def __post_init__(self) -> None:
        for name, low in (("rank", 1), ("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("max_length", 2)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}", param=name)
        if not 0 <= self.dropout < 1:
            raise InvalidInputError(f"dropout must be in [0, 1), got {self.dropout!r}", param="dropout")
        if self.lr_scheduler not in ("cosine", "constant"):
            raise InvalidInputError(f"lr_scheduler must be cosine or constant, got {self.lr_scheduler!r}", param="lr_scheduler")
        if not self.lr > 0:
            raise InvalidInputError(f"lr must be > 0, got {self.lr!r}", param="lr")
        known = set(LM_LINEARS) | set(VISION_LINEARS) | {"all", "lm_head"}
        unknown = sorted(set(self.targets) - known)
        if unknown or not self.targets:
            raise InvalidInputError(f"unknown --target {unknown or self.targets}; known: {sorted(known)}", param="target")


# -- data ---------------------------------------------------------------------------------------------------------
def _media(kind: str, source, base: Path):
    """A media reference from the data file -> what the processor reads (a path or bytes)."""
    if not isinstance(source, str):
        raise InvalidInputError(f"a {kind} must be a path or a data URI, got {type(source).__name__}")
    if source.startswith("data:"):
        return base64.b64decode(source.partition(",")[2])
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif re.match(r"^[a-z]+://", source):
        raise InvalidInputError(f"{kind} {source!r}: fine-tuning reads local files and data URIs only")
    path = Path(source)
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise InvalidInputError(f"{kind} file {str(path)!r} does not exist")
    return str(path)


def _parts(content, images: list, videos: list, base: Path) -> str | list[dict]:
    """Message content with ``<image>`` / ``<video>`` tags (ShareGPT / LLaMA-Factory) or OpenAI parts -> parts."""
    if isinstance(content, list):
        out = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image", "video"):
                out.append({"type": kind, kind: _media(kind, part.get(kind), base)})
            elif kind in ("image_url", "video_url"):
                media = kind[:-4]
                url = part.get(kind)
                out.append({"type": media, media: _media(media, url.get("url") if isinstance(url, dict) else url, base)})
            elif kind == "text":
                out.append({"type": "text", "text": part.get("text", "")})
            else:
                raise InvalidInputError(f"unknown content part {part!r}")
        return out
    if not isinstance(content, str):
        raise InvalidInputError(f"message content must be text or a list of parts, got {type(content).__name__}")
    if "<image>" not in content and "<video>" not in content:
        return content
    out = []
    for piece in re.split(r"(<image>|<video>)", content):
        if piece in ("<image>", "<video>"):
            queue, kind = (images, "image") if piece == "<image>" else (videos, "video")
            if not queue:
                raise InvalidInputError(f"more {piece} tags than {kind}s")
            out.append({"type": kind, kind: _media(kind, queue.pop(0), base)})
        elif piece.strip("\n"):
            out.append({"type": "text", "text": piece.strip("\n")})
    return out


def read_conversations(path: str | Path) -> list[list[dict]]:
    """A JSONL file -> conversations as OpenAI messages: {"messages": [...]} (OpenAI parts, or text with <image>
    tags plus "images" / "videos" lists) or ShareGPT {"conversations": [{"from", "value"}], "images": [...]}."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc}") from None
    conversations = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            raw = row.get("messages", row.get("conversations")) if isinstance(row, dict) else None
            if not isinstance(raw, list) or not raw:
                raise InvalidInputError('each line needs a non-empty "messages" or "conversations" list')
            images, videos = list(row.get("images") or []), list(row.get("videos") or [])
            messages = []
            for m in raw:
                role = ROLES.get(m.get("role", m.get("from")))
                if role is None:
                    raise InvalidInputError(f"unknown role {m.get('role', m.get('from'))!r}")
                messages.append({"role": role, "content": _parts(m.get("content", m.get("value")), images, videos, path.parent)})
            if images or videos:
                raise InvalidInputError(f"{len(images)} images and {len(videos)} videos have no <image> / <video> tag")
            if not any(m["role"] == "assistant" for m in messages):
                raise InvalidInputError("the conversation has no assistant message to learn")
        except (ValueError, AttributeError) as exc:
            raise InvalidInputError(f"{path}:{number}: {exc}") from None
        conversations.append(messages)
    if not conversations:
        raise InvalidInputError(f"{path} holds no conversations")
    return conversations


def _text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(p["text"] for p in content if p.get("type") == "text")


@dataclass
class Example:
    history: list[dict]  # the messages before the answer
    answer: str


def examples(conversations: list[list[dict]]) -> list[Example]:
    return [Example(conv[:i], _text(m["content"])) for conv in conversations for i, m in enumerate(conv)
            if m["role"] == "assistant" and i > 0]


# -- LoRA factors to train ----------------------------------------------------------------------------------------
class TrainableLoRA(nn.Module):
    """y = base(x) + scale * dropout(x) A^T B^T, with A [r, in] and B [out, r] trained (float32), base frozen."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default: B = 0, so training starts at the base
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (self.dropout(x).float() @ self.lora_A.t()) @ self.lora_B.t()
        return self.base(x) + (delta * self.scale).to(x.dtype)


def add_lora(model: nn.Module, cfg: FinetuneConfig) -> dict[str, TrainableLoRA]:
    """Freeze the model and wrap every targeted linear; returns module name -> wrapper."""
    for p in model.parameters():
        p.requires_grad_(False)
    wanted = set(LM_LINEARS if "all" in cfg.targets else ()) | set(cfg.targets)
    vision_wanted = set(VISION_LINEARS if "all" in cfg.targets else ()) | set(cfg.targets)
    chosen = {}
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or (name == "lm_head" and "lm_head" not in cfg.targets):
            continue
        short = name.rsplit(".", 1)[-1]
        vision = name.startswith(VISION_PREFIXES)
        if (vision and not cfg.freeze_vision and short in vision_wanted) or name == "lm_head" or (
            name.startswith("model.language_model.") and short in wanted):
            chosen[name] = module
    if not chosen:
        raise InvalidInputError(f"--target {cfg.targets} matches no linear layer of this model", param="target")
    wrappers = {}
    for name, module in chosen.items():
        parent, _, attr = name.rpartition(".")
        wrappers[name] = TrainableLoRA(module, cfg.rank, cfg.alpha, cfg.dropout)
        setattr(model.get_submodule(parent), attr, wrappers[name])
    return wrappers


def save_adapter(directory: Path, wrappers: dict[str, TrainableLoRA], cfg: FinetuneConfig, base_model: str) -> None:
    """The PEFT format: adapter_config.json + adapter_model.safetensors (keys base_model.model.<module>.lora_X.weight)."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, w in wrappers.items():
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = w.lora_A.detach().float().cpu().contiguous()
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = w.lora_B.detach().float().cpu().contiguous()
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model, "r": cfg.rank,
        "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout, "target_modules": sorted(wrappers), "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    tmp = directory / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    tmp.replace(directory / "adapter_model.safetensors")
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2))


# -- the forward with gradients -----------------------------------------------------------------------------------
def _layer(lm, layer, slot: int, hidden, lengths, cos, sin):
    """One decoder layer over fresh states (a pure function of ``hidden``: safe to recompute)."""
    states = [HybridState.empty(lm.cfg, hidden.dtype, hidden.device, capacity=n) for n in lengths]
    h = layer.input_layernorm(hidden)
    if layer.layer_type == "linear_attention":
        h = layer.linear_attn(h, lengths, [s.conv[slot] for s in states], [s.recurrent[slot] for s in states])
    else:
        h = layer.self_attn(h, lm.rotary, cos, sin, lengths, states, slot)
    hidden = hidden + h
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


def _features(model, visuals, kind: str, train_vision: bool):
    parts = []
    for v in (v for v in visuals if v.kind == kind):
        if not train_vision:
            parts.append(model.encode_images(v.pixel_values, v.target_sizes, v.downsample_mode).clone())
            continue
        grids = [(int(h), int(w)) for h, w in v.target_sizes.tolist()]
        x, merged = model.model.vision_tower(v.pixel_values.to(model.device), grids, v.downsample_mode == "16x")
        parts.append(model.model.merger(x, merged).to(model.dtype))
    return torch.cat(parts) if parts else None


def batch_loss(model, batch: list[tuple[list[int], list[int], list]], train_vision: bool, checkpointing: bool):
    """(sum of cross-entropy over the answer tokens, their count, tokens run) for [(prompt ids, answer ids, visuals)]."""
    ids, lengths, positions, targets, visuals = [], [], [], [], []
    offset = 0
    for prompt, answer, vis in batch:
        full = prompt + answer
        ids += full[:-1]
        lengths.append(len(full) - 1)
        positions += range(offset + len(prompt) - 1, offset + len(full) - 1)
        targets += answer
        visuals += vis
        offset += len(full) - 1
    device = model.device
    input_ids = torch.tensor(ids, device=device)
    hidden = model.embed(input_ids, _features(model, visuals, "image", train_vision), _features(model, visuals, "video", train_vision))
    lm = model.model.language_model
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    cos, sin = lm.rotary.cos_sin(pos, hidden.dtype)
    for layer, slot in zip(lm.layers, lm.slot):
        if checkpointing and torch.is_grad_enabled():
            hidden = checkpoint(_layer, lm, layer, slot, hidden, lengths, cos, sin, use_reentrant=False)
        else:
            hidden = _layer(lm, layer, slot, hidden, lengths, cos, sin)
    hidden = lm.norm(hidden[torch.tensor(positions, device=device)])
    logits = model.lm_head(hidden).float()
    loss = F.cross_entropy(logits, torch.tensor(targets, device=device), reduction="sum")
    return loss, len(targets), len(ids)


# -- the loop -----------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, llm, cfg: FinetuneConfig, output_dir: str | Path, progress: bool | None = None):
        self.llm, self.cfg, self.output = llm, cfg, Path(output_dir)
        self.model = llm.model
        from minicpmv.model.kernels import PackedLinear

        if any(isinstance(m, PackedLinear) for m in self.model.modules()):
            raise InvalidInputError("fine-tuning needs an unpacked model (dtype float32 on the CPU, or a GPU)")
        torch.manual_seed(cfg.seed)  # the factors' initial values
        self.wrappers = add_lora(self.model, cfg)
        self.train_vision = any(n.startswith(VISION_PREFIXES) for n in self.wrappers)
        self.params = [p for w in self.wrappers.values() for p in (w.lora_A, w.lora_B)]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.progress = progress
        self.options = llm._conversations([{"role": "user", "content": ""}], {
            k: v for k, v in {"enable_thinking": cfg.enable_thinking, "downsample_mode": cfg.downsample_mode,
                              "max_slice_nums": cfg.max_slice_nums}.items() if v is not None})[0][1]
        self.step, self.epoch, self.position = 0, 0, 0  # optimizer steps; epoch; examples done in this epoch
        self.log: list[dict] = []

    def encode(self, example: Example) -> tuple[list[int], list[int], list]:
        """Prompt ids and visuals exactly as the server builds them, and the answer's ids + <|im_end|>."""
        seq = self.llm.prepare(example.history, None, self.options)
        return seq.prompt_ids, self.llm.processor.tokenizer.encode(example.answer) + [IM_END], seq.visuals

    def _schedule(self, total_steps: int):
        warmup = int(total_steps * self.cfg.warmup_ratio)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            if self.cfg.lr_scheduler == "constant":
                return 1.0
            return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))
        return factor

    def evaluate(self, data: list[Example]) -> float:
        self.model.eval()
        total, count = 0.0, 0
        with torch.no_grad():
            for i in range(0, len(data), self.cfg.batch_size):
                loss, n, _ = batch_loss(self.model, [self.encode(e) for e in data[i : i + self.cfg.batch_size]],
                                        self.train_vision, False)
                total, count = total + loss.item(), count + n
        return total / max(count, 1)

    def train(self, data: list[Example], eval_data: list[Example] | None = None, resume: bool = False,
              max_steps: int | None = None) -> list[dict]:
        """Train (from the saved checkpoint with ``resume``); ``max_steps`` stops early, resumable from there."""
        cfg = self.cfg
        if resume:
            self._load_checkpoint()
        per_epoch = math.ceil(len(data) / cfg.batch_size)
        steps_per_epoch = math.ceil(per_epoch / cfg.grad_accum)
        total_steps = steps_per_epoch * cfg.epochs
        factor = self._schedule(total_steps)
        hide = None if self.progress is None else not self.progress
        bar = tqdm(total=total_steps, initial=self.step, desc="fine-tuning", unit="step", disable=hide)
        torch.manual_seed(cfg.seed + self.step)
        try:
            while self.epoch < cfg.epochs:
                order = list(range(len(data)))
                random.Random(cfg.seed + self.epoch).shuffle(order)  # the same order when resumed
                batches = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
                done = self.position // cfg.batch_size
                self.model.train()
                for start in range(done, len(batches), cfg.grad_accum):
                    group = batches[start : start + cfg.grad_accum]
                    encoded = [[self.encode(data[i]) for i in b] for b in group]
                    encoded = [[e for e in b if len(e[0]) + len(e[1]) <= cfg.max_length] for b in encoded]
                    n_targets = sum(len(e[1]) for b in encoded for e in b)
                    began, tokens, loss_sum = time.perf_counter(), 0, 0.0
                    for b in encoded:
                        if not b:
                            continue
                        loss, _, ran = batch_loss(self.model, b, self.train_vision, cfg.gradient_checkpointing)
                        (loss / max(n_targets, 1)).backward()
                        tokens, loss_sum = tokens + ran, loss_sum + loss.item()
                    for g in self.optimizer.param_groups:
                        g["lr"] = cfg.lr * factor(self.step)
                    torch.nn.utils.clip_grad_norm_(self.params, 1.0)
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self.step += 1
                    self.position = min(len(order), (start + len(group)) * cfg.batch_size)
                    rate = tokens / max(time.perf_counter() - began, 1e-9)
                    entry = {"step": self.step, "epoch": self.epoch, "loss": loss_sum / max(n_targets, 1),
                             "tokens_per_second": rate}
                    self.log.append(entry)
                    bar.set_postfix(loss=f"{entry['loss']:.4f}", tok_s=f"{rate:.0f}")
                    bar.update(1)
                    if cfg.save_steps and self.step % cfg.save_steps == 0:
                        self._save_checkpoint()
                    if max_steps is not None and self.step >= max_steps:
                        break
                else:
                    self.epoch, self.position = self.epoch + 1, 0
                if self.position:  # stopped by max_steps
                    self._save_checkpoint()
                    break
                if eval_data:
                    entry = {"epoch": self.epoch, "eval_loss": self.evaluate(eval_data)}
                    self.log.append(entry)
                    bar.write(f"epoch {self.epoch}: eval loss {entry['eval_loss']:.4f}")
                self._save_checkpoint()
                if max_steps is not None and self.step >= max_steps:
                    break
        finally:
            bar.close()
        save_adapter(self.output, self.wrappers, cfg, self.llm.name)
        with open(self.output / "trainer_log.jsonl", "a") as f:
            for entry in self.log:
                f.write(json.dumps(entry) + "\n")
        return self.log

    # -- resuming ---------------------------------------------------------------------------------------------
    def _save_checkpoint(self) -> None:
        directory = self.output / "checkpoint"
        save_adapter(directory, self.wrappers, self.cfg, self.llm.name)
        state = {"step": self.step, "epoch": self.epoch, "position": self.position, "config": asdict(self.cfg),
                 "optimizer": self.optimizer.state_dict()}
        torch.save(state, directory / "trainer_state.pt.tmp")
        (directory / "trainer_state.pt.tmp").replace(directory / "trainer_state.pt")

    def _load_checkpoint(self) -> None:
        from safetensors.torch import load_file

        directory = self.output / "checkpoint"
        if not (directory / "trainer_state.pt").exists():
            return  # nothing saved yet: a fresh start
        state = torch.load(directory / "trainer_state.pt", weights_only=True)
        tensors = load_file(str(directory / "adapter_model.safetensors"))
        with torch.no_grad():
            for name, w in self.wrappers.items():
                for which in ("A", "B"):
                    key = f"{KEY_PREFIX}{name}.lora_{which}.weight"
                    if key not in tensors or tensors[key].shape != getattr(w, f"lora_{which}").shape:
                        raise InvalidInputError(f"{directory} was saved with other LoRA settings ({key}); "
                                                "resume with the same --rank and --target")
                    getattr(w, f"lora_{which}").copy_(tensors[key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.epoch, self.position = state["step"], state["epoch"], state["position"]


def finetune(model: str | Path, data: str | Path, output_dir: str | Path, cfg: FinetuneConfig | None = None,
             eval_data: str | Path | None = None, resume: bool = False, device: str = "auto", dtype: str | None = None,
             progress: bool | None = None) -> list[dict]:
    """Fine-tune ``model`` on the conversations in ``data``; writes the adapter to ``output_dir``."""
    from minicpmv.llm import LLM, _device

    cfg = cfg or FinetuneConfig()
    train = examples(read_conversations(data))
    held_out = examples(read_conversations(eval_data)) if eval_data else None
    dev = _device(device)
    dtype = dtype or ("bfloat16" if dev.type == "cuda" else "float32")
    if dev.type == "cpu" and dtype != "float32":
        raise InvalidInputError("fine-tuning on the CPU runs in float32 (--dtype float32)", param="dtype")
    llm = LLM(model, dtype=dtype, device=str(dev), progress=progress)
    return Trainer(llm, cfg, output_dir, progress).train(train, held_out, resume)
