"""The chaos run: 20 cordvoice sessions play while 5 simulated participants record and faults rain down.

Layout: 5 guilds, each with one DAVE voice channel holding 4 bots (each bot its own gateway client, ``Voice``
and dial hook, so every UDP socket is attributable) and 1 recording participant (``resume=True``). Three bots
of four play an Ogg Opus file (passthrough), the fourth a WAV file (decoded and Opus-encoded by the player);
the first bot of each guild also listens (its session's receiver), so deafness after the faults shows.
Two voice servers, so moves have somewhere to go.

A seeded scheduler picks a fault from the emulator's whole catalogue every 1.5-4.5 s and logs it. A
*supervisor* per bot behaves like an application: when its session ends (kick, final close, deleted
channel...) it joins again after a moment and plays on; a participant that is gone (kicked, moved away,
closed for good) is retired (counters frozen) and replaced by a new one.

At the end everything is restored (UDP unpaused, impairments flushed, ACKs answered), every live session must
be ready and playing, playback stops, in-flight datagrams land, and the counters are taken (see
:meth:`ChaosWorld.ledger`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
import wave
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cordvoice import ReadyEvent, Session, SessionEvent, SessionState, Voice
from cordvoice.audio.samples import demo_pcm, write_demo_ogg
from cordvoice.emulator import Channel, Emulator, Guild, Participant, VoiceServerConfig
from cordvoice.errors import EmulatorError, VoiceError
from cordvoice.gateway import Client
from cordvoice.reconnect import ReconnectConfig

from .chaos_taps import SendRecorder, SfuTap, udp_drops

logger = logging.getLogger("chaos")

GUILDS = 5
BOTS_PER_GUILD = 4
RECONNECT = ReconnectConfig(
    backoff_base=0.1, backoff_cap=2.0, move_wait=1.5, server_wait=5.0, rejoin_timeout=5.0, stable_after=10.0
)
VOICE_CONFIG = VoiceServerConfig(heartbeat_interval_ms=1000.0, resume_window=20.0)
#: Close codes a bot's socket may get, with weights: mostly recoverable ones. 1001 stands for the codes below
#: 4000 (a proxy going away); 1006 is no close frame at all, which ``drop_bot`` does.
BOT_CLOSE_CODES = [4015] * 4 + [1001, 4000, 4006, 4009, 4004, 4011] * 2 + [4001, 4002]
#: Close codes that end a session for good (4014/4022: after ``move_wait`` without a move).
BOT_FINAL_CODES = [4014, 4021, 4016, 4017, 4012, 4020, 4022]
#: The catalogue, as the scheduler's kinds, with the weights of the random draws after the first round.
KINDS = {
    "close_bot": 12, "close_bot_final": 2, "drop_bot": 6, "crash": 4, "withhold_acks": 4, "move_guild": 4,
    "kick_bot": 2, "kick_listener": 2, "delete_channel": 1, "impair": 8, "pause_udp": 3, "inject": 6,
    "listener_resume": 3, "gateway_lost": 3,
}  # fmt: skip
#: Faults that end a bot's session for good (the supervisor then joins again).
FINAL_FAULTS = {"kick_bot", "delete_channel", "close_bot_final"}
FINAL_CODES = {4012, 4014, 4016, 4017, 4020, 4021, 4022}
CLIENT_BUG_CODES = {4001, 4002, 4003, 4005}


@dataclass
class FaultRecord:
    at: float
    kind: str
    target: str
    detail: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"t": round(self.at, 3), "kind": self.kind, "target": self.target, **self.detail}


@dataclass
class SessionRecord:
    """One Session of one bot (a bot has a new one after each final end)."""

    bot: int
    guild: int
    session: Session
    started: float
    events: list[SessionEvent] = field(default_factory=list)
    ssrcs: list[int] = field(default_factory=list)


@dataclass
class BotRecord:
    index: int
    user_id: int
    token: str
    guild_index: int
    decoded: bool
    recorder: SendRecorder
    client: Client | None = None
    voice: Voice | None = None
    sessions: list[SessionRecord] = field(default_factory=list)
    join_failures: Counter[str] = field(default_factory=Counter)
    final_faults: list[float] = field(default_factory=list)
    """Times of faults meant to end this bot's session for good."""
    bug_closes: list[float] = field(default_factory=list)


