"""IAM-OnDB ``lineStrokes`` XML -> (pen, dx, dy) sequences.

A file holds ``StrokeSet`` > ``Stroke`` > ``Point x= y= time=``. Every point becomes one
step (pen, dx, dy): ``pen`` is 1 at the last point of each stroke (the pen lifts after
it) and 0 elsewhere; (dx, dy) is the offset from the previous point (0, 0 at the first).
The y axis is flipped (dy = -(y_t - y_{t-1})) so that up is positive: IAM stores screen
coordinates with y growing downwards. Offsets are in the file's raw units; normalisation
happens later (batching.Normalizer skips the pen column).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import DataError
from .registry import SequenceSet


def read_strokes(path) -> np.ndarray:
    """The (T, 3) (pen, dx, dy) array of one lineStrokes XML file."""
    path = Path(path)
    try:
        root = ET.parse(str(path)).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    points = []  # (x, y, last-of-stroke)
    for stroke in root.iter("Stroke"):
        pts = stroke.findall("Point")
        for i, p in enumerate(pts):
            try:
                x, y = float(p.attrib["x"]), float(p.attrib["y"])
            except KeyError as e:
                raise DataError(f"{path}: a Point has no {e.args[0]} attribute") from None
            except ValueError:
                raise DataError(f"{path}: a Point has a non-numeric coordinate") from None
            points.append((x, y, 1.0 if i == len(pts) - 1 else 0.0))
    if not points:
        raise DataError(f"{path}: no StrokeSet/Stroke/Point elements (not an IAM-OnDB lineStrokes file)")
    arr = np.asarray(points, dtype=np.float64)
    out = np.zeros((len(arr), 3), dtype=np.float32)
    out[:, 0] = arr[:, 2]
    out[1:, 1] = np.diff(arr[:, 0])
    out[1:, 2] = -np.diff(arr[:, 1])
    if len(out) < 2:
        raise DataError(f"{path}: only {len(out)} point; need at least 2")
    if not np.isfinite(out).all():
        raise DataError(f"{path}: contains NaN or Inf")
    return out


def load_iam(paths, name: str | None = None) -> SequenceSet:
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    sequences = [read_strokes(p) for p in paths]
    label = name or str(paths[0])
    meta = {"source": label, "pen": True, "y_up": True, "files": [str(p) for p in paths]}
    return SequenceSet(sequences, "handwriting", label, meta)
