"""A track: one source's buffered frames, its controls, and the jobs that read it off the event loop.

A sync source (:class:`~cordvoice.audio.sources.AudioSource`) is opened, read, seeked and closed by *source
jobs* on the shared source threads (:mod:`cordvoice.audio.workers`), one job at a time per track, in batches
that fill a bounded buffer: 25 PCM frames (500 ms) or 50 Opus packets (1 s), refilled once half is used. An
async source is read by one small task on the loop into the same buffer. Nothing here runs per tick except
:meth:`Track._take`, which pops a frame. A refill of a track that still plays from its buffer, on a player
that is being pulled, does not wake the loop: the next pull collects it (see
:class:`~cordvoice.audio.workers.Mailbox`); a start, an underrun, a seek or a stop does.

A track starts only once :data:`START_FRAMES` frames are buffered, and after an underrun it waits for them
again: a slow source costs silence, never a burst of frames afterwards (discord.py #9120). A source error
lets the frames already buffered play, then ends the track ``FAILED`` with an :class:`AudioError` whose
``__cause__`` is the original exception. The :class:`~cordvoice.audio.player.Player` owns the tracks and
turns their frames into Opus packets.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cordvoice.audio.mixdown import DecoderSlot
from cordvoice.audio.opus import packet_samples
from cordvoice.audio.pcm import FRAME_DURATION, FRAME_SAMPLES, FrameChunker
from cordvoice.audio.sources import AsyncAudioSource, AudioSource, AutoSource, SourceKind
from cordvoice.audio.workers import get_mailbox, get_workers
from cordvoice.errors import AudioError, InvalidArgumentError

if TYPE_CHECKING:
    from cordvoice.audio.player import Player

__all__ = [
    "MAX_VOLUME",
    "START_FRAMES",
    "Track",
    "TrackEndEvent",
    "TrackErrorEvent",
    "TrackEvent",
    "TrackStartEvent",
    "TrackState",
    "as_audio_error",
]

logger = logging.getLogger(__name__)

START_FRAMES: Final = 5
"""Frames (100 ms) a track must have buffered before it starts, and again after an underrun."""
PCM_PREFETCH: Final = 25
"""PCM frames buffered per track (500 ms, ~96 KB)."""
OPUS_PREFETCH: Final = 50
"""Opus packets buffered per track (1 s, a few KB)."""
FILL_BUDGET: Final = 0.040
"""A fill job hands back what it has after this many seconds, so a slow source trickles in."""
MAX_VOLUME: Final = 2.0


class TrackState(enum.Enum):
    """Where a track is in its life; the last three are final."""

    QUEUED = "queued"
    """Waiting in the player's queue (its source may already be prefetching)."""
    LOADING = "loading"
    """Opening its source and buffering its first frames."""
    PLAYING = "playing"
    PAUSED = "paused"
    FINISHED = "finished"
    """The source ended and everything was played."""
    STOPPED = "stopped"
    """``stop()``, ``skip()`` or the player closing ended it early."""
    FAILED = "failed"
    """The source or the codec failed; :attr:`Track.error` says why."""


_FINAL: Final = frozenset({TrackState.FINISHED, TrackState.STOPPED, TrackState.FAILED})


@dataclass(frozen=True, slots=True)
class TrackEvent:
    """Base class of the player's events."""

    track: Track


@dataclass(frozen=True, slots=True)
class TrackStartEvent(TrackEvent):
    """The track's first frame went to the transmit lane."""


@dataclass(frozen=True, slots=True)
class TrackErrorEvent(TrackEvent):
    """The track failed; a :class:`TrackEndEvent` with state ``FAILED`` follows."""

    error: AudioError


@dataclass(frozen=True, slots=True)
class TrackEndEvent(TrackEvent):
    """The track ended: ``FINISHED``, ``STOPPED`` or ``FAILED`` (then ``error`` is set)."""

    state: TrackState
    error: AudioError | None


def _check_volume(volume: float) -> float:
    if not (isinstance(volume, int | float) and math.isfinite(volume) and 0.0 <= volume <= MAX_VOLUME):
        raise InvalidArgumentError(f"volume must be a number between 0.0 and {MAX_VOLUME}, not {volume!r}")
    return float(volume)


