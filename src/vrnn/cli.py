"""The ``vrnn`` command: thin glue over data, train, inference, generate and writers."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

EXAMPLES = {
    "train": """examples:
  vrnn train --data lasa --model vrnn-gmm --out runs/lasa
  vrnn train --data asterisk-en --model vrnn-gauss --out runs/ast --max-time 30
  vrnn train --data my_arrays/ --model vrnn-gauss --out runs/mine --batch-size 16
  vrnn train --data lasa --model vrnn-gmm --out runs/lasa --resume
  vrnn train --data lasa --model vrnn-gauss --out runs/ddp --devices 2 --strategy ddp""",
    "evaluate": """examples:
  vrnn evaluate runs/lasa/best.ckpt --data lasa
  vrnn evaluate runs/lasa/best.ckpt --data lasa --split valid --samples 100 --json""",
    "sample": """examples:
  vrnn sample runs/lasa/best.ckpt --num 16 --steps 250 --out samples/
  vrnn sample runs/ast/best.ckpt --num 4 --steps 160 --out wavs/ --mean
  vrnn sample runs/mine/best.ckpt --num 4 --steps 100 --prefix start.npy --out cont/""",
    "latents": """examples:
  vrnn latents runs/lasa/best.ckpt --data lasa --out lasa_latents.npz
  vrnn latents runs/mine/best.ckpt --data new_recordings/ --out scores.npz --sample""",
    "data": """examples:
  vrnn data list
  vrnn data info lasa
  vrnn data info ~/corpora/TIMIT/
  vrnn data fetch asterisk-en""",
    "reproduce": """examples:
  vrnn reproduce --setup cpu --out results
  vrnn reproduce --setup cpu --datasets lasa,chorales --out /tmp/quick
  vrnn reproduce --setup paper --accelerator gpu --jobs 1 --out results-paper""",
    "demo": """examples:
  vrnn demo --out runs/demo""",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vrnn", description="Variational Recurrent Neural Networks (Chung et al. 2015): "
        "train, evaluate and sample on speech, handwriting, music and your own arrays.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="models: rnn-gauss, rnn-gmm, vrnn-i-gauss, vrnn-gauss, vrnn-gmm\n"
               "datasets: lasa, chorales, asterisk-en, fillets-cs, or any path\n"
               "run `vrnn COMMAND --help` for the options and examples of each command")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (default 1, or $VRNN_THREADS; measured fastest here)")
    sub = p.add_subparsers(dest="command", required=True)

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    t = cmd("train", "train a model on a dataset; writes best.ckpt, last.ckpt and logs/ into --out")
    t.add_argument("--data", required=True, help="registered dataset name or a path")
    t.add_argument("--model", required=True, help="one of the five paper rows")
    t.add_argument("--out", required=True, help="output folder")
    t.add_argument("--max-epochs", type=int, default=None)
    t.add_argument("--max-time", type=float, default=None, help="wall-clock budget in minutes")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--seed", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    t.add_argument("--config", help="JSON file: {\"model\": {...}, \"train\": {...}, \"data\": {...}}")
    t.add_argument("--output", choices=["gauss", "gmm", "bernoulli", "strokes"],
                   help="override the output head (default: follows the model and data kind)")
    t.add_argument("--h-dim", type=int, default=None)
    t.add_argument("--z-dim", type=int, default=None)
    t.add_argument("--tbptt", type=int, default=None, help="truncated BPTT chunk length (steps)")
    t.add_argument("--kl-warmup", type=int, default=None, help="KL warm-up optimiser steps")
    t.add_argument("--free-bits", type=float, default=None, help="nats per latent dim per step")
    t.add_argument("--patience", type=int, default=None, help="early-stopping patience (epochs)")
    t.add_argument("--devices", default=None, help="number of devices (processes) per node")
    t.add_argument("--accelerator", default=None, help="cpu, gpu, auto")
    t.add_argument("--strategy", default=None, help="auto, ddp, ddp_spawn, ...")
    t.add_argument("--num-nodes", type=int, default=None)
    t.add_argument("--precision", default=None,
                   help="32-true (default) or bf16-mixed: bf16 matmuls, float32 weights, KL and "
                        "log-probabilities; faster at speech sizes on GPUs and AVX512-BF16/AMX "
                        "CPUs, slower for small models (see README, Mixed precision)")
    t.add_argument("--limit-train-batches", type=int, default=None,
                   help="at most this many batches per epoch (quick checks)")
    t.add_argument("--no-progress", action="store_true")

    e = cmd("evaluate", "ELBO and importance-sampled log-likelihood of a checkpoint on data")
    e.add_argument("checkpoint")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test", choices=["train", "valid", "test", "all"])
    e.add_argument("--samples", type=int, default=40, help="importance samples K (default 40)")
    e.add_argument("--batch-size", type=int, default=32)
    e.add_argument("--max-rows", type=int, default=4096,
                   help="memory cap: sequences x samples in one pass (default 4096)")
    e.add_argument("--max-memory", type=float, default=1024,
                   help="memory cap of one scoring pass in MiB (default 1024)")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--json", action="store_true", help="print one JSON object")

    s = cmd("sample", "generate sequences and write files a person can check")
    s.add_argument("checkpoint")
    s.add_argument("--num", type=int, default=8)
    s.add_argument("--steps", type=int, default=None, help="steps to generate (default: median training length)")
    s.add_argument("--out", required=True)
    s.add_argument("--prefix", help="a file (.npy/.csv/audio) whose first sequence is continued")
    s.add_argument("--mean", action="store_true", help="emit the output mean instead of a draw")
    s.add_argument("--seed", type=int, default=0)

    la = cmd("latents", "per-step KL, posterior means and log-likelihood terms for every sequence")
    la.add_argument("checkpoint")
    la.add_argument("--data", required=True)
    la.add_argument("--out", required=True, help="output .npz file")
    la.add_argument("--split", default="all", choices=["train", "valid", "test", "all"])
    la.add_argument("--sample", action="store_true", help="use a posterior draw, not the mean")
    la.add_argument("--batch-size", type=int, default=32)
    la.add_argument("--max-memory", type=float, default=1024,
                    help="memory cap of one pass in MiB (default 1024): long sequences "
                         "go in smaller batches")
    la.add_argument("--seed", type=int, default=0)

    d = cmd("data", "list, inspect and fetch datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dsub.add_parser("list", help="registered datasets and what is fetched")
    di = dsub.add_parser("info", help="what SPEC holds (kind, sequences, lengths, duration)")
    di.add_argument("spec")
    df = dsub.add_parser("fetch", help="download a speech corpus from Debian's archive into the cache")
    df.add_argument("name", choices=["asterisk-en", "fillets-cs"])

    r = cmd("reproduce", "train and evaluate the paper's five rows on four datasets (Table 1), "
            "write the table, the analysis figure and samples")
    r.add_argument("--setup", default="cpu", choices=["cpu", "paper"],
                   help="cpu: sized for 2 cores, about 1.5 h; paper: the paper's sizes, for a GPU")
    r.add_argument("--out", default="results")
    r.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    r.add_argument("--datasets", default=None, help="comma-separated subset of "
                   "asterisk-en,fillets-cs,lasa,chorales")
    r.add_argument("--accelerator", default=None, help="passed to every `vrnn train` (e.g. gpu)")
    r.add_argument("--budget-scale", type=float, default=1.0,
                   help="multiply every row's training budget (e.g. 0.05 for a smoke test)")

    m = cmd("demo", "the main job: train a VRNN on LASA handwriting, evaluate, draw samples and curves")
    m.add_argument("--out", default="runs/demo")
    m.add_argument("--max-epochs", type=int, default=None)
    m.add_argument("--model", default="vrnn-gmm")
    return p


def _quiet_lightning() -> None:
    import logging
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    os.environ.setdefault("POSSIBLE_USER_WARNINGS", "off")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- commands
def _read_config(path: str | None) -> dict:
    from .errors import ConfigError
    if not path:
        return {}
    p = Path(path)
    try:
        cfg = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p}: not a JSON config ({exc})") from None
    if not isinstance(cfg, dict) or set(cfg) - {"model", "train", "data"}:
        raise ConfigError(f"{p}: a config holds only the sections model, train and data")
    return cfg


def cmd_train(a) -> int:
    from dataclasses import fields

    from .errors import ConfigError
    from .train import TrainConfig, fit
    cfg = _read_config(a.config)
    train_fields = {f.name for f in fields(TrainConfig)}
    tdict = dict(cfg.get("train", {}))
    if set(tdict) - train_fields:
        raise ConfigError(f"{a.config}: unknown train option(s) {', '.join(sorted(set(tdict) - train_fields))}")
    for key, val in (("max_epochs", a.max_epochs), ("max_time_minutes", a.max_time),
                     ("batch_size", a.batch_size), ("lr", a.lr), ("seed", a.seed),
                     ("tbptt", a.tbptt), ("kl_warmup_steps", a.kl_warmup),
                     ("free_bits", a.free_bits), ("patience", a.patience),
                     ("accelerator", a.accelerator), ("strategy", a.strategy),
                     ("num_nodes", a.num_nodes), ("precision", a.precision),
                     ("limit_train_batches", a.limit_train_batches)):
        if val is not None:
            tdict[key] = val
    if a.devices is not None:
        tdict["devices"] = int(a.devices) if str(a.devices).isdigit() else a.devices
    if "fractions" in tdict:
        tdict["fractions"] = tuple(tdict["fractions"])
    tc = TrainConfig(**tdict)
    overrides = dict(cfg.get("model", {}))
    for key, val in (("output", a.output), ("h_dim", a.h_dim), ("z_dim", a.z_dim)):
        if val is not None:
            overrides[key] = val
    t0 = time.time()
    trainer, module, prepared = fit(a.data, a.model, a.out, tc, overrides, cfg.get("data", {}),
                                    resume=a.resume, progress=not a.no_progress)
    if trainer.global_rank == 0:
        m = trainer.callback_metrics
        best = trainer.checkpoint_callback.best_model_score
        print(f"trained {a.model} on {prepared.data.name} ({len(prepared.splits['train'])} train / "
              f"{len(prepared.splits['valid'])} valid sequences), {module.model.num_parameters():,} "
              f"parameters, {trainer.current_epoch} epochs, {time.time() - t0:.0f} s")
        if best is not None:
            print(f"best validation ELBO {float(best):.2f} nats per sequence; "
                  f"last {float(m.get('valid/elbo', float('nan'))):.2f}")
        print(f"checkpoints: {Path(a.out) / 'best.ckpt'}, {Path(a.out) / 'last.ckpt'}; logs: {Path(a.out) / 'logs'}")
    return 0


def cmd_evaluate(a) -> int:
    import torch
    from .evaluate import evaluate, load_for_scoring
    torch.manual_seed(a.seed)
    model, _, _, data, _, seqs = load_for_scoring(a.checkpoint, a.data, a.split)
    res = evaluate(model, seqs, a.samples, a.batch_size, a.max_rows, int(a.max_memory * 2 ** 20),
                   progress=not a.json)
    res.update(split=a.split, model=model.cfg.name, data=data.name, unit="nats per sequence",
               normalised=True)
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{model.cfg.name} on {data.name} ({a.split} split, {res['num_sequences']} sequences, "
          f"{res['num_steps']} steps; log-likelihoods of the normalised data)")
    if model.cfg.latent:
        print(f"  ELBO               >= {res['elbo']:.2f} nats per sequence")
        print(f"  log-likelihood     ~= {res['log_likelihood']:.2f} nats per sequence "
              f"(importance sampled, K={a.samples})")
    else:
        print(f"  log-likelihood      = {res['log_likelihood']:.2f} nats per sequence (exact)")
    print(f"  per step            {res['nats_per_step']:.4f} nats")
    print(f"  bits per dimension  {res['bits_per_dim']:.4f} (negative log-likelihood)")
    return 0


def _prefix_sequence(path: str, model, normalizer):
    import torch
    from .data import load
    from .errors import DataError
    data = load(path)
    seq = data.sequences[0]
    if seq.shape[-1] != model.cfg.x_dim:
        raise DataError(f"{path}: prefix has dimension {seq.shape[-1]} but the model expects {model.cfg.x_dim}")
    return torch.as_tensor(normalizer.apply(seq), dtype=torch.float32), seq


def cmd_sample(a) -> int:
    import numpy as np
    import torch
    from . import checkpoint
    from .writers import write_samples
    torch.manual_seed(a.seed)
    model, normalizer, desc = checkpoint.load(a.checkpoint)
    steps = a.steps or int(desc.get("median_length") or 100)
    prefix, raw_prefix = (None, None) if not a.prefix else _prefix_sequence(a.prefix, model, normalizer)
    x = model.sample(a.num, steps, prefix=prefix, mean=a.mean)
    x = normalizer.invert(x).numpy()
    samples = [x[i] if raw_prefix is None else np.concatenate([raw_prefix, x[i]]) for i in range(a.num)]
    paths = write_samples(a.out, samples, desc["kind"], desc.get("meta", {}))
    what = f"{a.num} sequences of {steps} steps" + (f" after a {len(raw_prefix)}-step prefix" if a.prefix else "")
    print(f"wrote {len(paths)} files for {what} to {a.out}")
    return 0


def cmd_latents(a) -> int:
    import numpy as np
    import torch
    from .evaluate import load_for_scoring, padded_batches
    from .writers import write_npz
    torch.manual_seed(a.seed)
    model, _, _, _, idx, seqs = load_for_scoring(a.checkpoint, a.data, a.split)
    lengths = [len(s) for s in seqs]
    T = max(lengths)
    arrays: dict[str, np.ndarray] = {}  # (N, T, ...) in the split's order, zero-padded
    for batch, x, mask in padded_batches(model, seqs, a.batch_size, int(a.max_memory * 2 ** 20)):
        for k, v in model.latents(x, mask, sample=a.sample).items():
            if k == "h":
                continue
            v = v.numpy()
            if k not in arrays:
                arrays[k] = np.zeros((len(seqs), T) + v.shape[2:], dtype=v.dtype)
            arrays[k][batch, :v.shape[1]] = v
    padded = np.arange(T)[None, :] >= np.asarray(lengths)[:, None]
    for v in arrays.values():
        v[padded] = 0  # whatever the batching, steps past a sequence's end read 0
    arrays["lengths"] = np.asarray(lengths)
    arrays["index"] = np.asarray(idx)
    write_npz(a.out, arrays)
    print(f"wrote per-step {', '.join(sorted(k for k in arrays if k not in ('lengths', 'index')))} "
          f"for {len(seqs)} sequences to {a.out}")
    return 0


def cmd_data(a) -> int:
    from .data import DATASETS, describe, fetch
    from .data.fetch import fetched_path
    if a.data_command == "list":
        for name, text in DATASETS.items():
            state = ""
            if name in ("asterisk-en", "fillets-cs"):
                path = fetched_path(name)
                state = f" [fetched: {path}]" if path else " [not fetched]"
            print(f"{name:12s} {text}{state}")
        return 0
    if a.data_command == "info":
        info = describe(a.spec)
        for k, v in info.items():
            print(f"{k:16s} {v}")
        return 0
    path = fetch(a.name, progress=_err)
    print(f"{a.name}: ready in {path}")
    return 0


def cmd_demo(a) -> int:
    """Train on LASA, evaluate on the test split, write samples and a training-curve plot."""
    import torch
    from . import checkpoint
    from .evaluate import evaluate
    from .train import TrainConfig, best_checkpoint, fit
    from .writers import plot_curves, plot_handwriting
    out = Path(a.out)
    t0 = time.time()
    run = out / "train"
    tc = TrainConfig(max_epochs=a.max_epochs or 120, batch_size=16, lr=1e-3, patience=30, seed=0)
    resume = (run / "last.ckpt").exists()
    print(f"[demo] training {a.model} on LASA handwriting into {run}" + (" (resuming)" if resume else ""))
    trainer, module, prepared = fit("lasa", a.model, run, tc, data_opts={"subsample": 8}, resume=resume)
    model, normalizer, desc = checkpoint.load(best_checkpoint(run))
    torch.manual_seed(0)
    res = evaluate(model, prepared.sequences("test"), 40, progress=False)
    res.update(split="test", model=model.cfg.name, data="lasa", unit="nats per sequence")
    (out / "evaluation.json").write_text(json.dumps(res, indent=2) + "\n")
    seqs = prepared.data.sequences
    steps = int(sorted(len(s) for s in seqs)[len(seqs) // 2])
    x = normalizer.invert(model.sample(16, steps)).numpy()
    plot_handwriting(out / "samples.png", list(x), titles=[f"sample {i}" for i in range(16)])
    real = [seqs[i] for i in prepared.splits["test"][:16]]
    plot_handwriting(out / "test_data.png", real, titles=[f"test {i}" for i in range(len(real))])
    plot_curves(out / "training_curve.png", run / "logs" / "csv" / "metrics.csv",
                title=f"{a.model} on LASA")
    print(f"[demo] {model.cfg.name}, {model.num_parameters():,} parameters, "
          f"{trainer.current_epoch} epochs, {time.time() - t0:.0f} s")
    print(f"[demo] test split ({res['num_sequences']} trajectories): ELBO >= {res['elbo']:.2f}, "
          f"log-likelihood ~= {res['log_likelihood']:.2f} nats per trajectory (K=40), "
          f"{res['nats_per_step']:.3f} nats per step")
    print(f"[demo] wrote {out / 'samples.png'}, {out / 'test_data.png'}, "
          f"{out / 'training_curve.png'}, {out / 'evaluation.json'}")
    return 0


def cmd_reproduce(a) -> int:
    from .reproduce import reproduce
    datasets = a.datasets.split(",") if a.datasets else None
    reproduce(a.setup, a.out, a.jobs, datasets, a.accelerator, a.budget_scale, log=print)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "latents": cmd_latents, "data": cmd_data, "demo": cmd_demo, "reproduce": cmd_reproduce}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    import torch
    from .errors import VRNNError
    from .train import default_threads
    torch.set_num_threads(args.threads or default_threads())
    _quiet_lightning()
    try:
        return COMMANDS[args.command](args)
    except VRNNError as exc:
        _err(f"vrnn {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err(f"vrnn {args.command}: interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
