"""The docs render with no broken links: every relative link and anchor in README.md and docs/*.md resolves,
every Python block at least compiles, and the README's Quick start is the two commands CI and users run."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

from .docs_helpers import DOCS, README, REPO, Page, anchors_of, pages, parse, slug

DEMO_COMMAND = "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/cordvoice demo"
TEST_COMMAND = "python3 -m venv .venv && .venv/bin/pip install '.[test]' && .venv/bin/python -m pytest"
EXPECTED_PAGES = {"adapters.md", "emulator.md", "architecture.md", "cli.md"}

PAGES = pages()


def _ids(page: Page) -> str:
    return str(page.path.relative_to(REPO))


def test_the_docs_pages_exist() -> None:
    assert {path.name for path in DOCS.glob("*.md")} >= EXPECTED_PAGES
    linked = {Path(link.target.split("#")[0]).name for link in parse(README).links}
    assert EXPECTED_PAGES | {"benchmarks.md"} <= linked, "the README links every docs page"


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_every_relative_link_and_anchor_resolves(page: Page) -> None:
    assert page.links, f"{page.path.name} has no links at all (is the parser broken?)"
    broken = []
    for link in page.links:
        target = link.target
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):
            if not target.startswith(("https://", "mailto:")):
                broken.append(f"line {link.line}: {target} (only https:// links outside the repository)")
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.path.parent / unquote(path_part)).resolve() if path_part else page.path
        if not resolved.exists():
            broken.append(f"line {link.line}: {target} ({resolved} does not exist)")
            continue
        if not resolved.is_relative_to(REPO):
            broken.append(f"line {link.line}: {target} leaves the repository")
            continue
        if anchor:
            if resolved.suffix != ".md":
                broken.append(f"line {link.line}: {target} has an anchor into a non-Markdown file")
            elif anchor not in parse(resolved).anchors:
                broken.append(f"line {link.line}: {target}: no heading with anchor #{anchor}")
    assert not broken, f"{page.path.name}:\n" + "\n".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=_ids)
def test_python_blocks_compile(page: Page) -> None:
    python = [block for block in page.blocks if block.language in ("python", "py")]
    for block in python:
        try:
            compile(
                block.code, f"{page.path.name}:{block.line}", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
            )
        except SyntaxError as exc:
            pytest.fail(f"{page.path.name}, the Python block at line {block.line} does not compile: {exc}")


def test_every_code_block_has_a_language() -> None:
    untagged = [f"{p.path.name}:{b.line}" for p in PAGES for b in p.blocks if not b.language]
    assert not untagged, f"code blocks without a language: {untagged}"


def test_quick_start_is_exactly_the_two_setup_commands() -> None:
    blocks = parse(README).section("Quick start")
    commands = [
        block.code.strip() for block in blocks if block.language in ("sh", "bash", "shell", "console")
    ]
    assert commands == [DEMO_COMMAND, TEST_COMMAND]


def test_ci_runs_the_readme_test_command() -> None:
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    assert f'readme_command="{TEST_COMMAND}"' in ci


def test_the_slugs_follow_github() -> None:
    assert slug("A bot in 15 lines") == "a-bot-in-15-lines"
    assert slug("discord.py bots") == "discordpy-bots"
    assert slug("The `cordvoice` command") == "the-cordvoice-command"
    assert slug("cordvoice play and cordvoice record") == "cordvoice-play-and-cordvoice-record"
    assert slug("See [the emulator](emulator.md)") == "see-the-emulator"
    assert anchors_of(["Usage", "Usage", "Usage"]) == {"usage", "usage-1", "usage-2"}


def test_a_broken_link_is_caught(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [bad](#nope) [gone](missing.md) `[code](not-a-link.md)`\n")
    parsed = parse(page)
    assert [link.target for link in parsed.links] == ["#title", "#nope", "missing.md"]
    assert "title" in parsed.anchors and "nope" not in parsed.anchors
