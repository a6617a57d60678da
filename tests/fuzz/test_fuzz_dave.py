"""Stateful fuzzing of the client's DAVE state machine against the emulator's delivery service (real davey).

Each member is a :class:`~cordvoice.dave.DaveClient` with a FIFO from the server and a FIFO to it (like a
WebSocket); the machine chooses what happens next: members join and leave, one message moves on one
connection in either direction, an op 23 is lost (the transition has to time out), a client message is lost
(written into a socket that died before a resume: op 26, 28 or 31 that nobody replays), a commit or Welcome
is corrupted in transit (the member must recover with op 31), a stale server message is delivered again, time
passes (the session's periodic ``check_progress``), or everything is delivered in a random order until
nothing moves and the stalled members have recovered (``settle``).

Invariants: no exception ever escapes a client or the delivery service; the service never addresses a
member that left; every ready member's epoch is one the service reached, and members at the same epoch share
one privacy code; and after ``settle`` the call has converged: every member is in the group at the service's
epoch, they agree on the roster and the privacy code, and each decrypts every other member's fresh frames,
whatever was lost, corrupted or replayed before (recovery converges). With fewer than two members there is no
group and nobody claims to be ready.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from cordvoice.bench.dave_group import client_call, to_delivery_service
from cordvoice.dave import STALL_TIMEOUT_S, DaveClient, EpochChanged, SendTransitionReady
from cordvoice.emulator.dave_ds import DaveDeliveryService

from .fuzz_support import CHANNEL_ID, EXAMPLES, STEPS, budget

USERS = tuple(1_190_000_000_000_100_000 + n for n in range(1, 6))
TRANSITION_TIMEOUT = 1.5
SETTLE_LIMIT = 5_000
MACHINE = "DAVE client + delivery service"

_MEDIA_STATES = ("on_announce_commit", "on_welcome")


@dataclass
class Member:
    user_id: int
    client: DaveClient = field(default_factory=DaveClient)
    inbox: deque[tuple[str, tuple[Any, ...]]] = field(default_factory=deque)
    outbox: deque[Any] = field(default_factory=deque)
    delivered: list[tuple[str, tuple[Any, ...]]] = field(default_factory=list)
    corrupt_next: bool = False


class DaveCallModel(RuleBasedStateMachine):
    """One voice call's DAVE: clients, delivery service, and the network between them."""

    def __init__(self) -> None:
        super().__init__()
        self.ds = DaveDeliveryService(CHANNEL_ID, transition_timeout=TRANSITION_TIMEOUT, now=0.0)
        self.members: dict[int, Member] = {}
        self.now = 0.0
        self.epochs_seen: set[int] = {0}

    @initialize(count=st.integers(2, len(USERS)))
    def members_join(self, count: int) -> None:
        """Every example starts with a call of 2-5 members (hypothesis may switch the join rule off)."""
        EXAMPLES[f"state machine: {MACHINE}"] += 1
        for index in range(count):
            self.join(index)

    # ---- wiring ---------------------------------------------------------------------------------------

    def _route(self, outputs: list[tuple[int, Any]]) -> None:
        for user_id, action in outputs:
            member = self.members.get(user_id)
            assert member is not None, f"the DS addressed {action!r} to {user_id}, who left"
            member.inbox.append(client_call(action))
        self.epochs_seen.add(self.ds.epoch)

    def _to_client(self, member: Member, method: str, args: tuple[Any, ...]) -> None:
        STEPS[MACHINE] += 1
        if member.corrupt_next and method in _MEDIA_STATES:
            member.corrupt_next = False
            transition_id, data = args
            data = bytearray(data)
            data[len(data) // 2] ^= 0x5A
            args = (transition_id, bytes(data))
        actions = getattr(member.client, method)(*args)  # must never raise
        for action in actions:
            if not isinstance(action, EpochChanged):
                member.outbox.append(action)

    def _to_server(self, member: Member, action: Any) -> None:
        STEPS[MACHINE] += 1
        self._route(to_delivery_service(self.ds, member.user_id, action, now=self.now))

    def _pick(self, index: int, *, inbox: bool = False, outbox: bool = False) -> Member | None:
        candidates = [m for m in self.members.values() if (not inbox or m.inbox) and (not outbox or m.outbox)]
        return candidates[index % len(candidates)] if candidates else None

    def _poll(self) -> None:
        self._route(self.ds.poll(self.now))

    # ---- membership -----------------------------------------------------------------------------------

    @precondition(lambda self: len(self.members) < len(USERS))
    @rule(pick=st.integers(0, len(USERS) - 1))
    def join(self, pick: int) -> None:
        free = [u for u in USERS if u not in self.members]
        user_id = free[pick % len(free)]
        member = Member(user_id)
        others = sorted(self.members)
        self.members[user_id] = member
        member.inbox.append(("on_session_description", (1, user_id, CHANNEL_ID)))
        if others:
            member.inbox.append(("on_clients_connect", (others,)))
        for other in others:
            self.members[other].inbox.append(("on_clients_connect", ([user_id],)))
        self._route(self.ds.member_connected(user_id, now=self.now))

    @precondition(lambda self: bool(self.members))
    @rule(pick=st.integers(0, 100))
    def leave(self, pick: int) -> None:
        user_id = sorted(self.members)[pick % len(self.members)]
        del self.members[user_id]
        for other in self.members.values():
            other.inbox.append(("on_client_disconnect", (user_id,)))
        self._route(self.ds.member_disconnected(user_id, now=self.now))

    # ---- the network ----------------------------------------------------------------------------------

    @precondition(lambda self: any(m.inbox for m in self.members.values()))
    @rule(pick=st.integers(0, 100))
    def deliver_to_client(self, pick: int) -> None:
        member = self._pick(pick, inbox=True)
        assert member is not None
        method, args = member.inbox.popleft()
        member.delivered.append((method, args))
        self._to_client(member, method, args)

    @precondition(lambda self: any(m.outbox for m in self.members.values()))
    @rule(pick=st.integers(0, 100))
    def deliver_to_server(self, pick: int) -> None:
        member = self._pick(pick, outbox=True)
        assert member is not None
        self._to_server(member, member.outbox.popleft())

    @precondition(lambda self: any(m.outbox for m in self.members.values()))
    @rule(pick=st.integers(0, 100))
    def lose_an_op23(self, pick: int) -> None:
        """A slow client: its op 23 never arrives, so the transition must time out."""
        member = self._pick(pick, outbox=True)
        assert member is not None
        if isinstance(member.outbox[0], SendTransitionReady):
            member.outbox.popleft()

    @precondition(lambda self: bool(self.members))
    @rule(pick=st.integers(0, 100))
    def corrupt_next_commit_or_welcome(self, pick: int) -> None:
        member = self._pick(pick)
        assert member is not None
        member.corrupt_next = True

    @precondition(lambda self: any(m.delivered for m in self.members.values()))
    @rule(pick=st.integers(0, 100), which=st.integers(0, 1000))
    def replay_a_stale_message(self, pick: int, which: int) -> None:
        """A server message delivered again later (a confused server): the member must cope and recover."""
        candidates = [m for m in self.members.values() if m.delivered]
        member = candidates[pick % len(candidates)]
        method, args = member.delivered[which % len(member.delivered)]
        if method != "on_session_description":
            self._to_client(member, method, args)

    @rule(seconds=st.one_of(st.floats(0.0, 3.0), st.floats(STALL_TIMEOUT_S, 2 * STALL_TIMEOUT_S)))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self._poll()
        self._check_progress()

    def _check_progress(self) -> None:
        """What the session does every couple of seconds: a member stuck without a group recovers."""
        for member in self.members.values():
            for action in member.client.check_progress(self.now):
                if not isinstance(action, EpochChanged):
                    member.outbox.append(action)

    @precondition(lambda self: any(m.outbox for m in self.members.values()))
    @rule(pick=st.integers(0, 100))
    def lose_a_message_to_the_server(self, pick: int) -> None:
        """A client message written into a socket that died just before a resume: nobody replays it."""
        member = self._pick(pick, outbox=True)
        assert member is not None
        member.outbox.popleft()

    @rule(seed=st.integers(0, 2**32 - 1))
    def settle(self, seed: int) -> None:
        """Deliver everything in a seeded random order until nothing moves, then check convergence."""
        rng = random.Random(seed)
        for _ in range(SETTLE_LIMIT):
            ready = [(m, "in") for m in self.members.values() if m.inbox]
            ready += [(m, "out") for m in self.members.values() if m.outbox]
            if not ready:
                deadline = self.ds.next_deadline()
                if deadline is not None:
                    self.now = max(self.now, deadline)
                    self._poll()
                    continue
                if self._converged():
                    break
                # Nothing moves but the call has not converged: time passes until stalled members recover.
                self.now += STALL_TIMEOUT_S / 4
                self._check_progress()
                continue
            member, direction = rng.choice(ready)
            if direction == "in":
                method, args = member.inbox.popleft()
                member.delivered.append((method, args))
                self._to_client(member, method, args)
            else:
                self._to_server(member, member.outbox.popleft())
            self.now += rng.uniform(0.0, 0.01)
            deadline = self.ds.next_deadline()
            if deadline is not None and self.now >= deadline:
                self._poll()
        else:
            raise AssertionError(f"no quiescence after {SETTLE_LIMIT} deliveries: {self.ds.counters}")
        for member in self.members.values():
            member.corrupt_next = False
        self._assert_converged()

    def _converged(self) -> bool:
        members = self.members
        if len(members) < 2:
            return True
        return (
            self.ds.established
            and set(self.ds.roster) == set(members)
            and all(m.client.ready and m.client.epoch == self.ds.epoch for m in members.values())
        )

    def _assert_converged(self) -> None:
        ds, members = self.ds, self.members
        STEPS["  (settled and converged)"] += 1
        assert not ds.open_transitions
        if len(members) < 2:
            assert not ds.established and ds.epoch == 0
            assert not any(m.client.ready for m in members.values())
            return
        uids = sorted(members)
        assert ds.established and set(ds.roster) == set(uids), (ds.roster, uids, ds.counters)
        assert not ds.stale_leaves and ds.proposals_in_flight == 0
        codes = set()
        for member in members.values():
            client = member.client
            assert client.ready, f"{member.user_id} not ready after settling: {ds.counters}"
            assert client.epoch == ds.epoch
            assert client.own_leaf_index == ds.roster[member.user_id]
            assert client.member_ids == uids
            codes.add(client.privacy_code)
        assert len(codes) == 1 and None not in codes
        for sender in members.values():
            frame = sender.client.encrypt(b"\xfc" + sender.user_id.to_bytes(8, "big") + bytes(32))
            assert frame is not None
            for receiver in members.values():
                if receiver is not sender:
                    plain = receiver.client.decrypt(sender.user_id, frame)
                    assert plain[1:9] == sender.user_id.to_bytes(8, "big")

    # ---- invariants -------------------------------------------------------------------------------------

    @invariant()
    def epochs_are_consistent(self) -> None:
        codes: dict[int, str | None] = {}
        for member in self.members.values():
            client = member.client
            if not client.ready:
                continue
            epoch = client.epoch
            assert epoch is not None and epoch in self.epochs_seen, (epoch, self.epochs_seen)
            code = client.privacy_code
            assert codes.setdefault(epoch, code) == code, "two members disagree at the same epoch"


TestDaveCallModel = DaveCallModel.TestCase
TestDaveCallModel.settings = budget(50, stateful_step_count=40)


def test_a_stale_op24_no_longer_leaves_a_member_deaf() -> None:
    """The sequence the machine found before ``check_progress`` existed: a member that gets a stale op 24
    (prepare epoch 1) after its group formed starts over, the server keeps its leaf and drops the new key
    package, and nothing moves. Now the member recovers after ``STALL_TIMEOUT_S`` and the call converges."""
    state = DaveCallModel()
    state.members_join(count=3)
    state.settle(seed=1)
    member = state.members[sorted(state.members)[1]]
    stale = ("on_prepare_epoch", (1, 1))
    state._to_client(member, *stale)
    assert not member.client.ready
    state.settle(seed=0)
    assert member.client.stats.stall_recoveries == 1
    state.teardown()
