"""The acceptance scenarios' world: an emulator, a cordvoice bot listening, simulated participants speaking.

Also the network impairment (an SFU forward hook), crafted-packet rewriting, send logs and signal metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import struct
import time
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cordvoice.audio.receiver import Receiver
from cordvoice.emulator import Emulator, Participant
from cordvoice.emulator.sfu import Address, MediaEndpoint, MediaServer
from cordvoice.events import DaveEpochEvent
from cordvoice.gateway import Client
from cordvoice.session import Session
from cordvoice.voice import Voice

from .receive_helpers import FloatArray

RATE = 48_000


@dataclass
class World:
    emu: Emulator
    client: Client
    voice: Voice
    session: Session
    guild_id: int
    channel_id: int
    bot_user_id: int
    epoch_times: list[float] = field(default_factory=list)

    @property
    def media(self) -> MediaServer:
        return self.emu.voice_server().media

    def bot_endpoint(self) -> MediaEndpoint:
        return self.emu.voice_server().media_endpoint(self.bot_user_id)

    @property
    def receiver(self) -> Receiver:
        return self.session.receiver

    async def add_speaker(self, name: str) -> Participant:
        return await self.emu.add_participant(self.channel_id, name=name)

    async def converge(self, members: list[Participant], limit: float = 10.0) -> None:
        """Wait until the bot and ``members`` share one DAVE epoch."""
        session = self.session

        def converged() -> bool:
            dave = session.dave
            if dave is None or not dave.ready:
                return False
            return all(p.dave_ready and p.epoch == dave.epoch for p in members)

        async with asyncio.timeout(limit):
            while not converged():
                await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def bot_world(name: str) -> AsyncIterator[World]:
    """A fresh emulator with a guild and a voice channel, and a cordvoice bot joined to it."""
    async with Emulator() as emu:
        bot = emu.create_bot(f"receiver-{name}")
        guild = emu.create_guild(f"receive {name}", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id, "General")
        async with Client(bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base) as client:
            voice = Voice(client, ssl=False)
            try:
                session = await voice.join_channel(guild.id, channel.id)
                world = World(emu, client, voice, session, guild.id, channel.id, bot.user_id)
                session.on(DaveEpochEvent, lambda _e: world.epoch_times.append(time.monotonic()))
                yield world
            finally:
                await voice.close()


# --------------------------------------------------------------------------------------------------
# What participants send


@dataclass
class SendLog:
    """Every frame a participant sent: sequence -> (monotonic send time, DAVE-encrypted?, sender epoch)."""

    frames: dict[int, tuple[float, bool, int | None]] = field(default_factory=dict)

    def epoch_changes(self) -> list[float]:
        times = []
        previous: int | None = None
        for _seq, (sent, _enc, epoch) in sorted(self.frames.items(), key=lambda item: item[1][0]):
            if previous is not None and epoch != previous:
                times.append(sent)
            previous = epoch
        return times


def log_sends(participant: Participant) -> SendLog:
    """Wrap the participant's frame sender to record each frame's sequence, time and encryption."""
    log = SendLog()
    original = participant._send_frame

    def send(frame: bytes, *, dave: bool) -> None:
        sender = participant._sender
        assert sender is not None
        log.frames[sender.sequence] = (time.monotonic(), participant.dave_ready, participant.epoch)
        original(frame, dave=dave)

    participant._send_frame = send  # type: ignore[method-assign]
    return log


# --------------------------------------------------------------------------------------------------
# Network impairment and crafted packets (SFU side)


class Impairment:
    """A forward hook: loss, reordering and jitter on the packets the SFU sends to one receiver."""

    def __init__(
        self,
        media: MediaServer,
        receiver_user_id: int,
        *,
        loss: float,
        reorder: float,
        jitter: float,
        seed: int,
    ) -> None:
        self.media = media
        self.receiver_user_id = receiver_user_id
        self.loss = loss
        self.reorder = reorder
        self.jitter = jitter
        self.rng = random.Random(seed)
        self.loop = asyncio.get_running_loop()
        self.dropped: Counter[int] = Counter()
        self.reordered: Counter[int] = Counter()
        self.forwarded: Counter[int] = Counter()

    def __call__(
        self, packet: bytes, address: Address, sender: MediaEndpoint, receiver: MediaEndpoint
    ) -> None:
        if receiver.user_id != self.receiver_user_id:
            self.media.send_datagram(packet, address)
            return
        rng = self.rng
        self.forwarded[sender.user_id] += 1
        if rng.random() < self.loss:
            self.dropped[sender.user_id] += 1
            return
        delay = rng.uniform(0.0, self.jitter)
        if rng.random() < self.reorder:
            # Held back past the next packet or two (still inside the receiver's 60 ms jitter delay).
            delay += 0.025
            self.reordered[sender.user_id] += 1
        self.loop.call_later(delay, self.media.send_datagram, packet, address)


class Rewrapper:
    """A forward hook that re-sends one sender's packets to one receiver with CSRCs, a header extension
    (its body encrypted, as Discord's clients send it) and padding, keeping the payload and RTP fields."""

    def __init__(self, media: MediaServer, sender_user_id: int, receiver_user_id: int, seed: int) -> None:
        self.media = media
        self.sender_user_id = sender_user_id
        self.receiver_user_id = receiver_user_id
        self.rng = random.Random(seed)
        self.rewrapped = 0

    def __call__(
        self, packet: bytes, address: Address, sender: MediaEndpoint, receiver: MediaEndpoint
    ) -> None:
        if sender.user_id != self.sender_user_id or receiver.user_id != self.receiver_user_id:
            self.media.send_datagram(packet, address)
            return
        assert receiver.cipher is not None
        header, payload = receiver.cipher.open_rtp(packet)
        rng = self.rng
        csrcs = [rng.getrandbits(32) for _ in range(rng.randint(1, 3))]
        words = rng.randint(1, 3)
        body = bytes([0x10, 0x7F]) + rng.randbytes(words * 4 - 2)  # one-byte element id 1, len 1 (+ junk)
        padding = rng.randint(1, 12)
        byte0 = 0x80 | 0x20 | 0x10 | len(csrcs)
        clear = (
            struct.pack(">BBHII", byte0, 0x78, header.sequence, header.timestamp, header.ssrc)
            + b"".join(struct.pack(">I", c) for c in csrcs)
            + struct.pack(">HH", 0xBEDE, words)
        )
        plain = body + payload + bytes(padding - 1) + bytes([padding])
        self.media.send_datagram(receiver.seal(clear, plain), address)
        self.rewrapped += 1


# --------------------------------------------------------------------------------------------------
# Signal metrics


def window_lag(ref: FloatArray, out: FloatArray, start: float, length: float, around: int, span: int) -> int:
    """Where ``ref[start : start + length]`` sits in ``out``: a lag near ``around`` (± ``span`` samples)."""
    a = int(start * RATE)
    b = a + int(length * RATE)
    piece = ref[a:b]
    lo = max(0, a + around - span)
    hi = min(len(out), b + around + span)
    region = out[lo:hi]
    if len(region) < len(piece):
        return around
    return lo + _search(piece, region) - a


def _search(piece: FloatArray, region: FloatArray) -> int:
    """Offset of ``piece`` inside ``region`` maximising the normalised correlation (FFT)."""
    size = 1 << int(np.ceil(np.log2(len(region) + len(piece))))
    corr = np.fft.irfft(np.fft.rfft(region, size) * np.conj(np.fft.rfft(piece, size)), size)
    valid = corr[: len(region) - len(piece) + 1]
    return int(np.argmax(valid))


def describe_stats(receiver: Receiver, user_id: int) -> dict[str, Any]:
    return receiver.stats(user_id).as_dict()
