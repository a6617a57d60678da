"""DAVE's delivery service for one voice call, sans-IO (protocol.md §6.5 and §6.9, dave-notes.md §3).

The voice gateway shell feeds it what members do (connect, send a key package, a commit, op 23, op 31,
disconnect) and the time; it answers with ``(user_id, action)`` pairs the shell turns into opcodes 21, 22,
24, 25, 27, 29 and 30. It never joins the MLS group: it signs external Add/Remove proposals, picks one
commit per epoch by structure alone, splits off its Welcome and routes both.

The state is kept as "what the group should become": after every input, :meth:`_reconcile` compares the
proposals in flight for the current epoch with the wanted ones (an Add for every connected member not in
the group, a Remove for every leaf whose holder left or asked for recovery) and sends the difference. That
one rule covers the initial group, joins, leaves, leftovers after a commit and op 31 recovery.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal, TypeAlias

from cordvoice.emulator import mls
from cordvoice.errors import InvalidArgumentError, ProtocolError

__all__ = [
    "DEFAULT_TRANSITION_TIMEOUT",
    "MALFORMED_INPUT_REASONS",
    "PROPOSALS_APPEND",
    "PROPOSALS_REVOKE",
    "DaveDeliveryService",
    "DsAction",
    "DsOutput",
    "SendAnnounceCommit",
    "SendExecuteTransition",
    "SendExternalSender",
    "SendPrepareEpoch",
    "SendPrepareTransition",
    "SendProposals",
    "SendWelcome",
    "TransitionInfo",
]

logger = logging.getLogger(__name__)

DEFAULT_TRANSITION_TIMEOUT = 1.5
"""Seconds to wait for every op 23 before sending op 22 anyway. Inferred: protocol.md §10.1 says the real
server waits about 1-2 s, which nobody has documented."""

MALFORMED_INPUT_REASONS = frozenset(
    {
        "key_package_invalid",
        "key_package_wrong_identity",
        "key_package_from_group_member",
        "commit_invalid",
        "commit_wrong_group",
        "commit_wrong_sender_leaf",
        "commit_without_proposals",
        "commit_without_welcome",
        "welcome_members_mismatch",
        "welcome_without_adds",
        "commit_remove_without_path",
        "commit_changes_credential",
        "commit_leaf_signature_invalid",
    }
)
"""Keys of :attr:`DaveDeliveryService.counters` that mean a client sent malformed or rule-breaking data,
as opposed to losing a race (a stale commit, a late op 23): a test of a well-behaved client expects none."""

MAX_PROTOCOL_VERSION = 1
PROPOSALS_APPEND = 0
PROPOSALS_REVOKE = 1
_MAX_TRANSITION_ID = 0xFFFF


# --------------------------------------------------------------------------------------------------
# Actions: what the shell must send, to one user each


@dataclass(frozen=True, slots=True)
class SendExternalSender:
    """Op 25: the MLS ExternalSender. Send it after op 4 (discord.py ignores binary ops before op 4)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class SendProposals:
    """Op 27: ``op_type`` (0 append, 1 revoke) then ``proposals``, the ``<V>`` vector davey expects."""

    op_type: int
    proposals: bytes


@dataclass(frozen=True, slots=True)
class SendAnnounceCommit:
    """Op 29: the winning commit (MLSMessage bytes exactly as received) for members of the old epoch."""

    transition_id: int
    commit: bytes


@dataclass(frozen=True, slots=True)
class SendWelcome:
    """Op 30: a bare Welcome, cut down to this joiner's secrets."""

    transition_id: int
    welcome: bytes


@dataclass(frozen=True, slots=True)
class SendPrepareTransition:
    """Op 21 (JSON)."""

    protocol_version: int
    transition_id: int


@dataclass(frozen=True, slots=True)
class SendExecuteTransition:
    """Op 22 (JSON)."""

    transition_id: int


@dataclass(frozen=True, slots=True)
class SendPrepareEpoch:
    """Op 24 (JSON). Epoch 1 means "a new group is being created: reset and send a new key package"."""

    protocol_version: int
    epoch: int


