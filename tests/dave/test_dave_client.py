"""DaveClient: containment, readiness, media classification and transitions, with real davey."""

from __future__ import annotations

import logging

import davey
import pytest

from cordvoice.bench.dave_group import DaveGroup, client_call
from cordvoice.dave import (
    OPUS_SILENCE,
    DaveClient,
    EpochChanged,
    SendCommitWelcome,
    SendInvalidCommitWelcome,
    SendKeyPackage,
    SendTransitionReady,
    is_dave_frame,
)
from cordvoice.emulator import mls
from cordvoice.emulator.dave_ds import SendAnnounceCommit
from cordvoice.errors import DaveDecryptError, DaveKeyPendingError

from .dave_harness import CHANNEL_ID, Harness

OPUS = b"\x78" + bytes(range(60))


def _group(*user_ids: int, seed: int = 0) -> Harness:
    h = Harness(seed, op23_drop_rate=0.0)
    for uid in user_ids:
        h.join(uid)
    h.flush()
    h.assert_converged()
    return h


def test_lifecycle_events_and_codes() -> None:
    h = _group(1, 2)
    a, b = h.members[1].client, h.members[2].client
    assert isinstance(a, DaveClient)
    assert a.ready and a.epoch == 1 and a.member_ids == [1, 2]
    assert a.encryptor is not None and is_dave_frame(a.encryptor(OPUS))
    assert b.decrypt(1, a.encryptor(OPUS)) == OPUS
    assert [e.epoch for e in h.members[1].epoch_events] == [1]
    assert h.members[1].epoch_events[0].privacy_code == a.privacy_code
    assert a.privacy_code is not None and len(a.privacy_code) == 30
    code = a.verification_code(2)
    assert code is not None and len(code) == 45 and code == b.verification_code(1)
    assert a.verification_code(99) is None
    assert a.stats.recoveries == 0 and a.stats.epoch_changes == 1
    h.join(3)
    h.flush()
    h.assert_converged()
    assert [e.epoch for e in h.members[1].epoch_events] == [1, 2]
    assert a.pending_transitions == {}


def test_a_code_for_someone_outside_the_group_is_none_not_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    """Documented as None; it also logged a WARNING and counted a DAVE failure (davey's UserNotInGroup)."""
    a = _group(1, 2).members[1].client
    with caplog.at_level(logging.DEBUG, logger="cordvoice.dave"):
        assert a.verification_code(99) is None
    assert not a.stats.failures and a.stats.last_error is None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_no_opus_before_the_group_is_ready() -> None:
    client = DaveClient()
    assert client.encrypt(OPUS) == OPUS  # before op 4 nothing is known: transport only
    actions = client.on_session_description(1, 5, CHANNEL_ID)
    assert [type(x) for x in actions] == [SendKeyPackage]
    assert client.dave_required and not client.ready and client.encryptor is None
    assert client.encrypt(OPUS) is None
    assert client.encrypt(OPUS_SILENCE) == OPUS_SILENCE
    assert client.stats.encrypt_withheld == 1
    with pytest.raises(DaveDecryptError) as plain:
        client.decrypt(6, OPUS)
    assert not plain.value.retryable and plain.value.reason == "unencrypted"
    assert client.decrypt(6, OPUS_SILENCE) == OPUS_SILENCE


def test_version_zero_is_passthrough_everywhere() -> None:
    client = DaveClient()
    assert client.on_session_description(0, 5, CHANNEL_ID) == []
    assert client.encrypt(OPUS) == OPUS
    assert client.decrypt(6, OPUS) == OPUS
    assert client.on_proposals(0, b"\x00") == []
    assert client.stats.failures["proposals_without_session"] == 1


def test_frames_before_their_key_are_retryable() -> None:
    h = _group(1, 2)
    h.join(3)
    # Member 2 does not read its inbox: it misses the commit that adds 3 (epoch 2).
    h.flush(hold={2})
    a, b, c = (h.members[uid].client for uid in (1, 2, 3))
    assert a.epoch == 2 and b.epoch == 1 and c.epoch == 2
    frame_a = a.encrypt(OPUS)
    frame_c = c.encrypt(OPUS)
    assert frame_a is not None and frame_c is not None and is_dave_frame(frame_a)
    with pytest.raises(DaveKeyPendingError) as no_key:
        b.decrypt(1, frame_a)
    assert no_key.value.retryable and no_key.value.reason == "no_key"
    with pytest.raises(DaveKeyPendingError) as unknown:
        b.decrypt(3, frame_c)
    assert unknown.value.reason == "unknown_sender"
    h.flush()
    assert b.epoch == 2
    assert b.decrypt(1, frame_a) == OPUS  # the held frame decrypts after the commit
    assert b.decrypt(3, frame_c) == OPUS
    assert b.stats.decrypt_failures == {"no_key": 1, "unknown_sender": 1}
    # A frame from the previous epoch still decrypts for a while (davey keeps old keys).
    h.assert_converged()


