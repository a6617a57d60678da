"""Opus encode and decode of raw 20 ms frames, through a thin ctypes binding to libopus.

Discord carries one Opus packet per RTP packet, usually 20 ms of 48 kHz stereo. We talk to libopus directly
because it is ~7% faster than PyAV's wrapper and, more importantly, exposes what a receiver needs: packet
loss concealment (``opus_decode`` with no data), in-band FEC recovery (``decode_fec=1``) and every CTL
(performance-notes §3b/§3c). The library is the copy PyAV's wheel already bundles (libopus 1.6.1 in
``av.libs``), so there is no new dependency; ``CORDVOICE_LIBOPUS`` or the system library are also tried. If no
libopus can be loaded, PyAV's ``CodecContext`` is the fallback: it encodes the same, but its decoder offers no
PLC or FEC, which :attr:`OpusDecoder.has_plc` and :attr:`OpusDecoder.has_fec` report (concealment then
yields silence).

ctypes releases the GIL around every libopus call, so encoders and decoders may run on worker threads. One
instance must not be used by two threads at once; each holds a lock so that ``close`` from another thread
can never free the native state under a running call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import glob
import importlib.util
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Final, Literal, TypeAlias, cast

from cordvoice.audio.closeable import Closeable
from cordvoice.audio.pcm import CHANNELS, FRAME_SAMPLES, SAMPLE_RATE, SAMPLE_WIDTH, BytesLike
from cordvoice.errors import AudioError, InvalidArgumentError

__all__ = [
    "MAX_FRAME_SAMPLES",
    "MAX_PACKET_BYTES",
    "OPUS_SILENCE",
    "SLOT_DECODE",
    "SLOT_LOST",
    "STATUS_ERROR",
    "STATUS_FEC",
    "STATUS_OK",
    "STATUS_PLC",
    "Application",
    "Backend",
    "DecodeSlot",
    "OpusDecoder",
    "OpusEncoder",
    "Signal",
    "Vbr",
    "decode_slots",
    "libopus_path",
    "libopus_version",
    "packet_samples",
]

logger = logging.getLogger(__name__)

Application: TypeAlias = Literal["audio", "voip", "lowdelay"]
Signal: TypeAlias = Literal["auto", "voice", "music"]
Vbr: TypeAlias = Literal["constrained", "unconstrained", "off"]
Backend: TypeAlias = Literal["auto", "libopus", "pyav"]

OPUS_SILENCE: Final = b"\xf8\xff\xfe"
"""The 3-byte 20 ms Opus silence frame Discord clients send before they stop transmitting."""
MAX_FRAME_SAMPLES: Final = 5760
"""120 ms at 48 kHz: the longest duration one Opus packet can hold."""
MAX_PACKET_BYTES: Final = 4000
"""Output buffer size libopus recommends for one encoded packet."""

_VALID_FRAME_SAMPLES: Final = frozenset({120, 240, 480, 960, 1920, 2880})
_FRAME_BYTES: Final = FRAME_SAMPLES * CHANNELS * SAMPLE_WIDTH

# libopus constants (opus_defines.h).
_OPUS_OK: Final = 0
_APPLICATIONS: Final[dict[str, int]] = {"voip": 2048, "audio": 2049, "lowdelay": 2051}
_SIGNALS: Final[dict[str, int]] = {"auto": -1000, "voice": 3001, "music": 3002}
_SET_BITRATE: Final = 4002
_SET_VBR: Final = 4006
_SET_COMPLEXITY: Final = 4010
_SET_INBAND_FEC: Final = 4012
_SET_PACKET_LOSS_PERC: Final = 4014
_SET_VBR_CONSTRAINT: Final = 4020
_SET_SIGNAL: Final = 4024
_GET_LOOKAHEAD: Final = 4027
_RESET_STATE: Final = 4028

# Samples per frame for each of the 32 TOC configurations (RFC 6716 §3.1), at 48 kHz.
_SILK_DURATIONS: Final = (480, 960, 1920, 2880)
_HYBRID_DURATIONS: Final = (480, 960)
_CELT_DURATIONS: Final = (120, 240, 480, 960)
_TOC_SAMPLES: Final[tuple[int, ...]] = tuple(
    _SILK_DURATIONS[config % 4]
    if config < 12
    else _HYBRID_DURATIONS[config % 2]
    if config < 16
    else _CELT_DURATIONS[config % 4]
    for config in range(32)
)


def packet_samples(packet: BytesLike) -> int:
    """Return how many samples per channel (at 48 kHz) an Opus packet decodes to, from its TOC byte.

    Pure Python and cheap (no libopus), so demuxers and recorders can check the 20 ms assumption.
    Raises :class:`AudioError` for an empty or malformed packet.
    """
    if not packet:
        raise AudioError("empty Opus packet")
    toc = packet[0]
    per_frame = _TOC_SAMPLES[toc >> 3]
    code = toc & 0x03
    if code == 0:
        return per_frame
    if code in (1, 2):
        return 2 * per_frame
    if len(packet) < 2:
        raise AudioError("Opus packet with frame-count code 3 has no frame-count byte")
    count = packet[1] & 0x3F
    if count == 0 or count * per_frame > MAX_FRAME_SAMPLES:
        raise AudioError(f"Opus packet declares an invalid frame count {count}")
    return count * per_frame


# --------------------------------------------------------------------------------------------------
# Loading libopus


class _LibOpus:
    """The loaded shared library with prototypes set; one per process."""

    def __init__(self, cdll: ctypes.CDLL, path: str) -> None:
        self.path = path
        c_int, c_int32, c_void_p, c_char_p = ctypes.c_int, ctypes.c_int32, ctypes.c_void_p, ctypes.c_char_p
        error_ptr = ctypes.POINTER(c_int)

        self.encoder_create = cdll.opus_encoder_create
        self.encoder_create.argtypes = [c_int32, c_int, c_int, error_ptr]
        self.encoder_create.restype = c_void_p
        self.encode = cdll.opus_encode
        self.encode.argtypes = [c_void_p, c_char_p, c_int, c_void_p, c_int32]
        self.encode.restype = c_int32
        self.encoder_destroy = cdll.opus_encoder_destroy
        self.encoder_destroy.argtypes = [c_void_p]
        self.encoder_destroy.restype = None
        # The CTL functions are variadic: their prototypes are left unset and every argument is passed
        # as an explicit ctypes object.
        self.encoder_ctl = cdll.opus_encoder_ctl
        self.encoder_ctl.restype = c_int

        self.decoder_create = cdll.opus_decoder_create
        self.decoder_create.argtypes = [c_int32, c_int, error_ptr]
        self.decoder_create.restype = c_void_p
        # No prototype on purpose: it runs for every decoded frame, and every argument is then passed as
        # given (a prepared c_void_p, bytes, small ints) instead of through six per-call converters.
        self.decode_unchecked = cdll.opus_decode
        self.decode_unchecked.restype = c_int
        self.decoder_destroy = cdll.opus_decoder_destroy
        self.decoder_destroy.argtypes = [c_void_p]
        self.decoder_destroy.restype = None
        self.decoder_ctl = cdll.opus_decoder_ctl
        self.decoder_ctl.restype = c_int

        strerror = cdll.opus_strerror
        strerror.argtypes = [c_int]
        strerror.restype = c_char_p
        self._strerror = strerror
        get_version = cdll.opus_get_version_string
        get_version.argtypes = []
        get_version.restype = c_char_p
        self.version: str = (get_version() or b"unknown").decode("ascii", "replace")

    def strerror(self, code: int) -> str:
        message = self._strerror(code)
        return message.decode("ascii", "replace") if message else f"error {code}"


def _candidate_paths() -> list[str]:
    """Where libopus may live, best first: explicit override, PyAV's bundled copy, the system library."""
    candidates: list[str] = []
    override = os.environ.get("CORDVOICE_LIBOPUS")
    if override:
        candidates.append(override)
    spec = importlib.util.find_spec("av")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            package = Path(location)
            patterns = [
                package.parent / "av.libs" / "libopus*.so*",  # Linux wheels (auditwheel)
                package / ".dylibs" / "libopus*.dylib",  # macOS wheels (delocate)
                package.parent / "av.libs" / "*opus*.dll",  # Windows wheels (delvewheel)
            ]
            for pattern in patterns:
                candidates.extend(sorted(glob.glob(str(pattern))))
    system = ctypes.util.find_library("opus")
    if system:
        candidates.append(system)
    return candidates


