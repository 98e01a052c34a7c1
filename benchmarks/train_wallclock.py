"""Wall clock of real training runs to the same number of optimiser steps, compiled loops
against the Python loops (issue 21's piano-roll target), alternating the two.

    python benchmarks/train_wallclock.py --data chorales --model vrnn-gauss --steps 300 --rounds 3

Each round runs ``vrnn train`` twice in fresh processes, ``VRNN_COMPILED=1`` then ``=0``
(A, B, A, B, ...), same config and seed, into a temporary folder; reported per run: the
training time ``vrnn train`` records (``summary.json``: ``seconds``) and the whole process's
wall clock (start-up, data loading and validation included); medians over the rounds.
Model: h = z = 32 and every MLP width 32 (``--width``), batch 16, one intra-op thread.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="chorales")
    ap.add_argument("--model", default="vrnn-gauss")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--h", type=int, default=32)
    ap.add_argument("--z", type=int, default=32)
    ap.add_argument("--width", type=int, default=32)
    args = ap.parse_args(argv)
    w = args.width
    cfg = {"model": {"h_dim": args.h, "z_dim": args.z, "phi_x_dim": w, "phi_z_dim": w, "enc_dim": w,
                     "prior_dim": w, "dec_dim": w},
           "train": {"batch_size": 16, "max_steps": args.steps, "lr": 1e-3, "seed": 0}}
    res = {"compiled": [], "python": []}
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "config.json"
        conf.write_text(json.dumps(cfg))
        for r in range(args.rounds):
            for name, flag in (("compiled", "1"), ("python", "0")):
                out = Path(tmp) / f"{name}{r}"
                env = dict(os.environ, VRNN_COMPILED=flag, OMP_NUM_THREADS="1")
                t = time.perf_counter()
                subprocess.run([sys.executable, "-m", "vrnn.cli", "train", "--data", args.data, "--model",
                                args.model, "--config", str(conf), "--out", str(out), "--no-progress"],
                               env=env, check=True, capture_output=True, text=True)
                wall = time.perf_counter() - t
                s = json.loads((out / "summary.json").read_text())
                res[name].append((s["seconds"], wall, s["steps"]))
                print(f"round {r} {name:<8} {s['steps']} steps: training {s['seconds']:.1f} s, "
                      f"process {wall:.1f} s", flush=True)
    med = {k: (statistics.median(v[0] for v in x), statistics.median(v[1] for v in x)) for k, x in res.items()}
    print(f"\n{args.model} on {args.data}, h {args.h}, z {args.z}, widths {w}, batch 16, {args.steps} optimiser "
          f"steps, median of {args.rounds} alternating rounds; load average at end {os.getloadavg()[0]:.2f}")
    for k, (tr, wall) in med.items():
        print(f"  {k:<9} training {tr:6.1f} s   whole process {wall:6.1f} s")
    c, p = med["compiled"], med["python"]
    print(f"  Python loops / compiled loops: {p[0] / c[0]:.2f}x (training time), {p[1] / c[1]:.2f}x (whole process)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
