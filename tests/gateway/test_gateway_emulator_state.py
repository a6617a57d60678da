"""The emulator's sans-IO world model: ids, validation, voice sessions and the voice-server directory."""

from __future__ import annotations

import itertools

import pytest

from cordvoice.emulator import ChannelType, EmulatorState, VoiceChangeCause
from cordvoice.emulator.state import DISCORD_EPOCH_MS, SnowflakeGenerator
from cordvoice.errors import EmulatorError


def make_state() -> tuple[EmulatorState, int, int, int]:
    state = EmulatorState()
    state.register_voice_server("127.0.0.1:1000")
    bot = state.create_bot("bot")
    guild = state.create_guild("g", members=[bot.user_id])
    channel = state.create_channel(guild.id, "General", ChannelType.GUILD_VOICE)
    return state, bot.user_id, guild.id, channel.id


def test_snowflakes_strictly_increase_and_carry_the_time() -> None:
    frozen = SnowflakeGenerator(clock=lambda: 1_700_000_000.0)
    ids = [frozen.next() for _ in range(5000)]  # more than 4096 per millisecond
    assert all(a < b for a, b in itertools.pairwise(ids))
    assert (ids[0] >> 22) + DISCORD_EPOCH_MS == 1_700_000_000_000
    state = EmulatorState()
    first, second = state.create_user("a").id, state.create_user("b").id
    assert first < second and first > 1 << 50


def test_unknown_ids_raise_emulator_error() -> None:
    state, bot, guild, channel = make_state()
    for call in (
        lambda: state.guild(1),
        lambda: state.channel(1),
        lambda: state.user(1),
        lambda: state.voice_server(99),
        lambda: state.create_channel(1, "x", ChannelType.GUILD_VOICE),
        lambda: state.add_member(guild, 1),
        lambda: state.create_guild("g", members=[1]),
        lambda: state.update_voice_state(guild, state.create_user("stranger").id, channel, session_id="s"),
        lambda: state.update_voice_state(guild, bot, 1, session_id="s"),
        lambda: state.delete_channel(1),
    ):
        with pytest.raises(EmulatorError):
            call()


def test_channels_dave_defaults_and_limits() -> None:
    state, bot, guild, channel = make_state()
    assert state.channel(channel).dave_required and state.channel(channel).dave_protocol_version == 1
    stage = state.create_channel(guild, "Stage", ChannelType.GUILD_STAGE_VOICE)
    assert not stage.dave_required and stage.dave_protocol_version == 0
    with pytest.raises(EmulatorError):
        state.create_channel(guild, "Stage", ChannelType.GUILD_STAGE_VOICE, dave_required=True)
    with pytest.raises(EmulatorError):
        state.create_channel(guild, "Big", ChannelType.GUILD_VOICE, user_limit=100)
    change = state.update_voice_state(guild, bot, stage.id, session_id="s")
    assert change is not None and change.after is not None and change.after.suppress


def test_user_limit_counts_only_newcomers() -> None:
    state, bot, guild, _ = make_state()
    tiny = state.create_channel(guild, "Tiny", ChannelType.GUILD_VOICE, user_limit=1)
    other = state.create_user("other")
    state.add_member(guild, other.id)
    state.update_voice_state(guild, bot, tiny.id, session_id="s")
    assert not state.channel_is_full(tiny.id, bot)
    assert state.channel_is_full(tiny.id, other.id)
    with pytest.raises(EmulatorError, match="full"):
        state.update_voice_state(guild, other.id, tiny.id, session_id="t")


