"""The delivery service rule by rule (protocol.md §6.5, §6.9; dave-notes.md §3), driven by hand."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import davey
import pytest

from cordvoice.emulator import mls
from cordvoice.emulator.dave_ds import (
    MALFORMED_INPUT_REASONS,
    PROPOSALS_APPEND,
    PROPOSALS_REVOKE,
    DaveDeliveryService,
    SendAnnounceCommit,
    SendExecuteTransition,
    SendExternalSender,
    SendPrepareEpoch,
    SendPrepareTransition,
    SendProposals,
    SendWelcome,
)
from cordvoice.errors import InvalidArgumentError

CHANNEL = 555_000_111
APPEND = davey.ProposalsOperationType.append
REVOKE = davey.ProposalsOperationType.revoke


class Peer:
    """A bare davey session used to drive the DS by hand."""

    def __init__(self, ds: DaveDeliveryService, user_id: int) -> None:
        self.user_id = user_id
        self.session = davey.DaveSession(1, user_id, CHANNEL)
        [(uid, action)] = ds.member_connected(user_id)
        assert uid == user_id and isinstance(action, SendExternalSender)
        self.session.set_external_sender(action.data)
        self.last_commit: bytes | None = None

    def key_package(self) -> bytes:
        return self.session.get_serialized_key_package()

    def apply(self, action: object) -> bytes | None:
        """Process one DS action; return op 28 bytes if davey committed."""
        if isinstance(action, SendProposals):
            op = APPEND if action.op_type == PROPOSALS_APPEND else REVOKE
            cw = self.session.process_proposals(op, action.proposals)
            self.last_commit = None if cw is None else cw.commit + (cw.welcome or b"")
            return self.last_commit
        if isinstance(action, SendAnnounceCommit):
            self.session.process_commit(action.commit)
        elif isinstance(action, SendWelcome):
            self.session.process_welcome(action.welcome)
        return None


def _for(out: Sequence[tuple[int, object]], user_id: int) -> list[Any]:
    return [action for uid, action in out if uid == user_id]


def _pair() -> tuple[DaveDeliveryService, Peer, Peer, int]:
    """Two members forming the initial group; returns the DS, both peers and the transition id."""
    ds = DaveDeliveryService(CHANNEL)
    a, b = Peer(ds, 1), Peer(ds, 2)
    assert ds.key_package_received(1, a.key_package()) == []  # nobody to send it to yet
    out = ds.key_package_received(2, b.key_package())
    # Each pending member gets the other's Add, never its own (§3 rule 2).
    [to_a] = _for(out, 1)
    [to_b] = _for(out, 2)
    assert isinstance(to_a, SendProposals) and isinstance(to_b, SendProposals)
    commit_a = a.apply(to_a)
    assert commit_a is not None and b.apply(to_b) is not None
    out = ds.commit_welcome_received(1, commit_a)
    announce = _for(out, 1)
    welcome = _for(out, 2)
    # Initial flow: op 29 only to the committer, op 30 to the joiner (never op 29 to a pending member).
    assert [type(x) for x in announce] == [SendAnnounceCommit]
    assert [type(x) for x in welcome] == [SendWelcome]
    a.apply(announce[0])
    b.apply(welcome[0])
    assert isinstance(announce[0], SendAnnounceCommit)
    return ds, a, b, announce[0].transition_id


def test_initial_group_and_transition() -> None:
    ds, a, b, tid = _pair()
    assert ds.established and ds.epoch == 1 and ds.roster == {1: 0, 2: 1}
    assert a.session.epoch == b.session.epoch == 1
    assert a.session.voice_privacy_code == b.session.voice_privacy_code
    assert ds.current_transition is not None and ds.current_transition.waiting == {1, 2}
    assert tid != 0
    assert ds.transition_ready(1, tid) == []
    out = ds.transition_ready(2, tid)
    assert sorted(out) == [(1, SendExecuteTransition(tid)), (2, SendExecuteTransition(tid))]
    assert ds.current_transition is None and ds.next_deadline() is None
    # The loser's commit (epoch 0) arrives late and is dropped as a lost race.
    assert b.last_commit is not None
    assert ds.commit_welcome_received(2, b.last_commit) == []
    assert ds.counters["commit_wrong_epoch"] == 1 and ds.counters["commits_accepted"] == 1


def test_transition_times_out_through_poll() -> None:
    ds, _, _, tid = _pair()
    ds.transition_ready(1, tid)
    deadline = ds.next_deadline()
    assert deadline is not None and deadline == pytest.approx(1.5)
    assert ds.poll(deadline - 0.01) == []
    out = ds.poll(deadline)
    assert sorted(out) == [(1, SendExecuteTransition(tid)), (2, SendExecuteTransition(tid))]
    assert ds.counters["transition_timeout"] == 1
    assert ds.transition_ready(2, tid) == [] and ds.counters["transition_ready_unknown"] == 1


def test_join_leave_and_never_remove_to_the_removed() -> None:
    ds, a, b, _ = _pair()
    c = Peer(ds, 3)
    out = ds.key_package_received(3, c.key_package())
    assert {uid for uid, _ in out} == {1, 2}  # Adds go to every group member, not to the joiner
    commit = a.apply(_for(out, 1)[0])
    b.apply(_for(out, 2)[0])
    assert commit is not None
    out = ds.commit_welcome_received(1, commit)
    assert {uid for uid, x in out if isinstance(x, SendAnnounceCommit)} == {1, 2}
    assert [uid for uid, x in out if isinstance(x, SendWelcome)] == [3]
    for uid, action in out:
        {1: a, 2: b, 3: c}[uid].apply(action)
    assert ds.roster == {1: 0, 2: 1, 3: 2} and c.session.own_leaf_index == 2
    # Member 2 leaves: the Remove goes to 1 and 3 only.
    out = ds.member_disconnected(2)
    assert {uid for uid, _ in out} == {1, 3}
    assert ds.stale_leaves == {1: 2}
    commit = c.apply(_for(out, 3)[0])
    a.apply(_for(out, 1)[0])
    assert commit is not None
    out = ds.commit_welcome_received(3, commit)
    assert sorted(uid for uid, _ in out) == [1, 3]
    for uid, action in out:
        {1: a, 3: c}[uid].apply(action)
    assert ds.epoch == 3 and ds.roster == {1: 0, 3: 2} and not ds.stale_leaves
    assert a.session.voice_privacy_code == c.session.voice_privacy_code


def test_sole_member_reset() -> None:
    ds, a, _, _ = _pair()
    out = ds.member_disconnected(2)
    assert out == [(1, SendPrepareEpoch(1, 1)), (1, SendPrepareTransition(1, 0))]
    assert not ds.established and ds.epoch == 0 and ds.roster == {}
    assert ds.pending_members == {1} and ds.counters["group_resets"] == 1
    # The survivor starts over; a newcomer forms a fresh group with it (flow A again).
    a.session.reinit(1, 1, CHANNEL)
    assert ds.key_package_received(1, a.key_package()) == []
    c = Peer(ds, 3)
    out = ds.key_package_received(3, c.key_package())
    assert {uid for uid, _ in out} == {1, 3}


def test_op31_removes_old_leaf_then_adds_new_key_package() -> None:
    ds, a, b, tid = _pair()
    out = ds.invalid_commit_welcome(2, tid)
    # With one live member left this is a reset, not a Remove to a one-member group.
    assert [type(x) for _, x in out] == [SendPrepareEpoch, SendPrepareTransition]
    # Three members: op 31 from one leads to Remove(old leaf), then Add(new key package).
    ds, a, b, _ = _pair()
    c = Peer(ds, 3)
    out = ds.key_package_received(3, c.key_package())
    commit = a.apply(_for(out, 1)[0])
    b.apply(_for(out, 2)[0])
    assert commit is not None
    out = ds.commit_welcome_received(1, commit)
    tid = next(x.transition_id for _, x in out if isinstance(x, SendAnnounceCommit))
    for uid, action in out:
        {1: a, 2: b, 3: c}[uid].apply(action)
    out = ds.invalid_commit_welcome(3, tid)
    assert {uid for uid, _ in out} == {1, 2} and ds.stale_leaves == {2: 3}
    ((kind, _, epoch),) = mls.split_proposal_messages(_for(out, 1)[0].proposals)
    assert kind == mls.PROPOSAL_REMOVE and epoch == 2
    for uid, action in out:
        {1: a, 2: b}[uid].apply(action)
    c.session.reinit(1, 3, CHANNEL)
    out = ds.key_package_received(3, c.key_package())
    commit = a.apply(_for(out, 1)[0])
    b.apply(_for(out, 2)[0])
    assert commit is not None
    parsed = mls.parse_commit_welcome(commit)
    assert len(parsed.proposal_refs) == 2 and parsed.has_path and parsed.welcome is not None
    out = ds.commit_welcome_received(1, commit)
    for uid, action in out:
        {1: a, 2: b, 3: c}[uid].apply(action)
    assert ds.roster == {1: 0, 2: 1, 3: 2} and c.session.epoch == ds.epoch == 3


def test_commit_checks_count_and_drop() -> None:
    ds, a, _, _ = _pair()
    c = Peer(ds, 3)
    out = ds.key_package_received(3, c.key_package())
    commit = a.apply(_for(out, 1)[0])
    assert commit is not None
    parsed = mls.parse_commit_welcome(commit)
    assert parsed.welcome is not None
    assert ds.commit_welcome_received(1, parsed.commit) == []  # Welcome missing
    assert ds.counters["commit_without_welcome"] == 1
    assert ds.commit_welcome_received(2, commit) == []  # not 2's leaf
    assert ds.counters["commit_wrong_sender_leaf"] == 1
    assert ds.commit_welcome_received(3, commit) == []  # a pending member cannot commit
    assert ds.counters["commit_from_non_member"] == 1
    assert ds.commit_welcome_received(1, b"\x00\x01garbage") == []
    assert ds.counters["commit_invalid"] == 1
    assert ds.commit_welcome_received(99, commit) == []
    assert ds.counters["commit_from_unknown_member"] == 1
    # A revoke makes the old commit stale: the ref set no longer matches.
    ds.member_disconnected(3)
    assert ds.commit_welcome_received(1, commit) == []
    assert ds.counters["commit_proposals_mismatch"] == 1
    assert ds.epoch == 1 and ds.counters["commits_accepted"] == 1


def test_a_commit_without_proposals_counts_as_malformed() -> None:
    """A commit must reference the epoch's proposals (protocol.md §6.9.5); one on its own (a self-update)
    is the client breaking DAVE's rules, never a lost race, so a clean run must not count it."""
    ds, _, _, _ = _pair()
    framed = (
        mls.vector(ds.group_id) + mls.u64(ds.epoch) + mls.u8(1) + mls.u32(0) + mls.vector(b"")
        + mls.u8(3) + mls.vector(b"") + mls.u8(0)  # commit: no proposals, no path
    )  # fmt: skip
    tags = mls.vector(b"\x30" * 8) + mls.vector(bytes(32)) + mls.vector(bytes(32))
    assert ds.commit_welcome_received(1, mls.u16(1) + mls.u16(1) + framed + tags) == []
    assert ds.counters["commit_without_proposals"] == 1
    assert "commit_without_proposals" in MALFORMED_INPUT_REASONS


