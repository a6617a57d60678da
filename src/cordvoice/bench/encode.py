"""``bench encode``: how many streams one core sustains when the audio must be encoded to Opus.

Everything runs in one child process pinned to one core (its worker threads included), at ``bitrate``
(96 kbit/s by default; constrained VBR, complexity 10, the player's defaults), on music-like PCM
(:func:`~cordvoice.audio.samples.demo_pcm`) and on an MP3 of it written with PyAV's libmp3lame (44.1 kHz,
192 kbit/s, the usual music-bot input). Two measurements for each input:

* **codec**: one thread in a tight loop, the floor: Opus encoding of 20 ms frames (PCM), or MP3 decoding,
  resampling to 48 kHz and encoding (MP3);
* **player**: ``streams`` :class:`~cordvoice.audio.player.Player` objects, each pulled once per 20 ms tick
  of the shared clock exactly as a session's transmit lane pulls it, reading the file on the source threads
  and encoding on the codec thread. This is the library's real path; it also shows whether every stream
  kept real time (``frames_per_second_per_stream`` ≈ 50).

``streams_per_core`` = 20 ms ÷ CPU per frame (process CPU, all threads, over the measurement window).
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cordvoice.audio.pcm import FRAME_BYTES, SAMPLE_RATE, iter_frames
from cordvoice.bench.machine import CpuSnapshot, machine_info, plan_placement
from cordvoice.bench.process import BenchError, ChildProcess
from cordvoice.bench.profile import SpyRecording, summarize
from cordvoice.errors import InvalidArgumentError

__all__ = ["EncodeWorker", "encode_container", "run_encode", "write_mp3"]

logger = logging.getLogger(__name__)

_FRAME_US = 20_000.0


def encode_container(
    pcm: bytes,
    container_format: str,
    codec: str,
    *,
    rate: int = SAMPLE_RATE,
    layout: str = "stereo",
    sample_format: str | None = None,
    bit_rate: int | None = None,
    options: dict[str, str] | None = None,
) -> bytes:
    """Encode 48 kHz stereo s16 PCM into a container in memory with PyAV (MP3, Ogg/WebM Opus, WAV, FLAC...).

    The audio is resampled to ``rate``, ``layout`` and ``sample_format`` (None: the codec's own format);
    ``options`` are the codec's (e.g. libopus ``frame_duration``). Benchmarks and tests make their input
    files with it.
    """
    import av  # noqa: PLC0415 - heavy import, only here
    import numpy as np  # noqa: PLC0415

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container_format) as container:
        stream = container.add_stream(codec, rate=rate)
        if not isinstance(stream, av.AudioStream):
            raise InvalidArgumentError(f"{codec!r} is not an audio codec")
        stream.layout = layout
        if sample_format is not None:
            stream.codec_context.format = sample_format
        if bit_rate:
            stream.bit_rate = bit_rate
        if options:
            stream.codec_context.options = options
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        frame = av.AudioFrame.from_ndarray(
            np.frombuffer(pcm, dtype="<i2").reshape(1, -1), format="s16", layout="stereo"
        )
        frame.sample_rate = SAMPLE_RATE
        frame.pts = 0
        for chunk in [*resampler.resample(frame), *resampler.resample(None)]:
            chunk.pts = None
            for packet in stream.encode(chunk):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return buffer.getvalue()


def write_mp3(path: Path, pcm: bytes, *, bit_rate: int = 192_000, rate: int = 44_100) -> Path:
    """Encode 48 kHz stereo s16 PCM to an MP3 file with PyAV's bundled libmp3lame."""
    path.write_bytes(encode_container(pcm, "mp3", "libmp3lame", rate=rate, bit_rate=bit_rate))
    return path


def _pull(tick: Callable[[Any], None], player: Any, deadline: float) -> None:
    del deadline
    tick(player)


def _per_frame(cpu_s: float, frames: int) -> dict[str, float | int]:
    us = cpu_s / frames * 1e6 if frames else 0.0
    return {
        "frames": frames,
        "cpu_us_per_frame": round(us, 1),
        "streams_per_core": round(_FRAME_US / us, 1) if us else 0.0,
    }


class EncodeWorker:
    """Commands ``codec`` and ``player`` (see the module docstring)."""

    def __init__(self, *, bitrate: int, seconds_of_audio: float = 10.0) -> None:
        self.bitrate = bitrate
        self.seconds_of_audio = seconds_of_audio
        self._folder = tempfile.TemporaryDirectory(prefix="cordvoice-bench-")

    async def start(self) -> None:
        from cordvoice.audio.samples import demo_pcm  # noqa: PLC0415

        self.pcm = demo_pcm(self.seconds_of_audio)
        self.mp3 = write_mp3(Path(self._folder.name) / "music.mp3", self.pcm)

    async def close(self) -> None:
        from cordvoice.audio.workers import get_workers  # noqa: PLC0415

        del get_workers  # the worker threads are daemons; nothing to stop
        self._folder.cleanup()

    async def cmd_codec(self, *, seconds: float) -> dict[str, Any]:
        """Single-thread tight loops: encode PCM frames; decode + resample + encode the MP3."""
        return {
            "pcm": await asyncio.to_thread(self._codec_pcm, seconds),
            "mp3": await asyncio.to_thread(self._codec_mp3, seconds),
        }

    def _codec_pcm(self, seconds: float) -> dict[str, Any]:
        from cordvoice.audio.opus import OpusEncoder  # noqa: PLC0415

        frames = [f for f in iter_frames(self.pcm) if len(f) == FRAME_BYTES]
        count = 0
        sizes = 0
        with OpusEncoder(bitrate=self.bitrate) as encoder:
            start = time.thread_time()
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                for frame in frames:
                    sizes += len(encoder.encode(frame))
                count += len(frames)
            cpu = time.thread_time() - start
        return {**_per_frame(cpu, count), "mean_packet_bytes": round(sizes / count, 1)}

    def _codec_mp3(self, seconds: float) -> dict[str, Any]:
        from cordvoice.audio.decode import PCMDecoder  # noqa: PLC0415
        from cordvoice.audio.opus import OpusEncoder  # noqa: PLC0415

        count = 0
        cpu = 0.0
        with OpusEncoder(bitrate=self.bitrate) as encoder:
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                start = time.thread_time()
                with PCMDecoder(str(self.mp3)) as decoder:
                    for frame in decoder:
                        if len(frame) == FRAME_BYTES:
                            encoder.encode(frame)
                            count += 1
                cpu += time.thread_time() - start
        return _per_frame(cpu, count)

    async def cmd_player(
        self, *, streams: int, seconds: float, source: str, warmup: float = 2.0
    ) -> dict[str, Any]:
        """``streams`` players at ``bitrate`` on the shared clock, each pulled once per tick."""
        from cordvoice.audio.clock import get_clock  # noqa: PLC0415
        from cordvoice.audio.player import Player  # noqa: PLC0415
        from cordvoice.audio.workers import get_mailbox, get_workers  # noqa: PLC0415

        clock = get_clock()
        mailbox = get_mailbox(asyncio.get_running_loop())
        workers = get_workers()

        def counters() -> tuple[int, ...]:
            return (
                mailbox.woken,
                mailbox.quiet,
                workers.codec.jobs_run,
                workers.source.jobs_run,
                sum(p.stats.render_jobs for p in players),
            )

        players = [Player(bitrate=self.bitrate) for _ in range(streams)]
        pulled = [0, 0]  # frames handed out, ticks without a frame

        def tick(player: Player) -> None:
            if player.pull() is None:
                pulled[1] += 1
            else:
                pulled[0] += 1

        item: Any = self.pcm if source == "pcm" else str(self.mp3)
        for player in players:
            player.play(item, loop=True)
        subscriptions = [  # with the weight a session's transmit lane gives its player
            clock.subscribe(functools.partial(_pull, tick, p), weight=getattr(p, "tick_weight", 1))
            for p in players
        ]
        try:
            await asyncio.sleep(warmup)
            frames0, empty0 = pulled
            counted0 = counters()
            begin = CpuSnapshot.take()
            await asyncio.sleep(seconds)
            end = CpuSnapshot.take()
            frames, empty = pulled[0] - frames0, pulled[1] - empty0
            woken, quiet, codec_jobs, source_jobs, render_jobs = (
                after - before for after, before in zip(counters(), counted0, strict=True)
            )
        finally:
            for sub in subscriptions:
                sub.cancel()
            for player in players:
                player.close()
        cpu = end.since(begin)
        late = sum(p.stats.late_frames for p in players)
        return {
            "streams": streams,
            **_per_frame(cpu["cpu_s"], frames),
            "cpu": cpu,
            "frames_per_second_per_stream": round(frames / cpu["wall_s"] / streams, 2),
            "empty_ticks": empty,
            "late_frames": late,
            # How work reached the codec and came back: jobs per second, and how many results woke the loop.
            "codec_jobs_per_s": round(codec_jobs / cpu["wall_s"], 1),
            "players_per_codec_job": round(render_jobs / codec_jobs, 2) if codec_jobs else 0.0,
            "source_jobs_per_s": round(source_jobs / cpu["wall_s"], 1),
            "results_waking_loop_per_s": round(woken / cpu["wall_s"], 1),
            "results_without_wakeup_per_s": round(quiet / cpu["wall_s"], 1),
        }


def run_encode(
    *,
    streams: int = 40,
    seconds: float = 10.0,
    bitrate: int = 96_000,
    warmup: float = 2.0,
    profile_dir: Path | None = None,
    log_level: int = logging.WARNING,
) -> dict[str, Any]:
    """Run the encode benchmark; returns its JSON-ready report (``profile_dir``: py-spy profiles there)."""
    if streams < 1:
        raise BenchError("--streams must be at least 1")
    if seconds <= 0:
        raise BenchError("--seconds must be positive")
    placement = plan_placement()
    core = placement.bench_core
    report: dict[str, Any] = {
        "benchmark": "encode",
        "bitrate": bitrate,
        "seconds": seconds,
        "streams": streams,
        "placement": "everything pinned to one core" if core is not None else "not pinned",
        "core": core,
        "machine": machine_info(),
    }
    worker = ChildProcess(
        "cordvoice.bench.encode:EncodeWorker",
        name="encoder",
        core=core,
        options={"bitrate": bitrate},
        log_level=log_level,
    )
    with worker:
        report["codec"] = worker.call("codec", seconds=seconds, timeout=seconds * 4 + 120)
        report["player"] = {}
        for source in ("pcm", "mp3"):
            path = None if profile_dir is None else profile_dir / f"encode-{source}-{streams}.txt"
            recording = None
            if path is not None:
                # started now, so it samples the warm-up too; give it the whole call
                recording = SpyRecording(worker.info["pid"], warmup + seconds, path)
            result = worker.call(
                "player",
                streams=streams,
                seconds=seconds,
                source=source,
                warmup=warmup,
                timeout=seconds * 4 + warmup + 120,
            )
            if recording is not None and path is not None:
                error = recording.wait()
                result["profile"] = {"file": str(path), "error": error or None}
                if not error and path.exists():
                    result["profile"].update(summarize(path))
            report["player"][source] = result
    report["streams_per_core"] = {
        source: report["player"][source]["streams_per_core"] for source in ("pcm", "mp3")
    }
    return report
