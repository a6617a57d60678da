"""Render jobs batched across players, and results that come back without waking the loop."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cordvoice.audio.opus import packet_samples
from cordvoice.audio.player import Player
from cordvoice.audio.samples import tone
from cordvoice.audio.workers import WorkerPool, get_mailbox, get_workers


async def test_mailbox_result_waits_for_collect_unless_someone_waits() -> None:
    loop = asyncio.get_running_loop()
    pool = WorkerPool("mailbox-test", 1)
    mailbox = get_mailbox(loop)
    assert get_mailbox(loop) is mailbox
    got: list[object] = []
    finished = threading.Event()

    def job(value: int) -> int:
        return value * 3

    def quiet_done(result: object, error: BaseException | None) -> None:
        got.append(result)

    def wake_never() -> bool:
        finished.set()
        return False

    quiet_before = mailbox.quiet
    pool.submit(job, (2,), loop, quiet_done, wake=wake_never)
    async with asyncio.timeout(5):
        while not finished.is_set():
            await asyncio.sleep(0.005)
    for _ in range(5):
        await asyncio.sleep(0.005)  # loop iterations go by: nothing delivers the result by itself
    assert got == []
    assert len(mailbox) == 1
    assert mailbox.quiet == quiet_before + 1
    mailbox.collect()
    assert got == [6]
    assert len(mailbox) == 0

    woke = asyncio.Event()

    def loud_done(result: object, error: BaseException | None) -> None:
        got.append(result)
        woke.set()

    def broken_test() -> bool:
        raise ValueError("wake test broke")

    woken_before = mailbox.woken
    pool.submit(job, (5,), loop, loud_done, wake=lambda: True)
    async with asyncio.timeout(5):
        await woke.wait()
    woke.clear()
    pool.submit(job, (7,), loop, loud_done, wake=broken_test)  # a failing test wakes, to be safe
    async with asyncio.timeout(5):
        await woke.wait()
    assert got == [6, 15, 21]
    assert mailbox.woken == woken_before + 2

    def failing_done(result: object, error: BaseException | None) -> None:
        raise RuntimeError("callback broke")

    errors_before = mailbox.callback_errors
    woke.clear()
    pool.submit(job, (1,), loop, failing_done, wake=lambda: True)
    pool.submit(job, (9,), loop, loud_done, wake=lambda: True)
    async with asyncio.timeout(5):
        await woke.wait()
    assert mailbox.callback_errors == errors_before + 1
    assert got[-1] == 27
    pool.shutdown()


async def _tick_all(players: list[Player], ticks: int) -> list[list[bytes | None]]:
    """Pull every player once per tick in one loop callback, as the clock serves a slot."""
    out: list[list[bytes | None]] = [[] for _ in players]
    for _ in range(ticks):
        for index, player in enumerate(players):
            out[index].append(player.pull())
        await asyncio.sleep(0.02)
    return out


async def test_players_of_one_tick_share_a_codec_job_and_do_not_wake_the_loop() -> None:
    mailbox = get_mailbox(asyncio.get_running_loop())
    codec = get_workers().codec
    players = [Player(bitrate=64_000) for _ in range(6)]
    for index, player in enumerate(players):
        player.play(tone(300 + 100 * index, 3.0, amplitude=0.3))
    async with asyncio.timeout(10):
        while not all(p.playing and p.tracks and p.tracks[0].state.value == "playing" for p in players):
            await _tick_all(players, 1)
    await _tick_all(players, 10)  # warm: every player streams
    jobs_before = codec.jobs_run
    renders_before = sum(p.stats.render_jobs for p in players)
    woken_before, quiet_before = mailbox.woken, mailbox.quiet
    out = await _tick_all(players, 50)
    codec_jobs = codec.jobs_run - jobs_before
    render_jobs = sum(p.stats.render_jobs for p in players) - renders_before
    for packets in out:
        assert None not in packets  # one frame per tick, none late
        assert all(packet_samples(p) == 960 for p in packets if p is not None)
    assert sum(p.stats.late_frames for p in players) == 0
    # Six players each render about every other tick; batched, a tick costs one codec job, not six.
    assert render_jobs >= 6 * 20
    assert codec_jobs <= render_jobs / 3
    # Every player still had frames when its batch finished: the results waited for a pull.
    assert mailbox.quiet - quiet_before >= codec_jobs - 2
    assert mailbox.woken - woken_before <= 2
    for player in players:
        player.close()


async def test_a_starting_player_is_woken_and_closing_frees_the_encoder_without_pulls() -> None:
    player = Player(bitrate=64_000)
    track = player.play(tone(500, 2.0))
    frames: list[bytes] = []
    async with asyncio.timeout(5):
        while len(frames) < 5:
            packet = player.pull()
            if packet is not None:
                frames.append(packet)
            await asyncio.sleep(0.02)
    # Not streaming at first, so the first batch woke the loop; now it streams.
    assert player.stats.encoded_frames >= 5
    await asyncio.sleep(0.015)
    player.pull()  # starts another render job: results now wait for a pull that never comes
    assert player._rendering or player._out
    player.close()
    encoder = player._encoder
    async with asyncio.timeout(5):
        while encoder._encoder is not None or player._rendering:
            await asyncio.sleep(0.005)
    assert await track.wait() is not None
    assert player.closed


@pytest.mark.parametrize("threads", [2])
async def test_a_large_batch_is_split_over_codec_threads(threads: int) -> None:
    from cordvoice.audio import workers  # noqa: PLC0415 - swapped for the test

    original = workers.get_workers()
    workers.configure_workers(codec_threads=threads)
    try:
        players = [Player(bitrate=64_000) for _ in range(8)]
        for player in players:
            player.play(tone(700, 2.0))
        async with asyncio.timeout(10):
            while not all(p.stats.encoded_frames >= 4 for p in players):
                await _tick_all(players, 1)
        out = await _tick_all(players, 20)
        assert all(None not in packets for packets in out)
        assert get_workers().codec.threads == threads  # two parts at once started the second thread
        for player in players:
            player.close()
    finally:
        workers.configure_workers(
            source_threads=original.source.max_threads, codec_threads=original.codec.max_threads
        )
