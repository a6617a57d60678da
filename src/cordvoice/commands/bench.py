"""``cordvoice bench``: reproducible performance figures (see docs/benchmarks.md for results and method).

Subcommands: ``send``, ``receive``, ``encode``, ``join``, ``memory``. Each prints a short summary, or with
``--json`` the full report (machine, placement, parameters and every figure). The emulator and the process
under test run in separate processes pinned to separate cores where the machine has two.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any

from cordvoice.errors import InvalidArgumentError

__all__ = ["configure", "run"]

_MIN_BITRATE, _MAX_BITRATE = 6_000, 510_000
"""What libopus accepts (cordvoice.audio.opus checks it too, but only inside the benchmark's workers)."""


def configure(parser: argparse.ArgumentParser) -> None:
    subparsers = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)

    send = subparsers.add_parser("send", help="N sessions streaming Opus passthrough to the emulator")
    send.add_argument("--sessions", type=_count, default=100, help="concurrent voice sessions (default 100)")
    send.add_argument("--seconds", type=_seconds, default=10.0, help="measurement window (default 10)")
    send.add_argument("--dave", action=argparse.BooleanOptionalAction, default=True, help="DAVE channels")
    send.add_argument("--mode", choices=("aes", "xchacha"), default="aes", help="transport encryption")
    send.add_argument("--peer", choices=("discordpy",), help="run the same workload with discord.py too")
    send.add_argument("--uvloop", action="store_true", help="run the processes under test on uvloop")
    send.add_argument(
        "--feed", choices=("provider", "write"), default="provider", help="how audio reaches each session"
    )
    send.add_argument(
        "--slot-capacity",
        type=_capacity,
        metavar="N",
        help="passthrough streams per slot of the shared clock (default: the library's; 0 spreads evenly)",
    )
    send.add_argument(
        "--sfu-reads",
        choices=("timer", "wakeup"),
        default="timer",
        help="the emulator reads its media socket every 1 ms (default: sends never wake it) or when readable",
    )
    send.add_argument("--warmup", type=_warmup, default=3.0, help="seconds of streaming before measuring")
    send.add_argument("--profile", type=Path, metavar="DIR", help="record py-spy profiles into DIR")

    receive = subparsers.add_parser("receive", help="per-packet cost of receiving N speaking users")
    receive.add_argument("--users", type=_count, default=200, help="users speaking at once (default 200)")
    receive.add_argument("--seconds", type=_seconds, default=10.0, help="audio per measurement (default 10)")
    receive.add_argument(
        "--senders", type=_count, default=16, help="real DAVE group members sending (default 16)"
    )
    receive.add_argument(
        "--no-gc-freeze",
        dest="gc_freeze",
        action="store_false",
        help="leave the receiver's set-up heap (DAVE group, pre-built packets) to the garbage collector",
    )
    receive.add_argument("--profile", type=Path, metavar="DIR", help="record py-spy profiles into DIR")

    encode = subparsers.add_parser("encode", help="streams per core encoding from PCM and from MP3")
    encode.add_argument("--streams", type=_count, default=40, help="players running at once (default 40)")
    encode.add_argument("--seconds", type=_seconds, default=10.0, help="measurement window (default 10)")
    encode.add_argument(
        "--bitrate", type=_bitrate, default=96_000, help="Opus bitrate in bit/s (default 96000)"
    )
    encode.add_argument("--profile", type=Path, metavar="DIR", help="record py-spy profiles into DIR")

    join = subparsers.add_parser("join", help="join_channel to the first heard frame, with DAVE")
    join.add_argument("--members", default="2,10", help="channel sizes, bot included (default 2,10)")
    join.add_argument("--runs", type=_count, default=10, help="runs per size (default 10)")
    join.add_argument("--uvloop", action="store_true", help="run the bot on uvloop")

    memory = subparsers.add_parser("memory", help="RSS per idle and per playing session")
    memory.add_argument("--sessions", type=_count, default=200, help="sessions (default 200)")
    memory.add_argument("--seconds", type=_seconds, default=5.0, help="seconds of playing (default 5)")
    memory.add_argument("--dave", action=argparse.BooleanOptionalAction, default=True, help="DAVE channels")
    memory.add_argument("--uvloop", action="store_true", help="run the bot on uvloop")

    for sub in (send, receive, encode, join, memory):
        sub.add_argument("--json", action="store_true", help="print the full report as JSON")


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None


