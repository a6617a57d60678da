"""Shared helpers for the voice-side emulator tests: worlds, raw voice sockets, opaque frames, DAVE checks."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator import Bot, Channel, Emulator, Guild, Participant, VoiceSession
from cordvoice.udp.rtp import OPUS_SILENCE
from cordvoice.voicegateway.messages import ServerFrame, decode_server


@dataclass
class VoiceWorld:
    emu: Emulator
    bot: Bot
    guild: Guild
    channel: Channel
    stage: Channel


def build_voice_world(emu: Emulator) -> VoiceWorld:
    bot = emu.create_bot("cordvoice-voice-bot")
    guild = emu.create_guild("voice guild", members=[bot.user_id])
    channel = emu.create_voice_channel(guild.id, "General")
    stage = emu.create_stage_channel(guild.id, "Stage")
    return VoiceWorld(emu, bot, guild, channel, stage)


def issue_session(emu: Emulator, channel: Channel, name: str = "raw") -> VoiceSession:
    """A user put in ``channel`` through the state, with the voice session the main gateway would announce."""
    user = emu.create_user(name)
    emu.add_member(channel.guild_id, user.id)
    change = emu.set_voice_state(channel.guild_id, user.id, channel.id)
    assert change is not None and change.issued is not None
    return change.issued


def identify_payload(session: VoiceSession, *, dave: int = 1, **overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "server_id": str(session.server_id),
        "user_id": str(session.user_id),
        "session_id": session.session_id,
        "token": session.token,
        "max_dave_protocol_version": dave,
    }
    data.update(overrides)
    return {"op": 0, "d": data}


class RawVoice:
    """A bare voice WebSocket for strictness tests: send anything, read frames, see the close code."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    @classmethod
    async def open(cls, endpoint: str, query: str = "?v=8") -> RawVoice:
        return cls(await connect(f"ws://{endpoint}/{query}", ping_interval=None, close_timeout=1))

    async def send(self, payload: dict[str, Any] | str | bytes) -> None:
        await self.ws.send(json.dumps(payload) if isinstance(payload, dict) else payload)

    async def recv(self, timeout: float = 2.0) -> ServerFrame:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            return decode_server(await self.ws.recv())

    async def recv_op(self, op: int, timeout: float = 2.0) -> ServerFrame:  # noqa: ASYNC109
        """Skip frames until one with opcode ``op``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = decode_server(await self.ws.recv())
                if int(frame.message.op) == op:
                    return frame

    async def close_code(self, timeout: float = 3.0) -> int | None:  # noqa: ASYNC109
        """Read until the server closes; returns its close code."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self.ws.recv()
            except ConnectionClosed:
                pass
        return self.ws.close_code

    def abort(self) -> None:
        self.ws.transport.abort()

    async def close(self) -> None:
        await self.ws.close()


def opaque_frames(tag: int, count: int, size: int = 48) -> list[bytes]:
    """Distinct Opus-looking frames (TOC 0xFC, a tag, random bytes); never silence, never ending FA FA."""
    frames = []
    for index in range(count):
        body = tag.to_bytes(8, "big") + index.to_bytes(2, "big") + os.urandom(size)
        frames.append(b"\xfc" + body + b"\x00")
    assert OPUS_SILENCE not in frames
    return frames


async def eventually(predicate: Callable[[], bool], timeout: float = 2.0) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` until it holds (for counters that a datagram changes a moment later)."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.005)


def group_converged(members: Sequence[Participant], emu: Emulator) -> bool:
    """Every member is in the DAVE group the delivery service holds, at its epoch, with one privacy code."""
    if not all(p.dave_ready for p in members):
        return False
    epochs = {p.epoch for p in members}
    codes = {p.privacy_code for p in members}
    if len(epochs) != 1 or len(codes) != 1 or None in codes:
        return False
    view = emu.inspect(members[0].user_id)
    return view.dave_epoch == members[0].epoch and set(view.dave_roster) == {p.user_id for p in members}


async def wait_converged(members: Sequence[Participant], emu: Emulator, timeout: float = 10.0) -> None:  # noqa: ASYNC109
    async with asyncio.timeout(timeout):
        while not group_converged(members, emu):
            await asyncio.sleep(0.01)


async def exchange_audio(members: Sequence[Participant], tag: int, frames: int = 4) -> None:
    """Everyone speaks at once; every member must hear every other member's frames, decrypted and in order."""
    for member in members:
        member.clear_frames()
    sent = {m.user_id: opaque_frames(tag * 1000 + i, frames) for i, m in enumerate(members)}
    await asyncio.gather(*(m.play(sent[m.user_id]) for m in members))
    for receiver in members:
        for sender in members:
            if sender is receiver:
                continue
            # Stale silence from an earlier step may still trickle in: wait for this step's frames.
            await receiver.wait_until(lambda r=receiver, s=sender: len(r.payloads_from(s.user_id)) >= frames)
            heard = receiver.payloads_from(sender.user_id)
            assert heard == sent[sender.user_id], (
                f"user {receiver.user_id} heard {sender.user_id} wrong: "
                f"{[(f.sequence, len(f.payload), f.dave) for f in receiver.frames_from(sender.user_id)]}, "
                f"{receiver.stats}, epoch {receiver.epoch}/{sender.epoch}"
            )
