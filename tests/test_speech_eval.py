"""The DVAE review's speech evaluation: the spectrogram data kind, the Itakura-Saito head,
the log-power input of every model, resynthesis with the original phase and its metrics."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from vrnn import build
from vrnn.config import PRESETS, VRNNConfig
from vrnn.data import describe, load
from vrnn.data import spectrogram as stft
from vrnn.errors import ConfigError, DataError
from vrnn.heads import ItakuraSaitoHead, itakura_saito
from vrnn.models.base import LogPower
from vrnn.train import model_config, prepare

RATE = 16000
FAMILY_ROWS = ["vrnn-gauss", "srnn-gauss", "dkf-gauss", "storn-gauss", "rvae-gauss", "rvae-causal-gauss",
               "dsae-gauss", "kvae-gauss"]


def speechlike(seconds: float, seed: int) -> np.ndarray:
    """A voiced-like signal: a few harmonics under a slow envelope, plus a little noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * RATE)) / RATE
    f0 = 120 + 40 * rng.random()
    x = sum((0.3 / k) * np.sin(2 * np.pi * k * f0 * t + rng.random() * 6) for k in range(1, 6))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * 2.0 * t + rng.random())) + 0.01 * rng.standard_normal(len(t))
    return x.astype(np.float32)


def wav_folder(root: Path, n: int = 6, seconds: float = 0.5) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        sf.write(str(root / f"utt{i:02d}.wav"), speechlike(seconds + 0.05 * i, i), RATE, subtype="FLOAT")
    return root


# --------------------------------------------------------------------------- the data kind


