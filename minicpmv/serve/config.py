"""What the server was started with (besides the model)."""

from __future__ import annotations

from dataclasses import dataclass, field

from minicpmv.serve.media import MediaPolicy


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_body_bytes: int = 100 << 20
    media: MediaPolicy = field(default_factory=MediaPolicy)
    enable_test_hooks: bool = False
    enable_lora_loading: bool = False  # POST /v1/load_lora_adapter, /v1/unload_lora_adapter
    default_max_tokens: int | None = None  # for requests that omit max_tokens (None: the rest of the context)
