"""Binary piano-rolls: the Bach chorales of the music21 corpus as a JSB-like set, and its
fiddle tunes as a Nottingham-like one.

Frames are ``step_quarter`` quarter notes long (1.0 for the chorales). A pitch is on in
frame t when a note of that pitch sounds at the frame's start, time t * step_quarter
(sampling, as in the classic JSB Chorales set), over all parts. The roll has one column
per MIDI pitch from ``lowest_pitch`` upward.

``chorales``: the ``bach`` MusicXML files (.mxl, .xml) of the music21 corpus with exactly
four parts (365 with music21 10.5), sorted by file name. The pitch range is the lowest..highest pitch over all of them
(MIDI 36..81, D = 46, with music21 10.5). Parsing takes ~40 s, so the rolls are cached
as ``cache_dir()/chorales-v1.npz``.

``folk``: the 1,059 tunes of Ryan's Mammoth Collection (1883; reels, hornpipes, jigs,
airs), ABC files of the music21 corpus, at eighth-note frames (``step_quarter`` 0.5),
sorted by file name. They are melodies: under 0.4% of frames hold two to four pitches
(double stops, final chords); there are no chord symbols (Nottingham's piano-rolls carry
its chords too), and repeats are not expanded. The pitch range is again the
lowest..highest over the collection (MIDI 55..93, D = 39, with music21 10.5; 32 to 460
frames, median 96). A file music21 cannot parse, or whose tune has fewer than two
frames, is skipped and counted (``meta["skipped_files"]``). Parsing takes about 80 s, so the rolls are cached as
``cache_dir()/folk-v1.npz``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np

from ..errors import DataError
from ..files import atomic_write
from .sequences import SequenceSet

CACHE_NAME = "chorales-v1.npz"
FOLK_CACHE_NAME = "folk-v1.npz"
FOLK_STEP = 0.5  # quarter notes per frame: eighth notes
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


def _music21_corpus(name: str):
    """music21's corpus module, or a DataError naming the dataset ``name`` that needs it."""
    try:
        from music21 import corpus
    except ImportError:
        raise DataError(f"{name}: music21 is not installed; `pip install music21`") from None
    return corpus


def chorale_paths() -> list[Path]:
    corpus = _music21_corpus("chorales")
    by_stem: dict[str, Path] = {}
    for p in sorted((Path(p) for p in corpus.getComposer("bach")), key=lambda p: (p.stem, p.suffix != ".mxl")):
        if p.suffix in (".mxl", ".xml"):  # MusicXML; the .krn files duplicate .mxl ones
            by_stem.setdefault(p.stem, p)
    return sorted(by_stem.values(), key=lambda p: p.name)


def _parse_all(paths, read, step_quarter: float, name: str, progress, every: int):
    """(frames per piece, names, skipped file names): ``read(path)`` gives a music21 stream,
    or None for a file to skip; pieces of fewer than two frames are skipped too."""
    all_frames, names, skipped = [], [], []
    for i, p in enumerate(paths):
        score = read(p)
        frames = [] if score is None else active_pitches(score, step_quarter)
        if len(frames) < 2:
            skipped.append(p.name)
            continue
        all_frames.append(frames)
        names.append(p.stem)
        if progress and (i + 1) % every == 0:
            progress(f"{name}: parsed {i + 1}/{len(paths)}")
    return all_frames, names, skipped


def parse_chorales(paths=None, progress=None) -> tuple[list[np.ndarray], list[str], int]:
    """(rolls, names, lowest_pitch) of the four-part chorales among ``paths``."""
    from music21 import converter

    def four_parts(p):
        score = converter.parse(str(p))
        return score if len(score.parts) == 4 else None

    paths = chorale_paths() if paths is None else [Path(p) for p in paths]
    all_frames, names, _ = _parse_all(paths, four_parts, 1.0, "chorales", progress, 50)
    if not all_frames:
        raise DataError("chorales: no four-part chorales found in the music21 corpus")
    rolls, lo = _rolls(all_frames)
    return rolls, names, lo


