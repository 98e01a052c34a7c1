"""How tight and how variable are importance sampling and the particle filter on long
sequences? The mean and the spread (std over repeats) of log Z for IS and SMC at
K = 4, 16, 40, 100, per test sequence, on trained models, and the cost of each as a
ratio to one ELBO pass, measured in the same run.

    python benchmarks/smc_variance.py                       # the reproduction's vrnn-gauss runs
    python benchmarks/smc_variance.py --ckpt RUN/best.ckpt --data fillets-cs --sequences 8

By default it scores the VRNN-Gauss checkpoints of `vrnn reproduce` (seed 0): chorales on
its test split, and fillets-cs on *whole* test utterances (the model was trained on
utterances cut to their first 100 frames; a sequence model can score any length), where
the question matters: hundreds to thousands of steps.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vrnn import checkpoint
from vrnn.data import load, pad_batch
from vrnn.evaluate import split_sequences
from vrnn.inference import log_likelihood

RUNS = Path(__file__).resolve().parents[1] / "results" / "runs" / "main"
DEFAULTS = [("fillets-cs", RUNS / "fillets-cs" / "vrnn-gauss-seed0" / "ckpt" / "best.ckpt", True),
            ("chorales", RUNS / "chorales" / "vrnn-gauss-seed0" / "ckpt" / "best.ckpt", False)]


def study(ckpt: Path, spec: str, whole: bool, sequences: int, repeats: int, ks) -> dict:
    """``whole``: the test split's sequences at their full length (the training data's
    options without ``max_length``: the same sequences, the same split, uncut)."""
    model, normalizer, desc = checkpoint.load(ckpt)
    opts = dict(desc.get("load_opts") or {})
    if whole:
        opts.pop("max_length", None)
    data = load(spec, **opts)
    idx, seqs = split_sequences(data, normalizer, desc, "test")
    order = np.argsort([len(s) for s in seqs])
    pick = order[np.linspace(0, len(order) - 1, min(sequences, len(order))).round().astype(int)]
    chosen = [seqs[i] for i in pick]
    x, mask = pad_batch(chosen)
    lengths = mask.sum(1).long().tolist()
    torch.manual_seed(0)
    with torch.no_grad():
        t0 = time.perf_counter()
        elbos = torch.stack([model.elbo(x, mask) for _ in range(repeats)])
        t_elbo = (time.perf_counter() - t0) / repeats
    rows = []
    for method in ("is", "smc"):
        for K in ks:
            vals, t0 = [], time.perf_counter()
            for r in range(repeats):
                torch.manual_seed(1000 + r)
                vals.append(log_likelihood(model, x, mask, num_samples=K, method=method))
            seconds = (time.perf_counter() - t0) / repeats
            v = torch.stack(vals).double()  # (repeats, sequences)
            rows.append({"method": method, "K": K, "mean": v.mean(0).tolist(), "std": v.std(0).tolist(),
                         "mean_minus_elbo": (v.mean(0) - elbos.double().mean(0)).tolist(),
                         "cost_vs_elbo": seconds / t_elbo})
    return {"data": spec, "checkpoint": str(ckpt), "lengths": lengths, "repeats": repeats,
            "elbo_mean": elbos.double().mean(0).tolist(), "elbo_std": elbos.double().std(0).tolist(),
            "rows": rows}


def report(res: dict) -> str:
    lengths = res["lengths"]
    lines = [f"{res['data']}: {len(lengths)} test sequences of {min(lengths)} to {max(lengths)} steps "
             f"(median {int(statistics.median(lengths))}); {res['repeats']} repeats; nats per sequence, "
             "averaged over the sequences",
             f"  ELBO: mean {np.mean(res['elbo_mean']):.1f}, std over repeats {np.mean(res['elbo_std']):.2f}",
             f"  {'':4} {'K':>4} {'mean log Z':>11} {'- ELBO':>8} {'std over repeats':>17} {'cost / ELBO':>12}"]
    for r in res["rows"]:
        lines.append(f"  {r['method']:<4} {r['K']:>4} {np.mean(r['mean']):>11.1f} {np.mean(r['mean_minus_elbo']):>8.1f} "
                     f"{np.mean(r['std']):>17.2f} {r['cost_vs_elbo']:>11.1f}x")
    longest = int(np.argmax(lengths))
    lines.append(f"  the longest sequence ({lengths[longest]} steps): " + "; ".join(
        f"{r['method']} K={r['K']}: {r['mean'][longest]:.1f} ± {r['std'][longest]:.1f}"
        for r in res["rows"] if r["K"] in (4, max(x["K"] for x in res["rows"]))))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, help="a checkpoint (default: the reproduction's, see above)")
    ap.add_argument("--data", help="the dataset of --ckpt")
    ap.add_argument("--sequences", type=int, default=8, help="test sequences, spread over the lengths")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--ks", default="4,16,40,100")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ks = [int(k) for k in args.ks.split(",")]
    jobs = [(args.data, args.ckpt, False)] if args.ckpt else DEFAULTS
    out = []
    for spec, ckpt, whole in jobs:
        if not Path(ckpt).exists():
            print(f"{ckpt}: no such checkpoint (run vrnn reproduce first, or pass --ckpt)", file=sys.stderr)
            return 2
        res = study(Path(ckpt), spec, whole, args.sequences, args.repeats, ks)
        print(report(res), flush=True)
        out.append(res)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
