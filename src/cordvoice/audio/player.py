"""The player: tracks, a queue, mixing, and the frame provider a session's transmit lane pulls from.

How a frame gets out
--------------------
The session's transmit lane rides the shared 20 ms clock and calls :meth:`Player.pull` once per tick. That
call does a few microseconds of work on the event loop and never blocks:

1. **Sources are read ahead** on the shared source threads into a bounded buffer per track, and a track
   starts only once a few frames are buffered (:mod:`cordvoice.audio.track`). A slow source therefore
   costs silence at its start, never a burst afterwards (discord.py #9120).
2. **The queue** moves on inside the same output frame: the next queued track is opened and buffered while
   the current one plays, so the change is gapless. When a passthrough track is followed by one that needs
   rendering, its last packets (the lookahead's worth) join the rendered ones, so that the next track's
   first render runs while they go out; like rendered frames, they are then beyond pause.
3. **Passthrough**: when exactly one Opus track is playing at volume 1.0, ``pull()`` hands out its next
   packet as it is. Pause and stop then act on the very next tick.
4. **Mixing**: otherwise the player takes each track's next frame on the loop and a codec thread decodes,
   mixes (soft clip) and encodes them, :data:`LOOKAHEAD` frames (80 ms) ahead, about two frames at a time.
   ``pull()`` pops a ready packet. Pause, volume and stop act on frames not yet rendered, so they are heard
   within the lookahead: 40-80 ms, plus up to one tick. Stopping the last playing track also drops the
   rendered lookahead, so silence follows at once. One PCM track at volume 1.0 (the usual case) is not
   mixed: its frames go to the encoder as they are.

Batching: the clock ticks a slot's streams in one callback, so the players that need frames rendered in
that loop iteration are gathered into **one codec job** (:class:`_RenderBatcher`), and its results come back
through the loop's :class:`~cordvoice.audio.workers.Mailbox` *without waking the loop* while every player in
it still has frames to send: the next pull of any player collects them. Only a player that is starting,
late or closing wakes the loop. A wake-up costs as much CPU as half an encode on a virtual machine, so this
is what keeps the player near the codec's own throughput (docs/benchmarks.md, "encode").

Track events (:class:`TrackStartEvent`, :class:`TrackEndEvent`, :class:`TrackErrorEvent`) fire when the
first or last frame is handed to the transmit lane, not when it was rendered.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

from cordvoice.audio.clock import HEAVY_TICK
from cordvoice.audio.mixdown import DecoderSlot, EncoderSlot, MixFrame, MixInput, check_bitrate, render
from cordvoice.audio.sources import SourceKind, SourceLike, open_source
from cordvoice.audio.track import Track, TrackEndEvent, TrackEvent, TrackState, as_audio_error
from cordvoice.audio.workers import Mailbox, get_mailbox, get_workers
from cordvoice.errors import AudioError, InvalidArgumentError

__all__ = ["LOOKAHEAD", "Player", "PlayerStats"]

logger = logging.getLogger(__name__)

LOOKAHEAD: Final = 4
"""Default number of mixed frames encoded ahead of the transmit lane (80 ms)."""

E = TypeVar("E", bound=TrackEvent)


@dataclass
class PlayerStats:
    """Counters of one player; nothing is dropped without one."""

    passthrough_frames: int = 0
    """Opus packets sent exactly as the source stored them."""
    encoded_frames: int = 0
    """Frames mixed and encoded by the player."""
    late_frames: int = 0
    """Ticks, in the middle of audio, where the next mixed frame was not ready in time (a 20 ms gap)."""
    render_jobs: int = 0
    render_errors: int = 0
    dropped_frames: int = 0
    """Frames lost because a render job failed."""
    decode_errors: int = 0
    """Corrupt Opus packets concealed while mixing."""
    track_underruns: int = 0
    """Times a playing track ran dry and re-buffered (its source was slower than real time)."""
    source_errors: int = 0
    close_errors: int = 0
    """Sources whose ``close()`` raised (logged; the track had already ended)."""
    handler_errors: int = 0
    tracks_started: int = 0
    tracks_finished: int = 0
    tracks_stopped: int = 0
    tracks_failed: int = 0


_OutEntry = tuple[bytes, list[TrackEvent] | None]
_Rendered: TypeAlias = tuple[list[bytes] | None, BaseException | None]

BATCH_SPLIT_FRAMES: Final = 8
"""With several codec threads, a batch is split into parts of at least this many frames."""


@dataclass(slots=True, eq=False)
class _RenderJob:
    """One player's frames to mix and encode: what the loop decided, handed to a codec thread."""

    player: Player
    gen: int
    inputs: Sequence[MixFrame]
    encoder: EncoderSlot
    events: list[list[TrackEvent]] | None
    """Per frame, the events to emit when it goes out; ``None`` when no frame has any."""
    tracks: tuple[Track, ...]


