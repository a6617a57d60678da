"""What ``cordvoice play`` and ``cordvoice record`` share: exit codes, and joining a channel on Discord or on
an embedded emulator, with errors a person can act on.

The bot token comes only from the ``DISCORD_TOKEN`` environment variable: a command-line argument would
land in shell history and in every process listing. It is never printed or logged.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import enum
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TextIO

from cordvoice.errors import (
    AudioError,
    DaveRequiredError,
    GatewayError,
    InvalidArgumentError,
    JoinTimeoutError,
    VoiceError,
)

if TYPE_CHECKING:
    from cordvoice.emulator.participant import Participant
    from cordvoice.emulator.server import Emulator
    from cordvoice.gateway.client import Client, GuildInfo
    from cordvoice.session import Session
    from cordvoice.voice import Voice

__all__ = [
    "EXIT_CODES_HELP",
    "TOKEN_VARIABLE",
    "CommandError",
    "Exit",
    "Joined",
    "add_connection_arguments",
    "check_target_arguments",
    "exit_code_for",
    "joined",
    "left_early",
    "wait_same_epoch",
]

logger = logging.getLogger(__name__)

TOKEN_VARIABLE = "DISCORD_TOKEN"
_GUILD_WAIT = 10.0
"""Seconds login waits for the guilds READY announced (it returns as soon as they all arrived)."""


class Exit(enum.IntEnum):
    """Exit statuses of ``play`` and ``record`` (also listed in their ``--help``)."""

    OK = 0
    ERROR = 1
    USAGE = 2
    TOKEN = 3
    UNKNOWN_TARGET = 4
    JOIN_TIMEOUT = 5
    DAVE_REQUIRED = 6
    NETWORK = 7
    AUDIO = 8
    INTERRUPTED = 130
    TERMINATED = 143


EXIT_CODES_HELP = """\
exit status:
  0    done
  1    another error (the message says which)
  2    bad command line
  3    no token in $DISCORD_TOKEN, or Discord rejected it
  4    unknown guild or channel: the bot is not in the guild, or the channel is not a voice channel there
  5    joining timed out: usually the bot lacks the Connect permission on the channel, or it is full
  6    the channel requires DAVE end-to-end encryption and this connection could not offer it
  7    Discord (or the emulator) could not be reached
  8    the audio could not be read or written (missing file, unsupported format, unwritable folder)
  130  interrupted (Ctrl-C)
  143  terminated (SIGTERM): stopped like Ctrl-C, so the bot leaves and the files written are complete

