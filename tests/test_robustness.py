"""Correct under every option, every input and every way of running: the training wiring
(truncated BPTT weighting, DDP schedules, precision, noise per process, resume, exit
status), every bad value as one line and exit 2, and the Python API's input checks."""

from __future__ import annotations

import errno
import json

import numpy as np
import pytest
import torch

from test_cli import TINY, _one_line_error, make_arrays, run, train
from test_ddp import _train as _train_subprocess
from vrnn import VRNNConfig, build
from vrnn.errors import ConfigError


# ------------------------------------------------------------ truncated BPTT, DDP
def test_tbptt_chunks_are_normalised_by_the_whole_batch(tmp_path, tiny_config, monkeypatch):
    """Every chunk's loss is divided by the batch's real steps (not the chunk's own), so a
    lone long sequence's tail weighs no more per step than any other step."""
    import vrnn.train as train_mod
    data = tmp_path / "uneven"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, t in enumerate([4] * 6 + [30] * 6):  # long sequences among short ones
        np.save(data / f"s{i:02d}.npy", rng.normal(size=(t, 3)).astype(np.float32))
    seen = []
    real = train_mod.objective

    def spy(model, x, mask=None, state=None, normaliser=None, **kw):
        loss, tr = real(model, x, mask, state, normaliser=normaliser, **kw)
        if torch.is_grad_enabled():
            seen.append((float(normaliser), float(mask.sum()), float(loss.detach()),
                         float(-(tr.log_px - tr.kl).sum().detach())))
        return loss, tr

    monkeypatch.setattr(train_mod, "objective", spy)
    cfg = dict(TINY, train={"bucket": False})
    (tmp_path / "c.json").write_text(json.dumps(cfg))
    assert train(data, tmp_path / "run", tmp_path / "c.json", "rnn-gauss", 1, "--tbptt", 5,
                 "--batch-size", 16) == 0
    # one batch (9 train sequences, the long one among them or not): chunks of 5 steps
    batch_steps = {n for n, *_ in seen}
    assert len(batch_steps) == 1
    (n,) = batch_steps
    assert n == sum(s for _, s, _, _ in seen)  # every chunk divides by the batch's total
    for _, steps, loss, neg_bound in seen:
        np.testing.assert_allclose(loss, neg_bound / n, rtol=1e-5)  # not neg_bound / steps


def test_ddp_with_tbptt_and_unequal_lengths_matches_one_process(tmp_path):
    """2 processes with truncated BPTT on sequences of very different lengths run the same
    chunk schedule and normalisation as one process on the same global batch."""
    data = make_arrays(tmp_path / "arrays", n=20, T=(5, 40))
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(TINY, train={"bucket": False})))
    one = _train_subprocess(data, tmp_path / "one", config, batch=8, devices=1, extra=("--tbptt", "7"))
    two = _train_subprocess(data, tmp_path / "two", config, batch=4, devices=2, extra=("--tbptt", "7"))
    assert one["global_step"] == two["global_step"] > 4  # several chunk steps per batch
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_noise_differs_between_processes_and_survives_a_resume():
    from vrnn.train import noise_seed
    seeds = {noise_seed(0, rank, step) for rank in range(4) for step in range(50)}
    assert len(seeds) == 200  # every (process, step) draws its own noise
    assert noise_seed(3, 1, 17) == noise_seed(3, 1, 17)  # the same after a resume
    assert noise_seed(0, 0, 5, phase=1) != noise_seed(0, 0, 5)  # validation apart from training


def test_sixteen_bit_precision_is_refused(arrays, tiny_config, tmp_path, capsys):
    line = _one_line_error(capsys, train(arrays, tmp_path / "o", tiny_config, "vrnn-gauss", 1,
                                         "--precision", "16-mixed"), "--precision", "16-mixed")
    assert "bf16-mixed" in line
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------ runs and files
def test_resume_keeps_and_appends_the_logs(arrays, tiny_config, tmp_path):
    out = tmp_path / "run"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 2) == 0
    csv = out / "logs" / "csv" / "metrics.csv"
    first = csv.read_text().splitlines()
    assert train(arrays, out, tiny_config, "vrnn-gauss", 3, "--resume") == 0
    both = csv.read_text().splitlines()
    assert both[:len(first)] == first and len(both) > len(first)
    epochs = {row.split(",")[0] for row in both[1:]}
    assert epochs == {"0", "1", "2"}
    # a resume with nothing left to do keeps everything
    assert train(arrays, out, tiny_config, "vrnn-gauss", 3, "--resume") == 0
    assert csv.read_text().splitlines() == both


