"""The DCA length-prefixed Opus format used by the seed (arikawa's voice examples) and older Discord bots.

DCA0 is a bare sequence of frames, each a little-endian int16 byte length followed by that many bytes of
Opus. DCA1 prefixes the same frames with ``b"DCA1"``, a little-endian int32 length and a JSON metadata
object of that length. Every frame is one 20 ms Opus packet, so these files pass straight to Discord.

Malformed input (truncated frames, non-positive lengths, bad metadata, an unknown ``DCAn`` version) raises
:class:`~cordvoice.errors.AudioError`.
"""

from __future__ import annotations

import io
import json
import os
import struct
from collections.abc import Iterable, Iterator, Mapping
from typing import IO, Any, Final

from cordvoice.audio.closeable import Closeable
from cordvoice.audio.pcm import BytesLike
from cordvoice.errors import AudioError, InvalidArgumentError

__all__ = ["MAX_METADATA_BYTES", "DCAReader", "DCAWriter", "encode_dca", "iter_dca"]

MAX_METADATA_BYTES: Final = 1 << 20
"""DCA1 metadata larger than this (1 MiB) is rejected as corrupt rather than read into memory."""

_MAGIC: Final = b"DCA1"
_LENGTH: Final = struct.Struct("<h")
_MAX_FRAME: Final = 0x7FFF


def _open(source: str | os.PathLike[str] | IO[bytes] | BytesLike) -> tuple[IO[bytes], bool]:
    """A binary file for ``source`` and whether we own (must close) it."""
    if isinstance(source, bytes | bytearray | memoryview):
        return io.BytesIO(source), True
    if isinstance(source, str | os.PathLike):
        try:
            return open(source, "rb"), True
        except OSError as exc:
            raise AudioError(f"cannot open {os.fspath(source)!r}: {exc}") from exc
    return source, False


class DCAReader(Closeable):
    """Read Opus frames from a DCA0 or DCA1 file, file-like object or bytes.

    The header is checked on construction, so :attr:`metadata` (the DCA1 JSON, ``None`` for DCA0) is
    available before the first frame. Reading blocks: use a worker thread for slow files.
    """

    def __init__(self, source: str | os.PathLike[str] | IO[bytes] | BytesLike) -> None:
        self._file, self._owns_file = _open(source)
        self._closed = False
        self.frames_read = 0
        self.metadata: dict[str, Any] | None = None
        self._lookahead = b""
        try:
            self._read_header()
        except BaseException:
            self.close()
            raise

    def _read(self, size: int) -> bytes:
        try:
            data = self._file.read(size)
        except (OSError, ValueError) as exc:
            raise AudioError(f"cannot read the DCA file: {exc}") from exc
        return data or b""

    def _read_upto(self, size: int) -> bytes:
        """Up to ``size`` bytes (fewer only at end of file), tolerating short reads from pipes."""
        data = self._lookahead[:size]
        self._lookahead = self._lookahead[size:]
        while len(data) < size:
            more = self._read(size - len(data))
            if not more:
                break
            data += more
        return data

    def _read_exact(self, size: int, what: str) -> bytes:
        data = self._read_upto(size)
        if len(data) != size:
            raise AudioError(f"truncated DCA file: {what} needs {size} bytes, only {len(data)} left")
        return data

    def _read_header(self) -> None:
        start = self._read_upto(4)
        if start == _MAGIC:
            size = int.from_bytes(self._read_exact(4, "the metadata length"), "little", signed=True)
            if not 0 <= size <= MAX_METADATA_BYTES:
                raise AudioError(f"DCA1 metadata length {size} is out of range")
            raw = self._read_exact(size, "the metadata")
            try:
                metadata = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # RecursionError: deep nesting
                raise AudioError(f"DCA1 metadata is not valid JSON: {exc}") from exc
            if not isinstance(metadata, dict):
                raise AudioError("DCA1 metadata must be a JSON object")
            self.metadata = metadata
        elif start[:3] == b"DCA":
            raise AudioError(f"unsupported DCA version {start!r}; only DCA0 and DCA1 are known")
        else:
            # DCA0: these bytes are the start of the first frame.
            self._lookahead = start

    def read(self) -> bytes | None:
        """Return the next Opus frame, or ``None`` at a clean end of file."""
        if self._closed:
            raise AudioError("the DCA reader is closed")
        head = self._read_upto(2)
        if not head:
            return None
        if len(head) == 1:
            raise AudioError("truncated DCA file: a frame length is cut short")
        (length,) = _LENGTH.unpack(head)
        if length <= 0:
            raise AudioError(f"invalid DCA frame length {length}")
        frame = self._read_exact(length, "a frame")
        self.frames_read += 1
        return frame

    def __iter__(self) -> Iterator[bytes]:
        while (frame := self.read()) is not None:
            yield frame

    def close(self) -> None:
        """Close the underlying file if the reader opened it; idempotent."""
        if not self._closed:
            self._closed = True
            if self._owns_file:
                self._file.close()