def _flatten(events: list[list[TrackEvent]] | None) -> list[TrackEvent]:
    return [] if events is None else [event for frame_events in events for event in frame_events]


def _render_batch(jobs: list[_RenderJob]) -> list[_Rendered]:
    """Render every job of a batch (codec thread); one player's failure does not fail the others."""
    results: list[_Rendered] = []
    for job in jobs:
        try:
            results.append((render(job.inputs, job.encoder), None))
        except Exception as exc:
            results.append((None, exc))
    return results


def _deliver(jobs: list[_RenderJob], results: list[_Rendered] | None, failure: BaseException | None) -> None:
    """Hand each player its packets (on the loop)."""
    if results is None or len(results) != len(jobs):
        results = [(None, failure or AudioError("the render batch returned nothing"))] * len(jobs)
    for job, (packets, error) in zip(jobs, results, strict=True):
        try:
            job.player._rendered(job, packets, error)
        except Exception:
            logger.exception("delivering rendered frames failed")


def _anyone_waiting(jobs: list[_RenderJob]) -> bool:
    """Asked on the codec thread: must the loop wake for this batch, or can the next pull collect it?"""
    return any(job.player._waiting() for job in jobs)


class _RenderBatcher:
    """Gathers the render work of every player of one loop, per loop iteration, into one codec job.

    The clock ticks a slot's streams in one callback; the players among them that need frames all ask
    here, and a single ``call_soon`` submits them together: one queue hand-off and at most one wake-up
    for the batch instead of one per player.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop_ref = weakref.ref(loop)  # weak: kept in a dict keyed weakly by its loop
        self._players: list[Player] = []
        self._jobs: list[_RenderJob] = []
        self._scheduled = False
        self.batches = 0

    def request(self, player: Player) -> None:
        """``player`` takes its frames when the batch is assembled (later in this loop iteration)."""
        self._players.append(player)
        self._arm()

    def add(self, job: _RenderJob) -> None:
        self._jobs.append(job)
        self._arm()

    def _arm(self) -> None:
        loop = self._loop_ref()
        if not self._scheduled and loop is not None:
            self._scheduled = True
            loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        players, self._players = self._players, []
        jobs, self._jobs = self._jobs, []
        for player in players:
            try:
                job = player._collect()
            except Exception:  # one player's bug must not stall every other player of the batch
                logger.exception("preparing a player's frames failed")
                continue
            if job is not None:
                jobs.append(job)
        loop = self._loop_ref()
        if not jobs or loop is None:
            return
        pool = get_workers().codec
        frames = sum(len(job.inputs) for job in jobs)
        parts = max(1, min(pool.max_threads, len(jobs), frames // BATCH_SPLIT_FRAMES))
        for index in range(parts):
            part = jobs[index::parts]
            self.batches += 1
            pool.submit(
                _render_batch,
                (part,),
                loop,
                functools.partial(_deliver, part),
                wake=functools.partial(_anyone_waiting, part),
            )


_batchers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _RenderBatcher] = weakref.WeakKeyDictionary()


def _batcher_for(loop: asyncio.AbstractEventLoop) -> _RenderBatcher:
    batcher = _batchers.get(loop)
    if batcher is None:
        batcher = _batchers[loop] = _RenderBatcher(loop)
    return batcher


class Player:
    """Plays tracks on one session: the frame provider its transmit lane pulls from every 20 ms.

    ``bitrate`` (bit/s), ``fec``/``expected_loss`` and ``complexity`` configure the Opus encoder used when
    the player mixes or encodes PCM; passthrough packets keep the bitrate they were made with.
    ``lookahead`` is how many mixed frames are encoded ahead (minimum 2): more absorbs a loaded machine,
    fewer makes controls quicker. ``on_audio`` is called (on the loop) when a track is added and whenever
    audio becomes ready, so the owner can make this player its transmit lane's provider and wake the lane.
    Use it from one event loop.
    """

    tick_weight: int = HEAVY_TICK
    """What one pull weighs on the shared clock (the transmit lane reads it when it subscribes): a player may
    start an encoder batch on its tick, so the clock puts fewer of them in one wake-up."""

    def __init__(
        self,
        *,
        bitrate: int = 96_000,
        fec: bool = False,
        expected_loss: int = 0,
        complexity: int = 10,
        lookahead: int = LOOKAHEAD,
        on_audio: Callable[[], None] | None = None,
    ) -> None:
        if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 2:
            # a float passed here, then broke every render (range()): an ERROR and silence on every tick
            raise InvalidArgumentError(f"lookahead must be an integer >= 2 (frames), got {lookahead!r}")
        self._encoder = EncoderSlot(
            bitrate=bitrate, fec=fec, expected_loss=expected_loss, complexity=complexity
        )
        self._lookahead = lookahead
        self._refill_at = lookahead // 2
        """Render again when this many rendered frames are left: 60 ms for the codec thread by default.
        Rendering 3 frames per job (at 1 left, 40 ms) saved ~3 us per frame but made MP3 players late by the
        hundred: the codec thread waits for the GIL behind the source threads' decoding."""
        self._on_audio = on_audio
        self._loop: asyncio.AbstractEventLoop | None = None
        self._mailbox: Mailbox | None = None
        self._batcher: _RenderBatcher | None = None
        self._active: list[Track] = []
        self._activated: list[Track] = []
        self._queue: deque[Track] = deque()
        self._current: Track | None = None
        self._out: deque[_OutEntry] = deque()
        self._rendering = False
        self._render_scheduled = False
        self._gen = 0
        self._retired: list[DecoderSlot] = []
        self._collecting: list[TrackEvent] | None = None
        self._handlers: list[tuple[type[TrackEvent], Callable[[Any], object]]] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._streaming = False
        self.stats = PlayerStats()

    # -- public ------------------------------------------------------------------------------------

    @property
    def bitrate(self) -> int:
        return self._encoder.bitrate

    @bitrate.setter
    def bitrate(self, value: int) -> None:
        check_bitrate(value)
        self._encoder.bitrate = value

    @property
    def tracks(self) -> tuple[Track, ...]:
        """Tracks playing, paused or loading (mixed together), including the queue's current one."""
        return tuple(self._active)

    @property
    def current(self) -> Track | None:
        """The queue's playing track."""
        return self._current

    @property
    def queue(self) -> tuple[Track, ...]:
        """Tracks waiting their turn, next first."""
        return tuple(self._queue)

    @property
    def playing(self) -> bool:
        """Whether any track is playing or about to (loading, or mixed audio still going out)."""
        return bool(self._out) or self._rendering or any(not t._paused for t in self._active)

    @property
    def closed(self) -> bool:
        return self._closed

    def play(
        self,
        source: SourceLike,
        *,
        volume: float = 1.0,
        loop: bool = False,
        start: float = 0.0,
        kind: SourceKind | None = None,
        name: str | None = None,
    ) -> Track:
        """Start ``source`` now, mixed with whatever else plays; see :func:`open_source` for what it takes.

        Nothing blocks: the source opens on a worker thread, and the track starts once it has buffered.
        ``start`` seeks first; ``kind`` says what an iterable yields (``"pcm"`` by default).
        """
        track = self._new_track(
            source, volume=volume, loop=loop, start=start, kind=kind, name=name, queued=False
        )
        self._active.append(track)
        track._begin()
        self._notify()
        return track

    def enqueue(
        self,
        source: SourceLike,
        *,
        volume: float = 1.0,
        loop: bool = False,
        start: float = 0.0,
        kind: SourceKind | None = None,
        name: str | None = None,
    ) -> Track:
        """Add ``source`` to the queue: it starts right after the current queue track, without a gap.

        The next track is opened and buffered while the current one plays, so the change is gapless at the
        frame level. With nothing queued it starts at once.
        """
        track = self._new_track(
            source, volume=volume, loop=loop, start=start, kind=kind, name=name, queued=True
        )
        self._queue.append(track)
        if self._current is None:
            self._advance_queue()
        elif self._queue[0] is track:
            track._begin()
        self._notify()
        return track

    def skip(self) -> Track | None:
        """Stop the queue's current track; the next one starts. Returns the stopped track."""
        current = self._current
        if current is not None:
            current.stop()
        return current

    def clear_queue(self) -> None:
        """Remove (stop) every waiting track; the current one plays on."""
        waiting = list(self._queue)
        self._queue.clear()  # else removing the next track would start (open) the one after it, and so on
        for track in waiting:
            track.stop()

    def stop(self) -> None:
        """Stop every track, queued ones included, and drop the audio already rendered."""
        waiting = list(self._queue)
        self._queue.clear()  # so that stopping the current track does not start (and open) the next one
        for track in [*waiting, *self._active]:
            track._finish(TrackState.STOPPED)
        self._flush()

    def on(self, event_type: type[E], handler: Callable[[E], object]) -> Callable[[], None]:
        """Call ``handler(event)`` for each event of ``event_type`` (a subclass of :class:`TrackEvent`).

        Handlers run on the event loop, never inside the 20 ms tick; a coroutine function is run as a task.
        Returns a function that unsubscribes.
        """
        if not (isinstance(event_type, type) and issubclass(event_type, TrackEvent)):
            raise InvalidArgumentError("event_type must be TrackEvent or one of its subclasses")
        if not callable(handler):
            raise InvalidArgumentError(f"an event handler must be callable, got {handler!r:.60}")
        entry: tuple[type[TrackEvent], Callable[[Any], object]] = (event_type, handler)
        self._handlers.append(entry)

        def unsubscribe() -> None:
            if entry in self._handlers:
                self._handlers.remove(entry)

        return unsubscribe

    def close(self) -> None:
        """Stop everything and free the encoder; idempotent. The session calls it when it ends."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        if not self._rendering:
            self._encoder.close()
            self._close_retired()
        elif self._mailbox is not None:
            self._mailbox.collect_soon()  # the job may be done and waiting: free the encoder soon

    # -- the frame provider ------------------------------------------------------------------------

    def pull(self) -> bytes | None:
        """The next 20 ms Opus frame, or ``None`` for silence. Called by the transmit lane every tick."""
        mailbox = self._mailbox
        if mailbox is not None and mailbox.pending:
            mailbox.collect()  # finished jobs of every player on this loop, left there without a wake-up
        out = self._out
        if out:  # the steady state, inline: this runs for every stream every 20 ms
            packet, events = out.popleft()
            if events:
                self._emit_soon(events)
            if len(out) <= self._refill_at and not self._render_scheduled and not self._rendering:
                self._schedule_render()
            self._streaming = True
            return packet
        found = self._next_packet()
        self._streaming = found is not None
        return found

    def _next_packet(self) -> bytes | None:
        """``pull()`` with nothing rendered: passthrough, silence, or a render to start."""
        if self._rendering:
            self._late()
            return None
        if not self._active:
            return None
        if self._mix_needed():
            self._late()  # mixing starts (a second track, a volume change): the first render is not back yet
            self._schedule_render()
            return None
        taken = self._step()
        if len(taken) == 1 and taken[0][0].kind == "opus" and taken[0][0]._volume == 1.0:
            track, frame = taken[0]
            track.frames_passthrough += 1
            self.stats.passthrough_frames += 1
            if track._eof and self._queue and track is self._current:
                self._hand_over(track)
            return frame
        if taken:  # the step changed the mix (the queue moved on to a PCM track): render it
            self._late()
            self._batch().add(self._job([taken], [[]]))
        return None

    def _hand_over(self, track: Track) -> None:
        """Queue the passthrough ``track``'s last packets as rendered ones if the next track needs rendering.

        Its first frames are then rendered behind them while they go out, as in the mixing path; waiting
        until the packets run out would leave a silent tick while that first render runs.
        """
        following = self._queue[0]
        if len(track._buffer) > self._lookahead or not following._ready(as_next=True):
            return
        if following.kind == "opus" and following._volume == 1.0:
            return  # passthrough again: the step that ends this track hands out the next packet
        while track._buffer:
            packet = track._take()
            if packet is None:
                break
            track.frames_passthrough += 1
            self.stats.passthrough_frames += 1
            self._out.append((packet, None))
        if len(self._out) <= self._refill_at:
            self._schedule_render()

    def _late(self) -> None:
        if self._streaming:
            self.stats.late_frames += 1

    # -- internals: tracks -------------------------------------------------------------------------

    def _event_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._mailbox = get_mailbox(self._loop)
        return self._loop

    def _batch(self) -> _RenderBatcher:
        if self._batcher is None:
            self._batcher = _batcher_for(self._event_loop())
        return self._batcher

    def _waiting(self) -> bool:
        """Whether a finished job must wake the loop (read on worker threads; see ``Mailbox``).

        A player that handed out a frame on its last pull is pulled again within 20 ms and collects then;
        one that is starting, late (its last pull found nothing) or closed is not guaranteed a pull.
        """
        return self._closed or not self._streaming

    def _new_track(
        self,
        source: SourceLike,
        *,
        volume: float,
        loop: bool,
        start: float,
        kind: SourceKind | None,
        name: str | None,
        queued: bool,
    ) -> Track:
        if self._closed:
            raise AudioError("the player is closed")
        if not (isinstance(start, int | float) and math.isfinite(start) and start >= 0):
            raise InvalidArgumentError(f"start must be a time in seconds >= 0, not {start!r}")
        self._event_loop()
        return Track(
            self,
            open_source(source, kind=kind),
            volume=volume,
            loop=loop,
            start=start,
            name=name,
            queued=queued,
        )

    def _advance_queue(self) -> None:
        while self._queue:
            track = self._queue.popleft()
            if track._end_state is not None:
                continue
            track._queued = False
            self._current = track
            self._active.append(track)
            self._activated.append(track)
            track._begin()
            break
        if self._queue:
            self._queue[0]._begin()  # prefetch the next one for a gapless change

    def _detach(self, track: Track) -> None:
        if track in self._active:
            self._active.remove(track)
        if track is self._current:
            self._current = None
            self._advance_queue()
        elif track in self._queue:
            was_next = self._queue[0] is track
            self._queue.remove(track)
            if was_next and self._queue:
                self._queue[0]._begin()

    def _after_stop(self) -> None:
        if not any(not t._paused for t in self._active):
            self._flush()  # nothing else is audible: drop the rendered lookahead for an instant stop

    def _track_data(self, track: Track) -> None:
        if track._end_state is None and not track._queued:
            self._changed()  # also tops the lookahead up between pulls: keep it (MP3 was late without it)

    def _changed(self) -> None:
        """Something that affects the mix changed: render ahead now rather than at the next tick."""
        if self._active:
            self._schedule_render()
            if any(t._ready() for t in self._active):
                self._notify()

    def _notify(self) -> None:
        """Tell the owner (the session's transmit lane) that there is, or soon will be, audio to pull."""
        if self._on_audio is not None:
            try:
                self._on_audio()
            except Exception:
                logger.exception("the player's on_audio hook failed")

    def _retire(self, decoder: DecoderSlot) -> None:
        if decoder.decoder is None:
            return
        if self._rendering:
            self._retired.append(decoder)  # a codec thread may be using it: close after the job
        else:
            decoder.close()

    def _close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for decoder in retired:
            decoder.close()

    # -- internals: stepping and rendering ---------------------------------------------------------

    def _mix_needed(self) -> bool:
        """Whether the next frame must be rendered: several tracks, PCM, or a volume other than 1.0.

        A queue track that has just run out counts as the next queued track, which takes over within the
        same step. With nothing ready the answer is no: a step then only notices ended tracks.
        """
        solo = None
        for track in self._active:
            candidate: Track | None = track if track._ready() else None
            if candidate is None and track is self._current and track._exhausted_now() and self._queue:
                following = self._queue[0]
                candidate = following if following._ready(as_next=True) else None
            if candidate is None:
                continue
            if solo is not None:
                return True
            solo = candidate
        return solo is not None and (solo.kind != "opus" or solo._volume != 1.0)

    def _step(self) -> list[tuple[Track, bytes]]:
        """Take every playing track's frame for one output frame (the queue may move on meanwhile)."""
        taken: list[tuple[Track, bytes]] = []
        self._activated.clear()
        pending = list(self._active)
        index = 0
        while index < len(pending):
            track = pending[index]
            index += 1
            if track._paused or track._end_state is not None:
                continue
            frame = track._take()
            if frame is not None:
                taken.append((track, frame))
            if self._activated:
                pending.extend(self._activated)
                self._activated.clear()
        return taken

    def _schedule_render(self) -> None:
        if not self._render_scheduled and not self._rendering and not self._closed:
            self._render_scheduled = True
            self._batch().request(self)

    def _collect(self) -> _RenderJob | None:
        """Take frames for up to ``lookahead`` output frames: this player's part of the next codec batch."""
        self._render_scheduled = False
        if self._rendering or self._closed:
            return None
        active = self._active
        if len(active) == 1:  # the usual case, one PCM track playing at unity: its frames go out unmixed
            track = active[0]
            run = track._take_run(self._lookahead - len(self._out))
            if run:
                self._rendering = True
                self.stats.render_jobs += 1
                return _RenderJob(self, self._gen, run, self._encoder, None, (track,))
        frames: list[list[tuple[Track, bytes]]] = []
        events: list[list[TrackEvent]] = []
        collected: list[TrackEvent] = []
        self._collecting = collected
        try:
            while len(self._out) + len(frames) < self._lookahead and self._active:
                if not self._mix_needed():
                    break  # one Opus track at unity (or nothing ready): pull() takes over
                taken = self._step()
                if not taken:
                    break
                frames.append(taken)
                events.append(collected[:])
                collected.clear()
        finally:
            self._collecting = None
        if collected:  # a track ended after the last frame taken: announce it with that frame
            if events:
                events[-1].extend(collected)
            elif self._out:
                last_packet, last_events = self._out[-1]
                self._out[-1] = (last_packet, [*(last_events or []), *collected])
            else:
                self._emit_soon(collected)
        return self._job(frames, events) if frames else None

    def _job(self, frames: list[list[tuple[Track, bytes]]], events: list[list[TrackEvent]]) -> _RenderJob:
        inputs: list[MixFrame] = []
        for taken in frames:
            if len(taken) == 1 and taken[0][0].kind == "pcm" and taken[0][0]._volume == 1.0:
                inputs.append(taken[0][1])  # nothing to mix
                continue
            inputs.append(
                [
                    MixInput(frame, track._volume, track._decoder if track.kind == "opus" else None)
                    for track, frame in taken
                ]
            )
        tracks = tuple({track for taken in frames for track, _ in taken})
        self._rendering = True
        self.stats.render_jobs += 1
        return _RenderJob(self, self._gen, inputs, self._encoder, events, tracks)

    def _rendered(self, job: _RenderJob, packets: list[bytes] | None, failure: BaseException | None) -> None:
        events, tracks = job.events, job.tracks
        self._rendering = False
        for track in tracks:
            if track._decoder.errors:
                self.stats.decode_errors += track._decoder.errors
                track._decoder.errors = 0
        if self._retired:
            self._close_retired()
        if self._closed:
            self._encoder.close()
        if job.gen != self._gen or self._closed:
            self._emit_soon(_flatten(events))  # flushed: the frames are gone, the events still happened
            return
        if packets is None or len(packets) != len(job.inputs):
            error = as_audio_error(failure or AudioError("the render job returned nothing"), "mixing")
            logger.error("mixing/encoding failed: %s", error)
            self.stats.render_errors += 1
            self.stats.dropped_frames += len(job.inputs)
            self._emit_soon(_flatten(events))
            for track in tracks:
                track._finish(TrackState.FAILED, error)
            return
        self.stats.encoded_frames += len(packets)
        if events is None:
            self._out.extend([(packet, None) for packet in packets])
        else:
            for packet, frame_events in zip(packets, events, strict=True):
                self._out.append((packet, frame_events or None))
        if packets:
            self._notify()
        if len(self._out) <= self._refill_at:
            self._schedule_render()

    def _flush(self) -> None:
        """Drop rendered frames not yet pulled (their events are still emitted)."""
        self._gen += 1
        pending = [event for _, events in self._out if events for event in events]
        self._out.clear()
        if pending:
            self._emit_soon(pending)

    # -- internals: events -------------------------------------------------------------------------

    def _publish(self, events: list[TrackEvent]) -> None:
        if self._collecting is not None:
            self._collecting.extend(events)  # rendering ahead: emit when that frame goes out
            return
        for event in events:
            if isinstance(event, TrackEndEvent):
                event.track._resolve()
        self._emit_soon(events)

    def _emit_soon(self, events: list[TrackEvent]) -> None:
        if events:
            self._event_loop().call_soon(self._emit, events)

    def _emit(self, events: list[TrackEvent]) -> None:
        for event in events:
            if isinstance(event, TrackEndEvent):
                event.track._resolve()
            for event_type, handler in list(self._handlers):
                if isinstance(event, event_type):
                    self._call(handler, event)

    def _call(self, handler: Callable[[Any], object], event: TrackEvent) -> None:
        try:
            result = handler(event)
        except Exception:
            self.stats.handler_errors += 1
            logger.exception("track event handler failed")
            return
        if asyncio.iscoroutine(result):
            self._spawn(result)

    def _spawn(self, coroutine: Any) -> None:
        task = self._event_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._handler_done)

    def _handler_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.stats.handler_errors += 1
            logger.error("track event handler failed", exc_info=task.exception())
