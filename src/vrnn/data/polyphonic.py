"""The four classic polyphonic piano-roll sets of Boulanger-Lewandowski et al. (2012):
JSB Chorales, Nottingham, MuseData and Piano-midi.de, 88 binary dimensions (MIDI 21..108),
with their standard train / valid / test splits, bundled in ``data/bundled/`` (origin and
licence in its README.md) and checked by sha256 before they are read.

Every paper of the family reports test log-likelihood on them in nats per time step: the
sum of the test sequences' log-likelihoods divided by the total number of test frames,
first frame included (``vrnn evaluate``'s ``per_step``).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sequences import SequenceSet

BUNDLED = Path(__file__).parent / "bundled"
LOWEST_PITCH = 21  # column j is MIDI note 21 + j (A0 .. C8)

# name -> (file, sha256, what, frame length in quarter notes where the source says it)
SETS = {
    "jsb": ("JSB_Chorales.mat", "ac0e608527cc411c7e21ef7d38be47f0de7fb6b13b3ae168b8eccf1c2a9b18d4",
            "JSB Chorales", 1.0),
    "nottingham": ("Nottingham.mat", "d154f7ca2e90799dc1dc011d8fc048f2fc6ef3f7c69d974b9cf27a471634fbea",
                   "Nottingham", None),
    "musedata": ("MuseData.mat", "e8d9eb422ec3833c25f43a9f854d4ee0b9118a20b45f2c183395cdc30ffa14ff",
                 "MuseData", None),
    "pianomidi": ("Piano_midi.mat", "990a8a71d5764a7eaa3e78d9e5023d1470380fe2db3a1448265a97a24c8b1c34",
                  "Piano-midi.de", None),
}
KEYS = {"train": "traindata", "valid": "validdata", "test": "testdata"}


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_polyphonic(name: str, path: str | Path | None = None) -> SequenceSet:
    """One of the four sets (``jsb``, ``nottingham``, ``musedata``, ``pianomidi``) as a
    piano-roll SequenceSet whose ``meta["split"]`` keeps the standard split; ``path`` reads
    a user's own copy of the .mat file instead of the bundled one (checked the same way)."""
    from scipy.io import loadmat

    file, digest, title, step = SETS[name]
    path = Path(path) if path is not None else BUNDLED / file
    try:
        got = sha256(path)
    except OSError as exc:
        raise DataError(f"{path}: cannot read the {title} file ({exc.strerror or exc})") from None
    if got != digest:
        raise DataError(f"{path}: sha256 {got[:12]}... is not that of the standard {title} file "
                        f"({digest[:12]}...)")
    mat = loadmat(str(path))
    sequences, split = [], []
    for part, key in KEYS.items():
        cells = mat[key].reshape(-1)
        for roll in cells:
            sequences.append(np.asarray(roll, dtype=np.float32))
            split.append(part)
    meta = {"source": f"{title} (Boulanger-Lewandowski et al. 2012; bundled {file})", "lowest_pitch": LOWEST_PITCH,
            "split": split, "sha256": digest}
    if step is not None:
        meta["step_quarter"] = step
    return SequenceSet(sequences, "pianoroll", name, meta)