DsAction: TypeAlias = (
    SendExternalSender
    | SendProposals
    | SendAnnounceCommit
    | SendWelcome
    | SendPrepareTransition
    | SendExecuteTransition
    | SendPrepareEpoch
)
DsOutput: TypeAlias = list[tuple[int, DsAction]]


@dataclass(frozen=True, slots=True)
class TransitionInfo:
    """A read-only view of a transition waiting for op 23."""

    transition_id: int
    epoch: int
    members: frozenset[int]
    waiting: frozenset[int]
    deadline: float


# --------------------------------------------------------------------------------------------------
# Internal records


@dataclass(slots=True, eq=False)
class _Member:
    user_id: int
    key_package: mls.KeyPackage | None = None
    """The latest valid key package not yet consumed by a commit."""
    leaf: int | None = None
    """This member's leaf in the established group; None while pending (or after op 31)."""


@dataclass(slots=True, eq=False)
class _Leaf:
    user_id: int
    signature_key: bytes
    live: bool = True
    """False once the holder disconnected or sent op 31: the leaf waits for its Remove."""


@dataclass(slots=True, eq=False)
class _Proposal:
    kind: Literal["add", "remove"]
    proposal: mls.ExternalProposal
    user_id: int
    leaf: int | None = None
    key_package: mls.KeyPackage | None = None
    recipients: set[int] = field(default_factory=set)
    revoked: bool = False


@dataclass(slots=True, eq=False)
class _Transition:
    transition_id: int
    epoch: int
    members: set[int]
    waiting: set[int]
    deadline: float


# --------------------------------------------------------------------------------------------------


