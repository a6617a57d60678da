"""The installed command line: ``cordvoice --version`` and ``cordvoice doctor`` in real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import cordvoice
from cordvoice import cli
from cordvoice.commands import doctor


def _command() -> list[str]:
    """The ``cordvoice`` console script beside this interpreter, or ``python -m cordvoice`` without one."""
    script = Path(sys.executable).with_name("cordvoice")
    return [str(script)] if script.exists() else [sys.executable, "-m", "cordvoice"]


def _run(*args: str, command: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*(command or _command()), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_version() -> None:
    result = _run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cordvoice {cordvoice.__version__}"


def test_python_dash_m_works_too() -> None:
    result = _run("--version", command=[sys.executable, "-m", "cordvoice"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"cordvoice {cordvoice.__version__}"


@pytest.mark.parametrize("unbuffered", ["1", ""])
def test_a_reader_that_leaves_early_gets_no_traceback(unbuffered: str) -> None:
    """``cordvoice doctor | head -1``: the pipe closes under the command, which stops without a traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": unbuffered}
    with subprocess.Popen(
        [*_command(), "doctor"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()
        err = process.stderr.read()
    assert process.returncode == 1 and err == ""


def test_no_command_prints_help_and_fails() -> None:
    result = _run()
    assert result.returncode == 2
    assert "doctor" in result.stdout


def test_doctor_passes_on_this_machine() -> None:
    result = _run("doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for name in ("Python", "cordvoice", "websockets", "cryptography", "PyNaCl", "davey", "PyAV", "libopus"):
        assert name in out
    for check in (
        "AES-256-GCM round trip",
        "XChaCha20-Poly1305 round trip",
        "DAVE session",
        "Opus encode/decode through PyAV",
    ):
        assert f"pass  {check}" in out
    assert "FAIL" not in out
    assert "All 4 checks passed." in out


def test_doctor_reports_a_failure_with_what_to_install(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken() -> str:
        raise ModuleNotFoundError("No module named 'davey'", name="davey")

    checks = tuple(
        doctor._Check(c.title, broken, c.fix) if c.title == "DAVE session" else c for c in doctor._CHECKS
    )
    monkeypatch.setattr(doctor, "_CHECKS", checks)
    assert cli.main(["doctor"]) == 1
    out = capsys.readouterr().out
    assert "FAIL  DAVE session" in out
    assert "pip install 'davey==0.1.7'" in out
    assert "1 of 4 checks failed" in out


def test_only_the_chosen_command_module_is_imported() -> None:
    # In a fresh interpreter: this module itself imports doctor for the failure test above.
    code = (
        "import sys; from cordvoice import cli; cli.build_parser(None); "
        "print('cordvoice.commands.doctor' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stdout.strip() == "False", result.stderr
