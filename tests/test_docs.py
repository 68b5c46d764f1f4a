"""The README and docs/ point at things that exist, and the README's opening commands are the
ones CI runs.

Links: every relative Markdown link in README.md and docs/*.md must name an existing file or
folder, and a ``#fragment`` must be a heading of the Markdown file it points to (GitHub's anchor
rule). Commands: the README's first fenced block holds the quick start and the test command; the
test command must be what ``.ci/run`` does, step by step, and the quick start must set up the
same way and check a fixture that exists.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
CI_RUN = ROOT / ".ci" / "run"

FENCE = re.compile(r"^(```|~~~)")
INLINE_CODE = re.compile(r"`[^`]*`")
# [text](target) and ![alt](target); the target ends at whitespace or the closing parenthesis.
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks, with inline code removed."""
    lines, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        if not in_fence:
            lines.append(INLINE_CODE.sub("", line))
    return lines


def relative_links(path: Path) -> list[str]:
    links = []
    for line in prose_lines(path.read_text(encoding="utf-8")):
        for target in LINK.findall(line):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
                continue
            links.append(target)
    return links


def github_anchor(heading: str) -> str:
    """The id GitHub gives a heading: markup dropped, lower case, punctuation removed, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    seen: dict[str, int] = {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if FENCE.match(line.lstrip()):
            in_fence = not in_fence
            continue
        match = None if in_fence else HEADING.match(line)
        if match:
            base = github_anchor(match.group(2))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(path: Path) -> list[str]:
    problems = []
    for target in relative_links(path):
        file_part, _, fragment = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        if not resolved.exists():
            problems.append(f"{target}: {resolved.relative_to(ROOT) if resolved.is_relative_to(ROOT) else resolved} does not exist")
            continue
        if fragment and resolved.suffix == ".md" and fragment not in anchors(resolved):
            problems.append(f"{target}: no heading '#{fragment}' in {resolved.name}")
    return problems


@pytest.mark.parametrize("doc", [README, *DOCS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path) -> None:
    assert broken_links(doc) == []


def test_the_link_check_catches_a_missing_file_and_a_missing_heading(tmp_path: Path) -> None:
    (tmp_path / "there.md").write_text("# Here\n\n## Some `code` heading: yes\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "[ok](there.md#some-code-heading-yes) [gone](missing.md) [bad](there.md#nowhere)\n"
        "`[in code](missing.md)`\n```\n[fenced](missing.md)\n```\n[web](https://example.com/x)\n",
        encoding="utf-8",
    )
    assert [p.split(":")[0] for p in broken_links(page)] == ["missing.md", "there.md#nowhere"]


def test_docs_folder_has_the_reference_pages() -> None:
    names = {p.name for p in DOCS}
    for name in ("user-guide.md", "cli.md", "report-format.md", "architecture.md", "performance.md", "cuda.md", "distributed.md", "native.md"):
        assert name in names
        assert f"docs/{name}" in README.read_text(encoding="utf-8"), f"README does not link docs/{name}"


# -- the README's opening commands -------------------------------------------------------------


def first_fenced_commands(text: str) -> list[str]:
    """The command lines (not comments, not blank) of the first fenced block."""
    block, in_fence = [], False
    for line in text.splitlines():
        if FENCE.match(line.lstrip()):
            if in_fence:
                break
            in_fence = True
            continue
        if in_fence and line.strip() and not line.lstrip().startswith("#"):
            block.append(line.strip())
    return block


def normalised_steps(command: str) -> list[list[str]]:
    """A ``a && b && c`` command line as its steps, each as words, with ``python -m pip`` read as
    ``pip`` and ``--quiet`` dropped (how loudly CI installs does not change what it installs)."""
    steps = []
    for step in command.split("&&"):
        words = [w for w in shlex.split(step) if w not in ("--quiet", "-q")]
        if words[:3] == ["python", "-m", "pip"]:
            words = words[2:]
        steps.append(words)
    return steps


def ci_steps() -> list[list[str]]:
    steps = []
    for line in CI_RUN.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith(("set ", "cd ")):
            continue
        steps.extend(normalised_steps(line))
    return steps


def test_the_readme_opens_with_the_quick_start_and_the_ci_test_command() -> None:
    commands = first_fenced_commands(README.read_text(encoding="utf-8"))
    assert len(commands) == 2, commands
    quick_start, test_command = (normalised_steps(c) for c in commands)

    # CI builds the native recorder before the tests (a failed compile fails CI there); the
    # README's command builds it on first use instead.
    prebuild = ["python", "-m", "raceguard.capture.native.build"]
    assert prebuild in ci_steps(), ".ci/run does not build the native recorder"
    assert "python -m raceguard.capture.native.build" in (ROOT / "docs" / "native.md").read_text(encoding="utf-8")
    assert test_command == [s for s in ci_steps() if s != prebuild], "the README's test command is not what .ci/run runs"

    # The quick start sets up like CI (venv, activate, the torch pin), installs the package and
    # checks a fixture that is in the repository.
    assert quick_start[:3] == test_command[:3]
    assert quick_start[3][:2] == ["pip", "install"]
    check = quick_start[-1]
    assert check[:2] == ["raceguard", "check"], check
    assert (ROOT / check[-1]).is_file(), f"{check[-1]} is not in the repository"