def test_garbage_and_plain_frames_are_not_retryable() -> None:
    h = _group(1, 2)
    a = h.members[1].client
    for junk in (OPUS, b"x" * 20 + b"\x0b\xfa\xfa"):
        with pytest.raises(DaveDecryptError) as err:
            a.decrypt(2, junk)
        assert not isinstance(err.value, DaveKeyPendingError) and err.value.reason == "unencrypted"
    frame = h.members[2].client.encrypt(OPUS)
    assert a.decrypt(2, frame) == OPUS
    assert a.decrypt(2, frame) == OPUS  # the same packet again (a receive hook beside the receiver)
    with pytest.raises(DaveKeyPendingError):  # a replay (a new packet) looks like "no key" to davey
        a.decrypt(2, bytes(bytearray(frame)))
    tampered = bytearray(h.members[2].client.encrypt(OPUS))
    tampered[0] ^= 1
    with pytest.raises(DaveKeyPendingError):
        a.decrypt(2, bytes(tampered))


def test_every_davey_failure_is_contained(caplog: pytest.LogCaptureFixture) -> None:
    h = _group(1, 2)
    a = h.members[1].client
    caplog.set_level(logging.WARNING, logger="cordvoice.dave.session")
    assert a.on_proposals(0, b"\x05junk") == []
    assert a.on_proposals(7, b"\x00") == []
    assert a.on_external_sender(b"\x00") == []  # in a group: ignored, counted
    assert a.stats.failures["process_proposals"] == 1
    assert a.stats.failures["proposals_bad_op_type"] == 1
    assert a.stats.failures["external_sender_in_group"] == 1
    assert a.ready  # none of that touched the group
    actions = a.on_announce_commit(9, b"\x00\x01\x00\x01garbage")
    assert [type(x) for x in actions] == [SendInvalidCommitWelcome, EpochChanged, SendKeyPackage]
    assert actions[0] == SendInvalidCommitWelcome(9) and actions[1] == EpochChanged(None, None)
    assert not a.ready and a.stats.recoveries == 1
    assert a.encryptor is None, "the transmit lane's hot path follows readiness"
    # The key package is fresh and valid for the DS.
    key_package = actions[2]
    assert isinstance(key_package, SendKeyPackage)
    assert mls.parse_key_package(key_package.data).user_id == 1
    # A stale op 29 reaching the recovered (pending) session is ignored, not a second op 31.
    assert a.on_announce_commit(10, b"\x00") == []
    assert a.stats.failures["commit_while_pending"] == 1
    actions = a.on_welcome(11, b"\x00\x02garbage")
    assert [type(x) for x in actions] == [SendInvalidCommitWelcome, SendKeyPackage]
    assert a.stats.recoveries == 2
    assert "process_commit" in caplog.text and "process_welcome" in caplog.text
    assert a.stats.last_error is not None and "process_welcome" in a.stats.last_error


def test_unrecognised_users_are_not_committed() -> None:
    signer = mls.ExternalSenderKey()
    client = DaveClient()
    client.on_session_description(1, 1, CHANNEL_ID)
    client.on_external_sender(signer.external_sender())
    stranger = davey.DaveSession(1, 2, CHANNEL_ID)
    stranger.set_external_sender(signer.external_sender())
    add = mls.build_add_proposal(
        signer, mls.group_id_for_channel(CHANNEL_ID), 0, stranger.get_serialized_key_package()
    )
    vector = mls.encode_append_proposals([add.message])
    assert client.on_proposals(0, vector) == []
    assert client.stats.failures["process_proposals"] == 1
    assert "UnexpectedUser" in (client.stats.last_error or "")
    client.on_clients_connect([2])
    [commit] = client.on_proposals(0, vector)
    assert isinstance(commit, SendCommitWelcome)
    parsed = mls.parse_commit_welcome(commit.data)
    assert parsed.welcome is not None and parsed.proposal_refs == (add.ref,)
    client.on_client_disconnect(2)
    assert client.recognized_users == frozenset()


