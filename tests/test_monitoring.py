"""Online scoring and anomaly detection (vrnn.scoring, thresholds, detection, monitor and
the score / stream / threshold / detect commands), on tiny models and handmade data."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch

from vrnn import VRNNConfig, build, detection, thresholds
from vrnn.cli import main
from vrnn.data import Normalizer
from vrnn.monitor import StreamOptions, read_scores, stream
from vrnn.scoring import Scorer, log_prob_dims
from vrnn.smc import particle_filter

D, Z = 3, 2


def tiny(preset="vrnn-gauss", seed=0, **kw):
    kw = {**dict(x_dim=D, h_dim=8, z_dim=Z, phi_x_dim=8, phi_z_dim=8, enc_dim=8, prior_dim=8, dec_dim=8), **kw}
    if "gmm" in preset:
        kw.setdefault("n_components", 2)
    torch.manual_seed(seed)
    return build(VRNNConfig.preset(preset, **kw)).double().eval()


def series(T=40, seed=1):
    return np.random.default_rng(seed).normal(size=(T, D)) * 2.0 + 5.0


NORM = Normalizer(np.full(D, 5.0), np.array([2.0, 0.5, 3.0]))


def save_checkpoint(path, model, normalizer=NORM):
    """A vrnn checkpoint written directly (no training): config, weights, normaliser."""
    meta = {"format": 1, "config": model.cfg.to_dict(), "normalizer": normalizer.state_dict(),
            "data": {"spec": "test", "kind": "array", "name": "test", "dim": D}, "train": {}}
    sd = {f"model.{k}": v.float() for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "vrnn": meta}, path)
    return path


# ------------------------------------------------------------------ the scores
@pytest.mark.parametrize("preset,resample", [("vrnn-gauss", "ess"), ("vrnn-gauss", "always"),
                                             ("vrnn-gmm", "ess"), ("srnn-gauss", "always"),
                                             ("storn-gauss", "always"), ("kvae-gauss", "always")])
def test_increments_sum_to_the_filters_log_z_with_the_same_draws(preset, resample):
    model = tiny(preset, **({"posterior": "filtering"} if preset.startswith("srnn") else {}))
    x = torch.as_tensor(series(30))
    K, T = 6, x.shape[0]
    g = torch.Generator().manual_seed(3)
    noise = torch.randn(K, T, Z, generator=g, dtype=torch.float64)
    u = torch.rand(1, T, K, generator=g, dtype=torch.float64)
    f = particle_filter(model, x.unsqueeze(0), particles=K, noise=noise, uniforms=u, resample=resample)
    sc = Scorer(model, None, particles=K, resample=resample)
    steps = [sc.update(x[t].numpy(), noise=noise[:, t], uniforms=u[0, t]) for t in range(T)]
    assert sum(s.resampled for s in steps) >= 1
    assert -sum(s.score for s in steps) == pytest.approx(float(f.log_z), abs=1e-9)
    # the filter's ESS per step is the scorer's
    np.testing.assert_allclose([s.ess for s in steps], f.ess[0].numpy(), atol=1e-9)


def test_raw_units_add_the_jacobian_and_rnn_rows_are_exact():
    model = tiny("rnn-gauss")
    xs = series(20)
    s = Scorer(model, NORM).score(xs)
    xn = torch.as_tensor((xs - NORM.mean.astype(np.float64)) / NORM.std.astype(np.float64)).unsqueeze(0)
    exact = float(model.log_likelihood(xn)) - 20 * float(np.log(NORM.std.astype(np.float64)).sum())
    assert -s.score.sum() == pytest.approx(exact, abs=1e-6)
    np.testing.assert_allclose(s.rest, 0.0, atol=1e-9)            # one exact "particle"
    np.testing.assert_allclose(s.shares.sum(1), s.score, atol=1e-9)


@pytest.mark.parametrize("preset,extra", [("vrnn-gauss", {}), ("vrnn-gauss", {"output": "ar"}),
                                          ("vrnn-gmm", {})])
def test_shares(preset, extra):
    model = tiny(preset, **extra)
    sc = Scorer(model, NORM, particles=5)
    for s in [sc.update(r) for r in series(8)]:
        assert s.score == pytest.approx(s.shares.sum() + s.rest, abs=1e-9)
    # per-dimension terms: exact sums for factorised and AR heads, marginals for the GMM
    params = torch.randn(4, model.head.param_dim, dtype=torch.float64)
    xd = torch.randn(4, D, dtype=torch.float64)
    per = log_prob_dims(model.head, params, xd)
    if preset == "vrnn-gmm":
        assert not torch.allclose(per.sum(-1), model.head.log_prob(params, xd))
    else:
        torch.testing.assert_close(per.sum(-1), model.head.log_prob(params, xd))
    if preset == "vrnn-gauss" and not extra:  # K = 1, Gaussian head: rest = -log p(z)/q(z)
        one = Scorer(model, NORM, particles=1).update(series(1)[0])
        assert one.rest == pytest.approx(one.score - one.shares.sum())


def test_spectrogram_powers_score_with_exact_shares():
    """The Itakura-Saito head (STFT powers, scale-only normaliser) scores online: its
    per-bin terms are the head's own and sum to its log-density, so shares add up."""
    model = tiny("vrnn-gauss", output="is")
    xs = np.abs(series(12))
    norm = Normalizer(np.zeros(D), np.array([2.0, 0.5, 3.0]))
    sc = Scorer(model, norm, particles=4, seed=1)
    steps = [sc.update(r) for r in xs]
    assert sc.additive
    for s in steps:
        assert s.score == pytest.approx(s.shares.sum() + s.rest, abs=1e-9)
    params = torch.randn(5, model.head.param_dim, dtype=torch.float64)
    torch.testing.assert_close(log_prob_dims(model.head, params, torch.as_tensor(xs[:5])).sum(-1),
                               model.head.log_prob(params, torch.as_tensor(xs[:5])))


