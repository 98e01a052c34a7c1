"""Outputs a person can hear and see: WAV, MIDI, PNG plots, and .npy arrays.

Every file is first written to a temporary file in the same folder and then moved into
place with ``os.replace`` (``vrnn.files.atomic_write``), so a reader never sees half a
file; it gets the mode a new file normally gets (0o644 under umask 022).
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np

from .files import atomic_write


def write_text(path, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically: a reader never sees half of it."""
    path = Path(path)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> Path:
    path = Path(path)
    with atomic_write(path, ".png") as tmp:
        fig.savefig(tmp, format="png")
    return path


def _np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


# --------------------------------------------------------------------------- audio


def write_wav(path, frames, sample_rate: int) -> Path:
    """Flatten (T, frame_size) frames (waveform scale), clip to [-1, 1], write 16-bit PCM WAV."""
    import soundfile as sf

    wave = np.clip(np.nan_to_num(_np(frames).reshape(-1)), -1.0, 1.0)
    path = Path(path)
    with atomic_write(path, ".wav") as tmp:
        sf.write(tmp, wave, int(sample_rate), subtype="PCM_16", format="WAV")
    return path


def plot_waveform(path, wave, sample_rate: int, title: str | None = None) -> Path:
    wave = _np(wave).reshape(-1)
    fig = _figure(10, 3)
    ax = fig.add_subplot(1, 1, 1)
    t = np.arange(len(wave)) / float(sample_rate)
    ax.plot(t, wave, linewidth=0.5)
    ax.set_xlabel("seconds")
    ax.set_ylabel("amplitude")
    ax.set_xlim(0, max(t[-1] if len(t) else 0, 1e-3))
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


# --------------------------------------------------------------------------- handwriting


def _strokes(seq: np.ndarray, pen: bool) -> list[np.ndarray]:
    """Cumulative positions split into pen-down strokes (a break after each pen=1 point)."""
    if pen:
        lift, offsets = seq[:, 0] > 0.5, seq[:, 1:3]
    else:
        lift, offsets = np.zeros(len(seq), dtype=bool), seq[:, :2]
    pos = np.cumsum(offsets, axis=0)
    strokes, start = [], 0
    for i in np.flatnonzero(lift):
        strokes.append(pos[start:i + 1])
        start = i + 1
    if start < len(pos):
        strokes.append(pos[start:])
    return [s for s in strokes if len(s)]


def plot_handwriting(path, seqs, titles=None, pen: bool | None = None) -> Path:
    """A grid of pen trajectories from (T, 2) (dx, dy) or (T, 3) (pen, dx, dy) offset arrays.

    ``pen`` None: a (T, 3) array is read as (pen, dx, dy). Single points are drawn as dots.
    """
    seqs = [_np(s) for s in seqs]
    n = max(len(seqs), 1)
    cols = min(n, 4)
    rows = math.ceil(n / cols)
    fig = _figure(3 * cols, 3 * rows)
    for k, seq in enumerate(seqs):
        ax = fig.add_subplot(rows, cols, k + 1)
        has_pen = seq.shape[1] == 3 if pen is None else bool(pen)
        for stroke in _strokes(seq, has_pen):
            if len(stroke) == 1:
                ax.plot(stroke[:, 0], stroke[:, 1], "k.", markersize=2)
            else:
                ax.plot(stroke[:, 0], stroke[:, 1], "k-", linewidth=1)
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_xticks([])
        ax.set_yticks([])
        if titles is not None and k < len(titles):
            ax.set_title(str(titles[k]), fontsize=8)
    fig.tight_layout()
    return _save_png(fig, path)


# --------------------------------------------------------------------------- piano-rolls


def _binary(roll) -> np.ndarray:
    roll = _np(roll)
    if roll.ndim != 2:
        raise ValueError(f"a piano-roll must be (T, P), got shape {roll.shape}")
    return (roll >= 0.5).astype(np.uint8)


