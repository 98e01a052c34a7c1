"""Posterior collapse on the piano-rolls: each run's KL per test step, beside the score of a
per-key marginal (each key on with its training frequency, every frame alike), the level a
model falls to when nothing carries information from one frame to the next.

    PYTHONPATH=src python benchmarks/collapse.py [--runs results/runs/polyphonic/jsb]
                                                 [--datasets jsb,nottingham,musedata,pianomidi]

``--runs``: a folder of ``vrnn reproduce`` run folders (``<row>-seed<k>/ckpt/best.ckpt``;
checkpoints are not committed, so this reads the runs of this machine). KL nats per step:
the sum over the test split of the per-step KL at the posterior mean (``latents``), over
the test frames. The marginal: trained on the training split (clipped to [1e-4, 1 - 1e-4]),
scored on the test split, nats per step, first frame included.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from vrnn import checkpoint
from vrnn.data import load


def marginal(data) -> float:
    split = data.split_indices()
    train = np.concatenate([data.sequences[i] for i in split["train"]])
    test = np.concatenate([data.sequences[i] for i in split["test"]])
    p = train.mean(0).clip(1e-4, 1 - 1e-4)
    return float((test * np.log(p) + (1 - test) * np.log(1 - p)).sum(1).mean())


@torch.no_grad()
def kl_per_step(model, data) -> float:
    kl = steps = 0.0
    for i in data.split_indices()["test"]:
        x = torch.as_tensor(data.sequences[i], dtype=torch.float32)[None]
        kl += float(model.latents(x)["kl"].sum())
        steps += x.shape[1]
    return kl / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="results/runs/polyphonic/jsb")
    ap.add_argument("--datasets", default="jsb")
    a = ap.parse_args()
    torch.set_num_threads(1)
    for name in a.datasets.split(","):
        print(f"{name}: per-key marginal {marginal(load(name)):.3f} nats per step")
    runs = Path(a.runs)
    data = load(runs.name)  # the runs' dataset, read once
    for run in sorted(p for p in runs.iterdir() if (p / "ckpt" / "best.ckpt").exists()):
        model, _, _ = checkpoint.load(run / "ckpt" / "best.ckpt")
        if model.latent:
            print(f"{run.name}: KL {kl_per_step(model, data):.3f} nats per test step")


if __name__ == "__main__":
    main()
