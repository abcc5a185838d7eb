"""MiniCPM-V 4.6: vision tower -> merger -> visual embeddings scattered into the token embeddings -> Qwen3.5 LM.

Module names mirror the checkpoint (``model.vision_tower``, ``model.merger``, ``model.language_model``,
``lm_head``) so its state dict loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from minicpmv.config import DOWNSAMPLE_MODES, ModelConfig
from minicpmv.errors import InvalidInputError
from minicpmv.model.language import LanguageModel
from minicpmv.model.merger import Merger
from minicpmv.model.state import HybridState, Snapshots
from minicpmv.model.vision import VisionTower


class _Core(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.vision_tower = VisionTower(cfg.vision)
        self.language_model = LanguageModel(cfg.text)
        self.merger = Merger(cfg)


class MiniCPMV(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.model = _Core(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    @property
    def dtype(self) -> torch.dtype:  # read from a norm: the head's weight may be packed or quantized (model/fast.py)
        return self.model.language_model.norm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.language_model.norm.weight.device

    def new_state(self, capacity: int = 256) -> HybridState:
        return HybridState.empty(self.cfg.text, self.dtype, self.device, capacity)

    UNIT_GROUP_PATCHES = 2048  # two 448x448 slices: measured fastest of 1024 / 2048 / 4096 / all at once

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, target_sizes, downsample_mode: str = "16x") -> torch.Tensor:
        """Visual embeddings for units packed as [sum(h*w), 3*p*p] with patch grids ``target_sizes`` [(h, w)].

        Returns [tokens, text_hidden]: h*w/16 tokens per unit in 16x mode, h*w/4 in 4x (with ``merger_times`` 1).
        """
        if downsample_mode not in DOWNSAMPLE_MODES:
            raise InvalidInputError(f"downsample_mode must be one of {DOWNSAMPLE_MODES}, got {downsample_mode!r}")
        grids = [(int(h), int(w)) for h, w in torch.as_tensor(target_sizes).tolist()]
        if pixel_values.shape[0] != sum(h * w for h, w in grids):
            raise InvalidInputError(
                f"pixel_values hold {pixel_values.shape[0]} patches but target_sizes describe "
                f"{sum(h * w for h, w in grids)}"
            )
        # Units never attend to each other, so they go through in groups of about UNIT_GROUP_PATCHES: activations
        # stay in cache, and their memory is bounded by the group, not by the number of slices or video frames.
        groups, size = [], 0
        for h, w in grids:
            if not groups or size and size + h * w > self.UNIT_GROUP_PATCHES:
                groups.append([])
                size = 0
            groups[-1].append((h, w))
            size += h * w
        features, start = [], 0
        for group in groups:
            n = sum(h * w for h, w in group)
            patches = pixel_values[start : start + n].to(self.device)
            x, merged = self.model.vision_tower(patches, group, downsample_mode == "16x")
            features.append(self.model.merger(x, merged))
            start += n
        return torch.cat(features).to(self.dtype)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with visual features written over the image / video placeholder tokens, in order."""
        embeds = self.model.language_model.embed_tokens(input_ids)
        for token_id, features, kind in (
            (self.cfg.image_token_id, image_features, "image"),
            (self.cfg.video_token_id, video_features, "video"),
        ):
            mask = input_ids == token_id
            n_tokens = int(mask.sum()) if token_id is not None else 0
            n_features = 0 if features is None else features.shape[0]
            if n_tokens != n_features:
                raise InvalidInputError(
                    f"{kind} placeholders and features do not match: {n_tokens} tokens, {n_features} features"
                )
            if n_tokens:
                embeds[mask] = features.to(embeds.dtype)
        return embeds

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        states: list[HybridState],
        lengths: list[int] | None = None,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
        all_logits: bool = False,
        snapshots: Snapshots | None = None,
    ) -> torch.Tensor:
        """Run the tokens of ``len(states)`` sequences given back to back in ``input_ids`` [N] (``lengths`` tokens
        each; all N for one sequence) and advance their states (``snapshots``: states to keep from partway).

        Returns float32 logits of each sequence's last token [B, vocab], or of every token [N, vocab].
        """
        input_ids = input_ids.to(self.device)
        lengths = lengths or [input_ids.shape[0]]
        if sum(lengths) != input_ids.shape[0] or len(lengths) != len(states):
            raise ValueError(f"lengths {lengths} do not describe {input_ids.shape[0]} tokens of {len(states)} states")
        hidden = self.embed(input_ids, image_features, video_features)
        hidden = self.model.language_model(hidden, lengths, states, snapshots)
        if not all_logits:
            last = torch.tensor(lengths, device=hidden.device).cumsum(0) - 1
            hidden = hidden[last]
        return self.lm_head(hidden).float()

    @torch.inference_mode()
    def greedy(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        image_features: torch.Tensor | None = None,
        video_features: torch.Tensor | None = None,
        stop_ids: tuple[int, ...] = (),
    ) -> list[int]:
        """Greedy decoding of one sequence: the plainest loop, the baseline the engine is checked against."""
        state = self.new_state()
        logits = self(input_ids, [state], image_features=image_features, video_features=video_features)
        out: list[int] = []
        for _ in range(max_new_tokens):
            token = int(logits[0].argmax())
            out.append(token)
            if token in stop_ids:
                break
            logits = self(torch.tensor([token]), [state])
        return out