def roll_to_stream(roll, lowest_pitch: int = 36, step_quarter: float = 1.0):
    """A music21 Stream of Notes/Chords: consecutive on-frames of a pitch are merged into one note."""
    from music21 import chord, note, stream

    roll = _binary(roll)
    t_max, p_max = roll.shape
    events: dict[float, list[tuple[int, float]]] = {}
    for p in range(p_max):
        t = 0
        while t < t_max:
            if roll[t, p]:
                start = t
                while t < t_max and roll[t, p]:
                    t += 1
                events.setdefault(start * step_quarter, []).append((lowest_pitch + p, (t - start) * step_quarter))
            else:
                t += 1
    s = stream.Stream()
    for offset in sorted(events):
        by_len: dict[float, list[int]] = {}
        for midi, dur in events[offset]:
            by_len.setdefault(dur, []).append(midi)
        for dur, pitches in sorted(by_len.items()):
            if len(pitches) == 1:
                el = note.Note(midi=pitches[0], quarterLength=dur)
            else:
                el = chord.Chord(sorted(pitches), quarterLength=dur)
            s.insert(offset, el)
    if t_max and not events:
        s.insert(0, note.Rest(quarterLength=t_max * step_quarter))
    return s


def write_midi(path, roll, lowest_pitch: int = 36, step_quarter: float = 1.0) -> Path:
    """Write a (T, P) piano-roll (thresholded at 0.5) as a MIDI file via music21."""
    from music21 import midi

    s = roll_to_stream(roll, lowest_pitch, step_quarter)
    mf = midi.translate.streamToMidiFile(s)
    path = Path(path)
    with atomic_write(path, ".mid") as tmp:
        mf.open(tmp, "wb")
        try:
            mf.write()
        finally:
            mf.close()
    return path


def plot_pianoroll(path, roll, lowest_pitch: int = 36, title: str | None = None) -> Path:
    roll = _np(roll)
    fig = _figure(max(4, min(16, roll.shape[0] / 8)), 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(roll.T, origin="lower", aspect="auto", cmap="Greys", vmin=0, vmax=1, interpolation="nearest",
              extent=(-0.5, roll.shape[0] - 0.5, lowest_pitch - 0.5, lowest_pitch + roll.shape[1] - 0.5))
    ax.set_xlabel("step")
    ax.set_ylabel("MIDI pitch")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


# --------------------------------------------------------------------------- generic


def plot_spectrogram(path, power, sample_rate: int = 16000, hop: int = 256, title: str | None = None) -> Path:
    """A (T, F) power spectrogram as an image of 10 log10(power) in dB (time across)."""
    p = _np(power)
    db = 10.0 * np.log10(np.maximum(p, 1e-10))
    fig = _figure(max(4, min(16, p.shape[0] / 16)), 4)
    ax = fig.add_subplot(1, 1, 1)
    top = db.max() if db.size else 0.0
    ax.imshow(db.T, origin="lower", aspect="auto", cmap="magma", vmin=top - 80.0, vmax=top,
              interpolation="nearest", extent=(0.0, p.shape[0] * hop / sample_rate, 0.0, sample_rate / 2000.0))
    ax.set_xlabel("seconds")
    ax.set_ylabel("kHz")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


def plot_sequence(path, seq, title: str | None = None, max_dims: int = 8) -> Path:
    """Line plot of the first ``max_dims`` dimensions of a (T, D) sequence."""
    seq = _np(seq)
    seq = seq.reshape(len(seq), -1)
    fig = _figure(10, 3)
    ax = fig.add_subplot(1, 1, 1)
    for d in range(min(seq.shape[1], max_dims)):
        ax.plot(seq[:, d], linewidth=0.8, label=f"dim {d}")
    if seq.shape[1] <= max_dims:
        ax.legend(fontsize=6, loc="upper right")
    ax.set_xlabel("step")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return _save_png(fig, path)


def write_npy(path, array) -> Path:
    path = Path(path)
    with atomic_write(path, ".npy") as tmp:
        with open(tmp, "wb") as f:
            np.save(f, _np(array))
    return path


def write_npz(path, arrays: dict) -> Path:
    """Write a dict of arrays (numpy or torch) as one compressed .npz file."""
    path = Path(path)
    with atomic_write(path, ".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **{str(k): (v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v))
                                      for k, v in arrays.items()})
    return path


