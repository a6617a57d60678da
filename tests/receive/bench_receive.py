"""Per-packet costs of the receive path (run by hand: ``python -m tests.receive.bench_receive``).

Measures, one core, best of a few runs: transport decryption (AES-256-GCM ``open_rtp``), DAVE decryption
(``DaveClient.decrypt``), the pipeline without DAVE (SSRC lookup, jitter push, per-tick pop, frame objects),
the whole pipeline with DAVE for many simultaneous speakers, and Opus decoding through ``run_decode_jobs``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cordvoice.audio.opus import OpusDecoder
from cordvoice.audio.receive_pipeline import DecodeJob, ReceivePipeline, run_decode_jobs
from cordvoice.audio.samples import speech_like
from cordvoice.udp.crypto import MODE_AES256_GCM, make_cipher
from cordvoice.udp.rtp import build_header

from .receive_helpers import DaveGroup, encode_pcm, rtp_header

FRAMES = encode_pcm(speech_like(1.0, voice=1))


def best(run: Callable[[], float], repeat: int = 5) -> float:
    return min(run() for _ in range(repeat))


def transport_decrypt(count: int = 20_000) -> float:
    cipher = make_cipher(MODE_AES256_GCM, bytes(range(32)))
    packets = [cipher.seal(build_header(i & 0xFFFF, i * 960, 7), FRAMES[i % 50], i) for i in range(count)]

    def run() -> float:
        start = time.perf_counter()
        for packet in packets:
            cipher.open_rtp(packet)
        return (time.perf_counter() - start) / count * 1e6

    return best(run)


def dave_group(senders: int) -> tuple[DaveGroup, list[int]]:
    group = DaveGroup()
    group.join(1)
    users = [1000 + i for i in range(senders)]
    for user in users:
        group.join(user)
        group.settle()
    return group, users


def dave_decrypt(group: DaveGroup, user: int, count: int = 20_000) -> float:
    sender = group.clients[user]
    ours = group.clients[1]
    frames = [sender.encrypt(FRAMES[i % 50]) for i in range(count)]
    start = time.perf_counter()
    for frame in frames:
        assert frame is not None
        ours.decrypt(user, frame)
    return (time.perf_counter() - start) / count * 1e6


def pipeline_run(streams: int, seconds: int, decrypt_group: DaveGroup | None, users: list[int]) -> float:
    """µs per packet for ``streams`` speakers over ``seconds`` (feed every packet, tick every 20 ms)."""
    ticks = seconds * 50
    payloads: list[list[bytes]] = []
    for tick in range(ticks):
        row = []
        for stream in range(streams):
            frame = FRAMES[tick % 50]
            if decrypt_group is not None:
                encrypted = decrypt_group.clients[users[stream % len(users)]].encrypt(frame)
                assert encrypted is not None
                frame = encrypted
            row.append(frame)
        payloads.append(row)
    headers = [[rtp_header(t, t * 960, 90_000 + s) for s in range(streams)] for t in range(ticks)]
    decrypt = decrypt_group.clients[1].decrypt if decrypt_group is not None else None
    pipeline = ReceivePipeline(decrypt)
    for stream in range(streams):
        pipeline.on_speaking(users[stream % len(users)] if users else 5000 + stream, 90_000 + stream, 1, 0.0)
    delivered = 0
    start = time.perf_counter()
    for tick in range(ticks):
        now = tick * 0.020
        row = payloads[tick]
        header_row = headers[tick]
        feed = pipeline.feed
        for stream in range(streams):
            feed(header_row[stream], row[stream], now)
        delivered += len(pipeline.tick(now).frames)
    elapsed = time.perf_counter() - start
    assert delivered >= streams * (ticks - 4), delivered
    return elapsed / (streams * ticks) * 1e6


def decode_cost(count: int = 2000) -> float:
    decoder = OpusDecoder()
    jobs = [DecodeJob(decoder, 0, FRAMES[i % 50], 960) for i in range(count)]
    start = time.perf_counter()
    run_decode_jobs(jobs)
    return (time.perf_counter() - start) / count * 1e6


def report(label: str, value: float, unit: str = "µs/packet") -> None:
    print(f"{label:<44} {value:6.2f} {unit}", flush=True)


def main() -> None:
    report("transport decrypt (AES-256-GCM open_rtp)", transport_decrypt())
    group, users = dave_group(10)
    report("DAVE decrypt, 10 epochs in the last 10 s", best(lambda: dave_decrypt(group, users[0])))
    report("pipeline + DAVE, 1000 streams, same", best(lambda: pipeline_run(1000, 2, group, users), 3))
    time.sleep(10.5)  # davey keeps every epoch's cryptors 10 s and tries them all: wait for steady state
    report("DAVE decrypt, steady state", best(lambda: dave_decrypt(group, users[0])))
    report("pipeline + DAVE, 1000 streams, steady", best(lambda: pipeline_run(1000, 2, group, users), 3))
    report("pipeline without DAVE, 1000 streams", best(lambda: pipeline_run(1000, 2, None, []), 3))
    report("Opus decode to PCM (run_decode_jobs)", best(decode_cost), "µs/frame")


if __name__ == "__main__":
    main()
