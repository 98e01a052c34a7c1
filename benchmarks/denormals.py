"""Subnormal floats on the CPU: a training step with and without flushing them to zero
(``torch.set_flush_denormal``, the x86 FTZ/DAZ flags), side by side in one run (ratios,
never absolute pass marks).

A mixture's log-density gradient holds the responsibilities of the components far from
x: exp(-hundreds) in float32 is subnormal (below 1.2e-38), and x86 matrix products on
subnormal inputs run many times slower. ``vrnn``'s command line flushes them by default
(``--denormals flush``); this script measures what that buys:

* the GMM head alone (log_prob + backward, 64 x 40 rows of 512 features, x_dim 200, 20
  components), and the Gaussian head beside it;
* a whole VRNN-GMM and VRNN-Gauss training step at the same size (h 512, z 128);
* with ``--trained CKPT DATA`` (repeatable): a trained model's training step on a batch
  of its own training split (what training at that point of the run costs).

    python benchmarks/denormals.py [--repeats 5] [--threads 1] [--trained CKPT DATA ...]

With more than one thread only the calling thread's flag is toggled here, so run it with
one (the command line sets the flag before the thread pool exists, which its threads
inherit).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from vrnn import VRNNConfig, build
from vrnn.heads import GaussianHead, GMMHead
from vrnn.inference import objective


def head_step(head, feats, x):
    def run():
        head.log_prob(head(feats), x).sum().backward()
    return run


def train_step(model, x, mask):
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def run():
        loss, _ = objective(model, x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        # no opt.step(): every repeat times the same point of training
    return run


def side_by_side(fns: dict, repeats: int) -> list[dict]:
    """Median seconds of each function with subnormals kept and flushed, alternating."""
    rows = []
    for name, fn in fns.items():
        times = {"keep": [], "flush": []}
        for mode in ("keep", "flush"):  # warm-up
            torch.set_flush_denormal(mode == "flush")
            fn()
        for _ in range(repeats):
            for mode in ("keep", "flush"):
                torch.set_flush_denormal(mode == "flush")
                t = time.perf_counter()
                fn()
                times[mode].append(time.perf_counter() - t)
        torch.set_flush_denormal(False)
        keep, flush = statistics.median(times["keep"]), statistics.median(times["flush"])
        rows.append(dict(workload=name, keep_ms=1e3 * keep, flush_ms=1e3 * flush, speedup=keep / flush))
    return rows


def checkpoint_step(ckpt: str, data: str, batch: int):
    from vrnn.data.batching import pad_batch
    from vrnn.evaluate import load_for_scoring

    scored = load_for_scoring(ckpt, data, "train")
    model = scored.model.train()
    g = torch.Generator().manual_seed(0)
    pick = torch.randperm(len(scored.sequences), generator=g)[:batch].tolist()
    x, mask = pad_batch([scored.sequences[i] for i in pick])
    return train_step(model, x, mask)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--trained", nargs=2, action="append", default=[], metavar=("CKPT", "DATA"),
                   help="a vrnn checkpoint (best.ckpt) and its dataset (a name or a path)")
    p.add_argument("--batch", type=int, default=32, help="sequences in the checkpoint's batch")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if not torch.set_flush_denormal(False):
        raise SystemExit("this CPU has no flush-to-zero control (torch.set_flush_denormal): nothing to compare")
    D, B, T, F_in = 200, 64, 40, 512
    torch.manual_seed(0)
    feats = torch.randn(B, T, F_in, requires_grad=True)
    x = torch.randn(B, T, D)
    mask = torch.ones(B, T)
    fns = {"GMM head alone (20 components)": head_step(GMMHead(F_in, D, 20), feats, x),
           "Gaussian head alone": head_step(GaussianHead(F_in, D), feats, x)}
    for name, over in (("VRNN-GMM step (h 512)", dict(output="gmm", n_components=20)),
                       ("VRNN-Gauss step (h 512)", {})):
        torch.manual_seed(0)
        fns[name] = train_step(build(VRNNConfig.preset("vrnn-gauss", x_dim=D, h_dim=512, z_dim=128, **over)),
                               x, mask)
    for ckpt, data in a.trained:
        fns[f"trained: {ckpt}"] = checkpoint_step(ckpt, data, a.batch)
    print(f"threads {a.threads}, repeats {a.repeats}; median ms per call, subnormals kept / flushed")
    for r in side_by_side(fns, a.repeats):
        print(f"{r['workload']:<72} {r['keep_ms']:10.1f} {r['flush_ms']:10.1f}   {r['speedup']:5.2f}x")


if __name__ == "__main__":
    main()