The bot token is read from $DISCORD_TOKEN only, never from the command line, and is never printed.
"""


class CommandError(VoiceError):
    """A failure with its exit status and a message that says what to do."""

    def __init__(self, status: Exit, message: str) -> None:
        super().__init__(message)
        self.status = status


def exit_code_for(exc: BaseException) -> Exit:
    """The exit status for an error that reached the top of a command."""
    if isinstance(exc, CommandError):
        return exc.status
    if isinstance(exc, DaveRequiredError):
        return Exit.DAVE_REQUIRED
    if isinstance(exc, JoinTimeoutError):
        return Exit.JOIN_TIMEOUT
    if isinstance(exc, AudioError):
        return Exit.AUDIO
    if isinstance(exc, GatewayError):
        return _gateway_status(exc)
    return Exit.ERROR


def _gateway_status(exc: GatewayError) -> Exit:
    # The standalone client's messages: "Discord rejected the bot token (...)", "could not reach ...",
    # "could not connect to the gateway at ...". tests/cli checks each against a live emulator.
    message = str(exc)
    if "token" in message:
        return Exit.TOKEN
    if message.startswith(("could not reach", "could not connect")):
        return Exit.NETWORK
    return Exit.ERROR


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--guild``, ``--channel``, ``--emulator`` and the less common connection options."""
    parser.add_argument("--guild", type=_snowflake, metavar="ID", help="the guild (server) id")
    parser.add_argument("--channel", type=_snowflake, metavar="ID", help="the voice channel id")
    parser.add_argument(
        "--emulator",
        action="store_true",
        help="use an embedded local emulator of Discord (no token; it creates the ids and prints them)",
    )
    parser.add_argument(
        "--join-timeout",
        type=float,
        default=15.0,
        metavar="SECONDS",
        help="give up joining after this long (default 15)",
    )
    parser.add_argument(
        "--no-dave",
        action="store_true",
        help="offer no DAVE end-to-end encryption (only stage channels accept that)",
    )
    parser.add_argument(
        "--api-base",
        default=None,
        metavar="URL",
        help="Discord's API base (default: $CORDVOICE_API_BASE, else https://discord.com/api/v10); point "
        "it at a running `cordvoice emulate` to try the real-Discord path locally",
    )
    parser.epilog = EXIT_CODES_HELP
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def check_target_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--guild``/``--channel``: required on Discord, refused with ``--emulator`` (it makes its own)."""
    if args.emulator:
        if args.guild is not None or args.channel is not None or args.api_base is not None:
            parser.error(
                "--emulator creates its own guild and channel: omit --guild, --channel and --api-base"
            )
    elif args.guild is None or args.channel is None:
        parser.error("--guild and --channel are required (or use --emulator to try it locally)")
    if not args.join_timeout > 0:  # NaN too: asyncio would time out at once, with a bare TimeoutError
        parser.error("--join-timeout must be positive")


def _snowflake(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a numeric Discord id") from None
    if not 0 < value < 1 << 64:
        raise argparse.ArgumentTypeError(f"{text!r} is not a Discord id (a positive 64-bit number)")
    return value


@dataclass
class Joined:
    """A bot connected and in its voice channel."""

    client: Client
    voice: Voice
    session: Session
    guild_id: int
    channel_id: int
    emulator: Emulator | None
    """The embedded emulator with ``--emulator``."""


@contextlib.asynccontextmanager
async def joined(args: argparse.Namespace, *, out: TextIO | None = None) -> AsyncIterator[Joined]:
    """Log in (Discord with $DISCORD_TOKEN, or an embedded emulator), join the channel, leave at the end.

    With ``--emulator``, the ids it made are printed to ``out`` (default: stdout).
    """
    if args.emulator:
        async with _embedded_emulator(out or sys.stdout) as (emu, token, guild_id, channel_id):  # noqa: SIM117
            async with _logged_in(token, api_base=emu.api_base, gateway_url=emu.gateway_url) as client:
                async with _in_channel(args, client, guild_id, channel_id, emu, plain=True) as session_joined:
                    yield session_joined
        return
    token = os.environ.get(TOKEN_VARIABLE, "").strip()
    if not token:
        raise CommandError(
            Exit.TOKEN,
            f"no bot token: set ${TOKEN_VARIABLE} to your bot's token (Developer Portal -> your application "
            "-> Bot -> Reset Token). It is read from the environment only, never from the command line. "
            "To try without one, add --emulator.",
        )
    from cordvoice.gateway.client import API_BASE_VARIABLE, DISCORD_API_BASE  # noqa: PLC0415

    api_base = args.api_base or os.environ.get(API_BASE_VARIABLE) or DISCORD_API_BASE
    # The voice servers of a plain-HTTP API (a local emulator) speak plain ws://; Discord's speak wss://.
    plain = api_base.startswith("http://")
    with _redacted_in_logs(token):
        async with _logged_in(token, api_base=api_base, gateway_url=None) as client:
            _check_target(client, args.guild, args.channel)
            async with _in_channel(
                args, client, args.guild, args.channel, None, plain=plain
            ) as session_joined:
                yield session_joined


class _Redact(logging.Filter):
    """Replaces the token in every log record a handler emits (libraries log frames at DEBUG level)."""

    def __init__(self, secret: str) -> None:
        super().__init__()
        self._secret = secret

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if self._secret in message:
            record.msg, record.args = message.replace(self._secret, "[token]"), None
        return True


@contextlib.contextmanager
def _redacted_in_logs(token: str) -> Iterator[None]:
    """While connected, no log handler of this process prints the token (``-vv`` shows Identify frames)."""
    redact = _Redact(token.removeprefix("Bot ").strip())
    handlers = list(logging.getLogger().handlers)
    for handler in handlers:
        handler.addFilter(redact)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(redact)


@contextlib.asynccontextmanager
async def _embedded_emulator(out: TextIO) -> AsyncIterator[tuple[Emulator, str, int, int]]:
    from cordvoice.emulator.server import Emulator  # noqa: PLC0415

    async with Emulator() as emu:
        bot = emu.create_bot("cordvoice-cli")
        guild = emu.create_guild("cordvoice", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id, "General")
        print(
            f"emulator: {emu.gateway_url} with guild {guild.id}, DAVE voice channel {channel.id}, "
            f"bot user {bot.user_id}",
            file=out,
            flush=True,
        )
        assert bot.token is not None
        yield emu, bot.token, guild.id, channel.id


@contextlib.asynccontextmanager
async def _logged_in(token: str, *, api_base: str, gateway_url: str | None) -> AsyncIterator[Client]:
    from cordvoice.gateway.client import Client  # noqa: PLC0415

    try:
        client = Client(token, api_base=api_base, gateway_url=gateway_url, guild_ready_timeout=_GUILD_WAIT)
    except InvalidArgumentError as exc:
        raise CommandError(Exit.TOKEN, f"${TOKEN_VARIABLE} is not usable: {exc}") from None
    try:
        await client.start()
    except GatewayError as exc:
        status = _gateway_status(exc)
        hint = {
            Exit.TOKEN: f" Check ${TOKEN_VARIABLE}: it must be the bot's token from the Developer Portal.",
            Exit.NETWORK: " Check the network (or --api-base).",
        }.get(status, "")
        raise CommandError(status, f"logging in failed: {exc}.{hint}") from None
    try:
        yield client
    finally:
        await client.close()


def _check_target(client: Client, guild_id: int, channel_id: int) -> None:
    """Fail early, with the ids that would work, when the bot cannot see the guild or the channel."""
    guild = client.guilds.get(guild_id)
    if guild is None:
        known = ", ".join(f"{g.name!r} ({g.id})" for g in client.guilds.values()) or "none"
        raise CommandError(
            Exit.UNKNOWN_TARGET,
            f"the bot is not in guild {guild_id} (guilds it is in: {known}). Invite it with the 'bot' scope "
            "and the Connect and Speak permissions, or check the id (Developer Mode, then right-click the "
            "server -> Copy Server ID).",
        )
    if channel_id not in guild.voice_channels:
        raise CommandError(
            Exit.UNKNOWN_TARGET,
            f"channel {channel_id} is not a voice or stage channel of guild {guild.name!r} ({guild_id}) "
            f"that the bot can see. Voice channels: {_channel_list(guild)}.",
        )


def _channel_list(guild: GuildInfo) -> str:
    return ", ".join(f"{c.name!r} ({c.id})" for c in guild.voice_channels.values()) or "none"


@contextlib.asynccontextmanager
async def _in_channel(
    args: argparse.Namespace,
    client: Client,
    guild_id: int,
    channel_id: int,
    emu: Emulator | None,
    *,
    plain: bool,
) -> AsyncIterator[Joined]:
    from cordvoice.voice import Voice  # noqa: PLC0415

    voice = Voice(client, ssl=not plain, dave=not args.no_dave, join_timeout=args.join_timeout)
    try:
        try:
            session = await voice.join_channel(guild_id, channel_id)
        except JoinTimeoutError:
            message = _join_timeout_message(client, guild_id, channel_id, args.join_timeout)
            raise CommandError(Exit.JOIN_TIMEOUT, message) from None
        except DaveRequiredError as exc:
            hint = " Run it without --no-dave." if args.no_dave else ""
            raise CommandError(Exit.DAVE_REQUIRED, f"joining failed: {exc}{hint}") from None
        yield Joined(client, voice, session, guild_id, channel_id, emu)
    finally:
        with contextlib.suppress(VoiceError):
            await voice.close()


def left_early(session: Session) -> CommandError | None:
    """The error to end with when the session ended without the command asking (kicked, channel deleted)."""
    event = session.disconnected_event
    if event is None:
        return None
    return CommandError(Exit.ERROR, f"the bot was disconnected from the channel: {event.reason}")


def _join_timeout_message(client: Client, guild_id: int, channel_id: int, timeout: float) -> str:
    guild = client.guilds.get(guild_id)
    channel = guild.voice_channels.get(channel_id) if guild is not None else None
    if guild is not None and channel is not None and channel.user_limit:
        inside = sum(1 for state in guild.voice_states.values() if state.channel_id == channel_id)
        if inside >= channel.user_limit:
            return (
                f"joining timed out after {timeout:g} s: channel {channel.name!r} is full "
                f"({inside}/{channel.user_limit}). Raise its user limit or give the bot Move Members."
            )
    return (
        f"joining timed out after {timeout:g} s: Discord never answered. The usual cause is a missing "
        "permission: give the bot View Channel and Connect on this channel (and Speak to play audio)."
    )


async def wait_same_epoch(
    session: Session,
    participants: Sequence[Participant],
    timeout: float = 10.0,  # noqa: ASYNC109 - a bound on the whole wait
) -> None:
    """Wait until the bot and the emulator's participants share one ready DAVE group.

    Audio sent before a member holds the group's keys cannot be decrypted by that member, so a scenario that
    counts frames starts only after this.
    """
    async with asyncio.timeout(timeout):
        while True:
            dave = session.dave
            if (
                dave is not None
                and dave.ready
                and all(p.dave_ready and p.epoch == dave.epoch for p in participants)
            ):
                return
            await asyncio.sleep(0.01)
