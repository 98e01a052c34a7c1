"""Correct at the edges (issue 23): numerics and naming, results that looked valid but were
wrong, one-line errors, hangs and silence. One test per item, through the CLI where a user
meets it; tiny models and data made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_cli import TINY, _one_line_error, make_arrays, run, train
from vrnn import VRNNConfig, build
from vrnn.inference import objective
from vrnn.smc import particle_filter


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, config file, run folder) of one tiny VRNN-Gauss trained for 1 epoch."""
    root = tmp_path_factory.mktemp("edges")
    data = make_arrays(root / "arrays")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = root / "run"
    assert train(data, out, cfg, "vrnn-gauss", 1) == 0
    return data, cfg, out


def tiny_model(**kw):
    torch.manual_seed(0)
    return build(VRNNConfig.preset(kw.pop("name", "vrnn-gauss"), x_dim=kw.pop("x_dim", 3), h_dim=8,
                                   z_dim=2, phi_x_dim=8, phi_z_dim=8, enc_dim=8, prior_dim=8,
                                   dec_dim=8, **kw))


# ------------------------------------------------------------------ numerics and naming
def test_fivo_under_warmup_logs_its_tempered_surrogate_not_a_bound(arrays, tiny_config, tmp_path):
    out = tmp_path / "fivo"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 1, "--objective", "fivo", "--particles", 2,
                 "--kl-warmup", 1000) == 0
    lines = (out / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "train/fivo_tempered" in header
    if "train/bound" in header:  # the column may exist, but no value is logged in it
        col = header.index("train/bound")
        assert all(row.split(",")[col] == "" for row in lines[1:])
    model, x = tiny_model(), torch.randn(3, 5, 3)
    assert objective(model, x, bound="fivo", num_samples=2, kl_weight=0.5)[1].tempered
    assert not objective(model, x, bound="fivo", num_samples=2)[1].tempered


def test_autoregressive_density_runs_in_float32_under_bf16_autocast():
    model = tiny_model(x_dim=100, output="ar")
    g = torch.Generator().manual_seed(1)
    params = torch.randn(4, 6, model.head.param_dim, generator=g)
    x = torch.randn(4, 6, 100, generator=g)
    ref = model.head.log_prob(params, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.head.log_prob(params, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


def test_fivo_with_two_particles_resamples_as_fivo_does():
    """The ESS of 2 particles is never below 1 = 0.5 x 2: the rule is ESS <= K/2."""
    model = tiny_model()
    x = 30.0 * torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    f = particle_filter(model, x, particles=2)
    assert bool(f.resampled.any())


def test_free_bits_help_says_where_it_clamps(capsys):
    assert run("train", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "clamped per sequence, step and dimension" in text


def test_latents_names_the_posterior_mean_score_a_plug_in_value(trained, tmp_path):
    data, _, out = trained
    assert run("latents", out / "best.ckpt", "--data", data, "--out", tmp_path / "l.npz") == 0
    lat = np.load(tmp_path / "l.npz")
    assert "plugin_score" in lat.files and "score" not in lat.files
    np.testing.assert_allclose(lat["plugin_score"], lat["log_px"] - lat["kl"], rtol=1e-5, atol=1e-5)


def test_api_refuses_empty_batches_and_negative_weights():
    model, x = tiny_model(), torch.randn(2, 4, 3)
    for bad in (torch.randn(0, 4, 3), torch.randn(2, 0, 3)):
        with pytest.raises(ValueError, match="at least one sequence"):
            model.elbo(bad)
    with pytest.raises(ValueError, match="kl_weight"):
        objective(model, x, kl_weight=-1.0)
    with pytest.raises(ValueError, match="free_bits"):
        objective(model, x, free_bits=-1.0)


# ------------------------------------------------- results that looked valid but were wrong
@pytest.mark.parametrize("output", ["bernoulli", "strokes"])
def test_a_head_that_does_not_fit_the_data_is_refused(arrays, tiny_config, tmp_path, capsys, output):
    assert train(arrays, tmp_path / "r", tiny_config, "vrnn-gauss", 1, "--output", output) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"--output {output}" in err and "bit (0 or 1)" in err
    assert not (tmp_path / "r" / "logs").exists()


def test_a_non_finite_validation_bound_stops_training_with_the_guards_message(tmp_path, tiny_config, capsys):
    from vrnn.data import split
    data = make_arrays(tmp_path / "a")
    files = sorted(data.glob("*.npy"))
    for i in split(len(files), (0.8, 0.1, 0.1), 0)["valid"]:
        np.save(files[i], np.full_like(np.load(files[i]), 1e30))
    assert train(data, tmp_path / "r", tiny_config, "vrnn-gauss", 1) == 2
    err = capsys.readouterr().err
    assert "non-finite validation bound" in err and "Traceback" not in err
    summary = tmp_path / "r" / "summary.json"
    assert not summary.exists() or "Infinity" not in summary.read_text()


def test_a_moved_run_keeps_its_best_checkpoint_on_resume(arrays, tiny_config, tmp_path, monkeypatch):
    from vrnn.train import VRNNModule
    a, b = tmp_path / "a", tmp_path / "b"
    assert train(arrays, a, tiny_config, "vrnn-gauss", 2) == 0
    best = json.loads((a / "summary.json").read_text())["best_valid_bound"]
    epoch = torch.load(a / "best.ckpt", weights_only=True)["epoch"]
    a.rename(b)

    def worse(self, batch, batch_idx):  # every later epoch is far worse
        self.log("valid/bound", -1e9, on_epoch=True, batch_size=batch[0].shape[0])

    monkeypatch.setattr(VRNNModule, "validation_step", worse)
    assert train(arrays, b, tiny_config, "vrnn-gauss", 3, "--resume") == 0
    assert json.loads((b / "summary.json").read_text())["best_valid_bound"] == pytest.approx(best)
    assert torch.load(b / "best.ckpt", weights_only=True)["epoch"] == epoch


def test_resuming_with_another_objective_is_refused(trained, tmp_path, capsys):
    import shutil
    data, cfg, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert train(data, copy, cfg, "vrnn-gauss", 2, "--resume", "--objective", "iwae",
                 "--particles", 2) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--objective" in err and "elbo" in err


def test_the_sampled_kl_trains_and_a_resume_keeps_it(trained, tmp_path, capsys):
    import shutil
    data, cfg, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert train(data, copy, cfg, "vrnn-gauss", 2, "--resume", "--kl-estimator", "sampled") == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--kl-estimator" in err and "analytic" in err
    fresh = tmp_path / "sampled"
    assert train(data, fresh, cfg, "vrnn-gauss", 1, "--kl-estimator", "sampled") == 0
    meta = torch.load(fresh / "last.ckpt", weights_only=True)["vrnn"]
    assert meta["train"]["kl_estimator"] == "sampled"


def _record(model="vrnn-gauss", seed=0, **kw):
    rec = {"table": "paper", "dataset": "lasa", "model": model, "preset": model, "seed": seed,
           "params": 1000, "split": {"seed": 0, "fractions": [0.8, 0.1, 0.1], "data_options": {},
                                     "test_sha1": "abc", "test_sequences": 21},
           "elbo": -10.0, "log_likelihood": -9.0, "log_likelihood_smc": -8.5, "elbo_raw": -1.0,
           "log_likelihood_raw": -0.5, "log_likelihood_smc_raw": -0.4, "exact": False,
           "num_samples": 40, "unit": "nats per sequence", "num_sequences": 21, "num_steps": 500,
           "steps": 100, "epochs": 5, "seconds": 3.0, "converged": True, "stopped": "early",
           "best_valid_bound": -9.5,
           "config": {"model": {}, "train": {"split_seed": 0, "patience": 5, "max_steps": 100,
                                             "batch_size": 16}, "data": {}}}
    rec.update(kw)
    return rec


BAD_RECORDS = {
    "duplicate": ("dup.json", json.dumps(_record())),
    "unknown model": ("x.json", json.dumps(_record(model="vrnn-huge"))),
    "other split": ("x.json", json.dumps(_record(seed=1, split={"seed": 1, "fractions": [0.8, 0.1, 0.1],
                                                                "test_sha1": "def", "test_sequences": 21}))),
    "NaN": ("x.json", json.dumps(_record(seed=1, log_likelihood=float("nan")))),
    "1e400": ("x.json", json.dumps(_record(seed=1)).replace('"elbo": -10.0', '"elbo": 1e400')),
    "truncated": ("x.json", json.dumps(_record(seed=1))[:50]),
    "empty": ("x.json", ""),
    "a list": ("x.json", "[1, 2]"),
    "missing key": ("x.json", json.dumps({k: v for k, v in _record(seed=1).items() if k != "steps"})),
    "string for a number": ("x.json", json.dumps(_record(seed=1, seconds="3"))),
    "not_offered without a reason": ("x.json", json.dumps(_record(seed=1, not_offered={"smc": ""}))),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_report_only_refuses_a_bad_record_naming_its_file(tmp_path, capsys, case):
    folder = tmp_path / "records" / "main" / "lasa"
    folder.mkdir(parents=True)
    (folder / "vrnn-gauss-seed0.json").write_text(json.dumps(_record()))
    name, text = BAD_RECORDS[case]
    (folder / name).write_text(text)
    (tmp_path / "table1.md").write_text("committed")
    assert run("reproduce", "--report-only", "--out", tmp_path) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and name in err and "Traceback" not in err
    assert (tmp_path / "table1.md").read_text() == "committed"


def test_report_only_without_records_keeps_the_tables(tmp_path, capsys):
    (tmp_path / "table1.md").write_text("committed")
    assert run("reproduce", "--report-only", "--out", tmp_path) == 2
    assert "no records" in capsys.readouterr().err
    assert (tmp_path / "table1.md").read_text() == "committed"


def test_a_second_train_on_a_folder_in_use_is_refused(arrays, tiny_config, tmp_path, capsys):
    from vrnn.train import lock_run
    out = tmp_path / "r"
    out.mkdir()
    held = lock_run(out)  # as a first `train` (or an orphan of a killed reproduce) holds it
    try:
        assert train(arrays, out, tiny_config, "vrnn-gauss", 1) == 2
    finally:
        held.close()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "another vrnn train" in err and "pid" in err
    assert not (out / "logs").exists()


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_reproduces_children_die_with_it_even_by_sigkill(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    script = ("import subprocess, sys, time\n"
              "from vrnn.reproduce import CHILD\n"
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], **CHILD)\n"
              "print(p.pid, flush=True)\n"
              "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    child = int(parent.stdout.readline())
    parent.send_signal(signal.SIGKILL)
    parent.wait()

    def alive(pid):
        try:
            with open(f"/proc/{pid}/status") as f:
                return "zombie" not in f.read()
        except FileNotFoundError:
            return False

    deadline = time.time() + 10
    while alive(child) and time.time() < deadline:
        time.sleep(0.1)
    if alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the child outlived its killed parent")


def test_evaluate_scores_do_not_depend_on_the_memory_cap(trained, capsys):
    data, _, out = trained
    got = []
    for cap in ("1024", "0.002"):  # one pass, or about one sequence per pass
        assert run("evaluate", out / "best.ckpt", "--data", data, "--split", "all", "--estimator", "all",
                   "--samples", 6, "--seed", 3, "--max-memory", cap, "--json") == 0
        got.append(json.loads(capsys.readouterr().out)["estimators"])
    for name in ("elbo", "is", "smc"):
        assert got[0][name]["per_sequence"] == pytest.approx(got[1][name]["per_sequence"], rel=1e-5)


def test_latents_smc_refilters_in_float64_with_a_notice(trained, tmp_path, capsys):
    data, _, out = trained
    far = make_arrays(tmp_path / "far", n=3, offset=1e19, scale=1e18)
    assert run("latents", out / "best.ckpt", "--data", far, "--smc", 4, "--resample", "always",
               "--out", tmp_path / "l.npz") == 0
    assert "float64" in capsys.readouterr().err
    lat = np.load(tmp_path / "l.npz")
    assert np.isfinite(lat["ess"]).all() and np.isfinite(lat["log_z_smc"]).all()
    assert lat["resampled"][lat["mask"] > 0].sum() > 0


def test_a_nearly_constant_dimension_gets_a_notice(tmp_path, tiny_config, capsys):
    data = make_arrays(tmp_path / "a")
    for p in data.glob("*.npy"):
        x = np.load(p)
        x[:, 1] = 7.0
        np.save(p, x)
    assert train(data, tmp_path / "r", tiny_config, "vrnn-gauss", 1) == 0
    assert "dimension(s) [1]" in capsys.readouterr().err


# ------------------------------------------------------ tracebacks where one line belongs
@pytest.mark.parametrize("extra,needle", [
    (("--h-dim", "100000000"), "--h-dim"),
    (("--objective", "fivo", "--particles", "100000000"), "--particles"),
])
def test_sizes_that_cannot_be_allocated_are_refused_before_allocating(arrays, tiny_config, tmp_path, capsys,
                                                                      extra, needle):
    _one_line_error(capsys, train(arrays, tmp_path / "r", tiny_config, "vrnn-gauss", 1, *extra), needle, "GiB")
    assert not (tmp_path / "r" / "logs").exists()


def test_a_config_size_and_a_sample_count_that_cannot_be_allocated(arrays, trained, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {"n_components": 100000000}}))
    _one_line_error(capsys, train(arrays, tmp_path / "r", cfg, "vrnn-gmm", 1), "n_components", "GiB")
    _, _, out = trained
    _one_line_error(capsys, run("sample", out / "best.ckpt", "--num", 1000000000, "--out", tmp_path / "s"), "--num")


def test_tbptt_longer_than_every_sequence_does_not_pad_to_its_length(arrays, tiny_config, tmp_path, monkeypatch):
    from vrnn.train import VRNNModule
    seen, real = [], VRNNModule._objective

    def spy(self, x, *args, **kw):
        seen.append(x.shape[1])
        return real(self, x, *args, **kw)

    monkeypatch.setattr(VRNNModule, "_objective", spy)
    assert train(arrays, tmp_path / "r", tiny_config, "vrnn-gauss", 1, "--tbptt", 100000) == 0
    assert seen and max(seen) <= 14  # the longest sequence of the fixture


@pytest.mark.parametrize("value", ["abc", "0", "-2", "1.5"])
def test_a_bad_vrnn_threads_is_one_line(monkeypatch, capsys, value):
    monkeypatch.setenv("VRNN_THREADS", value)
    _one_line_error(capsys, main_without_threads("data", "list"), "$VRNN_THREADS")


def main_without_threads(*argv):
    from vrnn.cli import main
    return main(list(argv))


def test_torch_save_failing_on_a_full_disk_is_one_line_and_leaves_no_logs(arrays, tiny_config, tmp_path, capsys,
                                                                         monkeypatch):
    def full(obj, f, *a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", full)
    _one_line_error(capsys, train(arrays, tmp_path / "r", tiny_config, "vrnn-gauss", 1), ".ckpt", "cannot write")
    assert not (tmp_path / "r" / "logs").exists()


def test_a_full_disk_while_sampling_names_the_file(trained, tmp_path, capsys, monkeypatch):
    import errno
    _, _, out = trained

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", full)
    _one_line_error(capsys, run("sample", out / "best.ckpt", "--num", 2, "--steps", 3, "--out", tmp_path / "s"),
                    "No space left on device", "sample_000.npy")


@pytest.mark.parametrize("case", ["normaliser length", "split_seed -1", "split_seed text"])
def test_broken_checkpoint_descriptions_are_one_line(trained, tmp_path, capsys, case):
    data, _, out = trained
    bad = torch.load(out / "best.ckpt", weights_only=True)
    if case == "normaliser length":
        bad["vrnn"]["normalizer"]["mean"] = [0.0] * 5
        bad["vrnn"]["normalizer"]["std"] = [1.0] * 5
    else:
        bad["vrnn"]["data"]["split_seed"] = -1 if case == "split_seed -1" else "zero"
    p = tmp_path / "bad.ckpt"
    torch.save(bad, p)
    _one_line_error(capsys, run("evaluate", p, "--data", data), p)


def test_resume_problems_are_one_line(trained, tmp_path, capsys):
    import shutil
    data, cfg, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    _ = train(data, copy, cfg, "vrnn-gauss", 3, "--resume")  # 3 epochs done
    capsys.readouterr()
    _one_line_error(capsys, train(data, copy, cfg, "vrnn-gauss", 1, "--resume"), "--max-epochs 1", "3 epochs")
    for text in ("{not json", "[1, 2]"):
        (copy / "summary.json").write_text(text)
        _one_line_error(capsys, train(data, copy, cfg, "vrnn-gauss", 4, "--resume"), "summary.json")


def test_duplicate_binary_dims_in_a_config_is_one_line(arrays, tmp_path, capsys):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"model": {**TINY["model"], "output": "ar", "binary_dims": [0, 0]}}))
    _one_line_error(capsys, train(arrays, tmp_path / "r", cfg, "vrnn-gauss", 1), "binary_dims")
    with pytest.raises(Exception, match="twice"):
        VRNNConfig.preset("vrnn-gauss", x_dim=3, output="ar", binary_dims=(0, 0))


def test_demo_with_an_rnn_row_prints_its_exact_score(tmp_path, capsys):
    assert run("demo", "--out", tmp_path / "demo", "--model", "rnn-gauss", "--max-epochs", 1) == 0
    assert "(exact)" in capsys.readouterr().out


# ------------------------------------------------------------------- hangs and silence
@pytest.mark.parametrize("signame,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_stops_training_cleanly(arrays, tiny_config, tmp_path, capsys, monkeypatch, signame, code):
    import os
    import signal
    from vrnn.train import VRNNModule
    real = VRNNModule.training_step

    def step(self, batch, batch_idx):  # 3 batches an epoch: the signal comes in the second epoch
        if self.global_step == 4:
            os.kill(os.getpid(), getattr(signal, signame))
        return real(self, batch, batch_idx)

    monkeypatch.setattr(VRNNModule, "training_step", step)
    out = tmp_path / "r"
    # as in a foreground shell: a suite started in the background (`make test &` in a script)
    # inherits SIGINT ignored, and training rightly leaves an ignored signal ignored
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        assert train(arrays, out, tiny_config, "vrnn-gauss", 5) == code
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, before)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"interrupted by {signame}" in err[0] and "--resume" in err[0]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "interrupted" and summary["epochs"] >= 1
    assert torch.load(out / "last.ckpt", weights_only=True)["epoch"] == 0  # the whole first epoch
    monkeypatch.setattr(VRNNModule, "training_step", real)
    assert train(arrays, out, tiny_config, "vrnn-gauss", 3, "--resume") == 0
    assert json.loads((out / "summary.json").read_text())["stopped"] == "epochs"


def test_a_named_pipe_in_a_data_folder_is_skipped(tmp_path, capsys):
    import os
    data = make_arrays(tmp_path / "a", n=4)
    os.mkfifo(data / "pipe.npy")
    assert run("data", "info", data) == 0  # used to block forever reading the pipe
    assert "4" in capsys.readouterr().out


def test_num_nodes_without_a_cluster_is_one_line(arrays, tiny_config, tmp_path, capsys, monkeypatch):
    from vrnn.train import CLUSTER_VARIABLES
    for v in CLUSTER_VARIABLES:
        monkeypatch.delenv(v, raising=False)
    _one_line_error(capsys, train(arrays, tmp_path / "r", tiny_config, "vrnn-gauss", 1, "--num-nodes", 2),
                    "--num-nodes 2", "MASTER_ADDR")


def test_reproduce_plan_downloads_and_parses_nothing(tmp_path, capsys, monkeypatch):
    import importlib
    import vrnn.data
    pianoroll = importlib.import_module("vrnn.data.pianoroll")
    monkeypatch.setenv("VRNN_CACHE", str(tmp_path / "cache"))

    def forbidden(*a, **k):
        raise AssertionError("--plan must not download or parse")

    monkeypatch.setattr(vrnn.data, "fetch", forbidden)
    monkeypatch.setattr(pianoroll, "parse_chorales", forbidden)
    monkeypatch.setattr(pianoroll, "parse_folk", forbidden)
    assert run("reproduce", "--plan", "--datasets", "asterisk-en,chorales", "--out", tmp_path / "o") == 0
    out = capsys.readouterr().out
    assert "asterisk-en: left out of the plan" in out and "chorales: left out of the plan" in out
    _one_line_error(capsys, run("reproduce", "--plan", "--datasets", "", "--out", tmp_path / "o"), "--datasets")


# ------------------------------------------------------------ what a new user stumbles on
def test_no_progress_bar_when_stderr_is_not_a_terminal(arrays, tiny_config, tmp_path, capsys):
    assert run("train", "--data", arrays, "--model", "vrnn-gauss", "--out", tmp_path / "r", "--max-epochs", 1,
               "--batch-size", 4, "--config", tiny_config) == 0
    captured = capsys.readouterr()
    assert "it/s" not in captured.err and "Epoch 0" not in captured.err
    assert "1 epoch," in captured.out and "s training" in captured.out


@pytest.mark.parametrize("command,needle", [("train", "no progress bar"), ("evaluate", "a checkpoint written"),
                                            ("latents", "--resampler")])
def test_every_argument_has_help(capsys, command, needle):
    assert run(command, "--help") == 0
    assert needle in capsys.readouterr().out


def test_evaluate_json_names_the_estimator_it_ran(trained, capsys):
    data, _, out = trained
    assert run("evaluate", out / "best.ckpt", "--data", data, "--estimator", "all", "--samples", 3, "--json") == 0
    assert json.loads(capsys.readouterr().out)["estimator"] == "all"


def test_huge_scores_are_printed_short():
    from vrnn.cli import _number
    assert _number(-1.234e69) == "-1.234e+69" and _number(-12.345) == "-12.35" and _number(None).startswith("n/a")


def test_resuming_a_finished_run_prints_no_nan_and_an_rnn_objective_is_explained(trained, tmp_path, capsys):
    import shutil
    data, cfg, out = trained
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert train(data, copy, cfg, "vrnn-gauss", 1, "--resume") == 0
    assert "nan" not in capsys.readouterr().out
    assert train(data, tmp_path / "rnn", cfg, "rnn-gauss", 1, "--objective", "fivo", "--particles", 2) == 0
    assert "no latent variable" in capsys.readouterr().err


def test_data_info_says_what_a_speech_duration_counts(tmp_path):
    import soundfile as sf
    folder = tmp_path / "wav"
    folder.mkdir()
    rng = np.random.default_rng(0)
    sf.write(folder / "a.wav", (0.3 * rng.standard_normal(int(16000 * 1.3))).astype(np.float32), 16000)
    from vrnn.data import describe
    info = describe(folder, chunk_seconds=0.5)  # the fetched corpora are chunked so
    assert info["duration_seconds"] == 1.0 and "remainder" in info["duration_counts"]


def test_a_long_sample_says_how_far_it_is(trained, tmp_path, capsys, monkeypatch):
    import vrnn.generate as generate
    clock = iter(range(0, 10 ** 6, 11))  # 11 s pass between two looks at the clock
    monkeypatch.setattr(generate, "monotonic", lambda: next(clock))
    _, _, out = trained
    assert run("sample", out / "best.ckpt", "--num", 1, "--steps", 128, "--out", tmp_path / "s") == 0
    assert "64 of 128 steps" in capsys.readouterr().err


def test_nodes_that_never_join_end_in_one_line(arrays, tiny_config, tmp_path, capsys, monkeypatch):
    import lightning as L
    import torch.distributed as dist
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29999")

    def never(self, *a, **k):  # what torch.distributed raises after its 30-minute wait
        raise dist.DistStoreError("Timed out after 1801 seconds waiting for clients. 1/2 clients joined.")

    monkeypatch.setattr(L.Trainer, "fit", never)
    code = train(arrays, tmp_path / "r", tiny_config, "vrnn-gauss", 1, "--num-nodes", 2)
    captured = capsys.readouterr()
    assert code == 2 and "Traceback" not in captured.err
    assert "waiting for 2 nodes" in captured.err and "did not all join at 127.0.0.1:29999" in captured.err
    assert not (tmp_path / "r" / "logs").exists()


def test_kl_warmup_schedule_and_its_start():
    from vrnn.train import kl_weight_at
    assert [kl_weight_at(s, 0) for s in (0, 50)] == [1.0, 1.0]
    assert [kl_weight_at(s, 100) for s in (0, 49, 99, 500)] == pytest.approx([0.01, 0.5, 1.0, 1.0])
    assert [kl_weight_at(s, 100, 0.2) for s in (0, 49, 99, 500)] == pytest.approx([0.208, 0.6, 1.0, 1.0])


def test_early_stopping_waits_for_the_kl_warmup_to_end(arrays, tiny_config, tmp_path):
    """During the warm-up the validation bound (KL weight 1) is not what is optimised and
    may fall: patience counts only after it (a VRNN warmed up over the whole 4,000-step cap
    once stopped, 'converged', after 390 steps)."""
    out = tmp_path / "warm"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 10, "--kl-warmup", 24, "--patience", 1,
                 "--lr", 0.03) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] >= 24, summary
