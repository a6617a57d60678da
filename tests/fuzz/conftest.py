"""Report how many fuzz examples and state machine steps really ran (for docs/reliability.md)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from .fuzz_support import EXAMPLES, INPUTS, SCALE, STEPS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not EXAMPLES and not STEPS:
        return
    total = sum(EXAMPLES.values())
    terminalreporter.write_sep("-", f"fuzz: {total} examples (scale {SCALE}), {sum(STEPS.values())} steps")
    for name, count in sorted(EXAMPLES.items()):
        terminalreporter.write_line(f"  {name:52s} {count:>9d} examples")
    for name, count in sorted(INPUTS.items()):
        terminalreporter.write_line(f"  parser {name:45s} {count:>9d} inputs")
    for name, count in sorted(STEPS.items()):
        terminalreporter.write_line(f"  {name:52s} {count:>9d} steps")
    report = os.environ.get("CORDVOICE_FUZZ_REPORT")
    if report:
        Path(report).write_text(
            json.dumps(
                {
                    "scale": SCALE,
                    "examples": dict(EXAMPLES),
                    "inputs": dict(INPUTS),
                    "steps": dict(STEPS),
                    "total_examples": total,
                },
                indent=1,
            )
        )