def as_audio_error(exc: BaseException, name: str) -> AudioError:
    """``exc`` itself when it is an :class:`AudioError`, else an AudioError saying so, caused by it."""
    if isinstance(exc, AudioError):
        return exc
    error = AudioError(f"{name} failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


@dataclass(slots=True)
class _Fill:
    frames: list[bytes]
    eof: bool
    kind: SourceKind
    seekable: bool
    duration: float | None
    seek_error: AudioError | None
    loops: int = 0
    loop_starts: list[int] = field(default_factory=list)
    """Index in ``frames`` of the first frame of each pass that looping began."""
    loop_refused: bool = False
    error: AudioError | None = None
    """A read failed after ``frames``: they still play, then the track fails."""


@dataclass(slots=True)
class _WorkerSide:
    """Track state that only the (single) running source job touches."""

    chunker: FrameChunker = field(default_factory=FrameChunker)
    reads_since_loop: int = 0


def _check_opus(data: bytes, name: str) -> None:
    samples = packet_samples(data)
    if samples != FRAME_SAMPLES:
        raise AudioError(f"{name}: Opus packets must be 20 ms, got {samples / 48:g} ms")


def _fill_job(track: Track, want: int, seek_to: float | None, opened: bool, rewind: bool) -> _Fill:
    """Open/seek/read a sync source on a source thread: up to ``want`` frames or ``FILL_BUDGET`` seconds.

    ``rewind``: the source was read past a loop that was then turned off; go back to the start (a loop).
    """
    source = track.source
    assert isinstance(source, AudioSource)
    side = track._worker
    if not opened:
        source.open()
    kind = source.kind
    seek_error: AudioError | None = None
    if seek_to is not None:
        try:
            if not source.seekable:
                raise AudioError(f"{track.name} cannot seek")
            source.seek(seek_to)
            side.chunker.clear()
            side.reads_since_loop = 0
        except (AudioError, InvalidArgumentError) as exc:
            seek_error = AudioError(str(exc)) if not isinstance(exc, AudioError) else exc
    frames: list[bytes] = []
    eof = False
    error: AudioError | None = None
    loops = 0
    loop_starts: list[int] = []
    loop_refused = False
    if rewind and seek_to is None:
        source.seek(0)
        side.chunker.clear()
        side.reads_since_loop = 0
        loops += 1
        loop_starts.append(0)
    deadline = time.monotonic() + FILL_BUDGET
    try:
        while len(frames) < want:
            data = source.read()
            if data is None:
                if track._loop and side.reads_since_loop > 0:
                    if source.seekable:
                        source.seek(0)
                        side.reads_since_loop = 0
                        loops += 1
                        loop_starts.append(len(frames))
                        continue
                    loop_refused = True
                eof = True
                break
            side.reads_since_loop += 1
            if kind == "pcm":
                frames.extend(side.chunker.feed(data))
            else:
                packet = bytes(data)
                _check_opus(packet, track.name)
                frames.append(packet)
            if time.monotonic() >= deadline:
                break  # hand over what we have: a slow source trickles in instead of stalling the track
    except Exception as exc:
        # Raising would drop the frames read so far; hand them back with the error so they play first.
        error = as_audio_error(exc, track.name)
        eof = True
    if eof and kind == "pcm":
        last = side.chunker.flush()
        if last is not None:
            frames.append(last)
    return _Fill(
        frames,
        eof,
        kind,
        source.seekable,
        source.duration,
        seek_error,
        loops,
        loop_starts,
        loop_refused,
        error,
    )


def _close_job(source: AudioSource) -> None:
    source.close()


class Track:
    """One source playing (or queued) on a :class:`Player`; returned by ``play()`` and ``enqueue()``.

    Control it from the event loop thread: :meth:`pause`, :meth:`resume`, :meth:`stop`, :attr:`volume`
    (0.0-2.0; 1.0 keeps Opus passthrough), :meth:`seek`, :attr:`loop`. ``await track.wait()`` returns when
    it ended.
    """

    def __init__(
        self,
        player: Player,
        source: AudioSource | AsyncAudioSource,
        *,
        volume: float,
        loop: bool,
        start: float,
        name: str | None,
        queued: bool,
    ) -> None:
        self._player = player
        self.source = source
        self.name = name or source.name or type(source).__name__
        self._is_async = isinstance(source, AsyncAudioSource)
        self.kind: SourceKind | None = None if isinstance(source, AutoSource) else source.kind
        """``"opus"`` or ``"pcm"``; ``None`` until an :class:`AutoSource` has been opened."""
        self._volume = _check_volume(volume)
        if (loop or start) and self._is_async:
            raise InvalidArgumentError("an async source cannot seek, so it can neither loop nor start later")
        self._loop = bool(loop)
        self._paused = False
        self._queued = queued
        self._end_state: TrackState | None = None
        self.error: AudioError | None = None
        """Why the track failed, with the original exception as ``__cause__``."""
        self._buffer: deque[bytes] = deque()
        self._eof = False
        self._failure: AudioError | None = None
        self._started = False
        self._buffering = True
        self._frames = 0
        self._offset = float(start)
        self._seek_skipped = 0
        """Frames a seek in flight dropped unplayed; counted into the position if it fails."""
        self._seekable = False
        self._duration: float | None = getattr(source, "duration", None) if self._is_async else None
        self._opened = self._is_async
        self._begun = False
        self._busy = False
        self._kick_pending = False
        self._gen = 0
        self._pending_seek: tuple[float, asyncio.Future[None] | None] | None = (
            (float(start), None) if start else None
        )
        self._closing = False
        self._closed = False
        self._worker = _WorkerSide()
        self._feeder: asyncio.Task[None] | None = None
        self._feeding = False
        """The feeder is reading; once it closes the source it must not be cancelled (a leak)."""
        self._space = asyncio.Event()
        self._decoder = DecoderSlot()
        self._done: asyncio.Future[TrackState] = player._event_loop().create_future()
        self.underruns = 0
        """Times the track ran dry while playing."""
        self.frames_passthrough = 0
        self.loops = 0
        """Times a looping track went back to its start."""
        self._appended = 0
        """Frames ever put in the buffer: ``_loop_starts`` counts in these."""
        self._loop_starts: deque[int] = deque()
        """Where each pass the read-ahead looped into starts (turning the loop off cuts there)."""
        self._rewind = False

    # -- public ------------------------------------------------------------------------------------

    @property
    def state(self) -> TrackState:
        if self._done.done():
            return self._done.result()
        if self._queued:
            return TrackState.QUEUED
        if self._paused:
            return TrackState.PAUSED
        if not self._started:
            return TrackState.LOADING
        return TrackState.PLAYING

    @property
    def done(self) -> bool:
        """Whether the track ended: stopped, failed, or its last frame went to the transmit lane."""
        return self._done.done()

    @property
    def volume(self) -> float:
        return self._volume

    @volume.setter
    def volume(self, value: float) -> None:
        self._volume = _check_volume(value)
        self._player._changed()

    @property
    def loop(self) -> bool:
        """Start over at the end (needs a seekable source)."""
        return self._loop

    @loop.setter
    def loop(self, value: bool) -> None:
        if value and (self._is_async or (self._opened and not self._seekable)):
            raise InvalidArgumentError(f"{self.name} cannot loop: its source cannot seek")
        self._loop = bool(value)
        if not self._loop:
            self._cut_at_loop_start()
        elif self._eof and self._failure is None and self._end_state is None:
            # The read-ahead already reached the end (up to a buffer before it is heard): read on, so the
            # source job finds the end again and goes back to the start.
            self._eof = False
            self._kick()

    def _cut_at_loop_start(self) -> None:
        """Drop the buffered frames of a pass the read-ahead began; the track ends where this pass ends."""
        head = self._appended - len(self._buffer)
        while self._loop_starts and self._loop_starts[0] < head:
            self._loop_starts.popleft()  # already played
        if not self._loop_starts or self._end_state is not None:
            self._loop_starts.clear()
            return
        keep = self._loop_starts[0] - head
        self.loops -= len(self._loop_starts)
        self._loop_starts.clear()
        while len(self._buffer) > keep:
            self._buffer.pop()
        self._appended = head + keep
        self._gen += 1  # a fill in flight read on past the cut: drop it
        self._eof = True
        self._rewind = True  # the source is past the start: a loop turned on again must seek back

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def position(self) -> float:
        """Seconds into the source (since the start or the last seek; looping keeps counting)."""
        return self._offset + self._frames * FRAME_DURATION

    @property
    def duration(self) -> float | None:
        """The source's length in seconds, when known (after it opened)."""
        return self._duration

    @property
    def seekable(self) -> bool:
        """Whether :meth:`seek` can work; ``False`` until the source has opened."""
        return self._seekable

    def pause(self) -> None:
        """Stop taking frames (next tick for a passthrough track, within the lookahead when mixed)."""
        if self._end_state is None and not self._paused:
            self._paused = True
            self._player._changed()

    def resume(self) -> None:
        if self._end_state is None and self._paused:
            self._paused = False
            self._player._changed()

    def stop(self) -> None:
        """End the track now (state ``STOPPED``); idempotent. A queued track is simply removed."""
        if self._end_state is None:
            was_active = not self._queued
            self._finish(TrackState.STOPPED)
            if was_active:
                self._player._after_stop()

    async def seek(self, seconds: float) -> None:
        """Continue from ``seconds``; returns once the source is there.

        A time past the end ends the track as if it had played to the end. A track waiting in the queue
        opens its source now and starts there. Raises :class:`AudioError` when the source cannot seek (the
        track plays on) or the track ended.
        """
        if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds >= 0):
            raise InvalidArgumentError(f"cannot seek to {seconds!r}")
        if self._end_state is not None:
            raise AudioError(f"{self.name} has ended")
        if self._is_async or (self._opened and not self._seekable):
            raise AudioError(f"{self.name} cannot seek")
        if not self._begun:
            self._begin()  # a track waiting in the queue opens now: the seek cannot wait for its turn
        future: asyncio.Future[None] = self._player._event_loop().create_future()
        if self._pending_seek is not None and self._pending_seek[1] is not None:
            previous = self._pending_seek[1]
            if not previous.done():
                previous.set_result(None)  # superseded by this seek
        self._pending_seek = (float(seconds), future)
        self._gen += 1
        self._seek_skipped += len(self._buffer)
        self._buffer.clear()
        self._eof = False
        self._buffering = True
        self._kick()  # position moves once the source got there (see _filled)
        await future

    async def wait(self) -> TrackState:
        """Wait until the track ended; returns ``FINISHED`` or ``STOPPED``, raises its error if it FAILED."""
        state = await asyncio.shield(self._done)
        if state is TrackState.FAILED and self.error is not None:
            raise self.error
        return state

    def __repr__(self) -> str:
        return f"<Track {self.name!r} {self.state.value} {self.position:.2f}s>"

    # -- fed by sources ----------------------------------------------------------------------------

    def _capacity(self) -> int:
        return OPUS_PREFETCH if self.kind == "opus" else PCM_PREFETCH

    def _begin(self) -> None:
        """Start reading the source (for a queued track: prefetch before its turn)."""
        if self._begun or self._end_state is not None:
            return
        self._begun = True
        if self._is_async:
            self._feeder = self._player._event_loop().create_task(
                self._feed(), name=f"cordvoice feed {self.name}"
            )
        else:
            self._kick()

    def _schedule_kick(self) -> None:
        if not self._kick_pending and not self._busy:
            self._kick_pending = True
            self._player._event_loop().call_soon(self._kick)

    def _kick(self) -> None:
        """Start the next source job if one is due (at most one runs at a time)."""
        self._kick_pending = False
        if self._busy:
            if self._fill_wanted():  # someone waits for the running job: its result may already be in
                get_mailbox(self._player._event_loop()).collect_soon()
            return
        if self._closed or self._is_async or not self._begun:
            return
        source = self.source
        assert isinstance(source, AudioSource)
        pool = get_workers().source
        loop = self._player._event_loop()
        if self._closing:
            self._busy = True
            pool.submit(_close_job, (source,), loop, self._source_closed)
            return
        if self._end_state is not None:
            return
        seek = self._pending_seek
        room = self._capacity() - len(self._buffer)
        if seek is None and (self._eof or len(self._buffer) > self._capacity() // 2):
            return
        self._pending_seek = None
        self._busy = True
        args = (self, max(room, START_FRAMES), None if seek is None else seek[0], self._opened, self._rewind)
        self._rewind = False
        done = functools.partial(self._filled, self._gen, seek)
        pool.submit(_fill_job, args, loop, done, wake=self._fill_wanted)

    def _fill_wanted(self) -> bool:
        """Whether a finished fill job must wake the loop (asked on a source thread; see ``Mailbox``).

        Not while the track plays from its buffer on a player that handed out a frame on its last pull: that
        player is pulled again within 20 ms, and the pull collects the frames long before they are needed.
        """
        return (
            self._buffering or self._closing or self._pending_seek is not None or not self._player._streaming
        )

    def _filled(
        self,
        gen: int,
        seek: tuple[float, asyncio.Future[None] | None] | None,
        result: _Fill | None,
        failure: BaseException | None,
    ) -> None:
        self._busy = False
        waiter = None if seek is None else seek[1]
        if result is None:
            error = as_audio_error(failure or AudioError("the source job returned nothing"), self.name)
            if waiter is not None and not waiter.done():
                waiter.set_exception(error)
            if self._end_state is None and not self._closing:
                self._source_failed(error)
            self._kick()
            return
        self._opened = True
        self.kind = result.kind
        self._seekable = result.seekable
        self._duration = result.duration
        if waiter is not None and not waiter.done():
            if result.seek_error is not None:
                waiter.set_exception(result.seek_error)
            elif result.error is not None and not result.frames:
                waiter.set_exception(result.error)  # nothing could be read there: the track fails below
            else:
                waiter.set_result(None)
        elif seek is not None and result.seek_error is not None and self._end_state is None:
            self._source_failed(result.seek_error)  # play(start=...) on a source that cannot seek
            self._kick()
            return
        if result.loop_refused and self._loop:
            logger.warning("%s cannot loop: its source cannot seek; it ends instead", self.name)
            self._loop = False
        if gen != self._gen:
            self._seek_skipped += len(result.frames)  # read before the seek came in: dropped
        elif self._end_state is None:
            if seek is not None:
                if result.seek_error is None:
                    self._offset = seek[0]
                    self._frames = 0
                else:  # the source read on past the frames this seek dropped; keep position in step
                    self._frames += self._seek_skipped
                self._seek_skipped = 0
            self.loops += result.loops
            self._loop_starts.extend(self._appended + index for index in result.loop_starts)
            self._appended += len(result.frames)
            self._buffer.extend(result.frames)
            if result.eof:
                self._eof = True
            if result.error is None:
                self._player._track_data(self)
        if result.error is not None and self._end_state is None:
            self._source_failed(result.error)  # after buffering the frames read before it, which play first
        self._kick()

    def _source_closed(self, _: None, error: BaseException | None) -> None:
        self._busy = False
        self._closed = True
        if error is not None:
            self._player.stats.close_errors += 1
            logger.warning("closing %s failed: %s", self.name, error)

    async def _feed(self) -> None:
        """Read an async source on the loop into the buffer (one small task per async track)."""
        source = self.source
        assert isinstance(source, AsyncAudioSource)
        chunker = FrameChunker()
        capacity = self._capacity()
        self._feeding = True
        try:
            while self._end_state is None:  # stopped before this task first ran: only close
                while len(self._buffer) >= capacity:
                    self._space.clear()
                    await self._space.wait()
                data = await source.read()
                if data is None:
                    self._feeding = False
                    last = chunker.flush() if self.kind == "pcm" else None
                    if last is not None:
                        self._buffer.append(last)
                    self._eof = True
                    self._player._track_data(self)
                    return
                if self.kind == "pcm":
                    frames = chunker.feed(data)
                else:
                    packet = bytes(data)
                    _check_opus(packet, self.name)
                    frames = [packet]
                if frames:
                    self._buffer.extend(frames)
                    self._player._track_data(self)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._feeding = False  # ending the track now must not cancel this task: aclose() below must run
            if self._end_state is None:
                last = chunker.flush() if self.kind == "pcm" else None
                if last is not None:
                    self._buffer.append(last)
                self._source_failed(as_audio_error(exc, self.name))
        finally:
            self._feeding = False
            try:
                await source.aclose()
            except Exception as exc:
                self._player.stats.close_errors += 1
                logger.warning("closing %s failed: %s", self.name, exc)
            self._closed = True

    async def _close_unstarted(self) -> None:
        source = self.source
        assert isinstance(source, AsyncAudioSource)
        try:
            await source.aclose()
        except Exception as exc:
            self._player.stats.close_errors += 1
            logger.warning("closing %s failed: %s", self.name, exc)
        self._closed = True

    def _source_failed(self, error: AudioError) -> None:
        """Record a source error: frames already buffered still play, then the track ends FAILED."""
        logger.warning("audio source %s failed: %s", self.name, error)
        self._player.stats.source_errors += 1
        self._failure = error
        self._eof = True
        if not self._buffer:
            self._finish(TrackState.FAILED, error)
        else:
            self._player._track_data(self)

    # -- consumed by the player --------------------------------------------------------------------

    def _ready(self, *, as_next: bool = False) -> bool:
        """Whether the next step would take a frame from this track (``as_next``: once it is dequeued)."""
        if self._paused or (self._queued and not as_next) or self._end_state is not None:
            return False
        if self._buffering:
            return len(self._buffer) >= START_FRAMES or (self._eof and bool(self._buffer))
        return bool(self._buffer)

    def _exhausted_now(self) -> bool:
        """Whether the next step will find this track at its end."""
        return self._eof and not self._buffer and not self._paused and self._end_state is None

    def _take(self) -> bytes | None:
        """This track's frame for the current output frame, or None (buffering, underrun, or ended)."""
        buffer = self._buffer
        if self._buffering:
            if len(buffer) >= START_FRAMES or (self._eof and buffer):
                self._buffering = False
                if not self._started:
                    self._started = True
                    self._player.stats.tracks_started += 1
                    self._player._publish([TrackStartEvent(self)])
            elif self._eof:
                self._exhausted()
                return None
            else:
                return None
        if buffer:
            frame = buffer.popleft()
            self._frames += 1
            if self._is_async:
                self._space.set()
            elif len(buffer) <= self._capacity() // 2:
                self._schedule_kick()
            return frame
        if self._eof:
            self._exhausted()
            return None
        self.underruns += 1
        self._player.stats.track_underruns += 1
        self._buffering = True
        self._schedule_kick()
        return None

    def _take_run(self, count: int) -> list[bytes] | None:
        """``count`` frames at once, only when they need no mixing and change nothing else, else None.

        That is a playing PCM track at volume 1.0 with at least ``count`` frames buffered, where
        :meth:`_take` would only pop: the player's fast path for its usual case, one track playing.
        """
        buffer = self._buffer
        if (
            count <= 0
            or len(buffer) < count
            or self._buffering
            or self._paused
            or self._volume != 1.0
            or self.kind != "pcm"
            or self._end_state is not None
            or self._queued
        ):
            return None
        frames = [buffer.popleft() for _ in range(count)]
        self._frames += count
        if self._is_async:
            self._space.set()
        elif len(buffer) <= self._capacity() // 2:
            self._schedule_kick()
        return frames

    def _exhausted(self) -> None:
        if self._failure is not None:
            self._finish(TrackState.FAILED, self._failure)
        else:
            self._finish(TrackState.FINISHED)

    def _finish(self, state: TrackState, error: AudioError | None = None) -> None:
        """End the track: detach it, release its source and decoder, publish the events."""
        if self._end_state is not None:
            return
        self._end_state = state
        self.error = error
        self._buffer.clear()
        stats = self._player.stats
        if state is TrackState.FINISHED:
            stats.tracks_finished += 1
        elif state is TrackState.STOPPED:
            stats.tracks_stopped += 1
        else:
            stats.tracks_failed += 1
        if self._pending_seek is not None and self._pending_seek[1] is not None:
            if not self._pending_seek[1].done():
                self._pending_seek[1].set_exception(AudioError(f"{self.name} ended before the seek"))
            self._pending_seek = None
        self._player._detach(self)
        self._closing = True
        if self._feeder is not None:
            if self._feeding:
                self._feeder.cancel()
        elif self._is_async:
            self._player._spawn(self._close_unstarted())
        elif self._begun:
            self._kick()
        else:
            self._begun = True  # never started reading: still close it (a no-op for most sources)
            self._kick()
        self._player._retire(self._decoder)
        events: list[TrackEvent] = []
        if error is not None:
            events.append(TrackErrorEvent(self, error))
        events.append(TrackEndEvent(self, state, error))
        self._player._publish(events)

    def _resolve(self) -> None:
        if not self._done.done() and self._end_state is not None:
            self._done.set_result(self._end_state)
