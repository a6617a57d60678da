"""``bench receive``: what it costs to receive N users speaking at once, and how many one core can take.

The traffic is real: a DAVE group (the delivery service's rules, real ``davey`` sessions on every side) with
``senders`` sending members and the receiving bot; every packet is a 20 ms Opus frame of speech-like audio,
DAVE-encrypted by its sender's own davey session, then sealed as an RTP packet with AES-256-GCM under the
receiver's transport key, exactly what an SFU forwards. Forming an MLS group costs davey O(members²) (about
a minute for 200 members), so ``users`` streams are spread over the ``senders`` real members: each stream
has its own SSRC, user id and jitter buffer, and its frames are decrypted with the keys of the member that
encrypted them (a one-line mapping in the decrypt callable), in the order that member encrypted them.

Two measurements, in one child process pinned to one core:

* **stages** (no sockets, no event loop): per-packet CPU of transport decryption, DAVE decryption, the
  receive pipeline without DAVE (SSRC lookup, jitter buffer, 20 ms playout ticks), the whole pipeline with
  DAVE, and Opus decoding to PCM;
* **end to end**: another process (pinned to the other core) replays the packets over loopback UDP at the
  real rate (every stream's packet once per 20 ms); the receiving process runs the client's own UDP
  connection (transport decryption) feeding a :class:`~cordvoice.audio.receiver.Receiver` with a consumer
  of every user's frames, once as Opus and once as PCM. ``cpu_us_per_packet`` is that process's CPU (all
  threads, kernel receive path included) per packet, and ``users_per_core`` = 20 ms ÷ it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cordvoice.audio.clock import get_clock
from cordvoice.bench.dave_group import DaveGroup
from cordvoice.bench.frames import opus_frames
from cordvoice.bench.gcwatch import GcWatch
from cordvoice.bench.machine import (
    CoreShare,
    CpuSnapshot,
    machine_info,
    pin_to_core,
    plan_placement,
    restores_affinity,
)
from cordvoice.bench.process import BenchError, ChildProcess
from cordvoice.bench.profile import SpyRecording, summarize
from cordvoice.dave.session import DaveClient
from cordvoice.errors import DaveDecryptError
from cordvoice.udp.crypto import MODE_AES256_GCM, TransportCipher, make_cipher
from cordvoice.udp.rtp import build_header

__all__ = ["Blaster", "ReceiveWorker", "Traffic", "run_receive"]

logger = logging.getLogger(__name__)

_FRAME_US = 20_000.0
_RECEIVERS = (1, 2, 3, 4, 5)
"""Receiving members: one per measurement that decrypts the traffic (DAVE refuses replays)."""
_FIRST_SENDER = 1_000
_FIRST_USER = 100_000
_FIRST_SSRC = 0x10_0000


class Traffic:
    """``seconds`` of packets from ``users`` streams over ``senders`` real DAVE members (module docstring)."""

    def __init__(self, *, users: int, seconds: float, senders: int) -> None:
        self.users = users
        self.senders = max(1, min(senders, users))
        self.ticks = max(1, round(seconds * 50))
        self.cipher: TransportCipher = make_cipher(MODE_AES256_GCM, os.urandom(32))
        started = time.monotonic()
        self.group = DaveGroup()
        for user_id in (*_RECEIVERS, *range(_FIRST_SENDER, _FIRST_SENDER + self.senders)):
            self.group.join(user_id)
        self.group.settle()
        if not self.group.ready:
            raise BenchError("the DAVE group did not form")
        self.group_seconds = time.monotonic() - started
        self.user_ids = [_FIRST_USER + u for u in range(users)]
        self.ssrcs = [_FIRST_SSRC + u for u in range(users)]
        self.sender_of = {_FIRST_USER + u: _FIRST_SENDER + u % self.senders for u in range(users)}
        voices = [opus_frames(1.0, voice=v) for v in range(4)]
        started = time.monotonic()
        packets: list[bytes] = []
        clients = self.group.clients
        nonce = 0
        for tick in range(self.ticks):
            header_fields = (tick & 0xFFFF, (tick * 960) & 0xFFFF_FFFF)
            for u in range(users):
                frame = voices[u % 4][tick % 50]
                sealed = clients[self.sender_of[_FIRST_USER + u]].encrypt(frame)
                if sealed is None:
                    raise BenchError("a sender could not DAVE-encrypt")
                header = build_header(*header_fields, self.ssrcs[u])
                packets.append(self.cipher.seal(header, sealed, nonce))
                nonce += 1
        self.packets = packets
        self.build_seconds = time.monotonic() - started

    def decrypt_for(self, receiver: int) -> Callable[[int, bytes], bytes]:
        """The receive path's DAVE decrypt for one receiving member, mapping streams to their senders."""
        client: DaveClient = self.group.clients[receiver]
        sender_of = self.sender_of

        def decrypt(user_id: int, frame: bytes) -> bytes:
            return client.decrypt(sender_of[user_id], frame)

        return decrypt


