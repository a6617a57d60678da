"""Where audio comes from: files, URLs, raw PCM, DCA, and a small protocol for your own sources.

A source hands the player one thing at a time: an Opus packet of 20 ms (``kind == "opus"``), which is passed
to Discord untouched when it plays alone at volume 1.0, or 48 kHz stereo s16le PCM (``kind == "pcm"``), which
the player mixes and encodes. Nothing here starts a process or a thread.

Writing a source
----------------
Subclass :class:`AudioSource` for anything that blocks (files, sockets, a synthesiser)::

    class Beeps(AudioSource):
        kind = "pcm"

        def read(self) -> bytes | None:      # a worker thread calls this; blocking is fine
            return next_chunk_or_none()

The player calls ``open()``, ``read()``, ``seek()`` and ``close()`` on its shared source threads, one call at
a time per source (never two at once, though not always on the same thread), and ``close()`` exactly once at
the end, also after an error. ``read()`` returns ``None`` at the end. PCM may come in chunks of any size (a
whole number of stereo samples); Opus must be one 20 ms packet per call. Raise :class:`AudioError` (or any
exception: it is wrapped) to end the track with that error. Override ``seekable``/``seek`` and ``duration``
when you can. Anything asynchronous subclasses :class:`AsyncAudioSource` instead: its ``read()`` is a
coroutine awaited on the event loop, so it must not block.

Simpler still, pass an iterable or async iterable of frames: :class:`FramesSource` and
:class:`AsyncFramesSource` wrap them (``open_source`` does it for you; give ``kind="opus"`` for Opus frames).
"""

from __future__ import annotations

import abc
import io
import os
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Iterator
from typing import IO, TYPE_CHECKING, Any, ClassVar, Final, Literal, TypeAlias

from cordvoice.audio.dca import DCAReader
from cordvoice.audio.decode import PCMDecoder
from cordvoice.audio.demux import OpusDemuxer
from cordvoice.audio.pcm import CHANNELS, FRAME_BYTES, SAMPLE_RATE, SAMPLE_WIDTH, BytesLike
from cordvoice.errors import AudioError, InvalidArgumentError

if TYPE_CHECKING:
    from types import TracebackType

__all__ = [
    "AsyncAudioSource",
    "AsyncFramesSource",
    "AudioSource",
    "AutoSource",
    "DCASource",
    "FramesSource",
    "OpusFileSource",
    "PCMSource",
    "PyAVSource",
    "SourceKind",
    "SourceLike",
    "open_source",
]

SourceKind: TypeAlias = Literal["opus", "pcm"]
PathLike: TypeAlias = str | os.PathLike[str]

_BYTES_PER_SAMPLE: Final = CHANNELS * SAMPLE_WIDTH
_FRAME_SECONDS: Final = 0.020


