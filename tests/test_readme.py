"""The README runs as written: its Python tour is executed, and every `vrnn` command line
of its shell blocks (and of the guides') parses with the command's own parser (flags,
choices and values as declared), so that a renamed option cannot leave a stale example."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from vrnn.cli import _parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").rglob("*.md"))]


def test_python_api_tour_runs():
    text = README.read_text()
    section = text[text.index("## The Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    trace, loss = scope["trace"], scope["loss"]  # the last ones: objective under autocast
    assert trace.log_px.shape == (8, 40) and trace.log_px.dtype == scope["torch"].float32
    assert bool(scope["torch"].isfinite(loss))


def command_lines(path: Path) -> list[str]:
    """The `vrnn ...` lines of the ```sh blocks of a page, comments and pipes cut off."""
    out = []
    for block in re.findall(r"```sh\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for part in re.split(r"&&|\|", line):
                part = part.strip()
                if part.startswith("vrnn "):
                    out.append(part)
    return out


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_command_of_the_page_parses(page, capsys):
    parser = _parser()
    lines = command_lines(page)
    for line in lines:
        try:
            parser.parse_args(shlex.split(line)[1:])
        except SystemExit as exc:
            raise AssertionError(f"{page.name}: `{line}` does not parse: {capsys.readouterr().err.strip()}") from exc
    if page == README:
        assert len(lines) >= 10
