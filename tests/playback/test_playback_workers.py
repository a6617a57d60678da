"""The shared worker pools and the codec-thread render job."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from cordvoice.audio.mixdown import DecoderSlot, EncoderSlot, MixInput, render
from cordvoice.audio.opus import OpusDecoder, packet_samples
from cordvoice.audio.pcm import FRAME_BYTES, SILENCE_FRAME
from cordvoice.audio.samples import tone
from cordvoice.audio.workers import WorkerPool, default_codec_threads
from cordvoice.errors import InvalidArgumentError

from .playback_helpers import encode_frames, to_mono, tone_level


async def test_pool_runs_jobs_on_bounded_threads_and_reports_errors() -> None:
    loop = asyncio.get_running_loop()
    pool = WorkerPool("test", 3)
    results: list[tuple[object, BaseException | None]] = []
    done = asyncio.Event()
    names: set[str] = set()

    def job(i: int) -> int:
        names.add(threading.current_thread().name)
        time.sleep(0.01)
        if i == 7:
            raise ValueError("seven")
        return i * 2

    def finished(result: object, error: BaseException | None) -> None:
        results.append((result, error))
        if len(results) == 20:
            done.set()

    for i in range(20):
        pool.submit(job, (i,), loop, finished)
    async with asyncio.timeout(5):
        await done.wait()
    assert pool.threads == 3
    assert len(names) == 3
    assert sorted(r for r, e in results if e is None) == sorted(i * 2 for i in range(20) if i != 7)
    assert [type(e) for r, e in results if e is not None] == [ValueError]
    assert pool.jobs_failed == 1
    pool.shutdown()
    with pytest.raises(RuntimeError):
        pool.submit(job, (1,), loop, finished)
    with pytest.raises(InvalidArgumentError):
        WorkerPool("none", 0)
    assert 1 <= default_codec_threads() <= 4


def test_render_mixes_decodes_and_conceals() -> None:
    low = tone(440, 0.2, amplitude=0.3)
    packets = encode_frames(tone(1500, 0.2, amplitude=0.2), bitrate=128_000)
    encoder = EncoderSlot(bitrate=128_000, fec=False, expected_loss=0, complexity=10)
    decoder = DecoderSlot()
    frames = [
        [
            MixInput(low[i * FRAME_BYTES : (i + 1) * FRAME_BYTES], 1.0, None),
            MixInput(packets[i], 0.5, decoder),
        ]
        for i in range(10)
    ]
    frames.append([MixInput(b"\xff\xff\xff", 1.0, decoder)])  # garbage: concealed, counted
    frames.append([])  # nobody contributed: silence
    out = render(frames, encoder)
    assert len(out) == 12
    assert all(packet_samples(p) == 960 for p in out)
    assert decoder.errors == 1
    with OpusDecoder() as check:
        pcm = b"".join(check.decode(p) for p in out[:10])
    mono = to_mono(pcm)[1920:]
    assert tone_level(mono, 440) == pytest.approx(0.3, rel=0.1)
    assert tone_level(mono, 1500) == pytest.approx(0.1, rel=0.15)
    encoder.bitrate = 32_000
    assert len(render([[MixInput(SILENCE_FRAME, 1.0, None)]], encoder)) == 1
    encoder.close()
    decoder.close()