def test_a_folder_holding_only_best_ckpt_is_not_overwritten(arrays, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 1) == 0
    (out / "last.ckpt").unlink()
    import shutil
    shutil.rmtree(out / "logs")
    before = (out / "best.ckpt").read_bytes()
    capsys.readouterr()
    _one_line_error(capsys, train(arrays, out, tiny_config, "vrnn-gauss", 1), out, "best.ckpt")
    assert (out / "best.ckpt").read_bytes() == before


def test_full_disk_is_one_line(arrays, tiny_config, tmp_path, capsys, monkeypatch):
    import vrnn.checkpoint as ck

    def full(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ck, "atomic_save", full)
    _one_line_error(capsys, train(arrays, tmp_path / "o", tiny_config, "vrnn-gauss", 1),
                    "No space left on device", ".ckpt")


def test_unwritable_out_is_one_line(arrays, tiny_config, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _one_line_error(capsys, train(arrays, blocker / "sub", tiny_config, "vrnn-gauss", 1), "file")
    assert blocker.read_text() == "x"


def test_checkpoint_descriptions_are_checked(arrays, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 1) == 0
    capsys.readouterr()
    c = torch.load(out / "last.ckpt", weights_only=True)
    for name, change in (("list", lambda d: d.__setitem__("vrnn", [1, 2])),
                         ("nokind", lambda d: d["vrnn"]["data"].pop("kind"))):
        bad = torch.load(out / "last.ckpt", weights_only=True)
        change(bad)
        p = tmp_path / f"{name}.ckpt"
        torch.save(bad, p)
        _one_line_error(capsys, run("sample", p, "--out", tmp_path / "s"), p)
        _one_line_error(capsys, run("evaluate", p, "--data", arrays), p)
    assert c["vrnn"]["data"]["kind"] == "array"


# --------------------------------------------------------------- bad values, exit 2
BAD_TRAIN = [
    (("--batch-size", "0"), "--batch-size"), (("--batch-size", "-3"), "--batch-size"),
    (("--lr", "-1"), "--lr"), (("--lr", "nan"), "--lr"), (("--lr", "fast"), "--lr"),
    (("--precision", "nonsense"), "--precision"), (("--devices", "0"), "--devices"),
    (("--num-nodes", "0"), "--num-nodes"), (("--kl-warmup", "-5"), "--kl-warmup"),
    (("--max-epochs", "0"), "--max-epochs"), (("--max-time", "0"), "--max-time"),
    (("--limit-train-batches", "0"), "--limit-train-batches"), (("--tbptt", "0"), "--tbptt"),
    (("--particles", "0"), "--particles"), (("--objective", "vae"), "--objective"),
    (("--free-bits", "-1"), "--free-bits"), (("--h-dim", "8.5"), "--h-dim"),
    (("--output", "laplace"), "--output"),
    (("--objective", "iwae", "--particles", "4", "--tbptt", "5"), "--tbptt"),
    (("--objective", "fivo", "--particles", "4", "--free-bits", "0.1"), "--free-bits"),
]


@pytest.mark.parametrize("extra,needle", BAD_TRAIN, ids=[" ".join(e) for e, _ in BAD_TRAIN])
def test_bad_train_flag_is_one_line(arrays, tiny_config, tmp_path, capsys, extra, needle):
    out = tmp_path / "o"
    _one_line_error(capsys, train(arrays, out, tiny_config, "vrnn-gauss", 1, *extra), needle)
    assert not out.exists()


def test_gpu_without_one_is_one_line(arrays, tiny_config, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    _one_line_error(capsys, train(arrays, tmp_path / "o", tiny_config, "vrnn-gauss", 1,
                                  "--accelerator", "gpu"), "--accelerator", "CUDA")


BAD_CONFIG = [
    ({"model": {"h_dim": 8.5}}, "model.h_dim"), ({"model": {"h_dim": "big"}}, "model.h_dim"),
    ({"train": {"batch_size": "4"}}, "train.batch_size"), ({"train": {"lr": "fast"}}, "train.lr"),
    ({"model": {"phi_x_layers": 0}}, "model.phi_x_layers"), ({"model": [1, 2]}, "model"),
    ({"train": {"bogus": 1}}, "bogus"), ({"data": {"chunk_seconds": -1}}, "data.chunk_seconds"),
    ({"model": {"family": "srnn"}}, "family"), ({"train": {"fractions": [1, 0]}}, "fractions"),
]


@pytest.mark.parametrize("cfg,needle", BAD_CONFIG, ids=[n for _, n in BAD_CONFIG])
def test_bad_config_value_names_file_and_field(arrays, tmp_path, capsys, cfg, needle):
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(cfg))
    _one_line_error(capsys, train(arrays, tmp_path / "o", p, "vrnn-gauss", 1), p, needle)


def test_bad_values_of_the_other_commands(arrays, tiny_config, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 1) == 0
    ckpt = out / "last.ckpt"
    capsys.readouterr()
    _one_line_error(capsys, run("evaluate", ckpt, "--data", arrays, "--samples", 0), "--samples")
    _one_line_error(capsys, run("evaluate", ckpt, "--data", arrays, "--estimator", "mcmc"), "--estimator")
    for flag, value in (("--num", -2), ("--steps", -1), ("--steps", 0)):
        target = tmp_path / f"s{flag}{value}"
        _one_line_error(capsys, run("sample", ckpt, "--out", target, flag, value), flag)
        assert not target.exists()  # nothing half-written
    _one_line_error(capsys, main_threads(-1), "--threads")
    _one_line_error(capsys, run("latents", ckpt, "--data", arrays, "--out", tmp_path / "l.npz",
                                "--smc", 0), "--smc")
    _one_line_error(capsys, run("bogus-command"), "bogus-command")


def main_threads(n):
    from vrnn.cli import main
    return main(["--threads", str(n), "data", "list"])


def test_a_dataset_too_small_to_split_names_the_path(tmp_path, tiny_config, capsys):
    two = make_arrays(tmp_path / "two", n=2)
    _one_line_error(capsys, train(two, tmp_path / "o", tiny_config, "vrnn-gauss", 1), two, "split")


# ------------------------------------------------------------------- the Python API
def test_python_api_checks_its_inputs():
    model = build(VRNNConfig.preset("vrnn-gauss", x_dim=3, h_dim=8, z_dim=2))
    x = torch.randn(2, 5, 3)
    with pytest.raises(ValueError, match="float64.*float32"):
        model.elbo(x.double())
    with pytest.raises(ValueError, match="prefix"):
        model.elbo(x, torch.tensor([[1, 1, 0, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.float32))
    with pytest.raises(ValueError, match="only 0"):
        model.elbo(x, torch.full((2, 5), 0.5))
    with pytest.raises(ValueError, match="num"):
        model.sample(-1, 4)
    with pytest.raises(ValueError, match="steps"):
        model.sample(2, -1)
    with pytest.raises(ConfigError, match="h_dim"):
        VRNNConfig(x_dim=3, h_dim=8.5)
    with pytest.raises(ConfigError, match="phi_x_layers"):
        VRNNConfig(x_dim=3, phi_x_layers=0)
    model.elbo(x, torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32))  # fine


def test_every_process_gets_as_many_batches_even_with_fewer_batches_than_processes(monkeypatch):
    """Padding the batch list cycles it, so that 3 or 4 processes with one batch between
    them all take a step (a process without one would leave the others waiting)."""
    import vrnn.train as train_mod
    for world in (2, 3, 4, 5):
        counts = []
        for rank in range(world):
            monkeypatch.setattr(train_mod, "_world", lambda r=rank, w=world: (r, w))
            sampler = train_mod.EpochBatches([5] * 10, batch_size=32, shuffle=False)
            counts.append(len(list(iter(sampler))))
            assert len(sampler) == counts[-1]
        assert counts == [1] * world, (world, counts)


def test_data_options_are_checked_from_the_python_api_too(tmp_path):
    from vrnn.data import load
    data = make_arrays(tmp_path / "a", n=6)
    for bad in (dict(max_length=-1), dict(max_sequences=0), dict(subsample="4"), dict(chunk_seconds=-1)):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            load(str(data), **bad)
    assert len(load(str(data), max_sequences=4)) == 4
    assert max(load(str(data), max_length=5).lengths) == 5


def test_demo_runs_twice_in_a_row(tmp_path, capsys):
    """`vrnn demo` (what `make demo` runs) a second time resumes its finished run and writes
    its outputs again, the training curves from the kept logs included."""
    out = tmp_path / "demo"
    for _ in range(2):
        assert run("demo", "--out", out, "--max-epochs", 1) == 0
        for name in ("samples.png", "test_data.png", "training_curve.png", "evaluation.json"):
            assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "scoring it again" in printed and json.loads((out / "evaluation.json").read_text())["elbo"] is not None
    first, second = [ln for ln in printed.splitlines() if ln.startswith("[demo] test split")]
    assert first == second  # a finished run is scored again, not trained further: the same scores
    # a run stopped before its cap (here: by an interrupted first attempt) is resumed
    summary = out / "train" / "summary.json"
    summary.write_text(json.dumps(dict(json.loads(summary.read_text()), stopped="interrupted")))
    assert run("demo", "--out", out, "--max-epochs", 2) == 0
    assert "(resuming)" in capsys.readouterr().out