def test_failed_encryptions_are_counted_and_logged_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    client = DaveClient()
    caplog.set_level(logging.WARNING, logger="cordvoice.dave.session")
    for _ in range(1001):
        client.encrypt_failed(ValueError("EncryptionFailure"))
    assert client.stats.encrypt_failures == 1001
    assert client.stats.last_error == "encrypt_opus: EncryptionFailure"
    assert caplog.text.count("DAVE encrypt_opus failed") == 2  # the first, then the 1,001st


def test_downgrade_and_upgrade_windows() -> None:
    h = _group(1, 2)
    a = h.members[1].client
    assert a.on_prepare_transition(40, 0) == [SendTransitionReady(40)]
    assert a._session is not None and a._session.can_passthrough(2)
    assert a.decrypt(2, OPUS) == OPUS  # peers may already send plain frames
    actions = a.on_execute_transition(40)
    assert actions == [EpochChanged(None, None)]
    assert a.protocol_version == 0 and a.encrypt(OPUS) == OPUS and a.encryptor is None
    assert a.on_execute_transition(40) == [] and a.stats.failures["execute_unknown_transition"] == 1
    # Upgrade back: op 24 epoch 1 starts a new group with a new key package.
    actions = a.on_prepare_epoch(1, 1)
    assert [type(x) for x in actions] == [SendKeyPackage]
    assert a.dave_required and a.encrypt(OPUS) is None
    assert a.on_prepare_epoch(5, 1) == []  # a later epoch: nothing to do


def test_upgrade_from_transport_only_accepts_plain_frames_for_a_while() -> None:
    h = Harness(3, op23_drop_rate=0.0)
    for uid in (1, 2):
        member = h.join(uid)
        member.inbox.clear()  # replace the version-1 session description with version 0
        member.inbox.append(("on_session_description", (0, uid, CHANNEL_ID)))
        member.inbox.append(("on_prepare_epoch", (1, 1)))
    h.ds.member_disconnected(1)
    h.ds.member_disconnected(2)
    for uid in (1, 2):
        h._route(h.ds.member_connected(uid))
    h.flush()
    h.assert_converged()
    a = h.members[1].client
    assert a._session is not None and a._session.can_passthrough(2)
    assert a.decrypt(2, OPUS) == OPUS  # a peer still sending plain Opus right after the upgrade


def test_after_a_downgrade_late_dave_frames_are_decrypted_not_passed_on() -> None:
    """A peer that executes op 22 a moment after us still sends DAVE frames: decrypt them with the old keys
    (protocol.md §6.4), and drop, never hand on as Opus, those that do not decrypt."""
    h = _group(1, 2)
    a, b = h.members[1].client, h.members[2].client
    for client in (a, b):
        client.on_prepare_transition(40, 0)
    a.on_execute_transition(40)  # we switch first; b still encrypts
    decrypted = a.stats.decrypted
    late = b.encrypt(OPUS)
    tampered = bytearray(b.encrypt(OPUS) or b"")
    tampered[0] ^= 1
    assert late is not None and is_dave_frame(late) and is_dave_frame(bytes(tampered))
    assert a.protocol_version == 0 and a.decrypt(2, late) == OPUS
    for bad in (bytes(bytearray(late)), bytes(tampered)):  # a replay (a new packet, same bytes), a forgery
        with pytest.raises(DaveDecryptError) as err:
            a.decrypt(2, bad)
        assert not err.value.retryable and err.value.reason == "failed"
    b.on_execute_transition(40)
    assert b.encrypt(OPUS) == OPUS and a.decrypt(2, OPUS) == OPUS  # plain frames pass as before
    assert a.stats.decrypted == decrypted + 1 and a.stats.decrypt_failures == {"failed": 2}


