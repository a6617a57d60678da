"""``cordvoice demo``: the README's first command, its JSON, its accounting, its recordings and its output."""

from __future__ import annotations

import json
import subprocess
import sys
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cordvoice import cli

SECONDS = 3.0


@pytest.fixture(scope="module")
def demo_json(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], str, Path]:
    """One lossless run through the real entry point (``python -m cordvoice``), shared by the tests below."""
    out = tmp_path_factory.mktemp("demo")
    done = subprocess.run(
        [sys.executable, "-m", "cordvoice", "demo", "--json", "--seconds", str(SECONDS), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), done.stderr, out


def test_demo_json_has_the_documented_keys(demo_json: tuple[dict[str, Any], str, Path]) -> None:
    report, _, _ = demo_json
    assert {"sessions", "dave", "lateness_ms", "recordings"} <= report.keys()
    assert len(report["sessions"]) == 3
    for session in report["sessions"]:
        assert {"user_id", "frames_sent", "frames_received"} <= session.keys()
        assert isinstance(session["user_id"], int) and session["frames_sent"] > 0
    assert isinstance(report["dave"]["epoch"], int) and report["dave"]["epoch"] >= 1
    assert len(report["dave"]["privacy_code"]) == 30 and report["dave"]["privacy_code"].isdigit()
    assert report["dave"]["agreed"] is True
    lateness = report["lateness_ms"]
    assert 0.0 <= lateness["p50"] <= lateness["p99"] < 20.0, "a bot paced its frames badly"


def test_lossless_demo_receives_every_frame_of_every_pair(
    demo_json: tuple[dict[str, Any], str, Path],
) -> None:
    report, _, _ = demo_json
    sessions = {s["user_id"]: s for s in report["sessions"]}
    pairs = report["pairs"]
    assert len(pairs) == 6, "three members: every one hears the two others"
    for pair in pairs:
        assert pair["frames_received"] == pair["frames_sent"] == sessions[pair["sender"]]["frames_sent"], pair
        assert pair["lost"] == 0
    for user_id, session in sessions.items():
        others = sum(s["frames_sent"] for other, s in sessions.items() if other != user_id)
        assert session["frames_received"] == others
        assert {int(k) for k in session["received_from"]} == set(sessions) - {user_id}
    assert report["lossless"] is True
    # The music plays the whole run (50 frames a second); each voice talks for 40 % of it.
    music, speaker, alice = report["sessions"]
    assert (
        music["frames_sent"] == round(SECONDS * 50) + 1 + 5
    )  # the sample, the encoder flush, the silence tail
    assert speaker["frames_sent"] == alice["frames_sent"] == round(SECONDS * 0.4 * 50) + 5


def test_demo_writes_aligned_recordings_with_the_right_voices(
    demo_json: tuple[dict[str, Any], str, Path],
) -> None:
    report, _, out = demo_json
    paths = [Path(path) for path in report["recordings"]]
    names = {(path.parent.name, path.name) for path in paths}
    assert names == {
        ("speaker-bot", "music-bot.wav"),
        ("speaker-bot", "music-bot.opus"),
        ("speaker-bot", "alice.wav"),
        ("speaker-bot", "alice.opus"),
        ("speaker-bot", "mixed.wav"),
        ("alice", "music-bot.wav"),
        ("alice", "speaker-bot.wav"),
        ("alice", "mixed.wav"),
    }
    assert all(path.is_relative_to(out) and path.stat().st_size > 1000 for path in paths)
    lengths = {path: _read(path)[1] for path in paths if path.suffix == ".wav"}
    assert len(set(lengths.values())) == 1, f"the WAV files are not aligned: {lengths}"
    assert SECONDS <= next(iter(lengths.values())) / 48_000 <= SECONDS + 1.5
    # Who talks when (see cordvoice.demo): speaker-bot from 10 % to 50 % of the run, alice from 45 % to 85 %.
    speaker = _loudness_by_tenth(out / "alice" / "speaker-bot.wav")
    alice = _loudness_by_tenth(out / "speaker-bot" / "alice.wav")
    music = _loudness_by_tenth(out / "speaker-bot" / "music-bot.wav")
    assert min(speaker[2:4]) > 300 and max(speaker[6:]) < 30
    assert min(alice[5:8]) > 300 and max(alice[:4]) < 30
    assert min(music[:9]) > 300
    sample = out / "sample.ogg"
    assert sample.read_bytes()[:4] == b"OggS"


def test_json_mode_prints_no_progress(demo_json: tuple[dict[str, Any], str, Path]) -> None:
    _, stderr, _ = demo_json
    assert "cordvoice demo:" not in stderr
    assert " INFO " not in stderr, "a quiet command line shows no INFO logs"


def test_demo_shows_progress_and_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["demo", "--seconds", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    progress = captured.err.splitlines()
    assert any("frames sent" in line for line in progress)
    assert len(progress) < 15, "progress into a file is a few lines, not a flood"
    for text in (
        "Frames (sent -> received, per pair)",
        "privacy code",
        "Pacing",
        "Loss       none",
        "mixed.wav",
    ):
        assert text in captured.out
    assert (tmp_path / "speaker-bot" / "mixed.wav").exists()


def test_demo_refuses_a_silly_length(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as raised:
        cli.main(["demo", "--seconds", "0"])
    assert raised.value.code == 2
    assert "between 1 and 600 seconds" in capsys.readouterr().err


@pytest.mark.parametrize("blocked", [".", "alice"])
def test_demo_into_an_unusable_folder_says_so(
    blocked: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file where the demo needs a folder (--out itself, or alice's recordings) is a one-line error."""
    out = tmp_path / "out"
    if blocked != ".":
        out.mkdir()
    (out / blocked).write_text("in the way")
    assert cli.main(["demo", "--seconds", "1", "--out", str(out)]) == 1
    message = capsys.readouterr().err.splitlines()[-1]
    assert message.startswith("cordvoice demo: cannot create") and str(out / blocked) in message


def _read(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path)) as file:
        frames = file.getnframes()
        samples = np.frombuffer(file.readframes(frames), dtype="<i2").reshape(-1, 2).astype(np.float64)
    return samples, frames


def _loudness_by_tenth(path: Path) -> list[float]:
    """RMS of each tenth of the run (the file may run a little longer than the run)."""
    samples, _ = _read(path)
    run = int(SECONDS * 48_000)
    return [float(np.sqrt(np.mean(part**2))) for part in np.array_split(samples[:run], 10)]
