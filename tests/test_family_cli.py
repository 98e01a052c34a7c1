"""The whole family through the command line on every data kind: SRNN rows, the
autoregressive output, IWAE and FIVO training, the SMC estimator and diagnostics, scores
in the data's own units, strict JSON, and what `sample --mean` feeds back."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from test_cli import TINY, make_arrays, run, train
from vrnn import checkpoint

KINDS = ["arrays", "audio", "iam", "lasa", "chorales"]


def make_data(kind: str, tmp_path, monkeypatch):
    """A small dataset of each kind (the registered ones restricted to a few sequences)."""
    if kind == "arrays":
        return str(make_arrays(tmp_path / "arrays", n=10)), None
    if kind == "audio":
        folder = tmp_path / "audio"
        folder.mkdir()
        for i in range(6):
            t = np.arange(int(16000 * 0.9)) / 16000
            sf.write(folder / f"c{i}.wav", 0.3 * np.sin(2 * np.pi * (180 + 40 * i) * t), 16000)
        return str(folder), None
    if kind == "iam":
        folder = tmp_path / "iam"
        folder.mkdir()
        for i in range(6):
            pts = "".join(f'<Point x="{100 + 7 * j + i}" y="{200 + (j % 5) * 3}" time="{j}"/>' for j in range(7))
            (folder / f"l{i}.xml").write_text(f"<WhiteboardCaptureSession><StrokeSet><Stroke>{pts}</Stroke>"
                                              f"<Stroke>{pts}</Stroke></StrokeSet></WhiteboardCaptureSession>")
        return str(folder), None
    if kind == "chorales":
        from vrnn.data import pianoroll
        cache = tmp_path / "cache"
        monkeypatch.setenv("VRNN_CACHE", str(cache))
        rolls, names, lowest = pianoroll.parse_chorales(paths=pianoroll.chorale_paths()[:6])
        pianoroll._write_cache(cache / pianoroll.CACHE_NAME, rolls, names, lowest)
        return "chorales", None
    return "lasa", {"data": {"subsample": 16, "max_sequences": 12}}


def config(tmp_path, extra=None, **train_opts):
    cfg = {**TINY, **(extra or {})}
    if train_opts:
        cfg["train"] = {**cfg.get("train", {}), **train_opts}
    p = tmp_path / "cfg.json"
    p.write_text(json.dumps(cfg))
    return p


@pytest.mark.parametrize("kind", KINDS)
def test_srnn_trains_evaluates_samples_and_exports_on_every_data_kind(kind, tmp_path, monkeypatch, capsys):
    data, extra = make_data(kind, tmp_path, monkeypatch)
    out = tmp_path / "run"
    assert train(data, out, config(tmp_path, extra), "srnn-gmm", 1, "--limit-train-batches", 2) == 0
    model, _, desc = checkpoint.load(out / "last.ckpt")
    assert type(model).__name__ == "SRNN"
    capsys.readouterr()
    assert run("evaluate", out / "last.ckpt", "--data", data, "--split", "all", "--estimator", "all",
               "--samples", 3, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert res["family"] == "srnn" and set(res["estimators"]) == {"elbo", "is", "smc"}
    for est in res["estimators"].values():
        for key in ("per_sequence", "per_step", "bits_per_dim", "per_sequence_raw", "bits_per_dim_raw"):
            assert math.isfinite(est[key]), key
    assert run("sample", out / "last.ckpt", "--num", 2, "--steps", 5, "--out", tmp_path / "s") == 0
    assert len(list((tmp_path / "s").glob("*.npy"))) == 2
    assert run("latents", out / "last.ckpt", "--data", data, "--out", tmp_path / "l.npz", "--smc", 4) == 0
    lat = np.load(tmp_path / "l.npz")
    for key in ("kl", "posterior_mean", "prior_std", "ess", "resampled", "log_z_smc"):
        assert key in lat.files, key
    real = lat["mask"] > 0
    assert (lat["ess"][real] >= 1 - 1e-4).all() and (lat["ess"][real] <= 4 + 1e-4).all()
    assert (lat["ess"][~real] == 0).all() and not lat["resampled"][~real].any()


@pytest.mark.parametrize("kind", KINDS)
def test_the_autoregressive_output_on_every_data_kind(kind, tmp_path, monkeypatch, capsys):
    """--output ar trains and samples on every kind; the data's bits (pen lifts, notes) are
    its Bernoulli dimensions, and `sample --mean` feeds back exact bits."""
    data, extra = make_data(kind, tmp_path, monkeypatch)
    out = tmp_path / "run"
    model_name = {"arrays": "rnn-gauss", "audio": "vrnn-gauss", "iam": "srnn-gauss", "lasa": "vrnn-gmm",
                  "chorales": "vrnn-gauss"}[kind]
    assert train(data, out, config(tmp_path, extra), model_name, 1, "--limit-train-batches", 2,
                 "--output", "ar") == 0
    model, _, desc = checkpoint.load(out / "last.ckpt")
    assert model.cfg.output == "ar"
    want_bits = {"iam": (0,), "chorales": tuple(range(model.cfg.x_dim))}.get(kind, ())
    assert model.cfg.binary_dims == want_bits
    capsys.readouterr()
    assert run("evaluate", out / "last.ckpt", "--data", data, "--samples", 2, "--json") == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["log_likelihood"])
    assert run("sample", out / "last.ckpt", "--num", 2, "--steps", 4, "--mean", "--out", tmp_path / "s") == 0
    x = np.stack([np.load(p) for p in sorted((tmp_path / "s").glob("*.npy"))])
    if want_bits:
        assert set(np.unique(x[..., list(want_bits)])) <= {0.0, 1.0}


def test_mean_feeds_back_bits_for_bernoulli_and_pen_outputs(tmp_path, monkeypatch):
    """`sample --mean` on piano-rolls gives notes that are on or off, never probabilities."""
    data, _ = make_data("chorales", tmp_path, monkeypatch)
    out = tmp_path / "run"
    assert train(data, out, config(tmp_path), "vrnn-gauss", 1, "--limit-train-batches", 2) == 0
    assert run("sample", out / "last.ckpt", "--num", 3, "--steps", 6, "--mean", "--out", tmp_path / "s") == 0
    rolls = np.stack([np.load(p) for p in sorted((tmp_path / "s").glob("*.npy"))])
    assert set(np.unique(rolls)) <= {0.0, 1.0}
    model, _, _ = checkpoint.load(out / "last.ckpt")
    assert model.cfg.output == "bernoulli"


@pytest.mark.parametrize("objective,extra", [("iwae", ()), ("fivo", ("--tbptt", 4))])
def test_iwae_and_fivo_training_through_the_cli(objective, extra, tmp_path, capsys):
    data = make_arrays(tmp_path / "arrays", n=12, T=(6, 14))
    out = tmp_path / "run"
    assert train(data, out, config(tmp_path), "vrnn-gauss", 2, "--objective", objective,
                 "--particles", 3, *extra) == 0
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["vrnn"]["train"]["objective"] == objective and ckpt["vrnn"]["train"]["particles"] == 3
    summary = json.loads((out / "summary.json").read_text())
    assert summary["objective"] == objective and summary["steps"] > 0
    metrics = (out / "logs" / "csv" / "metrics.csv").read_text()
    assert "valid/bound" in metrics and "train/bound" in metrics
    # the validation bound is the K-particle bound, at least the ELBO up to Monte Carlo noise
    rows = [line.split(",") for line in metrics.splitlines()]
    head = rows[0]
    vb, ve = head.index("valid/bound"), head.index("valid/elbo")
    last = [r for r in rows[1:] if r[vb]][-1]
    assert float(last[vb]) > float(last[ve]) - 5.0


def test_scores_in_the_data_units_and_strict_json_for_far_away_data(tmp_path, capsys):
    """The data's own units add -sum_d log s_d per step; data far outside the training
    range (1e30) is scored finite (float64) and the JSON is strict."""
    data = make_arrays(tmp_path / "arrays", n=12, scale=5.0, offset=100.0)
    out = tmp_path / "run"
    assert train(data, out, config(tmp_path), "vrnn-gauss", 1) == 0
    _, norm, _ = checkpoint.load(out / "last.ckpt")
    capsys.readouterr()
    assert run("evaluate", out / "last.ckpt", "--data", data, "--samples", 3, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    offset = -float(np.log(norm.std.astype(np.float64)).sum())
    assert abs(offset) > 1.0  # the data were scaled: the two units really differ
    per_seq_steps = res["num_steps"] / res["num_sequences"]
    for norm_key, raw_key in (("log_likelihood", "log_likelihood_raw"), ("elbo", "elbo_raw")):
        np.testing.assert_allclose(res[raw_key], res[norm_key] + offset * per_seq_steps, rtol=1e-9)
    np.testing.assert_allclose(res["nats_per_step_raw"], res["nats_per_step"] + offset, rtol=1e-9)
    huge = tmp_path / "huge"
    huge.mkdir()
    for i in range(12):
        np.save(huge / f"s{i:02d}.npy", (np.random.default_rng(i).normal(size=(8, 3)) * 1e30).astype(np.float32))
    assert run("evaluate", out / "last.ckpt", "--data", huge, "--split", "all", "--estimator", "all",
               "--samples", 3, "--json") == 0
    text = capsys.readouterr().out
    res = json.loads(text)  # strict: json would still parse NaN, so look for it
    assert "NaN" not in text and "Infinity" not in text
    assert res["rescored_in_float64"] == 12 and all(v == 0 for v in res["non_finite"].values())
    assert all(math.isfinite(e["per_sequence"]) for e in res["estimators"].values())
    # and the per-step anomaly score of such data is finite too (low: very anomalous)
    assert run("latents", out / "last.ckpt", "--data", huge, "--out", tmp_path / "l.npz") == 0
    lat = np.load(tmp_path / "l.npz")
    real = lat["mask"] > 0
    assert np.isfinite(lat["plugin_score"][real]).all() and lat["plugin_score"][real].max() < -1e6


def test_non_finite_scores_are_null_with_a_warning(tmp_path, capsys, monkeypatch):
    """Where even float64 overflows, the mean is null (strict JSON) and stderr says how
    many sequences scored non-finite."""
    import vrnn.evaluate as ev
    data = make_arrays(tmp_path / "arrays", n=12)
    out = tmp_path / "run"
    assert train(data, out, config(tmp_path), "vrnn-gauss", 1) == 0
    real = ev._scores

    def overflow(model, x, mask, *args):
        got = real(model, x, mask, *args)
        return {k: torch.full_like(v, -math.inf) if k == "is" else v for k, v in got.items()}

    monkeypatch.setattr(ev, "_scores", overflow)
    capsys.readouterr()
    assert run("evaluate", out / "last.ckpt", "--data", data, "--samples", 2, "--json") == 0
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["log_likelihood"] is None and res["non_finite"]["is"] == res["num_sequences"]
    assert "Infinity" not in captured.out and "NaN" not in captured.out
    assert "non-finite" in captured.err and f"{res['num_sequences']} of" in captured.err


# ------------------------------------------- the rest of the dynamical-VAE family (DVAE)
DVAE = {"dkf-gauss": True, "storn-gauss": True, "rvae-causal-gauss": True, "rvae-gauss": False,
        "dsae-gauss": False, "kvae-gauss": True}  # preset: offers the particle filter (SMC, FIVO)
# one data kind each besides arrays (piano-rolls: the Bernoulli head is in test_dvae.py),
# so that the heads the kinds pick (gauss, strokes) meet the families through the CLI
DVAE_KINDS = {"dkf-gauss": "lasa", "storn-gauss": "iam", "rvae-causal-gauss": "audio",
              "rvae-gauss": "lasa", "dsae-gauss": "iam", "kvae-gauss": "audio"}


@pytest.mark.parametrize("preset", list(DVAE))
def test_dvae_models_train_evaluate_sample_and_export(preset, tmp_path, monkeypatch, capsys):
    smc = DVAE[preset]
    data = str(make_arrays(tmp_path / "arrays", n=10))
    out = tmp_path / "run"
    assert train(data, out, config(tmp_path), preset, 1, "--limit-train-batches", 2,
                 *(("--objective", "fivo", "--particles", 2, "--tbptt", 4) if smc
                   else ("--objective", "iwae", "--particles", 2))) == 0
    model, _, _ = checkpoint.load(out / "last.ckpt")
    assert model.cfg.family == preset.split("-")[0] and model.cfg.name == preset
    capsys.readouterr()
    assert run("evaluate", out / "last.ckpt", "--data", data, "--split", "all", "--estimator", "all",
               "--samples", 3, "--json") == 0
    res = json.loads(capsys.readouterr().out)
    assert set(res["estimators"]) == ({"elbo", "is", "smc"} if smc else {"elbo", "is"})
    assert smc or "particle filter" in res["not_offered"]["smc"]
    assert all(math.isfinite(e["per_sequence"]) for e in res["estimators"].values())
    assert run("sample", out / "last.ckpt", "--num", 2, "--steps", 5, "--out", tmp_path / "s") == 0
    assert len(list((tmp_path / "s").glob("*.npy"))) == 2
    assert run("latents", out / "last.ckpt", "--data", data, "--out", tmp_path / "l.npz",
               *(("--smc", 3) if smc else ())) == 0
    lat = np.load(tmp_path / "l.npz")
    for key in ("kl", "posterior_mean", "prior_std", "plugin_score") + (("ess", "log_z_smc") if smc else ()):
        assert key in lat.files, key
    if preset == "dsae-gauss":
        assert "static_mean" in lat.files
    # what a model cannot do is refused in one line (exit 2), naming the option and why
    refusals = []
    if not smc:
        refusals += [("evaluate", out / "last.ckpt", "--data", data, "--estimator", "smc"),
                     ("latents", out / "last.ckpt", "--data", data, "--out", tmp_path / "m.npz", "--smc", 3),
                     ("train", "--data", data, "--model", preset, "--out", tmp_path / "f", "--config",
                      config(tmp_path), "--objective", "fivo", "--particles", 2)]
    if preset in ("rvae-gauss", "dsae-gauss"):
        refusals.append(("train", "--data", data, "--model", preset, "--out", tmp_path / "t", "--config",
                         config(tmp_path), "--tbptt", 4))
    if preset == "kvae-gauss":
        refusals.append(("train", "--data", data, "--model", preset, "--out", tmp_path / "t", "--config",
                         config(tmp_path), "--free-bits", 0.5))
    if preset == "rvae-gauss":
        refusals.append(("sample", out / "last.ckpt", "--num", 1, "--steps", 3, "--prefix", data,
                         "--out", tmp_path / "p"))
    for argv in refusals:
        capsys.readouterr()
        assert run(*argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and ("cannot" in err or "no " in err), err
        assert not (tmp_path / "f").exists() and not (tmp_path / "t").exists()
    # and the model trains on another data kind (with its head: strokes, bernoulli, ...)
    kind = DVAE_KINDS[preset]
    (tmp_path / kind).mkdir()
    data, extra = make_data(kind, tmp_path / kind, monkeypatch)
    assert train(data, tmp_path / "run2", config(tmp_path, extra), preset, 1, "--limit-train-batches", 2) == 0
    assert run("sample", tmp_path / "run2" / "last.ckpt", "--num", 1, "--steps", 4, "--out", tmp_path / "s2") == 0
