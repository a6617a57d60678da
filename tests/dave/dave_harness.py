"""In-memory wiring of DAVE clients to one delivery service, with seeded shuffled delivery.

Each member has one connection: a FIFO from the server and a FIFO to the server, like a WebSocket. A
seeded scheduler picks which non-empty queue moves next, so deliveries interleave across connections in
every order the seed allows while each connection keeps its own order. Time advances a little per step;
transition timeouts fire through ``poll``. No sockets: this checks the two sans-IO cores against each
other with real davey.
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

import davey

from cordvoice.bench.dave_group import client_call, to_delivery_service
from cordvoice.dave import (
    DaveClient,
    EpochChanged,
    SendCommitWelcome,
    SendInvalidCommitWelcome,
    SendKeyPackage,
    SendTransitionReady,
)
from cordvoice.emulator.dave_ds import MALFORMED_INPUT_REASONS, DaveDeliveryService

CHANNEL_ID = 1_180_000_000_000_000_042


class NaiveClient:
    """Behaves exactly like discord.py 2.7.1's DAVE handlers (dave-notes.md §2).

    No expected_user_ids, commits on every op 27, op 31 + reinit on any 29/30 failure, binary ops
    ignored without a session. Exceptions it does not catch escape, as they would kill discord.py's task.
    """

    def __init__(self) -> None:
        self.session: davey.DaveSession | None = None
        self.protocol_version = 0
        self.pending: dict[int, int] = {}
        self.user_id = 0
        self.channel_id = 0
        self.recoveries = 0

    # discord.py's reinit_dave_session
    def _reinit(self) -> list[Any]:
        if self.protocol_version > 0:
            if self.session is not None:
                self.session.reinit(self.protocol_version, self.user_id, self.channel_id)
            else:
                self.session = davey.DaveSession(self.protocol_version, self.user_id, self.channel_id)
            return [SendKeyPackage(self.session.get_serialized_key_package())]
        if self.session is not None:
            self.session.reset()
            self.session.set_passthrough_mode(True, 10)
        return []

    def on_session_description(self, version: int, user_id: int, channel_id: int) -> list[Any]:
        self.user_id, self.channel_id = user_id, channel_id
        self.protocol_version = version
        return self._reinit() if version > 0 else []

    def on_clients_connect(self, user_ids: list[int]) -> list[Any]:
        return []

    def on_client_disconnect(self, user_id: int) -> list[Any]:
        return []

    def on_external_sender(self, data: bytes) -> list[Any]:
        if self.session is None:
            return []
        self.session.set_external_sender(data)
        return []

    def on_proposals(self, op_type: int, proposals: bytes) -> list[Any]:
        if self.session is None:
            return []
        op = davey.ProposalsOperationType.append if op_type == 0 else davey.ProposalsOperationType.revoke
        result = self.session.process_proposals(op, proposals)
        if isinstance(result, davey.CommitWelcome):
            return [SendCommitWelcome(result.commit + result.welcome if result.welcome else result.commit)]
        return []

    def _after(self, tid: int, ok: bool) -> list[Any]:
        if not ok:
            self.recoveries += 1
            return [SendInvalidCommitWelcome(tid), *self._reinit()]
        if tid != 0:
            self.pending[tid] = self.protocol_version
            return [SendTransitionReady(tid)]
        return []

    def on_announce_commit(self, tid: int, commit: bytes) -> list[Any]:
        if self.session is None:
            return []
        try:
            self.session.process_commit(commit)
        except Exception:
            return self._after(tid, False)
        return self._after(tid, True)

    def on_welcome(self, tid: int, welcome: bytes) -> list[Any]:
        if self.session is None:
            return []
        try:
            self.session.process_welcome(welcome)
        except Exception:
            return self._after(tid, False)
        return self._after(tid, True)

    def _execute(self, tid: int) -> None:
        if tid in self.pending:
            self.protocol_version = self.pending.pop(tid)

    def on_prepare_transition(self, tid: int, version: int) -> list[Any]:
        if self.session is None:
            return []
        self.pending[tid] = version
        if tid == 0:
            self._execute(tid)
            return []
        if version == 0:
            self.session.set_passthrough_mode(True, 120)
        return [SendTransitionReady(tid)]

    def on_execute_transition(self, tid: int) -> list[Any]:
        if self.session is not None:
            self._execute(tid)
        return []

    def on_prepare_epoch(self, epoch: int, version: int) -> list[Any]:
        if self.session is None or epoch != 1:
            return []
        self.protocol_version = version
        return self._reinit()

    # what the checks need
    @property
    def ready(self) -> bool:
        s = self.session
        return bool(self.protocol_version and s and s.ready and s.status == davey.SessionStatus.active)

    @property
    def epoch(self) -> int | None:
        return self.session.epoch if self.ready and self.session else None

    @property
    def privacy_code(self) -> str | None:
        return self.session.voice_privacy_code if self.ready and self.session else None

    @property
    def own_leaf_index(self) -> int | None:
        return self.session.own_leaf_index if self.ready and self.session else None

    @property
    def member_ids(self) -> list[int]:
        return sorted(int(u) for u in self.session.get_user_ids()) if self.ready and self.session else []

    def encrypt(self, opus: bytes) -> bytes | None:
        if self.ready and self.session is not None:
            return self.session.encrypt_opus(opus)
        return opus

    def decrypt(self, user_id: int, frame: bytes) -> bytes:
        assert self.session is not None
        return self.session.decrypt(user_id, davey.MediaType.audio, frame)


@dataclass
class Member:
    user_id: int
    client: Any
    kind: str
    inbox: deque[tuple[str, tuple[Any, ...]]] = field(default_factory=deque)
    outbox: deque[Any] = field(default_factory=deque)
    epoch_events: list[EpochChanged] = field(default_factory=list)
    crashes: list[BaseException] = field(default_factory=list)
    op31_sent: int = 0
    corrupt_next: set[str] = field(default_factory=set)


class Harness:
    """N clients, one delivery service, a seeded scheduler."""

    def __init__(
        self,
        seed: int,
        *,
        transition_timeout: float = 1.5,
        op23_drop_rate: float = 0.05,
        step_time: float = 0.004,
    ) -> None:
        self.rng = random.Random(seed)
        self.now = 0.0
        self.ds = DaveDeliveryService(CHANNEL_ID, transition_timeout=transition_timeout, now=0.0)
        self.members: dict[int, Member] = {}
        self.op23_drop_rate = op23_drop_rate
        self.step_time = step_time
        self.delivered: Counter[str] = Counter()
        self.departed_recoveries = 0

    # ------------------------------------------------------------------ membership
    def join(self, user_id: int, kind: str = "ours") -> Member:
        client: Any = DaveClient() if kind == "ours" else NaiveClient()
        member = Member(user_id, client, kind)
        others = sorted(self.members)
        self.members[user_id] = member
        member.inbox.append(("on_session_description", (1, user_id, CHANNEL_ID)))
        if others:
            member.inbox.append(("on_clients_connect", (others,)))
        for other in others:
            self.members[other].inbox.append(("on_clients_connect", ([user_id],)))
        self._route(self.ds.member_connected(user_id, now=self.now))
        return member

    def leave(self, user_id: int) -> None:
        member = self.members.pop(user_id)
        self.departed_recoveries += self.recoveries_of(member)
        for other in self.members.values():
            other.inbox.append(("on_client_disconnect", (user_id,)))
        self._route(self.ds.member_disconnected(user_id, now=self.now))

    # ------------------------------------------------------------------ delivery
    def _route(self, outputs: list[tuple[int, Any]]) -> None:
        for user_id, action in outputs:
            member = self.members.get(user_id)
            assert member is not None, f"DS addressed {action!r} to a departed member {user_id}"
            member.inbox.append(client_call(action))

    def _deliver_to_client(self, member: Member) -> None:
        method, args = member.inbox.popleft()
        self.delivered[method] += 1
        if method in member.corrupt_next and args:
            member.corrupt_next.discard(method)
            tid, data = args
            mutated = bytearray(data)
            mutated[len(mutated) // 2] ^= 0x5A
            args = (tid, bytes(mutated))
        try:
            actions = getattr(member.client, method)(*args)
        except Exception as exc:  # a naive client's uncaught davey error: its task would die
            member.crashes.append(exc)
            return
        for action in actions:
            if isinstance(action, EpochChanged):
                member.epoch_events.append(action)
            else:
                member.outbox.append(action)

    def _deliver_to_server(self, member: Member) -> None:
        action = member.outbox.popleft()
        if isinstance(action, SendTransitionReady) and self.rng.random() < self.op23_drop_rate:
            return  # a slow client: the DS has to time the transition out
        if isinstance(action, SendInvalidCommitWelcome):
            member.op31_sent += 1
        self._route(to_delivery_service(self.ds, member.user_id, action, now=self.now))

    def step(self) -> bool:
        """Deliver one message (or fire a timeout). False when nothing is left to do."""
        ready = [(m, "in") for m in self.members.values() if m.inbox]
        ready += [(m, "out") for m in self.members.values() if m.outbox]
        deadline = self.ds.next_deadline()
        if not ready:
            if deadline is None:
                return False
            self.now = max(self.now, deadline)
            self._route(self.ds.poll(self.now))
            return True
        member, direction = self.rng.choice(ready)
        if direction == "in":
            self._deliver_to_client(member)
        else:
            self._deliver_to_server(member)
        self.now += self.rng.uniform(0, self.step_time)
        if deadline is not None and self.now >= deadline:
            self._route(self.ds.poll(self.now))
        return True

    def flush(self, hold: set[int] | None = None) -> None:
        """Deliver everything in a fixed order, leaving the inboxes of ``hold`` members untouched."""
        hold = hold or set()
        progress = True
        while progress:
            progress = False
            for member in list(self.members.values()):
                while member.user_id in self.members and member.outbox:
                    self._deliver_to_server(member)
                    progress = True
                if member.user_id not in hold and member.user_id in self.members and member.inbox:
                    self._deliver_to_client(member)
                    progress = True
        deadline = self.ds.next_deadline()
        if not hold and deadline is not None:
            self.now = max(self.now, deadline)
            self._route(self.ds.poll(self.now))
            self.flush()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            if not self.step():
                return

    def settle(self, max_steps: int = 20_000) -> int:
        for count in range(max_steps):
            if not self.step():
                return count
        raise AssertionError(f"no quiescence after {max_steps} steps: DS {self.ds.counters}")

    # ------------------------------------------------------------------ checks
    @staticmethod
    def recoveries_of(member: Member) -> int:
        return member.op31_sent

    def assert_converged(self) -> None:
        """Every member agrees on epoch and privacy code with the DS, and hears every other member."""
        ds = self.ds
        for member in self.members.values():
            assert not member.crashes, f"{member.user_id} ({member.kind}) crashed: {member.crashes!r}"
        for reason in MALFORMED_INPUT_REASONS:
            assert ds.counters[reason] == 0, f"DS dropped {reason}: {ds.counters}"
        assert not ds.open_transitions
        uids = sorted(self.members)
        if len(uids) < 2:
            assert not ds.established and ds.epoch == 0
            for member in self.members.values():
                assert not member.client.ready
            assert ds.pending_members == frozenset(uids)
            return
        assert ds.established
        assert ds.roster.keys() == set(uids), (ds.roster, uids)
        assert not ds.stale_leaves and ds.proposals_in_flight == 0
        codes = set()
        for member in self.members.values():
            client = member.client
            assert client.ready, f"{member.user_id} ({member.kind}) not ready; DS {ds.counters}"
            assert client.epoch == ds.epoch, (member.user_id, client.epoch, ds.epoch)
            assert client.own_leaf_index == ds.roster[member.user_id]
            assert client.member_ids == uids
            codes.add(client.privacy_code)
        assert len(codes) == 1 and None not in codes, codes
        self.assert_cross_decrypt()

    def assert_cross_decrypt(self) -> None:
        for sender in self.members.values():
            payload = b"opus-from-%d-" % sender.user_id + self.rng.randbytes(40)
            frame = sender.client.encrypt(payload)
            assert frame is not None and frame != payload
            for receiver in self.members.values():
                if receiver is not sender:
                    assert receiver.client.decrypt(sender.user_id, frame) == payload
