"""Throughput of online scoring: steps per second of ``vrnn.scoring.Scorer.update`` on a
38-dimensional series (the width of the Server Machine Dataset), K = 1, 16, 64 particles,
float64 (the default) and float32, one thread; beside it, side by side in the same run,
the batch particle filter (``smc.particle_filter``, the whole series at once, no shares)
on the same series, as a ratio. Also the RNN row (exact, no particles).

    PYTHONPATH=src python benchmarks/stream.py --steps 400 | tee benchmarks/results/stream_cpu.log
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import torch

from vrnn import VRNNConfig, build
from vrnn.scoring import Scorer
from vrnn.smc import particle_filter

SIZES = {"smd-eval (h 64, z 8)": dict(h_dim=64, z_dim=8, phi_x_dim=32, phi_z_dim=32, enc_dim=32,
                                      prior_dim=32, dec_dim=32),
         "array default (h 128, z 16)": {}}


def rate(fn, steps: int, repeats: int = 2) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return steps / best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    D, T = 38, a.steps
    xs = np.random.default_rng(0).normal(size=(T, D))
    rows = []
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, 1 thread, {T} steps, D = {D}")
    print(f"{'model':32s} {'row':10s} {'K':>3s} {'dtype':8s} {'stream steps/s':>15s} {'batch filter':>13s} {'ratio':>6s}")
    for size_name, size in SIZES.items():
        for preset in ("vrnn-gauss", "rnn-gauss"):
            torch.manual_seed(0)
            model = build(VRNNConfig.preset(preset, x_dim=D, **size)).eval()
            for K in ((1, 16, 64) if model.latent else (1,)):
                for dtype in (torch.float64, torch.float32):
                    m = model.to(dtype)
                    sc = Scorer(m, None, particles=K, float32=dtype == torch.float32)

                    def stream():
                        sc.reset()
                        for r in xs:
                            sc.update(r)
                    s_rate = rate(stream, T)
                    x = torch.as_tensor(xs, dtype=dtype).unsqueeze(0)
                    if model.latent:
                        b_rate = rate(lambda: particle_filter(m, x, particles=K), T)
                    else:
                        b_rate = rate(lambda: m.log_likelihood(x), T)
                    row = {"size": size_name, "row": preset, "K": K, "dtype": str(dtype)[6:],
                           "stream_steps_per_s": round(s_rate, 1), "batch_steps_per_s": round(b_rate, 1),
                           "batch_over_stream": round(b_rate / s_rate, 2)}
                    rows.append(row)
                    print(f"{size_name:32s} {preset:10s} {K:3d} {row['dtype']:8s} {s_rate:15.1f} "
                          f"{b_rate:13.1f} {b_rate / s_rate:6.2f}", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"steps": T, "dim": D, "torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
