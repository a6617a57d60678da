"""cordvoice: Discord voice for asyncio bots, with DAVE, receive, an audio pipeline and a local emulator."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
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

# The client pulls in davey, PyAV and websockets. Importing them lazily keeps `cordvoice --version`, the
# pytest plugin (loaded in every test run where cordvoice is installed) and error handling cheap.
_LAZY = {
    **dict.fromkeys(
        (
            "ClientConnectEvent",
            "ClientDisconnectEvent",
            "DaveEpochEvent",
            "DisconnectedEvent",
            "MovedEvent",
            "ReadyEvent",
            "ReconnectAction",
            "ReconnectingEvent",
            "ResumedEvent",
            "SessionEvent",
            "SpeakingEvent",
        ),
        "cordvoice.events",
    ),
    "ReconnectConfig": "cordvoice.reconnect",
    "Session": "cordvoice.session",
    "SessionState": "cordvoice.session",
    "SessionStats": "cordvoice.session",
    "Voice": "cordvoice.voice",
    "SpeakingFlag": "cordvoice.voicegateway.messages",
}


_SUBMODULES = frozenset({"audio", "dave", "discordpy", "emulator", "gateway", "udp", "voicegateway"})
"""Reachable as ``cordvoice.<name>`` after a plain ``import cordvoice``, as the docs write
``cordvoice.discordpy.VoiceClient``."""


def __getattr__(name: str) -> Any:
    import importlib  # noqa: PLC0415

    if name in _SUBMODULES:
        return importlib.import_module(f"cordvoice.{name}")  # the import machinery sets the attribute
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'cordvoice' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


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
