"""The public Python API: ``LLM(model).chat(messages)`` and ``chat_stream``. The server and the CLI use only this."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from minicpmv.checkpoint import load_model, resolve
from minicpmv.config import read_json
from minicpmv.engine.engine import Engine, EngineConfig, StepOutput
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence, VisualInput
from minicpmv.errors import CheckpointError, InvalidInputError
from minicpmv.processing.prompt import Processor
from minicpmv.output.parser import OutputParser, ParsedOutput, ToolCall, aggregate
from minicpmv.output.tool_calls import check_tool_choice, check_tools, index_tools

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

    def __post_init__(self) -> None:
        flags = ["enable_thinking", "parallel_tool_calls", "normalize_escaped_newlines"]
        for name in flags + (["use_image_id"] if self.use_image_id is not None else []):
            value = getattr(self, name)
            if isinstance(value, (bool, int, np.bool_)) and value in (0, 1):
                setattr(self, name, bool(value))
            else:
                raise InvalidInputError(f"{name} must be True or False, got {value!r}", param=name)
        check_tools(self.tools)
        check_tool_choice(self.tool_choice)

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


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidInputError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} was asked for, but no CUDA GPU is available")
    return device


def _auto_dtype(device: torch.device) -> str:
    if device.type == "cuda":
        return "bfloat16"
    from minicpmv.model import kernels  # bf16 is fast on the CPU where our kernels run (AVX-512 BF16, AVX2, NEON)

    return "bfloat16" if kernels.available() else "float32"


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
        if engine_config is not None and not isinstance(engine_config, EngineConfig):
            raise InvalidInputError(f"engine_config must be an EngineConfig, got {type(engine_config).__name__}")
        self.default_options = ChatOptions.build(default_options)
        directory = resolve(model)
        dev = _device(device)
        self.dtype = _auto_dtype(dev) if dtype == "auto" else dtype
        raw_config = read_json(directory / "config.json")
        if dtype == "auto" and (quantization or "quantization" in raw_config):
            self.dtype = "bfloat16"  # weight-only int8 / int4 run with bf16 activations
        self.model = load_model(directory, dtype=self.dtype, device=dev, progress=progress, quantization=quantization)
        self.processor = Processor.from_dir(directory)
        self.processor.settings(**self.processing_options(self.default_options))  # bad defaults fail here, not per chat
        eos = read_json(directory / "generation_config.json", default={}).get("eos_token_id", DEFAULT_EOS)
        self.eos_token_ids = eos if isinstance(eos, list) else [eos]
        if not self.eos_token_ids or not all(isinstance(t, int) and 0 <= t < len(self.processor.tokenizer) for t in self.eos_token_ids):
            raise CheckpointError(f"{directory / 'generation_config.json'}: eos_token_id must be token ids, got {eos!r}")
        self.engine = Engine(self.model, self.processor.tokenizer.backend, self.eos_token_ids, engine_config)
        self._streams: dict[str, collections.deque[StepOutput]] = {}  # request id -> outputs not yet yielded
        self.progress = progress  # None: progress bars on a terminal only
        self.name = str(model)
        self.demo = bool(raw_config.get("demo_random_weights", False))

    # -- building requests ------------------------------------------------------------------------------------
    def prepare(self, messages: list[dict], params: SamplingParams | None, options: ChatOptions) -> Sequence:
        """Messages -> a Sequence ready for the engine (template, images, placeholders, ids)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidInputError("messages must be a list of {'role': ..., 'content': ...} dicts")
        prefix = self._forced_tool_prefix(options)
        out = self.processor(
            messages,
            # A forced tool call starts right after the generation prompt, so there is no thinking block.
            enable_thinking=options.enable_thinking and not prefix,
            tools=options.tools,
            use_image_id=options.use_image_id,
            **self.processing_options(options),
        )
        visuals = [self._visual("image", i) for i in out.images] + [self._visual("video", v) for v in out.videos]
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise InvalidInputError(f"sampling_params must be a SamplingParams (or a list of them), got {type(params).__name__}")
        params.validate()  # again: its fields may have been changed since it was made
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
    def processing_options(options: ChatOptions) -> dict[str, Any]:
        names = ("downsample_mode", "max_slice_nums", "max_num_frames", "stack_frames")
        return {name: getattr(options, name) for name in names}

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
        if isinstance(conversations, list) and conversations and isinstance(conversations[0], dict) and "messages" not in conversations[0]:
            conversations = [conversations]  # a single conversation (a list of messages)
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
    def _step(self) -> list[StepOutput]:
        """One engine step. Outputs for open streams are queued for them: streams and chat calls may interleave."""
        outputs = self.engine.step()
        for out in outputs:
            if out.seq.request_id in self._streams:
                self._streams[out.seq.request_id].append(out)
        return outputs

    def chat(self, conversations, sampling_params: SamplingParams | list[SamplingParams] | None = None, **options) -> list[ChatResult]:
        """One result per conversation. All conversations run together (continuous batching)."""
        convs = self._conversations(conversations, options)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(convs)
        if len(params) != len(convs):
            raise InvalidInputError(f"{len(params)} sampling params for {len(convs)} conversations")
        seqs: list[Sequence] = []
        hide = None if self.progress is None else not self.progress  # None: shown on a terminal only
        bar = tqdm(total=len(convs), desc="conversations", unit="conv", disable=True if len(convs) == 1 else hide)
        try:
            for i, ((messages, opts), p) in enumerate(zip(convs, params)):
                try:
                    seqs.append(self.prepare(messages, p, opts))
                    self.engine.add(seqs[-1])
                except InvalidInputError as exc:
                    if len(convs) == 1:
                        raise
                    raise type(exc)(f"conversation {i}: {exc}", param=exc.param) from None
            while any(s.finish_reason is None for s in seqs):
                for out in self._step():
                    if out.error is not None and any(out.seq is s for s in seqs):
                        raise out.error
                bar.update(sum(s.finish_reason is not None for s in seqs) - bar.n)
        finally:
            bar.close()
            for seq in seqs:  # on any failure nothing of this call stays in the engine
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
        convs = self._conversations(messages, options)
        if len(convs) != 1:
            raise InvalidInputError(f"chat_stream takes one conversation, got {len(convs)}; chat() runs several")
        (messages, opts), = convs
        seq = self.prepare(messages, sampling_params, opts)
        parser, history = self.stream_parser(seq, opts)
        unsent = list(history)
        queue = self._streams[seq.request_id] = collections.deque()
        try:
            self.engine.add(seq)
            while queue or seq.finish_reason is None:
                if not queue:
                    self._step()
                    continue
                out = queue.popleft()
                if out.error is not None:
                    raise out.error
                yield self.delta(seq, out, parser, opts, history, unsent)
                unsent = []
        finally:
            del self._streams[seq.request_id]
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
