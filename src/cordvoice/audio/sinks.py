"""Where received audio goes: WAV per user, one mixed WAV, Ogg Opus per user, or a callback.

Attach sinks with :meth:`Receiver.add_sink <cordvoice.audio.receiver.Receiver.add_sink>`. A sink gets every
frame in playout order per user, on the event loop, and must be quick (buffered file writes are). Every
recording sink places audio on **one timeline**: sample ``round((frame.timeline_time - start_time) * 48000)``.
``start_time`` (the receiver's clock, ``time.monotonic()``) defaults to the first frame's time; share a
:class:`Timeline` (or pass the same value) to align several sinks' files. Because placement comes from the
timeline, silences stay where they were: a 60 s conversation with pauses records to 60 s, in every file, and
an event-loop stall does not stretch it. The 3-byte Opus
silence frames clients send when they stop talking are not audio and are skipped, so trailing silence does
not stretch a file; ``close(end_time=...)`` pads a file to an exact end instead, and cuts a WAV file that
runs past it (an Ogg file keeps whole packets, so it can end up to a receiver's flush past that end).

Frames that come too late for their place (already written) are dropped and counted in ``late``.
"""

from __future__ import annotations

import logging
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, Final, Generic, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt

from cordvoice.audio.mixer import soft_clip_to_int16
from cordvoice.audio.oggwriter import OggOpusWriter
from cordvoice.audio.pcm import CHANNELS, FRAME_SAMPLES, SAMPLE_RATE, SAMPLE_WIDTH, as_array
from cordvoice.audio.receive_pipeline import VoiceFrame
from cordvoice.errors import AudioError, InvalidArgumentError
from cordvoice.events import check_snowflake

__all__ = [
    "AudioSink",
    "CallbackSink",
    "MixedWavSink",
    "OggOpusSink",
    "PerUserOggSink",
    "PerUserWavSink",
    "Timeline",
    "WavSink",
    "record_to_directory",
]

logger = logging.getLogger(__name__)

_BYTES_PER_SAMPLE: Final = CHANNELS * SAMPLE_WIDTH
_HALF_FRAME: Final = FRAME_SAMPLES // 2
_SILENCE_BLOCK: Final = bytes(SAMPLE_RATE * _BYTES_PER_SAMPLE)
"""One second of digital silence: a shorter gap in a WAV file is written from it, a longer one is a hole."""
_WAV_MAX_DATA: Final = 0xFFFFFFFF - 36
_OGG_LATE: Final = FRAME_SAMPLES * 3 // 4
"""An Ogg packet overlapping what is written by this much is late. More than the half frame a silence fill can
overshoot by, so that a spurt of packets a sample either side of that (timeline rounding) is not dropped."""


@runtime_checkable
class AudioSink(Protocol):
    """What a receiver feeds. ``wants_pcm`` makes the receiver decode for it (costly: ask only if needed)."""

    wants_pcm: bool

    def write(self, frame: VoiceFrame) -> None:
        """Take one frame (on the event loop; must not block for long)."""

    def close(self) -> None:
        """Finish the output (idempotent)."""


class Timeline:
    """Maps timeline times to sample offsets from one start; sinks sharing a Timeline write aligned files.

    ``start`` None is fixed by the first frame any of the sharing sinks places.
    """

    __slots__ = ("start",)

    def __init__(self, start: float | None = None) -> None:
        self.start = _check_time(start, "start_time")

    def offset(self, time: float) -> int:
        if self.start is None:
            self.start = time
        return round((time - self.start) * SAMPLE_RATE)

    def samples_until(self, end_time: float) -> int:
        if self.start is None:
            return 0
        return max(0, round((end_time - self.start) * SAMPLE_RATE))


def _check_time(value: float | None, name: str) -> float | None:
    """``value`` if None or a finite number: NaN, infinity or a str would fail later, at the first frame or
    the close."""
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
    ):
        raise InvalidArgumentError(f"{name} must be a finite time (time.monotonic() seconds), not {value!r}")
    return value


def _check_user(user_id: int | None) -> int | None:
    if user_id is not None:
        check_snowflake("user_id", user_id)  # a str id (from a config file) would match no frame
    return user_id


