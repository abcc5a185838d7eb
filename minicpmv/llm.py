"""The public Python API: ``LLM(model).chat(messages)`` and ``chat_stream``; the server, the CLI and batch jobs use
only this. The ``LLM`` owns the engine and the one thread that steps it (``engine/loop.py``): ``submit`` / ``outputs``
/ ``abort`` may be called from any thread, so ``chat`` calls, streams and a server can share one model."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from minicpmv.checkpoint import load_model, resolve
from minicpmv.config import read_json
from minicpmv.engine.engine import Engine, EngineConfig, StepOutput
from minicpmv.engine.loop import EngineLoop, Sink
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.sequence import Sequence, VisualInput
from minicpmv.errors import CheckpointError, InvalidInputError
from minicpmv.model import lora
from minicpmv.output.constraints import Constraint, GrammarCompiler
from minicpmv.output.events import ContentDelta, Event, ReasoningDelta, ToolCall, aggregate
from minicpmv.output.parser import OutputParser
from minicpmv.output.tool_grammar import tool_call_grammar
from minicpmv.output.tools import check_tool_choice, check_tools, index_tools
from minicpmv.processing.options import ProcessingOptions, as_flag
from minicpmv.processing.prompt import Processor

_GRAMMARS_LOCK = threading.Lock()
log = logging.getLogger("minicpmv")
DEMO_MAX_TOKENS = 256  # a demo checkpoint's answers stop here unless max_tokens says otherwise


@dataclass
class ChatOptions(ProcessingOptions):
    """Per-conversation options: the processing knobs, plus how the answer is prompted and read."""

    enable_thinking: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None  # "auto" (default with tools), "none", "required", or a named function
    parallel_tool_calls: bool = True  # False: the answer ends after its first complete tool call
    normalize_escaped_newlines: bool = False  # the model card's clean-up: literal "\\n" in content -> newline
    lora: str | None = None  # the name of a loaded LoRA adapter to answer with (None: the base model)

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("enable_thinking", "parallel_tool_calls", "normalize_escaped_newlines"):
            setattr(self, name, as_flag(name, getattr(self, name)))
        check_tools(self.tools)
        check_tool_choice(self.tool_choice)

    @property
    def prompt_tools(self) -> list[dict] | None:
        """The tools the model is shown: none with ``tool_choice: "none"``."""
        return None if self.tool_choice == "none" else self.tools

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
    prompt_logprobs: list | None = None  # with SamplingParams.prompt_logprobs: None, then one per prompt token


@dataclass
class ChatDelta:
    """A piece of a streamed answer: the output parser's events for it (``text`` / ``reasoning`` joined from them)."""

    request_id: str
    text: str = ""
    reasoning: str = ""
    events: list[Event] = field(default_factory=list)
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
        lora_modules: dict[str, str | Path] | None = None,
        max_loras: int = 8,
        max_lora_rank: int = 64,
        merge_lora: str | Path | None = None,
        mmproj: str | Path | None = None,
        **default_options: Any,
    ):
        """``quantization`` ("int8" / "int4", CPU) quantizes the language model's weights at load time; a checkpoint
        written by ``minicpmv.model.quant.save_quantized`` loads quantized by itself.

        ``lora_modules`` {name: PEFT adapter directory} loads LoRA adapters a chat picks with ``lora=name`` (up to
        ``max_loras``, ranks up to ``max_lora_rank``; more load later with ``llm.lora.load``); ``merge_lora`` folds
        one adapter into the weights instead (full speed, every request).

        A llama.cpp ``.gguf`` language model loads with its vision projector ``mmproj`` (default: the mmproj GGUF
        beside it)."""
        if engine_config is not None and not isinstance(engine_config, EngineConfig):
            raise InvalidInputError(f"engine_config must be an EngineConfig, got {type(engine_config).__name__}")
        self.default_options = ChatOptions.build(default_options)
        directory = resolve(model, mmproj=mmproj)
        dev = _device(device)
        self.dtype = _auto_dtype(dev) if dtype == "auto" else dtype
        raw_config = read_json(directory / "config.json")
        if dtype == "auto" and (quantization or "quantization" in raw_config):
            self.dtype = "bfloat16"  # weight-only int8 / int4 run with bf16 activations
        if merge_lora is None:
            self.model = load_model(directory, dtype=self.dtype, device=dev, progress=progress, quantization=quantization)
        else:
            self.model = lora.load_merged(directory, merge_lora, self.dtype, dev, progress, quantization)
        self.lora = lora.registry(self.model, max_loras, max_lora_rank)
        for name, path in (lora_modules or {}).items():
            self.lora.load(name, path)
        self.processor = Processor.from_dir(directory)
        self.processor.settings(self.default_options)  # bad defaults fail here, not per chat
        tokenizer = self.processor.tokenizer
        eos = read_json(directory / "generation_config.json", default={}).get("eos_token_id", tokenizer.default_stop_ids)
        self.eos_token_ids = eos if isinstance(eos, list) else [eos]
        if not self.eos_token_ids or not all(isinstance(t, int) and 0 <= t < len(tokenizer) for t in self.eos_token_ids):
            raise CheckpointError(f"{directory / 'generation_config.json'}: eos_token_id must be token ids, got {eos!r}")
        self.engine = Engine(self.model, tokenizer.backend, self.eos_token_ids, tokenizer.im_start_id, engine_config)
        self._loop = EngineLoop(self.engine)
        self.progress = progress  # None: progress bars on a terminal only
        self._grammars: GrammarCompiler | None = None
        self.name = str(model)
        self.demo = bool(raw_config.get("demo_random_weights", False))
        stored = raw_config.get("quantization")
        self.quantization = quantization or (stored.get("method") if isinstance(stored, dict) else None)
        gguf = raw_config.get("gguf")  # a llama.cpp file: a 4x vision projector serves 4x only
        self.downsample_modes = tuple(gguf.get("downsample_modes", ())) if isinstance(gguf, dict) else ("16x", "4x")
        # another tool's quantized checkpoint (model/formats): its format, stored types and what was dequantized
        self.weights_format: dict | None = getattr(self.model, "checkpoint_format", None)
        if self.weights_format:
            self.quantization = self.weights_format["format"]
        if self.demo:
            log.warning("%s is a demo checkpoint with RANDOM weights: its answers are noise (and stop at %d tokens "
                        "unless max_tokens says otherwise)", directory, DEMO_MAX_TOKENS)

    def close(self) -> None:
        """Stop the engine thread (requests still running end with an error)."""
        self._loop.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- building requests ------------------------------------------------------------------------------------
    def prepare(self, messages: list[dict], params: SamplingParams | None, options: ChatOptions) -> Sequence:
        """Messages -> a Sequence ready for the engine (template, images, placeholders, ids, its output parser)."""
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidInputError("messages must be a list of {'role': ..., 'content': ...} dicts")
        tools = options.prompt_tools
        prefix = self._forced_tool_prefix(options)
        thinking = options.enable_thinking and not prefix  # a forced call starts right after the prompt: no thinking
        out = self.processor(messages, enable_thinking=thinking, tools=tools, options=options.processing())
        visuals = [self._visual("image", i) for i in out.images] + [self._visual("video", v) for v in out.videos]
        for v in visuals:
            if v.downsample_mode not in self.downsample_modes:
                raise InvalidInputError(f"downsample_mode {v.downsample_mode!r} is not available: this model's vision "
                                        f"projector serves {list(self.downsample_modes)} (a 4x mmproj GGUF has no "
                                        "16x window merger)", param="downsample_mode")
        if params is None:
            params = SamplingParams()
        elif not isinstance(params, SamplingParams):
            raise InvalidInputError(f"sampling_params must be a SamplingParams (or a list of them), got {type(params).__name__}")
        params.validate()  # again: its fields may have been changed since it was made
        if self.demo and params.max_tokens is None:  # random weights never end an answer by themselves
            params = dataclasses.replace(params, max_tokens=max(DEMO_MAX_TOKENS, params.min_tokens))
        seq = Sequence(out.input_ids.tolist(), params, visuals, lora=self.lora.key(options.lora))
        seq.parser = OutputParser(thinking, tools, normalize_newlines=options.normalize_escaped_newlines)
        seq.stop_after_tool_call = not options.parallel_tool_calls and seq.parser.parses_tools
        if prefix:
            seq.prompt_ids += self.processor.tokenizer.encode(prefix)
            seq.output_prefix = prefix
            seq.prefix_events = seq.parser.feed(prefix)  # the answer's first events come from the prompt
            seq.events = list(seq.prefix_events)
        seq.constraint = self._constraint(params, options, prefix, thinking)
        return seq

    def prepare_ids(self, prompt_ids: list[int], params: SamplingParams, lora: str | None = None) -> Sequence:
        """A raw prompt (no chat template) -> a Sequence; ``params.structured`` constrains it and ``lora`` picks an
        adapter as in ``prepare``."""
        params.validate()
        seq = Sequence(list(prompt_ids), params, lora=self.lora.key(lora))
        if params.structured is not None:
            seq.constraint = self.grammars.constraint(params.structured, after_think=False)
        return seq

    @property
    def grammars(self) -> GrammarCompiler:
        """Compiles and caches the grammars of constrained requests (its tokenizer is built on first use, ~3 s)."""
        with _GRAMMARS_LOCK:  # requests are prepared on several threads at once
            if self._grammars is None:
                self._grammars = GrammarCompiler.from_tokenizer(
                    self.processor.tokenizer.backend, self.model.cfg.text.vocab_size, self.eos_token_ids)
            return self._grammars

    def _constraint(self, params: SamplingParams, options: ChatOptions, tool_prefix: str,
                    thinking: bool) -> Constraint | None:
        """The answer's grammar: a forced tool call's markup and arguments (tool_choice 'required' or named), else
        ``params.structured`` (after the thinking, when thinking is on), else none."""
        if tool_prefix:
            if params.structured is not None:
                raise InvalidInputError(
                    f"{params.structured.param} cannot be combined with tool_choice {options.tool_choice!r}: the forced "
                    "call's arguments are already constrained by the tool's schema", param=params.structured.param)
            return self.grammars.constraint(
                lark=tool_call_grammar(options.tools, options.tool_choice, options.parallel_tool_calls))
        if params.structured is None:
            return None
        return self.grammars.constraint(params.structured, after_think=thinking)

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
        name = choice["function"]["name"]
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

    # -- running (thread-safe) --------------------------------------------------------------------------------
    def submit(self, seq: Sequence, sink: Sink) -> None:
        """Hand ``seq`` to the engine thread; ``sink`` gets None (accepted), its outputs, or one exception."""
        self._loop.submit(seq, sink)

    def abort(self, request_id: str) -> None:
        self._loop.abort(request_id)

    def outputs(self, seq: Sequence) -> Iterator[StepOutput]:
        """Run ``seq`` (and its forks: n > 1), yielding their outputs as they come; a refusal or failure is raised.
        Leaving early aborts it."""
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.submit(seq, inbox.put)
        pending, done = set(seq.group_ids), False  # n > 1: until every choice finished
        try:
            while not done:
                item = inbox.get()
                if isinstance(item, Exception):
                    done = True
                    raise item
                if item is not None:
                    if item.finished:
                        pending.discard(item.seq.request_id)
                    done = not pending
                    yield item
        finally:
            if not done:
                self.abort(seq.request_id)

    def chat(self, conversations, sampling_params: SamplingParams | list[SamplingParams] | None = None, **options) -> list[ChatResult]:
        """One result per conversation. All conversations run together (continuous batching)."""
        convs = self._conversations(conversations, options)
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(convs)
        if len(params) != len(convs):
            raise InvalidInputError(f"{len(params)} sampling params for {len(convs)} conversations")
        seqs = []
        for i, ((messages, opts), p) in enumerate(zip(convs, params)):
            try:
                seqs.append(self.prepare(messages, p, opts))
            except InvalidInputError as exc:
                raise _in_conversation(exc, i, len(convs)) from None
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        hide = None if self.progress is None else not self.progress  # None: shown on a terminal only
        bar = tqdm(total=len(convs), desc="conversations", unit="conv", disable=True if len(convs) == 1 else hide)
        try:
            for i, seq in enumerate(seqs):
                self.submit(seq, lambda item, i=i: inbox.put((i, item)))
            pending = len(seqs)
            while pending:
                i, item = inbox.get()
                if isinstance(item, Exception):
                    raise _in_conversation(item, i, len(convs))
                if item is not None and item.finished:
                    pending -= 1
                    bar.update(1)
        finally:
            bar.close()
            for seq in seqs:  # on any failure nothing of this call stays in the engine
                if seq.finish_reason is None:
                    self.abort(seq.request_id)
        return [self.result(seq) for seq in seqs]

    def chat_stream(self, messages: list[dict], sampling_params: SamplingParams | None = None, **options) -> Iterator[ChatDelta]:
        """Yield text / reasoning / tool-call deltas as tokens are generated; the last delta has the result.

        Closing the iterator early cancels the request and frees its state.
        """
        convs = self._conversations(messages, options)
        if len(convs) != 1:
            raise InvalidInputError(f"chat_stream takes one conversation, got {len(convs)}; chat() runs several")
        (messages, opts), = convs
        seq = self.prepare(messages, sampling_params, opts)
        if seq.prefix_events:
            yield self.delta(seq, None)
        for out in self.outputs(seq):
            yield self.delta(seq, out)

    def delta(self, seq: Sequence, out: StepOutput | None) -> ChatDelta:
        """One engine output as a delta; ``out`` None: the events the prompt gave the answer (a forced call's start)."""
        events = out.events if out is not None else list(seq.prefix_events)
        delta = ChatDelta(seq.request_id, events=events, token_ids=out.token_ids if out is not None else [])
        delta.text = "".join(e.text for e in events if isinstance(e, ContentDelta))
        delta.reasoning = "".join(e.text for e in events if isinstance(e, ReasoningDelta))
        if out is not None and out.finished:
            delta.result = self.result(seq)
            delta.finish_reason = delta.result.finish_reason
            delta.usage = delta.result.usage
        return delta

    def result(self, seq: Sequence) -> ChatResult:
        """The final result: the fold of every event the sequence's parser emitted (what a stream sent)."""
        parsed = aggregate(seq.events)
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
            prompt_logprobs=list(seq.prompt_logprobs) if seq.params.prompt_logprobs is not None else None,
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


def _in_conversation(exc: Exception, i: int, total: int) -> Exception:
    """A typed error of conversation ``i`` of a batch says which conversation it was."""
    if total == 1 or not isinstance(exc, InvalidInputError):
        return exc
    return type(exc)(f"conversation {i}: {exc}", param=exc.param)
