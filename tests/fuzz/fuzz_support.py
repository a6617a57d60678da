"""Shared pieces of the fuzz tests: the example budget, a run counter, valid samples and a mutation strategy.

Budget: ``CORDVOICE_FUZZ_EXAMPLES`` scales every fuzz test (default 1 = the CI budget, well under a minute
for the whole folder on a 2-core machine); the manual mode multiplies it (``CORDVOICE_FUZZ_EXAMPLES=25``
runs more than 100,000 examples). Every test counts the examples it really ran in :data:`EXAMPLES`; the
folder's conftest prints the totals at the end of the run and, with ``CORDVOICE_FUZZ_REPORT=path``, writes
them as JSON.
"""

from __future__ import annotations

import functools
import os
from collections import Counter
from dataclasses import dataclass

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from cordvoice.dave import DaveClient, EpochChanged, SendCommitWelcome, SendKeyPackage, SendTransitionReady
from cordvoice.emulator.dave_ds import (
    DaveDeliveryService,
    SendAnnounceCommit,
    SendExternalSender,
    SendProposals,
    SendWelcome,
)
from cordvoice.udp import crypto, discovery, rtp
from cordvoice.voicegateway import messages as m

SCALE = max(1, int(os.environ.get("CORDVOICE_FUZZ_EXAMPLES", "1")))
EXAMPLES: Counter[str] = Counter()
"""Hypothesis examples actually run, by test (filled by the tests, reported by conftest)."""
INPUTS: Counter[str] = Counter()
"""Parser calls made, by parser (an example may feed one input to several parsers)."""
STEPS: Counter[str] = Counter()
"""State machine steps actually run, by machine name."""


def budget(ci_examples: int, **overrides: object) -> settings:
    """Hypothesis settings for ``ci_examples`` examples times :data:`SCALE`; no deadline (shared CI)."""
    options: dict[str, object] = {
        "max_examples": ci_examples * SCALE,
        "deadline": None,
        "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
    }
    options.update(overrides)
    return settings(**options)  # type: ignore[arg-type]


# ---- valid samples -------------------------------------------------------------------------------------

CHANNEL_ID = 1_190_000_000_000_000_001
USER_A = 1_190_000_000_000_000_010
USER_B = 1_190_000_000_000_000_020


@dataclass(frozen=True)
class DaveSamples:
    """Real bytes from one two-member DAVE exchange (davey clients against the emulator's DS)."""

    external_sender: bytes
    key_packages: tuple[bytes, ...]
    proposals: tuple[bytes, ...]
    commit_welcomes: tuple[bytes, ...]
    commits: tuple[bytes, ...]
    welcomes: tuple[bytes, ...]
    media_frames: tuple[bytes, ...]
    """DAVE-encrypted Opus frames from member A (decryptable by member B)."""


@functools.cache
def dave_samples() -> DaveSamples:
    return dave_exchange()[0]