def test_key_package_checks() -> None:
    ds, a, _, _ = _pair()
    impostor = davey.DaveSession(1, 77, CHANNEL)
    impostor.set_external_sender(ds.external_sender)
    Peer(ds, 4)
    assert ds.key_package_received(4, impostor.get_serialized_key_package()) == []
    assert ds.counters["key_package_wrong_identity"] == 1
    assert ds.key_package_received(4, b"\x00\x01\x00\x02junk") == []
    assert ds.counters["key_package_invalid"] == 1
    assert ds.key_package_received(1, a.key_package()) == []  # a group member must send op 31 first
    assert ds.counters["key_package_from_group_member"] == 1
    assert ds.key_package_received(5, a.key_package()) == []
    assert ds.counters["key_package_from_unknown_member"] == 1


def test_pending_joiner_departure_revokes_its_add() -> None:
    ds, a, b, _ = _pair()
    c = Peer(ds, 3)
    out = ds.key_package_received(3, c.key_package())
    for uid, action in out:
        {1: a, 2: b}[uid].apply(action)
    out = ds.member_disconnected(3)
    assert {uid for uid, _ in out} == {1, 2}
    for _, action in out:
        assert isinstance(action, SendProposals) and action.op_type == PROPOSALS_REVOKE
    assert a.apply(_for(out, 1)[0]) is None  # nothing left to commit
    assert ds.proposals_in_flight == 0