def _make_folder(directory: str | os.PathLike[str]) -> Path:
    """Create ``directory`` (and its parents) if needed; failing is an AudioError, as for a file."""
    folder = Path(directory)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise AudioError(f"cannot create {str(folder)!r}: {exc}") from exc
    return folder


class _WavFile:
    """A 48 kHz stereo s16 WAV being written: the samples follow a header whose sizes are filled in at close.

    Written here rather than with :mod:`wave` so that a file can also be cut back (:meth:`truncate`) when
    audio placed past the recording's end arrives before the close. Past 4 GiB of samples (6.2 hours) both
    sizes are 0xFFFFFFFF, which FFmpeg reads as "to the end of the file"; :mod:`wave` stops at 6.2 hours.
    """

    _HEADER: Final = 44

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples = 0
        self._hole_at_end = False
        try:
            self._file: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as exc:
            raise AudioError(f"cannot create {str(path)!r}: {exc}") from exc
        try:
            self._file.write(self._header(0))
        except OSError as exc:
            self._file.close()
            raise AudioError(f"cannot write {str(path)!r}: {exc}") from exc

    @staticmethod
    def _header(data_bytes: int) -> bytes:
        riff_bytes = 36 + data_bytes
        if data_bytes > _WAV_MAX_DATA:  # a saturated size short of 0xFFFFFFFF would cut readers off there
            riff_bytes = data_bytes = 0xFFFFFFFF
        return b"".join(
            (
                b"RIFF",
                struct.pack("<I", riff_bytes),
                b"WAVEfmt ",
                struct.pack(
                    "<IHHIIHH",
                    16,
                    1,  # PCM
                    CHANNELS,
                    SAMPLE_RATE,
                    SAMPLE_RATE * _BYTES_PER_SAMPLE,
                    _BYTES_PER_SAMPLE,
                    SAMPLE_WIDTH * 8,
                ),
                b"data",
                struct.pack("<I", data_bytes),
            )
        )

    def write(self, pcm: bytes) -> None:
        try:
            self._file.write(pcm)
        except OSError as exc:
            raise AudioError(f"cannot write {str(self.path)!r}: {exc}") from exc
        self.samples += len(pcm) // _BYTES_PER_SAMPLE
        self._hole_at_end = False

    def write_silence(self, samples: int) -> None:
        """Append ``samples`` samples of silence: zeros, or past a second a hole (a sparse file), since an
        hour's pause is 691 MB that would otherwise be allocated at once and written to disk."""
        if samples < SAMPLE_RATE:
            if samples > 0:
                self.write(_SILENCE_BLOCK[: samples * _BYTES_PER_SAMPLE])
            return
        try:
            self._file.seek(samples * _BYTES_PER_SAMPLE, os.SEEK_CUR)
        except OSError as exc:
            raise AudioError(f"cannot write {str(self.path)!r}: {exc}") from exc
        self.samples += samples
        self._hole_at_end = True

    def truncate(self, samples: int) -> None:
        """Drop everything after the first ``samples`` samples."""
        if samples >= self.samples:
            return
        try:
            self._file.seek(self._HEADER + samples * _BYTES_PER_SAMPLE)
            self._file.truncate()
        except OSError as exc:
            raise AudioError(f"cannot write {str(self.path)!r}: {exc}") from exc
        self.samples = samples
        self._hole_at_end = False

    def close(self) -> None:
        """Fill in the sizes and close the file (closed even if that fails)."""
        try:
            try:
                if self._hole_at_end:  # a file ending in a hole is only as long as its last write
                    self._file.truncate(self._HEADER + self.samples * _BYTES_PER_SAMPLE)
                self._file.seek(0)
                self._file.write(self._header(self.samples * _BYTES_PER_SAMPLE))
            finally:
                self._file.close()
        except OSError as exc:
            raise AudioError(f"cannot finish {str(self.path)!r}: {exc}") from exc


