"""A real DAVE group in memory: the client's DAVE state machine for every member around the emulator's
delivery service, with messages delivered in FIFO order and no sockets.

The receive and transmit micro-benchmarks need members whose frames are encrypted by real davey sessions
with real per-sender keys, for hundreds of senders; forming that group through the network would cost more
than everything measured. Members can join in batches: everyone who joins before :meth:`DaveGroup.settle`
is added by one commit. The receive tests use it too: ``hold`` a member to let it fall behind the group
like a slow client, ``leave`` to remove one, ``on_epoch`` to watch the epochs each member reports.

:func:`client_call` and :func:`to_delivery_service` are the wiring between the two sans-IO cores, shared
with the test harnesses that deliver the same messages in other orders.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

from cordvoice.dave.session import (
    DaveAction,
    DaveClient,
    EpochChanged,
    SendCommitWelcome,
    SendInvalidCommitWelcome,
    SendKeyPackage,
    SendTransitionReady,
)
from cordvoice.emulator.dave_ds import (
    DaveDeliveryService,
    DsAction,
    SendAnnounceCommit,
    SendExecuteTransition,
    SendExternalSender,
    SendPrepareEpoch,
    SendPrepareTransition,
    SendProposals,
    SendWelcome,
)
from cordvoice.errors import DaveError

__all__ = ["DaveGroup", "client_call", "to_delivery_service"]

_CHANNEL_ID = 1_300_000_000_000_000_001


_DS_TO_CLIENT: dict[type, tuple[str, tuple[str, ...]]] = {
    SendExternalSender: ("on_external_sender", ("data",)),
    SendProposals: ("on_proposals", ("op_type", "proposals")),
    SendAnnounceCommit: ("on_announce_commit", ("transition_id", "commit")),
    SendWelcome: ("on_welcome", ("transition_id", "welcome")),
    SendPrepareTransition: ("on_prepare_transition", ("transition_id", "protocol_version")),
    SendExecuteTransition: ("on_execute_transition", ("transition_id",)),
    SendPrepareEpoch: ("on_prepare_epoch", ("epoch", "protocol_version")),
}


def client_call(action: DsAction) -> tuple[str, tuple[Any, ...]]:
    """A delivery-service message as the :class:`DaveClient` handler that takes it and its arguments.

    A name and a tuple rather than a bound call, so that a harness can queue, corrupt or replay deliveries.
    """
    handler = _DS_TO_CLIENT.get(type(action))
    if handler is None:
        raise DaveError(f"unexpected delivery-service action {action!r}")
    method, fields = handler
    return method, tuple(getattr(action, name) for name in fields)


def to_delivery_service(
    ds: DaveDeliveryService, user_id: int, action: DaveAction, *, now: float
) -> list[tuple[int, DsAction]]:
    """Hand a member's message for the server (op 26, 28, 23 or 31) to the delivery service."""
    if isinstance(action, SendKeyPackage):
        return ds.key_package_received(user_id, action.data, now=now)
    if isinstance(action, SendCommitWelcome):
        return ds.commit_welcome_received(user_id, action.data, now=now)
    if isinstance(action, SendTransitionReady):
        return ds.transition_ready(user_id, action.transition_id, now=now)
    if isinstance(action, SendInvalidCommitWelcome):
        return ds.invalid_commit_welcome(user_id, action.transition_id, now=now)
    raise DaveError(f"not a message for the delivery service: {action!r}")


def _deliver(client: DaveClient, action: DsAction) -> list[DaveAction]:
    method, args = client_call(action)
    actions: list[DaveAction] = getattr(client, method)(*args)
    return actions


class DaveGroup:
    """Members (``DaveClient``) of one channel's DAVE group; ``join`` users, then ``settle``."""

    def __init__(self, channel_id: int = _CHANNEL_ID) -> None:
        self.channel_id = channel_id
        self.now = 0.0
        self.ds = DaveDeliveryService(channel_id, now=0.0)
        self.clients: dict[int, DaveClient] = {}
        self._inbox: dict[int, deque[tuple[str, Any]]] = {}
        self.held: set[int] = set()
        """Members whose inbox is not delivered for now (:meth:`hold`)."""
        self.on_epoch: dict[int, Callable[[EpochChanged], None]] = {}
        """Called with each :class:`EpochChanged` the member reports."""

    def join(self, user_id: int) -> DaveClient:
        """Connect a member (op 4, op 11 both ways); it joins the group at the next :meth:`settle`."""
        client = DaveClient()
        others = list(self.clients)
        self.clients[user_id] = client
        inbox: deque[tuple[str, Any]] = deque([("description", user_id)])
        if others:
            inbox.append(("connect", others))
        self._inbox[user_id] = inbox
        for other in others:
            self._inbox[other].append(("connect", [user_id]))
        self._route(self.ds.member_connected(user_id, now=self.now))
        return client

    def leave(self, user_id: int) -> None:
        """Disconnect a member (op 13 to the others); the group removes it at the next :meth:`settle`."""
        del self.clients[user_id]
        del self._inbox[user_id]
        self.held.discard(user_id)
        for inbox in self._inbox.values():
            inbox.append(("disconnect", user_id))
        self._route(self.ds.member_disconnected(user_id, now=self.now))

    def hold(self, user_id: int) -> None:
        self.held.add(user_id)

    def release(self, user_id: int) -> None:
        self.held.discard(user_id)
        self.settle()

    def settle(self, max_steps: int = 10_000_000) -> None:
        """Deliver every message until nothing moves (advancing the clock to the next transition timeout)."""
        for _ in range(max_steps):
            progressed = False
            for user_id, inbox in self._inbox.items():
                if not inbox or user_id in self.held:
                    continue
                progressed = True
                kind, payload = inbox.popleft()
                client = self.clients[user_id]
                if kind == "description":
                    actions = client.on_session_description(1, payload, self.channel_id)
                elif kind == "connect":
                    actions = client.on_clients_connect(payload)
                elif kind == "disconnect":
                    actions = client.on_client_disconnect(payload)
                else:
                    actions = _deliver(client, payload)
                for action in actions:
                    self._to_server(user_id, action)
            if not progressed:
                deadline = self.ds.next_deadline()
                if deadline is None or self.held:  # held members would time every transition out
                    return
                self.now = max(self.now, deadline)
                self._route(self.ds.poll(self.now))
        raise DaveError("the DAVE group did not settle")

    @property
    def ready(self) -> bool:
        return all(client.ready for client in self.clients.values())

    def _route(self, outputs: list[tuple[int, DsAction]]) -> None:
        for user_id, action in outputs:
            inbox = self._inbox.get(user_id)
            if inbox is not None:
                inbox.append(("ds", action))

    def _to_server(self, user_id: int, action: DaveAction) -> None:
        if isinstance(action, EpochChanged):
            callback = self.on_epoch.get(user_id)
            if callback is not None:
                callback(action)
        else:
            self._route(to_delivery_service(self.ds, user_id, action, now=self.now))
