"""The documentation holds together: links and anchors resolve, and the README's commands are CI's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _without_code(text: str) -> str:
    return re.sub(r"```.*?```", "", text, flags=re.S)


def _anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in _without_code(path.read_text()).splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            out.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_and_anchor_resolves(doc: Path) -> None:
    bad = []
    for target in LINK.findall(_without_code(doc.read_text())):
        if re.match(r"^[a-z]+:", target):
            continue  # http(s), mailto: not checked offline
        file, _, anchor = target.partition("#")
        path = (doc.parent / file).resolve() if file else doc
        if not path.exists():
            bad.append(f"{target}: no such file")
        elif anchor and anchor not in _anchors(path):
            bad.append(f"{target}: no heading #{anchor} in {path.relative_to(ROOT)}")
    assert not bad, f"{doc.relative_to(ROOT)}:\n" + "\n".join(bad)


def _blocks(text: str) -> list[list[str]]:
    return [
        [line.split("#")[0].strip() for line in block.strip().splitlines() if line.split("#")[0].strip()]
        for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    ]


def test_readme_fits_a_screen_and_its_commands_are_cis() -> None:
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 70
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines()]
    main_job, tests = [b for b in _blocks(readme) if b and b[0].startswith("python3 -m venv")]
    assert tests[-1] == "python -m pytest" and main_job[-1] == "hf-prope"
    # CI runs the test command's installs, as written (with -q), then pytest
    for command in tests[1:-1]:
        quiet = command.replace("pip install ", "pip install -q ", 1)
        assert quiet in ci_lines, f"{command!r} is not what .ci/run runs"
    assert any(line.startswith('if [ -n "$marks" ]; then python -m pytest') for line in ci_lines)
    # the main job installs what the tests install, but the recipes extra instead of the test extra
    assert [c for c in main_job[1:-1] if "-e" not in c] == [c for c in tests[1:-1] if "-e" not in c]
