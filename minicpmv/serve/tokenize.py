"""vLLM's POST /tokenize (a raw prompt, or chat messages through the chat template) and POST /detokenize."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, model_validator

from minicpmv.errors import InvalidInputError, MiniCPMVError
from minicpmv.llm import LLM, ChatOptions
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError, http_error
from minicpmv.serve.media import fetch_message_media
from minicpmv.serve.metrics import Metrics


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool = False  # the tokenizer adds none either way (no BOS)
    add_generation_prompt: bool = True
    return_token_strs: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _one_input(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str | None = None
    tokens: list[int]


def router(llm: LLM, config: ServerConfig, metrics: Metrics) -> APIRouter:
    api = APIRouter()
    tok = llm.processor.tokenizer

    def check_model(model: str | None) -> None:
        if model is not None and model != config.model_name:
            raise HTTPError(404, f"model {model!r} does not exist; this server serves {config.model_name!r}", "not_found_error", "model")

    @api.post("/tokenize")
    async def tokenize(body: TokenizeRequest):
        check_model(body.model)
        try:
            if body.prompt is not None:
                ids = tok.encode(body.prompt)
            else:
                if not body.add_generation_prompt:
                    raise InvalidInputError("add_generation_prompt=false is not supported", param="add_generation_prompt")
                messages = [await fetch_message_media(m, config.media) for m in body.messages]
                kwargs = body.chat_template_kwargs or {}
                unknown = set(kwargs) - {"enable_thinking"}
                if unknown:
                    raise InvalidInputError(f"unknown chat_template_kwargs {sorted(unknown)}", param="chat_template_kwargs")
                options = ChatOptions.build(dataclasses.asdict(llm.default_options), {"tools": body.tools, **kwargs})
                ids = (await asyncio.to_thread(llm.prepare, messages, None, options)).prompt_ids
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        return {
            "count": len(ids),
            "max_model_len": llm.engine.max_model_len,
            "tokens": ids,
            "token_strs": [tok.decode([t]) for t in ids] if body.return_token_strs else None,
        }

    @api.post("/detokenize")
    async def detokenize(body: DetokenizeRequest):
        check_model(body.model)
        vocab = len(tok)
        if any(t < 0 or t >= vocab for t in body.tokens):
            raise HTTPError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return {"prompt": tok.decode(body.tokens)}

    return api
