"""The asyncio shell of voice receive: one :class:`Receiver` per voice connection.

The session feeds it (transport-decrypted RTP packets from the UDP layer, op 5/11/13, DAVE epoch changes);
users read from it:

* ``async for frame in receiver`` or ``receiver.listen(user_id=None, pcm=False)``: every user's frames, or
  one user's, as :class:`~cordvoice.audio.receive_pipeline.VoiceFrame` (user id, sequence, RTP timestamp,
  arrival, playout and timeline time, Opus bytes, and PCM when asked for);
* ``receiver.speaking_events()``: speaking start/stop, from op 5 and from audio activity;
* sinks (:mod:`cordvoice.audio.sinks`) attached with :meth:`Receiver.add_sink`;
* ``receiver.stats(user_id)``: received, lost, concealed, late, duplicate, undecryptable and more.

Scale: packets are processed inline as they arrive (a dictionary lookup, DAVE decryption, a jitter-buffer
insert). Playout runs on the process-wide 20 ms clock with one subscription per receiver, never one timer per
user. Opus decoding happens only for users somebody wants PCM of, in one batch per tick on a worker thread
(split across threads for large batches); batches run strictly in order so each user's decoder sees its
packets in sequence. Every consumer has a bounded queue: a slow one loses its oldest items (counted in
``dropped``), it never grows memory.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Final, Generic, TypeVar

from cordvoice.audio.clock import HEAVY_TICK, Clock, ClockSubscription, get_clock
from cordvoice.audio.opus import STATUS_ERROR, decode_slots
from cordvoice.audio.receive_pipeline import (
    DecodeJob,
    DecryptFn,
    PipelineCounters,
    ReceivePipeline,
    SpeakingChange,
    TickOutput,
    UserStats,
    VoiceFrame,
)
from cordvoice.audio.workers import usable_cores
from cordvoice.errors import InvalidArgumentError
from cordvoice.events import (
    ClientConnectEvent,
    ClientDisconnectEvent,
    DaveEpochEvent,
    DisconnectedEvent,
    MovedEvent,
    SpeakingEvent,
    check_snowflake,
)

if TYPE_CHECKING:
    from types import TracebackType

    from cordvoice.audio.sinks import AudioSink
    from cordvoice.session import Session
    from cordvoice.udp.crypto import TransportCipher
    from cordvoice.udp.rtp import RtpHeader

__all__ = ["BoundedStream", "FrameStream", "Receiver"]

logger = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_QUEUE_FRAMES: Final = 3000
"""Per consumer: 60 s of one user's audio, or 1 s of 60 users', but only 60 ms of 1,000 users': a larger call
needs a larger ``maxsize`` (see :meth:`Receiver.listen`)."""
_PARALLEL_DECODE_MIN: Final = 48
"""Below this many decode jobs per tick, one worker thread is cheaper than splitting the batch."""
_MAX_TICK_ERRORS: Final = 20
_new_tuple: Final = tuple.__new__
_MAX_DECODE_BACKLOG: Final = 50
"""Ticks (1 s) of decode work allowed to wait behind the running batch before the oldest is dropped."""

_executor_lock = threading.Lock()
_decode_executor: ThreadPoolExecutor | None = None


def decode_executor() -> ThreadPoolExecutor:
    """The shared worker pool every receiver decodes on (one thread per core, at most four)."""
    global _decode_executor  # noqa: PLW0603 - one pool per process, created on first use
    with _executor_lock:
        if _decode_executor is None:
            workers = max(1, min(4, usable_cores()))
            _decode_executor = ThreadPoolExecutor(workers, thread_name_prefix="cordvoice-decode")
        return _decode_executor


class BoundedStream(Generic[T]):
    """An async iterator the receiver fills; when full, the oldest item is dropped and counted.

    Iteration ends once the receiver closes (after the items still queued) or after :meth:`close`.
    Use it as an async context manager, or call :meth:`close`, to stop receiving.
    """

    def __init__(self, maxsize: int, detach: Callable[[BoundedStream[T]], None] | None = None) -> None:
        # Not NaN, a float or a str: NaN compared false with the queue's length, so nothing was ever dropped.
        if not isinstance(maxsize, int) or isinstance(maxsize, bool) or maxsize < 1:
            raise InvalidArgumentError(f"maxsize must be an integer of at least 1, got {maxsize!r}")
        self.maxsize = maxsize
        self.dropped = 0
        """Items lost because the consumer fell ``maxsize`` behind."""
        self.delivered = 0
        self._queue: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self._detach = detach

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def closed(self) -> bool:
        return self._finished

    def _put(self, item: T) -> None:
        queue = self._queue
        if len(queue) >= self.maxsize:
            queue.popleft()
            self.dropped += 1
        queue.append(item)
        self.delivered += 1

    def _put_all(self, items: list[T]) -> None:
        """:meth:`_put` for every item of a tick, in one call (the same queue and counters afterwards)."""
        queue = self._queue
        queue.extend(items)
        self.delivered += len(items)
        excess = len(queue) - self.maxsize
        if excess > 0:
            self.dropped += excess
            for _ in range(excess):
                queue.popleft()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _finish(self) -> None:
        self._finished = True
        self._wake()

    def get_nowait(self) -> T | None:
        """The next queued item, or None."""
        return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        """Stop receiving; iteration ends after nothing more (queued items are discarded)."""
        self._queue.clear()
        if self._detach is not None:
            detach, self._detach = self._detach, None
            detach(self)
        self._finish()

    def __aiter__(self) -> BoundedStream[T]:
        return self

    async def __anext__(self) -> T:
        while not self._queue:
            if self._finished:
                raise StopAsyncIteration
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            await waiter
        return self._queue.popleft()

    async def __aenter__(self) -> BoundedStream[T]:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class FrameStream(BoundedStream[VoiceFrame]):
    """Frames of every user (``user_id`` None) or of one user; with PCM when opened with ``pcm=True``."""

    def __init__(
        self,
        maxsize: int,
        user_id: int | None,
        pcm: bool,
        detach: Callable[[BoundedStream[VoiceFrame]], None] | None = None,
    ) -> None:
        super().__init__(maxsize, detach)
        self.user_id = user_id
        self.pcm = pcm

    def __aiter__(self) -> FrameStream:
        return self

    async def __aenter__(self) -> FrameStream:
        return self


class Receiver:
    """Incoming audio of one voice connection; see the module docstring.

    ``decrypt`` is the DAVE decrypt callable (``DaveClient.decrypt``), None for a call without DAVE. Times
    (arrival, playout, timeline, speaking changes) are ``time.monotonic()`` seconds: the clock the UDP layer
    stamps arrivals with, and the one asyncio's default ``loop.time()`` reads.
    ``jitter_delay`` (seconds, default 60 ms) trades latency for tolerance to network jitter and
    reordering. Further keyword options go to :class:`~cordvoice.audio.receive_pipeline.ReceivePipeline`.
    Create it inside the running event loop; :meth:`close` it when done.
    """

    def __init__(
        self,
        decrypt: DecryptFn | None = None,
        *,
        jitter_delay: float = 0.060,
        executor: Executor | None = None,
        decode_threads: int | None = None,
        clock: Clock | None = None,
        **pipeline_options: Any,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._core = ReceivePipeline(decrypt, jitter_delay=jitter_delay, **pipeline_options)
        self._executor = executor
        self._decode_threads = max(1, decode_threads or min(4, usable_cores()))
        self._frame_streams: list[FrameStream] = []
        self._opus_streams: list[FrameStream] = []
        self._pcm_streams: list[FrameStream] = []
        self._speaking_streams: list[BoundedStream[SpeakingChange]] = []
        self._sinks: list[AudioSink] = []
        self._pcm_all = 0
        self._pcm_users: Counter[int] = Counter()
        self._decode_queue: deque[tuple[list[VoiceFrame], list[tuple[int, DecodeJob]]]] = deque()
        self._decoding = False
        self._decode_idle: asyncio.Future[None] | None = None
        self._chunks: list[list[tuple[int, DecodeJob]]] = []
        self._chunk_results: list[list[tuple[bytes, int]] | None] = []
        self._chunks_left = 0
        self.sink_errors = 0
        self.tick_errors = 0
        self._closed = False
        self._close_done: asyncio.Future[None] | None = None
        self._detachers: list[Callable[[], None]] = []
        self._clock = clock or get_clock(self._loop)
        self._subscription: ClockSubscription | None = self._subscribe()

    @classmethod
    def for_session(cls, session: Session, **options: Any) -> Receiver:
        """A receiver fed by ``session``: its UDP receive hook, op 5/11/13 and DAVE epoch events.

        It closes itself when the session ends. ``session.listen()`` and ``session.receiver`` use this; one
        made here with other options (``jitter_delay=0.02``, say) gets every packet beside that one.
        An ended session raises its error: no DisconnectedEvent would ever close the receiver.
        """
        session._check_loop()
        session._check_open()

        def decrypt(user_id: int, frame: bytes) -> bytes:
            dave = session.dave
            return frame if dave is None else dave.decrypt(user_id, frame)

        receiver = cls(decrypt, **options)
        for ssrc, user_id in session.ssrc_users.items():
            receiver._core.map_ssrc(ssrc, user_id)
        receiver._core.on_clients_connect(session.user_ids)

        async def closed(_event: DisconnectedEvent) -> None:
            await receiver.close()

        def moved(event: MovedEvent) -> None:
            # Nobody of the old channel is in the new call and no op 13 will come for them: they leave here
            # (their last frames play out and their speaking ends), before the new call's op 11 and op 5.
            if event.channel_id != event.previous_channel_id:
                receiver.on_clients_left({*receiver.users, *receiver.pipeline.recognized_users})

        receiver._detachers = [
            session.on(SpeakingEvent, lambda e: receiver.on_speaking(e.user_id, e.ssrc, e.flags)),
            session.on(ClientConnectEvent, lambda e: receiver.on_clients_connect(e.user_ids)),
            session.on(ClientDisconnectEvent, lambda e: receiver.on_client_disconnect(e.user_id)),
            session.on(DaveEpochEvent, lambda e: receiver.on_dave_epoch(e.epoch)),
            session.on(MovedEvent, moved),
            session.on(DisconnectedEvent, closed),
        ]
        session._add_receiver_feed(receiver.feed)
        receiver._detachers.append(functools.partial(session._remove_receiver_feed, receiver.feed))
        return receiver

    # ---------------------------------------------------------------------------------------------
    # Inputs (the session calls these)

    def feed(self, header: RtpHeader, payload: bytes, arrival: float | None = None) -> None:
        """One transport-decrypted RTP packet; ``arrival`` is ``time.monotonic()`` (default: now)."""
        if self._closed:
            return
        self._core.feed(header, payload, time.monotonic() if arrival is None else arrival)

    def feed_datagram(self, data: bytes, cipher: TransportCipher, arrival: float | None = None) -> None:
        """One raw datagram: RTCP, garbage and unauthenticated packets are counted and dropped."""
        if self._closed:
            return
        self._core.feed_datagram(data, time.monotonic() if arrival is None else arrival, cipher)

    def on_speaking(self, user_id: int, ssrc: int, flags: int) -> None:
        """Op 5 from another member."""
        if not self._closed:
            self._core.on_speaking(user_id, ssrc, flags, time.monotonic())

    def on_clients_connect(self, user_ids: Iterable[int]) -> None:
        """Op 11."""
        if not self._closed:
            self._core.on_clients_connect(user_ids)

    def on_client_disconnect(self, user_id: int) -> None:
        """Op 13."""
        if not self._closed:
            self._core.on_client_disconnect(user_id, time.monotonic())

    def on_clients_left(self, user_ids: Iterable[int]) -> None:
        """Users known to have left without an op 13 (the bot moved to another channel)."""
        if not self._closed:
            now = time.monotonic()
            for user_id in list(user_ids):
                self._core.on_client_disconnect(user_id, now)

    def on_dave_epoch(self, epoch: int | None = None) -> None:
        """The DAVE group changed (any epoch event): retry frames that were waiting for their key."""
        if not self._closed:
            self._core.on_epoch_changed(time.monotonic())

    # ---------------------------------------------------------------------------------------------
    # Outputs

    def listen(
        self, user_id: int | None = None, *, pcm: bool = False, maxsize: int = DEFAULT_QUEUE_FRAMES
    ) -> FrameStream:
        """A new stream of frames: every user's, or ``user_id``'s only; decoded to PCM if ``pcm``.

        ``maxsize`` frames wait for the consumer; beyond that the oldest are dropped and counted
        (``dropped``). Every user delivers 50 frames a second, so an all-users stream of a large call needs
        room for the longest pause the consumer or the loop may take: at 1,000 users the default holds 60 ms,
        and full garbage collections of 40-66 ms (docs/benchmarks.md, receive) dropped frames there. Use
        ``maxsize=users * 50 * seconds`` for the pause to absorb.
        """
        if user_id is not None:
            check_snowflake("user_id", user_id)  # a str id (from a config file) would match no frame
        stream = FrameStream(maxsize, user_id, pcm, self._detach_frames)
        if self._closed:
            stream._finish()
            return stream
        self._frame_streams.append(stream)
        if pcm:
            self._pcm_streams.append(stream)
            self._want_pcm(user_id, +1)
        else:
            self._opus_streams.append(stream)
        return stream

    def __aiter__(self) -> FrameStream:
        """``async for frame in receiver``: a new all-users Opus stream (it stays attached until closed;
        prefer ``async with receiver.listen() as frames`` when the loop may stop early)."""
        return self.listen()

    def speaking_events(self, maxsize: int = 1000) -> BoundedStream[SpeakingChange]:
        """A new stream of :class:`SpeakingChange` (op 5 and audio activity) for every user."""
        stream: BoundedStream[SpeakingChange] = BoundedStream(maxsize, self._detach_speaking)
        if self._closed:
            stream._finish()
        else:
            self._speaking_streams.append(stream)
        return stream

    def add_sink(self, sink: AudioSink) -> AudioSink:
        """Attach a sink; it gets every frame (with PCM if ``sink.wants_pcm``) until removed or closed."""
        if self._closed:
            raise InvalidArgumentError("the receiver is closed")
        if not (
            hasattr(sink, "wants_pcm")
            and callable(getattr(sink, "write", None))
            and callable(getattr(sink, "close", None))
        ):
            hint = " (record_to_directory returns a list: add each one)" if isinstance(sink, list) else ""
            raise InvalidArgumentError(f"{sink!r} is not an audio sink{hint}")
        self._sinks.append(sink)
        if sink.wants_pcm:
            self._want_pcm(None, +1)
        return sink

    def remove_sink(self, sink: AudioSink) -> None:
        """Detach a sink without closing it (frames still being decoded will not reach it)."""
        if sink in self._sinks:
            self._sinks.remove(sink)
            if sink.wants_pcm:
                self._want_pcm(None, -1)

    @property
    def sinks(self) -> list[AudioSink]:
        return list(self._sinks)

    def stats(self, user_id: int) -> UserStats:
        """One user's counters (a snapshot; zeros for a user never heard)."""
        check_snowflake("user_id", user_id)  # a str id (from a config file) read as zeros: nothing lost
        return self._core.stats(user_id)

    def all_stats(self) -> dict[int, UserStats]:
        return self._core.all_stats()

    @property
    def counters(self) -> PipelineCounters:
        """Packets dropped before reaching a user (unknown SSRCs, RTCP, malformed, ...)."""
        return self._core.counters

    @property
    def users(self) -> list[int]:
        return self._core.users

    @property
    def ssrc_users(self) -> dict[int, int]:
        return self._core.ssrc_users

    @property
    def pipeline(self) -> ReceivePipeline:
        """The sans-IO core (for inspection)."""
        return self._core

    @property
    def closed(self) -> bool:
        return self._closed

    # ---------------------------------------------------------------------------------------------
    # Lifecycle

    async def close(self, *, close_sinks: bool = True) -> None:
        """Play out what is buffered, finish decoding, end every stream and (by default) close the sinks.

        A close while another is under way (the session's own, when it ends) returns when that one is done.
        """
        if self._closed:
            if self._close_done is not None:
                await asyncio.shield(self._close_done)
            return
        self._closed = True
        self._close_done = self._loop.create_future()
        if self._subscription is not None:
            self._subscription.cancel()
            self._subscription = None
        detachers, self._detachers = self._detachers, []
        for detach in detachers:
            detach()
        output = self._core.drain(time.monotonic(), self._wants_pcm if self._pcm_wanted() else None)
        self._dispatch(output)
        try:
            if self._decoding:
                self._decode_idle = self._loop.create_future()
                await self._decode_idle
        finally:
            # Even when cancelled (the frames still decoding are then lost): a later close() returns at once,
            # so this is the only chance to end the streams and finish the sinks' files.
            try:
                self._finish_outputs(close_sinks)
            finally:
                self._close_done.set_result(None)

    def _finish_outputs(self, close_sinks: bool) -> None:
        """End every stream and detach the sinks (closing them if asked)."""
        for stream in self._frame_streams:
            stream._finish()
        for events in self._speaking_streams:
            events._finish()
        self._frame_streams.clear()
        self._opus_streams.clear()
        self._pcm_streams.clear()
        self._speaking_streams.clear()
        sinks, self._sinks = self._sinks, []
        if close_sinks:
            for sink in sinks:
                self._close_sink(sink)

    async def __aenter__(self) -> Receiver:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---------------------------------------------------------------------------------------------
    # Tick and delivery

    def _pcm_wanted(self) -> bool:
        return bool(self._pcm_all or self._pcm_users)

    def _wants_pcm(self, user_id: int) -> bool:
        return bool(self._pcm_all) or user_id in self._pcm_users

    def _want_pcm(self, user_id: int | None, delta: int) -> None:
        if user_id is None:
            self._pcm_all += delta
            return
        self._pcm_users[user_id] += delta
        if self._pcm_users[user_id] <= 0:
            del self._pcm_users[user_id]

    def _detach_frames(self, stream: BoundedStream[VoiceFrame]) -> None:
        assert isinstance(stream, FrameStream)
        if stream in self._frame_streams:
            self._frame_streams.remove(stream)
            if stream.pcm:
                self._pcm_streams.remove(stream)
                self._want_pcm(stream.user_id, -1)
            else:
                self._opus_streams.remove(stream)

    def _detach_speaking(self, stream: BoundedStream[SpeakingChange]) -> None:
        if stream in self._speaking_streams:
            self._speaking_streams.remove(stream)

    def _tick_failed(self, exc: BaseException) -> None:
        # The clock already logged the traceback and unsubscribed us: subscribe again so one bad tick
        # never silences the receiver, but give up (loudly) on a receiver that fails over and over.
        self.tick_errors += 1
        if self._closed:
            return
        if self.tick_errors > _MAX_TICK_ERRORS:
            logger.error("the receiver failed %d ticks; it stops delivering audio", self.tick_errors)
            self._subscription = None
            return
        self._subscription = self._subscribe()

    def _subscribe(self) -> ClockSubscription:
        # A tick plays out every user of the call (and starts their decode jobs): weigh it like a player's.
        return self._clock.subscribe(self._on_tick, weight=HEAVY_TICK, on_error=self._tick_failed)

    def _on_tick(self, deadline: float) -> None:
        output = self._core.tick(time.monotonic(), self._wants_pcm if self._pcm_wanted() else None)
        if output.frames or output.speaking:
            self._dispatch(output)

    def _dispatch(self, output: TickOutput) -> None:
        if output.speaking:
            for events in self._speaking_streams:
                for change in output.speaking:
                    events._put(change)
                events._wake()
        frames = output.frames
        if not frames:
            return
        self._deliver(frames, self._opus_streams, False)
        if output.jobs:
            queue = self._decode_queue
            queue.append((frames, output.jobs))
            if len(queue) > _MAX_DECODE_BACKLOG + 1:
                # Decoding cannot keep up: drop the oldest waiting batch (never the running one).
                _, jobs = queue[1]
                del queue[1]
                self._core.counters.decode_backlog_dropped += len(jobs)
            if not self._decoding:
                self._start_decode()

    def _deliver(self, frames: list[VoiceFrame], streams: list[FrameStream], pcm: bool) -> None:
        """Hand frames to the streams and sinks of one kind (PCM or Opus-only)."""
        for stream in streams:
            wanted = stream.user_id
            if wanted is None:
                stream._put_all(frames)
            else:
                for frame in frames:
                    if frame.user_id == wanted:
                        stream._put(frame)
            if stream._queue:
                stream._wake()
        if not self._sinks:
            return
        for sink in list(self._sinks):
            if sink.wants_pcm != pcm:
                continue
            try:
                for frame in frames:
                    sink.write(frame)
            except Exception:
                self.sink_errors += 1
                logger.exception("audio sink %r failed; it is detached and closed", sink)
                self.remove_sink(sink)
                # Closed now, not left open: what it already wrote (other users' files of a per-user
                # sink, say) gets finished headers, and its file handles are released.
                self._close_sink(sink)

    def _close_sink(self, sink: AudioSink) -> None:
        """Close a sink; a failure is counted and logged, not raised, so the caller carries on."""
        try:
            sink.close()
        except Exception:
            self.sink_errors += 1
            logger.exception("closing the audio sink %r failed", sink)

    def _start_decode(self) -> None:
        _frames, jobs = self._decode_queue[0]
        chunks = self._chunks = _split_jobs(jobs, self._decode_threads)
        self._decoding = True
        self._chunk_results = [None] * len(chunks)
        self._chunks_left = len(chunks)
        executor = self._executor or decode_executor()
        for index, chunk in enumerate(chunks):
            future: asyncio.Future[list[tuple[bytes, int]]]
            try:
                future = self._loop.run_in_executor(executor, decode_slots, [job for _, job in chunk])
            except RuntimeError as exc:  # the caller's executor was shut down: a failed batch, not a hang
                future = self._loop.create_future()
                future.set_exception(exc)
            future.add_done_callback(functools.partial(self._chunk_done, index))

    def _chunk_done(self, index: int, future: asyncio.Future[list[tuple[bytes, int]]]) -> None:
        if future.cancelled():
            result: list[tuple[bytes, int]] | None = None
        elif (exc := future.exception()) is not None:
            logger.error("Opus decode batch failed", exc_info=exc)
            result = None
        else:
            result = future.result()
        self._chunk_results[index] = result
        self._chunks_left -= 1
        if self._chunks_left:
            return
        frames, jobs = self._decode_queue.popleft()
        try:
            self._attach_pcm(frames, jobs)
        finally:
            self._decoding = False
            if self._decode_queue:
                self._start_decode()
            elif self._decode_idle is not None and not self._decode_idle.done():
                self._decode_idle.set_result(None)

    def _attach_pcm(self, frames: list[VoiceFrame], jobs: list[tuple[int, DecodeJob]]) -> None:
        chunk_results = self._chunk_results
        if len(chunk_results) == 1 and chunk_results[0] is not None:
            results = chunk_results[0]  # one worker decoded the whole tick: the common case
        else:
            results = []
            for chunk, chunk_result in zip(self._chunks, chunk_results, strict=True):
                if chunk_result is None:
                    results.extend((bytes(job.samples * 4), STATUS_ERROR) for _, job in chunk)
                else:
                    results.extend(chunk_result)
        decoded: list[VoiceFrame] = []
        append = decoded.append
        statuses: list[tuple[int, int]] = []
        add_status = statuses.append
        for (index, _job), (pcm, status) in zip(jobs, results, strict=True):
            # frame._replace(pcm=pcm) without its per-call overhead (VoiceFrame's fields in order).
            user_id, ssrc, seq, ts, arrival, playout, timeline, opus, _, concealed, samples = frames[index]
            fields = (user_id, ssrc, seq, ts, arrival, playout, timeline, opus, pcm, concealed, samples)
            append(_new_tuple(VoiceFrame, fields))
            add_status((user_id, status))
        self._core.record_decodes(statuses)
        self._deliver(decoded, self._pcm_streams, True)


def _split_jobs(jobs: list[tuple[int, DecodeJob]], threads: int) -> list[list[tuple[int, DecodeJob]]]:
    """Cut a tick's jobs into about ``threads`` runs, only between two decoders (one thread per decoder)."""
    if threads <= 1 or len(jobs) < _PARALLEL_DECODE_MIN:
        return [jobs]
    target = -(-len(jobs) // threads)
    chunks: list[list[tuple[int, DecodeJob]]] = []
    current: list[tuple[int, DecodeJob]] = []
    for item in jobs:
        if len(current) >= target and item[1].decoder is not current[-1][1].decoder:
            chunks.append(current)
            current = []
        current.append(item)
    if current:
        chunks.append(current)
    return chunks
