"""Running a command's coroutine so that SIGTERM stops it the way Ctrl-C does.

``asyncio.run`` turns Ctrl-C into a cancellation of the command, so its ``finally`` blocks leave the channel
and finish the files. SIGTERM (``kill``, ``timeout``, a service manager) would end the process on the spot:
WAV headers never written, Ogg pages lost, the bot left in the channel. :func:`run_command` cancels the
command on SIGTERM too, then raises :class:`Terminated` (``cordvoice`` exits 143).
"""

from __future__ import annotations

import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["Terminated", "run_command"]

_T = TypeVar("_T")


class Terminated(Exception):
    """The command was stopped by SIGTERM, after its clean-up ran."""


def run_command(main: Coroutine[Any, Any, _T]) -> _T:
    """``asyncio.run(main)``, with SIGTERM cancelling ``main`` like Ctrl-C and then raising Terminated."""
    import asyncio  # noqa: PLC0415 - not for `cordvoice --help`

    async def stopped_by_sigterm() -> _T:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        terminated = False

        def terminate() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        handled = True
        try:
            loop.add_signal_handler(signal.SIGTERM, terminate)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
            handled = False
        try:
            return await main
        except asyncio.CancelledError:
            if terminated:
                raise Terminated("terminated") from None
            raise
        finally:
            if handled:
                loop.remove_signal_handler(signal.SIGTERM)

    return asyncio.run(stopped_by_sigterm())