@functools.cache
def dave_exchange() -> tuple[DaveSamples, dict[int, DaveClient]]:
    """The sample exchange and its two clients (B decrypts A's sample frames once each: replays fail)."""
    ds = DaveDeliveryService(CHANNEL_ID)
    clients = {USER_A: DaveClient(), USER_B: DaveClient()}
    got: dict[str, list[bytes]] = {k: [] for k in ("kp", "prop", "cw", "commit", "welcome", "es")}
    inbox: list[tuple[int, object]] = []
    outbox: list[tuple[int, object]] = []
    for user_id, client in clients.items():
        outbox.extend((user_id, a) for a in client.on_session_description(1, user_id, CHANNEL_ID))
        inbox.extend(ds.member_connected(user_id))
    for user_id, client in clients.items():
        client.on_clients_connect([u for u in clients if u != user_id])
    for _ in range(200):
        if not inbox and not outbox:
            break
        while outbox:
            user_id, action = outbox.pop(0)
            if isinstance(action, SendKeyPackage):
                got["kp"].append(action.data)
                inbox.extend(ds.key_package_received(user_id, action.data))
            elif isinstance(action, SendCommitWelcome):
                got["cw"].append(action.data)
                inbox.extend(ds.commit_welcome_received(user_id, action.data))
            elif isinstance(action, SendTransitionReady):
                inbox.extend(ds.transition_ready(user_id, action.transition_id))
        while inbox:
            user_id, ds_action = inbox.pop(0)
            client = clients[user_id]
            if isinstance(ds_action, SendExternalSender):
                got["es"].append(ds_action.data)
                actions = client.on_external_sender(ds_action.data)
            elif isinstance(ds_action, SendProposals):
                got["prop"].append(ds_action.proposals)
                actions = client.on_proposals(ds_action.op_type, ds_action.proposals)
            elif isinstance(ds_action, SendAnnounceCommit):
                got["commit"].append(ds_action.commit)
                actions = client.on_announce_commit(ds_action.transition_id, ds_action.commit)
            elif isinstance(ds_action, SendWelcome):
                got["welcome"].append(ds_action.welcome)
                actions = client.on_welcome(ds_action.transition_id, ds_action.welcome)
            else:
                method = {
                    "SendPrepareTransition": "on_prepare_transition",
                    "SendExecuteTransition": "on_execute_transition",
                    "SendPrepareEpoch": "on_prepare_epoch",
                }[type(ds_action).__name__]
                fields = {
                    "on_prepare_transition": ("transition_id", "protocol_version"),
                    "on_execute_transition": ("transition_id",),
                    "on_prepare_epoch": ("epoch", "protocol_version"),
                }[method]
                actions = getattr(client, method)(*(getattr(ds_action, f) for f in fields))
            outbox.extend((user_id, a) for a in actions if not isinstance(a, EpochChanged))
    a, b = clients[USER_A], clients[USER_B]
    assert a.ready and b.ready, "the sample exchange must form a group"
    frames = []
    for index in range(8):
        frame = a.encrypt(bytes([0xFC, index]) + bytes(range(40 + index)))
        assert frame is not None
        frames.append(frame)
    samples = DaveSamples(
        external_sender=got["es"][0],
        key_packages=tuple(got["kp"]),
        proposals=tuple(got["prop"]),
        commit_welcomes=tuple(got["cw"]),
        commits=tuple(got["commit"]),
        welcomes=tuple(got["welcome"]),
        media_frames=tuple(frames),
    )
    return samples, clients


@functools.cache
def server_frames() -> tuple[str | bytes, ...]:
    """One valid encoded frame of every server message type (with sequence numbers)."""
    dave = dave_samples()
    messages: list[m.ServerMessage] = [
        m.Hello(heartbeat_interval=13750.25, version=8),
        m.Ready(ssrc=1234, ip="127.0.0.1", port=50000, modes=crypto.SUPPORTED_MODES, experiments=("x",)),
        m.SessionDescription(
            mode=crypto.MODE_AES256_GCM, secret_key=bytes(range(32)), dave_protocol_version=1
        ),
        m.Speaking(speaking=1, ssrc=99, delay=0, user_id=USER_B),
        m.HeartbeatAck(nonce=123456789),
        m.Resumed(),
        m.ClientsConnect(user_ids=(USER_A, USER_B)),
        m.ClientDisconnect(user_id=USER_B),
        m.DavePrepareTransition(protocol_version=1, transition_id=3),
        m.DaveExecuteTransition(transition_id=3),
        m.DavePrepareEpoch(protocol_version=1, epoch=1),
        m.DaveMlsExternalSender(external_sender=dave.external_sender),
        m.DaveMlsProposals(operation=m.ProposalsOperation.APPEND, proposals=dave.proposals[0]),
        m.DaveMlsAnnounceCommitTransition(transition_id=1, commit=dave.commits[0]),
        m.DaveMlsWelcome(transition_id=1, welcome=dave.welcomes[0]),
    ]
    return tuple(m.encode_server(message, seq=index + 1) for index, message in enumerate(messages))


