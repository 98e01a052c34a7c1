"""Speed of the dynamical-VAE family's training steps against the VRNN's, side by side in
one run (ratios; never an absolute time as a pass mark).

    PYTHONPATH=src python benchmarks/family.py [--repeats 5] [--workloads lasa,asterisk-en]
                                               [--models vrnn-gauss,kvae-gauss]
                                               [--out benchmarks/results/family_cpu.json]

Every model is sized as ``vrnn reproduce`` sizes its rows: all MLP widths (and the
inference RNN's width a_dim) bisected so that the parameter count matches RNN-Gauss's at
the reproduction's sizes (``reproduce.match_params``; on the ``musedata`` workload, a
piano-roll set's, the latent rows keep its published sizes, h = z = 64). A training step
is forward, ELBO, backward, gradient-norm clipping and an Adam step on a full (unpadded)
batch, in float32 with one intra-op thread; the models are interleaved round-robin after
a warm-up and the median of the repeats reported, with each model's ratio to VRNN-Gauss
(fused chain). The KVAE and the RVAEs run twice: the KVAE with its compiled filter
(csrc/kalman.cpp, the default where it builds) and with its Python loop under autograd
(row "kvae-gauss/python"), each RVAE with its chain through the fused scan (the default)
and under plain autograd (rows "rvae-.../autograd"), the DKF with its fused combiner chain
(the default) and under plain autograd (row "dkf-gauss/autograd").
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed import interleaved  # noqa: E402

from vrnn import VRNNConfig, build, compiled  # noqa: E402
from vrnn.fast import set_scan  # noqa: E402
from vrnn.inference import objective  # noqa: E402
from vrnn.reproduce import SETUPS, Row, match_params  # noqa: E402

MODELS = ["vrnn-gauss", "srnn-gauss", "dkf-gauss", "storn-gauss", "rvae-causal-gauss", "rvae-gauss", "dsae-gauss",
          "kvae-gauss"]
# (dataset whose reproduction sizes are used, x_dim, T, B)
WORKLOADS = {"asterisk-en": (200, 40, 32), "lasa": (2, 124, 16), "musedata": (88, 400, 16)}


def _step(model, x, mask, opt):
    def run():
        loss, _ = objective(model, x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        opt.step()
    return run


def _python_loops(fn):
    def run():
        with compiled.using(False):
            fn()
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--workloads", default="asterisk-en,lasa", help=f"of {', '.join(WORKLOADS)}")
    ap.add_argument("--models", default=",".join(MODELS), help="vrnn-gauss always included (the ratios' base)")
    ap.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    models = ["vrnn-gauss"] + [m for m in args.models.split(",") if m != "vrnn-gauss"]
    if bad := sorted(set(models) - set(MODELS)) + sorted(set(args.workloads.split(",")) - set(WORKLOADS)):
        ap.error(f"unknown model or workload: {', '.join(bad)}")
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, cpu, {torch.get_num_threads()} thread, load average at start "
          f"{os.getloadavg()[0]:.2f}")
    print(f"Training step (ELBO, float32) at matched parameter counts, median of {args.repeats}")
    print(f"{'workload':<12} {'model':<26} {'params':>9} {'step ms':>9} {'vs VRNN':>8}")
    rows = []
    for name in args.workloads.split(","):
        x_dim, T, B = WORKLOADS[name]
        base = SETUPS["cpu"][name]["model"]
        torch.manual_seed(0)
        x = torch.randn(B, T, x_dim)
        mask = torch.ones(B, T)
        fns, params = {}, {}
        for preset in models:
            fields = match_params(Row(preset), name, x_dim, base)
            torch.manual_seed(1)
            model = build(VRNNConfig.preset(preset, x_dim=x_dim, **fields))
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            fns[preset], params[preset] = _step(model, x, mask, opt), model.num_parameters()
            if preset.startswith(("rvae", "dkf")):
                plain = set_scan(copy.deepcopy(model), "autograd")
                fns[preset + "/autograd"] = _step(plain, x, mask, torch.optim.Adam(plain.parameters(), lr=1e-4))
                params[preset + "/autograd"] = params[preset]
        if "kvae-gauss" in fns:
            fns["kvae-gauss/python"] = _python_loops(fns["kvae-gauss"])
            params["kvae-gauss/python"] = params["kvae-gauss"]
        med = interleaved(fns, "cpu", args.warmup, args.repeats)
        for preset in fns:
            r = dict(workload=name, x_dim=x_dim, T=T, B=B, model=preset, params=params[preset],
                     ms=1e3 * med[preset], vs_vrnn=med[preset] / med["vrnn-gauss"])
            rows.append(r)
            print(f"{name:<12} {preset:<26} {r['params']:>9,} {r['ms']:>9.1f} {r['vs_vrnn']:>7.2f}x")
    print(f"load average at end {os.getloadavg()[0]:.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"torch": torch.__version__, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
