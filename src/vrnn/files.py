"""Writing files atomically, with the mode a new file normally gets.

This module sits at the bottom of the package: it imports nothing from the rest of vrnn.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


def current_umask() -> int:
    """The process's umask, read without changing it where Linux allows.

    Linux reports it in /proc/self/status. Elsewhere it is read by setting it, which
    changes it for every thread for an instant; 0o077 is set meanwhile, so a file another
    thread creates in that instant is at worst private, never world-writable.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0o666 & ~umask (0o644 under umask 022)."""
    return 0o666 & ~current_umask()


@contextmanager
def atomic_write(path, suffix: str | None = None):
    """Yield a temporary path (a str) beside ``path``; on success move it into place.

    The temporary file is created empty in ``path``'s folder (made if missing), named
    ``.<stem>-<random><suffix>`` (``suffix`` defaults to ``path``'s, so writers that go by
    the name pick the right format). When the block ends without an exception the file
    gets mode 0o666 & ~umask, as if ``open()`` had created it (mkstemp makes it 0o600), and
    ``os.replace`` puts it at ``path``: a reader sees the old file or the new one, never
    half of one. Whatever happens, no temporary file is left behind. A failed write is an
    OSError naming ``path`` (not the temporary file).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}-", suffix=suffix or path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    except OSError as exc:  # a full disk, ...: named by the file the user asked for
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
