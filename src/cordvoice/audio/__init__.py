"""Audio for cordvoice: the shared clock, sources, the player and mixer, and the codec building blocks.

Most bots only need ``session.play(source)``, which returns a :class:`Track`; the rest is here for custom
sources (:class:`AudioSource`, :class:`AsyncAudioSource`) and for tools built on the codec pieces.
"""

from __future__ import annotations

from cordvoice.audio.player import Player, PlayerStats
from cordvoice.audio.sources import (
    AsyncAudioSource,
    AsyncFramesSource,
    AudioSource,
    AutoSource,
    DCASource,
    FramesSource,
    OpusFileSource,
    PCMSource,
    PyAVSource,
    SourceKind,
    SourceLike,
    open_source,
)
from cordvoice.audio.track import (
    Track,
    TrackEndEvent,
    TrackErrorEvent,
    TrackEvent,
    TrackStartEvent,
    TrackState,
)
from cordvoice.audio.workers import configure_workers

__all__ = [
    "AsyncAudioSource",
    "AsyncFramesSource",
    "AudioSource",
    "AutoSource",
    "DCASource",
    "FramesSource",
    "OpusFileSource",
    "PCMSource",
    "Player",
    "PlayerStats",
    "PyAVSource",
    "SourceKind",
    "SourceLike",
    "Track",
    "TrackEndEvent",
    "TrackErrorEvent",
    "TrackEvent",
    "TrackStartEvent",
    "TrackState",
    "configure_workers",
    "open_source",
]
