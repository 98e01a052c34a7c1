"""End-to-end tests of the `vrnn` command on tiny fixtures made here (CPU, no network)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vrnn import checkpoint
from vrnn.cli import main
from vrnn.data import Normalizer, load, split

TINY = {"model": {"h_dim": 12, "z_dim": 3, "phi_x_dim": 10, "phi_z_dim": 10, "enc_dim": 10,
                  "prior_dim": 10, "dec_dim": 10}}


def make_arrays(folder: Path, n=12, T=(6, 14), D=3, seed=0, scale=5.0, offset=100.0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = int(rng.integers(*T))
        walk = np.cumsum(rng.normal(size=(t, D)), axis=0)
        np.save(folder / f"seq{i:02d}.npy", (offset + scale * walk).astype(np.float32))
    return folder


def run(*argv) -> int:
    return main(["--threads", "1", *map(str, argv)])


def train(data, out, config, model="vrnn-gauss", epochs=2, *extra):
    return run("train", "--data", data, "--model", model, "--out", out, "--max-epochs", epochs,
               "--batch-size", 4, "--config", config, "--no-progress", *extra)


def test_train_evaluate_sample_latents(arrays, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(arrays, out, tiny_config) == 0
    assert (out / "best.ckpt").exists() and (out / "last.ckpt").exists()
    metrics = (out / "logs" / "csv" / "metrics.csv").read_text()
    assert "valid/elbo" in metrics and "valid/bound" in metrics and "train/bound" in metrics
    assert list((out / "logs" / "tb").glob("events.out.tfevents*"))
    capsys.readouterr()

    assert run("evaluate", out / "best.ckpt", "--data", arrays, "--samples", 5, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    for key in ("elbo", "log_likelihood", "num_samples", "num_sequences", "nats_per_step",
                "bits_per_dim", "split"):
        assert key in res
    assert res["split"] == "test" and res["num_samples"] == 5
    n_test = len(split(12, (0.8, 0.1, 0.1), 0)["test"])
    assert res["num_sequences"] == n_test
    assert np.isfinite(res["elbo"]) and np.isfinite(res["log_likelihood"])

    assert run("sample", out / "best.ckpt", "--num", 3, "--steps", 7, "--out", tmp_path / "s") == 0
    npys = sorted((tmp_path / "s").glob("*.npy"))
    assert len(npys) == 3 and np.load(npys[0]).shape == (7, 3)
    # samples come back in the data's own scale (de-normalised): around the offset of 100
    assert abs(float(np.mean([np.load(p).mean() for p in npys])) - 100.0) < 60.0

    prefix = sorted(arrays.glob("*.npy"))[0]
    assert run("sample", out / "best.ckpt", "--num", 2, "--steps", 5, "--prefix", prefix,
               "--out", tmp_path / "p") == 0
    cont = np.load(sorted((tmp_path / "p").glob("*.npy"))[0])
    assert cont.shape == (len(np.load(prefix)) + 5, 3)
    np.testing.assert_allclose(cont[: len(np.load(prefix))], np.load(prefix), rtol=1e-5, atol=1e-4)

    assert run("latents", out / "best.ckpt", "--data", arrays, "--out", tmp_path / "lat.npz") == 0
    lat = np.load(tmp_path / "lat.npz")
    assert lat["kl"].shape[0] == 12 and lat["posterior_mean"].shape[2] == 3
    lengths = lat["lengths"]
    assert (lat["mask"].sum(1) == lengths).all()
    assert (lat["kl"][lat["mask"] == 0] == 0).all()
    # a memory cap that allows one sequence per pass: the same arrays, in the same order
    assert run("latents", out / "best.ckpt", "--data", arrays, "--out", tmp_path / "lat1.npz",
               "--max-memory", 1e-6) == 0
    lat1 = np.load(tmp_path / "lat1.npz")
    assert lat1.files == lat.files
    for k in lat.files:
        np.testing.assert_allclose(lat1[k], lat[k], rtol=1e-5, atol=1e-5, err_msg=k)


def test_normalisation_from_train_split_kept_in_checkpoint(arrays, tiny_config, tmp_path):
    out = tmp_path / "run"
    assert train(arrays, out, tiny_config, "rnn-gauss", 1) == 0
    _, norm, desc = checkpoint.load(out / "last.ckpt")
    data = load(str(arrays))
    train_idx = split(len(data), desc["fractions"], desc["split_seed"])["train"]
    ref = Normalizer.fit([data.sequences[i] for i in train_idx])
    np.testing.assert_allclose(norm.mean, ref.mean, rtol=1e-6)
    np.testing.assert_allclose(norm.std, ref.std, rtol=1e-6)
    everything = Normalizer.fit(data.sequences)
    assert not np.allclose(norm.mean, everything.mean)  # the test split did not leak in
    x = data.sequences[0]
    np.testing.assert_allclose(norm.invert(norm.apply(x)), x, rtol=1e-5, atol=1e-3)


def test_resume_matches_uninterrupted(arrays, tiny_config, tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train(arrays, full, tiny_config, "vrnn-gauss", 3) == 0
    assert train(arrays, part, tiny_config, "vrnn-gauss", 2) == 0
    assert train(arrays, part, tiny_config, "vrnn-gauss", 3, "--resume") == 0
    a = torch.load(full / "last.ckpt", weights_only=True)
    b = torch.load(part / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] and a["epoch"] == b["epoch"]
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(v, b["state_dict"][k], rtol=1e-5, atol=1e-6, msg=k)


def test_every_data_source_trains_and_samples(tmp_path, tiny_config):
    # audio folder (generated tones), IAM-style XML, and arrays each train and sample
    audio = tmp_path / "audio"
    audio.mkdir()
    rate = 16000
    for i in range(4):
        t = np.arange(int(rate * 1.2)) / rate
        sf.write(audio / f"clip{i}.wav", 0.3 * np.sin(2 * np.pi * (200 + 50 * i) * t), rate)
    iam = tmp_path / "iam"
    iam.mkdir()
    for i in range(4):
        pts = "".join(f'<Point x="{100 + 7 * j + i}" y="{200 + (j % 5) * 3}" time="{j}"/>'
                      for j in range(6))
        (iam / f"line{i}.xml").write_text(
            f"<WhiteboardCaptureSession><StrokeSet><Stroke>{pts}</Stroke><Stroke>{pts}</Stroke>"
            "</StrokeSet></WhiteboardCaptureSession>")
    for name, data in (("audio", audio), ("iam", iam)):
        out = tmp_path / f"run-{name}"
        assert train(data, out, tiny_config, "vrnn-gmm", 1) == 0, name
        assert run("sample", out / "last.ckpt", "--num", 2, "--steps", 6, "--out", out / "s") == 0
        files = {p.suffix for p in (out / "s").iterdir()}
        assert ".npy" in files and ".png" in files
        if name == "audio":
            wavs = sorted((out / "s").glob("*.wav"))
            info = sf.info(wavs[0])
            assert info.samplerate == rate and info.frames == 6 * 200
        else:
            model, _, _ = checkpoint.load(out / "last.ckpt")
            assert model.cfg.output == "strokes"  # pen data gets the pen-strokes head


def _one_line_error(capsys, code, *needles):
    captured = capsys.readouterr()
    assert code == 2, captured
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert "Traceback" not in captured.err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def test_bad_input_table(arrays, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(arrays, out, tiny_config, "rnn-gauss", 1) == 0
    ckpt = out / "last.ckpt"
    capsys.readouterr()

    missing = tmp_path / "nope"
    _one_line_error(capsys, train(missing, tmp_path / "o1", tiny_config), missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(capsys, train(empty, tmp_path / "o2", tiny_config), empty)
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "a.wav").write_bytes(b"this is not audio at all" * 10)
    _one_line_error(capsys, train(fake, tmp_path / "o3", tiny_config), "a.wav")
    nan = make_arrays(tmp_path / "nan", n=4)
    bad = np.load(nan / "seq01.npy")
    bad[2, 1] = np.nan
    np.save(nan / "seq01.npy", bad)
    _one_line_error(capsys, train(nan, tmp_path / "o4", tiny_config), "seq01.npy", "NaN")
    inf = make_arrays(tmp_path / "inf", n=4)
    bad = np.load(inf / "seq02.npy")
    bad[1, 0] = np.inf
    np.save(inf / "seq02.npy", bad)
    _one_line_error(capsys, train(inf, tmp_path / "o4b", tiny_config), "seq02.npy")
    mixed = make_arrays(tmp_path / "mixed", n=4)
    np.save(mixed / "other.npy", np.zeros((5, 4), np.float32))
    _one_line_error(capsys, train(mixed, tmp_path / "o5", tiny_config), "mixed")
    short = make_arrays(tmp_path / "short", n=4)
    np.save(short / "tiny.npy", np.zeros((1, 3), np.float32))
    _one_line_error(capsys, train(short, tmp_path / "o6", tiny_config), "tiny.npy")
    _one_line_error(capsys, train(arrays, tmp_path / "o7", tiny_config, "vrnn-gauss", 1, "--transition-clip", 3),
                    "--transition-clip", "SRNN")
    _one_line_error(capsys, train(arrays, tmp_path / "o8", tiny_config, "srnn-gauss", 1, "--kl-warmup-start", 1.5),
                    "--kl-warmup-start")
    for i, (model, extra, words) in enumerate((
            ("vrnn-gauss", ("--free-bits", 0.1), ("--kl-estimator", "--free-bits")),
            ("vrnn-gauss", ("--objective", "iwae", "--particles", 2), ("--kl-estimator", "ELBO")),
            ("rnn-gauss", (), ("--kl-estimator", "no latent")))):
        _one_line_error(capsys, train(arrays, tmp_path / f"o9{i}", tiny_config, model, 1, "--kl-estimator",
                                      "sampled", *extra), *words)

    truncated = tmp_path / "trunc.ckpt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    _one_line_error(capsys, run("evaluate", truncated, "--data", arrays), truncated)
    other = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 1}, other)
    _one_line_error(capsys, run("evaluate", other, "--data", arrays), other)
    wrong = tmp_path / "wrong.ckpt"
    c = torch.load(ckpt, weights_only=True)
    c["vrnn"]["config"]["h_dim"] = 99  # weights from another model than the one it describes
    torch.save(c, wrong)
    _one_line_error(capsys, run("evaluate", wrong, "--data", arrays), wrong)
    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    _one_line_error(capsys, run("sample", text, "--out", tmp_path / "x"), text)
    assert not (tmp_path / "x").exists()
    _one_line_error(capsys, run("evaluate", missing / "a.ckpt", "--data", arrays), "a.ckpt")

    other_dim = make_arrays(tmp_path / "d5", n=4, D=5)
    _one_line_error(capsys, run("evaluate", ckpt, "--data", other_dim), other_dim, "dimension")
    _one_line_error(capsys, train("no-such-dataset", tmp_path / "o7", tiny_config), "no-such-dataset")
    _one_line_error(capsys, train(arrays, tmp_path / "o8", tiny_config, "vrnn-bogus"), "vrnn-bogus")
    # a second train into a used folder refuses instead of overwriting it
    before = ckpt.read_bytes()
    _one_line_error(capsys, train(arrays, out, tiny_config, "rnn-gauss", 1), out)
    assert ckpt.read_bytes() == before


def test_console_script_help_and_error():
    exe = Path(sys.executable).with_name("vrnn")
    for cmd in ("train", "evaluate", "sample", "latents", "data", "demo"):
        r = subprocess.run([str(exe), cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "example" in r.stdout, cmd
    r = subprocess.run([str(exe), "data", "info", "/no/such/place"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and "/no/such/place" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("model", ["vrnn-gauss", "srnn-gauss"])
def test_nan_stops_with_term_and_step_and_saves_weights(arrays, tiny_config, tmp_path, capsys,
                                                        monkeypatch, model):
    import vrnn.train as train_mod
    real = train_mod.objective
    calls = {"n": 0}

    def poisoned(model, x, mask=None, state=None, **kw):
        loss, tr = real(model, x, mask, state, **kw)
        calls["n"] += 1
        if calls["n"] == 3:  # third optimiser step: a NaN in log p(x_t) at time step 4 of row 1
            tr.log_px = tr.log_px.clone()
            tr.log_px[1, 4] = float("nan")
            loss = loss + tr.log_px.sum()
        return loss, tr

    monkeypatch.setattr(train_mod, "objective", poisoned)
    out = tmp_path / "nan"
    line = _one_line_error(capsys, train(arrays, out, tiny_config, model, 3),
                           "non-finite log p(x_t)", "optimiser step 2", "time step 4",
                           "sequence 1", "nonfinite-stop.ckpt")
    assert ("--transition-clip 10" in line) == (model == "srnn-gauss"), line  # the SRNN's known cause
    net, _, _ = checkpoint.load(out / "nonfinite-stop.ckpt")  # finite, loadable weights
    assert all(torch.isfinite(p).all() for p in net.parameters()), line


def test_lasa_and_chorales_train_and_sample(tmp_path, tiny_config, monkeypatch):
    from vrnn.data import pianoroll
    cache = tmp_path / "cache"
    monkeypatch.setenv("VRNN_CACHE", str(cache))
    # the chorale cache, built by the real parser from six chorales (the full corpus: ~60 s)
    rolls, names, lowest = pianoroll.parse_chorales(paths=pianoroll.chorale_paths()[:6])
    pianoroll._write_cache(cache / pianoroll.CACHE_NAME, rolls, names, lowest)
    for name, suffix in (("lasa", ".png"), ("chorales", ".mid")):
        out = tmp_path / name
        assert train(name, out, tiny_config, "vrnn-gauss", 1, "--limit-train-batches", 3) == 0
        assert run("sample", out / "last.ckpt", "--num", 2, "--steps", 8, "--out", out / "s") == 0
        assert list((out / "s").glob(f"*{suffix}")), name
        model, _, desc = checkpoint.load(out / "last.ckpt")
        assert model.cfg.output == ("bernoulli" if name == "chorales" else "gauss")
    roll = np.load(sorted((tmp_path / "chorales" / "s").glob("*.npy"))[0])
    assert set(np.unique(roll)) <= {0.0, 1.0}  # piano-roll samples are binary


def test_bf16_mixed_training_on_cpu_runs_the_fused_scan(arrays, tiny_config, tmp_path, monkeypatch):
    """--precision bf16-mixed on CPU: the fused scan runs in bf16 (chunks of truncated BPTT
    carrying the float32 state), the checkpoint holds finite float32 weights."""
    from vrnn import fast
    seen = []
    apply = fast.FusedScan.apply

    def spy(meta, *args):
        seen.append(meta[-1])
        return apply(meta, *args)

    monkeypatch.setattr(fast.FusedScan, "apply", spy)
    out = tmp_path / "bf16"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 1, "--precision", "bf16-mixed",
                 "--tbptt", 5) == 0
    assert seen and set(seen) == {torch.bfloat16}
    state = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all()
               for v in state.values() if v.is_floating_point())


def test_subnormals_are_flushed_while_a_command_runs_unless_kept(monkeypatch):
    from vrnn import cli

    seen = []
    monkeypatch.setitem(cli.COMMANDS, "data", lambda args: seen.append(float(torch.tensor([1e-39]) * 1.0)) or 0)
    assert main(["data", "list"]) == 0
    assert main(["--denormals", "keep", "data", "list"]) == 0
    assert seen == [0.0, pytest.approx(1e-39, rel=1e-3)]  # 1e-39 is subnormal in float32
    assert float(torch.tensor([1e-39]) * 1.0) > 0  # restored when main returns
    assert main(["--denormals", "nope", "data", "list"]) == 2
