"""Shared helpers for the receive tests: an in-memory DAVE group, RTP packet builders and signal metrics."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

from cordvoice.audio.opus import OpusEncoder
from cordvoice.audio.pcm import iter_frames
from cordvoice.dave import (
    DaveClient,
    EpochChanged,
    SendCommitWelcome,
    SendInvalidCommitWelcome,
    SendKeyPackage,
    SendTransitionReady,
)
from cordvoice.emulator.dave_ds import (
    DaveDeliveryService,
    SendAnnounceCommit,
    SendExecuteTransition,
    SendExternalSender,
    SendPrepareEpoch,
    SendPrepareTransition,
    SendProposals,
    SendWelcome,
)
from cordvoice.udp.rtp import RtpHeader, build_header, parse_rtp

CHANNEL_ID = 1_190_000_000_000_000_007
FloatArray = npt.NDArray[np.float64]

_DS_TO_CLIENT: dict[type, tuple[str, tuple[str, ...]]] = {
    SendExternalSender: ("on_external_sender", ("data",)),
    SendProposals: ("on_proposals", ("op_type", "proposals")),
    SendAnnounceCommit: ("on_announce_commit", ("transition_id", "commit")),
    SendWelcome: ("on_welcome", ("transition_id", "welcome")),
    SendPrepareTransition: ("on_prepare_transition", ("transition_id", "protocol_version")),
    SendExecuteTransition: ("on_execute_transition", ("transition_id",)),
    SendPrepareEpoch: ("on_prepare_epoch", ("epoch", "protocol_version")),
}


class DaveGroup:
    """Real DaveClients around the emulator's delivery service, delivered in FIFO order, no sockets.

    ``hold`` a member to stop delivering its inbox (it falls behind the group, like a slow client), then
    ``release`` it. ``on_epoch[user]`` is called for each EpochChanged that member reports.
    """

    def __init__(self) -> None:
        self.now = 0.0
        self.ds = DaveDeliveryService(CHANNEL_ID, now=0.0)
        self.clients: dict[int, DaveClient] = {}
        self.inbox: dict[int, deque[tuple[str, tuple[Any, ...]]]] = {}
        self.held: set[int] = set()
        self.on_epoch: dict[int, Callable[[EpochChanged], None]] = {}

    def join(self, user_id: int) -> DaveClient:
        client = DaveClient()
        others = sorted(self.clients)
        self.clients[user_id] = client
        self.inbox[user_id] = deque([("on_session_description", (1, user_id, CHANNEL_ID))])
        if others:
            self.inbox[user_id].append(("on_clients_connect", (others,)))
        for other in others:
            self.inbox[other].append(("on_clients_connect", ([user_id],)))
        self._route(self.ds.member_connected(user_id, now=self.now))
        return client

    def leave(self, user_id: int) -> None:
        del self.clients[user_id]
        del self.inbox[user_id]
        self.held.discard(user_id)
        for other in self.clients:
            self.inbox[other].append(("on_client_disconnect", (user_id,)))
        self._route(self.ds.member_disconnected(user_id, now=self.now))

    def hold(self, user_id: int) -> None:
        self.held.add(user_id)

    def release(self, user_id: int) -> None:
        self.held.discard(user_id)
        self.settle()

    def _route(self, outputs: list[tuple[int, Any]]) -> None:
        for user_id, action in outputs:
            if user_id not in self.clients:
                continue
            method, names = _DS_TO_CLIENT[type(action)]
            self.inbox[user_id].append((method, tuple(getattr(action, n) for n in names)))

    def _to_server(self, user_id: int, action: Any) -> None:
        ds, now = self.ds, self.now
        if isinstance(action, SendKeyPackage):
            self._route(ds.key_package_received(user_id, action.data, now=now))
        elif isinstance(action, SendCommitWelcome):
            self._route(ds.commit_welcome_received(user_id, action.data, now=now))
        elif isinstance(action, SendTransitionReady):
            self._route(ds.transition_ready(user_id, action.transition_id, now=now))
        elif isinstance(action, SendInvalidCommitWelcome):
            self._route(ds.invalid_commit_welcome(user_id, action.transition_id, now=now))
        elif isinstance(action, EpochChanged):
            callback = self.on_epoch.get(user_id)
            if callback is not None:
                callback(action)

    def settle(self, max_steps: int = 10_000) -> None:
        """Deliver everything deliverable (held members' inboxes wait)."""
        for _ in range(max_steps):
            progressed = False
            for user_id in list(self.clients):
                queue = self.inbox.get(user_id)
                if user_id in self.held or not queue:
                    continue
                method, args = queue.popleft()
                for action in getattr(self.clients[user_id], method)(*args):
                    self._to_server(user_id, action)
                progressed = True
            if not progressed:
                deadline = self.ds.next_deadline()
                if deadline is None or self.held:
                    return
                self.now = max(self.now, deadline)
                self._route(self.ds.poll(self.now))
        raise AssertionError("the DAVE group did not settle")


def rtp_header(sequence: int, timestamp: int, ssrc: int) -> RtpHeader:
    return parse_rtp(build_header(sequence & 0xFFFF, timestamp & 0xFFFF_FFFF, ssrc))


def encode_pcm(pcm: bytes, *, fec: bool = False) -> list[bytes]:
    """Opus packets (20 ms each) for 48 kHz stereo s16 PCM."""
    encoder = OpusEncoder(bitrate=64_000, fec=fec, expected_loss=10 if fec else 0)
    return [encoder.encode(frame) for frame in iter_frames(pcm)]


def to_mono(pcm: bytes) -> FloatArray:
    return np.frombuffer(pcm, dtype="<i2").astype(np.float64).reshape(-1, 2).mean(axis=1) / 32768.0


def best_lag(ref: FloatArray, out: FloatArray, max_lag: int) -> int:
    """The lag in [-max_lag, max_lag] by which ``out`` trails ``ref`` (FFT cross-correlation)."""
    size = 1 << int(np.ceil(np.log2(len(ref) + len(out) + 2 * max_lag)))
    spectrum = np.fft.rfft(out, size) * np.conj(np.fft.rfft(ref, size))
    corr = np.fft.irfft(spectrum, size)
    candidates = np.concatenate((corr[-max_lag:], corr[: max_lag + 1]))
    return int(np.argmax(candidates)) - max_lag


def aligned_correlation(ref: FloatArray, out: FloatArray, max_lag: int = 48_000) -> tuple[float, int]:
    """(Pearson correlation after the best alignment, lag in samples)."""
    lag = best_lag(ref, out, max_lag)
    if lag >= 0:
        a, b = ref, out[lag:]
    else:
        a, b = ref[-lag:], out
    length = min(len(a), len(b))
    if length < 480:
        return 0.0, lag
    return float(np.corrcoef(a[:length], b[:length])[0, 1]), lag
