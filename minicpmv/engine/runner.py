"""Turns a scheduled batch into one model forward: token ids, visual features for the placeholders in it, logits.

Visual inputs are encoded lazily, only when a chunk reaches their placeholders, and looked up in the vision
cache first; inputs already absorbed by a reused prefix state are never encoded.
"""

from __future__ import annotations

import time
from contextlib import nullcontext

import torch

from minicpmv.engine.cache import VisionCache
from minicpmv.engine.sequence import Sequence, VisualInput
from minicpmv.model.minicpmv import MiniCPMV
from minicpmv.model.state import Snapshots


class Runner:
    def __init__(self, model: MiniCPMV, vision_cache: VisionCache):
        self.model = model
        self.vision_cache = vision_cache
        self.token_ids = {"image": model.cfg.image_token_id, "video": model.cfg.video_token_id}
        self.encode_seconds = 0.0
        self.encoded = 0

    def features(self, seq: Sequence, visual: VisualInput) -> torch.Tensor:
        """The visual's features: pinned on the sequence while it prefills, shared through the vision cache."""
        if visual.key in seq.features:
            return seq.features[visual.key]
        lora = self._vision_lora(seq)
        key = visual.key if lora is None else f"{visual.key}|{seq.lora}"  # an adapter on the vision side changes them
        cached = self.vision_cache.get(key)
        if cached is not None:
            seq.features[visual.key] = cached
            return cached
        start = time.perf_counter()
        with lora.activate([seq.lora], [visual.pixel_values.shape[0]]) if lora else nullcontext():
            out = self.model.encode_images(visual.pixel_values, visual.target_sizes, visual.downsample_mode)
        self.encode_seconds += time.perf_counter() - start
        self.encoded += 1
        if out.shape[0] != visual.num_tokens:
            raise RuntimeError(f"encoder returned {out.shape[0]} features for {visual.num_tokens} placeholders")
        self.vision_cache.put(key, out)
        seq.features[visual.key] = out
        return out

    def _vision_lora(self, seq: Sequence):
        """The model's adapter registry when ``seq`` runs with an adapter that touches the vision side."""
        registry = getattr(self.model, "lora", None)
        adapter = registry.get(seq.lora) if registry is not None and seq.lora else None
        return registry if adapter is not None and adapter.touches_vision else None

    def _span_features(self, seq: Sequence, kind: str, ids: torch.Tensor, start: int, n: int):
        """Features for the ``kind`` placeholders among tokens [start, start + n) of ``seq``."""
        token = self.token_ids[kind]
        if token is None:
            return None
        before = int((ids[:start] == token).sum())
        inside = int((ids[start : start + n] == token).sum())
        if not inside:
            return None
        parts, offset = [], 0
        for visual in (v for v in seq.visuals if v.kind == kind):
            lo, hi = max(before, offset), min(before + inside, offset + visual.num_tokens)
            if lo < hi:
                parts.append(self.features(seq, visual)[lo - offset : hi - offset])
            offset += visual.num_tokens
        return torch.cat(parts)

    def run(self, batch: list[tuple[Sequence, int]], snapshots: Snapshots | None = None,
            all_logits: bool = False) -> torch.Tensor:
        """Feed each sequence its next ``n`` tokens; return logits of each sequence's last fed token [B, vocab], or
        with ``all_logits`` of every fed token [sum(n), vocab] (and fill ``snapshots``, states kept from partway
        through a chunk)."""
        ids, images, videos = [], [], []
        for seq, n in batch:
            start = seq.num_computed
            if not seq.prefilling:  # decoding: the last sampled token(s) (the engine never samples placeholders)
                ids.append(torch.tensor(seq.output_ids[start - seq.num_prompt :][:n]))
                continue
            prompt = torch.tensor(seq.prompt_ids)
            ids.append(prompt[start : start + n])
            for kind, out in (("image", images), ("video", videos)):
                f = self._span_features(seq, kind, prompt, start, n)
                if f is not None:
                    out.append(f)
        registry = getattr(self.model, "lora", None)
        loras = [seq.lora for seq, _ in batch]
        lengths = [n for _, n in batch]
        with registry.activate(loras, lengths) if registry is not None and any(loras) else nullcontext():
            return self.model(
                torch.cat(ids),
                [seq.state for seq, _ in batch],
                lengths=lengths,
                image_features=torch.cat(images) if images else None,
                video_features=torch.cat(videos) if videos else None,
                snapshots=snapshots,
                all_logits=all_logits,
            )
