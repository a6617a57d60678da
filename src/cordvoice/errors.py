"""The one exception hierarchy cordvoice raises on purpose.

Every error a user can meet derives from :class:`VoiceError` and says what to do next. Errors that mirror a
builtin meaning (a bad argument, a timeout) also derive from that builtin so existing ``except`` clauses work.
"""

from __future__ import annotations


class VoiceError(Exception):
    """Base class of every error cordvoice raises on purpose."""


class InvalidArgumentError(VoiceError, ValueError):
    """A caller passed a value cordvoice cannot use (wrong type, out of range, unknown name)."""


class ProtocolError(VoiceError):
    """Bytes or a message from the network do not follow the Discord voice protocol.

    Parsers raise this and nothing else on malformed input; callers count the input and drop it.
    """


class DecryptionError(ProtocolError):
    """A packet failed authentication: it was tampered with, or sealed with another key or mode."""


class DaveError(VoiceError):
    """A DAVE (MLS end-to-end encryption) operation failed; the client recovers with op 31 on its own."""


class GatewayError(VoiceError):
    """The main Discord gateway or its adapter failed: bad token, missing intents, lost connection."""


class JoinTimeoutError(VoiceError, TimeoutError):
    """Discord did not answer a join in time: check the bot's permissions and that the channel exists."""


class ConnectionClosedError(VoiceError):
    """The voice WebSocket closed with a code; ``code`` and ``reason`` say which and why."""

    def __init__(self, message: str, *, code: int | None = None, reason: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class DisconnectedError(ConnectionClosedError):
    """The session ended for good (kick, channel deleted, fatal close code); it will not reconnect."""


class DaveRequiredError(DisconnectedError):
    """Discord refused the connection because the channel requires DAVE end-to-end encryption (4017)."""


class AudioError(VoiceError):
    """An audio source, codec or sink failed: an unreadable file, an unsupported format, a broken stream."""


class EmulatorError(VoiceError):
    """The local Discord emulator was misused or could not start (ports, unknown ids)."""


class DaveDecryptError(DaveError):
    """A DAVE media frame could not be decrypted and holding it will not help: plain or garbage bytes.

    ``reason`` is a short machine-readable word (``unencrypted``, ``failed``); ``retryable`` is False.
    """

    retryable = False

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


class DaveKeyPendingError(DaveDecryptError):
    """A well-formed DAVE frame whose key this member does not hold yet (a transition is under way).

    Expected for a moment around every epoch change, because senders switch keys as soon as they apply the
    commit. Hold the frame briefly and retry after the next epoch change; ``reason`` is ``not_ready``,
    ``unknown_sender`` or ``no_key``.
    """

    retryable = True


class FrameDecodeError(ProtocolError):
    """A voice gateway frame is not a message at all: not JSON, not an object with an integer ``op``, an empty
    binary frame, or a frame of the wrong kind (text or binary) for its opcode.

    The voice gateway answers these with 4002 ("failed to decode payload"); a well-framed message of a known
    opcode whose fields are wrong raises plain :class:`ProtocolError` and gets 4020 ("bad request").
    """


__all__ = [
    "AudioError",
    "ConnectionClosedError",
    "DaveDecryptError",
    "DaveError",
    "DaveKeyPendingError",
    "DaveRequiredError",
    "DecryptionError",
    "DisconnectedError",
    "EmulatorError",
    "FrameDecodeError",
    "GatewayError",
    "InvalidArgumentError",
    "JoinTimeoutError",
    "ProtocolError",
    "VoiceError",
]