def test_stft_power_frames_and_exact_inverse():
    wave = speechlike(0.4, 0)
    spec = stft.stft(wave)
    assert spec.shape == (1 + len(wave) // stft.HOP, 513)
    back = stft.istft(spec, length=len(wave)).numpy()
    assert np.max(np.abs(back - wave)) < 1e-4
    p = stft.power(wave)
    assert p.dtype == np.float32 and (p >= 0).all()
    np.testing.assert_allclose(p, (spec.abs() ** 2).numpy(), rtol=1e-5)


def test_spectrogram_option_and_meta(tmp_path):
    folder = wav_folder(tmp_path / "wavs")
    data = load(folder, spectrogram=True)
    assert data.kind == "spectrogram" and data.dim == 513 and len(data) == 6
    files = data.meta["sequence_files"]
    assert [Path(f).name for f in files] == [f"utt{i:02d}.wav" for i in range(6)]
    assert data.meta["frame_offsets"] == [0] * 6  # whole utterances
    wave, _ = sf.read(files[2], dtype="float32")
    assert len(data.sequences[2]) == 1 + len(wave) // 256
    np.testing.assert_allclose(data.sequences[2], stft.power(wave), rtol=1e-5, atol=1e-9)
    info = describe(str(folder), spectrogram=True)
    assert info["kind"] == "spectrogram" and info["n_fft"] == 1024 and info["hop"] == 256 and info["files"] == 6
    # chunks: fixed frame counts, each remembering where it starts in its file
    chunked = load(folder, spectrogram=True, chunk_seconds=0.16)  # 10 frames
    assert set(chunked.lengths) == {10}
    assert chunked.meta["frame_offsets"][:3] == [0, 10, 20]
    wave0, _ = sf.read(chunked.meta["sequence_files"][1], dtype="float32")
    np.testing.assert_allclose(chunked.sequences[1], stft.power(wave0)[10:20], rtol=1e-5, atol=1e-9)
    with pytest.raises(ConfigError, match="frame_size does not apply"):
        load(folder, spectrogram=True, frame_size=200)


def test_the_registered_name_reads_the_fetched_corpus_as_spectrograms(tmp_path, monkeypatch):
    monkeypatch.setenv("VRNN_CACHE", str(tmp_path / "cache"))
    corpus = wav_folder(tmp_path / "cache" / "asterisk-en", n=4)
    wav_folder(corpus / "silence", n=2)  # skipped, as for asterisk-en
    data = load("asterisk-en-stft")
    assert data.name == "asterisk-en-stft" and data.kind == "spectrogram" and len(data) == 4
    assert all("silence" not in f for f in data.meta["sequence_files"])
    assert load("asterisk-en").kind == "speech"  # the waveform corpus is unchanged


def test_spectrogram_kind_picks_the_is_head_and_powers_are_scaled_never_shifted(tmp_path, monkeypatch):
    data = load(wav_folder(tmp_path / "w"), spectrogram=True)
    cfg = model_config("vrnn-gauss", data, {"h_dim": 8, "z_dim": 2})
    assert cfg.output == "is" and cfg.power_dims == tuple(range(513))
    prep = prepare("x", data=data).for_model(cfg)
    seqs = prep.sequences("train")
    i = prep.splits["train"][0]
    # powers only scaled (by each bin's mean training power), never shifted: 0 stays 0
    train = np.concatenate([data.sequences[j] for j in prep.splits["train"]]).astype(np.float64)
    scale = train.mean(0)
    np.testing.assert_array_equal(prep.normalizer.mean, 0.0)
    np.testing.assert_allclose(prep.normalizer.std, scale, rtol=1e-5)
    np.testing.assert_allclose(seqs[0], data.sequences[i] / scale, rtol=1e-5)
    assert (seqs[0] >= 0).all()
    # a gaussian head on the same data is standardised as before
    gauss = model_config("vrnn-gauss", data, {"h_dim": 8, "z_dim": 2, "output": "gauss"})
    assert not np.allclose(prepare("x", data=data).for_model(gauss).sequences("train")[0], data.sequences[i])
    # negative "powers" are refused, naming the file
    data.sequences[1] = data.sequences[1].copy()
    data.sequences[1][3, 7] = -1.0
    with pytest.raises(DataError, match=r"utt01\.wav: column 7 holds -1 at step 3"):
        prepare("x", data=data).for_model(cfg)
    # and at evaluation (evaluate, latents, resynth load data through checked_data)
    from vrnn import evaluate
    monkeypatch.setattr(evaluate, "load", lambda spec, **opts: data)
    with pytest.raises(DataError, match=r"utt01\.wav: column 7 holds -1 at step 3.*never negative"):
        evaluate.checked_data("x", build(cfg), {}, "m.ckpt")


# --------------------------------------------------------------------------- the head


def test_is_head_against_torch_exponential():
    torch.manual_seed(0)
    head = ItakuraSaitoHead(5, 4, std_floor=1e-4).double()
    params = torch.randn(3, 7, 4, dtype=torch.float64) * 3
    v = torch.nn.functional.softplus(params) + 1e-4
    x = torch.distributions.Exponential(1.0 / v).sample()
    ref = torch.distributions.Exponential(rate=1.0 / v).log_prob(x).sum(-1)
    torch.testing.assert_close(head.log_prob(params, x), ref)
    torch.testing.assert_close(head.log_prob_dims(params, x).sum(-1), ref)
    torch.testing.assert_close(head.mean(params), v)
    # x = 0 exactly (digital silence) is legal and finite
    zero = head.log_prob(params, torch.zeros_like(x))
    assert torch.isfinite(zero).all()
    torch.testing.assert_close(zero, -torch.log(v).sum(-1))


def test_is_divergence_and_nll_differ_by_a_v_free_term():
    torch.manual_seed(1)
    head = ItakuraSaitoHead(3, 6).double()
    x = torch.rand(6, dtype=torch.float64) * 5 + 0.01
    diffs = []
    for _ in range(4):
        params = torch.randn(6, dtype=torch.float64) * 2
        v = head.variance(params)
        diffs.append((itakura_saito(x, v) - (-head.log_prob_dims(params, x))).numpy())
    for d in diffs[1:]:
        np.testing.assert_allclose(d, diffs[0], atol=1e-10)
    # d_IS - (-log p) = x/v - log x + log v - 1 - log v - x/v = -log x - 1
    np.testing.assert_allclose(diffs[0], (-torch.log(x) - 1.0).numpy(), atol=1e-10)


def test_is_head_gradient_and_sampler():
    torch.manual_seed(2)
    head = ItakuraSaitoHead(4, 3)
    feats = torch.randn(10, 4)
    x = torch.rand(10, 3)
    head.log_prob(head(feats), x).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
               for p in head.parameters())
    params = torch.full((200000, 3), 0.5)
    draws = head.sample(params)
    v = float(head.variance(params[0])[0])
    assert (draws >= 0).all()
    assert abs(float(draws.mean()) - v) < 0.01 * v + 3 * v / np.sqrt(draws.numel())
    assert abs(float(draws.var()) - v ** 2) < 0.05 * v ** 2  # Exponential: variance = mean^2


