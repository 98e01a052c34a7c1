"""The documentation site builds in strict mode: a broken link, a missing page, a results
page whose generated table is gone or an API reference to a name that no longer exists
fails the suite."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_site_builds_strictly(tmp_path):
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for page in ("index.html", "guide/data/index.html", "results/polyphonic/index.html",
                 "reference/models/index.html"):
        assert (tmp_path / "site" / page).exists(), page
    api = (tmp_path / "site" / "reference" / "models" / "index.html").read_text()
    assert "VRNNConfig" in api and "discrete_dims" in api  # generated from the docstrings
