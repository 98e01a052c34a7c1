"""Discrete columns are never standardised, data with their own split keep it, the four
piano-roll benchmark sets are registered (issue 19's first parts), and a dataset is one
dataset however its path is spelled."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import torch

from test_cli import TINY, make_arrays, run, train
from vrnn import checkpoint
from vrnn.data import load


def make_bits(folder, n=24, T=(8, 16), D=4, seed=0):
    """Binary sequences with some structure (a bit tends to stay on)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = int(rng.integers(*T))
        x = np.zeros((t, D), dtype=np.float32)
        x[0] = rng.random(D) < 0.5
        for s in range(1, t):
            flip = rng.random(D) < 0.2
            x[s] = np.where(flip, 1 - x[s - 1], x[s - 1])
        np.save(folder / f"bits{i:02d}.npy", x)
    return folder


def make_strokes(folder, n=16, seed=0, pen_values=(0.0, 1.0)):
    """(pen, dx, dy) arrays with offsets far from standard scale (std about 30)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        t = int(rng.integers(8, 14))
        pen = rng.choice(pen_values, size=(t, 1)).astype(np.float32)
        xy = 30.0 * rng.normal(size=(t, 2)).astype(np.float32) + 50.0
        np.save(folder / f"s{i:02d}.npy", np.concatenate([pen, xy], 1))
    return folder


def evaluate_json(capsys, ckpt, data, *extra):
    capsys.readouterr()
    assert run("evaluate", ckpt, "--data", data, "--samples", 4, "--json", *extra) == 0
    return json.loads(capsys.readouterr().out)


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.mark.parametrize("output", [None, "bernoulli", "ar"])
def test_binary_arrays_get_bits_and_negative_log_probabilities(tmp_path, tiny_config, capsys, output):
    bits = make_bits(tmp_path / "bits")
    assert load(bits).binary
    capsys.readouterr()
    assert run("data", "info", bits) == 0
    assert "binary           True" in capsys.readouterr().out
    out = tmp_path / "run"
    extra = ["--output", output] if output else []
    assert train(bits, out, tiny_config, "vrnn-gauss", 2, *extra) == 0
    model, norm, _ = checkpoint.load(out / "best.ckpt")
    assert model.cfg.output == (output or "bernoulli")  # binary arrays default to Bernoulli
    assert set(model.cfg.discrete_dims) == {0, 1, 2, 3}
    assert norm.skip == [0, 1, 2, 3] and (norm.std == 1).all() and (norm.mean == 0).all()
    res = evaluate_json(capsys, out / "best.ckpt", bits, "--estimator", "all")
    for est in res["estimators"].values():  # a log-probability of bits is never positive
        assert est["per_sequence"] < 0 and est["per_step"] < 0 and est["bits_per_dim"] > 0
        assert est["per_sequence_raw"] == pytest.approx(est["per_sequence"])
    assert res["raw_offset_per_step"] == 0.0


def test_binary_rnn_row_is_a_probability(tmp_path, tiny_config, capsys):
    bits = make_bits(tmp_path / "bits")
    assert train(bits, tmp_path / "rnn", tiny_config, "rnn-gauss", 1) == 0
    res = evaluate_json(capsys, tmp_path / "rnn" / "best.ckpt", bits, "--split", "all")
    assert res["exact"] and res["log_likelihood"] < 0 and res["nats_per_step"] < 0
    # TCN's convention beside it: each sequence's first frame left out of sum and count
    from vrnn.data import pad_batch
    model, norm, _ = checkpoint.load(tmp_path / "rnn" / "best.ckpt")
    x, mask = pad_batch([norm.apply(s) for s in load(bits).sequences])
    with torch.no_grad():
        lp = model(x, mask).log_px * mask
    after = float(lp[:, 1:].sum()) / float(mask[:, 1:].sum())
    assert res["estimators"]["exact"]["per_step_after_first"] == pytest.approx(after, rel=1e-5)
    assert res["estimators"]["exact"]["per_step"] == pytest.approx(float(lp.sum() / mask.sum()), rel=1e-5)


def test_bernoulli_on_real_values_is_refused(tmp_path, tiny_config, capsys):
    arrays = make_arrays(tmp_path / "real")
    err = one_line_error(capsys, train(arrays, tmp_path / "run", tiny_config, "vrnn-gauss", 1,
                                       "--output", "bernoulli"))
    assert "seq00.npy" in err and "column 0" in err and "bit" in err
    assert not (tmp_path / "run" / "logs").exists()


def test_strokes_pen_bit_is_left_alone_and_checked(tmp_path, tiny_config, capsys):
    strokes = make_strokes(tmp_path / "strokes")
    out = tmp_path / "run"
    assert train(strokes, out, tiny_config, "vrnn-gauss", 1, "--output", "strokes") == 0
    _, norm, _ = checkpoint.load(out / "best.ckpt")
    assert norm.skip == [0] and norm.std[0] == 1 and norm.mean[0] == 0 and norm.std[1] > 10
    res = evaluate_json(capsys, out / "best.ckpt", strokes)
    # the Jacobian covers dx and dy only, never the pen bit
    assert res["raw_offset_per_step"] == pytest.approx(-math.log(norm.std[1]) - math.log(norm.std[2]), rel=1e-5)
    bad = make_strokes(tmp_path / "badpen", pen_values=(0.0, 0.5))
    err = one_line_error(capsys, train(bad, tmp_path / "bad", tiny_config, "vrnn-gauss", 1,
                                       "--output", "strokes"))
    assert "column 0" in err and ".npy" in err
    # evaluating the trained model on data whose pen column is not a bit: refused too
    err = one_line_error(capsys, run("evaluate", out / "best.ckpt", "--data", bad, "--split", "all"))
    assert "column 0" in err


def test_ar_binary_dims_are_not_normalised(tmp_path, capsys):
    rng = np.random.default_rng(1)
    folder = tmp_path / "mixed"
    folder.mkdir()
    for i in range(16):
        t = int(rng.integers(8, 14))
        flag = (rng.random((t, 1)) < 0.3).astype(np.float32)
        real = (40.0 * rng.normal(size=(t, 2)) + 7.0).astype(np.float32)
        np.save(folder / f"m{i:02d}.npy", np.concatenate([real[:, :1], flag, real[:, 1:]], 1))
    capsys.readouterr()
    assert run("data", "info", folder) == 0
    info = capsys.readouterr().out
    assert "binary           False" in info and "binary_columns   [1]" in info
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(TINY))
    out = tmp_path / "run"
    assert train(folder, out, cfg, "vrnn-gauss", 1, "--output", "ar") == 0
    model, norm, _ = checkpoint.load(out / "best.ckpt")
    assert model.cfg.binary_dims == (1,) and norm.skip == [1]  # the 0/1 column is the ar head's bit
    res = evaluate_json(capsys, out / "best.ckpt", folder)
    assert res["raw_offset_per_step"] == pytest.approx(-math.log(norm.std[0]) - math.log(norm.std[2]), rel=1e-5)
    # binary_dims naming a real-valued column: refused with the file and column
    cfg.write_text(json.dumps({"model": dict(TINY["model"], binary_dims=[0])}))
    err = one_line_error(capsys, train(folder, tmp_path / "bad", cfg, "vrnn-gauss", 1, "--output", "ar"))
    assert "m00.npy" in err and "column 0" in err


def test_checkpoint_with_standardised_bits_is_refused(tmp_path, tiny_config, capsys):
    bits = make_bits(tmp_path / "bits")
    out = tmp_path / "run"
    assert train(bits, out, tiny_config, "vrnn-gauss", 1) == 0
    ckpt = torch.load(out / "best.ckpt", weights_only=True)
    ckpt["vrnn"]["normalizer"].update(mean=[0.4] * 4, std=[0.5] * 4, skip=[])  # as vrnn 0.2 wrote it
    torch.save(ckpt, out / "old.ckpt")
    err = one_line_error(capsys, run("evaluate", out / "old.ckpt", "--data", bits))
    assert "standardised" in err and "retrain" in err


def make_split_folder(root, sizes=(10, 4, 5), valid_name="valid"):
    for name, n, seed in zip(("train", valid_name, "test"), sizes, (0, 1, 2)):
        make_arrays(root / name, n=n, seed=seed)
    return root


@pytest.mark.parametrize("valid_name", ["valid", "validation"])
def test_a_folder_with_its_own_split_keeps_it(tmp_path, tiny_config, capsys, valid_name):
    root = make_split_folder(tmp_path / "ds", valid_name=valid_name)
    data = load(root)
    assert data.fixed_split and data.split_indices() == {"train": list(range(10)), "valid": list(range(10, 14)),
                                                         "test": list(range(14, 19))}
    capsys.readouterr()
    assert run("data", "info", root) == 0
    assert "fixed: train 10, valid 4, test 5" in capsys.readouterr().out
    out = tmp_path / "run"
    assert train(root, out, tiny_config, "vrnn-gauss", 1) == 0
    _, norm, desc = checkpoint.load(out / "best.ckpt")
    assert desc["fixed_split"] and desc["split_seed"] is None
    # the normaliser is fitted on train/ alone
    train_x = np.concatenate([np.load(p) for p in sorted((root / "train").glob("*.npy"))])
    np.testing.assert_allclose(norm.mean, train_x.mean(0), rtol=1e-4)
    for split, n in (("test", 5), ("valid", 4), ("all", 19)):
        assert evaluate_json(capsys, out / "best.ckpt", root, "--split", split)["num_sequences"] == n
    err = one_line_error(capsys, train(root, tmp_path / "seeded", tiny_config, "vrnn-gauss", 1,
                                       "--split-seed", 3))
    assert "--split-seed" in err and "own" in err


def test_a_partial_split_folder_is_refused(tmp_path, capsys):
    root = tmp_path / "ds"
    make_arrays(root / "train", n=6)
    make_arrays(root / "test", n=3, seed=2)
    err = one_line_error(capsys, run("data", "info", root))
    assert "valid/" in err and str(root) in err


def test_the_four_benchmark_sets_are_registered(capsys):
    capsys.readouterr()
    assert run("data", "list") == 0
    listed = capsys.readouterr().out
    expected = {"jsb": (229, 76, 77), "nottingham": (694, 173, 170), "musedata": (524, 135, 124),
                "pianomidi": (87, 12, 25)}
    for name, (tr, va, te) in expected.items():
        assert f"\n{name} " in "\n" + listed
        data = load(name)
        assert data.kind == "pianoroll" and data.dim == 88 and data.binary
        assert {k: len(v) for k, v in data.split_indices().items()} == {"train": tr, "valid": va, "test": te}
    assert sum(len(s) for s, lab in zip(load("jsb").sequences, load("jsb").meta["split"]) if lab == "test") == 4725
    assert run("data", "info", "jsb") == 0
    assert "fixed: train 229, valid 76, test 77" in capsys.readouterr().out


def test_jsb_trains_with_bernoulli_on_its_standard_split(tmp_path, tiny_config, capsys):
    out = tmp_path / "jsb"
    assert train("jsb", out, tiny_config, "vrnn-gauss", 1, "--limit-train-batches", 2) == 0
    model, norm, desc = checkpoint.load(out / "best.ckpt")
    assert model.cfg.output == "bernoulli" and model.cfg.x_dim == 88 and desc["fixed_split"]
    res = evaluate_json(capsys, out / "best.ckpt", "jsb")
    assert res["num_sequences"] == 77 and res["num_steps"] == 4725 and res["log_likelihood"] < 0


def test_a_path_is_one_dataset_however_spelled(tmp_path, tiny_config, capsys, monkeypatch):
    make_arrays(tmp_path / "data" / "sines", n=40)
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps(dict(TINY, data={"max_sequences": 20, "max_length": 10})))
    monkeypatch.chdir(tmp_path)
    assert train("data/sines", tmp_path / "run", cfg, "vrnn-gauss", 1) == 0
    counts = {evaluate_json(capsys, tmp_path / "run" / "best.ckpt", spelling)["num_sequences"]
              for spelling in ("data/sines", "data/sines/", "./data/sines", str(tmp_path / "data" / "sines"),
                               os.path.join("data", "..", "data", "sines"))}
    assert counts == {2}  # 20 sequences drawn, 10% of them tested, whatever the spelling
