"""DAVE over the network: participants form, grow, shrink, recover and reset groups under shuffled delivery.

Every seed gets its own channels in one emulator, with ``set_delivery_order(channel, seed)``: each batch of
messages the voice server produces reaches the members' sockets in a seeded shuffled order with random
delays (a socket's own messages stay in order). All seeds run concurrently. After each step every member
must hold the delivery service's epoch and roster, the same privacy code, and decrypt every other member's
frames.
"""

from __future__ import annotations

import asyncio

from cordvoice.emulator import Emulator, Guild, Participant
from cordvoice.emulator.dave_ds import MALFORMED_INPUT_REASONS

from .emulator_helpers import exchange_audio, opaque_frames, wait_converged

SEEDS = range(20)
MAX_DELAY = 0.008


async def settle(emu: Emulator, members: list[Participant], tag: int) -> None:
    await wait_converged(members, emu, timeout=15)
    await exchange_audio(members, tag)


def clean(members: list[Participant], *, recoveries: dict[int, int] | None = None) -> None:
    for member in members:
        expected = (recoveries or {}).get(member.user_id, 0)
        assert member.stats.recoveries == expected, (member, member.stats.dave_errors)
        assert member.stats.dave_errors.total() == 0, (member, member.stats.dave_errors)
        assert member.stats.transport_undecryptable == 0


async def growth_and_churn(emu: Emulator, guild: Guild, seed: int) -> tuple[tuple[int, ...], ...]:
    channel = emu.create_voice_channel(guild.id, f"churn-{seed}")
    emu.set_delivery_order(channel.id, seed, MAX_DELAY)

    async def join(name: str) -> Participant:
        return await emu.add_participant(channel.id, name=f"{name}-{seed}")

    # 2 members form a group.
    a, b = await asyncio.gather(join("a"), join("b"))
    await settle(emu, [a, b], 1)
    assert a.epoch == 1
    # 3 members join an established group at once.
    c, d, e = await asyncio.gather(join("c"), join("d"), join("e"))
    await settle(emu, [a, b, c, d, e], 2)
    # A later join.
    f = await join("f")
    await settle(emu, [a, b, c, d, e, f], 3)
    # One leaves, then two leave at once.
    await f.leave()
    await settle(emu, [a, b, c, d, e], 4)
    await asyncio.gather(d.leave(), e.leave())
    await settle(emu, [a, b, c], 5)
    # b fails the commit that adds g: it sends op 31, is removed and re-added.
    b.fail_next_commit()
    g = await join("g")
    await settle(emu, [a, b, c, g], 6)
    clean([a, b, c, g], recoveries={b.user_id: 1})
    fingerprint = tuple(emu.inspect(p.user_id).opcode_order for p in (a, b, c))
    # Down to one member: it is reset to a pending group, then the channel grows again.
    await asyncio.gather(b.leave(), c.leave(), g.leave())
    await a.wait_until(lambda: a.epoch == 0 and not a.dave_ready, timeout=5)
    assert emu.inspect(a.user_id).dave_roster == {}
    h = await join("h")
    await settle(emu, [a, h], 7)
    assert a.epoch == 1, "a new group starts at epoch 1"
    clean([a, h])
    ds = emu.voice_server().core.calls[channel.id].dave
    assert ds is not None
    assert ds.counters["group_resets"] == 1 and ds.counters["invalid_commit_welcome"] == 1
    assert not any(ds.counters[reason] for reason in MALFORMED_INPUT_REASONS), ds.counters
    return fingerprint


async def three_at_once_then_a_failing_joiner(emu: Emulator, guild: Guild, seed: int) -> None:
    channel = emu.create_voice_channel(guild.id, f"fresh-{seed}")
    emu.set_delivery_order(channel.id, 1000 + seed, MAX_DELAY)
    # 3 members join an empty channel at once: every pending member commits, one commit wins.
    p, q, r = await asyncio.gather(
        *(emu.add_participant(channel.id, name=f"{n}-{seed}") for n in ("p", "q", "r"))
    )
    await settle(emu, [p, q, r], 11)
    assert p.epoch in (1, 2), "one commit, or two when a key package came late"
    # A joiner whose Welcome fails sends op 31 and gets in with its next key package.
    s = await emu.add_participant(channel.id, name=f"s-{seed}", fail_commits=1)
    await settle(emu, [p, q, r, s], 12)
    clean([p, q, r, s], recoveries={s.user_id: 1})


async def test_dave_scenarios_under_twenty_shuffled_delivery_orders() -> None:
    async with Emulator() as emu:
        bot = emu.create_bot()
        guild = emu.create_guild("dave guild", members=[bot.user_id])
        results = await asyncio.gather(
            *(growth_and_churn(emu, guild, seed) for seed in SEEDS),
            *(three_at_once_then_a_failing_joiner(emu, guild, seed) for seed in SEEDS),
        )
        fingerprints = [result for result in results if result is not None]
        assert len(fingerprints) == len(SEEDS)
        # The seeds really produced different interleavings (who committed how often differs).
        assert len(set(fingerprints)) > 1
        assert emu.voice_server().media.counters["undecryptable"] == 0


async def test_stage_channel_runs_dave_version_zero_and_audio_flows() -> None:
    async with Emulator() as emu:
        bot = emu.create_bot()
        guild = emu.create_guild("stage guild", members=[bot.user_id])
        stage = emu.create_stage_channel(guild.id)
        members = list(await asyncio.gather(*(emu.add_participant(stage.id) for _ in range(3))))
        for member in members:
            assert member.dave_protocol_version == 0
            assert member.dave_session is None and member.epoch is None
            assert member.stats.opcodes_received.keys().isdisjoint(range(21, 32)), "no DAVE opcode at all"
        await exchange_audio(members, 21)
        first, second = members[0], members[1]
        assert not any(frame.dave for frame in second.frames_from(first.user_id))
        assert emu.inspect(first.user_id).dave_epoch is None
        # A plain frame on a DAVE channel, by contrast, is not audio for DAVE members.
        assert opaque_frames(1, 1)[0] not in second.payloads_from(first.user_id)