def folk_paths() -> list[Path]:
    folder = Path(_music21_corpus("folk").__file__).parent / "ryansMammoth"
    paths = sorted(folder.glob("*.abc"))
    if not paths:
        raise DataError(f"folk: no ABC files in {folder} (music21's corpus without Ryan's Mammoth Collection)")
    return paths


def parse_folk(paths=None, progress=None) -> tuple[list[np.ndarray], list[str], int, list[str]]:
    """(rolls, names, lowest_pitch, skipped) of the tunes among ``paths`` (ABC files, the
    first tune of each), at eighth-note frames; ``skipped`` names files that do not parse
    or hold fewer than two frames."""
    from music21 import converter

    def first_tune(p):
        try:
            score = converter.parse(str(p), format="abc")
        except Exception:  # music21's ABC parser raises many kinds on a malformed tune
            return None
        if hasattr(score, "scores"):  # an Opus: several tunes in one file
            return score.scores[0] if len(score.scores) else None
        return score

    paths = folk_paths() if paths is None else [Path(p) for p in paths]
    all_frames, names, skipped = _parse_all(paths, first_tune, FOLK_STEP, "folk", progress, 100)
    if not all_frames:
        raise DataError("folk: no tune in Ryan's Mammoth Collection could be parsed")
    rolls, lo = _rolls(all_frames)
    return rolls, names, lo, skipped


def _rolls(all_frames) -> tuple[list[np.ndarray], int]:
    """The rolls over the pitch range all of them span, and its lowest pitch."""
    pitches = set().union(*(set().union(*f) for f in all_frames))
    lo, hi = min(pitches), max(pitches)
    return [frames_to_roll(f, lo, hi - lo + 1) for f in all_frames], lo


def _write_cache(path: Path, rolls, names, lowest, skipped=()) -> None:
    """Write the rolls as a compressed .npz cache, atomically (``files.atomic_write``)."""
    with atomic_write(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, lowest_pitch=np.int64(lowest), names=np.asarray(names),
                            skipped=np.asarray(list(skipped), dtype=str),
                            **{f"roll_{i:04d}": r.astype(np.uint8) for i, r in enumerate(rolls)})


def _read_cache(path: Path):
    with np.load(path, allow_pickle=False) as z:
        keys = sorted(k for k in z.files if k.startswith("roll_"))
        rolls = [z[k].astype(np.float32) for k in keys]
        skipped = [str(n) for n in z["skipped"]] if "skipped" in z.files else []
        return rolls, [str(n) for n in z["names"]], int(z["lowest_pitch"]), skipped


def _cached(name: str, parse, refresh: bool, progress):
    """``parse(progress)``'s (rolls, names, lowest, skipped) from the cache ``name``,
    parsing and caching them when the cache is missing, damaged or ``refresh`` is set."""
    from .fetch import cache_dir

    path = cache_dir() / name
    if path.is_file() and not refresh:
        try:
            return _read_cache(path)
        except Exception:
            pass  # a damaged cache is rebuilt
    if progress is None:
        def progress(message):
            print(message, file=sys.stderr, flush=True)
    progress(f"{name.split('-')[0]}: parsing the music21 corpus (once; cached as {path})")
    data = parse(progress)
    try:
        _write_cache(path, *data)
    except OSError:
        pass  # an unwritable cache only costs time
    return data


def load_chorales(refresh: bool = False, progress=None) -> SequenceSet:
    rolls, names, lowest, _ = _cached(CACHE_NAME, lambda pr: (*parse_chorales(progress=pr), ()), refresh, progress)
    meta = {"source": "music21 corpus bach (four-part MusicXML)", "lowest_pitch": lowest, "step_quarter": 1.0,
            "names": names}
    return SequenceSet(rolls, "pianoroll", "chorales", meta)


def load_folk(refresh: bool = False, progress=None) -> SequenceSet:
    rolls, names, lowest, skipped = _cached(FOLK_CACHE_NAME, lambda pr: parse_folk(progress=pr), refresh, progress)
    meta = {"source": "music21 corpus ryansMammoth (Ryan's Mammoth Collection, ABC; melodies)",
            "lowest_pitch": lowest, "step_quarter": FOLK_STEP, "names": names, "skipped_files": len(skipped)}
    return SequenceSet(rolls, "pianoroll", "folk", meta)
