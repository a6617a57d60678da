"""CI smoke runs of every ``cordvoice bench`` subcommand: tiny sizes, no thresholds.

Each test runs the real benchmark (child processes, the emulator, real sockets, davey, libopus) and checks
only that the report has its documented keys and sane values: the figures themselves are for
docs/benchmarks.md, measured on a quiet machine, not for CI.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cordvoice import cli
from cordvoice.bench.encode import run_encode
from cordvoice.bench.join import run_join
from cordvoice.bench.memory import run_memory
from cordvoice.bench.process import BenchError, ChildProcess
from cordvoice.bench.receive import ReceiveWorker, run_receive
from cordvoice.bench.send import run_send

MACHINE_KEYS = {"date", "cpu", "nproc", "kernel", "python", "packages", "load_average"}


def finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def check_lateness(lateness: dict[str, Any]) -> None:
    assert {"p50", "p99", "max", "count"} <= set(lateness)
    assert lateness["count"] > 0
    assert 0 <= lateness["p50"] <= lateness["p99"] <= max(lateness["max"], lateness["p99"])


def check_sender(result: dict[str, Any], sessions: int) -> None:
    assert result["sessions"] == sessions
    assert result["packets_sent"] > 0 and result["packets_arrived"] > 0
    assert finite(result["cpu_us_per_packet"]) and result["cpu_us_per_packet"] > 0
    assert finite(result["core_percent_per_stream"]) and result["core_percent_per_stream"] > 0
    assert result["packets_lost"] >= 0
    check_lateness(result["lateness_ms"])
    assert result["setup"]["setup_s"] > 0
    assert result["arrivals"]["streams"] == sessions
    share = result["measured_core"]
    if share is not None:  # None where the process under test could not be pinned to one core
        assert share["process_ms"] >= 0 and share["other_processes_ms"] >= 0 and share["steal_ms"] >= 0


def test_bench_send_with_discordpy_peer() -> None:
    report = run_send(sessions=2, seconds=1.0, warmup=0.5, dave=True, mode="xchacha", peer="discordpy")
    assert set(report["machine"]) >= MACHINE_KEYS
    assert report["benchmark"] == "send" and report["sessions"] == 2
    assert report["sfu_reads"] == "timer"
    assert report["cordvoice"]["emulator"]["sfu_reads_on_timer"] == (sys.platform == "linux")
    for key in ("cpu_us_per_packet", "lateness_ms", "packets_lost", "setup_s", "placement"):
        assert key in report
    check_sender(report["cordvoice"], 2)
    check_sender(report["discordpy"], 2)
    assert report["cordvoice"]["setup"]["modes"] == ["aead_xchacha20_poly1305_rtpsize"]
    assert report["discordpy"]["setup"]["dave_versions"] == [1]
    assert report["cordvoice"]["emulator"]["members_dave_ready"] == 2
    # the quiet members get no copies (MediaServer.stop_forwarding_to), the bots' packets still arrive
    assert report["cordvoice"]["emulator"]["members_not_forwarded_to"] == 2
    assert report["cordvoice"]["arrivals"]["sfu_forwarded"] == 0
    assert set(report["ratios"]) >= {"cpu_us_per_packet", "lateness_p99"}
    json.dumps(report)  # JSON-ready


def test_bench_send_without_dave_through_write() -> None:
    report = run_send(
        sessions=2, seconds=1.0, warmup=0.5, dave=False, mode="aes", feed="write", sfu_reads="wakeup"
    )
    assert report["sfu_reads"] == "wakeup"
    assert report["cordvoice"]["emulator"]["sfu_reads_on_timer"] is False
    result = report["cordvoice"]
    check_sender(result, 2)
    assert result["setup"]["dave_versions"] == [0]
    assert result["setup"]["modes"] == ["aead_aes256_gcm_rtpsize"]
    assert result["process"]["dave_encrypted"] == 0


def test_bench_join() -> None:
    report = run_join(members=(2, 3), runs=1)
    assert set(report["results"]) == {"members_2", "members_3"}
    for result in report["results"].values():
        for key in ("first_heard_ms", "all_heard_ms", "join_channel_ms", "dave_ready_ms"):
            assert {"median", "p95"} <= set(result[key])
        first = result["first_heard_ms"]["median"]
        assert 0 < result["join_channel_ms"]["median"] <= result["dave_ready_ms"]["median"] <= first
        assert first <= result["all_heard_ms"]["median"] < 30_000
    assert finite(report["first_heard_ms_2_members"])


def test_bench_memory() -> None:
    cores = os.sched_getaffinity(0)
    report = run_memory(sessions=3, seconds=1.0)
    # The benchmark pinned this process to one core while it ran; everything after it gets them all back.
    assert os.sched_getaffinity(0) == cores
    assert report["sessions_joined"] == 3
    for key in ("idle_kib_per_session", "playing_kib_per_session", "rss_baseline_mib"):
        assert finite(report[key])
    assert report["rss_baseline_mib"] > 10
    assert report["frames_sent"] > 0


def test_bench_encode() -> None:
    report = run_encode(streams=2, seconds=0.5, warmup=0.5)
    for source in ("pcm", "mp3"):
        codec = report["codec"][source]
        assert codec["frames"] > 0 and codec["cpu_us_per_frame"] > 0 and codec["streams_per_core"] > 0
        player = report["player"][source]
        assert player["streams"] == 2 and player["frames"] > 0
        assert 0 < player["frames_per_second_per_stream"] < 60
        assert finite(report["streams_per_core"][source])
    assert report["codec"]["pcm"]["mean_packet_bytes"] > 100  # 96 kbit/s is 240 bytes per 20 ms


def test_bench_command_line_prints_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "memory", "--sessions", "2", "--seconds", "0.5", "--no-dave", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["benchmark"] == "memory" and report["dave"] is False
    assert report["sessions_joined"] == 2


def test_bench_command_line_summary_and_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "join", "--members", "2,x"]) == 1
    assert "--members" in capsys.readouterr().err
    with pytest.raises(BenchError, match="--sfu-reads"):
        run_send(sessions=1, seconds=1.0, sfu_reads="sometimes")
    with pytest.raises(BenchError, match="--slot-capacity"):
        run_send(sessions=1, seconds=1.0, slot_capacity=-1)
    with pytest.raises(BenchError, match="--senders"):
        run_receive(users=1, seconds=1.0, senders=0)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["encode", "--streams", "1", "--seconds", "nan"], "--seconds: must be a positive number of seconds"),
        (["memory", "--sessions", "1", "--seconds", "-1"], "--seconds: must be a positive number of seconds"),
        (["send", "--sessions", "1", "--seconds", "0.1", "--warmup", "-1"], "--warmup: must be 0 or more"),
        (["encode", "--streams", "1", "--seconds", "0.1", "--bitrate", "0"], "--bitrate: must be 6000 to"),
        (["send", "--sessions", "0"], "--sessions: must be at least 1"),
        (["send", "--sessions", "1", "--slot-capacity", "-1"], "--slot-capacity: must be 0 (spread evenly)"),
        (["receive", "--users", "-2"], "--users: must be at least 1"),
        (["receive", "--users", "4", "--senders", "0"], "--senders: must be at least 1"),
        (["encode", "--streams", "x"], "--streams: 'x' is not a whole number"),
        (["join", "--runs", "0"], "--runs: must be at least 1"),
        (["memory", "--sessions", "-1"], "--sessions: must be at least 1"),
    ],
)
def test_bench_refuses_impossible_numbers(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["bench", *argv])
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_bench_join_needs_a_channel_size_and_profiles_a_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cordvoice.bench.profile._py_spy", lambda: "/usr/bin/py-spy")  # installed or not
    assert cli.main(["bench", "join", "--members", ",", "--runs", "1"]) == 1
    assert "--members" in capsys.readouterr().err
    in_the_way = tmp_path / "profiles"
    in_the_way.write_text("a file")
    argv = ["bench", "encode", "--streams", "1", "--seconds", "0.1", "--profile", str(in_the_way)]
    assert cli.main(argv) == 1
    assert "cordvoice bench: cannot create the --profile folder" in capsys.readouterr().err


def test_bench_profile_without_py_spy_is_refused_before_running(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("cordvoice.bench.profile._py_spy", lambda: None)
    argv = ["bench", "encode", "--streams", "1", "--seconds", "0.1", "--profile", str(tmp_path / "p")]
    assert cli.main(argv) == 1
    assert "--profile needs py-spy" in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    ("argv", "missing", "message"),
    [
        (["send", "--peer", "discordpy"], "discord", "--peer discordpy needs discord.py"),
        (["memory", "--uvloop"], "uvloop", "--uvloop needs uvloop"),
    ],
)
def test_bench_optional_dependency_missing_is_refused_before_running(
    argv: list[str], missing: str, message: str, tmp_path: Path
) -> None:
    # A package of that name that cannot be imported, ahead of the real one on every process's path.
    shadow = tmp_path / "shadow" / missing
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text(f"raise ImportError('No module named {missing}')\n")
    path = os.pathsep.join([str(shadow.parent), *sys.path])
    command = [sys.executable, "-m", "cordvoice", "bench", *argv, "--sessions", "1", "--seconds", "0.2"]
    done = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": path},
        cwd=tmp_path,
    )
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == ""


def test_bench_receive() -> None:
    report = run_receive(users=4, seconds=0.5, senders=2)
    assert report["traffic"]["users"] == 4 and report["traffic"]["senders"] == 2
    for stage in (
        "transport_decrypt",
        "dave_decrypt",
        "jitter_buffer",
        "pipeline_to_opus",
        "pipeline_to_pcm",
    ):
        assert report["stages"][stage]["cpu_us_per_packet"] > 0
    assert report["stages"]["dave_decrypt"]["failures"] == 0
    for name in ("opus", "pcm"):
        result = report[name]
        assert result["packets"] > 0 and result["cpu_us_per_packet"] > 0
        assert result["undecryptable"] == 0 and result["transport_undecryptable"] == 0
        assert result["measured_core"] is None or result["measured_core"]["steal_ms"] >= 0
        assert result["frames_delivered"] > 0
        assert finite(report["users_per_core"][name])
        assert result["gc"]["frozen_objects"] > 0, "the receiver's set-up heap is frozen by default"
        assert result["consumer_dropped_in_window"] <= result["consumer_dropped"]
    assert report["gc_freeze"] is True
    assert report["pcm"]["frames_with_pcm"] > 0


def start_as_from_a_terminal(child: ChildProcess) -> None:
    """Start ``child`` with Ctrl-C's default handling (a child inherits a SIGINT its runner ignores)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        child.start()
    finally:
        signal.signal(signal.SIGINT, previous)


