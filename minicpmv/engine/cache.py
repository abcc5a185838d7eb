"""Byte-bounded LRU caches: visual features by content, and hybrid states by token prefix.

A DeltaNet state cannot be rewound, so the prefix cache keeps whole snapshots taken at exact token boundaries
(the start of the final assistant turn of each prompt: where the next turn of the same chat diverges).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

import torch

from minicpmv.model.state import HybridState


class _LRU:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self.bytes = 0
        self.hits = 0
        self.misses = 0

    def _get(self, key: str):
        entry = self.entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return entry[0]

    def _put(self, key: str, value, size: int) -> None:
        if size > self.max_bytes:
            return
        if key in self.entries:
            self.bytes -= self.entries.pop(key)[1]
        self.entries[key] = (value, size)
        self.bytes += size
        while self.bytes > self.max_bytes:
            _, (_, freed) = self.entries.popitem(last=False)
            self.bytes -= freed

    def clear(self) -> None:
        self.entries.clear()
        self.bytes = 0

    def __len__(self) -> int:
        return len(self.entries)


class VisionCache(_LRU):
    """Merged visual features keyed by image content hash + processing settings."""

    def get(self, key: str) -> torch.Tensor | None:
        return self._get(key)

    def put(self, key: str, features: torch.Tensor) -> None:
        self._put(key, features, features.numel() * features.element_size())


def prefix_key(ids: list[int], visual_keys: list[str]) -> str:
    """Identity of a prefix: its token ids and the content of the images behind its placeholder tokens."""
    h = hashlib.blake2b(array("q", ids).tobytes(), digest_size=16)
    for k in visual_keys:
        h.update(k.encode())
    return h.hexdigest()


@dataclass
class PrefixHit:
    length: int
    state: HybridState


class PrefixCache(_LRU):
    def put(self, key: str, state: HybridState) -> None:
        snapshot = state.clone()
        self._put(key, snapshot, snapshot.nbytes())

    def get(self, key: str, length: int) -> PrefixHit | None:
        state = self._get(key)
        if state is None:
            return None
        return PrefixHit(length, state.clone())  # the caller advances its copy; the snapshot stays reusable