class DaveDeliveryService:
    """The DAVE delivery service of one voice call (one MLS group, group id = channel id).

    Every input method returns the actions to send, in order; inputs from clients that break the rules are
    counted in :attr:`counters` (by reason) and dropped, never raised. Only misuse by the shell raises.
    ``now`` (seconds, any monotonic origin) may be given with any input; :meth:`poll` must be called at
    :meth:`next_deadline` to time out transitions.
    """

    def __init__(
        self,
        channel_id: int,
        *,
        protocol_version: int = 1,
        external_sender: mls.ExternalSenderKey | None = None,
        transition_timeout: float = DEFAULT_TRANSITION_TIMEOUT,
        now: float = 0.0,
    ) -> None:
        if not 1 <= protocol_version <= MAX_PROTOCOL_VERSION:
            raise InvalidArgumentError(
                f"DAVE protocol version {protocol_version} has no delivery service "
                f"(supported: 1..{MAX_PROTOCOL_VERSION}; version 0 calls do not use one)"
            )
        if transition_timeout <= 0:
            raise InvalidArgumentError("transition_timeout must be positive")
        self.channel_id = channel_id
        self.protocol_version = protocol_version
        self.transition_timeout = transition_timeout
        self.group_id = mls.group_id_for_channel(channel_id)
        self._signer = external_sender if external_sender is not None else mls.ExternalSenderKey()
        self._external_sender = self._signer.external_sender()
        self._now = now
        self._members: dict[int, _Member] = {}
        self._leaves: dict[int, _Leaf] = {}
        self._proposals: list[_Proposal] = []
        self._transitions: dict[int, _Transition] = {}
        self._last_transition_id = 0
        self.epoch = 0
        self.established = False
        self.counters: Counter[str] = Counter()
        """Dropped inputs by reason, plus a few event counts (commits accepted, timeouts, resets)."""

    # ----------------------------------------------------------------------------------------------
    # Inspection

    @property
    def external_sender(self) -> bytes:
        return self._external_sender

    @property
    def members(self) -> frozenset[int]:
        """Every connected DAVE member, in the group or not."""
        return frozenset(self._members)

    @property
    def roster(self) -> dict[int, int]:
        """User id -> leaf index for members of the established group (departed leaves excluded)."""
        return {m.user_id: m.leaf for m in self._members.values() if m.leaf is not None}

    @property
    def pending_members(self) -> frozenset[int]:
        """Connected members that are not (or no longer) in the group."""
        return frozenset(m.user_id for m in self._members.values() if m.leaf is None)

    @property
    def stale_leaves(self) -> dict[int, int]:
        """Leaf index -> user id for leaves whose holder left or asked for recovery (Remove pending)."""
        return {index: leaf.user_id for index, leaf in self._leaves.items() if not leaf.live}

    @property
    def current_transition(self) -> TransitionInfo | None:
        """The newest transition still waiting for op 23, if any."""
        if not self._transitions:
            return None
        return self._view(self._transitions[next(reversed(self._transitions))])

    @property
    def open_transitions(self) -> list[TransitionInfo]:
        return [self._view(t) for t in self._transitions.values()]

    @property
    def proposals_in_flight(self) -> int:
        return sum(1 for p in self._proposals if not p.revoked)

    @staticmethod
    def _view(t: _Transition) -> TransitionInfo:
        return TransitionInfo(
            t.transition_id, t.epoch, frozenset(t.members), frozenset(t.waiting), t.deadline
        )

    def next_deadline(self) -> float | None:
        """When :meth:`poll` must run next (the earliest transition timeout), or None."""
        return min((t.deadline for t in self._transitions.values()), default=None)

    # ----------------------------------------------------------------------------------------------
    # Inputs

    def member_connected(self, user_id: int, *, now: float | None = None) -> DsOutput:
        """A DAVE client is in the call and its Session Description (op 4) is already sent."""
        self._tick(now)
        out: DsOutput = []
        if user_id in self._members:
            # A shell that forgot the disconnect: treat the new connection as a fresh client.
            logger.warning("DAVE member %d connected twice; dropping its old state", user_id)
            self.counters["connected_twice"] += 1
            out += self.member_disconnected(user_id)
        self._members[user_id] = _Member(user_id)
        out.append((user_id, SendExternalSender(self._external_sender)))
        return out

    def member_disconnected(self, user_id: int, *, now: float | None = None) -> DsOutput:
        """A member left the call (socket closed for good, kicked, moved away)."""
        self._tick(now)
        member = self._members.pop(user_id, None)
        if member is None:
            self.counters["disconnect_unknown_member"] += 1
            return []
        out: DsOutput = []
        if member.leaf is not None:
            self._leaves[member.leaf].live = False
        self._forget_in_transitions(user_id, out)
        self._after_membership_loss(out)
        return out

    def key_package_received(self, user_id: int, data: bytes, *, now: float | None = None) -> DsOutput:
        """Op 26. A new key package also means the client's local MLS state is fresh."""
        self._tick(now)
        member = self._members.get(user_id)
        if member is None:
            return self._drop("key_package_from_unknown_member", user_id)
        try:
            key_package = mls.parse_key_package(data)
        except ProtocolError as exc:
            return self._drop("key_package_invalid", user_id, exc)
        if key_package.user_id != user_id:
            return self._drop("key_package_wrong_identity", user_id)
        if member.leaf is not None:
            # A member of the group must say op 31 before it starts over.
            return self._drop("key_package_from_group_member", user_id)
        member.key_package = key_package
        # Whatever this client had queued belongs to a local group it no longer has.
        for proposal in self._proposals:
            proposal.recipients.discard(user_id)
        out: DsOutput = []
        self._reconcile(out)
        return out

    def commit_welcome_received(self, user_id: int, data: bytes, *, now: float | None = None) -> DsOutput:
        """Op 28. The first commit of the epoch that passes every check wins; the rest are dropped."""
        self._tick(now)
        member = self._members.get(user_id)
        if member is None:
            return self._drop("commit_from_unknown_member", user_id)
        try:
            parsed = mls.parse_commit_welcome(data)
        except ProtocolError as exc:
            return self._drop("commit_invalid", user_id, exc)
        reason = self._check_commit(member, parsed)
        if reason is not None:
            return self._drop(reason, user_id)
        out: DsOutput = []
        self._accept_commit(member, parsed, out)
        return out

    def transition_ready(self, user_id: int, transition_id: int, *, now: float | None = None) -> DsOutput:
        """Op 23."""
        self._tick(now)
        transition = self._transitions.get(transition_id)
        if transition is None:
            return self._drop("transition_ready_unknown", user_id)
        if user_id not in transition.waiting:
            return self._drop("transition_ready_unexpected", user_id)
        transition.waiting.discard(user_id)
        out: DsOutput = []
        if not transition.waiting:
            self._execute(transition, out)
        return out

    def invalid_commit_welcome(
        self, user_id: int, transition_id: int, *, now: float | None = None
    ) -> DsOutput:
        """Op 31: the client could not apply a commit or Welcome, reset itself and sends a new key package.

        Its old leaf (if any) gets a Remove now; its coming key package gets an Add, usually in the same
        commit (dave-notes.md §3 rule 8).
        """
        self._tick(now)
        member = self._members.get(user_id)
        if member is None:
            return self._drop("invalid_commit_welcome_unknown_member", user_id)
        self.counters["invalid_commit_welcome"] += 1
        logger.info(
            "DAVE member %d reported an invalid commit/welcome (transition %d)", user_id, transition_id
        )
        out: DsOutput = []
        if member.leaf is not None:
            self._leaves[member.leaf].live = False
            member.leaf = None
        member.key_package = None
        for proposal in self._proposals:
            proposal.recipients.discard(user_id)
        self._forget_in_transitions(user_id, out)
        self._after_membership_loss(out)
        return out

    def poll(self, now: float) -> DsOutput:
        """Time out transitions whose op 23s did not all arrive: op 22 goes out anyway."""
        self._tick(now)
        out: DsOutput = []
        for transition in list(self._transitions.values()):
            if transition.deadline <= now:
                self.counters["transition_timeout"] += 1
                logger.debug(
                    "DAVE transition %d timed out waiting for %s",
                    transition.transition_id,
                    sorted(transition.waiting),
                )
                self._execute(transition, out)
        return out

    # ----------------------------------------------------------------------------------------------
    # Commits

    def _check_commit(self, member: _Member, parsed: mls.ParsedCommit) -> str | None:
        """Return why this commit cannot win, or None (protocol.md §6.5 rules, §6.9.5 checks)."""
        if parsed.group_id != self.group_id:
            return "commit_wrong_group"
        if parsed.epoch != self.epoch:
            return "commit_wrong_epoch"  # usually a commit that lost the race: normal
        if self.established:
            if member.leaf is None:
                return "commit_from_non_member"
            if parsed.sender_leaf != member.leaf:
                return "commit_wrong_sender_leaf"
            signature_key = self._leaves[member.leaf].signature_key
        else:
            # In the initial flow the committer is alone at leaf 0 of its own pending group.
            if member.key_package is None:
                return "commit_from_non_member"
            if parsed.sender_leaf != 0:
                return "commit_wrong_sender_leaf"
            signature_key = member.key_package.signature_key
        refs = parsed.proposal_refs
        if not refs:
            return "commit_without_proposals"
        expected = {
            p.proposal.ref for p in self._proposals if not p.revoked and member.user_id in p.recipients
        }
        if len(set(refs)) != len(refs) or set(refs) != expected:
            return "commit_proposals_mismatch"  # stale: the member has not seen the latest op 27 yet
        added = {p.key_package.ref for p in self._referenced(refs) if p.key_package is not None}
        if added:
            if parsed.welcome is None:
                return "commit_without_welcome"
            if parsed.welcome.new_members != added:
                return "welcome_members_mismatch"
        elif parsed.welcome is not None:
            return "welcome_without_adds"
        if any(p.kind == "remove" for p in self._referenced(refs)) and not parsed.has_path:
            return "commit_remove_without_path"
        if parsed.path_leaf is not None:
            if parsed.path_leaf.user_id != member.user_id or parsed.path_leaf.signature_key != signature_key:
                return "commit_changes_credential"
            try:
                parsed.verify_path_leaf()
            except ProtocolError:
                return "commit_leaf_signature_invalid"
        return None

    def _referenced(self, refs: tuple[bytes, ...]) -> list[_Proposal]:
        by_ref = {p.proposal.ref: p for p in self._proposals if not p.revoked}
        return [by_ref[ref] for ref in refs]

    def _accept_commit(self, committer: _Member, parsed: mls.ParsedCommit, out: DsOutput) -> None:
        proposals = self._referenced(parsed.proposal_refs)
        transition_id = self._allocate_transition_id()
        if self.established:
            announce_to = [m.user_id for m in self._members.values() if m.leaf is not None]
        else:
            # The committer's pending group becomes the group; nobody else has it yet (§6.5 A).
            key_package = committer.key_package
            assert key_package is not None  # checked in _check_commit
            self._leaves = {0: _Leaf(committer.user_id, key_package.signature_key)}
            committer.leaf = 0
            committer.key_package = None
            announce_to = [committer.user_id]
        welcomes: list[tuple[int, bytes]] = []
        # RFC 9420 §12.3: removes first, then adds in commit order, each at the lowest free leaf.
        for proposal in proposals:
            if proposal.kind == "remove" and proposal.leaf is not None:
                self._leaves.pop(proposal.leaf, None)
        for proposal in proposals:
            key_package = proposal.key_package
            if proposal.kind != "add" or key_package is None:
                continue
            index = self._lowest_free_leaf()
            self._leaves[index] = _Leaf(proposal.user_id, key_package.signature_key)
            joiner = self._members[proposal.user_id]
            joiner.leaf = index
            joiner.key_package = None
            assert parsed.welcome is not None  # checked in _check_commit
            welcomes.append((proposal.user_id, mls.welcome_for_member(parsed.welcome, key_package.ref)))
        self.epoch += 1
        self.established = True
        self._proposals = []
        self.counters["commits_accepted"] += 1
        logger.debug(
            "DAVE commit from %d accepted: epoch %d, transition %d, roster %s",
            committer.user_id,
            self.epoch,
            transition_id,
            self.roster,
        )
        out.extend((user_id, SendAnnounceCommit(transition_id, parsed.commit)) for user_id in announce_to)
        out.extend((user_id, SendWelcome(transition_id, welcome)) for user_id, welcome in welcomes)
        live = {m.user_id for m in self._members.values() if m.leaf is not None}
        self._transitions[transition_id] = _Transition(
            transition_id, self.epoch, live, set(live), self._now + self.transition_timeout
        )
        self._reconcile(out)

    def _lowest_free_leaf(self) -> int:
        index = 0
        while index in self._leaves:
            index += 1
        return index

    def _allocate_transition_id(self) -> int:
        transition_id = self._last_transition_id % _MAX_TRANSITION_ID + 1  # 1..65535, 0 is reserved
        while transition_id in self._transitions:
            transition_id = transition_id % _MAX_TRANSITION_ID + 1
        self._last_transition_id = transition_id
        return transition_id

    # ----------------------------------------------------------------------------------------------
    # Transitions

    def _execute(self, transition: _Transition, out: DsOutput) -> None:
        del self._transitions[transition.transition_id]
        out.extend(
            (user_id, SendExecuteTransition(transition.transition_id))
            for user_id in sorted(transition.members)
            if user_id in self._members
        )

    def _forget_in_transitions(self, user_id: int, out: DsOutput) -> None:
        for transition in list(self._transitions.values()):
            transition.members.discard(user_id)
            if user_id in transition.waiting:
                transition.waiting.discard(user_id)
                if not transition.waiting:
                    self._execute(transition, out)

    # ----------------------------------------------------------------------------------------------
    # Membership and proposals

    def _after_membership_loss(self, out: DsOutput) -> None:
        live = [m for m in self._members.values() if m.leaf is not None]
        if self.established and len(live) <= 1:
            self._reset_group(live, out)
        else:
            self._reconcile(out)

    def _reset_group(self, live: list[_Member], out: DsOutput) -> None:
        """Nobody keeps a one-member group (§6.5 D): the survivor starts over at epoch 0."""
        self.counters["group_resets"] += 1
        logger.debug("DAVE group of channel %d reset at epoch %d", self.channel_id, self.epoch)
        for member in live:
            out.append((member.user_id, SendPrepareEpoch(self.protocol_version, 1)))
            out.append((member.user_id, SendPrepareTransition(self.protocol_version, 0)))
            member.leaf = None
            member.key_package = None
        self.established = False
        self.epoch = 0
        self._leaves = {}
        self._proposals = []
        self._transitions.clear()
        self._reconcile(out)

    def _reconcile(self, out: DsOutput) -> None:
        """Make the proposals in flight match the wanted changes, and send every difference."""
        members = self._members
        wanted_adds = {
            m.user_id: m.key_package for m in members.values() if m.leaf is None and m.key_package is not None
        }
        wanted_removes = {index for index, leaf in self._leaves.items() if not leaf.live}
        if self.established:
            live = {m.user_id for m in members.values() if m.leaf is not None}

            def recipients(proposal: _Proposal) -> set[int]:
                return live

        else:
            # Before the group exists every pending member commits from its own local group, so each one
            # gets the Adds of all the others but never its own (dave-notes.md §3 rule 2).
            eligible = set(wanted_adds)

            def recipients(proposal: _Proposal) -> set[int]:
                return eligible - {proposal.user_id}

        revokes: dict[int, list[bytes]] = {}

        def revoke(proposal: _Proposal) -> None:
            proposal.revoked = True
            for user_id in proposal.recipients:
                if user_id in members:
                    revokes.setdefault(user_id, []).append(proposal.proposal.ref)

        for proposal in self._proposals:
            if proposal.revoked:
                continue
            if proposal.kind == "add":
                still_wanted = wanted_adds.get(proposal.user_id) is proposal.key_package
            else:
                still_wanted = proposal.leaf in wanted_removes
            if not still_wanted:
                revoke(proposal)

        active = [p for p in self._proposals if not p.revoked]
        proposed_adds = {p.user_id for p in active if p.kind == "add"}
        proposed_removes = {p.leaf for p in active if p.kind == "remove"}
        for user_id, key_package in wanted_adds.items():
            if user_id not in proposed_adds and key_package is not None:
                self._propose_add(user_id, key_package)
        for index in sorted(wanted_removes - proposed_removes):
            self._proposals.append(
                _Proposal(
                    "remove",
                    mls.build_remove_proposal(self._signer, self.group_id, self.epoch, index),
                    self._leaves[index].user_id,
                    leaf=index,
                )
            )

        # davey attaches a Welcome only when the op 27 it is processing contains an Add, even though it
        # commits to every queued proposal. So a member holding Adds must end each batch with an Add:
        # when it would get only a revoke or Removes, its Adds are revoked and proposed again (new
        # signatures, new refs) in the same batch.
        while True:
            appends: dict[int, list[_Proposal]] = {}
            for proposal in self._proposals:
                if not proposal.revoked:
                    for user_id in sorted(recipients(proposal) - proposal.recipients):
                        appends.setdefault(user_id, []).append(proposal)
            stale: list[_Proposal] = []
            for user_id in sorted(set(revokes) | set(appends)):
                if any(p.kind == "add" for p in appends.get(user_id, ())):
                    continue
                stale.extend(
                    p
                    for p in self._proposals
                    if not p.revoked and p.kind == "add" and user_id in p.recipients and p not in stale
                )
            if not stale:
                break
            for proposal in stale:
                revoke(proposal)
                assert proposal.key_package is not None
                self._propose_add(proposal.user_id, proposal.key_package)
                self.counters["adds_reproposed"] += 1

        for user_id in sorted(revokes):
            out.append(
                (user_id, SendProposals(PROPOSALS_REVOKE, mls.encode_revoke_proposals(revokes[user_id])))
            )
        for user_id in sorted(appends):
            batch = appends[user_id]
            for proposal in batch:
                proposal.recipients.add(user_id)
            out.append(
                (
                    user_id,
                    SendProposals(
                        PROPOSALS_APPEND,
                        mls.encode_append_proposals(p.proposal.message for p in batch),
                    ),
                )
            )

    def _propose_add(self, user_id: int, key_package: mls.KeyPackage) -> None:
        self._proposals.append(
            _Proposal(
                "add",
                mls.build_add_proposal(self._signer, self.group_id, self.epoch, key_package.data),
                user_id,
                key_package=key_package,
            )
        )

    # ----------------------------------------------------------------------------------------------

    def _tick(self, now: float | None) -> None:
        if now is not None:
            self._now = now

    def _drop(self, reason: str, user_id: int, exc: Exception | None = None) -> DsOutput:
        self.counters[reason] += 1
        if exc is not None:
            logger.info("DAVE input from %d dropped (%s): %s", user_id, reason, exc)
        else:
            logger.debug("DAVE input from %d dropped (%s)", user_id, reason)
        return []
