"""IAM-OnDB ``lineStrokes`` XML -> (pen, dx, dy) sequences.

A file holds ``StrokeSet`` > ``Stroke`` > ``Point x= y= time=``; its points, in order,
form one line of handwriting. A line of N points becomes N - 1 steps, one per point after
the first: step t is (pen, dx, dy) where (dx, dy) is the offset from point t - 1 to point
t (so the jump between two strokes is the offset of the next stroke's first point) and
``pen`` is 1 when point t is the last of its stroke (the pen lifts after it), else 0. The
first point has no previous point; it gives no step (a fixed (0, 0) first step would be
free log-likelihood for a model). The y axis is flipped (dy = -(y_t - y_{t-1})) so that up
is positive: IAM stores screen coordinates with y growing downwards. Offsets are in the
file's raw units; normalisation happens later (batching.Normalizer skips the pen column).

Dequantisation (``dequantize``, on by default): IAM's coordinates are integers, and a
density on integer data can pile up on the lattice points without bound. So when every
offset of a file is a whole number, uniform noise in [-0.5, 0.5) is added to each dx and
dy, drawn from a generator seeded by the file's name (the same values on every load, on
any machine, wherever the file lies). Other files are left alone. ``meta["dequantized"]``
is True when every file was dequantised. The expected log-density of dequantised steps,
in the data's own units (one unit = one coordinate step, so each integer offset owns a
unit square), is a lower bound on the log-probability of the integer steps (Theis et al.
2016, "A note on the evaluation of generative models"), per step as for a whole line. A
log-density of normalised data must first be converted back to raw units (add the log of
the normalizer's scale of dx and dy, per step) before it is read as such a bound.
"""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sequences import SequenceSet


def _points(path: Path) -> np.ndarray:
    """The (N, 3) (x, y, last-of-stroke) array of the points of one lineStrokes file."""
    try:
        root = ET.parse(str(path)).getroot()
    except ET.ParseError as e:
        raise DataError(f"{path}: malformed XML ({e})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    points = []
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
    if len(points) < 3:
        raise DataError(f"{path}: only {len(points)} point(s); need at least 3 (the first gives no step)")
    return np.asarray(points, dtype=np.float64)


def _steps(points: np.ndarray) -> np.ndarray:
    """(N - 1, 3) float64 (pen, dx, dy) steps of (N, 3) (x, y, last) points; y flipped."""
    steps = np.empty((len(points) - 1, 3))
    steps[:, 0] = points[1:, 2]
    steps[:, 1] = np.diff(points[:, 0])
    steps[:, 2] = -np.diff(points[:, 1])
    return steps


def _noise(name: str, shape) -> np.ndarray:
    """Uniform noise in [-0.5, 0.5) from a generator seeded by ``name`` (not by hash())."""
    seed = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "little")
    return np.random.default_rng(seed).uniform(-0.5, 0.5, shape)


def read_strokes(path, dequantize: bool = True) -> tuple[np.ndarray, bool]:
    """(the (N - 1, 3) float32 (pen, dx, dy) steps of one file, whether they were dequantised)."""
    path = Path(path)
    steps = _steps(_points(path))
    if not np.isfinite(steps).all():
        raise DataError(f"{path}: contains NaN or Inf")
    offsets = steps[:, 1:]
    dequantized = bool(dequantize) and bool((offsets == np.round(offsets)).all())
    if dequantized:
        steps[:, 1:] = offsets + _noise(path.name, offsets.shape)
    return steps.astype(np.float32), dequantized


def load_iam(paths, name: str | None = None, dequantize: bool = True) -> SequenceSet:
    """The lines of IAM-style XML files, one sequence each, dequantised unless told not to."""
    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    read = [read_strokes(p, dequantize) for p in paths]
    label = name or str(paths[0])
    meta = {"source": label, "pen": True, "y_up": True, "files": [str(p) for p in paths],
            "dequantized": all(d for _, d in read)}
    return SequenceSet([s for s, _ in read], "handwriting", label, meta)
