"""What a benchmark ran on, and the process-level readings every benchmark takes (CPU, RSS, placement).

CPU is read with ``resource.getrusage`` (user + system time of the whole process, every thread included), so
work a benchmark pushes onto worker threads or into the kernel's send path is counted too.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import importlib.metadata
import os
import platform
import resource
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import ParamSpec, TypeVar

from cordvoice.audio.workers import usable_cores

__all__ = [
    "CoreShare",
    "CpuSnapshot",
    "Placement",
    "cpu_seconds",
    "load_average",
    "machine_info",
    "pin_to_core",
    "plan_placement",
    "restores_affinity",
    "rss_bytes",
]

_P = ParamSpec("_P")
_R = TypeVar("_R")

_PACKAGES = (
    "cordvoice",
    "cryptography",
    "PyNaCl",
    "davey",
    "av",
    "numpy",
    "websockets",
    "uvloop",
    "discord.py",
)


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    """CPU seconds and wall time at one instant; subtract two to get a window's usage."""

    cpu: float
    user: float
    system: float
    wall: float

    @classmethod
    def take(cls) -> CpuSnapshot:
        import time  # noqa: PLC0415 - keeps module import side-effect free for spawn

        usage = resource.getrusage(resource.RUSAGE_SELF)
        return cls(usage.ru_utime + usage.ru_stime, usage.ru_utime, usage.ru_stime, time.monotonic())

    def since(self, earlier: CpuSnapshot) -> dict[str, float]:
        """CPU used between ``earlier`` and this snapshot, and the share of one core it represents."""
        wall = max(self.wall - earlier.wall, 1e-9)
        cpu = self.cpu - earlier.cpu
        return {
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "user_s": round(self.user - earlier.user, 3),
            "system_s": round(self.system - earlier.system, 3),
            "core_percent": round(100.0 * cpu / wall, 1),
        }


@dataclass(frozen=True, slots=True)
class CoreShare:
    """How one core's time was shared between the process under test, other processes and the hypervisor.

    On a shared VM the lateness tail depends on time the process under test did not get: other processes
    scheduled on its core, and *steal*, the host running something else on the virtual CPU. Both come from
    ``/proc`` in clock ticks (``SC_CLK_TCK``, 10 ms on Linux), so a window of seconds resolves them to a tick.
    """

    core: int
    busy: int
    steal: int
    process: int

    @classmethod
    def take(cls, pid: int) -> CoreShare | None:
        """Readings for ``pid`` and the one core it is pinned to; None if it is not pinned or not on Linux."""
        try:
            cores = os.sched_getaffinity(pid)
            if len(cores) != 1:
                return None
            (core,) = cores
            with open("/proc/stat", encoding="ascii") as stat:
                prefix = f"cpu{core} "
                line = next(line for line in stat if line.startswith(prefix))
            # user nice system idle iowait irq softirq steal
            user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, line.split()[1:9])
            with open(f"/proc/{pid}/stat", encoding="utf-8") as stat:
                # From field 3 (state) on; the command name before it may hold spaces.
                fields = stat.read().rsplit(")", 1)[1].split()
            process = int(fields[11]) + int(fields[12])  # utime + stime, every thread
        except (AttributeError, OSError, StopIteration, ValueError, IndexError):
            return None
        return cls(core, user + nice + system + irq + softirq, steal, process)

    def since(self, earlier: CoreShare) -> dict[str, float]:
        """Milliseconds of the core between ``earlier`` and this reading: the process's, others', stolen."""
        ms = 1000.0 / os.sysconf("SC_CLK_TCK")
        process = self.process - earlier.process
        return {
            "core": self.core,
            "process_ms": process * ms,
            "other_processes_ms": max(0, self.busy - earlier.busy - process) * ms,
            "steal_ms": (self.steal - earlier.steal) * ms,
        }

    @staticmethod
    def window(before: CoreShare | None, after: CoreShare | None) -> dict[str, float] | None:
        """``after.since(before)``, or None when either reading could not be taken."""
        return after.since(before) if before is not None and after is not None else None


def rss_bytes() -> int:
    """Resident set size of this process now (from ``/proc/self/statm``; 0 where that does not exist)."""
    gc.collect()
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            resident_pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return resident_pages * os.sysconf("SC_PAGE_SIZE")


def load_average() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)


@dataclass(frozen=True, slots=True)
class Placement:
    """Which cores the emulator and the process under test run on (None: not pinned)."""

    emulator_core: int | None
    bench_core: int | None

    def describe(self) -> str:
        if self.emulator_core is None or self.bench_core is None:
            return "not pinned (fewer than two usable cores): the emulator and the bench share the CPU"
        return (
            f"emulator pinned to core {self.emulator_core}, "
            f"process under test pinned to core {self.bench_core}"
        )


def plan_placement() -> Placement:
    """Emulator on the first usable core, the process under test on the second (if there are two)."""
    try:
        cores = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return Placement(None, None)
    if len(cores) < 2:
        return Placement(None, None)
    return Placement(cores[0], cores[1])


def restores_affinity(run: Callable[_P, _R]) -> Callable[_P, _R]:
    """Give the calling process its cores back when ``run`` returns.

    A benchmark pins the process that runs it (:func:`pin_to_core`) to keep it off the measured core. Run from
    a longer-lived process (a test suite, a notebook) that pin would otherwise outlive the benchmark and
    squeeze everything the process does afterwards, and every process it starts, onto one core.
    """

    @functools.wraps(run)
    def restoring(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            cores = os.sched_getaffinity(0)
        except (AttributeError, OSError):
            return run(*args, **kwargs)
        try:
            return run(*args, **kwargs)
        finally:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, cores)

    return restoring


def pin_to_core(core: int | None) -> None:
    """Pin the calling process (all its future threads) to ``core``; a no-op for None or where unsupported."""
    if core is None:
        return
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(0, {core})


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _cpu_flags() -> list[str]:
    wanted = ("aes", "vaes", "avx2", "avx512f", "sha_ni")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return [flag for flag in wanted if flag in flags]
    except OSError:
        pass
    return []


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, object]:
    """What a result needs to be reproducible: CPU, cores, kernel, Python, package versions, load, date."""
    from cordvoice.audio.opus import libopus_version  # noqa: PLC0415 - loads libopus

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "nproc": os.cpu_count(),
        "usable_cores": usable_cores(),
        "kernel": platform.release(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "executable": sys.executable,
        "packages": {name: _version(name) for name in _PACKAGES},
        "libopus": libopus_version(),
        "load_average": [round(x, 2) for x in load_average()],
    }
