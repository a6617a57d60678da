"""Stateful fuzzing of the client's voice gateway core and reconnect policy (hypothesis state machine).

The machine plays the session's role with the two sans-IO cores, :class:`VoiceGatewayProtocol` and
:class:`ReconnectPolicy`, exactly as :class:`cordvoice.Session` wires them: it opens connections, feeds
server messages in any order (well-formed ones, stale ones, repeated ones, unknown opcodes and garbage, with
any sequence number), fires heartbeat timers, closes sockets with any code, expires move waits, announces
moves, lets time pass, and carries out every decision (resume keeps the core, rejoin/identify/move build a
new one, giving up ends the model).

Invariants, checked after every step:

* nothing raises; every frame the client sends decodes as a client message;
* the first frame on a connection is Identify for a fresh session and Resume (with ``seq_ack`` = the last
  sequence number seen) for an established one;
* audio is allowed only after a Session Description of the *current* voice session (never before Ready, never
  on a new session before its own op 4); op 5 goes out only with our SSRC and only once established;
* ``seq`` is the sequence number of the last numbered frame, whatever the frame was;
* heartbeats: a zombie (``heartbeat()`` returns None) means three unacknowledged beats;
* the policy never loops: without a connection that stayed up ``stable_after`` seconds, the number of
  reconnect decisions is bounded; final close codes give up at once; a client-bug close twice gives up;
  giving up happens once and carries an error.
"""

from __future__ import annotations

import json
import random

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cordvoice.errors import DaveRequiredError, DisconnectedError, InvalidArgumentError
from cordvoice.events import ReconnectAction
from cordvoice.reconnect import ConnectionEnd, Decision, EndKind, ReconnectConfig, ReconnectPolicy
from cordvoice.udp.crypto import MODE_AES256_GCM, MODE_XCHACHA20_POLY1305, SUPPORTED_MODES
from cordvoice.voicegateway import messages as m
from cordvoice.voicegateway.protocol import (
    MAX_UNACKED_HEARTBEATS,
    Credentials,
    Malformed,
    ReadyReceived,
    ResumedReceived,
    Send,
    SessionDescribed,
    VoiceGatewayProtocol,
)

from .fuzz_support import CHANNEL_ID, STEPS, USER_A, USER_B, budget, dave_samples

CONFIG = ReconnectConfig(max_resumes=3, max_rejoins=3, backoff_base=0.5, backoff_cap=8.0, stable_after=60.0)
#: Reconnect decisions possible between two stable connections: every rejoin may follow max_resumes resumes.
LOOP_BOUND = CONFIG.max_rejoins + (CONFIG.max_rejoins + 1) * CONFIG.max_resumes + 1
FINAL_CODES = {4012, 4016, 4017, 4020, 4021}
CLIENT_BUG_CODES = {4001, 4002, 4003, 4005}
CLOSE_CODES = st.one_of(
    st.sampled_from(
        [
            None,
            1000,
            1001,
            1006,
            1011,
            4000,
            4001,
            4002,
            4003,
            4004,
            4005,
            4006,
            4009,
            4011,
            4012,
            4014,
            4015,
            4016,
            4017,
            4020,
            4021,
            4022,
        ]
    ),
    st.integers(1000, 4999),
)
SEQS = st.one_of(st.none(), st.integers(0, 70_000), st.just(-1))


