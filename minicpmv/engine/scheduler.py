"""Which sequences run in the next forward, and with how many tokens.

Every step: each running sequence past its prompt decodes one token; the remaining token budget goes to prompt
chunks (running sequences first, then new ones admitted from the waiting queue up to ``max_num_seqs``).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from minicpmv.engine.sequence import Sequence, Status
from minicpmv.errors import QueueFullError


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 1024
    max_waiting: int = 256
    max_state_bytes: int | None = None  # the running sequences' reservations stay within it (None: no limit)


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.reserved_bytes = 0  # state memory reserved by the running sequences

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"the request queue is full ({self.config.max_waiting} waiting); retry later")
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting sequences into the running set while there is room; return the newly admitted."""
        admitted, budget = [], self.config.max_state_bytes
        # A request with n choices takes n slots (its forks join the running set after its prefill).
        while self.waiting and (not self.running or len(self.running) + len(self.waiting[0].forks) < self.config.max_num_seqs):
            if budget is not None and self.reserved_bytes + self.waiting[0].reserved_bytes > budget:
                break  # first come, first served: the head waits for memory, and nothing overtakes it
            seq = self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            self.reserved_bytes += seq.reserved_bytes
            admitted.append(seq)
        return admitted

    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, number of tokens to feed) for the next forward."""
        # A decoding sequence feeds its last sampled token, plus any a grammar forced after it (jump-forward).
        batch = [(s, s.num_pending) for s in self.running if not s.prefilling]
        budget = self.config.max_num_batched_tokens - sum(n for _, n in batch)
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.prefilling:
                continue
            start = seq.num_computed
            n = min(seq.num_prompt - start, budget)
            batch.append((seq, n))
            budget -= n
        return batch

    def remove(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.reserved_bytes -= seq.reserved_bytes
        elif seq in self.waiting:
            self.waiting.remove(seq)

    def __len__(self) -> int:
        return len(self.waiting) + len(self.running)
