"""Audio files -> sequences of fixed-size waveform frames (the paper's speech input).

Each file is read with soundfile (float in [-1, 1]), mixed to mono (mean of channels),
resampled to ``sample_rate`` with ``scipy.signal.resample_poly``, and cut into frames of
``frame_size`` samples (the trailing partial frame is dropped), giving a (T, frame_size)
sequence. With ``chunk_seconds`` each file is further cut into fixed-length chunks of
``round(chunk_seconds * sample_rate / frame_size)`` frames (Blizzard-style; the remainder
is dropped); with ``chunk_seconds=None`` whole utterances are kept (TIMIT-style).
Clips shorter than 2 frames are dropped; so are clips whose RMS is below ``min_rms``.

With ``spectrogram=True`` each clip becomes its STFT power instead (data/spectrogram.py:
(T, 513) frames |X_t,f|^2, a 1024-sample periodic Hann window, hop 256; kind
``"spectrogram"``): ``frame_size`` does not apply, ``chunk_seconds`` cuts chunks of
``round(chunk_seconds * sample_rate / 256)`` frames, and each sequence's file and first
frame are kept in ``meta["sequence_files"]`` and ``meta["frame_offsets"]`` (what
resynthesis needs to recompute the phase from the audio).
"""

from __future__ import annotations

from math import gcd
from pathlib import Path

import numpy as np

from ..errors import DataError
from .sequences import SequenceSet

# Defaults for the fetched corpora.
FETCHED = {
    # name: (sub-folders to skip, default chunk_seconds, default min_rms)
    "asterisk-en": (("silence",), 0.5, 0.0),
    "fillets-cs": ((), None, 0.01),
}


def read_mono(path, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
    """(mono float32 waveform, rate) of an audio file, resampled if ``sample_rate`` is given."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError / TypeError
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = reason.replace(str(path), "").strip(" :'\"") or type(e).__name__
        raise DataError(f"{path}: not an audio file soundfile can read ({reason[:120]})") from None
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if sample_rate is not None and rate != sample_rate and len(wave):
        from scipy.signal import resample_poly

        g = gcd(int(rate), int(sample_rate))
        wave = resample_poly(wave, int(sample_rate) // g, int(rate) // g).astype(np.float32)
        rate = sample_rate
    return np.asarray(wave, dtype=np.float32), int(rate)


def frame(wave: np.ndarray, frame_size: int) -> np.ndarray:
    """(T, frame_size) frames of a 1-D waveform; the trailing partial frame is dropped."""
    t = len(wave) // frame_size
    return np.ascontiguousarray(wave[: t * frame_size].reshape(t, frame_size), dtype=np.float32)


def load_audio(paths, sample_rate: int = 16000, frame_size: int = 200, chunk_seconds: float | None = 0.5,
               min_rms: float = 0.0, name: str | None = None, where: str | None = None,
               spectrogram: bool = False) -> SequenceSet:
    """Read audio files into a speech (or, with ``spectrogram``, a spectrogram) SequenceSet
    (see the module docstring)."""
    from . import spectrogram as stft

    paths = [Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)]
    sample_rate, frame_size = int(sample_rate), int(frame_size)
    if spectrogram:
        frame_size = stft.HOP  # a chunk counts STFT frames, one per hop
    if sample_rate <= 0 or frame_size <= 0:
        raise DataError(f"{where or name or 'audio'}: sample_rate and frame_size must be positive")
    chunk = None
    if chunk_seconds:
        chunk = max(2, int(round(float(chunk_seconds) * sample_rate / frame_size)))
    sequences: list[np.ndarray] = []
    files: list[str] = []
    offsets: list[int] = []
    dropped_short = dropped_quiet = 0
    for p in paths:
        wave, _ = read_mono(p, sample_rate)
        if min_rms and (len(wave) == 0 or float(np.sqrt(np.mean(wave.astype(np.float64) ** 2))) < min_rms):
            dropped_quiet += 1
            continue
        if spectrogram and len(wave) <= stft.N_FFT // 2:  # too short to reflect half a window
            dropped_short += 1
            continue
        frames = stft.power(wave) if spectrogram else frame(wave, frame_size)
        starts = [0] if chunk is None else list(range(0, len(frames) - chunk + 1, chunk))
        kept = [(i, frames[i:] if chunk is None else frames[i:i + chunk]) for i in starts]
        kept = [(i, x) for i, x in kept if len(x) >= 2]
        if not kept:
            dropped_short += 1
            continue
        sequences.extend(x for _, x in kept)
        offsets.extend(i for i, _ in kept)
        files.extend([str(p)] * len(kept))
    label = where or name or (str(paths[0]) if paths else "audio")
    if not sequences:
        need = f"{chunk} frames ({chunk_seconds} s)" if chunk else f"2 frames of {frame_size} samples"
        raise DataError(f"{label}: no audio clip long (or loud) enough; each needs at least {need}")
    if not all(np.isfinite(s).all() for s in sequences):
        raise DataError(f"{label}: audio contains NaN or Inf")
    meta = {
        "source": label,
        "sample_rate": sample_rate,
        "frame_size": frame_size,
        "chunk_seconds": float(chunk_seconds) if chunk else None,
        "files": len(paths) - dropped_short - dropped_quiet,
        "dropped_short": dropped_short,
        "dropped_quiet": dropped_quiet,
    }
    if spectrogram:
        del meta["frame_size"]
        meta.update(n_fft=stft.N_FFT, hop=stft.HOP, window="hann (periodic)",
                    sequence_files=files, frame_offsets=offsets)
        return SequenceSet(sequences, "spectrogram", name or label, meta)
    return SequenceSet(sequences, "speech", name or label, meta)


def fetched_files(name: str) -> list[Path]:
    """Audio files of a fetched corpus, sorted; DataError if it has not been fetched."""
    from .fetch import fetched_path

    root = fetched_path(name)
    if root is None:
        raise DataError(f"{name}: not fetched yet; run `vrnn data fetch {name}`")
    skip = set(FETCHED[name][0])
    files = []
    for f in sorted(root.rglob("*")):
        rel = f.relative_to(root).parts
        if rel and rel[0] in skip:
            continue
        if f.is_file() and f.suffix.lower() in (".wav", ".ogg", ".flac"):
            files.append(f)
    if not files:
        raise DataError(f"{root}: no audio files in the fetched {name} folder; run `vrnn data fetch {name}` again")
    return files


def load_fetched(name: str, sample_rate: int = 16000, frame_size: int = 200, chunk_seconds="default",
                 min_rms: float | None = None, spectrogram: bool = False) -> SequenceSet:
    """Load ``asterisk-en`` or ``fillets-cs`` from the cache (see fetch.py); with
    ``spectrogram``, as STFT power frames (whole utterances unless ``chunk_seconds``)."""
    _, default_chunk, default_rms = FETCHED[name]
    if chunk_seconds == "default":
        chunk_seconds = None if spectrogram else default_chunk
    if min_rms is None:
        min_rms = default_rms
    files = fetched_files(name)
    data = load_audio(files, sample_rate=sample_rate, frame_size=frame_size, chunk_seconds=chunk_seconds,
                      min_rms=min_rms, name=name, where=name, spectrogram=spectrogram)
    from .fetch import fetched_path

    data.meta["source"] = str(fetched_path(name))
    return data