def test_voice_sessions_are_issued_checked_and_revoked() -> None:
    state, bot, guild, channel = make_state()
    change = state.update_voice_state(
        guild, bot, channel, session_id="gw1", cause=VoiceChangeCause.GATEWAY_REQUEST
    )
    assert change is not None and change.joined and change.issued is not None and change.revoked is None
    issued = change.issued
    assert issued.endpoint == "127.0.0.1:1000" and len(issued.token) == 16 and issued.server_id == guild
    assert issued.token not in repr(issued)
    assert state.lookup_voice_session(guild, bot, "gw1", issued.token) == issued
    assert state.lookup_voice_session(guild, bot, "gw1", "wrong") is None
    assert state.lookup_voice_session(guild, bot, "other", issued.token) is None
    assert state.lookup_voice_session(1, bot, "gw1", issued.token) is None
    # Flags only: same session. Revoked: a new one for the same channel.
    flags = state.update_voice_state(guild, bot, channel, session_id="gw1", self_mute=True)
    assert flags is not None and flags.issued is None and flags.after is not None and flags.after.self_mute
    assert state.revoke_voice_session(guild, bot) == issued
    again = state.update_voice_state(guild, bot, channel, session_id="gw1")
    assert again is not None and again.issued is not None and again.issued.token != issued.token
    # Leaving revokes; leaving twice is a no-op.
    left = state.update_voice_state(guild, bot, None, session_id="gw1")
    assert left is not None and left.left and left.revoked == again.issued
    assert state.update_voice_state(guild, bot, None, session_id="gw1") is None
    assert state.voice_session(guild, bot) is None


def test_move_guild_reissues_every_session_on_the_new_server() -> None:
    state, bot, guild, channel = make_state()
    first = state.update_voice_state(guild, bot, channel, session_id="gw1")
    assert first is not None and first.issued is not None
    second = state.register_voice_server("127.0.0.1:2000")
    with pytest.raises(EmulatorError):
        state.unregister_voice_server(first.issued.voice_server_id)
    (change,) = state.move_guild(guild, second.id)
    assert change.cause is VoiceChangeCause.SERVER_MOVE and change.before == change.after
    assert change.revoked == first.issued
    assert change.issued is not None and change.issued.endpoint == "127.0.0.1:2000"
    assert state.voice_sessions_on(second.id) == [change.issued]
    state.unregister_voice_server(first.issued.voice_server_id)


def test_guilds_spread_over_voice_servers() -> None:
    state, bot, guild, _ = make_state()
    state.register_voice_server("127.0.0.1:2000")
    other = state.create_guild("h", members=[bot])
    assert state.guild_voice_server(guild).id != state.guild_voice_server(other.id).id
    with pytest.raises(EmulatorError):
        EmulatorState().register_voice_server("ws://127.0.0.1:1")
    empty = EmulatorState()
    lonely = empty.create_guild("x")
    with pytest.raises(EmulatorError, match="no voice server"):
        empty.guild_voice_server(lonely.id)


def test_channel_deletion_and_gateway_session_end_remove_voice_states() -> None:
    state, bot, guild, channel = make_state()
    human = state.create_user("human")
    state.add_member(guild, human.id)
    state.update_voice_state(guild, bot, channel, session_id="gw1")
    state.update_voice_state(guild, human.id, channel, session_id="p1")
    (ended,) = state.end_gateway_session("gw1")
    assert ended.cause is VoiceChangeCause.GATEWAY_SESSION_ENDED and ended.user_id == bot
    _, changes = state.delete_channel(channel)
    assert [(c.user_id, c.cause) for c in changes] == [(human.id, VoiceChangeCause.CHANNEL_DELETED)]
    assert state.voice_state(guild, human.id) is None
    with pytest.raises(EmulatorError):
        state.channel(channel)


def test_server_flags_persist_across_joins() -> None:
    state, bot, guild, channel = make_state()
    assert state.set_server_voice_flags(guild, bot, mute=True) is None
    change = state.update_voice_state(guild, bot, channel, session_id="gw1")
    assert change is not None and change.after is not None and change.after.mute
    flags = state.set_server_voice_flags(guild, bot, deaf=True)
    assert flags is not None and flags.after is not None and flags.after.deaf and flags.issued is None


def test_tokens_are_discord_shaped_and_unique() -> None:
    state = EmulatorState()
    bots = [state.create_bot(f"b{i}") for i in range(3)]
    assert len({b.token for b in bots}) == 3
    assert all(b.token.count(".") == 2 for b in bots)
    assert all(b.token not in repr(b) for b in bots)
    assert state.user_for_token(bots[1].token) is state.user(bots[1].user_id)
    assert state.user_for_token("nope") is None