class WavSink:
    """One user's audio as a 48 kHz stereo s16 WAV file, on the timeline (silences kept in place).

    ``user_id`` None takes the first user heard. Lost packets come out as the decoder's concealment.
    """

    wants_pcm = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        user_id: int | None = None,
        *,
        start_time: float | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.path = Path(path)
        self.user_id = _check_user(user_id)
        self._timeline = timeline or Timeline(start_time)
        self._writer: _WavFile | None = _WavFile(self.path)
        self._final_samples = 0
        self.frames_written = 0
        self.late = 0

    @property
    def samples_written(self) -> int:
        return self._writer.samples if self._writer is not None else self._final_samples

    @property
    def duration(self) -> float:
        """Seconds written so far."""
        return self.samples_written / SAMPLE_RATE

    def write(self, frame: VoiceFrame) -> None:
        writer = self._writer
        if frame.is_silence or writer is None:
            return
        if self.user_id is None:
            self.user_id = frame.user_id  # heard: silence frames (skipped above) are not
        elif frame.user_id != self.user_id:
            return
        offset = self._timeline.offset(frame.timeline_time)
        pcm = frame.pcm if frame.pcm is not None else bytes(frame.samples * _BYTES_PER_SAMPLE)
        gap = offset - writer.samples
        if gap > 0:
            writer.write_silence(gap)
        elif gap < 0:
            skip = -gap * _BYTES_PER_SAMPLE
            if skip >= len(pcm):
                self.late += 1
                return
            pcm = pcm[skip:]
        writer.write(pcm)
        self.frames_written += 1

    def close(self, end_time: float | None = None) -> None:
        """Pad or cut to ``end_time`` (on the timeline) if given, then finish the header and close.

        Cutting matters because a receiver's close flushes the frames its jitter buffer held, which play
        after the moment the recording was stopped.
        """
        _check_time(end_time, "end_time")
        writer = self._writer
        if writer is None:
            return
        try:
            if end_time is not None:
                end = self._timeline.samples_until(end_time)
                writer.write_silence(end - writer.samples)
                writer.truncate(end)
        finally:
            self._final_samples = writer.samples
            self._writer = None
            writer.close()


class MixedWavSink:
    """Every user mixed into one WAV on the timeline, so pauses and overlaps stay as they happened.

    Frames are summed into a window of ``window`` seconds (users' frames reach the sink within a tick of
    each other; held frames a little later) and soft-clipped when written. The file runs from
    ``start_time`` (default: the first frame) to the end of the last frame, or to ``close(end_time)``.
    """

    wants_pcm = True

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        start_time: float | None = None,
        timeline: Timeline | None = None,
        window: float = 1.0,
    ) -> None:
        if not 0.1 <= window <= 60.0:
            raise InvalidArgumentError("window must be between 0.1 and 60 seconds")
        self.path = Path(path)
        self._timeline = timeline or Timeline(start_time)
        self._window = round(window * SAMPLE_RATE)
        self._capacity = self._window + SAMPLE_RATE
        self._buffer: npt.NDArray[np.int32] = np.zeros((self._capacity, CHANNELS), dtype=np.int32)
        self._base = 0  # timeline sample held in _buffer[0]; everything before it is in the file
        self._end = 0  # end of the latest audio placed
        self._user_ends: dict[int, int] = {}
        """Where each user's audio placed so far ends: a frame that overlaps its predecessor (timeline
        rounding puts consecutive frames a sample apart either way) is trimmed as the per-user file trims it,
        so the mix stays the sum of the per-user files instead of adding that sample twice."""
        self._writer: _WavFile | None = _WavFile(self.path)
        self.frames_mixed = 0
        self.late = 0

    @property
    def samples_written(self) -> int:
        return self._base

    def write(self, frame: VoiceFrame) -> None:
        if frame.is_silence or self._writer is None:
            return
        offset = self._timeline.offset(frame.timeline_time)
        if frame.pcm is None:
            samples = frame.samples
            data = None
        else:
            data = as_array(frame.pcm).reshape(-1, CHANNELS)
            samples = len(data)
        end = offset + samples
        user_ends = self._user_ends
        start = max(offset, self._base, user_ends.get(frame.user_id, 0))
        if start >= end:
            self.late += 1
            return
        user_ends[frame.user_id] = end
        if end - self._base > self._capacity:
            self._flush(end - self._capacity)
        if data is not None:
            self._buffer[start - self._base : end - self._base] += data[start - offset :]
        self._end = max(self._end, end)
        self.frames_mixed += 1
        if self._end - self._base > self._window + SAMPLE_RATE // 2:
            self._flush(self._end - self._window)

    def _flush(self, until: int) -> None:
        """Write the timeline up to sample ``until`` and slide the window."""
        count = until - self._base
        if count <= 0:
            return
        writer = self._writer
        assert writer is not None
        buffer = self._buffer
        held = min(count, self._capacity)
        chunk = soft_clip_to_int16(buffer[:held].astype(np.float32)).tobytes()
        writer.write(chunk)
        if count > held:
            writer.write_silence(count - held)
        if held < self._capacity:
            buffer[: self._capacity - held] = buffer[held:]
            buffer[self._capacity - held :] = 0
        else:
            buffer[:] = 0
        self._base = until

    def close(self, end_time: float | None = None) -> None:
        """Write everything up to the last frame's end (or ``end_time``), finish the header and close."""
        _check_time(end_time, "end_time")
        if self._writer is None:
            return
        end = self._end if end_time is None else self._timeline.samples_until(end_time)
        try:
            self._flush(end)
            if end_time is not None:
                self._writer.truncate(end)  # audio already written past it (more than a window late)
        finally:
            writer, self._writer = self._writer, None
            writer.close()


