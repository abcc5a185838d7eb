"""Stop strings over streamed text (OpenAI semantics: output ends right before the stop string).

Text that could still grow into a stop string is held back, so nothing emitted ever has to be
taken back. The first stop to *complete* wins (smallest end position, then the longest), which
makes the result independent of how the text was split into deltas.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass
class StopCheck:
    text: str  # safe to emit now
    stop: str | None = None  # the stop string that just ended the output, if any


class StopStringMatcher:
    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        self.stops = list(dict.fromkeys(stops))
        self._max_len = max((len(s) for s in self.stops), default=0)
        self._held = ""
        self.stopped: str | None = None

    def feed(self, delta: str, can_stop: bool = True) -> StopCheck:
        """``can_stop`` False (before ``min_tokens``): complete stops are passed over, but the tail that may begin
        one is still held back, so a stop that starts now and ends later is found."""
        if self.stopped is not None:
            return StopCheck("", None)
        buffer = self._held + delta
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for stop in self.stops if can_stop else ():
            start = buffer.find(stop)
            if start >= 0:
                candidate = (start + len(stop), -len(stop), stop)
                best = candidate if best is None else min(best, candidate)
        if best is not None:
            end, neg_len, stop = best
            self._held = ""
            self.stopped = stop
            return StopCheck(buffer[: end + neg_len], stop)
        hold = self._partial_match_length(buffer)
        self._held = buffer[len(buffer) - hold :] if hold else ""
        return StopCheck(buffer[: len(buffer) - hold])

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest tail of ``text`` that is a proper prefix of some stop string."""
        for n in range(min(len(text), self._max_len - 1), 0, -1):
            tail = text[-n:]
            if any(stop.startswith(tail) for stop in self.stops):
                return n
        return 0

    def flush(self) -> str:
        """Release the held tail at the end of the stream (a partial match is not a stop)."""
        held, self._held = self._held, ""
        return "" if self.stopped is not None else held
