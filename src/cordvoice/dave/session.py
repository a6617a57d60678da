"""The client's DAVE state machine around ``davey.DaveSession`` (protocol.md §6.4), sans-IO.

The voice gateway connection feeds it the DAVE opcodes as plain values and sends the actions it returns;
the media path calls :attr:`DaveClient.encryptor` (the transmit lane) or :meth:`DaveClient.encrypt`, and
:meth:`DaveClient.decrypt`. Every davey call is contained: davey raises ``ValueError`` for everything, and
here a failure is counted, logged (never with key material) and answered the way protocol.md §6.4 asks, so
no task ever dies of it.

Decisions where the sources are silent:

* A failed op 27 is counted and dropped, with no op 31. There is no transition id to report yet, and the
  commit that needs the missing proposal will fail in op 29 and trigger the standard recovery with the
  right id; recovering eagerly from an ``UnexpectedUser`` rejection would only loop.
* An op 29 that reaches a session with no group of its own (``pending``: just recovered or reset) is
  stale, sent before the server saw our op 31, and is ignored rather than answered with a second op 31.
* davey switches the sending key as soon as a commit or Welcome is applied, not on op 22; peers that apply
  the commit later cannot decrypt those frames for a moment. :meth:`DaveClient.decrypt` reports them as
  :class:`~cordvoice.errors.DaveKeyPendingError` so the receive path can hold and retry them; on the sending
  side, frames encrypted in that window are counted (``DaveStats.encrypted_in_transition``).
* A member that stays without a usable group for ``stall_timeout`` seconds while other members are in the
  call recovers on its own (op 31 and a new key package, as after a failed commit), when the session calls
  :meth:`DaveClient.check_progress`. Without it a lost op 26 or op 31 (written into a socket that died just
  before a resume, which replays only what the *server* sent) or a stale op 24 leaves the server believing
  one thing and the client another, and the member is deaf and mute for the rest of the call.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeAlias

import davey

from cordvoice.dave.frames import OPUS_SILENCE, is_dave_frame
from cordvoice.errors import DaveDecryptError, DaveKeyPendingError

__all__ = [
    "DOWNGRADE_PASSTHROUGH_S",
    "STALL_TIMEOUT_S",
    "UPGRADE_PASSTHROUGH_S",
    "DaveAction",
    "DaveClient",
    "DaveStats",
    "EpochChanged",
    "SendCommitWelcome",
    "SendInvalidCommitWelcome",
    "SendKeyPackage",
    "SendTransitionReady",
]

logger = logging.getLogger(__name__)

UPGRADE_PASSTHROUGH_S = 10
"""After a call moves from version 0 to DAVE, plain frames from peers are accepted until the first group is
ready and for this long afterwards."""
STALL_TIMEOUT_S = 10.0
"""Seconds without a usable group, with other members present, before a member recovers on its own
(groups form within a second or two on Discord and in the emulator)."""
DOWNGRADE_PASSTHROUGH_S = 120
"""A prepared downgrade to version 0 accepts plain frames (discord.py's window; discord.js uses 24 s)."""

# davey's enums are unhashable and cannot be built from ints (dave-notes.md §1): pick them once.
_AUDIO = davey.MediaType.audio
_APPEND = davey.ProposalsOperationType.append
_REVOKE = davey.ProposalsOperationType.revoke
_ACTIVE = davey.SessionStatus.active
_PENDING = davey.SessionStatus.pending
_AWAITING_RESPONSE = davey.SessionStatus.awaiting_response
_LOG_EVERY = 1000
"""A run of failed encryptions is logged once per this many failures."""


# --------------------------------------------------------------------------------------------------
# Actions for the voice gateway connection


@dataclass(frozen=True, slots=True)
class SendKeyPackage:
    """Op 26: a fresh bare KeyPackage."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendCommitWelcome:
    """Op 28: the commit, followed by the Welcome when the commit adds members."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendTransitionReady:
    """Op 23 (JSON)."""

    transition_id: int


@dataclass(frozen=True, slots=True)
class SendInvalidCommitWelcome:
    """Op 31 (JSON): always followed by a :class:`SendKeyPackage` in the same action list."""

    transition_id: int


@dataclass(frozen=True, slots=True)
class EpochChanged:
    """Nothing to send: the group changed. ``epoch`` is None when the member has no usable group any
    more (reset, recovery, downgrade); the Session turns this into its ``dave_epoch`` event."""

    epoch: int | None
    privacy_code: str | None


DaveAction: TypeAlias = (
    SendKeyPackage | SendCommitWelcome | SendTransitionReady | SendInvalidCommitWelcome | EpochChanged
)


@dataclass(slots=True)
class DaveStats:
    """Counters for the session's ``stats``; ``failures`` and ``decrypt_failures`` are keyed by reason."""

    encrypted: int = 0
    """Frames :meth:`DaveClient.encrypt` encrypted. The transmit lane calls ``encryptor`` directly and counts
    its own (``TransmitStats.dave_encrypted``, which ``Session.stats`` reports)."""
    encrypted_in_transition: int = 0
    """Frames encrypted with a new epoch's key before the server executed its transition (op 22). davey
    switches the sending key when the commit or Welcome is applied, not on op 22 (protocol.md §6.4): a member
    that applies the commit later cannot decrypt these, so this bounds what listeners may have lost. Counted
    for the transmit lane's frames too."""
    encrypt_withheld: int = 0
    """Frames :meth:`DaveClient.encrypt` refused because DAVE is required and the group is not ready (the
    caller sends silence); the transmit lane counts its own ticks withheld (``dave_withheld``)."""
    encrypt_failures: int = 0
    decrypted: int = 0
    decrypt_failures: Counter[str] = field(default_factory=Counter)
    recoveries: int = 0
    stall_recoveries: int = 0
    """Recoveries started by :meth:`DaveClient.check_progress` (also counted in ``recoveries``)."""
    epoch_changes: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    """davey calls that raised, by call name, and inputs ignored, by reason."""
    last_error: str | None = None


# --------------------------------------------------------------------------------------------------


class DaveClient:
    """One member's DAVE state for one voice connection.

    Inputs are the ``on_*`` methods (one per opcode); each returns the actions to carry out, in order.
    Nothing raises out of them except programming errors. Version 0 means passthrough, except that DAVE
    frames still arriving after a downgrade are decrypted with the keys the session keeps.
    """

    # Slots: the transmit lane reads ``encryptor`` for every packet of every stream (see TransmitLane).
    __slots__ = (
        "_channel_id",
        "_external_sender",
        "_key_pair",
        "_last_opened",
        "_last_transition_id",
        "_pending_transitions",
        "_plain_peers_possible",
        "_protocol_version",
        "_ready",
        "_recognized",
        "_reported_epoch",
        "_session",
        "_stall_timeout",
        "_stalled_since",
        "_unexecuted_commits",
        "_user_id",
        "encryptor",
        "stats",
    )

    def __init__(
        self, *, key_pair: davey.SigningKeyPair | None = None, stall_timeout: float = STALL_TIMEOUT_S
    ) -> None:
        self._key_pair = key_pair
        self._session: davey.DaveSession | None = None
        self._protocol_version: int | None = None
        self._user_id = 0
        self._channel_id = 0
        self._external_sender: bytes | None = None
        self._recognized: set[int] = set()
        self._pending_transitions: dict[int, int | None] = {}
        """Transitions acknowledged and not yet executed: the protocol version an op 21 moves to, or None for
        a commit or welcome (ops 29/30), which keeps whatever version is current when it executes."""
        self._unexecuted_commits: set[int] = set()
        """Transition ids of commits and Welcomes applied whose op 22 has not come: davey already sends with
        the new key, which members that have not applied the commit yet cannot decrypt."""
        self._ready = False
        self._reported_epoch: int | None = None
        self._plain_peers_possible = False
        self.encryptor: Callable[[bytes], bytes] | None = None
        """Read-only: davey's ``encrypt_opus`` while the group is ready, else None (kept with readiness).

        The transmit lane reads it once per packet of every stream, instead of calling ``dave_required``,
        ``ready`` and :meth:`encrypt`; a ``ValueError`` from it goes to :meth:`encrypt_failed`.
        """
        self._stall_timeout = stall_timeout
        self._stalled_since: float | None = None
        self._last_transition_id = 0
        self._last_opened: tuple[bytes, int, bytes] | None = None
        """The last frame decrypted (the very object), its sender and its Opus: session.receiver and a
        receive hook both decrypt each packet, and davey refuses the second decryption as a replay."""
        self.stats = DaveStats()

    # ----------------------------------------------------------------------------------------------
    # State

    @property
    def protocol_version(self) -> int | None:
        """The DAVE version in force: None before op 4, 0 for transport-only calls."""
        return self._protocol_version

    @property
    def dave_required(self) -> bool:
        return bool(self._protocol_version)

    @property
    def ready(self) -> bool:
        """True when frames are end-to-end encrypted and decryptable (an established group)."""
        return self._ready

    @property
    def epoch(self) -> int | None:
        """The MLS epoch of the established group, or None without one."""
        if not self._ready or self._session is None:
            return None
        return self._session.epoch

    @property
    def own_leaf_index(self) -> int | None:
        if not self._ready or self._session is None:
            return None
        return self._session.own_leaf_index

    @property
    def privacy_code(self) -> str | None:
        """The 30-digit voice privacy code of the current epoch, identical for every member."""
        if not self._ready or self._session is None:
            return None
        return self._session.voice_privacy_code

    @property
    def member_ids(self) -> list[int]:
        """User ids in the group, as ints (davey returns strings)."""
        if not self._ready or self._session is None:
            return []
        try:
            return sorted(int(user_id) for user_id in self._session.get_user_ids())
        except ValueError as exc:
            self._failed("get_user_ids", exc)
            return []

    @property
    def recognized_users(self) -> frozenset[int]:
        return frozenset(self._recognized)

    @property
    def pending_transitions(self) -> dict[int, int | None]:
        return dict(self._pending_transitions)

    def verification_code(self, user_id: int) -> str | None:
        """The 45-digit pairwise verification code with ``user_id``, or None if it is not in the group."""
        if not self._ready or self._session is None:
            return None
        if user_id not in self.member_ids:  # an expected None, not a DAVE failure to warn about and count
            return None
        try:
            return self._session.get_verification_code(user_id)
        except ValueError as exc:
            self._failed("get_verification_code", exc)
            return None

    # ----------------------------------------------------------------------------------------------
    # Inputs from the voice gateway

    def on_session_description(
        self, protocol_version: int, user_id: int, channel_id: int
    ) -> list[DaveAction]:
        """Op 4: create (or re-create) the MLS session and send a key package, or go passthrough."""
        out: list[DaveAction] = []
        self._user_id = user_id
        self._channel_id = channel_id
        self._pending_transitions.clear()
        self._unexecuted_commits.clear()
        if protocol_version <= 0:
            self._protocol_version = 0
            self._plain_peers_possible = True
            if self._session is not None:
                self._call("reset", self._session.reset)
                self._call("set_passthrough_mode", self._session.set_passthrough_mode, True)
            self._update_ready(out)
            return out
        self._protocol_version = protocol_version
        self._plain_peers_possible = False  # the call is end-to-end encrypted already: no plain peers
        self._start_over(out)
        return out

    def on_external_sender(self, data: bytes) -> list[DaveAction]:
        """Op 25: remember it (it may come before op 4) and create the pending local group."""
        self._external_sender = bytes(data)
        out: list[DaveAction] = []
        session = self._session
        if session is None or not self.dave_required:
            return out
        if session.status in (_ACTIVE, _AWAITING_RESPONSE):
            self._ignored("external_sender_in_group")
            return out
        self._call("set_external_sender", session.set_external_sender, self._external_sender)
        return out

    def on_proposals(self, op_type: int, proposals: bytes) -> list[DaveAction]:
        """Op 27: queue or revoke proposals and commit to everything queued (op 28)."""
        out: list[DaveAction] = []
        session = self._session
        if session is None or not self.dave_required:
            self._ignored("proposals_without_session")
            return out
        if op_type == 0:
            operation = _APPEND
        elif op_type == 1:
            operation = _REVOKE
        else:
            self._ignored("proposals_bad_op_type")
            return out
        expected = sorted(self._recognized | {self._user_id})
        try:
            result = session.process_proposals(operation, proposals, expected)
        except ValueError as exc:
            self._failed("process_proposals", exc)
            return out
        if result is not None:
            welcome = result.welcome or b""
            out.append(SendCommitWelcome(result.commit + welcome))
        return out

    def on_announce_commit(self, transition_id: int, commit: bytes) -> list[DaveAction]:
        """Op 29: apply the winning commit; op 23 on success, op 31 and a new key package on failure."""
        self._last_transition_id = transition_id or self._last_transition_id
        out: list[DaveAction] = []
        session = self._session
        if session is None or not self.dave_required:
            self._ignored("commit_without_session")
            return out
        if session.status == _PENDING:
            # We have no group: this commit was sent before the server saw our op 31 (or reset).
            self._ignored("commit_while_pending")
            return out
        try:
            session.process_commit(commit)
        except ValueError as exc:
            self._failed("process_commit", exc)
            self._recover(transition_id, out)
            return out
        self._joined_transition(transition_id, out)
        return out

    def on_welcome(self, transition_id: int, welcome: bytes) -> list[DaveAction]:
        """Op 30: join the group; op 23 on success, op 31 and a new key package on failure."""
        self._last_transition_id = transition_id or self._last_transition_id
        out: list[DaveAction] = []
        session = self._session
        if session is None or not self.dave_required:
            self._ignored("welcome_without_session")
            return out
        try:
            session.process_welcome(welcome)
        except ValueError as exc:
            self._failed("process_welcome", exc)
            self._recover(transition_id, out)
            return out
        self._joined_transition(transition_id, out)
        return out

    def on_prepare_transition(self, transition_id: int, protocol_version: int) -> list[DaveAction]:
        """Op 21: remember the transition; id 0 executes at once, others are acknowledged (op 23)."""
        self._last_transition_id = transition_id or self._last_transition_id
        out: list[DaveAction] = []
        self._pending_transitions[transition_id] = protocol_version
        if transition_id == 0:
            self._execute(transition_id, out)
            return out
        if protocol_version == 0 and self._session is not None:
            # Downgrade: peers will soon send plain frames.
            self._call(
                "set_passthrough_mode",
                self._session.set_passthrough_mode,
                True,
                DOWNGRADE_PASSTHROUGH_S,
            )
        out.append(SendTransitionReady(transition_id))
        return out

    def on_execute_transition(self, transition_id: int) -> list[DaveAction]:
        """Op 22."""
        out: list[DaveAction] = []
        if transition_id not in self._pending_transitions:
            self._ignored("execute_unknown_transition")
            return out
        self._execute(transition_id, out)
        return out

    def on_prepare_epoch(self, epoch: int, protocol_version: int) -> list[DaveAction]:
        """Op 24: epoch 1 announces a new group (reset and send a new key package)."""
        out: list[DaveAction] = []
        if epoch != 1:
            return out  # a version change of the existing group: nothing to do until op 21/22
        if protocol_version <= 0:
            self._ignored("prepare_epoch_version_0")
            return out
        if not self._protocol_version:
            self._plain_peers_possible = True  # upgrade from a transport-only call
        self._protocol_version = protocol_version
        self._start_over(out)
        return out

    def check_progress(self, now: float) -> list[DaveAction]:
        """Time passing (``now`` in seconds, any monotonic origin): recover from a group that never forms.

        Call it every few seconds. When DAVE is required, other members are in the call and we have had
        no usable group for ``stall_timeout`` seconds, it answers op 31 (with the last transition id seen)
        and a fresh key package, so the server removes whatever it thinks we hold and adds us again.
        """
        if self._ready or not self.dave_required or not (self._recognized - {self._user_id}):
            self._stalled_since = None
            return []
        if self._stalled_since is None:
            self._stalled_since = now
            return []
        if now - self._stalled_since < self._stall_timeout:
            return []
        self._stalled_since = now
        self.stats.stall_recoveries += 1
        logger.warning(
            "DAVE group not ready for %.0f s with other members in the call; recovering", self._stall_timeout
        )
        out: list[DaveAction] = []
        self._recover(self._last_transition_id, out)
        return out

    def on_clients_connect(self, user_ids: Iterable[int]) -> list[DaveAction]:
        """Op 11: these users may be added to the group."""
        self._recognized.update(int(user_id) for user_id in user_ids)
        return []

    def on_client_disconnect(self, user_id: int) -> list[DaveAction]:
        """Op 13: stop accepting Adds for this user."""
        self._recognized.discard(int(user_id))
        return []

    # ----------------------------------------------------------------------------------------------
    # Media

    def encrypt(self, opus: bytes) -> bytes | None:
        """The frame to send for one Opus packet, or None when it must not be sent.

        Silence always passes unencrypted. When DAVE is required and the group is not ready, other frames
        return None: the caller sends silence instead, so no Opus leaves before the group exists.
        """
        if opus == OPUS_SILENCE or not self._protocol_version:
            return opus
        encrypt = self.encryptor
        if encrypt is None:
            self.stats.encrypt_withheld += 1
            return None
        try:
            frame = encrypt(opus)
        except ValueError as exc:
            self.encrypt_failed(exc)
            return None
        self.stats.encrypted += 1
        return frame

    def encrypt_failed(self, exc: ValueError) -> None:
        """Count a failed ``encrypt_opus``; logged on the first failure and then every
        :data:`_LOG_EVERY` failures, so a stuck encryptor cannot flood the log."""
        stats = self.stats
        stats.encrypt_failures += 1
        stats.last_error = f"encrypt_opus: {exc}"
        if stats.encrypt_failures % _LOG_EVERY == 1:
            logger.warning("DAVE encrypt_opus failed (%d failures so far): %s", stats.encrypt_failures, exc)

    def decrypt(self, user_id: int, frame: bytes) -> bytes:
        """The Opus packet inside ``frame`` from ``user_id``.

        Raises :class:`~cordvoice.errors.DaveKeyPendingError` (retryable: hold the frame and try again
        after the next :class:`EpochChanged`) or :class:`~cordvoice.errors.DaveDecryptError` (drop it).
        The frame just decrypted, passed again (a receive hook after ``session.receiver``), gives its Opus.
        """
        if frame == OPUS_SILENCE:
            return frame
        last = self._last_opened
        if last is not None and last[0] is frame and last[1] == user_id:
            # The same packet again (not a replay from the network, which is a new object): its Opus.
            return last[2]
        session = self._session
        if not self._protocol_version:
            # Transport-only. A DAVE frame here comes from a peer that has not executed the downgrade yet;
            # the session still holds its keys (protocol.md §6.4), and ciphertext must never pass as Opus.
            if session is None or not is_dave_frame(frame):
                return frame
            return self._decrypt_after_downgrade(session, user_id, frame)
        if not self._ready or session is None:
            if is_dave_frame(frame):
                raise self._decrypt_failure("not_ready", retryable=True)
            if self._plain_peers_possible:
                return frame  # upgrade from version 0: peers send plain Opus until the group exists
            raise self._decrypt_failure("unencrypted", retryable=False)
        try:
            plain = session.decrypt(user_id, _AUDIO, frame)
        except ValueError as exc:
            message = str(exc)
            if "NoDecryptorForUser" in message:
                raise self._decrypt_failure("unknown_sender", retryable=True) from None
            if "UnencryptedWhenPassthroughDisabled" in message:
                raise self._decrypt_failure("unencrypted", retryable=False) from None
            if "NoValidCryptorFound" in message and is_dave_frame(frame):
                raise self._decrypt_failure("no_key", retryable=True) from None
            raise self._decrypt_failure("failed", retryable=False) from None
        self.stats.decrypted += 1
        self._last_opened = (frame, user_id, plain)
        return plain

    def _decrypt_after_downgrade(self, session: davey.DaveSession, user_id: int, frame: bytes) -> bytes:
        # Not retryable: no later epoch will bring a key for a version-0 call.
        try:
            plain = session.decrypt(user_id, _AUDIO, frame)
        except ValueError:
            raise self._decrypt_failure("failed", retryable=False) from None
        self.stats.decrypted += 1
        self._last_opened = (frame, user_id, plain)
        return plain

    def _decrypt_failure(self, reason: str, *, retryable: bool) -> DaveDecryptError:
        self.stats.decrypt_failures[reason] += 1
        if retryable:
            return DaveKeyPendingError(f"DAVE frame not decryptable yet ({reason})", reason=reason)
        return DaveDecryptError(f"DAVE frame not decryptable ({reason})", reason=reason)

    # ----------------------------------------------------------------------------------------------
    # Internals

    def _start_over(self, out: list[DaveAction]) -> None:
        """A fresh local MLS state for the current version, then a new key package (op 26)."""
        version = self._protocol_version or 0
        self._unexecuted_commits.clear()  # they belong to the group being left
        session = self._session
        if session is not None and not self._call(
            "reinit", session.reinit, version, self._user_id, self._channel_id, self._key_pair
        ):
            session = None
        if session is None:
            try:
                session = davey.DaveSession(version, self._user_id, self._channel_id, self._key_pair)
            except ValueError as exc:
                self._failed("DaveSession", exc)
                self._session = None
                self._update_ready(out)
                return
            self._session = session
            if self._external_sender is not None:
                self._call("set_external_sender", session.set_external_sender, self._external_sender)
        self._update_ready(out)
        try:
            key_package = session.get_serialized_key_package()
        except ValueError as exc:
            self._failed("get_serialized_key_package", exc)
            return
        out.append(SendKeyPackage(key_package))

    def _recover(self, transition_id: int, out: list[DaveAction]) -> None:
        """protocol.md §6.4 recovery: op 31, reset, new key package; the server removes and re-adds us."""
        self.stats.recoveries += 1
        logger.info("DAVE recovery after transition %d: sending op 31 and a new key package", transition_id)
        out.append(SendInvalidCommitWelcome(transition_id))
        self._start_over(out)

    def _joined_transition(self, transition_id: int, out: list[DaveAction]) -> None:
        if transition_id != 0:
            self._pending_transitions[transition_id] = None
            self._unexecuted_commits.add(transition_id)
        self._update_ready(out)
        if self._plain_peers_possible and self._ready and self._session is not None:
            # First group after a transport-only phase: keep accepting plain frames for a while.
            self._plain_peers_possible = False
            self._call("set_passthrough_mode", self._session.set_passthrough_mode, True)
            self._call(
                "set_passthrough_mode",
                self._session.set_passthrough_mode,
                False,
                UPGRADE_PASSTHROUGH_S,
            )
        if transition_id != 0:
            out.append(SendTransitionReady(transition_id))

    def _execute(self, transition_id: int, out: list[DaveAction]) -> None:
        self._unexecuted_commits.discard(transition_id)
        version = self._pending_transitions.pop(transition_id, None)
        if version is None:  # a commit or welcome: a downgrade executed meanwhile must not be undone
            version = self._protocol_version or 0
        previous = self._protocol_version
        self._protocol_version = version
        if version == 0 and previous:
            logger.debug("DAVE downgraded to transport-only encryption")
            self._plain_peers_possible = True
        self._update_ready(out)

    def _update_ready(self, out: list[DaveAction]) -> None:
        """Recompute readiness (davey's own ``ready`` stays True after ``reset()``) and report epochs.

        An established group (epoch >= 1) stays usable while our own commit awaits the server's answer
        (``awaiting_response``): davey keeps encrypting and decrypting with the current epoch meanwhile.
        A pending local group (epoch 0) is never ready, whatever davey's stale ``ready`` says.
        """
        session = self._session
        self._ready = bool(
            self._protocol_version
            and session is not None
            and session.status in (_ACTIVE, _AWAITING_RESPONSE)
            and session.ready
            and (session.epoch or 0) >= 1
        )
        encryptor: Callable[[bytes], bytes] | None = None
        if self._ready and session is not None:
            encryptor = session.encrypt_opus
            if self._unexecuted_commits:
                encryptor = self._counting_in_transition(encryptor)
        self.encryptor = encryptor
        epoch = session.epoch if self._ready and session is not None else None
        if epoch != self._reported_epoch:
            self._reported_epoch = epoch
            self.stats.epoch_changes += 1
            out.append(EpochChanged(epoch, self.privacy_code))

    def _counting_in_transition(self, encrypt: Callable[[bytes], bytes]) -> Callable[[bytes], bytes]:
        """``encrypt`` that counts its frames in ``encrypted_in_transition`` (only used until op 22, so the
        common path keeps calling davey directly)."""
        stats = self.stats

        def encrypt_in_transition(opus: bytes) -> bytes:
            frame = encrypt(opus)
            stats.encrypted_in_transition += 1
            return frame

        return encrypt_in_transition

    def _call(self, name: str, method: Callable[..., object], *args: object) -> bool:
        """Run a davey call whose only failure mode is a ValueError; count it instead of raising."""
        try:
            method(*args)
        except ValueError as exc:
            self._failed(name, exc)
            return False
        return True

    def _failed(self, name: str, exc: Exception) -> None:
        # davey's messages name the Rust error variant only; they carry no key material.
        self.stats.failures[name] += 1
        self.stats.last_error = f"{name}: {exc}"
        logger.warning("DAVE %s failed: %s", name, exc)

    def _ignored(self, reason: str) -> None:
        self.stats.failures[reason] += 1
        logger.debug("DAVE input ignored: %s", reason)
