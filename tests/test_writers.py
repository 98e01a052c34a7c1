"""Writers produce files a person (and a program) can open."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch


from vrnn import writers  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def is_png(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.startswith(".")]


def test_write_wav(tmp_path):
    frames = np.linspace(-1.5, 1.5, 40 * 200).reshape(40, 200)
    p = writers.write_wav(tmp_path / "out" / "a.wav", frames, 16000)
    data, rate = sf.read(str(p))
    info = sf.info(str(p))
    assert rate == 16000 and len(data) == 8000 and info.subtype == "PCM_16"
    assert data.max() <= 1.0 and data.min() >= -1.0
    assert no_temp_files(tmp_path / "out")


def test_write_npz(tmp_path):
    p = writers.write_npz(tmp_path / "lat.npz", {"z": torch.ones(2, 3, 4), "lengths": np.array([3, 2])})
    with np.load(p) as z:
        assert z["z"].shape == (2, 3, 4) and z["lengths"].tolist() == [3, 2]
    assert no_temp_files(tmp_path)


def test_plot_waveform_and_sequence(tmp_path):
    w = np.sin(np.linspace(0, 100, 4000))
    assert is_png(writers.plot_waveform(tmp_path / "w.png", w, 8000, title="tone"))
    assert is_png(writers.plot_sequence(tmp_path / "s.png", np.random.default_rng(0).normal(size=(50, 3))))


def test_strokes_respect_pen_ups():
    seq = np.array([[0, 1, 0], [0, 1, 0], [1, 1, 0], [0, 0, 5], [1, 1, 0]], dtype=np.float32)
    strokes = writers._strokes(seq, pen=True)
    assert [len(s) for s in strokes] == [3, 2]
    np.testing.assert_array_equal(strokes[1][0], [3, 5])
    assert [len(s) for s in writers._strokes(seq[:, 1:], pen=False)] == [5]


def test_plot_handwriting(tmp_path):
    rng = np.random.default_rng(0)
    seqs = [rng.normal(size=(30, 2)), np.concatenate([(rng.random((40, 1)) > 0.9), rng.normal(size=(40, 2))], 1)]
    p = writers.plot_handwriting(tmp_path / "hw.png", seqs, titles=["a", "b"])
    assert is_png(p)
    assert is_png(writers.plot_handwriting(tmp_path / "one.png", [torch.randn(10, 3)]))


def test_write_midi_roundtrip(tmp_path):
    from music21 import converter

    roll = np.zeros((6, 46), dtype=np.float32)
    roll[0:2, 60 - 36] = 1  # C4, two quarters
    roll[2, 64 - 36] = 0.9  # E4 (above threshold)
    roll[2, 67 - 36] = 1  # G4 with E4: a chord
    roll[4:6, 48 - 36] = 1  # C3
    roll[5, 50 - 36] = 0.2  # below threshold: dropped
    p = writers.write_midi(tmp_path / "m.mid", roll, lowest_pitch=36)
    s = converter.parse(str(p))
    notes = sorted((float(n.offset), int(p_.midi), float(n.quarterLength))
                   for n in s.flatten().notes for p_ in n.pitches)
    assert notes == [(0.0, 60, 2.0), (2.0, 64, 1.0), (2.0, 67, 1.0), (4.0, 48, 2.0)]
    assert is_png(writers.plot_pianoroll(tmp_path / "m.png", roll, 36))
    empty = writers.write_midi(tmp_path / "e.mid", np.zeros((4, 10)), 36)
    assert empty.stat().st_size > 0
    converter.parse(str(empty))


@pytest.mark.parametrize("kind", ["speech", "handwriting", "pianoroll", "array"])
def test_write_samples(tmp_path, kind):
    rng = np.random.default_rng(1)
    if kind == "speech":
        samples, meta = [rng.uniform(-0.5, 0.5, (20, 200)) for _ in range(2)], {"sample_rate": 8000, "frame_size": 200}
    elif kind == "handwriting":
        samples, meta = [rng.normal(size=(25, 3)) for _ in range(3)], {"pen": True}
    elif kind == "pianoroll":
        samples, meta = [rng.random((16, 46)) for _ in range(2)], {"lowest_pitch": 36}
    else:
        samples, meta = [rng.normal(size=(12, 2)) for _ in range(2)], {}
    paths = writers.write_samples(tmp_path / kind, samples, kind, meta, prefix="s")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    suffixes = sorted(p.suffix for p in paths)
    n = len(samples)
    assert suffixes.count(".npy") == n
    np.testing.assert_allclose(np.load(paths[0]), samples[0], rtol=1e-6)
    if kind == "speech":
        assert suffixes.count(".wav") == n and suffixes.count(".png") == n
        wav = [p for p in paths if p.suffix == ".wav"][0]
        assert sf.info(str(wav)).samplerate == 8000 and sf.info(str(wav)).frames == 4000
    elif kind == "handwriting":
        assert suffixes.count(".png") == n + 1 and (tmp_path / kind / "s_grid.png").is_file()
    elif kind == "pianoroll":
        assert suffixes.count(".mid") == n and suffixes.count(".png") == n
    else:
        assert suffixes.count(".png") == n
    assert no_temp_files(tmp_path / kind)


def test_plot_curves_from_lightning_csv(tmp_path):
    csv = tmp_path / "metrics.csv"
    rows = ["epoch,step,train/elbo,valid/elbo,valid/kl,lr"]
    for step in range(0, 50, 5):
        rows.append(f"{step // 25},{step},{-100 + step},,,0.001")
        if step % 25 == 20:
            rows.append(f"{step // 25},{step},,{-90 + step},{3.5},")
    csv.write_text("\n".join(rows) + "\n")
    assert is_png(writers.plot_curves(tmp_path / "curves.png", csv))
    d = {"step": [0, 1, 2], "train/loss": [3.0, 2.0, math.nan], "valid/loss": [math.nan, 2.5, 2.2]}
    assert is_png(writers.plot_curves(tmp_path / "d.png", d, title="dict"))
    assert is_png(writers.plot_curves(tmp_path / "none.png", {"step": [1, 2]}))
