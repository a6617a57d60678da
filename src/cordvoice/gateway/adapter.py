"""The seam between cordvoice and whatever holds the bot's main gateway connection.

cordvoice never opens the main gateway itself when it runs inside a bot library: the library already has
that socket. An adapter is the two-way bridge:

* cordvoice -> adapter: :meth:`VoiceAdapter.update_voice_state` sends op 4 (join, move, leave, mute flags);
* adapter -> cordvoice: the adapter feeds every VOICE_STATE_UPDATE and VOICE_SERVER_UPDATE it receives, parsed
  (:mod:`cordvoice.gateway.events`), to the one :class:`VoiceEventListener` set on it, and says when its main
  gateway session was replaced (every voice session tied to the old one is then invalid; cordvoice rejoins).

Rules for implementations:

* Listener methods are called on the event loop's thread, in the order the gateway delivered the events. Pass
  every VOICE_STATE_UPDATE (for every user; the listener filters on ``user_id``) and every
  VOICE_SERVER_UPDATE, including those with ``endpoint: None``.
* Listener methods must not block and should not raise; if one does, the adapter logs it, counts it and goes
  on (a listener bug must not take the gateway down).
* ``update_voice_state`` returns once the payload is handed to the gateway (not when Discord answers), and
  raises :class:`~cordvoice.errors.GatewayError` when it cannot be sent.
* A main-gateway *resume* is invisible to voice; only a new session calls ``on_gateway_session_lost``.

``cordvoice.gateway.Client`` (a standalone main-gateway client) implements this protocol, and so does the
discord.py integration (:mod:`cordvoice.discordpy`).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from cordvoice.gateway.events import VoiceServerUpdate, VoiceStateUpdate

__all__ = ["VoiceAdapter", "VoiceEventListener"]


@runtime_checkable
class VoiceEventListener(Protocol):
    """What cordvoice's ``Voice`` implements to hear the main gateway's voice events."""

    def on_voice_state_update(self, event: VoiceStateUpdate) -> None:
        """A VOICE_STATE_UPDATE for any user in any guild the bot is in."""
        ...

    def on_voice_server_update(self, event: VoiceServerUpdate) -> None:
        """A VOICE_SERVER_UPDATE for the bot (``endpoint is None``: wait for another one)."""
        ...

    def on_gateway_session_lost(self) -> None:
        """The main gateway started a new session: every voice session of the old one is invalid."""
        ...


@runtime_checkable
class VoiceAdapter(Protocol):
    """What cordvoice needs from a main-gateway connection."""

    @property
    def user_id(self) -> int:
        """The bot's user id (known once the gateway is ready)."""
        ...

    async def update_voice_state(
        self, guild_id: int, channel_id: int | None, *, self_mute: bool = False, self_deaf: bool = False
    ) -> None:
        """Send op 4: join or move to ``channel_id``, or leave the guild's voice with ``None``."""
        ...

    def set_listener(self, listener: VoiceEventListener | None) -> None:
        """Route voice events to ``listener`` (replacing any previous one); ``None`` stops routing."""
        ...