def test_welcome_is_cut_per_joiner() -> None:
    ds = DaveDeliveryService(CHANNEL)
    peers = [Peer(ds, uid) for uid in (1, 2, 3)]
    outs = [ds.key_package_received(p.user_id, p.key_package()) for p in peers]
    to_1 = [x for out in outs for x in _for(out, 1)]
    commit = None
    for action in to_1:
        commit = peers[0].apply(action)
    assert commit is not None
    out = ds.commit_welcome_received(1, commit)
    welcomes = {uid: x for uid, x in out if isinstance(x, SendWelcome)}
    assert set(welcomes) == {2, 3}
    for uid, welcome in welcomes.items():
        assert len(mls.parse_welcome(welcome.welcome).secrets) == 1
        peers[uid - 1].session.process_welcome(welcome.welcome)
    assert ds.roster == {1: 0, 2: 1, 3: 2}


def test_transition_ids_skip_zero_and_wrap() -> None:
    ds = DaveDeliveryService(CHANNEL)
    ds._last_transition_id = 0xFFFE
    assert [ds._allocate_transition_id() for _ in range(3)] == [0xFFFF, 1, 2]


def test_invalid_configuration() -> None:
    with pytest.raises(InvalidArgumentError):
        DaveDeliveryService(CHANNEL, protocol_version=0)
    with pytest.raises(InvalidArgumentError):
        DaveDeliveryService(CHANNEL, transition_timeout=0)


