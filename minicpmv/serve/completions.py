"""OpenAI (legacy) completions: POST /v1/completions -> one Sequence per prompt over its raw token ids (no chat
template), n choices each as forks of it; ``echo`` with ``logprobs`` scores the prompt too (what lm-eval-harness's
``local-completions`` loglikelihood tasks read)."""

from __future__ import annotations

import json
import uuid
from contextlib import aclosing
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence
from minicpmv.errors import InvalidInputError, MiniCPMVError
from minicpmv.llm import LLM
from minicpmv.serve.async_llm import generate, merge, until_disconnect
from minicpmv.serve.config import ServerConfig
from minicpmv.serve.errors import http_error
from minicpmv.serve.metrics import Metrics
from minicpmv.serve.prepare import adapter_for
from minicpmv.serve.protocol import MAX_CHOICES, StreamOptions, now, whole_number

MAX_PROMPTS = 64  # prompts in one request


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's default for completions
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    best_of: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    suffix: str | None = None
    user: str | None = None
    test_output: str | None = None  # honoured only when the server runs with test hooks enabled

    _whole = field_validator("max_tokens", "top_k", "min_tokens", "n", "best_of", "seed", "logprobs", "stop_token_ids",
                             mode="before")(whole_number)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, best_of, info):
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError("best_of other than n is not supported")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, suffix):
        if suffix:
            raise ValueError("suffix (insertion) is not supported by this model")
        return suffix

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, options, info):
        if options is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return options

    def prompts(self, llm: LLM) -> list[list[int]]:
        """Each prompt's token ids (strings tokenized as they are: no chat template, no special tokens added)."""
        p = self.prompt
        items: list[Any] = [p] if isinstance(p, str) or (p and isinstance(p[0], int)) else list(p)
        if not items or len(items) > MAX_PROMPTS:
            raise InvalidInputError(f"prompt must hold 1 to {MAX_PROMPTS} prompts", param="prompt")
        vocab = len(llm.processor.tokenizer)
        out = []
        for item in items:
            ids = llm.processor.tokenizer.encode(item) if isinstance(item, str) else list(item)
            if not ids:
                raise InvalidInputError("a prompt is empty", param="prompt")
            if any(t < 0 or t >= vocab for t in ids):
                raise InvalidInputError(f"prompt token ids must be in [0, {vocab})", param="prompt")
            out.append(ids)
        return out

    def sampling_params(self) -> SamplingParams:
        given = {
            "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "max_tokens": self.max_tokens, "min_tokens": self.min_tokens, "stop": self.stop,
            "stop_token_ids": self.stop_token_ids, "seed": self.seed, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "repetition_penalty": self.repetition_penalty,
            "logprobs": self.logprobs, "prompt_logprobs": self.logprobs if self.echo else None,
        }
        return SamplingParams(ignore_eos=self.ignore_eos, skip_special_tokens=self.skip_special_tokens,
                              **{k: v for k, v in given.items() if v is not None})


class Logprobs:
    """The completions API's logprobs object, built up token by token (``text_offset`` runs over the choice text)."""

    def __init__(self, llm: LLM, offset: int = 0):
        self.tok, self.offset = llm.processor.tokenizer, offset
        self.body: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add(self, token_id: int, entry) -> None:
        text = self.tok.decode([token_id])
        self.body["tokens"].append(text)
        self.body["text_offset"].append(self.offset)
        self.offset += len(text)
        if entry is None:  # the first prompt token: nothing before it to predict it
            self.body["token_logprobs"].append(None)
            self.body["top_logprobs"].append(None)
            return
        self.body["token_logprobs"].append(entry.logprob)
        top = {self.tok.decode([i]): lp for i, lp in zip(entry.top_ids, entry.top_logprobs)}
        self.body["top_logprobs"].append(top)

    def take(self) -> dict:
        body, self.body = self.body, {k: [] for k in self.body}
        return body


