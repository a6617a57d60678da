"""Garbage-collector pauses during a measurement window (``gc.callbacks``).

A process holding a thousand voice sessions has a large heap; a full (generation 2) collection then stops
the event loop for tens of milliseconds, which shows up directly in pacing lateness. The benchmarks report
the pauses so that a lateness tail can be told apart from a CPU shortage.
"""

from __future__ import annotations

import gc
import time
from typing import Any

__all__ = ["GcWatch"]


class GcWatch:
    """Counts collections per generation and their pause times while started."""

    def __init__(self) -> None:
        self.counts = [0, 0, 0]
        self.pause_total = [0.0, 0.0, 0.0]
        self.pause_max = [0.0, 0.0, 0.0]
        self._started_at = 0.0
        self._active = False

    def start(self) -> None:
        if not self._active:
            gc.callbacks.append(self._callback)
            self._active = True

    def stop(self) -> None:
        if self._active:
            gc.callbacks.remove(self._callback)
            self._active = False

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started_at = time.perf_counter()
            return
        generation = int(info.get("generation", 0))
        pause = time.perf_counter() - self._started_at
        self.counts[generation] += 1
        self.pause_total[generation] += pause
        self.pause_max[generation] = max(self.pause_max[generation], pause)

    def report(self) -> dict[str, Any]:
        return {
            "collections": list(self.counts),
            "pause_total_ms": [round(x * 1000, 2) for x in self.pause_total],
            "pause_max_ms": [round(x * 1000, 2) for x in self.pause_max],
            "tracked_objects": len(gc.get_objects()),
            "frozen_objects": gc.get_freeze_count(),
        }