def test_unknown_inputs_are_counted() -> None:
    ds = DaveDeliveryService(CHANNEL)
    assert ds.member_disconnected(9) == []
    assert ds.invalid_commit_welcome(9, 1) == []
    assert ds.transition_ready(9, 1) == []
    assert ds.counters["disconnect_unknown_member"] == 1
    assert ds.counters["invalid_commit_welcome_unknown_member"] == 1
    # Connecting twice restarts the member.
    ds.member_connected(1)
    out = ds.member_connected(1)
    assert [type(x) for _, x in out] == [SendExternalSender] and ds.counters["connected_twice"] == 1


def test_adds_are_reproposed_so_davey_sends_a_welcome() -> None:
    """davey attaches a Welcome only if the op 27 it just processed has an Add (session.rs)."""
    ds, a, b, _ = _pair()
    c = Peer(ds, 3)
    out = ds.key_package_received(3, c.key_package())
    for uid, action in out:
        {1: a, 2: b}[uid].apply(action)
    d = Peer(ds, 4)
    out = ds.key_package_received(4, d.key_package())
    for uid, action in out:
        {1: a, 2: b}[uid].apply(action)
    # Without the DS's help this Remove-only batch would leave davey committing Add(c), Add(d) and
    # Remove with no Welcome. The DS revokes the Adds and proposes them again in the same batch.
    d.session.reinit(1, 4, CHANNEL)
    out = ds.invalid_commit_welcome(4, 0)  # d (pending) starts over: its Add is revoked
    kinds = [(uid, x.op_type) for uid, x in out if isinstance(x, SendProposals)]
    assert kinds == [
        (1, PROPOSALS_REVOKE),
        (2, PROPOSALS_REVOKE),
        (1, PROPOSALS_APPEND),
        (2, PROPOSALS_APPEND),
    ]
    assert ds.counters["adds_reproposed"] == 1
    for uid, action in out:
        {1: a, 2: b}[uid].apply(action)
    assert a.last_commit is not None
    parsed = mls.parse_commit_welcome(a.last_commit)
    assert parsed.welcome is not None and len(parsed.proposal_refs) == 1
    out = ds.commit_welcome_received(1, a.last_commit)
    assert [uid for uid, x in out if isinstance(x, SendWelcome)] == [3]
