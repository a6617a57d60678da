"""The few worker threads that do every blocking audio job in the process.

A thread per player collapses at a few hundred streams (performance-notes §7), so playback runs no thread of
its own. Blocking work goes to two small shared pools instead, and each result comes back to the event loop
with one ``call_soon_threadsafe``:

- **source** threads open, read, seek and close sources (demuxing, FFmpeg decoding, file and network I/O).
  A network read can block for seconds, so these are kept apart from the codec threads: a stalled stream
  must not delay every session's encoder.
- **codec** threads mix and Opus-encode. libopus (ctypes) and FFmpeg release the GIL while they work. The
  default is one thread fewer than the machine has cores (at least one): measured on two cores, a second
  codec thread made every encoded frame ~20% dearer through GIL hand-offs with the event loop's thread,
  while one thread already encodes ~70 streams at 128 kbit/s.

Both pools are bounded: a thread starts when a job finds every existing one busy, up to the maximum, and
then stays. They are daemon threads, so a source stuck in a network read never keeps the process alive.
A job is a plain ``(function, args, loop, callback)`` tuple on a ``SimpleQueue``: submitting costs a few
microseconds, a fraction of ``ThreadPoolExecutor.submit`` with its futures and locks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any, Final, TypeAlias, TypeVar

from cordvoice.errors import InvalidArgumentError

__all__ = ["AudioWorkers", "JobDone", "WorkerPool", "configure_workers", "get_workers"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

JobDone: TypeAlias = Callable[[Any, BaseException | None], None]
"""Called on the event loop with ``(result, None)`` or ``(None, error)``."""

DEFAULT_SOURCE_THREADS: Final = 8
"""Concurrent source jobs; more only matters when many sources block on slow networks at once."""

_Job: TypeAlias = tuple[Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, JobDone]


def default_codec_threads() -> int:
    """One per core beyond the event loop's, at least one and at most four."""
    return max(1, min(4, (os.cpu_count() or 1) - 1))


class WorkerPool:
    """A bounded set of daemon threads taking jobs from one queue."""

    def __init__(self, name: str, max_threads: int) -> None:
        if max_threads < 1:
            raise InvalidArgumentError(f"a worker pool needs at least one thread, got {max_threads}")
        self.name = name
        self.max_threads = max_threads
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._busy = 0
        self._closed = False
        self.jobs_run = 0
        self.jobs_failed = 0

    @property
    def threads(self) -> int:
        return len(self._threads)

    def submit(
        self,
        function: Callable[..., Any],
        args: tuple[Any, ...],
        loop: asyncio.AbstractEventLoop,
        done: JobDone,
    ) -> None:
        """Run ``function(*args)`` on a worker and call ``done(result, error)`` on ``loop`` afterwards."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"the {self.name} pool is shut down")
            self._busy += 1
            if self._busy > len(self._threads) and len(self._threads) < self.max_threads:
                thread = threading.Thread(
                    target=self._work, name=f"cordvoice-{self.name}-{len(self._threads)}", daemon=True
                )
                self._threads.append(thread)
                thread.start()
        self._jobs.put((function, args, loop, done))

    def shutdown(self) -> None:
        """Let every thread finish its current job and exit; queued jobs still run first."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            count = len(self._threads)
        for _ in range(count):
            self._jobs.put(None)

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            if job is None:
                return
            function, args, loop, done = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = function(*args)
            except BaseException as exc:  # delivered to the caller, who decides
                error = exc
                self.jobs_failed += 1
            self.jobs_run += 1
            del job, function, args  # drop references before blocking on the next job
            try:
                loop.call_soon_threadsafe(done, result, error)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                logger.debug("an audio job finished after its event loop closed")
            del result, error, loop, done
            with self._lock:
                self._busy -= 1


class AudioWorkers:
    """The two pools: ``source`` (I/O and demux/decode) and ``codec`` (mix and encode)."""

    def __init__(
        self, *, source_threads: int = DEFAULT_SOURCE_THREADS, codec_threads: int | None = None
    ) -> None:
        self.source = WorkerPool("source", source_threads)
        self.codec = WorkerPool(
            "codec", codec_threads if codec_threads is not None else default_codec_threads()
        )

    def shutdown(self) -> None:
        self.source.shutdown()
        self.codec.shutdown()


_lock = threading.Lock()
_workers: AudioWorkers | None = None


def get_workers() -> AudioWorkers:
    """The process-wide worker pools, created on first use."""
    global _workers  # noqa: PLW0603 - one shared pool per process is the point
    with _lock:
        if _workers is None:
            _workers = AudioWorkers()
        return _workers


def configure_workers(
    *, source_threads: int = DEFAULT_SOURCE_THREADS, codec_threads: int | None = None
) -> None:
    """Resize the shared pools. Jobs already queued finish on the old threads, which then exit."""
    global _workers
    new = AudioWorkers(source_threads=source_threads, codec_threads=codec_threads)
    with _lock:
        old, _workers = _workers, new
    if old is not None:
        old.shutdown()