class OggOpusSink:
    """One user's Opus packets in an Ogg Opus file, exactly as received (no re-encoding).

    Pauses, lost packets and gaps are filled with 20 ms Opus silence frames so the file keeps the
    timeline, to within a frame; a packet that would overlap audio already written by more than three
    quarters of a frame is dropped (``late``). ``user_id`` None takes the first user heard. The file's
    pre-skip is 0: the sender's encoder delay is part of what was received (the WAV sinks keep it too), so
    both files of a user line up.
    """

    wants_pcm = False

    def __init__(
        self,
        path: str | os.PathLike[str],
        user_id: int | None = None,
        *,
        start_time: float | None = None,
        timeline: Timeline | None = None,
    ) -> None:
        self.path = Path(path)
        self.user_id = _check_user(user_id)
        self._timeline = timeline or Timeline(start_time)
        self._writer: OggOpusWriter | None = OggOpusWriter(self.path, pre_skip=0)
        self._final_samples = 0
        self.late = 0
        self.packets_written = 0

    @property
    def samples_written(self) -> int:
        """Samples placed on the timeline so far (the Ogg granule position)."""
        return self._writer.samples_written if self._writer is not None else self._final_samples

    def write(self, frame: VoiceFrame) -> None:
        writer = self._writer
        if writer is None or frame.opus is None or frame.is_silence:
            return
        if self.user_id is None:
            self.user_id = frame.user_id  # heard: silence frames (skipped above) are not
        elif frame.user_id != self.user_id:
            return
        offset = self._timeline.offset(frame.timeline_time)
        gap = offset - writer.samples_written
        if gap >= _HALF_FRAME:
            writer.write_silence((gap + _HALF_FRAME) // FRAME_SAMPLES)
        elif gap <= -_OGG_LATE:
            self.late += 1
            return
        writer.write(frame.opus, frame.samples)
        self.packets_written += 1

    def close(self, end_time: float | None = None) -> None:
        _check_time(end_time, "end_time")
        writer, self._writer = self._writer, None
        if writer is None:
            return
        try:
            if end_time is not None:
                missing = self._timeline.samples_until(end_time) - writer.samples_written
                if missing >= _HALF_FRAME:
                    writer.write_silence((missing + _HALF_FRAME) // FRAME_SAMPLES)
        finally:
            self._final_samples = writer.samples_written
            writer.close()  # even if the padding failed, so the file is not left open


_S = TypeVar("_S", WavSink, OggOpusSink)


class _PerUser(Generic[_S]):
    """One file sink per user in ``directory`` (created on the user's first audio), all on one timeline."""

    _sink: type[_S]

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        start_time: float | None = None,
        timeline: Timeline | None = None,
        filename: str,
    ) -> None:
        try:
            distinct = filename.format(user_id=1) != filename.format(user_id=2)
        except (KeyError, IndexError, ValueError, AttributeError, TypeError) as exc:
            raise InvalidArgumentError(f"filename {filename!r} is not a template: {exc!r}") from None
        if not distinct:  # every user would overwrite one file
            raise InvalidArgumentError(f"filename {filename!r} must contain {{user_id}}")
        self.directory = _make_folder(directory)
        self._filename = filename
        self._timeline = timeline or Timeline(start_time)
        self.sinks: dict[int, _S] = {}
        self._closed = False

    @property
    def paths(self) -> dict[int, Path]:
        return {user_id: sink.path for user_id, sink in self.sinks.items()}

    @property
    def late(self) -> int:
        return sum(sink.late for sink in self.sinks.values())

    def write(self, frame: VoiceFrame) -> None:
        if self._closed:
            return
        sink = self.sinks.get(frame.user_id)
        if sink is None:
            if frame.is_silence:
                # Not audio (the sinks skip it): a member heard only this way would get an empty WAV and
                # an Ogg file without a single packet, which FFmpeg cannot open.
                return
            path = self.directory / self._filename.format(user_id=frame.user_id)
            sink = self.sinks[frame.user_id] = self._sink(path, frame.user_id, timeline=self._timeline)
        sink.write(frame)

    def close(self, end_time: float | None = None) -> None:
        """Close every user's sink, even after one fails, then raise the failure (or how many failed)."""
        _check_time(end_time, "end_time")
        if self._closed:
            return
        self._closed = True
        errors: list[Exception] = []
        for sink in self.sinks.values():
            try:
                sink.close(end_time)
            except Exception as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise AudioError(
                f"closing {len(errors)} of {len(self.sinks)} per-user files failed; the first: {errors[0]}"
            ) from errors[0]


class PerUserWavSink(_PerUser[WavSink]):
    """One :class:`WavSink` per user in ``directory`` (created on the user's first audio), one timeline.

    Files are named by ``filename`` (``{user_id}`` is replaced). All of them start at ``start_time`` (default:
    the first frame of anyone), so they line up sample for sample.
    """

    wants_pcm = True
    _sink = WavSink

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        start_time: float | None = None,
        timeline: Timeline | None = None,
        filename: str = "{user_id}.wav",
    ) -> None:
        super().__init__(directory, start_time=start_time, timeline=timeline, filename=filename)


