"""Does bf16 mixed precision train as well as float32, and how much faster is it?

    python benchmarks/precision.py                     # the demo's job: VRNN-GMM on LASA
    python benchmarks/precision.py --data asterisk-en --model vrnn-gauss --epochs 10 \
        --model-opts h_dim=512,z_dim=128 --batch-size 64

Trains the same model from the same seed on the same split twice, with Lightning's
``32-true`` and ``bf16-mixed`` precision (weights, KL and log-probabilities stay float32 in
both; see vrnn.fast for the fused scan's mixed-precision arithmetic), then scores both
best checkpoints in float32 on the test split (ELBO and the K=40 importance-sampled
log-likelihood, nats per sequence). Prints one line per precision and the ratios; the
runs are sequential, so compare them within one invocation on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from vrnn import checkpoint
from vrnn.evaluate import evaluate
from vrnn.train import TrainConfig, best_checkpoint, fit

PRECISIONS = ("32-true", "bf16-mixed")


def parse_opts(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, v = item.split("=")
        out[k] = int(v) if v.lstrip("-").isdigit() else float(v)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="lasa")
    ap.add_argument("--model", default="vrnn-gmm")
    ap.add_argument("--model-opts", default="", help="e.g. h_dim=512,z_dim=128")
    ap.add_argument("--epochs", type=int, default=120)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--subsample", type=int, default=8, help="LASA only (the demo's 8)")
    ap.add_argument("--out", default="runs/precision")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    data_opts = {"subsample": args.subsample} if args.data == "lasa" else None
    print(f"torch {torch.__version__}, {os.cpu_count()}-core CPU, 1 thread; {args.model} on "
          f"{args.data}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}")
    rows = []
    for precision in PRECISIONS:
        out = Path(args.out) / precision
        shutil.rmtree(out, ignore_errors=True)
        tc = TrainConfig(max_epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         patience=args.epochs, seed=0, precision=precision)
        t0 = time.perf_counter()
        trainer, _, prepared = fit(args.data, args.model, out, tc, parse_opts(args.model_opts),
                                   data_opts=data_opts, progress=False)
        seconds = time.perf_counter() - t0
        model, _, _ = checkpoint.load(best_checkpoint(out))  # scored in float32
        torch.manual_seed(0)
        res = evaluate(model, prepared.sequences("test"), 40, progress=False)
        rows.append(dict(precision=precision, epochs=trainer.current_epoch, train_s=seconds,
                         elbo=res["elbo"], log_likelihood=res["log_likelihood"],
                         num_sequences=res["num_sequences"]))
        print(f"{precision:<11} {trainer.current_epoch} epochs in {seconds:7.1f} s; test "
              f"ELBO {res['elbo']:10.2f}, log-likelihood (K=40) {res['log_likelihood']:10.2f} "
              f"nats per sequence ({res['num_sequences']} sequences)")
    f32, bf = rows
    print(f"bf16-mixed vs 32-true: {f32['train_s'] / bf['train_s']:.2f}x the training speed; "
          f"test ELBO {bf['elbo'] - f32['elbo']:+.2f}, log-likelihood "
          f"{bf['log_likelihood'] - f32['log_likelihood']:+.2f} nats per sequence")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