def write_samples(out_dir, samples, kind: str, meta: dict | None = None, prefix: str = "sample") -> list[Path]:
    """Write generated sequences (original scale) for a person to check; return the paths.

    speech: WAV + waveform PNG each; spectrogram: a log-power PNG each; handwriting: one PNG grid of all + one PNG each;
    pianoroll: MIDI + PNG each (thresholded at 0.5); array: a line-plot PNG each.
    Always a .npy of each sample too.
    """
    meta = meta or {}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = [_np(s) for s in samples]
    paths: list[Path] = []
    for i, s in enumerate(samples):
        base = out / f"{prefix}_{i:03d}"
        paths.append(write_npy(base.with_suffix(".npy"), s))
        if kind == "speech":
            rate = int(meta.get("sample_rate", 16000))
            paths.append(write_wav(base.with_suffix(".wav"), s, rate))
            paths.append(plot_waveform(Path(f"{base}_wave.png"), s.reshape(-1), rate, title=base.name))
        elif kind == "spectrogram":
            paths.append(plot_spectrogram(base.with_suffix(".png"), s, int(meta.get("sample_rate", 16000)),
                                          int(meta.get("hop", 256)), title=base.name))
        elif kind == "handwriting":
            paths.append(plot_handwriting(base.with_suffix(".png"), [s], titles=[base.name], pen=meta.get("pen")))
        elif kind == "pianoroll":
            low = int(meta.get("lowest_pitch", 36))
            step = float(meta.get("step_quarter", 1.0))
            paths.append(write_midi(base.with_suffix(".mid"), s, low, step))
            paths.append(plot_pianoroll(base.with_suffix(".png"), (s >= 0.5).astype(np.float32), low, title=base.name))
        else:
            paths.append(plot_sequence(base.with_suffix(".png"), s, title=base.name))
    if kind == "handwriting" and samples:
        paths.append(plot_handwriting(out / f"{prefix}_grid.png", samples,
                                      titles=[f"{prefix}_{i:03d}" for i in range(len(samples))], pen=meta.get("pen")))
    return paths


# --------------------------------------------------------------------------- training curves


def _read_metrics(source) -> dict[str, list]:
    if isinstance(source, dict):
        return {k: list(v) for k, v in source.items()}
    cols: dict[str, list] = {}
    with open(source, newline="") as f:
        reader = csv.DictReader(f)
        for name in reader.fieldnames or []:
            cols[name] = []
        for row in reader:
            for name in cols:
                cols[name].append(row.get(name))
    return cols


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def plot_curves(path, source, title: str | None = None) -> Path:
    """Plot every ``train/*`` and ``valid/*`` column of a CSVLogger metrics.csv (or a dict of lists).

    x is the ``step`` column when there is one (else the row number); rows where a metric
    is empty/NaN are skipped. Metrics sharing a name after the prefix share one panel.
    """
    cols = _read_metrics(source)
    metrics = [c for c in cols if c.startswith(("train/", "valid/"))]
    groups: dict[str, list[str]] = {}
    for c in metrics:
        groups.setdefault(c.split("/", 1)[1], []).append(c)
    n_rows = max(len(next(iter(cols.values()), [])), 0) if cols else 0
    x_all = np.array([_float(v) for v in cols["step"]]) if "step" in cols else np.arange(n_rows, dtype=float)
    n = max(len(groups), 1)
    fig = _figure(6, 2.8 * n)
    if not groups:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no train/ or valid/ metrics", ha="center", va="center")
    for k, (base, names) in enumerate(sorted(groups.items())):
        ax = fig.add_subplot(n, 1, k + 1)
        for name in names:
            y = np.array([_float(v) for v in cols[name]])
            x = x_all[: len(y)] if len(x_all) >= len(y) else np.arange(len(y), dtype=float)
            ok = np.isfinite(y) & np.isfinite(x)
            if ok.any():
                style = "-" if name.startswith("train/") else "o-"
                ax.plot(x[ok], y[ok], style, label=name, linewidth=1, markersize=3)
        ax.set_ylabel(base)
        ax.set_xlabel("step" if "step" in cols else "row")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save_png(fig, path)
