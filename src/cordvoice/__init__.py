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
from cordvoice.events import (
    ClientConnectEvent,
    ClientDisconnectEvent,
    DaveEpochEvent,
    DisconnectedEvent,
    MovedEvent,
    ReadyEvent,
    ReconnectAction,
    ReconnectingEvent,
    ResumedEvent,
    SessionEvent,
    SpeakingEvent,
)
from cordvoice.reconnect import ReconnectConfig
from cordvoice.session import Session, SessionState, SessionStats
from cordvoice.voice import Voice
from cordvoice.voicegateway.messages import SpeakingFlag

__version__ = "0.1.0"

__all__ = [
    "AudioError",
    "ClientConnectEvent",
    "ClientDisconnectEvent",
    "ConnectionClosedError",
    "DaveEpochEvent",
    "DaveError",
    "DaveRequiredError",
    "DecryptionError",
    "DisconnectedError",
    "DisconnectedEvent",
    "EmulatorError",
    "GatewayError",
    "InvalidArgumentError",
    "JoinTimeoutError",
    "MovedEvent",
    "ProtocolError",
    "ReadyEvent",
    "ReconnectAction",
    "ReconnectConfig",
    "ReconnectingEvent",
    "ResumedEvent",
    "Session",
    "SessionEvent",
    "SessionState",
    "SessionStats",
    "SpeakingEvent",
    "SpeakingFlag",
    "Voice",
    "VoiceError",
    "__version__",
]
