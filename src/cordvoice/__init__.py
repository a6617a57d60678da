"""cordvoice: Discord voice for asyncio bots, with DAVE, receive, an audio pipeline and a local emulator."""

from __future__ import annotations

from cordvoice.errors import (
    AudioError,
    ConnectionClosedError,
    DaveError,
    DaveRequiredError,
    DecryptionError,
    DisconnectedError,
    EmulatorError,
    GatewayError,
    InvalidArgumentError,
    JoinTimeoutError,
    ProtocolError,
    VoiceError,
)

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "ConnectionClosedError",
    "DaveError",
    "DaveRequiredError",
    "DecryptionError",
    "DisconnectedError",
    "EmulatorError",
    "GatewayError",
    "InvalidArgumentError",
    "JoinTimeoutError",
    "ProtocolError",
    "VoiceError",
    "__version__",
]
