"""Sampling profiles of a benchmark's process under test, with py-spy when it is installed.

py-spy samples another process from outside (no instrumentation, so the figures it explains are not
distorted by it). It is not a dependency of cordvoice: ``pip install py-spy`` to use ``--profile``.
:func:`summarize` turns py-spy's collapsed stacks into the two tables the benchmark notes quote: where the
samples were (self time, by function) and which calls they were under (inclusive time).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

__all__ = ["SpyRecording", "py_spy_available", "summarize"]


def _py_spy() -> str | None:
    """py-spy on PATH, or installed beside this interpreter (a venv that is not activated)."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def py_spy_available() -> bool:
    return _py_spy() is not None


class SpyRecording:
    """``py-spy record`` of ``pid`` for ``seconds`` into ``path`` (collapsed stacks), in the background."""

    def __init__(
        self, pid: int, seconds: float, path: Path, *, rate: int = 200, native: bool = False
    ) -> None:
        executable = _py_spy()
        if executable is None:
            raise FileNotFoundError("py-spy is not installed (pip install py-spy)")
        self.path = path
        command = [
            executable,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(max(1, round(seconds))),
            "--rate",
            str(rate),
            "--format",
            "raw",
            "--output",
            str(path),
            "--nonblocking",
            "--threads",
        ]
        if native:
            command.append("--native")
        self._process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def wait(self, timeout: float = 60.0) -> str:
        """Wait for py-spy to finish; returns its error output (empty when all went well)."""
        try:
            _, err = self._process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            _, err = self._process.communicate()
        return err.decode(errors="replace").strip() if self._process.returncode else ""


def _frame_name(frame: str) -> str:
    # py-spy raw frames look like "function (path/to/module.py:123)"; keep the function and the file name.
    name, _, where = frame.partition(" (")
    file_name = where.rsplit("/", 1)[-1].split(":", 1)[0].rstrip(")")
    return f"{name} ({file_name})" if file_name else name


def summarize(path: Path, *, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares (percent of all samples) of the ``top`` functions in a raw profile."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f and not f.startswith("process ")]
        frames = [f for f in frames if not f.startswith("thread ")]
        if not frames:
            continue
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return {"samples": 0, "self": [], "inclusive": []}

    def table(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100.0 * n / total, 1)) for name, n in counter.most_common(top)]

    return {"samples": total, "self": table(own), "inclusive": table(inclusive)}