def iter_dca(source: str | os.PathLike[str] | IO[bytes] | BytesLike) -> Iterator[bytes]:
    """Yield the Opus frames of a DCA file; the file is closed when the generator ends or is closed."""
    with DCAReader(source) as reader:
        yield from reader


class DCAWriter(Closeable):
    """Write Opus frames as DCA0, or DCA1 when ``metadata`` is given.

    A path is opened and closed by the writer; a file object passed in is flushed but left open.
    """

    def __init__(
        self, dest: str | os.PathLike[str] | IO[bytes], *, metadata: Mapping[str, Any] | None = None
    ) -> None:
        header = b""
        if metadata is not None:
            try:
                raw = json.dumps(dict(metadata), separators=(",", ":")).encode()
            except (TypeError, ValueError) as exc:
                raise InvalidArgumentError(f"DCA1 metadata must be JSON-serialisable: {exc}") from exc
            if len(raw) > MAX_METADATA_BYTES:
                raise InvalidArgumentError("DCA1 metadata is too large")
            header = _MAGIC + len(raw).to_bytes(4, "little") + raw
        if isinstance(dest, str | os.PathLike):
            try:
                self._file: IO[bytes] = open(dest, "wb")  # noqa: SIM115 - closed by close()
            except OSError as exc:
                raise AudioError(f"cannot create {os.fspath(dest)!r}: {exc}") from exc
            self._owns_file = True
        else:
            self._file = dest
            self._owns_file = False
        self._closed = False
        self.frames_written = 0
        if header:
            self._write(header)

    def _write(self, data: bytes) -> None:
        try:
            self._file.write(data)
        except (OSError, ValueError) as exc:
            raise AudioError(f"cannot write the DCA file: {exc}") from exc

    def write(self, frame: BytesLike) -> None:
        """Append one Opus frame (1 to 32767 bytes)."""
        if self._closed:
            raise AudioError("the DCA writer is closed")
        if not 0 < len(frame) <= _MAX_FRAME:
            raise InvalidArgumentError(f"a DCA frame must be 1 to {_MAX_FRAME} bytes, not {len(frame)}")
        self._write(_LENGTH.pack(len(frame)) + bytes(frame))
        self.frames_written += 1

    def close(self) -> None:
        """Flush, and close the file if the writer opened it; idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._file.flush()
        except (OSError, ValueError) as exc:
            raise AudioError(f"cannot write the DCA file: {exc}") from exc
        finally:
            if self._owns_file:
                self._file.close()


def encode_dca(frames: Iterable[BytesLike], *, metadata: Mapping[str, Any] | None = None) -> bytes:
    """Return ``frames`` as DCA bytes (DCA1 when ``metadata`` is given)."""
    buffer = io.BytesIO()
    with DCAWriter(buffer, metadata=metadata) as writer:
        for frame in frames:
            writer.write(frame)
    return buffer.getvalue()
