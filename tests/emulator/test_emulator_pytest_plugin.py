"""The ``discord_emulator`` fixture, as a user's test suite meets it: pytester runs inner sessions in-process.

The plugin is the installed ``pytest11`` entry point, so the inner sessions find it exactly as a user's would,
under pytest-asyncio's auto mode and its strict mode.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

# Imported here, before the inner sessions: pytester drops the modules an inner session imported, and
# cryptography's Rust core cannot have its Python classes imported a second time in one process.
import cordvoice.emulator.fixture
import cordvoice.gateway
from cordvoice.errors import EmulatorError

pytest_plugins = ["pytester"]

INNER_OPTIONS = ("-o", "asyncio_default_fixture_loop_scope=function", "-p", "no:cacheprovider", "-q")

USER_TESTS = """
import asyncio

import pytest

from cordvoice.emulator import DiscordEmulator
from cordvoice.gateway import Client

SEEN = []


{mark}
async def test_a_bot_joins_voice_in_the_fixture_world(discord_emulator):
    emu = discord_emulator
    SEEN.append(emu)
    assert isinstance(emu, DiscordEmulator)
    assert emu.gateway_url.startswith("ws://127.0.0.1:") and emu.voice_ssl is False
    assert emu.state.channel(emu.channel_id).dave_required
    assert emu.state.channel(emu.stage_channel_id).is_stage
    assert emu.state.guild(emu.guild_id).members.keys() == {{emu.bot.user_id}}
    listener = await emu.listener()
    assert listener.dave_protocol_version == 1
    async with Client(emu.bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base) as client:
        await client.update_voice_state(emu.guild_id, emu.channel_id)
        async with asyncio.timeout(5):
            while client.voice_state(emu.guild_id, emu.bot.user_id) is None:
                await asyncio.sleep(0.01)
    await emu.faults.close_client(listener.user_id, 4000)
    assert await listener.wait_closed() == 4000


{mark}
@pytest.mark.discord_emulator(tls=True, voice_channels=2, stage_channels=0, bots=2)
async def test_the_marker_configures_the_world(discord_emulator):
    emu = discord_emulator
    assert SEEN and SEEN[0].participants == [], "the previous test's emulator was closed"
    assert emu.gateway_url.startswith("wss://") and emu.ca_file.exists()
    assert len(emu.world.bots) == 2 and len(emu.world.guilds[0].voice_channels) == 2
    with pytest.raises(Exception, match="stage_channels=0"):
        emu.stage_channel
"""


@pytest.mark.parametrize(("mode", "mark"), [("auto", ""), ("strict", "@pytest.mark.asyncio")])
def test_discord_emulator_fixture_under_pytest_asyncio(
    pytester: pytest.Pytester, mode: str, mark: str
) -> None:
    pytester.makepyfile(test_user_bot=USER_TESTS.format(mark=mark))
    result = pytester.runpytest_inprocess("-o", f"asyncio_mode={mode}", *INNER_OPTIONS)
    result.assert_outcomes(passed=2)


LOOP_TEST = """
async def test_in_the_default_loop(discord_emulator):
    assert (await discord_emulator.listener(timeout=2)).dave_protocol_version == 1
"""


@pytest.mark.parametrize("fixture_loop", ["function", "module", "session"])
@pytest.mark.parametrize("test_loop", ["function", "module"])
def test_the_fixture_serves_in_the_loop_the_tests_run_in(
    pytester: pytest.Pytester, fixture_loop: str, test_loop: str
) -> None:
    """A project's ``asyncio_default_fixture_loop_scope`` is for its own fixtures: the emulator must serve in
    the loop the tests run in (``asyncio_default_test_loop_scope``), or every connection to it hangs."""
    pytester.makepyfile(test_loops=LOOP_TEST)
    result = pytester.runpytest_inprocess(
        "-o",
        "asyncio_mode=auto",
        "-o",
        f"asyncio_default_fixture_loop_scope={fixture_loop}",
        "-o",
        f"asyncio_default_test_loop_scope={test_loop}",
        *INNER_OPTIONS[2:],
    )
    result.assert_outcomes(passed=1)


OLD_PYTEST_ASYNCIO = """
import pytest_asyncio

_fixture = pytest_asyncio.fixture


def _fixture_before_0_24(fixture_function=None, **kwargs):
    if "loop_scope" in kwargs:
        raise TypeError("fixture() got an unexpected keyword argument 'loop_scope'")
    return _fixture(fixture_function, **kwargs)


pytest_asyncio.fixture = _fixture_before_0_24


def pytest_unconfigure(config):
    pytest_asyncio.fixture = _fixture
"""


def test_the_fixture_works_with_a_pytest_asyncio_without_loop_scope(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(OLD_PYTEST_ASYNCIO)
    pytester.makepyfile(test_old="async def test_old(discord_emulator):\n    assert discord_emulator.bot\n")
    result = pytester.runpytest_inprocess("-o", "asyncio_mode=auto", *INNER_OPTIONS)
    result.assert_outcomes(passed=1)


def test_strict_mode_without_the_asyncio_mark_does_not_silently_pass(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_unmarked="async def test_unmarked(discord_emulator):\n    assert discord_emulator.bot\n"
    )
    result = pytester.runpytest_inprocess("-o", "asyncio_mode=strict", *INNER_OPTIONS)
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) == 0, "pytest skips or fails unmarked async tests in strict mode"


@pytest.mark.parametrize("counts", [{"guilds": 0}, {"bots": 0}, {"voice_channels": -1}])
async def test_a_world_that_cannot_be_built_leaves_nothing_running(counts: dict[str, int]) -> None:
    emu = cordvoice.emulator.fixture.DiscordEmulator(**counts)
    with pytest.raises(EmulatorError, match="at least one guild"):
        async with emu:
            pass
    assert emu.voice_server_handles == {}
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", emu.port)
    assert {task.get_name() for task in asyncio.all_tasks()} == {asyncio.current_task().get_name()}  # type: ignore[union-attr]


def test_the_marker_is_registered(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest_inprocess("--markers", *INNER_OPTIONS)
    result.stdout.fnmatch_lines(["*discord_emulator(**options)*"])


def test_the_plugin_imports_no_emulator_module() -> None:
    code = (
        "import sys, cordvoice.emulator.pytest_plugin; "
        "print(sorted(m for m in sys.modules if m.startswith('cordvoice.emulator')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "['cordvoice.emulator', 'cordvoice.emulator.pytest_plugin']"


def test_loading_the_plugin_does_not_import_pyav_or_davey() -> None:
    code = (
        "import sys, cordvoice.emulator.pytest_plugin; print('av' in sys.modules or 'davey' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