def _per_packet(cpu_s: float, packets: int) -> dict[str, float]:
    us = cpu_s / packets * 1e6 if packets else 0.0
    return {"cpu_us_per_packet": round(us, 3), "users_per_core": round(_FRAME_US / us, 1) if us else 0.0}


class ReceiveWorker:
    """The receiving process: builds the traffic, measures the stages, then receives the replayed packets."""

    def __init__(self, *, users: int, seconds: float, senders: int, gc_freeze: bool = True) -> None:
        self.traffic = Traffic(users=users, seconds=seconds, senders=senders)
        self.gc_freeze = gc_freeze
        self._udp: Any = None

    async def cmd_describe(self) -> dict[str, Any]:
        traffic = self.traffic
        return {
            "users": traffic.users,
            "senders": traffic.senders,
            "packets": len(traffic.packets),
            "mean_packet_bytes": round(sum(map(len, traffic.packets)) / len(traffic.packets), 1),
            "group_seconds": round(traffic.group_seconds, 2),
            "build_seconds": round(traffic.build_seconds, 2),
        }

    async def cmd_packets(self) -> list[bytes]:
        return self.traffic.packets

    # ---- stages -------------------------------------------------------------------------------------

    async def cmd_stages(self) -> dict[str, Any]:
        """Per-packet CPU of each stage of the receive path, single thread, no I/O."""
        from cordvoice.audio.opus import decode_slots  # noqa: PLC0415
        from cordvoice.audio.receive_pipeline import ReceivePipeline  # noqa: PLC0415

        traffic = self.traffic
        packets = traffic.packets
        count = len(packets)
        users = traffic.users
        results: dict[str, Any] = {}

        start = time.thread_time()
        opened = [traffic.cipher.open_rtp(p) for p in packets]
        results["transport_decrypt"] = _per_packet(time.thread_time() - start, count)

        decrypt = traffic.decrypt_for(_RECEIVERS[0])
        failures = 0
        plain: list[tuple[Any, bytes]] = []
        start = time.thread_time()
        for header, payload in opened:
            try:
                plain.append((header, decrypt(_FIRST_USER + header.ssrc - _FIRST_SSRC, payload)))
            except DaveDecryptError:
                failures += 1
        results["dave_decrypt"] = {**_per_packet(time.thread_time() - start, count), "failures": failures}

        def run_pipeline(pipeline: ReceivePipeline, *, datagrams: bool, pcm: bool) -> tuple[float, int, int]:
            for user_id, ssrc in zip(traffic.user_ids, traffic.ssrcs, strict=True):
                pipeline.map_ssrc(ssrc, user_id, 0.0)
            wants: Callable[[int], bool] | None = (lambda _user: True) if pcm else None
            frames = decoded = 0
            cpu = 0.0
            for tick in range(traffic.ticks):
                now = tick * 0.020
                batch = slice(tick * users, (tick + 1) * users)
                begin = time.thread_time()
                if datagrams:
                    for data in packets[batch]:
                        pipeline.feed_datagram(data, now, traffic.cipher)
                else:  # already decrypted: the jitter buffer and its bookkeeping alone
                    for header, payload in plain[batch]:
                        pipeline.feed(header, payload, now)
                output = pipeline.tick(now, wants)
                if pcm and output.jobs:
                    decoded += len(decode_slots([job for _, job in output.jobs]))
                cpu += time.thread_time() - begin
                frames += len(output.frames)
            return cpu, frames, decoded

        cpu, frames, _ = run_pipeline(ReceivePipeline(None), datagrams=False, pcm=False)
        results["jitter_buffer"] = {**_per_packet(cpu, count), "frames": frames}
        cpu, frames, _ = run_pipeline(
            ReceivePipeline(traffic.decrypt_for(_RECEIVERS[1])), datagrams=True, pcm=False
        )
        results["pipeline_to_opus"] = {**_per_packet(cpu, count), "frames": frames}
        cpu, frames, decoded = run_pipeline(
            ReceivePipeline(traffic.decrypt_for(_RECEIVERS[2])), datagrams=True, pcm=True
        )
        results["pipeline_to_pcm"] = {**_per_packet(cpu, count), "frames": frames, "decoded": decoded}
        return results

    # ---- end to end ---------------------------------------------------------------------------------

    async def cmd_listen(self, *, blaster_port: int) -> int:
        """Open the client's UDP connection towards the blaster; returns the local port to send to."""
        from cordvoice.udp.connection import UdpConnection  # noqa: PLC0415

        self._udp = await UdpConnection.open("127.0.0.1", blaster_port)
        self._udp.cipher = self.traffic.cipher
        # One socket carries every user here (a real bot spreads them over sessions): give it room for a
        # few ticks of packets so that a busy moment costs latency, not kernel drops.
        sock = self._udp._transport.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        address = self._udp.local_address
        assert address is not None
        if self.gc_freeze:
            # The bench's own set-up (the DAVE group, every packet of the run: 100 MB at 1,000 users) is not
            # a bot's heap; unfrozen, each full collection walked it and paused the loop for 40-66 ms.
            gc.freeze()
        return int(address[1])

    async def cmd_receive(self, *, pcm: bool, seconds: float, receiver_index: int) -> dict[str, Any]:
        """Receive until the blaster goes quiet; the window is the blaster's ``seconds`` of traffic."""
        from cordvoice.audio.receiver import Receiver  # noqa: PLC0415

        traffic = self.traffic
        udp = self._udp
        receiver = Receiver(traffic.decrypt_for(_RECEIVERS[receiver_index]))
        receiver.on_clients_connect(traffic.user_ids)
        for user_id, ssrc in zip(traffic.user_ids, traffic.ssrcs, strict=True):
            receiver.on_speaking(user_id, ssrc, 1)
        udp.receive_hook = receiver.feed
        delivered = [0, 0]  # frames, frames with PCM

        frames = receiver.listen(pcm=pcm)

        async def consume() -> None:
            async for frame in frames:
                delivered[0] += 1
                if frame.pcm is not None:
                    delivered[1] += 1

        consumer = asyncio.create_task(consume())
        stats = udp.stats
        gc_watch = GcWatch()
        stalls_before = get_clock().stalls
        try:
            # The window: from the first packet to the last one, measured by the packet counter.
            before = stats.rtp
            async with asyncio.timeout(seconds + 30):
                while stats.rtp == before:  # noqa: ASYNC110 - the blaster is in another process
                    await asyncio.sleep(0.001)
            first = stats.rtp
            gc_watch.start()
            begin = CpuSnapshot.take()
            share_before = CoreShare.take(os.getpid())
            idle_since = time.monotonic()
            last = first
            while time.monotonic() - idle_since < 0.2:
                await asyncio.sleep(0.02)
                if stats.rtp != last:
                    last = stats.rtp
                    idle_since = time.monotonic()
            end = CpuSnapshot.take()
            share_after = CoreShare.take(os.getpid())
            gc_watch.stop()
            dropped_in_window = frames.dropped
            await asyncio.sleep(0.2)  # let the jitter buffers play out
        finally:
            udp.receive_hook = None
            await receiver.close()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await consumer
        packets = last - first  # the packets read before the CPU snapshot are outside its window
        cpu = end.since(begin)
        # The window ends up to 0.2 s after the last packet: that idle time is in the CPU figure too.
        user_stats = receiver.all_stats().values()
        return {
            **_per_packet(cpu["cpu_s"], packets),
            "packets": packets,
            "cpu": cpu,
            "frames_delivered": delivered[0],
            "frames_with_pcm": delivered[1],
            "lost": sum(s.lost for s in user_stats),
            "late": sum(s.late for s in user_stats),
            "undecryptable": sum(s.undecryptable for s in user_stats),
            "transport_undecryptable": stats.undecryptable,
            # Frames that never reached the consumer: decode batches dropped behind a saturated decoder, and
            # frames pushed out of the consumer's queue (both counted by the receiver, never silent).
            "decode_backlog_dropped": receiver.counters.decode_backlog_dropped,
            "consumer_dropped": frames.dropped,
            "consumer_dropped_in_window": dropped_in_window,
            "gc": gc_watch.report(),
            "clock_stalls": get_clock().stalls - stalls_before,
            # Time the receiver did not get on its core shows as kernel drops when it is near saturation.
            "measured_core": CoreShare.window(share_before, share_after),
        }

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()