# --------------------------------------------------------------------------- every model


@pytest.mark.parametrize("row", FAMILY_ROWS + ["rnn-gauss"])
def test_every_model_reads_log_powers(row):
    torch.manual_seed(3)
    cfg = VRNNConfig.preset(row, x_dim=513, h_dim=8, z_dim=2, output="is")
    model = build(cfg)
    assert isinstance(model.phi_x[0], LogPower)
    gauss = build(VRNNConfig.preset(row, x_dim=513, h_dim=8, z_dim=2))
    assert not any(isinstance(m, LogPower) for m in gauss.modules())
    x = torch.rand(2, 6, 513) * 100.0
    x[0, :2] = 0.0  # silence
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0
    elbo = model.elbo(x, mask)
    assert torch.isfinite(elbo).all()
    # phi_x sees log(x + eps): scaling the powers moves its input by a constant, not by 100x
    fx = model.phi_x[0](x)
    assert float(fx.max()) < 5.0 and float(fx.min()) > -14.0


@pytest.mark.parametrize("row", ["vrnn-gauss", "dkf-gauss", "rvae-gauss"])
def test_a_few_adam_steps_lower_the_is_loss(row):
    torch.manual_seed(4)
    x = torch.as_tensor(np.stack([stft.power(speechlike(0.25, i)) for i in range(4)]))
    cfg = VRNNConfig.preset(row, x_dim=513, h_dim=16, z_dim=4, output="is")
    model = build(cfg)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    noise = torch.zeros(4, x.shape[1], cfg.z_dim)

    def loss():
        return -model.elbo(x, noise=noise).mean() / x.shape[1]

    with torch.no_grad():
        before = float(loss())
    for _ in range(30):
        opt.zero_grad()
        (-model.elbo(x).mean() / x.shape[1]).backward()
        opt.step()
    with torch.no_grad():
        after = float(loss())
    assert after < before - 0.05 * abs(before), (before, after)


def test_is_is_an_output_choice_of_every_row():
    for row in PRESETS:
        assert build(VRNNConfig.preset(row, x_dim=4, h_dim=4, z_dim=2, output="is")).head.param_dim == 4


# --------------------------------------------------------------------------- resynthesis, metrics


def test_oracle_power_with_the_original_phase_gives_the_waveform_back(tmp_path):
    from vrnn.resynth import original, synthesise
    from vrnn.speech_metrics import si_sdr

    path = tmp_path / "u.wav"
    sf.write(str(path), speechlike(0.6, 5), RATE, subtype="FLOAT")
    wave, _ = sf.read(str(path), dtype="float32")
    frames = 1 + len(wave) // 256
    reference, phase, length = original(str(path), 0, frames, RATE)
    np.testing.assert_allclose(reference, wave, atol=1e-7)  # a whole utterance: the file itself
    oracle = stft.power(wave)
    back = synthesise(oracle, phase, length)
    assert si_sdr(back, reference) > 30.0
    # a chunk: frames 10..29, against the inverse STFT of its own frames
    reference, phase, length = original(str(path), 10, 20, RATE)
    assert length == 19 * 256
    assert si_sdr(synthesise(oracle[10:30], phase, length), reference) > 30.0
    # and a wrong power (flat) is far from it
    assert si_sdr(synthesise(np.ones_like(oracle[10:30]), phase, length), reference) < 10.0


