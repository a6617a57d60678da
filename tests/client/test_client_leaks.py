"""200 consecutive joins and leaves leave no task, socket or file descriptor behind (measured here)."""

from __future__ import annotations

import asyncio
import gc
import os
from pathlib import Path

from cordvoice.audio.clock import get_clock

from .conftest import VoiceWorld, opus_frames, wait_until

CYCLES = 200


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def socket_fds() -> int:
    count = 0
    for entry in Path("/proc/self/fd").iterdir():
        try:
            if os.readlink(entry).startswith("socket:"):
                count += 1
        except OSError:
            continue  # closed while listing
    return count


async def settle() -> None:
    """Let closing transports run their connection_lost callbacks."""
    for _ in range(5):
        await asyncio.sleep(0.01)
    gc.collect()


async def test_client_200_join_leave_cycles_leak_nothing(world: VoiceWorld) -> None:
    emu, voice = world.emu, world.voice
    guild_id, channel_id = world.guild.id, world.channel.id
    listener = await emu.add_participant(channel_id, name="listener")
    frame = opus_frames(1)[0]

    async def cycle(index: int) -> None:
        session = await voice.join_channel(guild_id, channel_id)
        if index % 20 == 0:  # now and then, actually send something through the lane
            await wait_until(lambda: session.dave_ready, 5)
            await session.write(frame)
            await session.stop_speaking()
        await voice.leave(guild_id)
        assert session.closed

    await cycle(0)
    await settle()
    tasks_before = len(asyncio.all_tasks())
    fds_before, sockets_before = open_fds(), socket_fds()
    clock = get_clock()

    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(120):
        for index in range(1, CYCLES + 1):
            await cycle(index)
    elapsed = loop.time() - started
    await settle()

    tasks_after = len(asyncio.all_tasks())
    fds_after, sockets_after = open_fds(), socket_fds()
    print(
        f"{CYCLES} cycles in {elapsed:.2f} s ({elapsed / CYCLES * 1000:.1f} ms each); tasks {tasks_before}->"
        f"{tasks_after}, fds {fds_before}->{fds_after}, sockets {sockets_before}->{sockets_after}"
    )
    assert voice.sessions == {}
    assert tasks_after <= tasks_before, [t.get_name() for t in asyncio.all_tasks()]
    assert fds_after <= fds_before
    assert sockets_after <= sockets_before
    assert clock.subscribers == 0, "every transmit lane unsubscribed from the shared clock"
    assert listener.connected, "the other member saw 200 joins and leaves and is still fine"
    server = emu.voice_server(guild_id=guild_id)
    assert server.stats.identifies >= CYCLES + 1
