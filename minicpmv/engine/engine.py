"""The generation loop: admit -> schedule -> run -> sample -> detokenize -> stop checks, one step at a time.

``step()`` is synchronous and single-threaded: only the engine loop's thread (``engine/loop.py``, owned by the
``LLM``) calls it. Everything a finished or cancelled sequence held (its hybrid state) is released at once.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, fields

import torch

from minicpmv.engine.cache import PrefixCache, VisionCache, prefix_key
from minicpmv.engine.detokenizer import IncrementalDetokenizer
from minicpmv.engine.memory import default_state_budget, human, state_bytes
from minicpmv.engine.runner import Runner
from minicpmv.engine.sampler import Sampler, SampleRow, TokenLogprobs, make_generator
from minicpmv.engine.scheduler import Scheduler, SchedulerConfig
from minicpmv.engine.sequence import Sequence, Status
from minicpmv.engine.stops import StopStringMatcher
from minicpmv.errors import ContextLengthError, InvalidInputError
from minicpmv.model.minicpmv import MiniCPMV
from minicpmv.model.state import Snapshots
from minicpmv.output.constraints import apply_bitmask, fill_bitmask, mask_words
from minicpmv.output.events import ContentDelta, Event, ToolCallEnd


@dataclass
class EngineConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 1024
    max_waiting: int = 256
    vision_cache_bytes: int = 512 << 20
    prefix_cache_bytes: int = 1 << 30
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    # Constrained decoding: tokens a grammar forces (a long key, '","') are fed as one chunk with the next forward.
    jump_forward: bool = True
    # Fill grammar masks on a worker thread while the forward runs (False: before it, on the engine thread). Beside
    # is faster even with every core in the forward (bench/structured.py measures both).
    overlap_masks: bool = True
    max_state_bytes: int | None = None  # sequence state memory (KV + DeltaNet); default: a share of what is free

    def __post_init__(self) -> None:
        lowest = {"max_num_seqs": 1, "max_num_batched_tokens": 1, "max_waiting": 1, "vision_cache_bytes": 0,
                  "prefix_cache_bytes": 0, "max_model_len": 2, "max_state_bytes": 1}
        for name, low in lowest.items():
            value = getattr(self, name)
            if name in ("max_model_len", "max_state_bytes") and value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise InvalidInputError(f"{name} must be an integer >= {low}, got {value!r}", param=name)
        for name in ("jump_forward", "overlap_masks"):
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise InvalidInputError(f"{name} must be True or False, got {value!r}", param=name)


@dataclass
class StepOutput:
    seq: Sequence
    token_ids: list[int]
    text: str  # the new detokenized text (cut before any stop string)
    finished: bool
    error: Exception | None = None
    events: list[Event] = field(default_factory=list)  # what the output parser made of ``text``


@dataclass(frozen=True)
class EngineStats:
    """What metrics and tests read about the engine, as one snapshot."""

    running: int
    waiting: int
    prefilled_tokens: int
    cached_tokens: int
    vision_encode_seconds: float
    vision_cache_hits: int
    vision_cache_misses: int
    prefix_cache_hits: int
    prompt_tokens: int = 0  # of every accepted request (cached ones included)
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)  # finish reason -> count
    state_bytes: int = 0  # the running sequences' state, as allocated
    state_bytes_peak: int = 0
    state_bytes_reserved: int = 0
    state_budget_bytes: int = 0


@dataclass
class MaskTimer:
    """Constrained-decoding counters: masks filled, seconds filling (on the mask thread) and applying, forced tokens."""

    count: int = 0
    fill_seconds: float = 0.0
    apply_seconds: float = 0.0
    forced: int = 0


def _masked(seq: Sequence) -> bool:
    return seq.constraint is not None and seq.constraint.active


def _joined(a: StepOutput, b: StepOutput) -> StepOutput:
    """Two consecutive outputs of one sequence as one (list and text fields concatenated)."""
    values = {}
    for f in fields(StepOutput):
        x, y = getattr(a, f.name), getattr(b, f.name)
        values[f.name] = x + y if isinstance(x, (list, str)) else y if f.name in ("finished", "error") else x
    return StepOutput(**values)


class Engine:
    def __init__(self, model: MiniCPMV, tokenizer, eos_token_ids: list[int], im_start_id: int,
                 config: EngineConfig | None = None):
        """``tokenizer`` is the ``tokenizers`` backend; ``im_start_id`` is ``<|im_start|>``, where turns begin."""
        self.model = model
        self.tokenizer = tokenizer
        self.eos_token_ids = list(eos_token_ids)
        self.im_start_id = im_start_id
        self.config = config or EngineConfig()
        self.max_model_len = self.config.max_model_len or model.cfg.text.max_position_embeddings
        self.state_budget = self.config.max_state_bytes or default_state_budget(model.device)
        self.scheduler = Scheduler(SchedulerConfig(
            self.config.max_num_seqs, self.config.max_num_batched_tokens, self.config.max_waiting, self.state_budget
        ))
        self.vision_cache = VisionCache(self.config.vision_cache_bytes)
        self.prefix_cache = PrefixCache(self.config.prefix_cache_bytes)
        self.runner = Runner(model, self.vision_cache)
        self.sampler = Sampler(self.eos_token_ids)
        self.never_sample = [t for t in (model.cfg.image_token_id, model.cfg.video_token_id) if t is not None]
        self.vocab_size = model.cfg.text.vocab_size
        self._llg_executor = None
        self.prefilled_tokens = 0  # counters for tests and metrics
        self.cached_tokens = 0
        self.masks = MaskTimer()
        self._mask_thread: ThreadPoolExecutor | None = None  # fills grammar masks while the forward runs
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.state_bytes = 0
        self.state_bytes_peak = 0

    def stats(self) -> EngineStats:
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting),
            prefilled_tokens=self.prefilled_tokens,
            cached_tokens=self.cached_tokens,
            vision_encode_seconds=self.runner.encode_seconds,
            vision_cache_hits=self.vision_cache.hits,
            vision_cache_misses=self.vision_cache.misses,
            prefix_cache_hits=self.prefix_cache.hits,
            prompt_tokens=self.prompt_tokens,
            generation_tokens=self.generation_tokens,
            finished=dict(self.finished),
            state_bytes=self.state_bytes,
            state_bytes_peak=self.state_bytes_peak,
            state_bytes_reserved=self.scheduler.reserved_bytes,
            state_budget_bytes=self.state_budget,
        )

    def state_cost(self, tokens: int) -> int:
        """Bytes of one sequence's state at ``tokens`` tokens."""
        return state_bytes(self.model.cfg.text, self.model.dtype, tokens)

    # -- requests ---------------------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if not seq.prompt_ids:
            raise InvalidInputError("the prompt is empty")
        limit = self.max_model_len
        wanted = seq.num_prompt + (seq.params.max_tokens or 1)
        if seq.num_prompt >= limit or (seq.params.max_tokens and wanted > limit):
            raise ContextLengthError(
                f"the prompt has {seq.num_prompt} tokens and asks for {seq.params.max_tokens or 'at least 1'} more, "
                f"but the context holds {limit} tokens",
                param="max_tokens" if seq.num_prompt < limit else "messages",
            )
        if 1 + len(seq.forks) > self.config.max_num_seqs:
            raise InvalidInputError(f"{1 + len(seq.forks)} choices do not fit max_num_seqs={self.config.max_num_seqs}", param="n")
        seq.reserved_tokens = min(seq.num_prompt + (seq.params.max_tokens or limit), limit)
        seq.reserved_bytes = (1 + len(seq.forks)) * self.state_cost(seq.reserved_tokens)  # n choices: n states
        if seq.reserved_bytes > self.state_budget:
            raise InvalidInputError(
                f"the prompt ({seq.num_prompt} tokens) plus max_tokens ({seq.params.max_tokens or 'the rest of the context'}) "
                f"needs {human(seq.reserved_bytes)} of sequence state, more than the server's state memory limit "
                f"(--max-state-memory) of {human(self.state_budget)}",
                param="max_tokens" if seq.params.max_tokens else "messages",
            )
        bias = seq.params.logit_bias
        vocab = self.model.cfg.text.vocab_size
        if bias and max(bias) >= vocab:
            raise InvalidInputError(f"logit_bias names token {max(bias)}, beyond the vocabulary of {vocab}", param="logit_bias")
        for kind in ("image", "video"):
            token = self.runner.token_ids[kind]
            placeholders = seq.prompt_ids.count(token) if token is not None else 0
            if placeholders != seq.visual_tokens(kind):
                raise InvalidInputError(
                    f"{kind} placeholders and inputs do not match: {placeholders} tokens, "
                    f"{seq.visual_tokens(kind)} expected by the {kind}s"
                )
        seq.generator = make_generator(seq.params.seed, self.model.device)
        for i, fork in enumerate(seq.forks, 1):  # seeded choices differ from one another, reproducibly
            fork.generator = make_generator(None if seq.params.seed is None else seq.params.seed + i, self.model.device)
            fork.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=fork.params.skip_special_tokens)
            fork.stop_matcher = StopStringMatcher(fork.params.stop)
        # The prompt's last turn starts after its final <|im_start|>: the next turn of this chat shares the prefix.
        starts = self._turn_starts(seq)
        seq.snapshot_at = starts[-1] if starts else 0
        seq.detokenizer = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=seq.params.skip_special_tokens)
        seq.stop_matcher = StopStringMatcher(seq.params.stop)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> Sequence | None:
        """End the request (with all its choices)."""
        found = None
        for seq in [*self.scheduler.running, *self.scheduler.waiting]:
            if seq.request_id == request_id or seq.group == request_id:
                found = found or seq
                for s in (seq, *seq.forks):
                    if s.status != Status.FINISHED:
                        self._finish(s, "abort")
        return found

    def has_work(self) -> bool:
        return len(self.scheduler) > 0

    def fail_running(self, error: Exception) -> list[StepOutput]:
        """End every running sequence with ``error`` (a step failed outside the model's forward)."""
        outputs = []
        for seq in list(self.scheduler.running):
            self._finish(seq, "error")
            outputs.append(StepOutput(seq, [], "", True, error=error))
        return outputs

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[StepOutput]:
        for seq in self.scheduler.admit():
            self._start(seq)
            self.prompt_tokens += seq.num_prompt
        batch = self.scheduler.schedule()
        if not batch:
            return []
        prefill_tokens = sum(n for seq, n in batch if seq.prefilling)
        # A chunk that crosses a sequence's snapshot point leaves the state there behind, from the same forward
        # (the model keeps the points that fall inside a chunk).
        snapshots = Snapshots({i: seq.snapshot_at - seq.num_computed for i, (seq, _) in enumerate(batch) if seq.prefilling})
        starts = [seq.num_computed for seq, _ in batch]
        scored = [seq.prefilling and seq.params.prompt_logprobs is not None for seq, _ in batch]
        masks = self._start_masks(batch)
        try:
            logits = self.runner.run(batch, snapshots, all_logits=any(scored))
            masked, bitmask = masks.result() if masks is not None else ([], None)
        except Exception as exc:  # a failed forward ends the sequences in it, never the engine
            outputs = []
            for seq, _ in batch:
                self._finish(seq, "error")
                outputs.append(StepOutput(seq, [], "", True, error=exc))
            return outputs
        self.prefilled_tokens += prefill_tokens
        self._measure_state()
        for seq, _ in batch:
            if not seq.prefilling:
                seq.features.clear()  # the prompt is in the state: its visual features are no longer needed
            if seq.snapshot_at and seq.num_computed == seq.snapshot_at:
                self.prefix_cache.put(self._prefix_key(seq, seq.snapshot_at), seq.state)
        for i, state in snapshots.states.items():
            seq = batch[i][0]
            self.prefix_cache.put(self._prefix_key(seq, seq.snapshot_at), state)
        if any(scored):  # every fed token's logits: score the prompt tokens they predict, keep each last row
            ends = torch.tensor([n for _, n in batch]).cumsum(0)
            for i, (seq, n) in enumerate(batch):
                if scored[i]:
                    self._score_prompt(seq, logits[int(ends[i]) - n : int(ends[i])], starts[i])
            logits = logits[ends - 1]
        seqs, ready = [], []
        for i, (seq, _) in enumerate(batch):
            if seq.prefilling:
                continue
            choices = [seq, *self._start_forks(seq)] if seq.forks and not seq.output_ids else [seq]
            seqs += choices
            ready += [i] * len(choices)
        if not ready:
            return []
        rows = logits[ready]
        if self.never_sample:
            rows[:, self.never_sample] = float("-inf")
        if bitmask is not None:
            self._apply_masks(rows, seqs, masked, bitmask)
        sampled = self.sampler(rows, [SampleRow(s.params, s.prompt_ids, s.output_ids, s.generator) for s in seqs])
        tokens = [self._forced(s, t) for s, t in zip(seqs, sampled.token_ids)]
        self.generation_tokens += len(tokens)
        return [self._emit(*args) for args in zip(seqs, tokens, sampled.logprobs)]

    # -- constrained decoding ---------------------------------------------------------------------------------
    def _start_masks(self, batch: list[tuple[Sequence, int]]) -> Future | None:
        """Fill the grammar masks of the sequences that sample after this forward: on a worker thread (llguidance
        releases the GIL), so the cost hides behind the forward, or here and now (``overlap_masks`` False). The
        matchers are not touched until it is done."""
        seqs = [seq for seq, n in batch if seq.num_pending == n and _masked(seq)]
        if not seqs:
            return None
        if not self.config.overlap_masks:
            done: Future = Future()
            done.set_result(self._fill_masks(seqs))
            return done
        if self._mask_thread is None:
            self._mask_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="minicpmv-masks")
        return self._mask_thread.submit(self._fill_masks, seqs)

    def _fill_masks(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        start = time.perf_counter()
        bitmask = torch.empty((len(seqs), mask_words(self.vocab_size)), dtype=torch.int32)
        fill_bitmask([s.constraint for s in seqs], bitmask, self._mask_executor())
        self.masks.fill_seconds += time.perf_counter() - start
        self.masks.count += len(seqs)
        return seqs, bitmask

    def _apply_masks(self, rows: torch.Tensor, seqs: list[Sequence], masked: list[Sequence], bitmask: torch.Tensor):
        """Each constrained row gets its sequence's mask; a fork started this step shares its parent's (both are
        at the grammar's start)."""
        index = {s.request_id: k for k, s in enumerate(masked)}
        start = time.perf_counter()
        pairs = [(j, index.get(s.request_id, index.get(s.group))) for j, s in enumerate(seqs) if _masked(s)]
        if len(pairs) == len(seqs) and [k for _, k in pairs] == list(range(len(seqs))):
            apply_bitmask(rows, bitmask)
        else:  # row views: no copy of the other rows' logits
            for j, k in pairs:
                apply_bitmask(rows[j : j + 1], bitmask[k : k + 1])
        self.masks.apply_seconds += time.perf_counter() - start

    def _mask_executor(self):
        if self._llg_executor is None:
            import llguidance

            self._llg_executor = llguidance.LLExecutor()
        return self._llg_executor

    def _emit(self, seq: Sequence, token: int, logprob) -> StepOutput:
        """Append the sampled token, advance the grammar, then append the tokens the grammar forces after it
        (jump-forward: the next forward feeds them as one chunk). Every token passes the same stop checks."""
        out = self._advance(seq, token, logprob)
        if seq.constraint is None or seq.params.logprobs is not None or not self.config.jump_forward:
            return out  # (forced tokens would have no logprobs)
        while not out.finished:
            forced = seq.constraint.forced() if seq.constraint.active else []
            if not forced:
                break
            for t in forced:
                if not seq.params.greedy:  # the draw step-by-step sampling would make: seeded outputs stay the same
                    torch.empty(self.vocab_size, device=seq.generator.device).exponential_(generator=seq.generator)
                out = _joined(out, self._advance(seq, t, None))
                if out.finished:
                    break
            self.masks.forced += len(forced)
        return out

    def _advance(self, seq: Sequence, token: int, logprob) -> StepOutput:
        constraint = seq.constraint
        if constraint is not None and constraint.done:
            ends = seq.params.resolved_stop_token_ids(self.eos_token_ids) or self.eos_token_ids
            if token not in ends and token not in self.eos_token_ids:
                token = ends[0]  # min_tokens held the end tokens back, but the grammar admits nothing else
        if constraint is not None:
            try:
                constraint.accept(token)
            except RuntimeError as exc:  # only a test hook's forced tokens can break the grammar
                self._finish(seq, "error")
                return StepOutput(seq, [], "", True, error=exc)
        return self._append(seq, token, logprob)

    def _start_forks(self, seq: Sequence) -> list[Sequence]:
        """n > 1: the other choices start now, from copies of the state ``seq``'s prefill just computed."""
        started = []
        for fork in seq.forks:
            if fork.status != Status.WAITING or fork.state is not None:
                continue
            fork.state, fork.num_cached = seq.state.clone(), seq.num_cached
            fork.prompt_logprobs = list(seq.prompt_logprobs)
            fork.status = Status.RUNNING
            self.scheduler.running.append(fork)
            started.append(fork)
        return started

    def _score_prompt(self, seq: Sequence, rows: torch.Tensor, start: int) -> None:
        """Logprobs of the prompt tokens after ``start`` predicted by this chunk's logits ``rows`` (raw, like the
        sampled tokens' logprobs); the first prompt token has none."""
        if start == 0:
            seq.prompt_logprobs = [None]
        targets = seq.prompt_ids[start + 1 : start + 1 + rows.shape[0]]
        n = seq.params.prompt_logprobs
        for lo in range(0, len(targets), 256):  # a few rows at a time: a row is vocab-sized
            part = targets[lo : lo + 256]
            logp = rows[lo : lo + len(part)].float().log_softmax(dim=-1)
            chosen = logp.gather(1, torch.tensor(part, device=logp.device).unsqueeze(1))
            ranks = ((logp > chosen).sum(dim=-1) + 1).tolist()
            top = torch.topk(logp, min(n, logp.shape[1]), dim=-1) if n else None
            values = chosen.squeeze(1).tolist()
            top_ids = top.indices.tolist() if top is not None else [[] for _ in part]
            top_values = top.values.tolist() if top is not None else [[] for _ in part]
            for j, token in enumerate(part):
                seq.prompt_logprobs.append(TokenLogprobs(token, values[j], ranks[j], top_ids[j], top_values[j]))

    def _forced(self, seq: Sequence, sampled: int) -> int:
        """The test hook: a sequence with ``forced_output_ids`` emits them (then its first stop id) instead."""
        forced = seq.forced_output_ids
        if forced is None:
            return sampled
        n = len(seq.output_ids)
        if n < len(forced):
            return forced[n]
        stops = seq.params.resolved_stop_token_ids(self.eos_token_ids)
        return stops[0] if stops else sampled

    def _prefix_key(self, seq: Sequence, length: int) -> str:
        image, video = self.runner.token_ids["image"], self.runner.token_ids["video"]
        prefix = seq.prompt_ids[:length]
        counts = {"image": prefix.count(image), "video": prefix.count(video)}
        keys, seen = [], {"image": 0, "video": 0}
        for v in seq.visuals:  # every visual whose placeholders start inside the prefix
            if seen[v.kind] < counts[v.kind]:
                keys.append(v.key)
            seen[v.kind] += v.num_tokens
        if seq.lora:  # an adapter changes the states
            keys.append(f"lora:{seq.lora}")
        return prefix_key(prefix, keys)

    def _start(self, seq: Sequence) -> None:
        """Give a newly admitted sequence its state: a copy of the longest cached prefix state that matches (the
        turns of a chat start after each <|im_start|>), else an empty one."""
        seq.state = None
        scored = seq.params.prompt_logprobs is not None  # a cached prefix has no logits to score
        for pos in [] if scored else reversed(self._turn_starts(seq)):
            hit = self.prefix_cache.get(self._prefix_key(seq, pos), pos)
            if hit is not None:
                seq.state, seq.num_cached = hit.state, hit.length
                self.cached_tokens += hit.length
                break
        if seq.state is None:
            seq.state = self.model.new_state(capacity=min(256, seq.reserved_tokens or 256))
        if seq.reserved_tokens:
            seq.state.max_length = seq.reserved_tokens

    def _turn_starts(self, seq: Sequence) -> list[int]:
        return [i + 1 for i, t in enumerate(seq.prompt_ids) if t == self.im_start_id and i + 1 < seq.num_prompt]

    def _append(self, seq: Sequence, token: int, logprob) -> StepOutput:
        seq.output_ids.append(token)
        if logprob is not None:
            seq.logprobs.append(logprob)
        params, stops = seq.params, seq.stop_matcher
        # Before min_tokens nothing stops the output: stop ids are never sampled and stop strings cannot complete.
        check = stops.feed(seq.detokenizer.push(token), can_stop=len(seq.output_ids) >= params.min_tokens)
        text, stopped = check.text, check.stop is not None
        events = self._parse(seq, text)
        reason = None
        if stopped or token in params.resolved_stop_token_ids(self.eos_token_ids):  # never sampled before min_tokens
            reason = "stop"
        elif seq.constraint is not None and seq.constraint.done and token in self.eos_token_ids:
            reason = "stop"  # a complete grammar admits only the model's end tokens, whatever the stop ids say
        elif seq.stop_after_tool_call and any(isinstance(e, ToolCallEnd) for e in events):
            reason = "stop"
        elif params.max_tokens is not None and len(seq.output_ids) >= params.max_tokens:
            reason = "length"
        elif seq.num_prompt + len(seq.output_ids) >= self.max_model_len:
            reason = "length"
        if reason is not None:
            if not stopped:  # release what the detokenizer and the stop matcher held back
                check = stops.feed(seq.detokenizer.flush())
                tail = check.text + ("" if check.stop else stops.flush())
                text += tail
                events += self._parse(seq, tail)
            if seq.parser is not None:
                events += seq.parser.finish()
            self._finish(seq, reason)
        seq.text += text
        seq.events += events
        return StepOutput(seq, [token], text, reason is not None, events=events)

    @staticmethod
    def _parse(seq: Sequence, text: str) -> list[Event]:
        if not text:
            return []
        return seq.parser.feed(text) if seq.parser is not None else [ContentDelta(text)]

    def _finish(self, seq: Sequence, reason: str) -> None:
        self.scheduler.remove(seq)
        self.finished[reason] = self.finished.get(reason, 0) + 1
        seq.status, seq.finish_reason = Status.FINISHED, reason
        seq.state = None  # frees the KV and DeltaNet state
        seq.features.clear()
        self._measure_state()

    def _measure_state(self) -> None:
        self.state_bytes = sum(s.state.nbytes() for s in self.scheduler.running if s.state is not None)
        self.state_bytes_peak = max(self.state_bytes_peak, self.state_bytes)
