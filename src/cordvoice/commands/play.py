"""``cordvoice play SOURCE --guild G --channel C``: join a voice channel, play a file or URL, leave.

The token comes from ``$DISCORD_TOKEN`` (never the command line). With ``--emulator`` it plays on an
embedded local emulator instead, to a simulated listener, and says how much of it the listener heard.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cordvoice.commands._connect import (
    CommandError,
    Exit,
    add_connection_arguments,
    check_target_arguments,
    exit_code_for,
    joined,
    left_early,
    wait_same_epoch,
)
from cordvoice.commands._logging import follow_verbosity
from cordvoice.commands._progress import ProgressLine
from cordvoice.commands._run import run_command
from cordvoice.errors import VoiceError

if TYPE_CHECKING:
    from cordvoice.emulator.participant import Participant

__all__ = ["configure", "run"]

_SETTLE = 0.3
"""Seconds for the last frames to reach the emulator's listener before it is asked what it heard."""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Join a voice channel with the bot whose token is in $DISCORD_TOKEN, play SOURCE, and leave.\n"
        "Ogg, WebM and DCA files holding 20 ms Opus are sent as they are; anything else FFmpeg reads\n"
        "(MP3, WAV, FLAC, an HTTP URL, ...) is decoded and encoded. With --emulator it plays on an\n"
        "embedded local emulator instead, to a simulated listener."
    )
    parser.add_argument("source", metavar="SOURCE", help="a file path or an URL")
    add_connection_arguments(parser)
    parser.add_argument(
        "--volume", type=float, default=1.0, help="0.0 to 2.0 (default 1.0; other values re-encode)"
    )
    parser.set_defaults(parser=parser)


def run(args: argparse.Namespace) -> int:
    follow_verbosity()
    check_target_arguments(args.parser, args)
    if not 0.0 <= args.volume <= 2.0:
        args.parser.error("--volume must be between 0.0 and 2.0")
    if "://" not in args.source and not Path(args.source).is_file():
        print(f"cordvoice play: {args.source!r} is not a file (nor an URL)", file=sys.stderr)
        return Exit.AUDIO
    try:
        return run_command(_play(args))
    except VoiceError as exc:
        print(f"cordvoice play: {exc}", file=sys.stderr)
        return exit_code_for(exc)


async def _play(args: argparse.Namespace) -> int:
    progress = ProgressLine(sys.stderr)
    async with joined(args) as connection:
        session = connection.session
        listener: Participant | None = None
        if connection.emulator is not None:
            listener = await connection.emulator.add_participant(connection.channel_id, name="listener")
            await wait_same_epoch(session, [listener])
        started = time.monotonic()
        track = session.play(args.source, volume=args.volume)
        ended = asyncio.ensure_future(track.wait())
        try:
            while not ended.done():
                if not session.dave_ready:
                    # Discord keeps no one-member DAVE group, so nothing can be encrypted for an empty room.
                    progress.update(
                        "waiting for someone to join the channel: DAVE encrypts only for a group",
                        phase="waiting",
                    )
                else:
                    duration = f"/{track.duration:.1f}" if track.duration else ""
                    progress.update(
                        f"playing {track.name}: {track.position:.1f}{duration} s, "
                        f"{session.stats.frames_sent} frames sent",
                        phase=track.state.value,
                    )
                await asyncio.wait([ended], timeout=0.2)
            ended.result()  # raises the AudioError of a failed track
        except VoiceError as exc:
            raise CommandError(Exit.AUDIO, f"could not play {args.source!r}: {exc}") from exc
        finally:
            progress.finish()
        if (error := left_early(session)) is not None:  # the track ended because the session did
            raise error
        await session.stop_speaking()
        stats = session.stats
        lateness = stats.clock_lateness
        print(
            f"played {track.name} in channel {connection.channel_id}: {stats.frames_sent} frames "
            f"({stats.frames_sent * 0.02:.1f} s) in {time.monotonic() - started:.1f} s, "
            f"{stats.frames_dropped} dropped, tick lateness p50 {lateness['p50']} ms, "
            f"p99 {lateness['p99']} ms"
        )
        if listener is not None:
            await asyncio.sleep(_SETTLE)
            heard = len(listener.frames_from(connection.client.user_id))
            sent = stats.frames_sent + stats.silence_sent
            print(f"the emulator's listener heard {heard} of {sent} frames, DAVE-decrypted")
            await listener.leave()
    return Exit.OK
