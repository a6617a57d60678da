"""``cordvoice record --guild G --channel C --out DIR --seconds N``: record a voice channel, then leave.

Writes ``<user id>.wav`` and ``<user id>.opus`` for each member heard and ``mixed.wav``, all on one
timeline, the WAV files exactly ``N`` seconds long (the Ogg files to within a packet). The token comes
from ``$DISCORD_TOKEN``. With ``--emulator`` it records an embedded local emulator where two simulated
participants take turns talking.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from cordvoice.commands._connect import (
    CommandError,
    Exit,
    Joined,
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
    from cordvoice.audio.receive_pipeline import VoiceFrame
    from cordvoice.audio.sinks import MixedWavSink, PerUserOggSink, PerUserWavSink, Timeline

__all__ = ["configure", "run"]

logger = logging.getLogger(__name__)

_FRAME_SECONDS = 0.02
_BYTES_PER_SAMPLE = 4
"""A 48 kHz stereo s16 sample (cordvoice.audio.pcm's layout, not imported for ``--help``)."""


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value <= 24 * 3600:
        raise argparse.ArgumentTypeError("must be more than 0 and at most 86400 seconds")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Join a voice channel with the bot whose token is in $DISCORD_TOKEN, record everyone for N\n"
        "seconds (DAVE-decrypted), and leave. Writes <user id>.wav and <user id>.opus for each member\n"
        "heard and mixed.wav into DIR, aligned on one timeline. With --emulator it records an embedded\n"
        "local emulator where two simulated participants take turns talking."
    )
    add_connection_arguments(parser)
    parser.add_argument(
        "--out", default="cordvoice-recording", metavar="DIR", help="folder (default ./cordvoice-recording)"
    )
    parser.add_argument(
        "--seconds", type=_seconds, default=10.0, metavar="N", help="how long to record (default 10)"
    )
    parser.set_defaults(parser=parser)


def run(args: argparse.Namespace) -> int:
    follow_verbosity()
    check_target_arguments(args.parser, args)
    folder = Path(args.out)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"cordvoice record: cannot create {str(folder)!r}: {exc}", file=sys.stderr)
        return Exit.AUDIO
    try:
        return run_command(_record(args, folder))
    except VoiceError as exc:
        print(f"cordvoice record: {exc}", file=sys.stderr)
        return exit_code_for(exc)


async def _record(args: argparse.Namespace, folder: Path) -> int:
    from cordvoice.audio.sinks import MixedWavSink, PerUserOggSink, PerUserWavSink, Timeline  # noqa: PLC0415

    async with joined(args) as connection:
        receiver = connection.session.receiver
        start = time.monotonic()
        timeline = Timeline(start)
        per_user_wav = PerUserWavSink(folder, timeline=timeline)
        mixed = MixedWavSink(folder / "mixed.wav", timeline=timeline)
        per_user_ogg = PerUserOggSink(folder, timeline=timeline)
        sinks: list[PerUserWavSink | MixedWavSink | PerUserOggSink] = [per_user_wav, mixed, per_user_ogg]
        cuts = [_Until(sink, timeline, start + args.seconds) for sink in sinks]
        for cut in cuts:
            receiver.add_sink(cut)
        talkers = None
        if connection.emulator is not None:
            talkers = asyncio.ensure_future(_emulated_talkers(connection, args.seconds))
        progress = ProgressLine(sys.stderr)
        try:
            while (elapsed := time.monotonic() - start) < args.seconds and not connection.session.closed:
                heard = receiver.users
                frames = sum(receiver.stats(user).delivered for user in heard)
                progress.update(
                    f"recording {elapsed:4.1f}/{args.seconds:g} s: {len(heard)} member(s) heard, "
                    f"{frames} frames",
                    phase="recording",
                )
                await asyncio.sleep(min(0.2, max(0.0, args.seconds - elapsed)))
        finally:
            progress.finish()
            # Interrupted: the end of the frames written by now, so that every file stops there.
            end = min(time.monotonic() + _FRAME_SECONDS, start + args.seconds)
            for cut in cuts:
                cut.end = end
            await receiver.close(close_sinks=False)
            failures = [cut.error for cut in cuts if cut.error is not None]
            for sink in sinks:
                try:
                    sink.close(end_time=end)
                except VoiceError as exc:
                    failures.append(exc)
            if talkers is not None:
                talkers.cancel()
                (outcome,) = await asyncio.gather(talkers, return_exceptions=True)
                if isinstance(outcome, Exception):
                    logger.warning("the emulator's participants stopped talking: %r", outcome)
            if failures:
                raise CommandError(
                    Exit.AUDIO, f"could not finish the recording: {failures[0]}"
                ) from failures[0]
        if (error := left_early(connection.session)) is not None:
            raise CommandError(error.status, f"{error}; what was recorded until then is in {folder}")
        files = [*per_user_wav.paths.values(), mixed.path, *per_user_ogg.paths.values()]
        print(f"recorded {args.seconds:g} s of channel {connection.channel_id} into {folder}:")
        for user_id in sorted(per_user_wav.paths):
            stats = receiver.stats(user_id)
            print(
                f"  user {user_id}: {stats.delivered} frames, {stats.lost} lost, "
                f"{stats.undecryptable} undecryptable"
            )
        for path in files:
            print(f"  {path}")
    return Exit.OK


