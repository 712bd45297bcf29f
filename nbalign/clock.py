"""Where a run's time went: wall seconds by phase (loading, data, training, evaluation, saving), and the
line that says it."""

from __future__ import annotations

import contextlib
import time


class Clock:
    """Wall seconds a run spends in each phase, for the first line of its summary: where the time went."""

    PHASES = ("loading", "data", "training", "evaluation", "saving")

    def __init__(self):
        self.seconds = dict.fromkeys(self.PHASES, 0.0)

    @contextlib.contextmanager
    def phase(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] += time.perf_counter() - start

    def moved(self, seconds: float, source: str, target: str) -> None:
        """Time measured inside another phase (the evaluation during training) counted where it belongs."""
        seconds = min(seconds, self.seconds[source])
        self.seconds[source] -= seconds
        self.seconds[target] += seconds

    def summary(self) -> dict:
        return {name: round(self.seconds[name], 2) for name in self.PHASES}


def describe_times(times: dict) -> str:
    """'1 min 36 s: loading 3.1 s, data 0.4 s, training 52 s, evaluation 40 s, saving 0.8 s' (total first)."""
    def fmt(s: float) -> str:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {s % 60:.0f} s"

    parts = ", ".join(f"{name} {fmt(float(s))}" for name, s in times.items())
    return f"{fmt(sum(float(s) for s in times.values()))} ({parts})"
