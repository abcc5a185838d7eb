"""What every chat-shaped protocol does once it has translated its request: fetch the media, build the options,
``LLM.prepare`` the Sequence (and the test hook)."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from minicpmv.engine.sampling import SamplingParams, StructuredOutputs
from minicpmv.engine.sequence import Sequence
from minicpmv.errors import InvalidInputError
from minicpmv.llm import LLM, ChatOptions
from minicpmv.processing.options import ProcessingOptions
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import HTTPError
from minicpmv.serve.media import fetch_message_media


def adapter_for(llm: LLM, config: ServerConfig, model: str, suffix: str = "") -> str | None:
    """The LoRA adapter a request's ``model`` names (None: the base model); a 404 naming what this server serves
    otherwise. ``suffix``: a tag the protocol may append (Ollama's ``:latest``)."""
    name = model[: -len(suffix)] if suffix and model.endswith(suffix) else model
    if name == config.model_name:
        return None
    if name in llm.lora.names():
        return name
    served = [config.model_name, *llm.lora.names()]
    raise HTTPError(404, f"model {model!r} does not exist; this server serves {served}", "not_found_error", "model")


def json_output(param: str, schema: dict | None = None) -> StructuredOutputs:
    """A protocol's JSON output format as the answer's constraint (``schema`` None: any JSON object); ``param`` names
    the field in errors (a schema that does not compile, say)."""
    if schema is None:
        return StructuredOutputs(json_object=True, param=param)
    return StructuredOutputs(json=schema, param=param)


async def prepare_chat(
    llm: LLM,
    config: ServerConfig,
    messages: list[dict],
    params: SamplingParams,
    options: dict[str, Any],
    processing: dict[str, Any] | None = None,
    test_output: str | None = None,
    where: str = "mm_processor_kwargs",
) -> Sequence:
    """``messages`` in the OpenAI chat shape; ``options``: ChatOptions fields (enable_thinking, tools, ...);
    ``processing``: ProcessingOptions fields (named ``where`` in errors)."""
    fetched = [await fetch_message_media(m, config.media) for m in messages]
    mm = {k: v for k, v in dataclasses.asdict(ProcessingOptions.from_dict(processing or {}, where=where)).items() if v is not None}
    chat_options = ChatOptions.build({**dataclasses.asdict(llm.default_options), **mm}, options)
    seq = await asyncio.to_thread(llm.prepare, fetched, params, chat_options)
    if test_output is not None:
        if not config.enable_test_hooks:
            raise InvalidInputError("test_output is only accepted by a server started with --enable-test-hooks")
        seq.forced_output_ids = llm.processor.tokenizer.encode(test_output)
    return seq
