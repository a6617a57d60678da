"""``cordvoice demo``: a DAVE-encrypted conversation on the embedded emulator, recorded by everyone in it.

No token and no network: the emulator runs inside the process, on loopback. See :mod:`cordvoice.demo` for
the scenario and for how frames are counted.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from cordvoice.commands._logging import follow_verbosity
from cordvoice.commands._progress import ProgressLine
from cordvoice.commands._run import run_command

if TYPE_CHECKING:
    from cordvoice.demo import DemoProgress

__all__ = ["configure", "run"]

# The same values as cordvoice.demo's, repeated so that `cordvoice demo --help` imports nothing heavy.
_DEFAULT_SECONDS = 10.0
_MIN_SECONDS, _MAX_SECONDS = 1.0, 600.0

_DESCRIPTION = """\
Start a local emulator of Discord and hold a short conversation on it: music-bot (cordvoice) plays a
synthesised melody, speaker-bot (cordvoice) talks and records everyone, and alice (a simulated participant
with its own independent voice client) talks and records everyone too. Everything is DAVE end-to-end
encrypted. At the end: frames sent and received per pair, loss, pacing, the DAVE epoch and privacy code, and
the recordings written (a WAV and an Ogg Opus file per member, and a mixed WAV)."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not _MIN_SECONDS <= value <= _MAX_SECONDS:
        raise argparse.ArgumentTypeError(f"must be between {_MIN_SECONDS:g} and {_MAX_SECONDS:g} seconds")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = _DESCRIPTION
    parser.add_argument(
        "--seconds",
        type=_seconds,
        default=_DEFAULT_SECONDS,
        metavar="N",
        help=f"how long the conversation lasts (default {_DEFAULT_SECONDS:g})",
    )
    parser.add_argument(
        "--out",
        default="cordvoice-demo",
        metavar="DIR",
        help="where the recordings go (default ./cordvoice-demo; existing files are replaced)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the results as JSON on stdout (and no progress)"
    )


def run(args: argparse.Namespace) -> int:
    follow_verbosity()
    from cordvoice.demo import run_demo  # noqa: PLC0415 - imported when run, not for --help

    progress = ProgressLine(sys.stderr, enabled=not args.json)

    def show(update: DemoProgress) -> None:
        if update.phase != "talking":
            progress.update(f"cordvoice demo: {update.phase}...", phase=update.phase)
            return
        sent = ", ".join(f"{name} {count}" for name, count in update.sent.items())
        progress.update(
            f"cordvoice demo: {update.talk_elapsed:4.1f}/{update.seconds:g} s  frames sent: {sent}  "
            f"speaker-bot heard {update.received}  DAVE epoch {update.epoch}",
            phase=update.phase,
        )

    try:
        report = run_command(run_demo(args.seconds, args.out, on_progress=show))
    finally:
        progress.finish()
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(report.summary())
        print(f"\nDone in {report.elapsed:.1f} s. Listen to the recordings, or read the README's next steps.")
    if not report.lossless:
        print("cordvoice demo: some frames were lost (see the pairs above)", file=sys.stderr)
    return 0