def interrupt(child: ChildProcess) -> int | None:
    """Ctrl-C in ``child``, then close it as the parent does on its own KeyboardInterrupt; its exit code."""
    process = child._process
    assert process is not None
    os.kill(child.info["pid"], signal.SIGINT)
    child.close()
    return process.exitcode


def test_child_process_stops_quietly_on_ctrl_c(capfd: pytest.CaptureFixture[str]) -> None:
    # A terminal's Ctrl-C reaches the children too; the parent says what happened, the children stay quiet.
    child = ChildProcess("cordvoice.bench.frames:LoopingFrames", name="frames", options={"frames": (b"x",)})
    start_as_from_a_terminal(child)
    assert interrupt(child) is not None
    assert "Traceback" not in capfd.readouterr().err


def test_emulator_host_removes_its_tls_files_on_ctrl_c() -> None:
    host = ChildProcess("cordvoice.bench.host:EmulatorHost", name="emulator", options={"tls": True})
    start_as_from_a_terminal(host)
    folder = Path(host.call("world", guilds=0, dave=True)["ca_file"]).parent
    try:
        assert folder.exists()
        assert interrupt(host) is not None
        assert not folder.exists(), "the emulator's private key stayed in the temporary folder"
    finally:
        host.close()
        shutil.rmtree(folder, ignore_errors=True)


async def test_receive_counts_only_the_packets_processed_inside_its_cpu_window() -> None:
    # Every packet queued before the receiver wakes is read in its first wake-up, before the CPU window
    # opens: nothing is left to measure, and the report must not claim one packet.
    worker = ReceiveWorker(users=2, seconds=0.1, senders=1, gc_freeze=False)
    blaster = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        blaster.bind(("127.0.0.1", 0))
        port = await worker.cmd_listen(blaster_port=blaster.getsockname()[1])
        receiving = asyncio.create_task(worker.cmd_receive(pcm=False, seconds=1.0, receiver_index=3))
        await asyncio.sleep(0.05)
        for packet in worker.traffic.packets:
            blaster.sendto(packet, ("127.0.0.1", port))
        result = await receiving
    finally:
        blaster.close()
        await worker.close()
    assert result["packets"] == 0