def test_metrics_order_clean_and_noisy():
    from vrnn import speech_metrics as sm

    rng = np.random.default_rng(0)
    clean = speechlike(3.2, 7).astype(np.float64)
    light = clean + 0.01 * rng.standard_normal(len(clean))
    heavy = clean + 0.2 * rng.standard_normal(len(clean))
    assert sm.si_sdr(light, clean) > sm.si_sdr(heavy, clean) + 10
    a, b = sm.score(light, clean, RATE), sm.score(heavy, clean, RATE)
    assert a["pesq"] > b["pesq"] and a["estoi"] > b["estoi"]
    assert 1.0 <= b["pesq"] < a["pesq"] <= 4.7 and 0.0 <= b["estoi"] < a["estoi"] <= 1.0
    assert sm.estoi(clean[:3000], clean[:3000], RATE) is None  # under ESTOI's 30 frames: no number


def test_resynth_cli_on_a_tiny_model(tmp_path, capsys, monkeypatch):
    import importlib.util
    import json

    from vrnn.cli import main

    folder = wav_folder(tmp_path / "wavs", n=6, seconds=0.5)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"model": {"h_dim": 8, "z_dim": 2}, "data": {"spectrogram": True}}))
    run = tmp_path / "run"
    assert main(["--threads", "1", "train", "--data", str(folder), "--model", "dkf-gauss", "--out", str(run),
                 "--max-epochs", "2", "--batch-size", "4", "--config", str(cfg), "--no-progress"]) == 0
    capsys.readouterr()
    # every other verb on the spectrogram model: evaluate (raw units), sample (powers), latents
    assert main(["--threads", "1", "evaluate", str(run / "last.ckpt"), "--data", str(folder), "--split", "all",
                 "--samples", "2", "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert math.isfinite(ev["elbo_raw"]) and math.isfinite(ev["log_likelihood_raw"])
    assert main(["--threads", "1", "sample", str(run / "last.ckpt"), "--num", "2", "--steps", "5", "--out",
                 str(tmp_path / "smp")]) == 0
    drawn = np.load(tmp_path / "smp" / "sample_000.npy")
    assert drawn.shape == (5, 513) and (drawn >= 0).all() and (tmp_path / "smp" / "sample_000.png").exists()
    assert main(["--threads", "1", "latents", str(run / "last.ckpt"), "--data", str(folder), "--out",
                 str(tmp_path / "lat.npz")]) == 0
    assert np.isfinite(np.load(tmp_path / "lat.npz")["log_px"]).all()
    capsys.readouterr()
    metrics = "si_sdr,pesq,estoi"
    out = tmp_path / "rs"
    assert main(["--threads", "1", "resynth", str(run / "last.ckpt"), "--data", str(folder), "--split", "all",
                 "--max-utterances", "4", "--metrics", metrics, "--out", str(out)]) == 0
    assert "resynthesised 4 utterance(s)" in capsys.readouterr().out
    res = json.loads((out / "metrics.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict {c}"))
    assert res["utterances"] == 4 and len(res["rows"]) == 4
    for row in res["rows"]:
        wave, rate = sf.read(str(out / row["wav"]), dtype="float32")
        ref, _ = sf.read(row["file"], dtype="float32")
        assert rate == RATE and len(wave) == len(ref)
        assert isinstance(row["si_sdr"], float)
    assert res["means"]["si_sdr"] == pytest.approx(np.mean([r["si_sdr"] for r in res["rows"]]))
    lines = (out / "metrics.csv").read_text().splitlines()
    assert len(lines) == 6 and lines[0].startswith("utterance,") and lines[-1].startswith("mean,")
    # refusals: one line, exit 2
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pystoi" else object())
    assert main(["resynth", str(run / "last.ckpt"), "--data", str(folder), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'pystoi', which is not installed" in err and "vrnn[speech]" in err
    monkeypatch.undo()
    from vrnn.resynth import check_data, check_model
    with pytest.raises(ConfigError, match="needs a model with the Itakura-Saito head"):
        check_model(build(VRNNConfig.preset("dkf-gauss", x_dim=513, h_dim=4, z_dim=2)), "m.ckpt")
    with pytest.raises(ConfigError, match="needs spectrogram data"):
        check_data(load(folder), "wavs")