class VoiceSessionModel(RuleBasedStateMachine):
    """The Session's use of the protocol core and the policy, without sockets (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.policy = ReconnectPolicy(CONFIG, rng=random.Random(7))
        self.protocol = self._fresh_protocol()
        self.now = 0.0
        self.connected = False
        self.resume_next = False
        self.waiting_move = False
        self.final: Decision | None = None
        self.audio_allowed = False
        self.ready_since: float | None = None
        self.decisions_since_stable = 0
        self.client_bug_closes = 0
        self.sessions = 1
        self.next_seq = 1

    @initialize()
    def count_example(self) -> None:
        from .fuzz_support import EXAMPLES  # noqa: PLC0415

        EXAMPLES["state machine: voice gateway + reconnect policy"] += 1

    # ---- helpers --------------------------------------------------------------------------------------

    @staticmethod
    def _fresh_protocol() -> VoiceGatewayProtocol:
        credentials = Credentials(server_id=1, user_id=USER_A, session_id="session", token="token")
        return VoiceGatewayProtocol(credentials, channel_id=CHANNEL_ID, max_dave_protocol_version=1)

    def _deliver(self, frame: str | bytes, seq: int | None) -> None:
        STEPS["voice gateway + reconnect policy"] += 1
        protocol = self.protocol
        seq_before = protocol.seq
        outputs = protocol.receive(frame, self.now)
        if seq is not None:
            assert protocol.seq == seq, (protocol.seq, seq)
        elif not any(isinstance(o, Malformed) for o in outputs):
            assert protocol.seq == seq_before
        for output in outputs:
            if isinstance(output, Send):
                sent = m.decode_client(output.frame)
                assert not isinstance(sent, m.Identify | m.Resume), "Identify/Resume only open a connection"
                if isinstance(sent, m.Speaking):
                    assert protocol.established and sent.ssrc == protocol.ssrc
            elif isinstance(output, ReadyReceived):
                assert output.mode in SUPPORTED_MODES
            elif isinstance(output, SessionDescribed):
                assert protocol.ready is not None and output.description.mode == protocol.mode
                self.audio_allowed = True
                STEPS["  (sessions established)"] += 1
                self._connection_ready()
            elif isinstance(output, ResumedReceived):
                self._connection_ready()

    def _connection_ready(self) -> None:
        self.policy.connection_ready(self.now)
        self.ready_since = self.now

    def _numbered(self, message: m.ServerMessage, seq: int | None) -> None:
        """Encode with ``seq`` (None or -1: without one; binary frames always carry a u16 one)."""
        wire = None if seq is None or seq < 0 else seq
        try:
            frame = m.encode_server(message, seq=wire)
        except InvalidArgumentError:  # a binary frame: its seq is a u16 and cannot be left out
            wire = (wire or 0) & 0xFFFF
            frame = m.encode_server(message, seq=wire)
        self._deliver(frame, wire)

    def _end(self, end: ConnectionEnd) -> None:
        """The connection ended: ask the policy and carry the decision out, as Session._carry_out does."""
        STEPS["voice gateway + reconnect policy"] += 1
        if self.ready_since is not None and self.now - self.ready_since >= CONFIG.stable_after:
            self.decisions_since_stable = 0
        self.ready_since = None
        self.connected = False
        decision = self.policy.decide(end, self.now)
        self._apply(decision, end)

    def _apply(self, decision: Decision, end: ConnectionEnd) -> None:
        assert 0.0 <= decision.delay <= CONFIG.backoff_cap, decision
        if decision.gives_up:
            assert isinstance(decision.error, DisconnectedError) and decision.reason
            if end.code == 4017:
                assert isinstance(decision.error, DaveRequiredError)
            self.final = decision
            self.audio_allowed = False
            STEPS["  (gave up)"] += 1
            return
        assert end.code not in FINAL_CODES or end.kind is not EndKind.CLOSED, f"{end.code} must be final"
        action = decision.action
        if action is ReconnectAction.WAIT_FOR_MOVE:
            assert end.code in (4014, 4022)
            self.waiting_move = True
            self.audio_allowed = False
            return
        self.decisions_since_stable += 1
        assert self.decisions_since_stable <= LOOP_BOUND, "the policy keeps reconnecting: a loop"
        if action is ReconnectAction.RESUME:
            assert end.established, "only an established session resumes"
            self.now += decision.delay
            self.resume_next = True
            return
        assert action in (ReconnectAction.REJOIN, ReconnectAction.IDENTIFY)
        self.now += decision.delay
        self._new_session()

    def _new_session(self) -> None:
        self.protocol = self._fresh_protocol()
        self.sessions += 1
        self.resume_next = False
        self.waiting_move = False
        self.audio_allowed = False

    # ---- connections ----------------------------------------------------------------------------------

    @precondition(lambda self: self.final is None and not self.connected and not self.waiting_move)
    @rule()
    def open_connection(self) -> None:
        frame = m.decode_client(self.protocol.connection_opened())
        if self.protocol.established:
            STEPS["  (resumes sent)"] += 1
            assert self.resume_next, "a fresh connection of an established session is a resume"
            assert isinstance(frame, m.Resume) and frame.seq_ack == self.protocol.seq
        else:
            assert isinstance(frame, m.Identify) and frame.max_dave_protocol_version == 1
        assert self.protocol.unacked_heartbeats == 0
        self.resume_next = False
        self.connected = True

    @precondition(lambda self: self.final is None and self.connected)
    @rule(code=CLOSE_CODES)
    def server_closes(self, code: int | None) -> None:
        if code in CLIENT_BUG_CODES:
            self.client_bug_closes += 1
        kind = EndKind.NETWORK if code is None else EndKind.CLOSED
        end = ConnectionEnd(kind, code, "closed by the fuzzer", self.protocol.established)
        self._end(end)
        if code in CLIENT_BUG_CODES and self.client_bug_closes >= 2:
            assert self.final is not None, "a client-bug close after a rejoin gives up"

    @precondition(lambda self: self.final is None and self.connected)
    @rule(code=st.sampled_from([None, 1006, 4015, 4000]))
    def connection_drops(self, code: int | None) -> None:
        """The common failure (resumable), weighted up so that resumes are well explored."""
        self.server_closes(code)

    @precondition(lambda self: self.final is None and self.connected)
    @rule(kind=st.sampled_from([EndKind.HANDSHAKE_TIMEOUT, EndKind.UDP_FAILED, EndKind.GATEWAY_SESSION_LOST]))
    def something_else_fails(self, kind: EndKind) -> None:
        self._end(ConnectionEnd(kind, None, "fuzzer", self.protocol.established))

    @precondition(lambda self: self.final is None and not self.connected and not self.waiting_move)
    @rule()
    def rejoin_gets_no_credentials(self) -> None:
        self._end(ConnectionEnd(EndKind.NO_CREDENTIALS, None, "no answer", False))

    @precondition(lambda self: self.final is None and self.waiting_move)
    @rule()
    def move_wait_expires(self) -> None:
        decision = self.policy.move_wait_expired(ConnectionEnd(EndKind.CLOSED, 4014, "", False))
        assert decision.gives_up
        self._apply(decision, ConnectionEnd(EndKind.CLOSED, 4014))

    @precondition(lambda self: self.final is None)
    @rule()
    def discord_moves_us(self) -> None:
        """A new VOICE_SERVER_UPDATE: a fresh voice session elsewhere (what the session does on a move)."""
        self.connected = False
        self.ready_since = None
        self._new_session()

    @rule(seconds=st.one_of(st.floats(0, 2), st.floats(0, 120)))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds

    # ---- heartbeats -----------------------------------------------------------------------------------

    @precondition(lambda self: self.final is None and self.connected)
    @rule()
    def heartbeat_timer(self) -> None:
        frame = self.protocol.heartbeat(self.now)
        if frame is None:
            assert self.protocol.unacked_heartbeats >= MAX_UNACKED_HEARTBEATS
            self._end(ConnectionEnd(EndKind.ZOMBIE, None, "zombie", self.protocol.established))
            return
        beat = m.decode_client(frame)
        assert isinstance(beat, m.Heartbeat) and beat.seq_ack == self.protocol.seq
        self.now += 0.001

    @precondition(lambda self: self.final is None and self.connected)
    @rule(pick=st.integers(0, 10), seq=SEQS)
    def heartbeat_ack(self, pick: int, seq: int | None) -> None:
        in_flight = sorted(self.protocol._in_flight)
        nonce = in_flight[pick % len(in_flight)] if in_flight and pick < 8 else pick * 7919
        acked_before = self.protocol.heartbeats_acked
        self._numbered(m.HeartbeatAck(nonce=nonce), seq)
        if nonce in in_flight:
            assert self.protocol.heartbeats_acked == acked_before + 1
            newer = sum(1 for n in in_flight if n > nonce)  # still unanswered: they count towards a zombie
            assert self.protocol.unacked_heartbeats == newer and self.protocol.latency is not None

    # ---- server messages, in any order ----------------------------------------------------------------

    @precondition(lambda self: self.final is None and self.connected)
    @rule(mode=st.sampled_from(SUPPORTED_MODES), dave=st.sampled_from([0, 1]))
    def handshake(self, mode: str, dave: int) -> None:
        """Hello, Ready and Session Description in the usual order (so that sessions get established)."""
        self._numbered(m.Hello(heartbeat_interval=13750.0, version=8), None)
        self._numbered(m.Ready(ssrc=4242, ip="127.0.0.1", port=5000, modes=(mode,)), self.next_seq)
        self._numbered(
            m.SessionDescription(mode=mode, secret_key=bytes(32), dave_protocol_version=dave),
            self.next_seq + 1,
        )
        self.next_seq += 2

    @precondition(lambda self: self.final is None and self.connected)
    @rule(interval=st.floats(0.001, 60_000), seq=SEQS)
    def hello(self, interval: float, seq: int | None) -> None:
        self._numbered(m.Hello(heartbeat_interval=interval, version=8), seq)

    @precondition(lambda self: self.final is None and self.connected)
    @rule(
        modes=st.lists(
            st.sampled_from([*SUPPORTED_MODES, "xsalsa20_poly1305", "nope"]), min_size=1, max_size=4
        ),
        seq=SEQS,
    )
    def ready(self, modes: list[str], seq: int | None) -> None:
        self._numbered(m.Ready(ssrc=4242, ip="127.0.0.1", port=5000, modes=tuple(modes)), seq)

    @precondition(lambda self: self.final is None and self.connected)
    @rule(
        mode=st.sampled_from([MODE_AES256_GCM, MODE_XCHACHA20_POLY1305, "other"]),
        dave=st.sampled_from([0, 1]),
        seq=SEQS,
    )
    def session_description(self, mode: str, dave: int, seq: int | None) -> None:
        had_ready = self.protocol.ready is not None
        allowed_before = self.audio_allowed
        self._numbered(m.SessionDescription(mode=mode, secret_key=bytes(32), dave_protocol_version=dave), seq)
        if not had_ready:
            assert self.audio_allowed == allowed_before, "a Session Description before Ready allows nothing"

    @precondition(lambda self: self.final is None and self.connected)
    @rule(seq=SEQS)
    def resumed(self, seq: int | None) -> None:
        self._numbered(m.Resumed(), seq)

    @precondition(lambda self: self.final is None and self.connected)
    @rule(user=st.sampled_from([USER_B, 5, 2**63]), ssrc=st.integers(0, 2**32 - 1), seq=SEQS)
    def peer_messages(self, user: int, ssrc: int, seq: int | None) -> None:
        self._numbered(m.Speaking(speaking=1, ssrc=ssrc, delay=0, user_id=user), seq)
        self._numbered(m.ClientsConnect(user_ids=(user,)), seq)
        self._numbered(m.ClientDisconnect(user_id=user), seq)

    @precondition(lambda self: self.final is None and self.connected)
    @rule(
        which=st.integers(0, 7),
        transition=st.integers(0, 65535),
        data=st.one_of(st.binary(max_size=64), st.sampled_from([b"x"])),
        real=st.booleans(),
        seq=SEQS,
    )
    def dave_message(self, which: int, transition: int, data: bytes, real: bool, seq: int | None) -> None:
        samples = dave_samples()
        if real:  # real MLS bytes from another exchange: well-formed, but not for this group
            data = [samples.external_sender, samples.proposals[0], samples.commits[0], samples.welcomes[0]][
                which % 4
            ]
        message: m.ServerMessage = [
            m.DavePrepareTransition(protocol_version=which % 2, transition_id=transition),
            m.DaveExecuteTransition(transition_id=transition),
            m.DavePrepareEpoch(protocol_version=1, epoch=1 + transition % 3),
            m.DaveMlsExternalSender(external_sender=data or b"x"),
            m.DaveMlsProposals(operation=m.ProposalsOperation(which % 2), proposals=data or b"x"),
            m.DaveMlsAnnounceCommitTransition(transition_id=transition, commit=data or b"x"),
            m.DaveMlsWelcome(transition_id=transition, welcome=data or b"x"),
            m.DaveMlsExternalSender(external_sender=samples.external_sender),
        ][which]
        self._numbered(message, seq)

    @precondition(lambda self: self.final is None and self.connected)
    @rule(op=st.integers(0, 255), body=st.binary(max_size=16), seq=SEQS)
    def unknown_or_garbage(self, op: int, body: bytes, seq: int | None) -> None:
        expected: int | None
        if op % 3 == 0:
            expected = seq if seq is not None and seq >= 0 else None
            frame: str | bytes = json.dumps({"op": op, "d": {"x": list(body)}, "seq": expected})
        elif op % 3 == 1:
            expected = (seq or 0) & 0xFFFF
            frame = expected.to_bytes(2, "big") + bytes([op]) + body
        else:
            frame, expected = body.decode("latin-1"), None
        self._deliver(frame, expected)

    # ---- invariants -------------------------------------------------------------------------------------

    @invariant()
    def audio_only_when_described(self) -> None:
        if self.audio_allowed:
            assert self.protocol.established and self.protocol.ready is not None
        assert self.protocol.unacked_heartbeats <= MAX_UNACKED_HEARTBEATS
        assert self.protocol.heartbeats_acked <= self.protocol.heartbeats_sent

    @invariant()
    def final_is_final(self) -> None:
        if self.final is not None:
            assert not self.connected and not self.audio_allowed
            assert self.final.error is not None


TestVoiceSessionModel = VoiceSessionModel.TestCase
TestVoiceSessionModel.settings = budget(250, stateful_step_count=60)


def test_policy_alone_never_loops_without_a_stable_connection() -> None:
    """Deterministic worst case: every connection fails at once, forever; the policy must give up."""
    for code in (None, 1006, 4015, 4006, 4009, 4004, 4011, 4999):
        policy = ReconnectPolicy(CONFIG, rng=random.Random(1))
        now, established = 0.0, True
        for _ in range(LOOP_BOUND + 2):
            decision = policy.decide(
                ConnectionEnd(EndKind.CLOSED if code else EndKind.NETWORK, code, established=established), now
            )
            if decision.gives_up:
                break
            now += decision.delay + 1.0
            policy.connection_ready(now)  # it becomes ready, then fails again at once
            established = True
        else:
            raise AssertionError(f"close {code}: still reconnecting after {LOOP_BOUND + 2} failures")