def test_version_zero_after_a_session_drops_dave_frames_it_cannot_decrypt() -> None:
    """Op 4 with version 0 resets the session: a DAVE frame then has no key and is dropped and counted.
    A client that never had a session passes every frame, since it cannot tell such a frame from Opus."""
    frame = _group(1, 2).members[2].client.encrypt(OPUS)
    assert frame is not None and is_dave_frame(frame)
    client = DaveClient()
    client.on_session_description(1, 5, CHANNEL_ID)
    client.on_session_description(0, 5, CHANNEL_ID)
    with pytest.raises(DaveDecryptError) as err:
        client.decrypt(2, frame)
    assert not err.value.retryable and client.stats.decrypt_failures == {"failed": 1}
    assert client.decrypt(2, OPUS) == OPUS
    never = DaveClient()
    never.on_session_description(0, 5, CHANNEL_ID)
    assert never.decrypt(2, frame) == frame


def test_upgrade_passes_plain_frames_before_the_group_is_ready() -> None:
    """Op 24 (epoch 1) from version 0: peers send plain Opus until the new group exists (protocol.md §6.7
    passthrough in a transition window). DAVE frames wait for the key, counted."""
    frame = _group(1, 2).members[2].client.encrypt(OPUS)
    assert frame is not None
    client = DaveClient()
    client.on_session_description(0, 5, CHANNEL_ID)
    client.on_prepare_epoch(1, 1)
    assert client.dave_required and not client.ready
    assert client.decrypt(6, OPUS) == OPUS
    with pytest.raises(DaveKeyPendingError) as held:
        client.decrypt(2, frame)
    assert held.value.reason == "not_ready"
    # A later op 4 at version 1 is an end-to-end encrypted call from the start: plain frames are refused.
    client.on_session_description(1, 5, CHANNEL_ID)
    with pytest.raises(DaveDecryptError) as plain:
        client.decrypt(6, OPUS)
    assert not plain.value.retryable and plain.value.reason == "unencrypted"
    assert client.stats.decrypt_failures == {"not_ready": 1, "unencrypted": 1}


def test_transition_zero_executes_at_once() -> None:
    client = DaveClient()
    client.on_session_description(1, 1, CHANNEL_ID)
    assert client.on_prepare_transition(0, 1) == []
    assert client.pending_transitions == {}


def test_a_pending_own_commit_keeps_the_established_group_usable() -> None:
    """While our commit awaits the server's answer, the current epoch still encrypts and decrypts."""
    h = _group(1, 2)
    a, b = h.members[1].client, h.members[2].client
    joiner, first = h.join(3), h.members[1]
    while joiner.inbox or joiner.outbox:  # its key package reaches the DS, which proposes the Add
        if joiner.inbox:
            h._deliver_to_client(joiner)
        else:
            h._deliver_to_server(joiner)
    while not first.outbox:  # member 1 commits to the Add and now awaits op 29
        h._deliver_to_client(first)
    assert a._session is not None and a._session.status == davey.SessionStatus.awaiting_response
    a.on_prepare_transition(77, 1)  # an earlier transition executes (op 21 then op 22) meanwhile
    a.on_execute_transition(77)
    assert a.ready and a.epoch == 1
    frame = a.encrypt(OPUS)
    assert frame is not None and frame != OPUS
    assert b.decrypt(1, frame) == OPUS


def test_a_commit_executed_after_a_downgrade_keeps_version_zero() -> None:
    # Group {1, 2, 3}. The server prepares a downgrade (op 21, version 0); before it executes, member 3
    # leaves and the Remove commit (op 29) reaches member 1. The downgrade executes first, then the commit.
    # A commit asks for no version change, so it must not bring DAVE back.
    group = DaveGroup()
    for user_id in (1, 2, 3):
        group.join(user_id)
    group.settle()
    client = group.clients[1]
    group.hold(1)
    group.leave(3)
    group.settle()
    assert client.on_prepare_transition(50, 0) == [SendTransitionReady(50)]
    commit_transition = None
    inbox = group._inbox[1]
    while inbox:
        kind, payload = inbox.popleft()
        if kind == "ds":
            method, args = client_call(payload)
            getattr(client, method)(*args)
            if isinstance(payload, SendAnnounceCommit):
                commit_transition = payload.transition_id
    assert commit_transition is not None
    assert client.pending_transitions == {50: 0, commit_transition: None}
    client.on_execute_transition(50)
    client.on_execute_transition(commit_transition)
    assert client.protocol_version == 0 and client.encryptor is None
    frame = b"\x78" + bytes(40)
    assert client.encrypt(frame) == frame
