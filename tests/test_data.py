"""Data readers, path recognition, fetch errors, splits, normalisation, padding, TBPTT."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch


from vrnn.data import (DATASETS, Normalizer, SequenceSet, cache_dir, describe, fetch, load,  # noqa: E402
                       pad_batch, recognise, split)
from vrnn.data import audio as audio_mod  # noqa: E402
fetch_mod = importlib.import_module("vrnn.data.fetch")  # the module (vrnn.data.fetch is the function)
from vrnn.data.pianoroll import active_pitches, to_pianoroll  # noqa: E402
from vrnn.errors import ConfigError, DataError  # noqa: E402


# --------------------------------------------------------------------------- fixtures


def tone(seconds: float, rate: int, channels: int = 1, freq: float = 220.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    x = 0.3 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


def write_audio(path: Path, seconds: float, rate: int, channels: int = 1, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), tone(seconds, rate, channels), rate, **kw)
    return path


IAM_XML = """<?xml version="1.0" encoding="ISO-8859-1"?>
<WhiteboardCaptureSession>
  <StrokeSet>
    <Stroke colour="black" start_time="0.0" end_time="0.3">
      <Point x="100" y="200" time="0.00"/>
      <Point x="110" y="190" time="0.01"/>
      <Point x="125" y="195" time="0.02"/>
    </Stroke>
    <Stroke colour="black" start_time="0.5" end_time="0.6">
      <Point x="140" y="200" time="0.50"/>
      <Point x="150" y="210" time="0.51"/>
    </Stroke>
  </StrokeSet>
