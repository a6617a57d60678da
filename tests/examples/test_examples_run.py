"""Every example in examples/ runs its bounded scenario against the emulator and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_every_example_is_covered() -> None:
    assert {path.name for path in EXAMPLES.glob("*.py")} == {"music_bot.py", "recorder_bot.py", "echo_bot.py"}


@pytest.mark.parametrize("name", ["music_bot.py", "recorder_bot.py", "echo_bot.py"])
def test_example_runs_on_the_emulator(name: str, tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if key != "DISCORD_TOKEN"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--emulator"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    assert done.stdout.strip(), "the example says what it did"


def test_an_example_without_a_token_explains_itself() -> None:
    env = {key: value for key, value in os.environ.items() if key != "DISCORD_TOKEN"}
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "echo_bot.py"), "--guild", "1", "--channel", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "DISCORD_TOKEN" in done.stderr