@functools.cache
def _libopus() -> _LibOpus | None:
    """Load libopus once per process; ``None`` when no usable copy exists (PyAV fallback)."""
    for path in _candidate_paths():
        try:
            lib = _LibOpus(ctypes.CDLL(path), path)
        except (OSError, AttributeError) as exc:
            logger.debug("cannot use libopus at %s: %s", path, exc)
            continue
        logger.debug("using libopus %s from %s", lib.version, path)
        return lib
    logger.warning("libopus not found; falling back to PyAV (no packet loss concealment or FEC)")
    return None


def libopus_version() -> str | None:
    """Version string of the libopus cordvoice loaded through ctypes, or ``None`` (PyAV fallback)."""
    lib = _libopus()
    return lib.version if lib else None


def libopus_path() -> str | None:
    """Filesystem path of the loaded libopus, or ``None``."""
    lib = _libopus()
    return lib.path if lib else None


def _pick_backend(backend: Backend) -> _LibOpus | None:
    if backend == "pyav":
        return None
    lib = _libopus()
    if lib is None and backend == "libopus":
        raise AudioError("libopus could not be loaded through ctypes (set CORDVOICE_LIBOPUS to its path)")
    return lib


def _as_pcm_bytes(pcm: BytesLike | Any) -> bytes:
    if isinstance(pcm, bytes):
        return pcm
    try:
        return bytes(memoryview(pcm).cast("B"))
    except TypeError as exc:
        raise InvalidArgumentError(f"PCM must be a bytes-like object, not {type(pcm).__name__}") from exc