def _describe(source: object) -> str:
    if isinstance(source, str | os.PathLike):
        return os.fspath(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return f"<{type(source).__name__}>"


class AudioSource(abc.ABC):
    """A blocking source, driven from the player's worker threads (see the module docstring)."""

    kind: SourceKind = "pcm"
    """What :meth:`read` returns; may be decided by :meth:`open` (see :class:`AutoSource`)."""
    name: str = ""
    """A label for logs and error messages."""

    def open(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """Acquire resources before the first read (called on a worker thread)."""

    @abc.abstractmethod
    def read(self) -> bytes | None:
        """The next Opus packet or PCM chunk, or ``None`` at the end."""

    @property
    def seekable(self) -> bool:
        """Whether :meth:`seek` works (valid once opened)."""
        return False

    def seek(self, seconds: float) -> None:
        """Continue from ``seconds`` into the source."""
        raise AudioError(f"{self.name or type(self).__name__} cannot seek")

    @property
    def duration(self) -> float | None:
        """Length in seconds when known (valid once opened)."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """Release everything; idempotent."""

    def __enter__(self) -> AudioSource:
        self.open()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[bytes]:
        """Read to the end (blocking): handy for tests and offline conversion."""
        while (data := self.read()) is not None:
            yield data

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.name}>"


class AsyncAudioSource(abc.ABC):
    """A source whose reads are coroutines on the event loop (network streams, TTS engines)."""

    kind: SourceKind = "pcm"
    name: str = ""
    seekable: ClassVar[bool] = False
    duration: float | None = None

    @abc.abstractmethod
    async def read(self) -> bytes | None:
        """The next Opus packet or PCM chunk, or ``None`` at the end. Must not block the loop."""

    async def aclose(self) -> None:  # noqa: B027 - optional hook, deliberately empty
        """Release everything; idempotent."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.kind} {self.name}>"


# --------------------------------------------------------------------------------------------------
# Containers


class OpusFileSource(AudioSource):
    """Ogg Opus or WebM/Matroska Opus (any container PyAV reads), passed through packet by packet.

    The packets reach Discord byte for byte as stored. A file whose packets are not 20 ms, or with more than
    two channels, is refused with :class:`AudioError` when opened: play it with :class:`PyAVSource` (or let
    :class:`AutoSource` fall back). ``options`` and ``timeout`` are as for :class:`PyAVSource`.
    """

    kind: SourceKind = "opus"

    def __init__(
        self,
        source: PathLike | IO[bytes],
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._source = source
        self._format = format
        self._options = options
        self._timeout = timeout
        self._demuxer: OpusDemuxer | None = None
        self.name = _describe(source)

    def open(self) -> None:
        if self._demuxer is None:
            self._demuxer = OpusDemuxer(
                self._source,
                require_20ms=True,
                format=self._format,
                options=self._options,
                timeout=self._timeout,
            )

    def _opened(self) -> OpusDemuxer:
        self.open()
        assert self._demuxer is not None
        return self._demuxer

    def read(self) -> bytes | None:
        packet = self._opened().read()
        return None if packet is None else packet.data

    @property
    def seekable(self) -> bool:
        return self._demuxer is not None and self._demuxer.seekable

    def seek(self, seconds: float) -> None:
        self._opened().seek(seconds)

    @property
    def duration(self) -> float | None:
        return None if self._demuxer is None else self._demuxer.duration

    def close(self) -> None:
        if self._demuxer is not None:
            self._demuxer.close()


class PyAVSource(AudioSource):
    """Any file, file-like object or URL PyAV opens, decoded and resampled to 48 kHz stereo PCM.

    ``options`` are FFmpeg input options (e.g. ``{"reconnect": "1"}`` for HTTP) and ``timeout`` bounds network
    opens and reads in seconds (20 s unless given; ``math.inf`` waits forever). The player encodes the PCM
    to Opus with its own encoder settings.
    """

    kind: SourceKind = "pcm"

    def __init__(
        self,
        source: PathLike | IO[bytes],
        *,
        format: str | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._source = source
        self._format = format
        self._options = options
        self._timeout = timeout
        self._decoder: PCMDecoder | None = None
        self.name = _describe(source)

    def open(self) -> None:
        if self._decoder is None:
            # Unpadded: the track's own chunker joins a short last frame to what follows (a loop's start).
            self._decoder = PCMDecoder(
                self._source, format=self._format, options=self._options, timeout=self._timeout, pad=False
            )

    def _opened(self) -> PCMDecoder:
        self.open()
        assert self._decoder is not None
        return self._decoder

    def read(self) -> bytes | None:
        return self._opened().read()

    @property
    def seekable(self) -> bool:
        return self._decoder is not None and self._decoder.seekable

    def seek(self, seconds: float) -> None:
        self._opened().seek(seconds)

    @property
    def duration(self) -> float | None:
        return None if self._decoder is None else self._decoder.duration

    @property
    def decode_errors(self) -> int:
        """Corrupt packets skipped so far."""
        return 0 if self._decoder is None else self._decoder.decode_errors

    def close(self) -> None:
        if self._decoder is not None:
            self._decoder.close()


class DCASource(AudioSource):
    """Opus frames from a DCA0/DCA1 file, file-like object or bytes (the seed's length-prefixed format).

    DCA has no index, so a seek re-reads from the start and skips frames; it needs a path, bytes or a seekable
    file. A file object passed in is left open.
    """

    kind: SourceKind = "opus"

    def __init__(self, source: PathLike | IO[bytes] | BytesLike) -> None:
        self._source = source
        self._reader: DCAReader | None = None
        self._start = 0
        self.name = _describe(source)
        self.metadata: dict[str, Any] | None = None
        """The DCA1 JSON metadata once opened (``None`` for DCA0)."""

    def open(self) -> None:
        if self._reader is None:
            if not isinstance(self._source, str | os.PathLike | bytes | bytearray | memoryview):
                self._start = _tell(self._source)
            self._reader = DCAReader(self._source)
            self.metadata = self._reader.metadata

    def _opened(self) -> DCAReader:
        self.open()
        assert self._reader is not None
        return self._reader

    def read(self) -> bytes | None:
        return self._opened().read()

    @property
    def seekable(self) -> bool:
        source = self._source
        if isinstance(source, str | os.PathLike | bytes | bytearray | memoryview):
            return True
        return _file_seekable(source) and self._start >= 0

    def seek(self, seconds: float) -> None:
        if seconds < 0:
            raise InvalidArgumentError("cannot seek to a negative time")
        if not self.seekable:
            raise AudioError(f"{self.name} cannot seek: the file is not seekable")
        if self._reader is not None:
            self._reader.close()
            self._reader = None
        if not isinstance(self._source, str | os.PathLike | bytes | bytearray | memoryview):
            try:
                self._source.seek(self._start)
            except (OSError, ValueError) as exc:
                raise AudioError(f"cannot seek in {self.name}: {exc}") from exc
        reader = self._opened()
        for _ in range(round(seconds / _FRAME_SECONDS)):
            if reader.read() is None:
                break

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()


# --------------------------------------------------------------------------------------------------
# Raw PCM and frames


def _tell(file: IO[bytes]) -> int:
    try:
        return file.tell() if file.seekable() else -1
    except (OSError, ValueError):
        return -1


def _file_seekable(file: IO[bytes]) -> bool:
    try:
        return bool(file.seekable())
    except (OSError, ValueError):
        return False


class PCMSource(AudioSource):
    """Raw 48 kHz stereo s16le PCM from bytes, a path or a binary file-like object.

    Bytes and seekable files can seek. A file object passed in is left open unless ``close_file`` is true; a
    path is opened and closed by the source.
    """

    kind: SourceKind = "pcm"

    def __init__(self, source: BytesLike | PathLike | IO[bytes], *, close_file: bool = False) -> None:
        self._data: memoryview | None = None
        self._file: IO[bytes] | None = None
        self._path: PathLike | None = None
        self._owns_file = close_file
        self._position = 0
        self._start = 0
        self.name = _describe(source)
        if isinstance(source, bytes | bytearray | memoryview):
            view = memoryview(source).cast("B")
            if len(view) % _BYTES_PER_SAMPLE:
                raise InvalidArgumentError("raw PCM must be a whole number of stereo 16-bit samples")
            self._data = view
        elif isinstance(source, str | os.PathLike):
            self._path = source
            self._owns_file = True
        else:
            self._file = source

    def open(self) -> None:
        if self._path is not None and self._file is None:
            try:
                self._file = open(self._path, "rb")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise AudioError(f"cannot open {self.name}: {exc}") from exc
        if self._file is not None:
            self._start = max(0, _tell(self._file))

    def read(self) -> bytes | None:
        if self._data is not None:
            chunk = self._data[self._position : self._position + FRAME_BYTES]
            self._position += len(chunk)
            return bytes(chunk) if chunk else None
        if self._file is None:
            self.open()
        assert self._file is not None
        try:
            data = self._file.read(FRAME_BYTES)
        except (OSError, ValueError) as exc:
            raise AudioError(f"cannot read {self.name}: {exc}") from exc
        return data or None

    @property
    def seekable(self) -> bool:
        return (
            self._data is not None
            or self._path is not None
            or (self._file is not None and _file_seekable(self._file))
        )

    def seek(self, seconds: float) -> None:
        if seconds < 0:
            raise InvalidArgumentError("cannot seek to a negative time")
        offset = round(seconds * SAMPLE_RATE) * _BYTES_PER_SAMPLE
        if self._data is not None:
            self._position = min(offset, len(self._data))
            return
        if self._file is None:
            self.open()
        assert self._file is not None
        try:
            self._file.seek(self._start + offset)
        except (OSError, ValueError) as exc:
            raise AudioError(f"cannot seek in {self.name}: {exc}") from exc

    @property
    def duration(self) -> float | None:
        if self._data is not None:
            return len(self._data) / _BYTES_PER_SAMPLE / SAMPLE_RATE
        if self._path is not None:
            try:
                return os.path.getsize(self._path) / _BYTES_PER_SAMPLE / SAMPLE_RATE
            except OSError:
                return None
        return None

    def close(self) -> None:
        if self._file is not None and self._owns_file:
            file, self._file = self._file, None
            file.close()


class FramesSource(AudioSource):
    """Wrap an iterable of Opus packets or PCM chunks; it is iterated on a worker thread, so it may block.

    A generator is closed when the track ends, which runs its ``finally`` blocks.
    """

    def __init__(self, frames: Iterable[BytesLike], *, kind: SourceKind = "pcm", name: str = "") -> None:
        if kind not in ("opus", "pcm"):
            raise InvalidArgumentError("kind must be 'opus' or 'pcm'")
        self.kind = kind
        self.name = name or _describe(frames)
        self._iterable = frames
        self._iterator: Iterator[BytesLike] | None = None

    def read(self) -> bytes | None:
        if self._iterator is None:
            self._iterator = iter(self._iterable)
        frame = next(self._iterator, None)
        return None if frame is None else bytes(frame)

    def close(self) -> None:
        close = getattr(self._iterator, "close", None)
        if close is not None:
            close()


class AsyncFramesSource(AsyncAudioSource):
    """Wrap an async iterable of PCM chunks (default) or Opus packets; iterated on the event loop."""

    def __init__(self, frames: AsyncIterable[BytesLike], *, kind: SourceKind = "pcm", name: str = "") -> None:
        if kind not in ("opus", "pcm"):
            raise InvalidArgumentError("kind must be 'opus' or 'pcm'")
        self.kind = kind
        self.name = name or _describe(frames)
        self._iterable = frames
        self._iterator: AsyncIterator[BytesLike] | None = None

    async def read(self) -> bytes | None:
        if self._iterator is None:
            self._iterator = aiter(self._iterable)
        frame = await anext(self._iterator, None)
        return None if frame is None else bytes(frame)

    async def aclose(self) -> None:
        aclose = getattr(self._iterator, "aclose", None)
        if aclose is not None:
            await aclose()


# --------------------------------------------------------------------------------------------------
# Choosing a source


_CONTAINER_MAGIC: Final = (b"OggS", b"\x1a\x45\xdf\xa3", b"DCA1", b"ID3", b"RIFF", b"fLaC", b"FORM")


_SNIFF_BYTES: Final = 2 * 1441 + 4
"""Enough for two MPEG audio frame headers (the longest Layer III frame is 1,441 bytes)."""
_MP3_BITRATES: Final = (
    (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),  # MPEG-1 Layer III, kbit/s
    (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),  # MPEG-2 and 2.5 Layer III
)
_MP3_RATES: Final = {3: (44_100, 48_000, 32_000), 2: (22_050, 24_000, 16_000), 0: (11_025, 12_000, 8_000)}


def _mp3_frame(head: bytes, at: int) -> tuple[int, int, int] | None:
    """(version, sample-rate index, frame length) of a Layer III frame header at ``at``, or None."""
    if len(head) < at + 4 or head[at] != 0xFF or head[at + 1] & 0xE0 != 0xE0:
        return None
    version, layer = (head[at + 1] >> 3) & 3, (head[at + 1] >> 1) & 3
    bitrate_index, rate_index, padding = head[at + 2] >> 4, (head[at + 2] >> 2) & 3, (head[at + 2] >> 1) & 1
    if version == 1 or layer != 1 or not 0 < bitrate_index < 15 or rate_index == 3:
        return None
    bitrate = _MP3_BITRATES[version != 3][bitrate_index] * 1000
    per_frame = 144 if version == 3 else 72
    return version, rate_index, per_frame * bitrate // _MP3_RATES[version][rate_index] + padding


def _looks_like_mp3(head: bytes) -> bool:
    """MP3 without an ID3 tag (what TTS services send): two consecutive frames that agree with each other.

    One frame header alone is four bytes that raw PCM can start with; a second one exactly where the first
    frame ends, with the same version and rate, is not a coincidence.
    """
    first = _mp3_frame(head, 0)
    if first is None:
        return False
    second = _mp3_frame(head, first[2])
    return second is not None and second[:2] == first[:2]


def _looks_like_container(head: bytes) -> bool:
    return head.startswith(_CONTAINER_MAGIC) or head[4:8] == b"ftyp" or _looks_like_mp3(head)


class AutoSource(AudioSource):
    """A path, URL or file-like container, opened the cheapest way that works.

    DCA files (``.dca`` or a ``DCA1`` header) are read as DCA; a file whose audio is 20 ms Opus (Ogg, WebM,
    Matroska) is passed through; anything else is decoded with PyAV. The choice happens in :meth:`open`, on a
    worker thread, so :attr:`kind` is known only after it. ``passthrough=False`` always decodes; a
    non-seekable file object is always decoded (it cannot be probed twice).
    """

    def __init__(
        self,
        source: PathLike | IO[bytes],
        *,
        passthrough: bool = True,
        format: str | None = None,
        options: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> None:
        self._source = source
        self._passthrough = passthrough
        self._format = format
        self._options = options
        self._timeout = timeout
        self.name = _describe(source)
        self.inner: AudioSource | None = None
        """The source chosen by :meth:`open`."""

    def open(self) -> None:
        if self.inner is None:
            self.inner = self._open_inner()
            self.kind = self.inner.kind

    def _open_inner(self) -> AudioSource:
        source = self._source
        start = 0
        if isinstance(source, str | os.PathLike):
            is_dca = os.fspath(source).lower().endswith(".dca") or _read_head(source) == b"DCA1"
            probe = self._passthrough
        else:
            start = _tell(source)
            probe = self._passthrough and start >= 0
            is_dca = False
            if start >= 0:
                try:
                    is_dca = source.read(4) == b"DCA1"
                    source.seek(start)
                except (OSError, ValueError) as exc:  # a closed file, or a failing disk or pipe
                    raise AudioError(f"cannot read {self.name}: {exc}") from exc
        if is_dca:
            return _opened(DCASource(source))
        if probe:
            try:
                opus = OpusFileSource(
                    source, format=self._format, options=self._options, timeout=self._timeout
                )
                return _opened(opus)
            except AudioError:
                pass  # not 20 ms Opus (or unreadable: the decoder reports it)
            if not isinstance(source, str | os.PathLike):
                source.seek(start)
        return _opened(self._decoder(source))

    def _decoder(self, source: PathLike | IO[bytes]) -> PyAVSource:
        return PyAVSource(source, format=self._format, options=self._options, timeout=self._timeout)

    def _opened(self) -> AudioSource:
        self.open()
        assert self.inner is not None
        return self.inner

    def read(self) -> bytes | None:
        return self._opened().read()

    @property
    def seekable(self) -> bool:
        return self.inner is not None and self.inner.seekable

    def seek(self, seconds: float) -> None:
        self._opened().seek(seconds)

    @property
    def duration(self) -> float | None:
        return None if self.inner is None else self.inner.duration

    def close(self) -> None:
        if self.inner is not None:
            self.inner.close()


def _opened(source: AudioSource) -> AudioSource:
    try:
        source.open()
    except BaseException:
        source.close()
        raise
    return source


def _read_head(path: PathLike) -> bytes:
    if "://" in os.fspath(path):
        return b""
    try:
        with open(path, "rb") as file:
            return file.read(4)
    except OSError:
        return b""  # the decoder reports the real error


SourceLike: TypeAlias = (
    AudioSource
    | AsyncAudioSource
    | PathLike
    | BytesLike
    | IO[bytes]
    | Iterable[BytesLike]
    | AsyncIterable[BytesLike]
)


def _check_not_opus(kind: SourceKind | None) -> None:
    # Bytes that are not a container have no packet boundaries: played as PCM, Opus would be loud noise.
    if kind == "opus":
        raise InvalidArgumentError(
            "kind='opus' needs the packets one by one (an iterable of 20 ms frames) or an Ogg/WebM/DCA "
            "container; these bytes are neither"
        )


def open_source(source: SourceLike, *, kind: SourceKind | None = None) -> AudioSource | AsyncAudioSource:
    """Turn what a user passes to ``play()`` into a source, without blocking (nothing is opened yet).

    - an :class:`AudioSource` / :class:`AsyncAudioSource`: used as it is;
    - a path or URL: :class:`AutoSource` (DCA, Opus passthrough, or decoded);
    - bytes: raw PCM, unless they start with a container signature (Ogg, WebM/Matroska, DCA1, ID3, RIFF,
      FLAC, MP4) or with two MP3 frames (MP3 without an ID3 tag), in which case they are parsed as that file
      (with ``kind="opus"`` they must be a container: joined packets have no boundaries);
    - a binary file object: the same sniffing when it is seekable, raw PCM otherwise;
    - an async iterable: :class:`AsyncFramesSource`; another iterable: :class:`FramesSource` (PCM chunks
      unless ``kind="opus"``).
    """
    if kind not in (None, "opus", "pcm"):
        raise InvalidArgumentError(f"kind must be 'opus' or 'pcm', got {kind!r}")
    if isinstance(source, AudioSource | AsyncAudioSource):
        return source
    if isinstance(source, str | os.PathLike):
        return AutoSource(source)
    if isinstance(source, bytes | bytearray | memoryview):
        head = bytes(source[:_SNIFF_BYTES])
        if kind != "pcm" and _looks_like_container(head):
            return AutoSource(io.BytesIO(bytes(source)))
        _check_not_opus(kind)
        return PCMSource(source)
    if isinstance(source, io.IOBase) or (hasattr(source, "read") and hasattr(source, "seek")):
        file: IO[bytes] = source  # type: ignore[assignment]
        start = _tell(file)
        if kind != "pcm" and start >= 0:
            head = file.read(_SNIFF_BYTES)
            file.seek(start)
            if _looks_like_container(head):
                return AutoSource(file)
        _check_not_opus(kind)
        return PCMSource(file)
    if isinstance(source, AsyncIterable):
        return AsyncFramesSource(source, kind=kind or "pcm")
    if isinstance(source, Iterable):
        return FramesSource(source, kind=kind or "pcm")
    raise InvalidArgumentError(f"cannot play a {type(source).__name__}; see cordvoice.audio.sources")