class PerUserOggSink(_PerUser[OggOpusSink]):
    """One :class:`OggOpusSink` per user in ``directory``, on one timeline (like :class:`PerUserWavSink`)."""

    wants_pcm = False
    _sink = OggOpusSink

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        start_time: float | None = None,
        timeline: Timeline | None = None,
        filename: str = "{user_id}.opus",
    ) -> None:
        super().__init__(directory, start_time=start_time, timeline=timeline, filename=filename)


class CallbackSink:
    """Calls ``callback(frame)`` for every frame (of ``user_id`` only, if given), on the event loop.

    Exceptions from the callback are logged and counted in ``errors``; they never stop the receiver.
    """

    def __init__(
        self, callback: Callable[[VoiceFrame], object], *, pcm: bool = False, user_id: int | None = None
    ) -> None:
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be callable, got {callback!r:.60}")
        self._callback = callback
        self.wants_pcm = pcm
        self.user_id = _check_user(user_id)
        self.errors = 0
        self.calls = 0

    def write(self, frame: VoiceFrame) -> None:
        if self.user_id is not None and frame.user_id != self.user_id:
            return
        self.calls += 1
        try:
            self._callback(frame)
        except Exception:
            self.errors += 1
            if self.errors == 1:
                logger.exception("receive callback failed (further failures are only counted)")

    def close(self) -> None:
        """Nothing to finish."""


def record_to_directory(
    directory: str | os.PathLike[str],
    *,
    per_user_wav: bool = True,
    mixed_wav: bool = True,
    per_user_ogg: bool = True,
    start_time: float | None = None,
) -> list[AudioSink]:
    """The usual recording set in ``directory`` (``<user>.wav``, ``mixed.wav``, ``<user>.opus``), aligned.

    Attach each with ``receiver.add_sink``. Pass ``start_time=time.monotonic()`` (the receiver's clock, which
    uvloop's ``loop.time()`` is not) when recording starts, and close them with the same ``end_time`` to get
    WAV files exactly as long as the recording (the Ogg files end with the last whole packet, which the
    receiver's closing flush can place up to its jitter delay past it).
    """
    timeline = Timeline(start_time)  # checked before a folder is made for a recording that cannot start
    folder = _make_folder(directory)
    sinks: list[AudioSink] = []
    if per_user_wav:
        sinks.append(PerUserWavSink(folder, timeline=timeline))
    if mixed_wav:
        sinks.append(MixedWavSink(folder / "mixed.wav", timeline=timeline))
    if per_user_ogg:
        sinks.append(PerUserOggSink(folder, timeline=timeline))
    return sinks