def usage(seqs: list[Sequence]) -> dict:
    """Each prompt counted once (its choices share it), every choice's output counted."""
    prompt = sum(s.num_prompt for s in seqs if s.group == s.request_id)
    completion = sum(len(s.output_ids) for s in seqs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def router(llm: LLM, config: ServerConfig, metrics: Metrics) -> APIRouter:
    api = APIRouter()

    def prepare(body: CompletionRequest, lora: str | None) -> list[Sequence]:
        params = body.sampling_params()
        seqs = []
        for ids in body.prompts(llm):
            seq = llm.prepare_ids(ids, params, lora)
            if body.test_output is not None:
                if not config.enable_test_hooks:
                    raise InvalidInputError("test_output is only accepted by a server started with --enable-test-hooks")
                seq.forced_output_ids = llm.processor.tokenizer.encode(body.test_output)
            seq.forks = [seq.fork() for _ in range(body.n - 1)]
            seqs.append(seq)
        return seqs

    def echo_text(seq: Sequence, body: CompletionRequest) -> str:
        return llm.processor.tokenizer.decode(seq.prompt_ids) if body.echo else ""

    def prompt_logprobs(seq: Sequence, lp: Logprobs) -> None:
        for token, entry in zip(seq.prompt_ids, seq.prompt_logprobs):
            lp.add(token, entry)

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        metrics.requests += 1
        lora = adapter_for(llm, config, body.model)
        try:
            parents = prepare(body, lora)
        except MiniCPMVError as exc:
            raise http_error(exc) from None
        choices = [s for p in parents for s in (p, *p.forks)]  # choice index = prompt * n + j
        index = {s.request_id: i for i, s in enumerate(choices)}
        cid, created = f"cmpl-{uuid.uuid4().hex}", now()
        streams = [generate(llm, p) for p in parents]
        try:
            for s in streams:
                await anext(s)  # accepted (a refusal is a status code)
        except MiniCPMVError as exc:
            for s in streams:
                await s.aclose()
            raise http_error(exc) from None

        if not body.stream:
            async def drain():
                async with aclosing(merge(streams)) as outputs:
                    async for _ in outputs:
                        pass
            try:
                await until_disconnect(request, drain())
            except MiniCPMVError as exc:
                raise http_error(exc) from None
            out = []
            for seq in choices:
                lp = None
                if body.logprobs is not None:
                    lp = Logprobs(llm)
                    if body.echo:
                        prompt_logprobs(seq, lp)
                    for token, entry in zip(seq.output_ids, seq.logprobs):
                        lp.add(token, entry)
                    lp = lp.take()
                text = echo_text(seq, body) + seq.text
                out.append({"index": index[seq.request_id], "text": text, "logprobs": lp, "finish_reason": seq.finish_reason})
            result = {"id": cid, "object": "text_completion", "created": created, "model": body.model,
                      "choices": out, "usage": usage(choices)}
            metrics.prompt_tokens += result["usage"]["prompt_tokens"]
            metrics.completion_tokens += result["usage"]["completion_tokens"]
            return result

        def chunk(i: int, text: str, lp=None, finish_reason=None) -> str:
            choice = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason}
            payload = {"id": cid, "object": "text_completion", "created": created, "model": body.model, "choices": [choice]}
            return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

        async def sse():
            trackers = {s.request_id: Logprobs(llm) for s in choices} if body.logprobs is not None else {}
            echoed: set[str] = set()
            try:
                async with aclosing(merge(streams)) as outputs:
                    async for out in outputs:
                        seq, lp = out.seq, trackers.get(out.seq.request_id)
                        text = out.text
                        if body.echo and seq.request_id not in echoed:  # the prompt (scored by now) comes first
                            echoed.add(seq.request_id)
                            text = echo_text(seq, body) + text
                            if lp is not None:
                                prompt_logprobs(seq, lp)
                        if lp is not None:
                            for token, entry in zip(out.token_ids, seq.logprobs[len(seq.logprobs) - len(out.token_ids):]):
                                lp.add(token, entry)
                        yield chunk(index[seq.request_id], text, lp.take() if lp else None,
                                    seq.finish_reason if out.finished else None)
                if body.stream_options and body.stream_options.include_usage:
                    yield "data: " + json.dumps({"id": cid, "object": "text_completion", "created": created,
                                                 "model": body.model, "choices": [], "usage": usage(choices)}) + "\n\n"
            except Exception as exc:  # failed mid-stream: the status line is gone, so report it in the stream
                error = http_error(exc)
                metrics.error(error.status)
                yield "data: " + json.dumps({"error": {"message": error.message, "type": error.kind, "param": error.param, "code": error.status}}) + "\n\n"
            finally:
                for s in streams:
                    await s.aclose()
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return api