@dataclass
class ListenerRecord:
    """One recording participant over its whole life (retired ones keep their final counters)."""

    guild_index: int
    participant: Participant
    server_id: int
    endpoint: Any
    port: int
    joined: float
    retired: float | None = None
    kernel_drops: int = 0
    faults: dict[str, int] = field(default_factory=dict)
    unmapped_held: int = 0


class ChaosWorld:
    """Build with :meth:`start`, drive with :meth:`run`, check with :meth:`ledger`, end with :meth:`close`."""

    def __init__(self, *, seconds: float, seed: int, workdir: Path) -> None:
        self.seconds = seconds
        self.seed = seed
        self.rng = random.Random(seed)
        self.workdir = workdir
        self.loop = asyncio.get_running_loop()
        self.t0 = 0.0
        self.emu: Emulator | None = None
        self.guilds: list[Guild] = []
        self.channels: list[Channel] = []
        self.bots: list[BotRecord] = []
        self.listeners: list[ListenerRecord] = []
        self.taps: dict[int, SfuTap] = {}
        self.faults: list[FaultRecord] = []
        self.errors: list[str] = []
        self._supervisors: list[asyncio.Task[None]] = []
        self._running = True
        self._paused: set[int] = set()
        self._impaired: dict[int | None, float] = {}
        self._withheld: dict[int, float] = {}
        self._deck = list(KINDS)
        self.rng.shuffle(self._deck)
        self._ogg = workdir / "passthrough.ogg"
        self._wav = workdir / "decoded.wav"

    # ---- setup --------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.t0 = self.loop.time()
        write_demo_ogg(self._ogg, seconds=6.0)
        with wave.open(str(self._wav), "wb") as wav:
            wav.setnchannels(2)
            wav.setsampwidth(2)
            wav.setframerate(48_000)
            wav.writeframes(demo_pcm(4.0))
        self.emu = emu = Emulator(rate_limit=None, voice_servers=2, voice_config=VOICE_CONFIG)
        await emu.start()
        for index in range(GUILDS * BOTS_PER_GUILD):
            bot = emu.create_bot(f"chaos-bot-{index}")
            self.bots.append(
                BotRecord(
                    index,
                    bot.user_id,
                    bot.token,
                    index // BOTS_PER_GUILD,
                    index % 4 == 3,
                    SendRecorder(index),
                )
            )
        for server in emu._emulated_voice_servers():
            self._tap(server.server_id)
        for g in range(GUILDS):
            members = [b.user_id for b in self.bots if b.guild_index == g]
            guild = emu.create_guild(f"chaos guild {g}", members=members)
            self.guilds.append(guild)
            self.channels.append(emu.create_voice_channel(guild.id, "General"))
        for bot in self.bots:
            bot.client = Client(
                bot.token,
                gateway_url=emu.gateway_url,
                api_base=emu.api_base,
                ssl=emu.client_ssl_context(),
                send_limit=None,
            )
            await bot.client.start()
            bot.voice = Voice(
                bot.client, ssl=False, reconnect=RECONNECT, join_timeout=10.0, dial=bot.recorder.dial
            )
        for g in range(GUILDS):
            await self._add_listener(g)
        self.t0 = self.loop.time()
        for bot in self.bots:
            self._supervisors.append(asyncio.create_task(self._supervise(bot), name=f"chaos-bot-{bot.index}"))
        # Everyone connected and in a DAVE group before the first fault.
        async with asyncio.timeout(60):
            while not all(self._live_and_ready(bot) for bot in self.bots):
                await asyncio.sleep(0.1)

    def _tap(self, server_id: int) -> None:
        assert self.emu is not None
        server = self.emu.voice_server(server_id)

        tap = SfuTap(server.media, frozenset(bot.user_id for bot in self.bots))
        tap.install()
        self.taps[server_id] = tap

    async def _add_listener(self, guild_index: int) -> None:
        emu = self.emu
        assert emu is not None
        channel = self.channels[guild_index]
        participant = await emu.add_participant(channel.id, name=f"recorder-{guild_index}", resume=True)
        server = emu.voice_server(guild_id=self.guilds[guild_index].id)
        endpoint = server.media_endpoint(participant.user_id)
        assert endpoint.address is not None
        self.listeners.append(
            ListenerRecord(
                guild_index, participant, server.server_id, endpoint, int(endpoint.address[1]), self.now()
            )
        )

    def now(self) -> float:
        return self.loop.time() - self.t0

    def _live(self, bot: BotRecord) -> Session | None:
        if not bot.sessions:
            return None
        session = bot.sessions[-1].session
        return None if session.closed else session

    def _live_and_ready(self, bot: BotRecord) -> bool:
        session = self._live(bot)
        return session is not None and session.state is SessionState.READY and session.dave_ready

    # ---- the application side -----------------------------------------------------------------------

    async def _supervise(self, bot: BotRecord) -> None:
        """Join, play, and when the session ends for good, join again (what a bot application does)."""
        voice = bot.voice
        assert voice is not None
        while self._running:
            guild = self.guilds[bot.guild_index]
            channel = self.channels[bot.guild_index]
            try:
                session = await voice.join_channel(guild.id, channel.id)
            except VoiceError as exc:
                bot.join_failures[type(exc).__name__] += 1
                await asyncio.sleep(1.0)
                continue
            record = SessionRecord(bot.index, bot.guild_index, session, self.now())
            session.on(SessionEvent, record.events.append)
            session.on(ReadyEvent, lambda event, record=record: record.ssrcs.append(event.ssrc))
            if session.ssrc is not None:
                record.ssrcs.append(session.ssrc)
            bot.sessions.append(record)
            if bot.index % BOTS_PER_GUILD == 0:
                session.receiver  # noqa: B018 - hooks the receive pipeline up: this bot listens
            source = self._wav if bot.decoded else self._ogg
            session.play(str(source), loop=True)
            await session.wait_closed()
            if self._running:
                await asyncio.sleep(0.5)

    # ---- faults ---------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Inject faults until ``seconds`` passed; then restore and settle (see the module docstring)."""
        end = self.seconds
        while self.now() < end:
            await asyncio.sleep(min(self.rng.uniform(1.5, 4.5), max(0.0, end - self.now())))
            await self._expire_temporary_faults()
            await self._replace_dead_listeners()
            if self.now() >= end:
                break
            try:
                await self._inject()
            except EmulatorError as exc:  # the target just left: logged; a refused parameter fails the run
                self.faults.append(FaultRecord(self.now(), "skipped", "", {"error": repr(exc)[:200]}))
        await self._restore_everything()

    def _log(self, kind: str, target: str, **detail: Any) -> None:
        record = FaultRecord(self.now(), kind, target, detail)
        self.faults.append(record)
        logger.info("t=%.2f fault %s %s %s", record.at, kind, target, detail)

    async def _inject(self) -> None:
        emu = self.emu
        assert emu is not None
        faults = emu.faults
        rng = self.rng
        kind = self._deck.pop() if self._deck else rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        bot = rng.choice(self.bots)
        guild_index = rng.randrange(GUILDS)
        guild = self.guilds[guild_index]
        bot_kinds = (
            "close_bot",
            "close_bot_final",
            "drop_bot",
            "withhold_acks",
            "kick_bot",
            "inject",
            "gateway_lost",
        )
        if kind in bot_kinds:
            ready = [
                b for b in self.bots if (s := self._live(b)) is not None and s.state is SessionState.READY
            ]
            if not ready:
                kind = "crash"  # every bot is between sessions: hit a server instead
            else:
                bot = bot if bot in ready else rng.choice(ready)
        if kind in ("close_bot", "close_bot_final"):
            code = rng.choice(BOT_FINAL_CODES if kind == "close_bot_final" else BOT_CLOSE_CODES)
            closed = await faults.close_client(
                bot.user_id, code, "chaos", guild_id=self.guilds[bot.guild_index].id
            )
            final = code in FINAL_CODES
            if code in CLIENT_BUG_CODES:
                bot.bug_closes.append(self.now())
            if final and closed:
                bot.final_faults.append(self.now())
            self._log(
                "close_bot_final" if final else "close_bot", f"bot{bot.index}", code=code, closed=closed
            )
        elif kind == "drop_bot":
            dropped = await faults.drop_client(bot.user_id, guild_id=self.guilds[bot.guild_index].id)
            self._log(kind, f"bot{bot.index}", dropped=dropped)
        elif kind == "crash":
            server_id = rng.choice(sorted(self.taps))
            closed = await faults.crash(server_id)
            self._log(kind, f"server{server_id}", closed=closed)
        elif kind == "withhold_acks":
            faults.withhold_acks(bot.user_id, 4, guild_id=self.guilds[bot.guild_index].id)
            self._log(kind, f"bot{bot.index}", count=4)
        elif kind == "move_guild":
            if any(r.guild_index == guild_index for r in self.listeners if r.retired is None):
                await self._clear_impairments()  # the recorder there will go: nothing may stay held for it
            server = await faults.move_guild(guild.id, null_endpoint_first=rng.random() < 0.3, pause=0.2)
            self._log(kind, f"guild{guild_index}", to=server.id)
        elif kind == "kick_bot":
            if faults.kick(bot.user_id, guild_id=self.guilds[bot.guild_index].id):
                bot.final_faults.append(self.now())
            self._log(kind, f"bot{bot.index}")
        elif kind == "kick_listener":
            listener = self._listener(guild_index)
            if listener is not None:
                await self._clear_impairments()
                faults.kick(listener.participant.user_id, guild_id=guild.id)
                self._log(kind, f"recorder{guild_index}")
        elif kind == "delete_channel":
            await self._clear_impairments()
            channel = self.channels[guild_index]
            for b in self.bots:
                if b.guild_index == guild_index:
                    b.final_faults.append(self.now())
            count = faults.delete_channel(channel.id)
            self.channels[guild_index] = emu.create_voice_channel(guild.id, f"General {len(self.faults)}")
            self._log(kind, f"guild{guild_index}", members=count)
        elif kind == "impair":
            if self._paused:
                return
            target_listener = self._listener(guild_index) if rng.random() < 0.7 else None
            user = target_listener.participant.user_id if target_listener is not None else None
            if user is None and rng.random() < 0.5:
                user = bot.user_id
            params = {
                "loss": round(rng.choice([0.0, 0.02, 0.1, 0.3]), 3),
                "duplicate": round(rng.choice([0.0, 0.05, 0.2]), 3),
                "reorder": round(rng.choice([0.0, 0.05, 0.2]), 3),
                "delay": round(rng.choice([0.0, 0.02, 0.1]), 3),
                "jitter": round(rng.choice([0.0, 0.01, 0.06]), 3),
            }
            faults.impair(user, seed=rng.randrange(1 << 30), **params)
            self._impaired[user] = self.now() + rng.uniform(2.0, 6.0)
            self._log(kind, "everyone" if user is None else str(user), **params)
        elif kind == "pause_udp":
            await self._clear_impairments()  # nothing delayed may come out into a paused server
            server_id = rng.choice(sorted(self.taps))
            faults.pause_udp(server_id)
            self._paused.add(server_id)
            await asyncio.sleep(rng.uniform(0.3, 1.5))
            faults.resume_udp(server_id)
            self._paused.discard(server_id)
            self._log(kind, f"server{server_id}")
        elif kind == "inject":
            what = rng.choice(["garbage", "rtp", "rtp_wrong_key", "rtcp", "raw"])
            gid = self.guilds[bot.guild_index].id
            if what == "garbage":
                faults.inject_garbage(
                    bot.user_id, rng.randrange(0, 300), seed=rng.randrange(1 << 30), guild_id=gid
                )
            elif what == "rtp":
                extension = b"\x10\xff" if rng.random() < 0.5 else None
                padding = rng.choice([0, 3])
                sequence = rng.randrange(65536)
                faults.inject_rtp(
                    bot.user_id, sequence=sequence, padding=padding, extension=extension, guild_id=gid
                )
            elif what == "rtp_wrong_key":
                faults.inject_rtp(bot.user_id, wrong_key=True, guild_id=gid)
            elif what == "rtcp":
                faults.inject_rtcp(bot.user_id, guild_id=gid)
            else:
                faults.inject_raw(bot.user_id, b"\x80\x78" + bytes(rng.randrange(0, 40)), guild_id=gid)
            self._log(kind, f"bot{bot.index}", what=what)
        elif kind == "listener_resume":
            listener = self._listener(guild_index)
            if listener is not None:
                user = listener.participant.user_id
                if rng.random() < 0.5:
                    await faults.close_client(user, 4015, "chaos", guild_id=guild.id)
                else:
                    await faults.drop_client(user, guild_id=guild.id)
                self._log(kind, f"recorder{guild_index}")
        elif kind == "gateway_lost":
            assert bot.client is not None
            session_id = bot.client.session_id
            if session_id is not None:
                emu.main_gateway.invalidate_session(session_id, resumable=False)
                self._log(kind, f"bot{bot.index}")

    def _listener(self, guild_index: int) -> ListenerRecord | None:
        for record in reversed(self.listeners):
            if record.guild_index == guild_index and record.retired is None:
                return record if record.participant.connected else None
        return None

    async def _clear_impairments(self) -> None:
        assert self.emu is not None
        if self._impaired:
            self.emu.faults.clear_impairments()
            self._impaired.clear()
            await asyncio.sleep(0.15)  # held packets go out now; let them land

    async def _expire_temporary_faults(self) -> None:
        assert self.emu is not None
        now = self.now()
        for user, until in list(self._impaired.items()):
            if now >= until:
                self.emu.faults.clear_impairment(user)
                del self._impaired[user]

    async def _replace_dead_listeners(self) -> None:
        for record in list(self.listeners):
            if record.retired is None and not record.participant.connected:
                await self._retire(record)
                try:
                    await self._add_listener(record.guild_index)
                except Exception as exc:  # the guild may be mid-move: try again next round
                    self.errors.append(f"could not add a recorder to guild {record.guild_index}: {exc!r}")

    async def _retire(self, record: ListenerRecord) -> None:
        """Freeze a recorder's counters: no impairment may hold packets for it; in-flight ones land first."""
        assert self.emu is not None
        await self._clear_impairments()
        await asyncio.sleep(0.3)
        record.kernel_drops = udp_drops().get(record.port, 0)
        record.faults = self.emu.faults.for_user(record.participant.user_id)
        record.unmapped_held = sum(len(q) for q in record.participant._unmapped.values())
        record.retired = self.now()
        await record.participant.close()

    async def _restore_everything(self) -> None:
        """End of the fault phase: undo every lasting fault and wait until the world is healthy again."""
        emu = self.emu
        assert emu is not None
        await self._clear_impairments()
        for server_id in self.taps:
            emu.faults.resume_udp(server_id)
        for _ in range(40):
            await self._replace_dead_listeners()
            if (
                all(r.participant.connected for r in self.listeners if r.retired is None)
                and len([r for r in self.listeners if r.retired is None]) == GUILDS
            ):
                break
            await asyncio.sleep(0.25)

    async def wait_healthy(self, within: float = 30.0) -> None:
        """Every bot's newest session is ready, in a DAVE group and playing."""
        async with asyncio.timeout(within):
            while not all(self._live_and_ready(bot) for bot in self.bots):
                await asyncio.sleep(0.1)

    async def stop_playing(self) -> None:
        """Stop the supervisors and the players; the silence tails go out; in-flight datagrams land."""
        self._running = False
        for bot in self.bots:
            session = self._live(bot)
            if session is not None:
                session.player.stop()
        for bot in self.bots:
            session = self._live(bot)
            if session is not None:
                with contextlib.suppress(TimeoutError, VoiceError):
                    async with asyncio.timeout(5):
                        await session.stop_speaking()
        await asyncio.sleep(1.0)

    async def close(self) -> None:
        self._running = False
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        for bot in self.bots:
            if bot.voice is not None:
                await bot.voice.close()
        for bot in self.bots:
            if bot.client is not None:
                await bot.client.close()
        for record in self.listeners:
            await record.participant.close()
        if self.emu is not None:
            await self.emu.close()

    # ---- reporting ----------------------------------------------------------------------------------------

    def fault_log(self) -> list[dict[str, Any]]:
        return [f.as_json() for f in self.faults]

    def write_log(self, path: Path) -> None:
        path.write_text(
            json.dumps({"seed": self.seed, "seconds": self.seconds, "faults": self.fault_log()}, indent=1)
        )


def freeze_listeners(world: ChaosWorld) -> None:
    """Take the final counters of the recorders still alive (after :meth:`ChaosWorld.stop_playing`)."""
    assert world.emu is not None
    drops = udp_drops()
    for record in world.listeners:
        if record.retired is None:
            record.kernel_drops = drops.get(record.port, 0)
            record.faults = world.emu.faults.for_user(record.participant.user_id)
            record.unmapped_held = sum(len(q) for q in record.participant._unmapped.values())


def monotonic_ms(start: float) -> float:
    return round((time.monotonic() - start) * 1000.0, 1)


Check = Callable[[], None]
