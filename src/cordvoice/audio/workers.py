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
A job is a plain tuple on a ``SimpleQueue``: submitting costs a few microseconds, a fraction of
``ThreadPoolExecutor.submit`` with its futures and locks.

**Results without a wake-up.** Waking an event loop from another thread (``call_soon_threadsafe``: a
self-pipe write, ``epoll_wait`` returning, one loop iteration) costs 70-120 µs of CPU on a virtual machine,
about half an Opus encode (docs/benchmarks.md). Most results are not awaited by anyone: a player that still
has frames rendered ahead only needs its next batch by its next 20 ms tick. A job submitted with ``wake=``
therefore leaves its result in the loop's :class:`Mailbox`, and the worker wakes the loop only when
``wake()`` (evaluated on the worker, after the job) says someone waits now. Players empty the mailbox on
every pull. The rule that keeps this safe: whoever starts waiting for such a result first makes its
``wake()`` true and then calls :meth:`Mailbox.collect_soon`, so either it finds the result or the worker,
which posts before it asks ``wake()``, sees the change and wakes the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import threading
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, Final, TypeAlias, TypeVar

from cordvoice.errors import InvalidArgumentError

__all__ = [
    "AudioWorkers",
    "JobDone",
    "Mailbox",
    "WakeTest",
    "WorkerPool",
    "configure_workers",
    "get_mailbox",
    "get_workers",
    "usable_cores",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

JobDone: TypeAlias = Callable[[Any, BaseException | None], None]
"""Called on the event loop with ``(result, None)`` or ``(None, error)``."""

DEFAULT_SOURCE_THREADS: Final = 8
"""Concurrent source jobs; more only matters when many sources block on slow networks at once."""

WakeTest: TypeAlias = Callable[[], bool]
"""Asked on the worker thread once a job is done: must the event loop wake for its result now?"""

_Job: TypeAlias = tuple[
    Callable[..., Any], tuple[Any, ...], asyncio.AbstractEventLoop, JobDone, "Mailbox | None", WakeTest | None
]


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity): what worker threads can use in parallel.

    ``os.cpu_count()`` counts the whole machine; a process pinned to one core gains nothing from more
    threads and pays for every extra hand-off.
    """
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


def default_codec_threads() -> int:
    """One per usable core beyond the event loop's, at least one and at most four."""
    return max(1, min(4, usable_cores() - 1))


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
        *,
        wake: WakeTest | None = None,
    ) -> None:
        """Run ``function(*args)`` on a worker and call ``done(result, error)`` on ``loop`` afterwards.

        Without ``wake`` the loop is woken for every result. With it, the result waits in the loop's
        :class:`Mailbox` unless ``wake()`` returns true when the job ends (see the module docstring).
        """
        mailbox = None if wake is None else get_mailbox(loop)
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
        self._jobs.put((function, args, loop, done, mailbox, wake))

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
            function, args, loop, done, mailbox, wake = job
            result: Any = None
            error: BaseException | None = None
            try:
                result = function(*args)
            except BaseException as exc:  # delivered to the caller, who decides
                error = exc
                self.jobs_failed += 1
            self.jobs_run += 1
            del job, function, args  # drop references before blocking on the next job
            if mailbox is not None and wake is not None:
                mailbox.post(done, result, error, wake)
            else:
                try:
                    loop.call_soon_threadsafe(done, result, error)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    logger.debug("an audio job finished after its event loop closed")
            del result, error, loop, done, mailbox, wake
            with self._lock:
                self._busy -= 1


class Mailbox:
    """Job results waiting for one event loop, delivered without waking it unless someone waits.

    Workers :meth:`post`; the loop's thread runs the callbacks in :meth:`collect` (players call it on every
    pull, and a wake-up calls it). Get a loop's mailbox with :func:`get_mailbox`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_ref = weakref.ref(loop)  # weak: the mailbox lives in a dict keyed weakly by its loop
        self.pending: deque[tuple[JobDone, Any, BaseException | None]] = deque()
        """The waiting results (read-only): true when :meth:`collect` has work. Cheaper than ``len()`` for a
        check made on every pull."""
        self._wake_pending = False
        self._collect_pending = False
        self.woken = 0
        """Results that woke the loop."""
        self.quiet = 0
        """Results left for the next collect, without a wake-up."""
        self.callback_errors = 0

    def __len__(self) -> int:
        return len(self.pending)

    def post(self, done: JobDone, result: Any, error: BaseException | None, wake: WakeTest) -> None:
        """Leave a result (on a worker thread); wake the loop if ``wake()`` says someone waits."""
        self.pending.append((done, result, error))
        try:
            urgent = wake()
        except Exception:  # a broken test must not strand the result: wake to be safe
            logger.exception("an audio job's wake test failed")
            urgent = True
        if not urgent:
            self.quiet += 1
            return
        self.woken += 1
        if self._wake_pending:
            return  # a wake-up is on its way; it collects this result too
        self._wake_pending = True
        loop = self._loop_ref()
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self._woken)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            logger.debug("an audio job finished after its event loop closed")

    def collect(self) -> None:
        """Run every waiting callback now (on the loop's thread)."""
        items = self.pending
        while items:
            try:
                done, result, error = items.popleft()
            except IndexError:  # a callback collected the rest
                return
            try:
                done(result, error)
            except Exception:
                self.callback_errors += 1
                logger.exception("an audio job's completion callback failed")

    def collect_soon(self) -> None:
        """Collect on the next loop iteration: for callers that may be inside another callback."""
        loop = self._loop_ref()
        if not self._collect_pending and loop is not None:
            self._collect_pending = True
            loop.call_soon(self._collect_later)

    def _collect_later(self) -> None:
        self._collect_pending = False
        self.collect()

    def _woken(self) -> None:
        self._wake_pending = False  # before collecting: a result posted meanwhile is collected or wakes again
        self.collect()


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()
_mailbox_lock = threading.Lock()


def get_mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The mailbox of ``loop``, created on first use."""
    mailbox = _mailboxes.get(loop)
    if mailbox is None:
        with _mailbox_lock:
            mailbox = _mailboxes.get(loop)
            if mailbox is None:
                mailbox = _mailboxes[loop] = Mailbox(loop)
    return mailbox


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