# --------------------------------------------------------------------------------------------------
# What the encoder and decoder share


class _OpusCodec(Closeable):
    """A libopus state (or the PyAV fallback) behind a lock, freed exactly once.

    The subclass sets ``_state`` and ``_finalizer`` when it creates its native state, keeps its own PyAV
    fallback in ``_pyav`` and lets go of it in :meth:`_close_fallback`.
    """

    _kind: ClassVar[str]
    """``"encoder"`` or ``"decoder"``, for error messages."""

    def __init__(self, backend: Backend) -> None:
        self._lock = threading.Lock()
        self._closed = False
        self._lib = _pick_backend(backend)
        self._state: int | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    @property
    def backend(self) -> Literal["libopus", "pyav"]:
        """Which implementation runs: the ctypes binding or the PyAV fallback."""
        return "libopus" if self._lib is not None else "pyav"

    def _reset_native(self, ctl: Callable[..., int]) -> None:
        """Send OPUS_RESET_STATE through ``ctl`` (the encoder's or the decoder's CTL); call under the lock."""
        assert self._lib is not None and self._state is not None
        result = ctl(ctypes.c_void_p(self._state), ctypes.c_int(_RESET_STATE))
        if result != _OPUS_OK:
            raise AudioError(f"OPUS_RESET_STATE failed: {self._lib.strerror(result)}")

    def _check_open(self) -> None:
        if self._closed:
            raise AudioError(f"the Opus {self._kind} is closed")

    def close(self) -> None:
        """Free the native state; idempotent and safe while another thread is encoding or decoding."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._finalizer is not None:
                self._finalizer()
            self._close_fallback()

    def _close_fallback(self) -> None:
        raise NotImplementedError


# --------------------------------------------------------------------------------------------------
# Encoder


def _encoder_input(pcm: BytesLike) -> tuple[bytes, int]:
    """``pcm`` as bytes and its length in samples per channel, checked for a frame size Opus takes."""
    data = pcm if type(pcm) is bytes else _as_pcm_bytes(pcm)
    size = len(data)
    if size == _FRAME_BYTES:
        return data, FRAME_SAMPLES  # the usual 20 ms frame: no arithmetic
    samples, remainder = divmod(size, CHANNELS * SAMPLE_WIDTH)
    if remainder or samples not in _VALID_FRAME_SAMPLES:
        raise InvalidArgumentError(
            f"an Opus frame must be 2.5, 5, 10, 20, 40 or 60 ms of stereo s16 PCM, got {size} bytes"
        )
    return data, samples


class OpusEncoder(_OpusCodec):
    """Encode 48 kHz stereo s16 PCM frames to Opus packets.

    ``bitrate`` is in bits per second (64 kbit/s is a normal Discord channel's bitrate). Constrained VBR
    keeps packets near the chosen bitrate, unlike PyAV's unconstrained default (performance-notes §3a).
    ``fec`` adds in-band forward error correction tuned for ``expected_loss`` percent of lost packets. FEC
    exists only in the SILK and hybrid modes, which the encoder then prefers for speech up to ~64 kbit/s,
    and it is expensive: about 450 µs per frame at 64 kbit/s against 150 µs without it. The ``signal``
    hint is ignored by the PyAV fallback.
    """

    _kind = "encoder"

    def __init__(
        self,
        *,
        bitrate: int = 64_000,
        application: Application = "audio",
        complexity: int = 10,
        fec: bool = False,
        expected_loss: int = 0,
        vbr: Vbr = "constrained",
        signal: Signal = "auto",
        backend: Backend = "auto",
    ) -> None:
        if application not in _APPLICATIONS:
            raise InvalidArgumentError(f"application must be one of {sorted(_APPLICATIONS)}")
        if signal not in _SIGNALS:
            raise InvalidArgumentError(f"signal must be one of {sorted(_SIGNALS)}")
        if vbr not in ("constrained", "unconstrained", "off"):
            raise InvalidArgumentError("vbr must be 'constrained', 'unconstrained' or 'off'")
        check_setting("complexity", complexity, 0, 10)
        _check_bitrate(bitrate)
        _check_loss(expected_loss)
        self._bitrate = bitrate
        self._application: Application = application
        self._complexity = complexity
        self._fec = fec
        self._expected_loss = expected_loss
        self._vbr: Vbr = vbr
        self._signal: Signal = signal
        super().__init__(backend)
        self._pyav: _PyAVEncoder | None = None
        if self._lib is not None:
            self._open_libopus(self._lib)
        else:
            self._pyav = _PyAVEncoder(self._settings())

    def _open_libopus(self, lib: _LibOpus) -> None:
        error = ctypes.c_int(0)
        state = lib.encoder_create(
            SAMPLE_RATE, CHANNELS, _APPLICATIONS[self._application], ctypes.byref(error)
        )
        if error.value != _OPUS_OK or not state:
            raise AudioError(f"opus_encoder_create failed: {lib.strerror(error.value)}")
        self._state = state
        self._finalizer = weakref.finalize(self, lib.encoder_destroy, state)
        self._out = ctypes.create_string_buffer(MAX_PACKET_BYTES)
        self._out_address = ctypes.addressof(self._out)
        self._ctl(_SET_BITRATE, self._bitrate)
        self._ctl(_SET_COMPLEXITY, self._complexity)
        self._ctl(_SET_VBR, 0 if self._vbr == "off" else 1)
        self._ctl(_SET_VBR_CONSTRAINT, 1 if self._vbr == "constrained" else 0)
        self._ctl(_SET_SIGNAL, _SIGNALS[self._signal])
        self._ctl(_SET_INBAND_FEC, 1 if self._fec else 0)
        self._ctl(_SET_PACKET_LOSS_PERC, self._expected_loss)

    def _ctl(self, request: int, value: int) -> None:
        assert self._lib is not None and self._state is not None
        result = self._lib.encoder_ctl(
            ctypes.c_void_p(self._state), ctypes.c_int(request), ctypes.c_int32(value)
        )
        if result != _OPUS_OK:
            raise AudioError(f"opus_encoder_ctl({request}, {value}) failed: {self._lib.strerror(result)}")

    def _settings(self) -> dict[str, Any]:
        return {
            "bitrate": self._bitrate,
            "application": self._application,
            "complexity": self._complexity,
            "fec": self._fec,
            "expected_loss": self._expected_loss,
            "vbr": self._vbr,
        }

    @property
    def bitrate(self) -> int:
        return self._bitrate

    @property
    def fec(self) -> bool:
        return self._fec

    @property
    def expected_loss(self) -> int:
        return self._expected_loss

    @property
    def lookahead(self) -> int:
        """Encoder delay in samples at 48 kHz: the OpusHead pre-skip for files made from this encoder."""
        if self._lib is None:
            return 312
        with self._lock:
            self._check_open()
            assert self._state is not None
            value = ctypes.c_int32(0)
            result = self._lib.encoder_ctl(
                ctypes.c_void_p(self._state), ctypes.c_int(_GET_LOOKAHEAD), ctypes.byref(value)
            )
        if result != _OPUS_OK:
            raise AudioError(f"OPUS_GET_LOOKAHEAD failed: {self._lib.strerror(result)}")
        return value.value

    def encode(self, pcm: BytesLike) -> bytes:
        """Encode one frame of s16 stereo PCM (20 ms = 3840 bytes; 2.5-60 ms accepted) to an Opus packet."""
        data, samples = _encoder_input(pcm)
        with self._lock:
            self._check_open()
            return self._encode_locked(data, samples)

    def encode_frames(self, frames: Sequence[BytesLike]) -> list[bytes]:
        """Encode several frames in order, as :meth:`encode` would one by one, under one lock acquisition.

        The player's codec thread encodes a session's rendered lookahead this way: it saves the per-call
        checks and locking, which matter at a few thousand frames per second.
        """
        inputs = [_encoder_input(frame) for frame in frames]
        with self._lock:
            self._check_open()
            return [self._encode_locked(data, samples) for data, samples in inputs]

    def _encode_locked(self, data: bytes, samples: int) -> bytes:
        lib = self._lib
        if lib is None:
            assert self._pyav is not None
            return self._pyav.encode(data, samples)
        length = lib.encode(self._state, data, samples, self._out_address, MAX_PACKET_BYTES)
        if length < 0:
            raise AudioError(f"opus_encode failed: {lib.strerror(length)}")
        # A slice of the char array copies just those bytes, for a fraction of what string_at costs.
        return cast(bytes, self._out[:length])

    def set_bitrate(self, bitrate: int) -> None:
        """Change the target bitrate between frames (a channel's bitrate can change mid-session)."""
        _check_bitrate(bitrate)
        with self._lock:
            self._check_open()
            self._bitrate = bitrate
            self._apply(_SET_BITRATE, bitrate)

    def set_fec(self, enabled: bool) -> None:
        """Turn in-band FEC on or off between frames."""
        with self._lock:
            self._check_open()
            self._fec = enabled
            self._apply(_SET_INBAND_FEC, 1 if enabled else 0)

    def set_expected_loss(self, percent: int) -> None:
        """Tell the encoder how lossy the path is (0-100); FEC spends bits accordingly."""
        _check_loss(percent)
        with self._lock:
            self._check_open()
            self._expected_loss = percent
            self._apply(_SET_PACKET_LOSS_PERC, percent)

    def _apply(self, request: int, value: int) -> None:
        if self._lib is not None:
            self._ctl(request, value)
        else:
            self._reopen_pyav()

    def reset(self) -> None:
        """Forget the signal history (e.g. when a new track starts), keeping the settings."""
        with self._lock:
            self._check_open()
            if self._lib is not None:
                self._reset_native(self._lib.encoder_ctl)
            else:
                self._reopen_pyav()

    def _reopen_pyav(self) -> None:
        """Replace the PyAV context: FFmpeg reads its options only when a codec opens, and a new one has no
        signal history."""
        assert self._pyav is not None
        self._pyav.close()
        self._pyav = _PyAVEncoder(self._settings())

    def _close_fallback(self) -> None:
        if self._pyav is not None:
            self._pyav.close()

    def __repr__(self) -> str:
        return (
            f"<OpusEncoder {self.backend} {self._bitrate} bit/s {self._application} "
            f"complexity={self._complexity} fec={self._fec} loss={self._expected_loss}%>"
        )


def check_setting(name: str, value: int, low: int, high: int, unit: str = "") -> None:
    """An encoder setting: an int (not a float, which libopus's ctl refuses at the first frame) in range."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidArgumentError(f"{name} must be an integer between {low} and {high}{unit}, got {value!r}")


def _check_bitrate(bitrate: int) -> None:
    check_setting("bitrate", bitrate, 6_000, 510_000, " bit/s")


def _check_loss(percent: int) -> None:
    check_setting("expected_loss", percent, 0, 100, " (percent)")


class _PyAVEncoder:
    """Fallback encoder through PyAV's libopus CodecContext (FFmpeg option names)."""

    def __init__(self, settings: dict[str, Any]) -> None:
        import av  # noqa: PLC0415 - PyAV costs ~100 ms to import and only the fallback needs it

        try:
            context = av.CodecContext.create("libopus", "w")
            context.sample_rate = SAMPLE_RATE
            context.layout = "stereo"
            context.format = "s16"
            context.bit_rate = settings["bitrate"]
            vbr = {"constrained": "constrained", "unconstrained": "on", "off": "off"}[settings["vbr"]]
            context.options = {
                "application": settings["application"],
                "vbr": vbr,
                "compression_level": str(settings["complexity"]),
                "fec": "1" if settings["fec"] else "0",
                "packet_loss": str(settings["expected_loss"]),
                "frame_duration": "20",
            }
            context.open()
            frame = av.AudioFrame(format="s16", layout="stereo", samples=FRAME_SAMPLES)
        except av.FFmpegError as exc:
            raise AudioError(f"PyAV could not open an Opus encoder: {exc}") from exc
        frame.sample_rate = SAMPLE_RATE
        self._context: Any = context
        self._frame = frame
        self._pts = 0

    def encode(self, pcm: bytes, samples: int) -> bytes:
        import av  # noqa: PLC0415 - PyAV costs ~100 ms to import and only the fallback needs it

        if samples != FRAME_SAMPLES:
            raise AudioError("the PyAV Opus fallback encodes 20 ms frames only")
        self._frame.planes[0].update(pcm)
        self._frame.pts = self._pts
        self._pts += samples
        try:
            packets = self._context.encode(self._frame)
        except av.FFmpegError as exc:
            raise AudioError(f"Opus encoding failed: {exc}") from exc
        if len(packets) != 1:
            raise AudioError(f"PyAV returned {len(packets)} Opus packets for one frame")
        return bytes(packets[0])

    def close(self) -> None:
        self._context = None


# --------------------------------------------------------------------------------------------------
# Decoder


class OpusDecoder(_OpusCodec):
    """Decode Opus packets to 48 kHz stereo s16 PCM; conceal lost packets; recover them from FEC.

    For a lost packet, call :meth:`decode_fec` with the packet that followed it when that packet is at hand
    (it may carry a low-bitrate copy of the lost frame), otherwise :meth:`conceal`; then decode the following
    packet normally. Mono packets are up-mixed, so output is always stereo.
    """

    _kind = "decoder"

    def __init__(self, *, backend: Backend = "auto") -> None:
        super().__init__(backend)
        self._pyav: _PyAVDecoder | None = None
        self._last_samples = FRAME_SAMPLES
        if self._lib is not None:
            error = ctypes.c_int(0)
            state = self._lib.decoder_create(SAMPLE_RATE, CHANNELS, ctypes.byref(error))
            if error.value != _OPUS_OK or not state:
                raise AudioError(f"opus_decoder_create failed: {self._lib.strerror(error.value)}")
            self._state = state
            self._state_arg = ctypes.c_void_p(state)
            self._finalizer = weakref.finalize(self, self._lib.decoder_destroy, state)
        else:
            self._pyav = _PyAVDecoder()

    @property
    def has_plc(self) -> bool:
        """True when :meth:`conceal` synthesises audio; False when it can only return silence."""
        return self._lib is not None

    @property
    def has_fec(self) -> bool:
        """True when :meth:`decode_fec` can use in-band FEC data; False when it conceals instead."""
        return self._lib is not None

    def decode(self, packet: BytesLike) -> bytes:
        """Decode one Opus packet to PCM (3840 bytes for a 20 ms packet)."""
        if not packet:
            raise AudioError("cannot decode an empty Opus packet (use conceal() for a lost one)")
        data = packet if isinstance(packet, bytes) else bytes(packet)
        with self._lock:
            self._check_open()
            if self._lib is None:
                assert self._pyav is not None
                pcm = self._pyav.decode(data)
                self._last_samples = len(pcm) // (CHANNELS * SAMPLE_WIDTH) or self._last_samples
                return pcm
            return self._run(data, MAX_FRAME_SAMPLES, 0, "decode")

    def conceal(self, samples: int = FRAME_SAMPLES) -> bytes:
        """Return ``samples`` per channel of concealment for a lost packet (silence without PLC)."""
        _check_gap_samples(samples)
        with self._lock:
            self._check_open()
            if self._lib is None:
                return bytes(samples * CHANNELS * SAMPLE_WIDTH)
            return self._run(None, samples, 0, "conceal")

    def decode_fec(self, next_packet: BytesLike, samples: int = FRAME_SAMPLES) -> bytes:
        """Recover the frame lost just before ``next_packet`` from the FEC data it carries.

        When ``next_packet`` carries no FEC data libopus conceals instead, so this is never worse than
        :meth:`conceal`. Decode ``next_packet`` itself afterwards with :meth:`decode`.
        """
        _check_gap_samples(samples)
        if not next_packet:
            raise AudioError("decode_fec needs the (non-empty) packet that followed the lost one")
        data = next_packet if isinstance(next_packet, bytes) else bytes(next_packet)
        with self._lock:
            self._check_open()
            if self._lib is None:
                return bytes(samples * CHANNELS * SAMPLE_WIDTH)
            return self._run(data, samples, 1, "decode_fec")

    def _run(self, data: bytes | None, frame_size: int, fec: int, what: str) -> bytes:
        lib = self._lib
        assert lib is not None
        scratch = _scratch
        count = lib.decode_unchecked(
            self._state_arg, data, 0 if data is None else len(data), scratch.pointer, frame_size, fec
        )
        if count < 0:
            raise AudioError(f"Opus {what} failed: {lib.strerror(count)}")
        return scratch.view[: count * (CHANNELS * SAMPLE_WIDTH)].tobytes()

    def reset(self) -> None:
        """Forget decoder history (a new stream from the same SSRC)."""
        with self._lock:
            self._check_open()
            if self._lib is not None:
                self._reset_native(self._lib.decoder_ctl)
            else:
                assert self._pyav is not None
                self._pyav = _PyAVDecoder()

    def _close_fallback(self) -> None:
        self._pyav = None

    def __repr__(self) -> str:
        return f"<OpusDecoder {self.backend} plc={self.has_plc} fec={self.has_fec}>"


SLOT_DECODE: Final = 0
"""A :func:`decode_slots` item that decodes its packet."""
SLOT_LOST: Final = 1
"""A :func:`decode_slots` item for a lost packet: FEC from the next packet when it has some, else PLC."""
STATUS_OK: Final = 0
STATUS_FEC: Final = 1
STATUS_PLC: Final = 2
STATUS_ERROR: Final = 3
_FIRST_CELT_CONFIG: Final = 16
"""TOC configurations 16..31 are CELT-only: no LBRR (FEC) data inside."""

DecodeSlot: TypeAlias = tuple["OpusDecoder", int, "bytes | None", int]
"""``(decoder, kind, data, samples)``: see :func:`decode_slots`."""


def decode_slots(slots: Iterable[DecodeSlot]) -> list[tuple[bytes, int]]:
    """Fill 20 ms slots of many streams in one pass, in order, on this thread; ``(pcm, status)`` for each.

    ``SLOT_DECODE`` decodes ``data`` (``STATUS_OK``). ``SLOT_LOST`` fills a lost slot of ``samples``: from
    the in-band FEC of ``data``, the packet that followed, when that packet is SILK or hybrid and the
    decoder has FEC (``STATUS_FEC``; libopus conceals by itself when it carries none); otherwise by
    concealment (``STATUS_PLC``). A slot whose call fails is concealed instead (``STATUS_ERROR``), silence
    if even that fails, so one corrupt packet costs 20 ms, never the stream. A decoder's slots must stay in
    order and on one thread.

    The results are those of the per-frame methods, without their per-call wrapping (argument checks,
    conversions, method calls): a receiver decodes every speaking user's frame each tick, and the wrapping
    cost about 5% of the decoding itself.
    """
    out: list[tuple[bytes, int]] = []
    append = out.append
    scratch = _scratch
    pointer = scratch.pointer
    view = scratch.view
    stereo_sample = CHANNELS * SAMPLE_WIDTH
    for slot in slots:
        decoder, kind, data, _samples = slot
        lib = decoder._lib
        if kind == SLOT_DECODE and type(data) is bytes and data and lib is not None:  # the common case
            with decoder._lock:
                if not decoder._closed:
                    count = lib.decode_unchecked(
                        decoder._state_arg, data, len(data), pointer, MAX_FRAME_SAMPLES, 0
                    )
                    if count >= 0:
                        append((view[: count * stereo_sample].tobytes(), STATUS_OK))
                        continue
            # Closed, or libopus refused the packet (it does so before touching the decoder's state): the
            # general path below retries, meets the same failure and conceals.
        append(_fill_slot(*slot))
    return out


def _fill_slot(decoder: OpusDecoder, kind: int, data: bytes | None, samples: int) -> tuple[bytes, int]:
    """One :func:`decode_slots` slot through the per-frame methods (any backend, every error path)."""
    try:
        if kind == SLOT_DECODE:
            assert data is not None
            return decoder.decode(data), STATUS_OK
        if data and data[0] >> 3 < _FIRST_CELT_CONFIG and decoder.has_fec:
            # Only SILK and hybrid packets can carry in-band FEC; CELT-only ones go straight to PLC.
            return decoder.decode_fec(data, samples), STATUS_FEC
        return decoder.conceal(samples), STATUS_PLC
    except (AudioError, InvalidArgumentError):
        try:
            return decoder.conceal(samples), STATUS_ERROR
        except (AudioError, InvalidArgumentError):
            return bytes(samples * CHANNELS * SAMPLE_WIDTH), STATUS_ERROR


class _DecoderScratch(threading.local):
    """The buffer libopus writes decoded PCM into (120 ms of stereo s16): one per thread, shared by every
    decoder that thread runs.

    A buffer per decoder would be 23 KiB each: a receiver with 300 users would write its PCM through 7 MB
    of cache-cold memory. Each call's PCM is copied out before the next call on the thread.
    """

    def __init__(self) -> None:
        self.array = (ctypes.c_int16 * (MAX_FRAME_SAMPLES * CHANNELS))()
        self.pointer = ctypes.c_void_p(ctypes.addressof(self.array))
        self.view = memoryview(self.array).cast("B")


_scratch: Final = _DecoderScratch()


def _check_gap_samples(samples: int) -> None:
    # libopus conceals in multiples of 2.5 ms.
    if samples <= 0 or samples % 120 or samples > MAX_FRAME_SAMPLES:
        raise InvalidArgumentError("samples must be a positive multiple of 120 (2.5 ms), at most 5760")


class _PyAVDecoder:
    """Fallback decoder through PyAV's libopus CodecContext (no PLC, no FEC)."""

    def __init__(self) -> None:
        import av  # noqa: PLC0415 - PyAV costs ~100 ms to import and only the fallback needs it

        try:
            context = av.CodecContext.create("libopus", "r")
            context.sample_rate = SAMPLE_RATE
            context.layout = "stereo"
        except av.FFmpegError as exc:
            raise AudioError(f"PyAV could not open an Opus decoder: {exc}") from exc
        self._context = context
        self._packet_type: Callable[[bytes], Any] = av.Packet
        self._error: type[Exception] = av.FFmpegError

    def decode(self, data: bytes) -> bytes:
        try:
            frames = self._context.decode(self._packet_type(data))
        except self._error as exc:
            raise AudioError(f"Opus decoding failed: {exc}") from exc
        return b"".join(frame.to_ndarray().tobytes() for frame in frames)
