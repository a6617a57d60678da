"""Project-wide test setup: hypothesis profiles and the shared transport known-answer vectors."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

# No per-example deadline: CI machines are shared and a slow example is not a failure. The "ci" profile
# (CI=true) derandomizes so a red build reproduces locally with CI=true.
settings.register_profile("dev", deadline=None)
settings.register_profile("ci", deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("ci" if os.environ.get("CI") else "dev")

REPO_ROOT = Path(__file__).resolve().parents[1]
VECTORS_ENV = "CORDVOICE_VECTORS"


def find_transport_vectors() -> Path | None:
    """$CORDVOICE_VECTORS, else ``../shared/vectors/transport.json`` beside the repo or the workplace's."""
    from_env = os.environ.get(VECTORS_ENV)
    candidates = [Path(from_env)] if from_env else []
    candidates += [
        REPO_ROOT.parent / "shared" / "vectors" / "transport.json",
        Path("/work/shared/vectors/transport.json"),
    ]
    return next((path for path in candidates if path.is_file()), None)


@pytest.fixture(scope="session")
def transport_vectors() -> dict[str, Any]:
    """The independently computed UDP transport vectors, read (never copied) from shared/."""
    path = find_transport_vectors()
    if path is None:
        pytest.skip(
            f"transport vectors not found: expected {REPO_ROOT.parent / 'shared/vectors/transport.json'} "
            f"or a path in ${VECTORS_ENV}"
        )
    with path.open(encoding="utf-8") as file:
        data: dict[str, Any] = json.load(file)
    return data


# ---- manual-only tests --------------------------------------------------------------------------------
MANUAL_ENV = "CORDVOICE_MANUAL"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``manual`` (5-minute chaos, 10-minute soak) run only with CORDVOICE_MANUAL=1."""
    if os.environ.get(MANUAL_ENV) == "1":
        return
    skip = pytest.mark.skip(reason=f"manual mode: set {MANUAL_ENV}=1 to run")
    for item in items:
        if item.get_closest_marker("manual") is not None:
            item.add_marker(skip)
