"""The shared clock's single timer: a Linux ``timerfd`` on asyncio's own loop, else the loop's ``call_at``.

asyncio's selector loop sleeps in ``epoll_wait`` with its timeout rounded *up* to a whole millisecond, so a
``call_at`` timer fires 0-1 ms after its deadline: on this project's VM a 20 ms periodic timer woke 0.65 ms
late at the median and 1.1 ms at p90. That lateness is jitter every stream carries to its listeners. A
``timerfd`` armed at the absolute deadline (nanosecond resolution, ``CLOCK_MONOTONIC``, the clock behind
``loop.time()``) wakes the same ``epoll_wait`` 0.10-0.13 ms late at the median and 0.16-0.19 ms at p90, for
the same CPU per wake-up (docs/benchmarks.md).

The ``timerfd`` is used only where both hold: Linux, and a loop whose ``time()`` is the standard library's
``time.monotonic()`` (asyncio's selector loops). uvloop keeps ``call_at``: its ``time()`` is libuv's cached
millisecond clock, so a deadline in its terms is not a point on ``CLOCK_MONOTONIC``.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys
import weakref
from collections.abc import Callable
from typing import Protocol

__all__ = ["WakeTimer", "make_wake_timer"]

logger = logging.getLogger(__name__)


class WakeTimer(Protocol):
    """One pending wake-up at a time: :meth:`arm` replaces it, :meth:`cancel` drops it."""

    def arm(self, when: float) -> None:
        """Call back at ``when`` (loop time); a deadline already past calls back on the next iteration."""

    def cancel(self) -> None:
        """Drop the pending wake-up, if any."""

    def close(self) -> None:
        """Release what the timer holds (it may be armed again afterwards)."""


def make_wake_timer(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> WakeTimer:
    """The most precise timer ``loop`` supports, calling ``callback`` on the loop's thread."""
    if _libc is not None and type(loop).time is asyncio.BaseEventLoop.time and hasattr(loop, "add_reader"):
        return _TimerFd(loop, callback)
    return _CallAt(loop, callback)


class _CallAt:
    """The portable timer: ``loop.call_at``."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop_ref = weakref.ref(loop)  # the clock holds its loop weakly; so does its timer
        self._callback = callback
        self._handle: asyncio.Handle | None = None

    def arm(self, when: float) -> None:
        self.cancel()
        loop = self._loop_ref()
        if loop is not None:
            self._handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._callback()

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def close(self) -> None:
        self.cancel()


class _TimeSpec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _ITimerSpec(ctypes.Structure):
    _fields_ = [("it_interval", _TimeSpec), ("it_value", _TimeSpec)]


_CLOCK_MONOTONIC = 1
_TFD_NONBLOCK = os.O_NONBLOCK
_TFD_CLOEXEC = os.O_CLOEXEC
_TFD_TIMER_ABSTIME = 1


def _load_libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_create.restype = ctypes.c_int
        libc.timerfd_settime.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.POINTER(_ITimerSpec),
            ctypes.c_void_p,
        ]
        libc.timerfd_settime.restype = ctypes.c_int
    except (OSError, AttributeError) as exc:
        logger.debug("no timerfd (%s); the clock uses the loop's timers", exc)
        return None
    return libc


_libc = _load_libc()


class _TimerFd:
    """A ``timerfd`` watched by the loop's selector, created on first use."""

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop_ref = weakref.ref(loop)
        self._callback = callback
        self._fd = -1
        self._spec = _ITimerSpec()
        self._finalizer: weakref.finalize[[int], _TimerFd] | None = None

    def arm(self, when: float) -> None:
        fd = self._fd if self._fd >= 0 else self._open()
        if fd < 0:
            return
        seconds = int(when)
        value = self._spec.it_value
        value.tv_sec = seconds
        value.tv_nsec = max(1, int((when - seconds) * 1e9))  # 0/0 would disarm; a past time fires at once
        self._set(fd)

    def cancel(self) -> None:
        if self._fd >= 0:
            value = self._spec.it_value
            value.tv_sec = value.tv_nsec = 0  # disarms, and forgets an expiry not read yet
            self._set(self._fd)

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd < 0:
            return
        loop = self._loop_ref()
        if loop is not None and not loop.is_closed():
            loop.remove_reader(fd)
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        os.close(fd)

    def _open(self) -> int:
        loop = self._loop_ref()
        assert _libc is not None
        if loop is None or loop.is_closed():
            return -1
        fd: int = _libc.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), f"timerfd_create: {os.strerror(ctypes.get_errno())}")
        loop.add_reader(fd, self._ready, fd)
        self._fd = fd
        # A clock is dropped with its loop, often without close(): the descriptor must not leak with it.
        self._finalizer = weakref.finalize(self, os.close, fd)
        return fd

    def _set(self, fd: int) -> None:
        assert _libc is not None
        if _libc.timerfd_settime(fd, _TFD_TIMER_ABSTIME, ctypes.byref(self._spec), None) != 0:
            raise OSError(ctypes.get_errno(), f"timerfd_settime: {os.strerror(ctypes.get_errno())}")

    def _ready(self, fd: int) -> None:
        try:
            os.read(fd, 8)  # the expiry count; reading clears the descriptor's readiness
        except BlockingIOError:
            return  # re-armed after it fired: the expiry was forgotten, nothing is due
        self._callback()
