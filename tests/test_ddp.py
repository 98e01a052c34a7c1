"""Data-parallel training: 2 CPU processes (gloo) match one process on the same global batch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from test_cli import TINY, make_arrays


def _train(data, out, config, batch, devices, model="rnn-gauss", epochs=2, extra=()):
    exe = Path(sys.executable).with_name("vrnn")
    cmd = [str(exe), "--threads", "1", "train", "--data", str(data), "--model", model,
           "--out", str(out), "--max-epochs", str(epochs), "--batch-size", str(batch), "--config",
           str(config), "--no-progress", "--lr", "0.01", *extra]
    if devices > 1:
        cmd += ["--devices", str(devices), "--strategy", "ddp", "--accelerator", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out / "last.ckpt", weights_only=True)


def test_two_processes_match_one(tmp_path):
    data = make_arrays(tmp_path / "arrays", n=20, T=(10, 11))  # equal lengths: equal step counts
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    one = _train(data, tmp_path / "one", config, batch=8, devices=1)
    two = _train(data, tmp_path / "two", config, batch=4, devices=2)
    assert one["global_step"] == two["global_step"] == 4  # 16 train sequences, 2 epochs
    for k, v in one["state_dict"].items():
        torch.testing.assert_close(two["state_dict"][k], v, rtol=1e-4, atol=1e-5, msg=k)
    # the second epoch moved the weights: the match is not between two untouched models
    first = _train(data, tmp_path / "one-epoch", config, batch=8, devices=1, epochs=1)
    moved = max(float((v - one["state_dict"][k]).abs().max()) for k, v in first["state_dict"].items())
    assert moved > 1e-3


def test_vrnn_trains_with_two_processes(tmp_path):
    data = make_arrays(tmp_path / "arrays", n=12)
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    ckpt = _train(data, tmp_path / "two", config, batch=4, devices=2, model="vrnn-gauss")
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
