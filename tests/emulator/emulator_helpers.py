"""Shared helpers for the voice-side emulator tests: worlds, raw voice sockets, opaque frames, DAVE checks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from cordvoice.emulator import Bot, Channel, Emulator, Guild, Participant, ReceivedFrame, VoiceSession
from cordvoice.udp.crypto import MODE_XCHACHA20_POLY1305, TransportCipher, make_cipher
from cordvoice.udp.rtp import OPUS_SILENCE
from cordvoice.voicegateway.messages import Ready, ServerFrame, SessionDescription, decode_server

#: websockets >= 15 reads proxy settings from the environment on every connect; tests dial loopback.
NO_PROXY: dict[str, Any] = {"proxy": None} if int(websockets.version.version.split(".")[0]) >= 15 else {}


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
        return cls(await connect(f"ws://{endpoint}/{query}", ping_interval=None, close_timeout=1, **NO_PROXY))

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


class RawGateway:
    """A bare main-gateway socket logged in as a bot: sends op 4, records every dispatch with its time."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.dispatches: list[tuple[float, str, dict[str, Any]]] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def login(cls, emu: Emulator, token: str) -> RawGateway:
        ws = await connect(emu.gateway_url + "/?v=10&encoding=json", ssl=emu.client_ssl_context())
        async with asyncio.timeout(5):
            json.loads(await ws.recv())  # Hello
        identify = {"op": 2, "d": {"token": token, "intents": (1 << 0) | (1 << 7), "properties": {}}}
        await ws.send(json.dumps(identify))
        gateway = cls(ws)
        await gateway.expect("READY")
        return gateway

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(ConnectionClosed):
            async for message in self.ws:
                payload = json.loads(message)
                if payload.get("op") == 0:
                    self.dispatches.append((loop.time(), payload["t"], payload["d"]))
                    self._changed.set()

    async def join(self, guild_id: int, channel_id: int | None, **flags: bool) -> None:
        data = {"guild_id": str(guild_id), "channel_id": None if channel_id is None else str(channel_id)}
        data |= {"self_mute": False, "self_deaf": False} | flags
        await self.ws.send(json.dumps({"op": 4, "d": data}))

    def mark(self) -> int:
        """Where the next expectation starts looking (the number of dispatches so far)."""
        return len(self.dispatches)

    async def expect(
        self,
        event: str,
        predicate: Callable[[dict[str, Any]], bool] = lambda d: True,
        *,
        after: int = 0,
        timeout: float = 3.0,  # noqa: ASYNC109
    ) -> tuple[int, float, dict[str, Any]]:
        """The first ``event`` dispatch at index >= ``after`` matching ``predicate``: (index, time, data)."""
        async with asyncio.timeout(timeout):
            while True:
                for index in range(after, len(self.dispatches)):
                    at, name, data = self.dispatches[index]
                    if name == event and predicate(data):
                        return index, at, data
                self._changed.clear()
                await self._changed.wait()

    def events_since(self, after: int) -> list[str]:
        return [name for _, name, _ in self.dispatches[after:]]

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader


async def bot_joins_voice(
    emu: Emulator, gateway: RawGateway, bot: Bot, channel: Channel, **options: Any
) -> tuple[Participant, dict[str, Any]]:
    """The bot asks to join over its gateway, then connects a participant with the credentials it got."""
    mark = gateway.mark()
    await gateway.join(channel.guild_id, channel.id)
    _, _, state = await gateway.expect(
        "VOICE_STATE_UPDATE", lambda d: d["user_id"] == str(bot.user_id), after=mark
    )
    _, _, server = await gateway.expect("VOICE_SERVER_UPDATE", after=mark)
    voice = await Participant.connect(
        endpoint=server["endpoint"],
        server_id=channel.guild_id,
        user_id=bot.user_id,
        session_id=state["session_id"],
        token=server["token"],
        channel_id=channel.id,
        ssl_context=emu.client_ssl_context(),
        name="bot",
        **options,
    )
    return voice, server


@dataclass
class RawMediaClient:
    """A raw voice client through Select Protocol with its own UDP socket: sees datagrams byte for byte."""

    voice: RawVoice
    sock: socket.socket
    session: VoiceSession
    ssrc: int
    cipher: TransportCipher
    server: tuple[str, int]

    @classmethod
    async def join(cls, emu: Emulator, channel: Channel, name: str = "raw-media") -> RawMediaClient:
        session = issue_session(emu, channel, name)
        voice = await RawVoice.open(session.endpoint)
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)
        await voice.send(identify_payload(session, dave=1))
        ready = (await voice.recv_op(2)).message
        assert isinstance(ready, Ready)
        host, port = sock.getsockname()
        mode = MODE_XCHACHA20_POLY1305
        await voice.send(
            {"op": 1, "d": {"protocol": "udp", "data": {"address": host, "port": port, "mode": mode}}}
        )
        description = (await voice.recv_op(4)).message
        assert isinstance(description, SessionDescription)
        return cls(
            voice,
            sock,
            session,
            ready.ssrc,
            make_cipher(mode, description.secret_key),
            (ready.ip, ready.port),
        )

    async def recv_datagram(self, timeout: float = 2.0) -> bytes:  # noqa: ASYNC109
        async with asyncio.timeout(timeout):
            return await asyncio.get_running_loop().sock_recv(self.sock, 4096)

    async def close(self) -> None:
        self.sock.close()
        await self.voice.close()


def classify(frames: Sequence[ReceivedFrame]) -> tuple[int, int, int]:
    """(distinct sequences, duplicates, out-of-order arrivals) of one sender's frames at a receiver."""
    seen: set[int] = set()
    highest = -1
    duplicates = out_of_order = 0
    for frame in frames:
        if frame.sequence in seen:
            duplicates += 1
            continue
        seen.add(frame.sequence)
        if frame.sequence < highest:
            out_of_order += 1
        highest = max(highest, frame.sequence)
    return len(seen), duplicates, out_of_order
