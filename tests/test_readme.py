"""The README's Python API tour runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_python_api_tour_runs():
    text = README.read_text()
    section = text[text.index("## Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), scope)
    trace, loss = scope["trace"], scope["loss"]  # the last ones: objective under autocast
    assert trace.log_px.shape == (8, 40) and trace.log_px.dtype == scope["torch"].float32
    assert bool(scope["torch"].isfinite(loss))
