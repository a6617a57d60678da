"""Reading the project's Markdown: headings and their anchors, links, and fenced code blocks.

Only what README.md and docs/*.md use: ATX headings, inline links, fenced blocks with a language, and an HTML
comment ``<!-- doc-test: NAME -->`` right before a block that is a complete program the tests run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
DOCS = REPO / "docs"

_FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)\s*$")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_CODE_SPAN = re.compile(r"`+[^`]*`+")
_DOC_TEST = re.compile(r"^<!--\s*doc-test:\s*([\w-]+)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int
    name: str | None
    """The ``doc-test`` name given just before the block, if any."""


@dataclass(frozen=True)
class Link:
    target: str
    line: int


@dataclass(frozen=True)
class Heading:
    line: int
    level: int
    text: str


@dataclass(frozen=True)
class Page:
    path: Path
    headings: list[Heading]
    links: list[Link]
    blocks: list[Block]

    def section(self, title: str) -> list[Block]:
        """The code blocks under the heading ``title``, up to the next heading of the same or higher level."""
        matches = [heading for heading in self.headings if heading.text == title]
        assert matches, f"{self.path.name} has no heading {title!r}"
        first = matches[0]
        end = min(
            (h.line for h in self.headings if h.line > first.line and h.level <= first.level), default=10**9
        )
        return [block for block in self.blocks if first.line < block.line < end]

    @property
    def anchors(self) -> set[str]:
        return anchors_of([heading.text for heading in self.headings])


def parse(path: Path) -> Page:
    headings: list[Heading] = []
    links: list[Link] = []
    blocks: list[Block] = []
    lines = path.read_text(encoding="utf-8").splitlines()
    fence: str | None = None
    language = ""
    start = 0
    body: list[str] = []
    pending_name: str | None = None
    for number, line in enumerate(lines, start=1):
        if fence is not None:
            if line.strip() == fence:
                blocks.append(Block(language, "\n".join(body) + "\n", start, pending_name))
                fence, body, pending_name = None, [], None
            else:
                body.append(line)
            continue
        fence_match = _FENCE.match(line)
        if fence_match:
            fence, language, start = fence_match.group(1), fence_match.group(2).lower(), number
            continue
        name_match = _DOC_TEST.match(line.strip())
        if name_match:
            pending_name = name_match.group(1)
            continue
        if line.strip():
            pending_name = None
        heading = _HEADING.match(line)
        if heading:
            headings.append(Heading(number, len(heading.group(1)), heading.group(2)))
        text = _CODE_SPAN.sub("", line)
        links += [Link(match.group(2), number) for match in _LINK.finditer(text)]
    assert fence is None, f"{path.name}: a code block opened at line {start} is never closed"
    return Page(path, headings, links, blocks)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: link text only, lower case, punctuation dropped, spaces to hyphens."""
    text = _LINK.sub(lambda match: match.group(1), heading)
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors_of(headings: list[str]) -> set[str]:
    """Every heading's anchor, with GitHub's ``-1``, ``-2`` suffixes for repeated ones."""
    seen: dict[str, int] = {}
    anchors = set()
    for heading in headings:
        base = slug(heading)
        count = seen.get(base, 0)
        anchors.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return anchors


def pages() -> list[Page]:
    return [parse(README), *(parse(path) for path in sorted(DOCS.glob("*.md")))]


def named_block(name: str) -> Block:
    """The code block marked ``<!-- doc-test: name -->`` (exactly one across the docs)."""
    found = [block for page in pages() for block in page.blocks if block.name == name]
    assert len(found) == 1, f"expected one block named {name!r}, found {len(found)}"
    return found[0]