def _whole(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None


def _count(text: str) -> int:
    value = _whole(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _capacity(text: str) -> int:
    value = _whole(text)
    if value < 0:  # the clock refuses it only in its constructor; the bench sets it afterwards
        raise argparse.ArgumentTypeError("must be 0 (spread evenly) or more")
    return value


def _seconds(text: str) -> float:
    value = _number(text)
    if not 0 < value < math.inf:  # NaN fails too: it would reach asyncio as a timeout
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return value


def _warmup(text: str) -> float:
    value = _number(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError("must be 0 or more seconds")
    return value


def _bitrate(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of bit/s") from None
    if not _MIN_BITRATE <= value <= _MAX_BITRATE:
        raise argparse.ArgumentTypeError(f"must be {_MIN_BITRATE} to {_MAX_BITRATE} bit/s")
    return value


def run(args: argparse.Namespace) -> int:
    level = logging.getLogger().getEffectiveLevel()
    report = _dispatch(args, level)
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(summary(report))
    return 0


def _dispatch(args: argparse.Namespace, level: int) -> dict[str, Any]:
    profile: Path | None = getattr(args, "profile", None)
    if profile is not None:
        from cordvoice.bench.profile import py_spy_available  # noqa: PLC0415

        if not py_spy_available():  # checked now: the runs would find out after their set-up, mid-benchmark
            raise InvalidArgumentError("--profile needs py-spy, which is not installed (pip install py-spy)")
        try:
            profile.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InvalidArgumentError(f"cannot create the --profile folder: {exc}") from None
    if args.benchmark == "send":
        from cordvoice.bench.send import run_send  # noqa: PLC0415 - imported only when chosen

        return run_send(
            sessions=args.sessions,
            seconds=args.seconds,
            dave=args.dave,
            mode=args.mode,
            peer=args.peer,
            uvloop=args.uvloop,
            feed=args.feed,
            slot_capacity=args.slot_capacity,
            sfu_reads=args.sfu_reads,
            warmup=args.warmup,
            profile_dir=profile,
            log_level=level,
        )
    if args.benchmark == "receive":
        from cordvoice.bench.receive import run_receive  # noqa: PLC0415

        return run_receive(
            users=args.users,
            seconds=args.seconds,
            senders=args.senders,
            gc_freeze=args.gc_freeze,
            profile_dir=profile,
            log_level=level,
        )
    if args.benchmark == "encode":
        from cordvoice.bench.encode import run_encode  # noqa: PLC0415

        return run_encode(
            streams=args.streams,
            seconds=args.seconds,
            bitrate=args.bitrate,
            profile_dir=profile,
            log_level=level,
        )
    if args.benchmark == "join":
        from cordvoice.bench.join import run_join  # noqa: PLC0415

        try:
            sizes = tuple(int(part) for part in args.members.split(",") if part.strip())
        except ValueError:
            sizes = ()
        if not sizes:
            raise InvalidArgumentError("--members takes comma-separated integers, e.g. 2,10")
        return run_join(members=sizes, runs=args.runs, uvloop=args.uvloop, log_level=level)
    from cordvoice.bench.memory import run_memory  # noqa: PLC0415

    return run_memory(
        sessions=args.sessions, seconds=args.seconds, dave=args.dave, uvloop=args.uvloop, log_level=level
    )


def summary(report: dict[str, Any]) -> str:
    """A few human-readable lines; ``--json`` has everything."""
    machine = report.get("machine", {})
    lines = [
        f"cordvoice bench {report['benchmark']} on {machine.get('cpu', '?')} "
        f"({machine.get('nproc', '?')} cores), {machine.get('python', '?')}, "
        f"load {machine.get('load_average', '?')}",
    ]
    if "placement" in report:
        lines.append(f"placement: {report['placement']}")
    kind = report["benchmark"]
    if kind == "send":
        for name in ("cordvoice", "discordpy"):
            result = report.get(name)
            if result is None:
                continue
            late = result["lateness_ms"]
            lines.append(
                f"{name:>10}: {result['sessions']} sessions, {result['cpu_us_per_packet']} µs CPU/packet, "
                f"{result['core_percent_per_stream']}% of a core per stream, lateness p50 {late['p50']} "
                f"p99 {late['p99']} max {late['max']} ms, lost {result['packets_lost']}, "
                f"setup {result['setup']['setup_s']} s"
            )
            share = result.get("measured_core")
            if share is not None:
                lines.append(
                    f"{'':>10}  its core in the window: {share['other_processes_ms']:.0f} ms to other "
                    f"processes, {share['steal_ms']:.0f} ms stolen by the host"
                )
        if "ratios" in report:
            lines.append(f"discord.py / cordvoice: {report['ratios']}")
    elif kind == "receive":
        lines.extend(f"{key:>5}: {report[key]}" for key in ("opus", "pcm") if key in report)
    elif kind == "encode":
        lines.append(f"codec floor: {report['codec']}")
        lines.append(f"streams per core through the player: {report['streams_per_core']}")
    elif kind == "join":
        for name, result in report["results"].items():
            lines.append(
                f"{name}: first heard {result['first_heard_ms']} ms, DAVE ready {result['dave_ready_ms']} ms"
            )
    elif kind == "memory":
        lines.append(
            f"{report['sessions']} sessions: {report['idle_kib_per_session']} KiB per idle session, "
            f"{report['playing_kib_per_session']} KiB per playing session"
        )
    return "\n".join(lines)
