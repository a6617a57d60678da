"""Child processes for benchmarks: each runs one asyncio loop and serves commands sent over a pipe.

A benchmark must not measure the emulator's work as its own, nor let the two fight over one event loop, so
the emulator and the code under test each get a process (and, where there are two cores, a core). The
parent stays synchronous and drives the phases: ``child.call("setup", ...)``, ``child.call("begin")``...

In the child, a *handler* object is built from ``factory`` (``"module:callable"``, imported in the child, so
nothing but plain data crosses the process boundary) and every command ``name`` runs its coroutine method
``cmd_<name>(**kwargs)`` on the child's loop. Commands are read by a thread and answered in order; a command
that raises is answered with the traceback, which the parent re-raises as :class:`BenchError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

from cordvoice.bench.machine import pin_to_core
from cordvoice.errors import VoiceError

__all__ = ["BenchError", "ChildProcess", "require"]

logger = logging.getLogger(__name__)

_CLOSE = "close"
_CLEAN_UP_BOUND = 5.0
"""Seconds a child gives its handler's ``close`` when it stops unasked (Ctrl-C, its parent gone)."""


class BenchError(VoiceError):
    """A benchmark could not run (a child failed, a setup step timed out); the message says where."""


def require(module: str, *, option: str, package: str) -> None:
    """Import an optional dependency that ``option`` needs, here and now, before any child process starts.

    Otherwise the child that needs it fails only once the run is under way (after the cordvoice half of a
    ``--peer`` run), with its traceback for a message.
    """
    try:
        importlib.import_module(module)
    except ImportError:
        raise BenchError(
            f"{option} needs {package}, which is not installed (pip install {package})"
        ) from None


class ChildProcess:
    """The parent's handle on one benchmark child process (see the module docstring)."""

    def __init__(
        self,
        factory: str,
        *,
        name: str,
        core: int | None = None,
        uvloop: bool = False,
        options: dict[str, Any] | None = None,
        log_level: int = logging.WARNING,
    ) -> None:
        self.name = name
        self.core = core
        self._factory = factory
        self._uvloop = uvloop
        self._options = options or {}
        self._log_level = log_level
        self._conn: multiprocessing.connection.Connection | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self.info: dict[str, Any] = {}
        """What the child reported when it started (its pid, loop, core)."""

    def start(self, timeout: float = 60.0) -> None:
        """Spawn the child and wait until its handler is built."""
        context = multiprocessing.get_context("spawn")
        parent_end, child_end = context.Pipe()
        process = context.Process(
            target=_child_main,
            args=(child_end, self._factory, self.core, self._uvloop, self._log_level, self._options),
            name=f"cordvoice-bench-{self.name}",
            daemon=True,
        )
        process.start()
        child_end.close()
        self._conn, self._process = parent_end, process
        try:
            self.info = self._receive(timeout, "start")
        except BaseException:
            # No ``with`` block will close a child that never started: one still building its handler would
            # otherwise live on beside the caller, waiting for commands that never come.
            self.close(timeout=1.0)
            raise

    def call(self, command: str, *, timeout: float = 300.0, **kwargs: Any) -> Any:
        """Run ``cmd_<command>(**kwargs)`` in the child and return its result."""
        conn = self._connection()
        try:
            conn.send((command, kwargs))
        except (OSError, ValueError) as exc:
            raise BenchError(f"the {self.name} process is gone ({exc})") from exc
        return self._receive(timeout, command)

    def close(self, timeout: float = 30.0) -> None:
        """Ask the child to clean up and exit; kill it if it does not. Idempotent."""
        conn, process = self._conn, self._process
        self._conn = None
        if conn is not None:
            try:
                conn.send((_CLOSE, {}))
                if conn.poll(timeout):
                    conn.recv()
            except (OSError, EOFError, ValueError):
                pass
            conn.close()
        if process is not None:
            process.join(5.0)
            if process.is_alive():
                logger.warning("the %s process did not exit; killing it", self.name)
                process.kill()
                process.join(5.0)
            self._process = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _connection(self) -> multiprocessing.connection.Connection:
        if self._conn is None:
            raise BenchError(f"the {self.name} process is not running")
        return self._conn

    def _receive(self, timeout: float, what: str) -> Any:
        conn = self._connection()
        try:
            if not conn.poll(timeout):
                raise BenchError(f"the {self.name} process did not answer {what!r} within {timeout:.0f} s")
            status, value = conn.recv()
        except (EOFError, OSError) as exc:
            code = self._process.exitcode if self._process is not None else None
            raise BenchError(f"the {self.name} process died during {what!r} (exit code {code})") from exc
        if status != "ok":
            raise BenchError(f"{self.name} failed during {what!r}:\n{value}")
        return value


def _child_main(  # noqa: PLR0917 - multiprocessing passes the target's arguments positionally
    conn: multiprocessing.connection.Connection,
    factory: str,
    core: int | None,
    use_uvloop: bool,
    log_level: int,
    options: dict[str, Any],
) -> None:
    pin_to_core(core)
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"
    )
    # cordvoice.wire sets itself to INFO (frames carry secrets); a quiet benchmark keeps it at its own level.
    logging.getLogger("cordvoice.wire").setLevel(max(log_level, logging.INFO))
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    if use_uvloop:
        import uvloop  # noqa: PLC0415 - optional dependency

        loop_factory = uvloop.new_event_loop
    try:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            runner.run(_serve(conn, factory, core, options))
    except KeyboardInterrupt:
        # Ctrl-C reaches every process of the terminal's group: the parent reports it (exit 130) and closes
        # its children; a traceback from each child would only bury that.
        pass
    conn.close()


async def _serve(
    conn: multiprocessing.connection.Connection, factory: str, core: int | None, options: dict[str, Any]
) -> None:
    loop = asyncio.get_running_loop()
    try:
        module_name, _, attribute = factory.partition(":")
        build = getattr(importlib.import_module(module_name), attribute)
        handler = build(**options)
        setup = getattr(handler, "start", None)
        if setup is not None:
            await setup()
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", {"pid": os.getpid(), "loop": type(loop).__module__, "core": core}))
    closed = False
    try:
        while True:
            try:
                command, kwargs = await loop.run_in_executor(None, conn.recv)
            except (EOFError, OSError):
                command, kwargs = _CLOSE, {}
            if command == _CLOSE:
                closed = True
                closer = getattr(handler, "close", None)
                try:
                    if closer is not None:
                        await closer()
                    conn.send(("ok", None))
                except Exception:
                    with contextlib.suppress(OSError, ValueError):
                        conn.send(("error", traceback.format_exc()))
                return
            try:
                method = getattr(handler, f"cmd_{command}")
                result = await method(**kwargs)
            except Exception:
                reply: tuple[str, Any] = ("error", traceback.format_exc())
            else:
                reply = ("ok", result)
            try:
                conn.send(reply)
            except (OSError, ValueError):
                return
    finally:
        if not closed:
            # Ctrl-C cancelled this task, or the parent went away mid-command: still release what the handler
            # holds (the emulator's TLS key files in the temporary folder, the bot's voice sessions), within a
            # bound: a bot whose emulator is already gone may wait for a gateway that never comes back.
            closer = getattr(handler, "close", None)
            if closer is not None:
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(_CLEAN_UP_BOUND):
                        await closer()
