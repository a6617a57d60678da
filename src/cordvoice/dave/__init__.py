"""DAVE end-to-end encryption for the client: a sans-IO state machine around davey (protocol.md §6)."""

from __future__ import annotations

from cordvoice.dave.frames import OPUS_SILENCE, is_dave_frame
from cordvoice.dave.session import (
    STALL_TIMEOUT_S,
    DaveAction,
    DaveClient,
    DaveStats,
    EpochChanged,
    SendCommitWelcome,
    SendInvalidCommitWelcome,
    SendKeyPackage,
    SendTransitionReady,
)

__all__ = [
    "OPUS_SILENCE",
    "STALL_TIMEOUT_S",
    "DaveAction",
    "DaveClient",
    "DaveStats",
    "EpochChanged",
    "SendCommitWelcome",
    "SendInvalidCommitWelcome",
    "SendKeyPackage",
    "SendTransitionReady",
    "is_dave_frame",
]
