"""Allocation-free measurement helpers shared by sessions, the emulator and the benchmarks."""

from __future__ import annotations

import bisect
import math
import operator
from collections.abc import Sequence

from cordvoice.errors import InvalidArgumentError


def nearest_rank(count: int, p: float) -> int:
    """The 1-based rank of percentile ``p`` (0-100) among ``count`` sorted values: ``ceil(count * p / 100)``.

    Ceiling, not ``round``: Python rounds halves to even, which put the median of five values at the second
    and let the two slowest of 150 packets vanish from a p99. The small slack absorbs binary fractions
    (99.9 is not exact) so that an exact rank is not pushed up by one.
    """
    return max(1, math.ceil(count * p / 100 - 1e-6))


# Bucket upper bounds in milliseconds: fine where pacing lives (under 5 ms), coarse in the tail.
_DEFAULT_BOUNDS_MS: tuple[float, ...] = (
    *(x / 4 for x in range(1, 21)),  # 0.25 .. 5 ms in 0.25 ms steps
    *(5.0 + x * 0.5 for x in range(1, 11)),  # 5.5 .. 10 ms
    *(10.0 + x * 2 for x in range(1, 21)),  # 12 .. 50 ms
    75.0,
    100.0,
    200.0,
    500.0,
    1000.0,
    float("inf"),
)


class Histogram:
    """A fixed-bucket histogram of millisecond values.

    Recording is a bisect and an increment, so it can sit on the 20 ms hot path of a
    thousand sessions. Percentiles are read from the buckets (the upper bound of the bucket
    holding the rank): exact enough for pacing figures, and bounded in memory however long a
    session lives. Values below zero (uvloop fires timers up to ~1 ms early) land in the first
    bucket and are kept in ``min_ms``.
    """

    __slots__ = ("_bounds", "_counts", "count", "max_ms", "min_ms", "total_ms")

    def __init__(self, bounds_ms: Sequence[float] = _DEFAULT_BOUNDS_MS) -> None:
        if bounds_ms is not _DEFAULT_BOUNDS_MS and (not bounds_ms or list(bounds_ms) != sorted(bounds_ms)):
            raise InvalidArgumentError("histogram bounds must be a non-empty ascending sequence")
        self._bounds: tuple[float, ...] = tuple(bounds_ms)
        self._counts = [0] * len(self._bounds)
        self.count = 0
        self.total_ms = 0.0
        self.max_ms = float("-inf")
        self.min_ms = float("inf")

    def record(self, value_ms: float) -> None:
        index = bisect.bisect_left(self._bounds, value_ms)
        if index == len(self._bounds):  # NaN or a value above an explicit finite last bound
            index -= 1
        self._counts[index] += 1
        self.count += 1
        self.total_ms += value_ms
        self.max_ms = max(self.max_ms, value_ms)
        self.min_ms = min(self.min_ms, value_ms)

    def percentile(self, p: float) -> float:
        """The bucket bound at percentile ``p`` (0-100); 0.0 when nothing was recorded."""
        if not 0 <= p <= 100:
            raise InvalidArgumentError(f"percentile must be within 0..100, got {p}")
        if self.count == 0:
            return 0.0
        rank = nearest_rank(self.count, p)
        seen = 0
        for bound, n in zip(self._bounds, self._counts, strict=True):
            seen += n
            if seen >= rank:
                return min(bound, self.max_ms)
        return self.max_ms  # pragma: no cover - unreachable, counts always sum to count

    def merge(self, other: Histogram) -> None:
        self._check_buckets(other)
        self._counts = list(map(operator.add, self._counts, other._counts))  # same length: same bounds
        self.count += other.count
        self.total_ms += other.total_ms
        self.max_ms = max(self.max_ms, other.max_ms)
        self.min_ms = min(self.min_ms, other.min_ms)

    def copy(self) -> Histogram:
        twin = Histogram(self._bounds)
        twin._counts = self._counts.copy()
        twin.count, twin.total_ms = self.count, self.total_ms
        twin.max_ms, twin.min_ms = self.max_ms, self.min_ms
        return twin

    def since(self, earlier: Histogram) -> Histogram:
        """What this histogram recorded after ``earlier`` was copied from it (see :meth:`copy`).

        Counts and the total are exact. An extreme is exact when it was set in that window; otherwise the
        window's extreme is not known, and the bound of its outermost non-empty bucket stands in for it.
        """
        self._check_buckets(earlier)
        window = Histogram(self._bounds)
        counts = window._counts = list(map(operator.sub, self._counts, earlier._counts))
        window.count = self.count - earlier.count
        window.total_ms = self.total_ms - earlier.total_ms
        if window.count:
            # Scan the buckets only for an extreme the window did not set: Session.stats runs this for every
            # session it reads.
            if self.max_ms > earlier.max_ms:
                window.max_ms = self.max_ms
            else:
                top = next(i for i in range(len(counts) - 1, -1, -1) if counts[i])
                window.max_ms = min(self.max_ms, self._bounds[top])
            if self.min_ms < earlier.min_ms:
                window.min_ms = self.min_ms
            else:
                bottom = next(i for i, n in enumerate(counts) if n)
                window.min_ms = max(self.min_ms, self._bounds[bottom - 1] if bottom else 0.0)
        return window

    def _check_buckets(self, other: Histogram) -> None:
        if other._bounds != self._bounds:
            raise InvalidArgumentError("cannot combine histograms with different buckets")

    def summary(self) -> dict[str, float | int]:
        """p50/p99/max/mean in milliseconds, ready for JSON output."""
        if self.count == 0:
            return {"count": 0, "p50": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
        return {
            "count": self.count,
            "p50": round(self.percentile(50), 3),
            "p99": round(self.percentile(99), 3),
            "max": round(self.max_ms, 3),
            "mean": round(self.total_ms / self.count, 3),
        }
