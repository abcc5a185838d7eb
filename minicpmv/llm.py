"""The public Python API: ``LLM(model).chat(messages)`` and ``chat_stream``. The server and the CLI use only this."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minicpmv.checkpoint import load_model, resolve
from minicpmv.engine.engine import Engine, EngineConfig, StepOutput
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence, VisualInput
from minicpmv.errors import InvalidInputError
from minicpmv.processing.prompt import Processor
from minicpmv.serve.output import OutputParser, ParsedOutput, ToolCall, aggregate
from minicpmv.serve.tool_parser import check_tools, index_tools

DEFAULT_EOS = [248044, 248046]


@dataclass
class ChatOptions:
    """Per-conversation processing options (the model card's knobs)."""

    downsample_mode: str | None = None  # "16x" (default) or "4x"
    max_slice_nums: int | None = None
    use_image_id: bool | None = None
    max_num_frames: int | None = None
    stack_frames: int | None = None
    enable_thinking: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # "auto" (default with tools), "none", "required", or a named function
    parallel_tool_calls: bool = True  # False: the answer ends after its first complete tool call
    normalize_escaped_newlines: bool = False  # the model card's clean-up: literal "\\n" in content -> newline

    @classmethod
    def build(cls, defaults: dict[str, Any], overrides: dict[str, Any] | None = None) -> ChatOptions:
        values = {**defaults, **(overrides or {})}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise InvalidInputError(f"unknown chat option(s) {unknown}; known: {sorted(names)}")
        return cls(**{k: v for k, v in values.items() if v is not None})


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    image_tokens: int = 0
    video_tokens: int = 0
    cached_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass
class ChatResult:
    text: str | None
    reasoning: str | None
    tool_calls: list[ToolCall]
    token_ids: list[int]
    finish_reason: str
    usage: Usage
    logprobs: list | None = None
    request_id: str = ""


@dataclass
class ChatDelta:
    """A piece of a streamed answer; ``events`` are the output parser's typed events for this piece."""

    request_id: str
    text: str = ""
    reasoning: str = ""
    events: list = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage | None = None
    result: ChatResult | None = None  # on the last delta


def _auto_dtype(device: torch.device) -> str:
    if device.type == "cuda":
        return "bfloat16"
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "float32"
    return "bfloat16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "float32"


class LLM:
    def __init__(
        self,
        model: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        engine_config: EngineConfig | None = None,
        progress: bool | None = None,
        quantization: str | None = None,
        **default_options: Any,
    ):
        """``quantization`` ("int8" / "int4", CPU) quantizes the language model's weights at load time; a checkpoint
        written by ``minicpmv.model.quant.save_quantized`` loads quantized by itself."""
        directory = resolve(model)
        dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device)
        self.dtype = _auto_dtype(dev) if dtype == "auto" else dtype
        raw_config = json.loads((directory / "config.json").read_text())
        if dtype == "auto" and (quantization or "quantization" in raw_config):
            self.dtype = "bfloat16"  # weight-only int8 / int4 run with bf16 activations
        self.model = load_model(directory, dtype=self.dtype, device=dev, progress=progress, quantization=quantization)
        self.processor = Processor.from_dir(directory)
        generation = {}
        if (directory / "generation_config.json").is_file():
            generation = json.loads((directory / "generation_config.json").read_text())
        eos = generation.get("eos_token_id", DEFAULT_EOS)
        self.eos_token_ids = eos if isinstance(eos, list) else [eos]
        self.engine = Engine(self.model, self.processor.tokenizer.backend, self.eos_token_ids, engine_config)
        self.default_options = ChatOptions.build(default_options)
        self.name = str(model)
        self.demo = bool(raw_config.get("demo_random_weights", False))

    # -- building requests ------------------------------------------------------------------------------------
    def prepare(self, messages: list[dict], params: SamplingParams | None, options: ChatOptions) -> Sequence:
        """Messages -> a Sequence ready for the engine (template, images, placeholders, ids)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidInputError("messages must be a list of {'role': ..., 'content': ...} dicts")
        check_tools(options.tools)
        prefix = self._forced_tool_prefix(options)
        out = self.processor(
            messages,
            # A forced tool call starts right after the generation prompt, so there is no thinking block.
            enable_thinking=options.enable_thinking and not prefix,
            tools=options.tools,
            use_image_id=options.use_image_id,
            downsample_mode=options.downsample_mode,
            max_slice_nums=options.max_slice_nums,
            max_num_frames=options.max_num_frames,
            stack_frames=options.stack_frames,
        )
        visuals = [self._visual("image", i) for i in out.images] + [self._visual("video", v) for v in out.videos]
        params = params if params is not None else SamplingParams()
        seq = Sequence(out.input_ids.tolist(), params, visuals)
        if prefix:
            seq.prompt_ids += self.processor.tokenizer.encode(prefix)
            seq.output_prefix = prefix
        if not options.parallel_tool_calls:
            seq.ends_output = self._after_first_tool_call(seq, options)
        return seq

    def _after_first_tool_call(self, seq: Sequence, options: ChatOptions) -> Callable[[str], bool] | None:
        """An ``ends_output`` hook that is true once the output holds one complete tool call."""
        parser, _ = self.stream_parser(seq, options)
        if not parser.parses_tools:
            return None
        return lambda text: any(e.kind == "tool_call_end" for e in parser.feed(text))

    @staticmethod
    def _forced_tool_prefix(options: ChatOptions) -> str:
        """tool_choice 'required' or a named function: the answer is made to start with the call's opening markup
        (written into the prompt, and fed to the output parser before the generated text)."""
        choice = options.tool_choice
        if choice in (None, "auto", "none"):
            return ""
        names = list(index_tools(options.tools))
        if not names:
            raise InvalidInputError(f"tool_choice {choice!r} needs a non-empty tools list (functions with names)")
        if choice == "required":
            return "<tool_call>\n<function="
        function = choice.get("function") if isinstance(choice, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if name not in names:
            raise InvalidInputError(f"tool_choice names function {name!r}, which is not among the tools {names}")
        return f"<tool_call>\n<function={name}>\n"

    @staticmethod
    def _visual(kind: str, processed) -> VisualInput:
        digest = hashlib.blake2b(processed.pixel_values.numpy().tobytes(), digest_size=16)
        digest.update(processed.target_sizes.numpy().tobytes())
        digest.update(processed.downsample_mode.encode())
        return VisualInput(
            kind=kind,
            pixel_values=processed.pixel_values,
            target_sizes=processed.target_sizes,
            downsample_mode=processed.downsample_mode,
            num_tokens=sum(processed.num_tokens_per_unit),
            key=f"{kind}:{digest.hexdigest()}",
        )

    def _conversations(self, conversations, options: dict[str, Any]) -> list[tuple[list[dict], ChatOptions]]:
        if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict) and "role" in conversations[0]:
            conversations = [conversations]  # a single conversation
        if not isinstance(conversations, list) or not conversations:
            raise InvalidInputError("give one conversation (a list of messages) or a non-empty list of them")
        base = dataclasses.asdict(self.default_options)
        out = []
        for conv in conversations:
            if isinstance(conv, dict):  # {"messages": [...], <per-conversation options>}
                conv = dict(conv)
                messages = conv.pop("messages", None)
                out.append((messages, ChatOptions.build(base, {**options, **conv})))
            else:
                out.append((conv, ChatOptions.build(base, options)))
        return out

    def parser(self, options: ChatOptions) -> OutputParser:
        return OutputParser(
            starts_in_reasoning=options.enable_thinking and not self._forced_tool_prefix(options),
            tools=options.tools,
            tool_choice_none=options.tool_choice == "none",
            normalize_newlines=options.normalize_escaped_newlines,
        )

    def stream_parser(self, seq: Sequence, options: ChatOptions) -> tuple[OutputParser, list]:
        """A parser for a streamed answer, already fed the forced prefix; returns it and the prefix's events."""
        parser = self.parser(options)
        return parser, parser.feed(seq.output_prefix) if seq.output_prefix else []

    # -- running ----------------------------------------------------------------------------------------------
    def chat(self, conversations, sampling_params: SamplingParams | list[SamplingParams] | None = None, **options) -> list[ChatResult]:
        """One result per conversation. All conversations run together (continuous batching)."""
        convs = self._conversations(conversations, options)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(convs)
        if len(params) != len(convs):
            raise InvalidInputError(f"{len(params)} sampling params for {len(convs)} conversations")
        seqs = [self.prepare(messages, p, opts) for (messages, opts), p in zip(convs, params)]
        submitted = []
        try:
            for seq in seqs:
                self.engine.add(seq)
                submitted.append(seq)
            while any(s.finish_reason is None for s in seqs):
                for out in self.engine.step():
                    if out.error is not None:
                        raise out.error
        finally:
            for seq in submitted:
                if seq.finish_reason is None:
                    self.engine.abort(seq.request_id)
        return [self.result(seq, opts) for seq, (_, opts) in zip(seqs, convs)]

    def result(self, seq: Sequence, options: ChatOptions, parsed: ParsedOutput | None = None) -> ChatResult:
        """The final result; ``parsed`` is what a stream's events added up to (same ids as streamed)."""
        parsed = parsed or self.parser(options).parse_all(seq.output_prefix + seq.text)
        reason = seq.finish_reason
        if parsed.tool_calls and reason == "stop":
            reason = "tool_calls"
        return ChatResult(
            text=parsed.content,
            reasoning=parsed.reasoning,
            tool_calls=parsed.tool_calls,
            token_ids=list(seq.output_ids),
            finish_reason=reason,
            usage=self.usage(seq),
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            request_id=seq.request_id,
        )

    @staticmethod
    def usage(seq: Sequence) -> Usage:
        return Usage(
            prompt_tokens=seq.num_prompt,
            completion_tokens=len(seq.output_ids),
            image_tokens=seq.visual_tokens("image"),
            video_tokens=seq.visual_tokens("video"),
            cached_tokens=seq.num_cached,
        )

    def chat_stream(self, messages: list[dict], sampling_params: SamplingParams | None = None, **options) -> Iterator[ChatDelta]:
        """Yield text / reasoning / tool-call deltas as tokens are generated; the last delta has the result.

        Closing the iterator early cancels the request and frees its state.
        """
        (messages, opts), = self._conversations(messages, options)
        seq = self.prepare(messages, sampling_params, opts)
        parser, history = self.stream_parser(seq, opts)
        unsent = list(history)
        self.engine.add(seq)
        try:
            while seq.finish_reason is None:
                for out in self.engine.step():
                    if out.error is not None and out.seq is seq:
                        raise out.error
                    if out.seq is seq:
                        yield self.delta(seq, out, parser, opts, history, unsent)
                        unsent = []
        finally:
            if seq.finish_reason is None:
                self.engine.abort(seq.request_id)

    def delta(
        self, seq: Sequence, out: StepOutput, parser: OutputParser, options: ChatOptions, history: list, unsent: list
    ) -> ChatDelta:
        """One engine output as parsed events (after ``unsent`` earlier ones); ``history`` collects them all."""
        new = parser.feed(out.text) if out.text else []
        if out.finished:
            new += parser.finish()
        history.extend(new)
        events = unsent + new
        delta = ChatDelta(seq.request_id, events=events, token_ids=out.token_ids)
        for event in events:
            if event.kind == "content":
                delta.text += event.text
            elif event.kind == "reasoning":
                delta.reasoning += event.text
        if out.finished:
            delta.result = self.result(seq, options, aggregate(history))
            delta.finish_reason = delta.result.finish_reason
            delta.usage = delta.result.usage
        return delta
