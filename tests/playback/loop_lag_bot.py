"""The bot process of the loop-lag acceptance test: ``python loop_lag_bot.py MP3`` with the emulator's details
(``cordvoice emulate --json``) on stdin; prints one JSON line of measurements.

A process of its own, so that the loop measured runs the bots and nothing else: not the emulator, and not
what hundreds of earlier tests left behind in the pytest process. One bot plays the MP3 in every guild's
DAVE channel; a second bot sits in each channel, so that every group forms and someone hears the audio.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
import time
from typing import Any

from cordvoice import Voice
from cordvoice.gateway import Client

MEASURE_SECONDS = 8.0
SLEEP = 0.005


async def measure(info: dict[str, Any], mp3: str) -> dict[str, Any]:
    clients: list[Client] = []
    voices: list[Voice] = []
    try:
        for bot in info["bots"]:
            client = Client(
                bot["token"], gateway_url=info["gateway_url"], api_base=info["api_base"], send_limit=None
            )
            await client.start()
            clients.append(client)
            voices.append(Voice(client, ssl=False))
        channels = [(int(g["id"]), int(g["voice_channels"][0]["id"])) for g in info["guilds"]]
        async with asyncio.timeout(60):
            listeners = await asyncio.gather(*(voices[1].join_channel(*c) for c in channels))
            sessions = await asyncio.gather(*(voices[0].join_channel(*c) for c in channels))
            while not all(s.dave_ready for s in [*sessions, *listeners]):
                await asyncio.sleep(0.05)
        tracks = [session.play(mp3) for session in sessions]
        await asyncio.sleep(1.5)  # every track started

        loop = asyncio.get_running_loop()
        lags: list[float] = []
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started = loop.time()
        sent_before = sum(s.stats.frames_sent for s in sessions)
        heard_before = sum(sum(s.stats.received_per_ssrc.values()) for s in listeners)
        while loop.time() - started < MEASURE_SECONDS:
            before = time.perf_counter()
            await asyncio.sleep(SLEEP)
            lags.append((time.perf_counter() - before - SLEEP) * 1000)
        elapsed = loop.time() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
        for track in tracks:
            track.stop()
        return {
            "sessions": len(sessions),
            "lags_ms": lags,
            "elapsed": elapsed,
            "cpu": (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime),
            "sent": sum(s.stats.frames_sent for s in sessions) - sent_before,
            "heard": sum(sum(s.stats.received_per_ssrc.values()) for s in listeners) - heard_before,
        }
    finally:
        for voice in voices:
            await voice.close()
        for client in clients:
            await client.close()


if __name__ == "__main__":
    details = json.loads(sys.stdin.readline())
    print(json.dumps(asyncio.run(measure(details, sys.argv[1]))))