class Blaster:
    """The sending process of the end-to-end measurement: replays packets at 20 ms per tick of ``users``."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    async def cmd_port(self) -> int:
        return int(self._sock.getsockname()[1])

    async def cmd_blast(self, *, packets: list[bytes], users: int, port: int) -> dict[str, Any]:
        """Send ``users`` packets every 20 ms (spread over the period, as many senders would be)."""
        loop = asyncio.get_running_loop()
        self._sock.connect(("127.0.0.1", port))
        send = self._sock.send
        ticks = len(packets) // users
        # Spread each tick's packets over 20 slots of 1 ms, like independent senders' phases.
        slices = 20
        per_slice = -(-users // slices)
        start = loop.time() + 0.05
        errors = 0
        for tick in range(ticks):
            base = tick * users
            for part in range(slices):
                lo = base + part * per_slice
                hi = min(base + users, lo + per_slice)
                if lo >= hi:
                    break
                delay = start + tick * 0.020 + part * 0.001 - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                for data in packets[lo:hi]:
                    try:
                        send(data)
                    except OSError:
                        errors += 1
        return {"sent": len(packets) - errors, "errors": errors, "seconds": round(loop.time() - start, 3)}

    async def close(self) -> None:
        self._sock.close()


@restores_affinity
def run_receive(
    *,
    users: int = 200,
    seconds: float = 10.0,
    senders: int = 16,
    gc_freeze: bool = True,
    profile_dir: Path | None = None,
    log_level: int = logging.WARNING,
) -> dict[str, Any]:
    """Run the receive benchmark; returns its JSON-ready report (``profile_dir``: py-spy profiles there).

    ``gc_freeze`` freezes the receiving process's heap after its set-up (``gc.freeze()``), as a bot can after
    start-up, so that full collections measure the receive path's own objects.
    """
    if users < 1:
        raise BenchError("--users must be at least 1")
    if seconds <= 0:
        raise BenchError("--seconds must be positive")
    if senders < 1:
        raise BenchError("--senders must be at least 1")
    placement = plan_placement()
    machine = machine_info()  # before pinning: it reports the usable cores
    pin_to_core(placement.emulator_core)
    report: dict[str, Any] = {
        "benchmark": "receive",
        "users": users,
        "seconds": seconds,
        "dave": True,
        "mode": MODE_AES256_GCM,
        "gc_freeze": gc_freeze,
        "placement": (
            f"receiver pinned to core {placement.bench_core}, "
            f"packet replayer pinned to core {placement.emulator_core}"
            if placement.bench_core is not None
            else "not pinned"
        ),
        "machine": machine,
    }
    worker = ChildProcess(
        "cordvoice.bench.receive:ReceiveWorker",
        name="receiver",
        core=placement.bench_core,
        options={"users": users, "seconds": seconds, "senders": senders, "gc_freeze": gc_freeze},
        log_level=log_level,
    )
    blaster = ChildProcess(
        "cordvoice.bench.receive:Blaster", name="replayer", core=placement.emulator_core, log_level=log_level
    )
    worker.start(timeout=1800.0)
    try:
        report["traffic"] = worker.call("describe")
        report["stages"] = worker.call("stages", timeout=1800.0)
        with blaster:
            packets = worker.call("packets", timeout=600.0)
            blaster_port = blaster.call("port")
            port = worker.call("listen", blaster_port=blaster_port)
            for index, (name, pcm) in enumerate((("opus", False), ("pcm", True))):
                # The traffic can be decrypted once per receiving member (DAVE refuses replays).
                result = _end_to_end(
                    worker,
                    blaster,
                    packets=packets,
                    users=users,
                    port=port,
                    pcm=pcm,
                    seconds=seconds,
                    receiver_index=index + 3,
                    profile=None if profile_dir is None else profile_dir / f"receive-{name}-{users}.txt",
                )
                report[name] = result
    finally:
        worker.close()
    report["users_per_core"] = {
        "opus": report["opus"]["users_per_core"],
        "pcm": report["pcm"]["users_per_core"],
    }
    return report


def _end_to_end(
    worker: ChildProcess,
    blaster: ChildProcess,
    *,
    packets: list[bytes],
    users: int,
    port: int,
    pcm: bool,
    seconds: float,
    receiver_index: int,
    profile: Path | None,
) -> dict[str, Any]:
    import threading  # noqa: PLC0415

    outcome: dict[str, Any] = {}

    def receive() -> None:
        try:
            outcome["result"] = worker.call(
                "receive", pcm=pcm, seconds=seconds, receiver_index=receiver_index, timeout=seconds + 120
            )
        except BaseException as exc:  # re-raised below, in the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=receive, name="bench-receive")
    thread.start()
    recording = None if profile is None else SpyRecording(worker.info["pid"], seconds, profile)
    sent = blaster.call("blast", packets=packets, users=users, port=port, timeout=seconds * 3 + 120)
    thread.join(seconds + 180)
    if "error" in outcome:
        raise outcome["error"]
    if "result" not in outcome:
        raise BenchError("the receiver did not report")
    result = {**outcome["result"], "replayer": sent}
    if recording is not None and profile is not None:
        error = recording.wait()
        result["profile"] = {"file": str(profile), "error": error or None}
        if not error and profile.exists():
            result["profile"].update(summarize(profile))
    return result