</WhiteboardCaptureSession>
"""


def write_iam(path: Path, text: str = IAM_XML) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="iso-8859-1")
    return path


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VRNN_CACHE", str(tmp_path / "cache"))


def expect_error(spec, fragment, **opts) -> str:
    with pytest.raises(DataError) as info:
        load(spec, **opts)
    msg = str(info.value)
    assert str(fragment) in msg, msg
    assert "\n" not in msg
    return msg


# --------------------------------------------------------------------------- SequenceSet


def test_sequenceset_summary_and_subset():
    seqs = [np.zeros((5, 3)), np.ones((7, 3)), np.ones((2, 3))]
    s = SequenceSet(seqs, "array", "x", {"names": ["a", "b", "c"]})
    assert s.dim == 3 and len(s) == 3 and s.sequences[0].dtype == np.float32
    summ = s.summary()
    assert summ["sequences"] == 3 and summ["min_length"] == 2 and summ["max_length"] == 7
    assert summ["median_length"] == 5 and summ["total_steps"] == 14 and summ["source"] == "x"
    json.dumps(summ)
    sub = s.subset([2, 0])
    assert sub.meta["names"] == ["c", "a"] and sub.lengths == [2, 5]


# --------------------------------------------------------------------------- audio


@pytest.mark.parametrize("suffix, rate, channels", [(".wav", 16000, 1), (".flac", 8000, 2), (".ogg", 22050, 1),
                                                     (".mp3", 44100, 1)])
def test_audio_formats_resampled_and_framed(tmp_path, suffix, rate, channels):
    f = write_audio(tmp_path / f"a{suffix}", 1.3, rate, channels)
    d = load(str(f))  # a path: whole utterances by default
    assert d.kind == "speech" and d.dim == 200 and len(d) == 1
    assert d.meta["sample_rate"] == 16000 and d.meta["frame_size"] == 200
    n = int(1.3 * 16000) // 200
    assert abs(d.lengths[0] - n) <= (10 if suffix == ".mp3" else 1)  # mp3: encoder padding
    assert np.abs(d.sequences[0]).max() <= 1.0 + 1e-3
    assert 0.15 < np.abs(d.sequences[0]).max()


def test_audio_chunks_and_short_clips(tmp_path):
    files = [write_audio(tmp_path / "long.wav", 1.6, 16000), write_audio(tmp_path / "tiny.wav", 0.01, 16000)]
    d = audio_mod.load_audio(files, chunk_seconds=0.5)
    assert d.lengths == [40, 40, 40]  # 1.6 s -> 3 chunks, remainder and the tiny clip dropped
    assert d.meta["chunk_seconds"] == 0.5 and d.summary()["duration_seconds"] == 1.5
    whole = audio_mod.load_audio(files, chunk_seconds=None, frame_size=100, sample_rate=8000)
    assert whole.lengths == [128] and whole.dim == 100  # the tiny clip (0 frames) dropped
    with pytest.raises(DataError, match="tiny.wav|no audio clip"):
        audio_mod.load_audio([files[1]], chunk_seconds=None)
    # load() on a path takes the options; chunk_seconds=0 means whole utterances
    assert load(str(tmp_path / "long.wav"), chunk_seconds=0.5).lengths == [40, 40, 40]
    assert load(str(tmp_path / "long.wav"), chunk_seconds=0, sample_rate=None).lengths == [128]


def test_audio_min_rms_drops_silence(tmp_path):
    write_audio(tmp_path / "a.wav", 0.5, 16000)
    sf.write(str(tmp_path / "quiet.wav"), np.zeros(8000, dtype=np.float32), 16000)
    d = load(str(tmp_path), min_rms=0.01)
    assert len(d) == 1 and d.meta["dropped_quiet"] == 1


def test_audio_unreadable_file(tmp_path):
    bad = tmp_path / "broken.wav"
    bad.write_bytes(b"RIFF....not really a wave file" * 3)
    msg = expect_error(str(bad), "not an audio file soundfile can read")
    assert msg.startswith(str(bad))


def test_nist_sphere_wav_is_read(tmp_path):
    # TIMIT stores NIST SPHERE under an upper-case .WAV name
    f = tmp_path / "TIMIT" / "TRAIN" / "DR1" / "SA1.WAV"
    write_audio(f, 0.5, 16000, format="NIST", subtype="PCM_16")
    d = load(str(tmp_path / "TIMIT"))
    assert d.kind == "speech" and d.lengths == [40]


# --------------------------------------------------------------------------- IAM


STEPS = np.array([[0, 10, 10], [1, 15, -5], [0, 15, -5], [1, 10, -10]], dtype=np.float32)  # of IAM_XML


def test_iam_strokes(tmp_path):
    d = load(str(write_iam(tmp_path / "a01-000u-01.xml")), dequantize=False)
    assert d.kind == "handwriting" and d.meta["pen"] is True and d.dim == 3
    assert d.meta["dequantized"] is False
    # 5 points -> 4 steps: the first point has no previous one and is dropped; each step is
    # the offset to its point, pen = 1 where that point ends a stroke; y flipped: up is positive
    np.testing.assert_array_equal(d.sequences[0], STEPS)


def test_iam_dequantized_deterministically(tmp_path):
    f = write_iam(tmp_path / "a01-000u-01.xml")
    d = load(str(f))
    x = d.sequences[0]
    assert d.meta["dequantized"] is True and x.shape == STEPS.shape
    np.testing.assert_array_equal(x[:, 0], STEPS[:, 0])  # pen bits untouched
    noise = x[:, 1:] - STEPS[:, 1:]
    assert (np.abs(noise) <= 0.5).all() and (noise != 0).all()
    np.testing.assert_array_equal(load(str(f)).sequences[0], x)  # the same every load
    # seeded by the file's name, so the same wherever the file lies
    copy = write_iam(tmp_path / "elsewhere" / "a01-000u-01.xml")
    np.testing.assert_array_equal(load(str(copy.parent)).sequences[0], x)
    other = load(str(write_iam(tmp_path / "b" / "b01-000u-01.xml"))).sequences[0]
    assert (other[:, 1:] != x[:, 1:]).any()  # another file, other noise


def test_iam_dequantization_ignores_python_hash_seed(tmp_path):
    f = write_iam(tmp_path / "a01-000u-01.xml")
    seed = "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"
    code = f"from vrnn.data import load; print(load({str(f)!r}).sequences[0][:, 1:].tolist())"
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": seed},
                         capture_output=True, text=True, check=True).stdout
    np.testing.assert_array_equal(np.asarray(json.loads(out), dtype=np.float32), load(str(f)).sequences[0][:, 1:])


def test_iam_non_integer_coordinates_are_not_dequantized(tmp_path):
    f = write_iam(tmp_path / "c.xml", IAM_XML.replace('x="110"', 'x="110.25"'))
    d = load(str(f))
    assert d.meta["dequantized"] is False
    np.testing.assert_array_equal(d.sequences[0][:, 1], [10.25, 14.75, 15, 10])
    np.testing.assert_array_equal(d.sequences[0][:, 2], STEPS[:, 2])


def test_iam_bad_files(tmp_path):
    bad = write_iam(tmp_path / "bad.xml", IAM_XML[:300])
    expect_error(str(bad), f"{bad}: malformed XML")
    nopoint = write_iam(tmp_path / "x" / "odd.xml", "<StrokeSet><Stroke><Point x='1'/><Point x='2' y='3'/></Stroke></StrokeSet>")
    expect_error(str(nopoint), str(nopoint))
    notstrokes = tmp_path / "y" / "other.xml"
    notstrokes.parent.mkdir()
    notstrokes.write_text("<root><a/></root>")
    expect_error(str(notstrokes), "not a recognised data file")
    two = write_iam(tmp_path / "z" / "two.xml", "<StrokeSet><Stroke><Point x='1' y='2'/><Point x='2' y='3'/></Stroke></StrokeSet>")
    expect_error(str(two), f"{two}: only 2 point(s); need at least 3")


# --------------------------------------------------------------------------- arrays


def test_arrays_npy_npz_csv(tmp_path):
    np.save(tmp_path / "a.npy", np.arange(12, dtype=np.int64).reshape(4, 3))
    (tmp_path / "sub").mkdir()
    np.savez(tmp_path / "sub" / "b.npz", first=np.ones((3, 3)), second=np.zeros((5, 3)))
    (tmp_path / "c.csv").write_text("x,y,z\n1,2,3\n4,5,6.5\n")
    (tmp_path / "README.txt").write_text("ignored")
    d = load(str(tmp_path))
    assert d.kind == "array" and d.dim == 3 and sorted(d.lengths) == [2, 3, 4, 5] and len(d) == 4
    c = load(str(tmp_path / "c.csv"))
    np.testing.assert_allclose(c.sequences[0], [[1, 2, 3], [4, 5, 6.5]])
    one = tmp_path / "one"
    one.mkdir()
    np.save(one / "v.npy", np.arange(5.0))
    (one / "w.csv").write_text("1\n2\n3\n")  # no header
    d1 = load(str(one))
    assert d1.dim == 1 and sorted(d1.lengths) == [3, 5]


@pytest.mark.parametrize("case", ["nan", "inf", "short", "csv_text", "three_d", "npz_nan"])
def test_arrays_bad(tmp_path, case):
    if case == "nan":
        f = tmp_path / "n.npy"
        np.save(f, np.array([[1.0], [np.nan]]))
        expect_error(str(f), f"{f}: contains NaN or Inf")
    elif case == "inf":
        f = tmp_path / "i.csv"
        f.write_text("1,2\ninf,3\n")
        expect_error(str(f), f"{f}: contains NaN or Inf")
    elif case == "short":
        f = tmp_path / "s.npy"
        np.save(f, np.ones((1, 4)))
        expect_error(str(f), f"{f}: sequence has 1 step")
    elif case == "csv_text":
        f = tmp_path / "t.csv"
        f.write_text("a,b\n1,2\n\n3,x\n")
        expect_error(str(f), f"{f}: non-numeric value 'x' on line 4, column 2")  # lines of the file
    elif case == "three_d":
        f = tmp_path / "d.npy"
        np.save(f, np.ones((4, 2, 2)))
        expect_error(str(f), f"{f}: array has 3 dimensions")
    elif case == "npz_nan":
        f = tmp_path / "z.npz"
        np.savez(f, ok=np.ones((3, 2)), bad=np.full((3, 2), np.nan))
        expect_error(str(f), str(f))


def test_csv_typo_in_first_row_is_not_a_header(tmp_path):
    f = tmp_path / "typo.csv"
    f.write_text("1,2x,3\n4,5,6\n7,8,9\n")
    expect_error(str(f), f"{f}: non-numeric value '2x' on line 1, column 2")
    f.write_text("time,x\n1,2\n3,4\n")  # no cell is a number: a header
    np.testing.assert_array_equal(load(str(f)).sequences[0], [[1, 2], [3, 4]])


def test_arrays_bad_inside_folder_names_the_file(tmp_path):
    np.save(tmp_path / "good.npy", np.ones((4, 2)))
    (tmp_path / "deep").mkdir()
    np.save(tmp_path / "deep" / "bad.npy", np.array([[np.inf, 1.0], [1.0, 1.0]]))
    expect_error(str(tmp_path), str(tmp_path / "deep" / "bad.npy"))


def test_arrays_different_dims(tmp_path):
    np.save(tmp_path / "a.npy", np.ones((4, 3)))
    np.save(tmp_path / "b.npy", np.ones((4, 4)))
    msg = expect_error(str(tmp_path), f"{tmp_path}: arrays have different dimensions")
    assert "3 in a.npy" in msg and "4 in b.npy" in msg


# --------------------------------------------------------------------------- recognition


def test_recognition_of_each_kind_recursively(tmp_path):
    write_audio(tmp_path / "speech" / "spk1" / "x.flac", 0.3, 16000)
    write_audio(tmp_path / "speech" / "spk2" / "deeper" / "y.wav", 0.4, 16000)
    write_iam(tmp_path / "hw" / "a01" / "a01-000" / "a01-000u-01.xml")
    write_iam(tmp_path / "hw" / "b02" / "b02-001.xml")
    (tmp_path / "arr" / "p").mkdir(parents=True)
    np.save(tmp_path / "arr" / "p" / "a.npy", np.ones((3, 2)))
    assert (load(str(tmp_path / "speech")).kind, len(load(str(tmp_path / "speech")))) == ("speech", 2)
    hw = load(str(tmp_path / "hw"))
    assert hw.kind == "handwriting" and len(hw) == 2 and hw.meta["pen"] is True
    assert load(str(tmp_path / "arr")).kind == "array"
    info = describe(str(tmp_path / "speech"))
    assert info["kind"] == "speech" and info["sequences"] == 2 and info["files"] == 2
    assert info["duration_seconds"] == pytest.approx(0.7, abs=0.03)
    json.dumps(info)


def test_recognition_errors(tmp_path):
    missing = tmp_path / "nope"
    expect_error(str(missing), f"{missing}: no such file or directory")
    empty = tmp_path / "empty"
    empty.mkdir()
    expect_error(str(empty), f"{empty}: no recognisable data")
    (empty / "notes.txt").write_text("hello")
    expect_error(str(empty), f"{empty}: no recognisable data")
    mixed = tmp_path / "mixed"
    write_audio(mixed / "a.wav", 0.3, 16000)
    np.save(mixed / "b.npy", np.ones((3, 2)))
    msg = expect_error(str(mixed), f"{mixed}: holds more than one kind")
    assert "speech" in msg and "array" in msg
    with pytest.raises(ConfigError):
        load(str(mixed / "b.npy"), no_such_option=1)


def _four_arrays(root: Path) -> Path:
    (root / "sub").mkdir(parents=True)
    for f in ("a.npy", "b.npy", "sub/c.npy", "sub/d.npy"):
        np.save(root / f, np.ones((3, 2)))
    return root


def test_symlink_loop_is_walked_once(tmp_path):
    root = _four_arrays(tmp_path / "data")
    (root / "sub" / "back").symlink_to("..")
    kind, files = recognise(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["a.npy", "b.npy", "sub/c.npy", "sub/d.npy"]
    assert len(load(str(root))) == 4


def test_symlinks_followed_but_each_folder_and_file_read_once(tmp_path):
    root = _four_arrays(tmp_path / "data")
    (root / "sub_again").symlink_to(root / "sub")  # a second way into sub
    (root / "e.npy").symlink_to(root / "a.npy")  # a second name for a.npy
    outside = tmp_path / "outside"
    outside.mkdir()
    np.save(outside / "f.npy", np.ones((4, 2)))
    (root / "zz").symlink_to(outside)  # links to folders are followed
    kind, files = recognise(root)
    assert [f.relative_to(root).as_posix() for f in files] == ["a.npy", "b.npy", "sub/c.npy", "sub/d.npy", "zz/f.npy"]
    assert load(str(root)).lengths == [3, 3, 3, 3, 4]


def _sequences_in_three_folders(root: Path) -> Path:
    for folder in ("a", "b", "c"):
        for i in range(4):
            (root / folder).mkdir(parents=True, exist_ok=True)
            np.save(root / folder / f"{i}.npy", np.ones((3, 2)))
    return root


def _deny_listing(monkeypatch, folder: Path) -> None:
    """Make os.scandir of ``folder`` fail as for a folder without read permission."""
    real = os.scandir

    def scandir(path="."):
        if os.path.realpath(os.fspath(path)) == str(folder):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.mark.parametrize("denied", ["b", "."])
def test_unreadable_folder_is_an_error(tmp_path, monkeypatch, denied):
    root = _sequences_in_three_folders(tmp_path / "data")
    assert len(load(str(root))) == 12
    folder = (root / denied).resolve()
    _deny_listing(monkeypatch, folder)
    expect_error(str(root), f"{root / denied if denied != '.' else root}: cannot read this folder (Permission denied)")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads folders whatever their mode")
def test_unreadable_folder_by_mode(tmp_path):
    root = _sequences_in_three_folders(tmp_path / "data")
    (root / "b").chmod(0)
    try:
        expect_error(str(root), f"{root / 'b'}: cannot read this folder (Permission denied)")
    finally:
        (root / "b").chmod(0o755)


def test_unreadable_xml_in_a_folder_is_an_error(tmp_path, monkeypatch):
    good, bad = write_iam(tmp_path / "a.xml"), write_iam(tmp_path / "b.xml")
    real = open

    def fake_open(file, *args, **kwargs):
        if os.fspath(file) == str(bad):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(file))
        return real(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", fake_open)
    expect_error(str(tmp_path), f"{bad}: cannot read (Permission denied)")
    assert good.exists()


def test_registered_names():
    assert {"lasa", "chorales", "folk", "asterisk-en", "fillets-cs", "iam"} <= set(DATASETS)
    expect_error("asterisk-en", "asterisk-en: not fetched yet; run `vrnn data fetch asterisk-en`")
    expect_error("fillets-cs", "fillets-cs: not fetched yet")
    expect_error("iam", "iam:")


def test_fetched_corpus_layout(tmp_path):
    # a stand-in for a fetched asterisk-en: silence/ is skipped, 0.5 s chunks by default
    root = cache_dir() / "asterisk-en"
    write_audio(root / "digits" / "1.wav", 1.0, 8000)
    write_audio(root / "silence" / "1.wav", 1.0, 8000)
    (root / "COPYRIGHT").write_text("cc-by-sa")
    d = load("asterisk-en")
    assert d.lengths == [40, 40] and d.meta["sample_rate"] == 16000
    assert fetch("asterisk-en", progress=None) == root  # already fetched
    assert load("asterisk-en", chunk_seconds=0).lengths == [80]


# --------------------------------------------------------------------------- LASA


def test_lasa():
    d = load("lasa")
    assert d.kind == "handwriting" and len(d) == 210 and d.dim == 2 and d.meta["pen"] is False
    assert set(d.lengths) == {249}
    assert len(d.meta["names"]) == 210 and d.meta["names"][0] == "Angle" and len(set(d.meta["names"])) == 30
    d2 = load("lasa", subsample=10)
    assert set(d2.lengths) == {99}
    d3 = load("lasa", subsample=10, dequantize=True)  # an IAM option: LASA's float offsets ignore it
    assert all(np.array_equal(a, b) for a, b in zip(d3.sequences, d2.sequences))
    json.dumps(d.meta)


# --------------------------------------------------------------------------- piano-rolls


def test_to_pianoroll_on_a_small_stream():
    from music21 import chord, note, stream

    s = stream.Score()
    top, bottom = stream.Part(), stream.Part()
    top.append([note.Note("C5", quarterLength=2), note.Note("D5", quarterLength=0.5),
                note.Note("E5", quarterLength=0.5), note.Rest(quarterLength=1)])
    bottom.append([chord.Chord(["C3", "G3"], quarterLength=3), note.Note("C3", quarterLength=1)])
    s.insert(0, top)
    s.insert(0, bottom)
    frames = active_pitches(s)
    assert frames == [{72, 48, 55}, {72, 48, 55}, {74, 48, 55}, {48}]  # E5 starts between frames
    roll, low = to_pianoroll(s)
    assert low == 48 and roll.shape == (4, 74 - 48 + 1)
    assert roll[0, 72 - 48] == 1 and roll[3].sum() == 1
    roll2, low2 = to_pianoroll(s, lowest_pitch=36, highest_pitch=81)
    assert low2 == 36 and roll2.shape == (4, 46)


def test_chorale_parsing_on_two_files():
    from vrnn.data.pianoroll import chorale_paths, parse_chorales

    paths = chorale_paths()
    assert len(paths) >= 400
    rolls, names, low = parse_chorales([p for p in paths if p.name in ("bwv1.6.mxl", "bwv10.7.mxl", "bwv101.7.mxl")])
    assert "bwv1.6" not in names  # five parts
    assert len(rolls) == len(names) >= 1
    for r in rolls:
        assert r.ndim == 2 and 24 <= len(r) <= 200 and set(np.unique(r)) <= {0.0, 1.0}
        assert 1 <= r.sum(1).max() <= 4
    assert 36 <= low <= 60


TUNE = """X: 1
T:Test -- Reel
M:2/4
L:1/8
K:G
G2 AB | c/2d/2 e z B |
"""


def test_folk_parsing_on_handmade_abc(tmp_path):
    from vrnn.data.pianoroll import FOLK_STEP, parse_folk

    (tmp_path / "a.abc").write_text(TUNE)
    (tmp_path / "b.abc").write_text("X: 1\nT:Empty\nK:C\n")  # no notes: skipped
    rolls, names, low, skipped = parse_folk(sorted(tmp_path.glob("*.abc")))
    assert FOLK_STEP == 0.5 and names == ["a"] and skipped == ["b.abc"]
    # eighth-note frames: G G A B | c (d starts between frames) e rest B; G4 = 67 .. E5 = 76
    assert low == 67 and rolls[0].shape == (8, 76 - 67 + 1)
    on = [[low + int(j) for j in np.flatnonzero(r)] for r in rolls[0]]
    assert on == [[67], [67], [69], [71], [72], [76], [], [71]]


@pytest.mark.slow
def test_folk_full_corpus():
    d = load("folk")
    assert d.kind == "pianoroll" and len(d) > 1000 and d.meta["step_quarter"] == 0.5
    multi = sum(int((r.sum(1) > 1).sum()) for r in d.sequences)
    assert 0 < multi < 0.01 * sum(d.lengths)  # melodies, with a few double stops and chords
    assert load("folk").lengths == d.lengths  # from the cache


@pytest.mark.slow
def test_chorales_full_corpus():
    d = load("chorales")
    assert d.kind == "pianoroll" and len(d) > 300 and d.dim == 46 and d.meta["lowest_pitch"] == 36
    assert 24 <= min(d.lengths) and max(d.lengths) <= 200
    assert load("chorales").lengths == d.lengths  # from the cache


# --------------------------------------------------------------------------- fetch


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("VRNN_CACHE", str(tmp_path / "c1"))
    assert cache_dir() == tmp_path / "c1"
    monkeypatch.delenv("VRNN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vrnn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vrnn"


def test_fetch_without_apt(monkeypatch):
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda name: None)
    with pytest.raises(DataError) as info:
        fetch("asterisk-en", progress=None)
    msg = str(info.value)
    assert msg.startswith("asterisk-en: apt-get is not available") and "asterisk-core-sounds-en-wav" in msg
    assert not (cache_dir() / "asterisk-en").exists()


def test_fetch_download_failure(monkeypatch, tmp_path):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("apt-get", "dpkg"):
        p = bindir / tool
        p.write_text("#!/bin/sh\necho 'E: Unable to locate package' >&2\nexit 100\n")
        p.chmod(0o755)
    monkeypatch.setenv("PATH", str(bindir))
    with pytest.raises(DataError) as info:
        fetch("fillets-cs", progress=None)
    assert str(info.value).startswith("fillets-cs: `apt-get download fillets-ng-data-cs` failed (E: Unable")
    assert not (cache_dir() / "fillets-cs").exists()
    assert [p for p in cache_dir().iterdir()] == []  # the temp folder is gone
    with pytest.raises(DataError, match="not a fetchable"):
        fetch("lasa")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("apt-get") is None, reason="needs apt-get")
def test_real_fetch_asterisk():
    path = fetch("asterisk-en", progress=None)
    d = load("asterisk-en")
    assert path.is_dir() and len(d) > 2000 and d.summary()["duration_seconds"] > 1200


# --------------------------------------------------------------------------- batching


def test_split():
    s = split(100, seed=3)
    assert s == split(100, seed=3) and s != split(100, seed=4)
    assert [len(s[k]) for k in ("train", "valid", "test")] == [80, 10, 10]
    assert sorted(s["train"] + s["valid"] + s["test"]) == list(range(100))
    for n in (3, 4, 7, 11):
        t = split(n)
        assert all(len(t[k]) >= 1 for k in t) and sorted(sum(t.values(), [])) == list(range(n))
    assert sum(len(v) for v in split(210, (0.5, 0.25, 0.25)).values()) == 210
    with pytest.raises(DataError):
        split(2)


def test_normalizer_roundtrip():
    rng = np.random.default_rng(0)
    seqs = [np.concatenate([rng.integers(0, 2, (n, 1)), rng.normal(5, 3, (n, 2)), np.full((n, 1), 7.0)], 1)
            .astype(np.float32) for n in (10, 20, 30)]
    norm = Normalizer.for_kind("handwriting", {"pen": True}, seqs)
    assert norm.skip == [0]
    y = norm.apply(seqs[1])
    np.testing.assert_array_equal(y[:, 0], seqs[1][:, 0])  # pen column untouched
    np.testing.assert_array_equal(y[:, 3], 0.0)  # constant column: std -> 1
    allz = norm.apply(np.concatenate(seqs))
    np.testing.assert_allclose(allz[:, 1:3].mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(allz[:, 1:3].std(0), 1, atol=1e-4)
    np.testing.assert_allclose(norm.invert(y), seqs[1], atol=1e-5)
    t = torch.as_tensor(np.stack([seqs[0], seqs[0]]))  # (B, T, D)
    np.testing.assert_allclose(norm.invert(norm.apply(t)).numpy(), t.numpy(), atol=1e-5)
    assert isinstance(norm.apply(t), torch.Tensor)
    state = norm.state_dict()
    json.dumps(state)
    again = Normalizer.from_state(json.loads(json.dumps(state)))
    np.testing.assert_allclose(again.apply(seqs[2]), norm.apply(seqs[2]))
    roll = [np.eye(4, dtype=np.float32)]
    ident = Normalizer.for_kind("pianoroll", {}, roll)
    np.testing.assert_array_equal(ident.apply(roll[0]), roll[0])
    assert Normalizer.for_kind("speech", {}, seqs).skip == []


def test_normalizer_state_loads_with_weights_only(tmp_path):
    norm = Normalizer.fit([np.arange(10, dtype=np.float32).reshape(5, 2)])
    torch.save({"normalizer": norm.state_dict()}, tmp_path / "n.pt")
    back = torch.load(tmp_path / "n.pt", weights_only=True)
    assert Normalizer.from_state(back["normalizer"]).state_dict() == norm.state_dict()


def test_pad_batch():
    seqs = [np.full((n, 2), i + 1, dtype=np.float32) for i, n in enumerate((5, 12, 3))]
    x, mask = pad_batch(seqs)
    assert x.shape == (3, 12, 2) and mask.shape == (3, 12) and x.dtype == torch.float32
    assert mask.sum(1).tolist() == [5, 12, 3]
    assert (x[0, 5:] == 0).all() and (x[0, :5] == 1).all()


def test_env_untouched():
    assert "VRNN_CACHE" in os.environ