async def _emulated_talkers(connection: Joined, seconds: float) -> None:
    """Two simulated participants join and take turns talking, so an emulator recording is not silent."""
    from cordvoice.demo import encode_speech  # noqa: PLC0415

    emu = connection.emulator
    assert emu is not None
    talkers = [await emu.add_participant(connection.channel_id, name=name) for name in ("alice", "bob")]
    await wait_same_epoch(connection.session, talkers)
    turn = max(0.2, seconds * 0.35)
    speeches = await asyncio.gather(*(asyncio.to_thread(encode_speech, turn, voice) for voice in (1, 2)))
    print(
        f"emulator: participants {', '.join(str(t.user_id) for t in talkers)} take turns talking",
        flush=True,
    )
    for talker, speech in zip(talkers, speeches, strict=True):
        await talker.play(speech)


class _Until:
    """Passes a sink the audio before ``end`` on the timeline; a frame across it is cut there.

    The receiver's flush at the end (and a late wake-up) hands over frames from past the end; without the
    cut, the files of whoever talks at the end run longer than ``--seconds``, out of line with mixed.wav,
    which its ``close(end_time)`` cuts. An Opus packet cannot be cut: one mostly past the end is left out.

    A file that cannot be written is kept in ``error`` for the command to fail with at the end; the
    receiver would otherwise detach the whole sink (every user's files of a per-user one), closing it
    itself, and the command would exit 0 listing files it never finished.
    """

    def __init__(
        self, sink: PerUserWavSink | MixedWavSink | PerUserOggSink, timeline: Timeline, end: float
    ) -> None:
        self.sink = sink
        self.wants_pcm = sink.wants_pcm
        self.end = end
        self.error: VoiceError | None = None
        self._timeline = timeline

    def write(self, frame: VoiceFrame) -> None:
        room = self._timeline.samples_until(self.end) - self._timeline.offset(frame.timeline_time)
        if room <= 0:
            return
        if frame.pcm is None:
            if 2 * room < frame.samples:  # an Opus packet mostly past the end: the file ends nearer it
                return
        elif room < frame.samples:
            frame = frame._replace(pcm=frame.pcm[: room * _BYTES_PER_SAMPLE], samples=room)
        try:
            self.sink.write(frame)
        except VoiceError as exc:  # this user's file only (a full disk, a folder in the way)
            self.error = self.error or exc

    def close(self) -> None:
        self.sink.close()