@functools.cache
def client_frames() -> tuple[str | bytes, ...]:
    """One valid encoded frame of every client message type."""
    dave = dave_samples()
    messages: list[m.ClientMessage] = [
        m.Identify(
            server_id=1, user_id=USER_A, session_id="s" * 32, token="t" * 20, max_dave_protocol_version=1
        ),
        m.SelectProtocol(address="127.0.0.1", port=50001, mode=crypto.MODE_AES256_GCM),
        m.Heartbeat(nonce=1700000000000, seq_ack=5),
        m.Speaking(speaking=1, ssrc=1234, delay=0),
        m.Resume(server_id=1, session_id="s" * 32, token="t" * 20, seq_ack=7),
        m.DaveTransitionReady(transition_id=3),
        m.DaveMlsKeyPackage(key_package=dave.key_packages[0]),
        m.DaveMlsCommitWelcome(commit_welcome=dave.commit_welcomes[0]),
        m.DaveMlsInvalidCommitWelcome(transition_id=3),
    ]
    return tuple(m.encode_client(message) for message in messages)


KEY = bytes(range(1, 33))


@functools.cache
def ciphers() -> tuple[crypto.TransportCipher, ...]:
    return tuple(crypto.make_cipher(mode, KEY) for mode in crypto.SUPPORTED_MODES)


@functools.cache
def datagrams() -> tuple[bytes, ...]:
    """Valid datagrams of every kind a voice socket sees: discovery, RTP (plain fields, CSRCs, extension,
    padding), RTCP, for both transport modes."""
    out = [discovery.build_request(7), discovery.build_response(7, "127.0.0.1", 50000)]
    for cipher in ciphers():
        header = rtp.build_header(100, 960 * 100, 4242)
        out.append(cipher.seal(header, b"\xfc\x01opus", 1))
        csrc_header = bytes([0x82]) + header[1:] + (5).to_bytes(4, "big") + (6).to_bytes(4, "big")
        out.append(cipher.seal(csrc_header, b"\xfc\x02", 2))
        ext_header = bytes([0x90]) + header[1:] + b"\xbe\xde\x00\x01"
        out.append(cipher.seal(ext_header, b"\x10\xaa\x00\x00" + b"\xfc\x03payload", 3))
        pad_header = bytes([0xA0]) + header[1:]
        out.append(cipher.seal(pad_header, b"\xfc\x04" + b"\x00\x00\x03", 4))
        rtcp_header = bytes([0x81, 201]) + (7).to_bytes(2, "big") + (4242).to_bytes(4, "big")
        out.append(cipher.seal(rtcp_header, bytes(24), 5))
    return tuple(out)


# ---- mutation -------------------------------------------------------------------------------------------


def _apply(data: bytes, edits: list[tuple[int, int, int, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, position, value, chunk in edits:
        at = position % (len(buf) + 1)
        if kind == 0 and buf:  # flip bits
            buf[at % len(buf)] ^= value or 1
        elif kind == 1:  # truncate
            del buf[at:]
        elif kind == 2:  # insert
            buf[at:at] = chunk
        elif kind == 3 and buf:  # delete a run
            del buf[at : at + 1 + value % 16]
        elif kind == 4 and buf:  # set an interesting byte
            buf[at % len(buf)] = (0x00, 0xFF, 0x7F, 0x80, 0x01, 0xFE)[value % 6]
        elif kind == 5:  # extend
            buf += chunk
        elif kind == 6 and len(buf) > 1:  # duplicate a slice
            buf[at:at] = buf[: value % len(buf)]
    return bytes(buf)


def mutated(samples: tuple[bytes, ...], *, max_edits: int = 4) -> st.SearchStrategy[bytes]:
    """A valid sample with a few edits (flips, truncation, insertion, deletion, splicing), or raw bytes."""
    edit = st.tuples(
        st.integers(0, 6), st.integers(0, 1 << 16), st.integers(0, 255), st.binary(min_size=1, max_size=24)
    )
    edited = st.builds(_apply, st.sampled_from(samples), st.lists(edit, min_size=1, max_size=max_edits))
    return st.one_of(edited, st.sampled_from(samples), st.binary(max_size=256))
