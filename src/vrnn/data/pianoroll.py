"""Binary piano-rolls, and the Bach chorales of the music21 corpus as a JSB-like set.

Frames are ``step_quarter`` quarter notes long (1.0 for the chorales). A pitch is on in
frame t when a note of that pitch sounds at the frame's start, time t * step_quarter
(sampling, as in the classic JSB Chorales set), over all parts. The roll has one column
per MIDI pitch from ``lowest_pitch`` upward.

``chorales``: the ``bach`` MusicXML files (.mxl, .xml) of the music21 corpus with exactly
four parts (365 with music21 10.5), sorted by file name. The pitch range is the lowest..highest pitch over all of them
(MIDI 36..81, D = 46, with music21 10.5). Parsing takes ~40 s, so the rolls are cached
as ``cache_dir()/chorales-v1.npz``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write
from .registry import SequenceSet

CACHE_NAME = "chorales-v1.npz"
_EPS = 1e-6


def active_pitches(stream, step_quarter: float = 1.0) -> list[set[int]]:
    """For each frame, the set of MIDI pitches sounding at the frame's start."""
    notes = []  # (start, end, midi)
    flat = stream.flatten()
    for n in flat.notes:  # Notes and Chords; offsets in the flat stream are absolute
        start = float(flat.elementOffset(n))
        dur = float(n.quarterLength)
        if dur <= 0:  # grace notes
            continue
        for p in n.pitches:
            notes.append((start, start + dur, int(p.midi)))
    if not notes:
        return []
    end = max(e for _, e, _ in notes)
    frames = [set() for _ in range(int(math.ceil(end / step_quarter - _EPS)))]
    for s, e, m in notes:
        first = int(math.ceil(s / step_quarter - _EPS))
        for t in range(first, len(frames)):
            if t * step_quarter >= e - _EPS:
                break
            frames[t].add(m)
    return frames


def frames_to_roll(frames: list[set[int]], lowest_pitch: int, n_pitches: int) -> np.ndarray:
    roll = np.zeros((len(frames), n_pitches), dtype=np.float32)
    for t, pitches in enumerate(frames):
        for m in pitches:
            if lowest_pitch <= m < lowest_pitch + n_pitches:
                roll[t, m - lowest_pitch] = 1.0
    return roll


def to_pianoroll(stream, lowest_pitch: int | None = None, highest_pitch: int | None = None,
                 step_quarter: float = 1.0) -> tuple[np.ndarray, int]:
    """(roll (T, P) float32 0/1, lowest_pitch) of a music21 stream.

    The pitch range defaults to the stream's own lowest..highest pitch; pitches outside a
    given range are dropped.
    """
    frames = active_pitches(stream, step_quarter)
    pitches = set().union(*frames) if frames else set()
    if lowest_pitch is None:
        lowest_pitch = min(pitches) if pitches else 60
    if highest_pitch is None:
        highest_pitch = max(pitches) if pitches else lowest_pitch
    return frames_to_roll(frames, lowest_pitch, highest_pitch - lowest_pitch + 1), lowest_pitch


def chorale_paths() -> list[Path]:
    try:
        from music21 import corpus
    except ImportError:
        raise DataError("chorales: music21 is not installed; `pip install music21`") from None
    by_stem: dict[str, Path] = {}
    for p in sorted((Path(p) for p in corpus.getComposer("bach")), key=lambda p: (p.stem, p.suffix != ".mxl")):
        if p.suffix in (".mxl", ".xml"):  # MusicXML; the .krn files duplicate .mxl ones
            by_stem.setdefault(p.stem, p)
    return sorted(by_stem.values(), key=lambda p: p.name)


def parse_chorales(paths=None, progress=None) -> tuple[list[np.ndarray], list[str], int]:
    """(rolls, names, lowest_pitch) of the four-part chorales among ``paths``."""
    from music21 import converter

    paths = chorale_paths() if paths is None else [Path(p) for p in paths]
    all_frames, names = [], []
    for i, p in enumerate(paths):
        score = converter.parse(str(p))
        if len(score.parts) != 4:
            continue
        frames = active_pitches(score, 1.0)
        if len(frames) < 2:
            continue
        all_frames.append(frames)
        names.append(p.stem)
        if progress and (i + 1) % 50 == 0:
            progress(f"chorales: parsed {i + 1}/{len(paths)}")
    if not all_frames:
        raise DataError("chorales: no four-part chorales found in the music21 corpus")
    pitches = set().union(*(set().union(*f) for f in all_frames))
    lo, hi = min(pitches), max(pitches)
    rolls = [frames_to_roll(f, lo, hi - lo + 1) for f in all_frames]
    return rolls, names, lo


def _write_cache(path: Path, rolls, names, lowest) -> None:
    """Write the rolls as a compressed .npz cache, atomically (``files.atomic_write``)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, lowest_pitch=np.int64(lowest), names=np.asarray(names),
                            **{f"roll_{i:04d}": r.astype(np.uint8) for i, r in enumerate(rolls)})


def _read_cache(path: Path):
    with np.load(path, allow_pickle=False) as z:
        keys = sorted(k for k in z.files if k.startswith("roll_"))
        rolls = [z[k].astype(np.float32) for k in keys]
        return rolls, [str(n) for n in z["names"]], int(z["lowest_pitch"])


def load_chorales(refresh: bool = False, progress=None) -> SequenceSet:
    from .fetch import cache_dir

    path = cache_dir() / CACHE_NAME
    data = None
    if path.is_file() and not refresh:
        try:
            data = _read_cache(path)
        except Exception:
            data = None  # a damaged cache is rebuilt
    if data is None:
        data = parse_chorales(progress=progress)
        try:
            _write_cache(path, *data)
        except OSError:
            pass  # an unwritable cache only costs time
    rolls, names, lowest = data
    meta = {"source": "music21 corpus bach (four-part MusicXML)", "lowest_pitch": lowest, "step_quarter": 1.0,
            "names": names}
    return SequenceSet(rolls, "pianoroll", "chorales", meta)