def test_causal_changing_the_future_never_changes_the_past():
    model = tiny()
    xs = series(30)
    a = Scorer(model, NORM, particles=8, seed=5).score(xs)
    ys = xs.copy()
    ys[17:] += 100.0 * np.random.default_rng(9).normal(size=ys[17:].shape)
    b = Scorer(model, NORM, particles=8, seed=5).score(ys)
    np.testing.assert_array_equal(a.score[:17], b.score[:17])
    np.testing.assert_array_equal(a.shares[:17], b.shares[:17])
    assert not np.allclose(a.score[17:], b.score[17:])


@pytest.mark.parametrize("preset,why", [("srnn-gauss", "smoothing"), ("dkf-gauss", "ST-R"),
                                        ("rvae-causal-gauss", "x_{t:T}"), ("rvae-gauss", "non-causal"),
                                        ("dsae-gauss", "static v")])
def test_models_whose_posterior_reads_later_steps_are_refused(preset, why, tmp_path, capsys):
    """Step by step, q(z_t | .) would see only x_t: not the proposal the model was trained
    with. Refused in the API and in one line through the CLI (exit 2), with the reason."""
    from vrnn.errors import ConfigError
    with pytest.raises(ConfigError, match=why):
        Scorer(tiny(preset), None)
    ckpt = save_checkpoint(tmp_path / "m.ckpt", tiny(preset))
    np.savetxt(tmp_path / "x.csv", series(5), delimiter=",")
    assert main(["score", str(ckpt), "--data", str(tmp_path / "x.csv"), "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and why in err and "step-by-step" in err, err
    assert not (tmp_path / "s.csv").exists()


def test_restart_in_two_halves_equals_one_pass(tmp_path):
    model = tiny()
    xs = series(40)
    one = Scorer(model, NORM, particles=8, seed=2).score(xs)
    first = Scorer(model, NORM, particles=8, seed=2)
    a = first.score(xs[:23])
    first.save(tmp_path / "state.pt")
    second = Scorer(model, NORM, particles=8, seed=2)
    second.restore(tmp_path / "state.pt")
    b = second.score(xs[23:])
    np.testing.assert_array_equal(np.r_[a.score, b.score], one.score)
    # state size does not grow with the stream
    sd1, sd2 = first.state_dict(), second.state_dict()
    assert [t.shape for t in sd1["state"]] == [t.shape for t in sd2["state"]]


def test_restore_refuses_another_model_or_options(tmp_path):
    from vrnn.errors import ConfigError
    sc = Scorer(tiny(), NORM, particles=4)
    sc.update(series(1)[0])
    sc.save(tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="another model"):
        Scorer(tiny(h_dim=6), NORM, particles=4).restore(tmp_path / "s.pt")
    with pytest.raises(ConfigError, match="particles"):
        Scorer(tiny(), NORM, particles=5).restore(tmp_path / "s.pt")


# ------------------------------------------------------------------ thresholds
def test_pot_recovers_tail_quantiles_of_known_distributions():
    rng = np.random.default_rng(0)
    q = 1e-4
    expo = rng.exponential(size=50_000)
    th = thresholds.pot(expo, risk=q, level=0.98)
    assert th["threshold"] == pytest.approx(-math.log(q), rel=0.08)   # 9.21
    assert abs(th["gamma"]) < 0.1
    pareto = rng.pareto(3.0, size=50_000)                               # Lomax, tail index 1/3
    th = thresholds.pot(pareto, risk=q, level=0.98)
    assert th["threshold"] == pytest.approx(q ** (-1 / 3) - 1, rel=0.2)  # 20.54
    assert th["gamma"] == pytest.approx(1 / 3, abs=0.12)
    assert thresholds.quantile(expo, 1e-2)["threshold"] == pytest.approx(-math.log(1e-2), rel=0.05)


def test_pot_refuses_too_few_peaks():
    from vrnn.errors import DataError
    with pytest.raises(DataError, match="at least"):
        thresholds.pot(np.arange(100.0), risk=1e-3, level=0.98)


# ---------------------------------------------------------- events and metrics
def test_events_merge_and_name_top_dims():
    s = np.array([0, 5, 6, 0, 0, 7, 0, 0, 0, 9, 0], dtype=float)
    sh = np.zeros((11, 3))
    sh[1:3, 2] = 4.0
    sh[5, 0] = 9.0
    sh[9, 1] = 1.0
    ev = detection.events(s, 1.0, sh, ["a", "b", "c"], gap=0, top=1)
    assert [(e["start"], e["end"]) for e in ev] == [(1, 2), (5, 5), (9, 9)]
    assert [e["top_dims"] for e in ev] == [["c"], ["a"], ["b"]]
    ev = detection.events(s, 1.0, sh, ["a", "b", "c"], gap=2, top=2)
    assert [(e["start"], e["end"], e["peak_step"], e["flagged"]) for e in ev] == [(1, 5, 5, 3), (9, 9, 9, 1)]
    assert ev[0]["top_dims"] == ["a", "c"]
    assert detection.events(np.zeros(5), 1.0) == []


def test_metrics_on_handmade_labels():
    y = np.array([0, 1, 1, 1, 0, 0, 1, 1, 0, 0], dtype=bool)
    p = np.array([0, 0, 1, 0, 0, 1, 0, 0, 0, 0], dtype=bool)
    r = detection.prf(p, y)
    assert (r["tp"], r["fp"], r["fn"]) == (1, 1, 4)
    assert r["precision"] == 0.5 and r["recall"] == 0.2 and r["f1"] == pytest.approx(2 * 0.1 / 0.7)
    pa = detection.point_adjust(p, y)
    assert pa.tolist() == [0, 1, 1, 1, 0, 1, 0, 0, 0, 0]
    r = detection.prf(pa, y)
    assert (r["precision"], r["recall"]) == (0.75, 0.6)
    # edge cases: nothing flagged, nothing labelled, everything anomalous
    none = detection.prf(np.zeros(10, bool), y)
    assert none["precision"] is None and none["recall"] == 0.0 and none["f1"] is None
    assert detection.prf(p, np.zeros(10, bool))["recall"] is None
    assert detection.average_precision(np.arange(10.0), np.zeros(10, bool)) is None
    everything = np.ones(10, bool)
    assert detection.prf(everything, everything)["f1"] == 1.0
    assert detection.average_precision(np.random.default_rng(0).random(10), everything) == pytest.approx(1.0)
    # AUC-PR: a perfect ranking is 1, ties are taken together
    assert detection.average_precision(y.astype(float), y) == 1.0
    assert detection.average_precision(np.ones(10), y) == pytest.approx(y.mean())
    s = np.array([0.1, 0.9, 0.8, 0.2, 0.3, 0.7, 0.05, 0.6, 0.0, 0.0])
    # ranks: 0.9 (1), 0.8 (1), 0.7 (0), 0.6 (1), 0.3 (0), 0.2 (1), 0.1 (0), 0.05 (1)
    ap = (1 + 1 + 3 / 4 + 4 / 6 + 5 / 8) / 5
    assert detection.average_precision(s, y) == pytest.approx(ap)
    best = detection.best_f1(s, y)
    assert best["f1"] == pytest.approx(detection.prf(s > best["threshold"], y)["f1"])
    assert best["f1"] >= detection.prf(s > 0.5, y)["f1"]


def test_random_scores_reach_high_point_adjusted_f1():
    rng = np.random.default_rng(0)
    y = np.zeros(5000, bool)
    for a in range(100, 5000, 500):
        y[a:a + 100] = True          # long segments, as in SMD
    s = rng.random(5000)
    pred = s > np.quantile(s, 0.95)
    assert detection.prf(pred, y)["f1"] < 0.2
    assert detection.prf(detection.point_adjust(pred, y), y)["f1"] > 0.7


def test_hit_rate_and_interpretation_file(tmp_path):
    f = tmp_path / "i.txt"
    f.write_text("2-5:1,3\n7-9:2\n")
    causes = detection.read_interpretation(f)
    assert causes == {(2, 4): [0, 2], (7, 8): [1]}
    shares = np.zeros((10, 3))
    shares[:, 0] = 3.0
    shares[:, 1] = 2.0
    pred = np.zeros(10, bool)
    pred[[3, 4, 7]] = True
    h = detection.hit_rate(shares, pred, causes, 100)   # top-2 at 3, 4: {0, 1} -> 1/2; top-1 at 7: {0} -> 0
    assert h["hit_rate"] == pytest.approx((0.5 + 0.5 + 0.0) / 3) and h["segments_found"] == 2
    h = detection.hit_rate(shares, pred, causes, 150)   # top-3 at 3, 4 -> 1; top-1 at 7 -> 0
    assert h["hit_rate"] == pytest.approx(2 / 3)
    assert detection.hit_rate(shares, np.zeros(10, bool), causes)["hit_rate"] is None


# ------------------------------------------------------------------ streaming
def _csv(xs, header=True):
    head = "cpu,mem,disk\n" if header else ""
    return head + "".join(",".join(repr(float(v)) for v in r) + "\n" for r in xs)


def test_stream_equals_batch_and_names_columns():
    model = tiny()
    xs = series(25)
    batch = Scorer(model, NORM, particles=8).score(xs)
    out = io.StringIO()
    assert stream(Scorer(model, NORM, particles=8), io.StringIO(_csv(xs)), out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("line,t,score,rest,share_cpu,share_mem,share_disk")
    got = np.array([[float(c) for c in ln.split(",")] for ln in lines[1:]])
    np.testing.assert_array_equal(got[:, 0], np.arange(2, 27))          # input line numbers
    np.testing.assert_array_equal(got[:, 2], batch.score)
    np.testing.assert_array_equal(got[:, 4:], batch.shares)
    # JSON lines in, JSON lines out: the same scores
    js = "".join(json.dumps(dict(zip(["cpu", "mem", "disk"], map(float, r)))) + "\n" for r in xs)
    out = io.StringIO()
    stream(Scorer(model, NORM, particles=8), io.StringIO(js), out, StreamOptions(output="json", top=1))
    recs = [json.loads(ln) for ln in out.getvalue().splitlines()]
    np.testing.assert_array_equal([r["score"] for r in recs], batch.score)
    assert all(len(r["top"]) == 1 and r["top"][0][0] in ("cpu", "mem", "disk") for r in recs)


def test_stream_bad_rows_skip_or_stop_never_shift(tmp_path):
    model = tiny()
    xs = series(6)
    text = _csv(xs[:2]) + "1,2\n" + "1,oops,3\n" + "[1, 2, NaN]\n" + _csv(xs[2:], header=False)
    out, err = io.StringIO(), io.StringIO()
    assert stream(Scorer(model, NORM, particles=4), io.StringIO(text), out, err=err) == 0
    msgs = err.getvalue().splitlines()
    assert [m.split(": ")[2] for m in msgs] == ["line 4", "line 5", "line 6"]
    assert "has 2 values, expected 3" in msgs[0] and "skipped" in msgs[0]
    rows = [ln.split(",") for ln in out.getvalue().splitlines()[1:]]
    assert [r[0] for r in rows] == [str(n) for n in range(2, 11)]         # one line per input row
    assert [r[2] == "" for r in rows] == [False, False, True, True, True, False, False, False, False]
    clean = Scorer(model, NORM, particles=4).score(xs)                    # bad rows never scored
    np.testing.assert_array_equal([float(r[2]) for r in rows if r[2]], clean.score)
    out, err = io.StringIO(), io.StringIO()
    st = stream(Scorer(model, NORM, particles=4), io.StringIO(text), out, StreamOptions(on_bad_row="stop"), err=err)
    assert st == 2 and len(err.getvalue().splitlines()) == 1 and "line 4" in err.getvalue()
    assert len(out.getvalue().splitlines()) == 3                          # header + 2 rows


def test_stream_state_file_restart_continues_exactly(tmp_path):
    model = tiny()
    xs = series(30)
    path = tmp_path / "rows.csv"
    path.write_text(_csv(xs[:12]))
    opts = StreamOptions(state=str(tmp_path / "state.pt"), save_every=5)
    out1 = io.StringIO()
    with open(path) as f:
        stream(Scorer(model, NORM, particles=6), f, out1, opts, str(path))
    with open(path, "a") as f:                                            # the file grows
        f.write(_csv(xs[12:], header=False))
    out2 = io.StringIO()
    with open(path) as f:
        stream(Scorer(model, NORM, particles=6), f, out2, opts, str(path))
    got = [float(ln.split(",")[2]) for ln in out1.getvalue().splitlines()[1:] + out2.getvalue().splitlines()]
    np.testing.assert_array_equal(got, Scorer(model, NORM, particles=6).score(xs).score)


# ------------------------------------------------------------------ the commands
def _one_line(capsys, code, *needles):
    cap = capsys.readouterr()
    assert code == 2, cap
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in cap.err, cap.err
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def test_commands_from_csv_to_alarms(tmp_path, capsys):
    model = tiny()
    ckpt = save_checkpoint(tmp_path / "m.ckpt", model)
    normal = series(200, seed=3)
    (tmp_path / "normal.csv").write_text(_csv(normal))
    live = series(60, seed=4)
    live[30:34, 1] += 8.0                                               # a burst on "mem"
    (tmp_path / "live.csv").write_text(_csv(live))
    assert main(["score", str(ckpt), "--data", str(tmp_path / "normal.csv"), "--out",
                 str(tmp_path / "normal_scores.csv"), "--particles", "8"]) == 0
    assert main(["threshold", str(tmp_path / "normal_scores.csv"), "--out", str(tmp_path / "th.json"),
                 "--method", "quantile", "--risk", "0.01", "--skip", "5"]) == 0
    assert main(["score", str(ckpt), "--data", str(tmp_path / "live.csv"), "--out",
                 str(tmp_path / "live_scores.csv"), "--particles", "8"]) == 0
    s, sh, names = read_scores(tmp_path / "live_scores.csv")
    assert s.shape == (60,) and sh.shape == (60, 3) and names == ["cpu", "mem", "disk"]
    assert main(["detect", str(tmp_path / "live_scores.csv"), "--threshold", str(tmp_path / "th.json"),
                 "--out", str(tmp_path / "ev.json"), "--top", "1"]) == 0
    ev = json.loads((tmp_path / "ev.json").read_text())
    hit = [e for e in ev if e["start"] <= 33 and e["end"] >= 30]
    assert hit and hit[0]["top_dims"] == ["mem"]
    # the model runs in float32 from the checkpoint, scored in float64: same as the API
    from vrnn.monitor import load_scorer
    from vrnn.scoring import ScoreOptions
    np.testing.assert_array_equal(s, load_scorer(ckpt, ScoreOptions(particles=8)).score(live).score)


def test_command_errors_are_one_line(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.ckpt", tiny())
    (tmp_path / "wide.csv").write_text("1,2,3,4\n5,6,7,8\n")
    _one_line(capsys, main(["score", str(ckpt), "--data", str(tmp_path / "wide.csv"), "--out",
                            str(tmp_path / "o.csv")]), "wide.csv", "line 1", "expected 3")
    assert not (tmp_path / "o.csv").exists()
    (tmp_path / "bad.csv").write_text("1,2,3\n4,x,6\n")
    _one_line(capsys, main(["score", str(ckpt), "--data", str(tmp_path / "bad.csv"), "--out",
                            str(tmp_path / "o.csv")]), "bad.csv", "line 2")
    _one_line(capsys, main(["score", str(ckpt), "--data", str(tmp_path / "nope.csv"), "--out",
                            str(tmp_path / "o.csv")]), "nope.csv")
    _one_line(capsys, main(["score", str(ckpt), "--data", str(tmp_path / "bad.csv"), "--out",
                            str(tmp_path / "o.csv"), "--particles", "0"]), "--particles")
    _one_line(capsys, main(["threshold", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "t.json")]),
              "bad.csv", "score")
    _one_line(capsys, main(["detect", str(tmp_path / "bad.csv"), "--threshold", str(tmp_path / "t.json")]),
              "bad.csv")
    _one_line(capsys, main(["stream", str(ckpt), "--follow"]), "--follow")
    (tmp_path / "state.pt").write_text("not a state")
    _one_line(capsys, main(["stream", str(ckpt), "--input", str(tmp_path / "wide.csv"), "--state",
                            str(tmp_path / "state.pt")]), "state.pt")


def test_stream_command_follow_and_wrong_width(tmp_path, capsys):
    ckpt = save_checkpoint(tmp_path / "m.ckpt", tiny())
    f = tmp_path / "rows.csv"
    f.write_text("1,2,3\n4,5\n7,8,9\n10,11,12")                          # last line: no newline yet
    code = main(["stream", str(ckpt), "--input", str(f), "--follow", "--idle-timeout", "0.3",
                 "--output", "json", "--on-bad-row", "stop"])
    cap = capsys.readouterr()
    assert code == 2 and "Traceback" not in cap.err
    assert cap.err.strip().splitlines() == [f"vrnn stream: {f}: line 2: has 2 values, expected 3; stopping"]
    assert [json.loads(ln)["line"] for ln in cap.out.splitlines()] == [1]


def test_readme_walkthrough_windows_train_score_threshold_stream(tmp_path, capsys):
    """From one CSV of normal operation to alarms, with the guide's commands (tiny model)."""
    rng = np.random.default_rng(0)
    t = np.arange(700)
    normal = np.c_[np.sin(t / 10), np.cos(t / 7), 0.1 * rng.normal(size=700)] * 3 + 10
    (tmp_path / "normal.csv").write_text(_csv(normal))
    assert main(["windows", str(tmp_path / "normal.csv"), "--length", "50", "--holdout", "0.2", "--out",
                 str(tmp_path / "w"), "--holdout-out", str(tmp_path / "holdout.csv")]) == 0
    assert len(list((tmp_path / "w").glob("*.npy"))) == 11
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps({"model": {"h_dim": 8, "z_dim": 2, "phi_x_dim": 8, "phi_z_dim": 8,
                                         "enc_dim": 8, "prior_dim": 8, "dec_dim": 8}}))
    assert main(["--threads", "1", "train", "--data", str(tmp_path / "w"), "--model", "vrnn-gauss", "--out",
                 str(tmp_path / "run"), "--max-epochs", "1", "--batch-size", "4", "--config", str(cfg),
                 "--no-progress"]) == 0
    ckpt = str(tmp_path / "run" / "best.ckpt")
    assert main(["score", ckpt, "--data", str(tmp_path / "holdout.csv"), "--out", str(tmp_path / "h.csv"),
                 "--particles", "4"]) == 0
    assert main(["threshold", str(tmp_path / "h.csv"), "--out", str(tmp_path / "th.json"), "--method",
                 "quantile", "--risk", "0.02"]) == 0
    capsys.readouterr()
    live = tmp_path / "live.csv"
    live.write_text(_csv(normal[:20]).replace("\n10", "\n99", 1))
    assert main(["stream", ckpt, "--input", str(live), "--threshold", str(tmp_path / "th.json"),
                 "--output", "json", "--particles", "4"]) == 0
    recs = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(recs) == 20 and all("alarm" in r for r in recs) and recs[0]["alarm"]


def test_the_guides_api_example_runs(tmp_path, monkeypatch):
    from pathlib import Path
    import re
    text = (Path(__file__).resolve().parents[1] / "docs" / "guide" / "scoring.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "docs/guide/scoring.md (the Python API)", "exec"), scope)
    assert scope["step"].shares.shape == (4,) and isinstance(scope["alarm"], bool)
    assert (tmp_path / "scorer.pt").exists() and isinstance(scope["events"], list)
