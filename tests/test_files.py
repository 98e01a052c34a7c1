"""Output files get the mode a new file gets (0o666 & ~umask), atomically, leaving no temp files."""

from __future__ import annotations

import ast
import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from vrnn import checkpoint, writers
from vrnn.data import pianoroll


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def only(folder: Path, *names: str) -> bool:
    """True when ``folder`` holds exactly ``names``: no temporary files left behind."""
    return sorted(p.name for p in folder.iterdir()) == sorted(names)


WRITES = {
    "x.npy": lambda p: writers.write_npy(p, np.ones((3, 2))),
    "x.npz": lambda p: writers.write_npz(p, {"a": np.ones(3)}),
    "x.wav": lambda p: writers.write_wav(p, np.zeros((4, 200)), 16000),
    "x.png": lambda p: writers.plot_sequence(p, np.zeros((5, 2))),
    "x.ckpt": lambda p: checkpoint.atomic_save({"w": torch.ones(2)}, p),
    pianoroll.CACHE_NAME: lambda p: pianoroll._write_cache(p, [np.eye(3, dtype=np.float32)], ["c"], 60),
}


@pytest.mark.parametrize("name", sorted(WRITES))
def test_written_files_get_the_usual_mode(tmp_path, umask, name):
    path = tmp_path / "out" / name
    WRITES[name](path)
    assert mode(path) == 0o666 & ~umask
    assert only(path.parent, name)
    assert os.umask(umask) == umask  # reading the umask left it as it was


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, umask, monkeypatch):
    path = tmp_path / "x.ckpt"
    checkpoint.atomic_save({"w": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):
        checkpoint.atomic_save({"f": lambda: 0}, path)  # a lambda cannot be pickled
    assert path.read_bytes() == before and only(tmp_path, "x.ckpt")

    def disk_full(f, array):
        f.write(b"half an array")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(OSError):
        writers.write_npy(tmp_path / "y.npy", np.ones(3))
    assert only(tmp_path, "x.ckpt")


def test_atomic_write(tmp_path, umask):
    from vrnn.files import atomic_write

    path = tmp_path / "deep" / "notes.txt"
    with atomic_write(path) as tmp:
        assert Path(tmp).parent == path.parent and not path.exists()
        Path(tmp).write_text("hello")
    assert path.read_text() == "hello" and mode(path) == 0o666 & ~umask
    with pytest.raises(RuntimeError):
        with atomic_write(path) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("interrupted")
    assert path.read_text() == "hello" and only(path.parent, "notes.txt")
    with atomic_write(tmp_path / "plot", suffix=".png") as tmp:
        assert tmp.endswith(".png")


def test_files_module_imports_nothing_from_vrnn():
    import vrnn.files

    tree = ast.parse(Path(vrnn.files.__file__).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0 and not (node.module or "").startswith("vrnn"), ast.dump(node)
        if isinstance(node, ast.Import):
            assert not any(a.name.startswith("vrnn") for a in node.names), ast.dump(node)
