"""One request as the engine sees it: prompt ids, its visual inputs, sampling parameters and what it produced."""

from __future__ import annotations

import copy
import enum
import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

from minicpmv.engine.detokenizer import IncrementalDetokenizer
from minicpmv.engine.sampling import SamplingParams
from minicpmv.engine.stops import StopStringMatcher
from minicpmv.model.state import HybridState
from minicpmv.output.events import Event
from minicpmv.output.parser import OutputParser

_ids = itertools.count()


@dataclass
class VisualInput:
    """One image or video, preprocessed: its units' patches and grids, and the settings it was made with.

    It carries its own ``downsample_mode``, so one batch can mix 4x and 16x requests.
    """

    kind: str  # "image" or "video"
    pixel_values: torch.Tensor  # [sum(h*w), 3*14*14]
    target_sizes: torch.Tensor  # [units, 2] (h, w) in patches
    downsample_mode: str
    num_tokens: int  # placeholder tokens this input fills
    key: str  # content hash + settings: the vision-cache key


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    visuals: list[VisualInput] = field(default_factory=list)
    request_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # detokenized output, cut before any stop string
    output_prefix: str = ""  # text forced into the prompt that belongs to the answer (a forced tool call's start)
    status: Status = Status.WAITING
    finish_reason: str | None = None
    state: HybridState | None = None
    num_cached: int = 0  # prompt tokens that came from the prefix cache
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # visual key -> features, while prefilling
    generator: torch.Generator | None = None
    logprobs: list = field(default_factory=list)
    forced_output_ids: list[int] | None = None  # test hook: emit these tokens instead of sampling
    lora: str | None = None  # the LoRA adapter's key (model/lora.py Registry.key); None: the base model
    snapshot_at: int = 0  # prompt position whose state is worth keeping for the next turn (0 = none)
    # The output's three incremental readers, fed one token at a time by the engine (made by Engine.add; the parser
    # by whoever knows the request's options, else the text is all content).
    detokenizer: IncrementalDetokenizer | None = None
    stop_matcher: StopStringMatcher | None = None
    parser: OutputParser | None = None
    events: list[Event] = field(default_factory=list)  # everything the parser emitted (the forced prefix's too)
    # The events of the forced prefix alone, fixed before the engine sees the sequence: streams send them first
    # (``events`` grows on the engine's thread meanwhile).
    prefix_events: list[Event] = field(default_factory=list)
    stop_after_tool_call: bool = False  # parallel_tool_calls false: the output ends with its first complete call
    # Constrained decoding: a minicpmv.output.constraints.Constraint (its mask applies before the sampler).
    constraint: Any = None
    reserved_tokens: int = 0  # the state memory admission reserves: prompt + max_tokens tokens (set by Engine.add)
    reserved_bytes: int = 0
    prompt_logprobs: list = field(default_factory=list)  # with params.prompt_logprobs: None, then one per prompt token
    # n > 1: the other choices. They wait outside the scheduler until this sequence's prefill ends, then start
    # from a copy of its state and the same last logits (the prompt is computed once).
    forks: list[Sequence] = field(default_factory=list)
    group: str = ""  # the request id of the sequence a fork came from (its own otherwise)

    def __post_init__(self) -> None:
        self.group = self.group or self.request_id

    def fork(self) -> Sequence:
        """Another choice for the same prompt: its own readers and output, sharing params and visuals."""
        return Sequence(
            list(self.prompt_ids), self.params, self.visuals, output_prefix=self.output_prefix,
            forced_output_ids=self.forced_output_ids, parser=copy.deepcopy(self.parser), events=list(self.events),
            prefix_events=list(self.prefix_events),
            stop_after_tool_call=self.stop_after_tool_call, group=self.request_id,
            constraint=self.constraint.copy() if self.constraint is not None else None, lora=self.lora,
        )

    @property
    def group_ids(self) -> list[str]:
        return [self.request_id, *(f.request_id for f in self.forks)]

    @property
    def num_prompt(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_computed(self) -> int:
        """Tokens already absorbed by the state."""
        return self.state.length if self.state is not None else 0

    @property
    def num_pending(self) -> int:
        """Tokens not yet fed to the model: the rest of the prompt, or the last sampled (plus jump-forward) tokens."""
        return self.num_prompt + len(self.output_ids) - self.num_computed

    @property
    def prefilling(self) -> bool:
        return self.num_computed < self.num_prompt

    @property
    def all_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def visual_tokens(self, kind: str) -> int:
        return sum(v.num_tokens for v in self.visuals if v.kind == kind)
