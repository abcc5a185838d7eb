"""LoRA adapters over HTTP, as vLLM spells it: /v1/models cards with ``parent``, and (with --enable-lora-loading)
POST /v1/load_lora_adapter {lora_name, lora_path} and /v1/unload_lora_adapter {lora_name}."""

from __future__ import annotations

import asyncio

from fastapi import FastAPI
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from minicpmv.llm import LLM
from minicpmv.model.lora import AdapterError


class LoadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_path: str
    load_inplace: bool = False  # replace an adapter already loaded under this name


class UnloadLoRAAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    lora_name: str
    lora_int_id: int | None = None  # vLLM's; names identify adapters here


def model_cards(llm: LLM, parent: str, created: int) -> list[dict]:
    return [{"id": a.name, "object": "model", "created": created, "owned_by": "minicpmv", "root": str(a.path),
             "parent": parent} for a in llm.lora.adapters.values()]


def install(app: FastAPI, llm: LLM) -> None:
    from minicpmv.serve.errors import HTTPError, http_error

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest):
        def load():
            if body.load_inplace and body.lora_name in llm.lora.adapters:
                llm.lora.unload(body.lora_name)
            return llm.lora.load(body.lora_name, body.lora_path)

        try:
            await asyncio.to_thread(load)
        except AdapterError as exc:
            raise http_error(exc) from None
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest):
        if body.lora_name not in llm.lora.adapters:
            raise HTTPError(404, f"The lora adapter '{body.lora_name}' cannot be found.", "not_found_error", "lora_name")
        await asyncio.to_thread(llm.lora.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
