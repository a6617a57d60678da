"""The ``cordvoice`` command line: a thin dispatcher over :mod:`cordvoice.commands`.

Subcommand modules are imported only when chosen, so ``cordvoice --version`` and ``cordvoice --help`` do not
pay for PyAV, davey or the crypto libraries. To add a command, add a row to :data:`COMMANDS` and a module
exposing ``configure(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import cast

from cordvoice import __version__
from cordvoice.commands._run import Terminated
from cordvoice.errors import VoiceError

__all__ = ["COMMANDS", "build_parser", "main"]

#: name -> (module path, one-line help). Keep the help short: it is the ``cordvoice --help`` listing.
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("cordvoice.commands.demo", "a DAVE-encrypted conversation on the local emulator, recorded"),
    "play": ("cordvoice.commands.play", "play a file or URL in a voice channel"),
    "record": ("cordvoice.commands.record", "record a voice channel to WAV and Ogg Opus files"),
    "doctor": ("cordvoice.commands.doctor", "check that every dependency works on this machine"),
    "emulate": ("cordvoice.commands.emulate", "run the local Discord emulator, or inject faults into one"),
    "bench": ("cordvoice.commands.bench", "reproducible benchmarks: send, receive, encode, join, memory"),
}

_Run = Callable[[argparse.Namespace], int]
_Configure = Callable[[argparse.ArgumentParser], None]


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    """The full parser; only the ``selected`` command's module is imported and configured."""
    parser = argparse.ArgumentParser(
        prog="cordvoice",
        description="Discord voice for asyncio bots, with DAVE and a local emulator of Discord.",
    )
    parser.add_argument("--version", action="version", version=f"cordvoice {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="log more (repeat for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_path, help_text) in COMMANDS.items():
        sub = subparsers.add_parser(name, help=help_text, description=help_text)
        if name == selected:
            module = importlib.import_module(module_path)
            cast(_Configure, module.configure)(sub)
            sub.set_defaults(run=cast(_Run, module.run))
    return parser


def _selected_command(argv: Sequence[str]) -> str | None:
    # The top-level options take no values, so the first non-option word is the command.
    for word in argv:
        if word == "--":
            return None
        if not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line and return the exit status."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(_selected_command(args_list))
    args = parser.parse_args(args_list)
    run: _Run | None = getattr(args, "run", None)
    if run is None:
        parser.print_help()
        return 2
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        status = run(args)
        sys.stdout.flush()  # here rather than at exit, so that a closed pipe is handled below
    except VoiceError as exc:
        print(f"cordvoice {args.command}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader left (`cordvoice doctor | head -1`): stop quietly, and point stdout at /dev/null so
        # that the interpreter's flush at exit does not report the same broken pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    return status


if __name__ == "__main__":
    raise SystemExit(main())
