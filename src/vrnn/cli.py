"""The ``vrnn`` command: thin glue over data, train, inference, generate and writers.

Every option is declared once (vrnn.options): the flags of ``train`` come from
``TrainConfig`` and ``VRNNConfig``, those of the other commands from the small dataclasses
below, and the same declarations check config files. A bad value ends with one line
naming the option (or file and field) and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from .options import add_arguments, option, parsed
from .smc import FilterOptions

ESTIMATORS = ("is", "smc", "all")

EXAMPLES = {
    "train": """examples:
  vrnn train --data lasa --model vrnn-gmm --out runs/lasa
  vrnn train --data asterisk-en --model vrnn-gauss --out runs/ast --max-time 30
  vrnn train --data chorales --model vrnn-gauss --out runs/fivo --objective fivo --particles 4
  vrnn train --data asterisk-en --model rnn-gauss --output ar --out runs/rnn-ar
  vrnn train --data my_arrays/ --model srnn-gauss --out runs/mine --batch-size 16
  vrnn train --data lasa --model vrnn-gmm --out runs/lasa --resume
  vrnn train --data lasa --model vrnn-gauss --out runs/ddp --devices 2 --strategy ddp""",
    "evaluate": """examples:
  vrnn evaluate runs/lasa/best.ckpt --data lasa
  vrnn evaluate runs/lasa/best.ckpt --data lasa --estimator all --samples 40 --json
  vrnn evaluate runs/lasa/best.ckpt --data lasa --split valid --estimator smc --samples 100""",
    "sample": """examples:
  vrnn sample runs/lasa/best.ckpt --num 16 --steps 250 --out samples/
  vrnn sample runs/ast/best.ckpt --num 4 --steps 160 --out wavs/ --mean
  vrnn sample runs/mine/best.ckpt --num 4 --steps 100 --prefix start.npy --out cont/""",
    "latents": """examples:
  vrnn latents runs/lasa/best.ckpt --data lasa --out lasa_latents.npz
  vrnn latents runs/mine/best.ckpt --data new_recordings/ --out scores.npz --sample
  vrnn latents runs/ast/best.ckpt --data asterisk-en --split test --smc 40 --out smc.npz""",
    "resynth": """examples:
  vrnn train --data asterisk-en-stft --model srnn-gauss --out runs/spec   # the IS head by default
  vrnn resynth runs/spec/best.ckpt --data asterisk-en-stft --out resynth/
  vrnn resynth runs/spec/best.ckpt --data asterisk-en-stft --max-utterances 5 --metrics si_sdr --out r/""",
    "data": """examples:
  vrnn data list
  vrnn data info lasa
  vrnn data info ~/corpora/TIMIT/
  vrnn data fetch asterisk-en""",
    "reproduce": """examples:
  vrnn reproduce --setup cpu --plan                       # what would run, and how long
  vrnn reproduce --setup cpu --out results
  vrnn reproduce --setup cpu --datasets lasa,chorales --rows vrnn-gauss,rnn-gauss
  vrnn reproduce --setup cpu --report-only                # tables from the committed records
  vrnn reproduce --setup cpu --tables polyphonic --datasets jsb --plan   # the piano-roll benchmark
  vrnn reproduce --setup paper --accelerator gpu --jobs 1 --out results-paper""",
    "demo": """examples:
  vrnn demo --out runs/demo""",
    "windows": """examples:
  vrnn windows normal.csv --length 100 --holdout 0.1 --out windows/ --holdout-out holdout.csv""",
    "score": """examples:
  vrnn score runs/m/best.ckpt --data normal.csv --out normal_scores.csv
  vrnn score runs/m/best.ckpt --data smd.npz --key test --out scores.csv --particles 64""",
    "stream": """examples:
  tail -n +1 -f metrics.csv | vrnn stream runs/m/best.ckpt --threshold th.json
  vrnn stream runs/m/best.ckpt --input metrics.csv --follow --state scorer.pt --output json
  vrnn stream runs/m/best.ckpt --input rows.jsonl --on-bad-row stop""",
    "threshold": """examples:
  vrnn threshold normal_scores.csv --out th.json                  # POT at risk 1e-3
  vrnn threshold normal_scores.csv --out th.json --method quantile --risk 1e-4""",
    "detect": """examples:
  vrnn detect scores.csv --threshold th.json --out events.csv
  vrnn detect scores.csv --threshold th.json --format json --gap 5""",
}

SPLITS = ("train", "valid", "test", "all")


@dataclass
class GlobalOptions:
    threads: int | None = option(None, "intra-op CPU threads (default 1, or $VRNN_THREADS; "
                                       "measured fastest here)", min=1, flag="--threads",
                                 env="VRNN_THREADS")
    denormals: str = option("flush", "CPU: flush subnormal floats to zero (x86 FTZ/DAZ; a mixture's "
                                     "gradient is full of them and they slow matrix products many "
                                     "times over), or keep them", choices=("flush", "keep"),
                            flag="--denormals")


@dataclass
class EvaluateOptions(FilterOptions):
    split: str = option("test", "which split to score", choices=SPLITS, flag="--split")
    estimator: str = option("is", "the log-likelihood estimate: is (importance sampling), smc "
                                  "(particle filter) or all (ELBO, IS and SMC side by side)",
                            choices=ESTIMATORS, flag="--estimator")
    samples: int = option(40, "importance samples or particles K", min=1, flag="--samples")
    batch_size: int = option(32, "sequences per scoring pass at most", min=1, flag="--batch-size")
    max_rows: int = option(4096, "memory cap: sequences x samples in one pass", min=1, flag="--max-rows")
    max_memory: float = option(1024.0, "memory cap of one scoring pass in MiB", above=0.0,
                               flag="--max-memory", metavar="MIB")
    seed: int = option(0, "seed of the sampling noise", min=0, flag="--seed")
    json: bool = option(False, "print one (strict) JSON object", flag="--json")


@dataclass
class SampleOptions:
    num: int = option(8, "sequences to generate", min=1, flag="--num")
    steps: int | None = option(None, "steps to generate (default: the median training length)",
                               min=1, flag="--steps")
    prefix: str | None = option(None, "a file (.npy/.csv/audio) whose first sequence is continued",
                                flag="--prefix", metavar="FILE")
    mean: bool = option(False, "feed back a point instead of a draw: the mean of real-valued "
                               "outputs (Gaussian, mixture, each dimension under ar), the most "
                               "likely value of bits (piano-roll notes, pen lifts)", flag="--mean")
    seed: int = option(0, "seed of the sampling noise", min=0, flag="--seed")


@dataclass
class LatentsOptions(FilterOptions):
    split: str = option("all", "which split to export", choices=SPLITS, flag="--split")
    sample: bool = option(False, "use a posterior draw, not the posterior mean", flag="--sample")
    smc: int | None = option(None, "also run a particle filter with this many particles and "
                                   "export its per-step ESS, where it resampled, and log Z",
                             min=1, flag="--smc", metavar="K")
    batch_size: int = option(32, "sequences per pass at most", min=1, flag="--batch-size")
    max_memory: float = option(1024.0, "memory cap of one pass in MiB: long sequences go in "
                                       "smaller batches", above=0.0, flag="--max-memory", metavar="MIB")
    seed: int = option(0, "seed of the sampling noise", min=0, flag="--seed")


@dataclass
class ResynthOptions:
    split: str = option("test", "which split to resynthesise", choices=SPLITS, flag="--split")
    max_utterances: int | None = option(None, "resynthesise the first N utterances of the split "
                                              "only", min=1, flag="--max-utterances", metavar="N")
    metrics: str = option("si_sdr,pesq,estoi", "comma-separated scores: si_sdr (torchmetrics), pesq "
                                              "and estoi (the extra: pip install 'vrnn[speech]')",
                          flag="--metrics")


@dataclass
class ReproduceOptions:
    setup: str = option("cpu", "cpu: sized for 2 cores; paper: the paper's sizes, for a GPU",
                        choices=("cpu", "paper"), flag="--setup")
    out: str = option("results", "folder of the records and tables", flag="--out")
    jobs: int = option(2, "runs in parallel (one thread each)", min=1, flag="--jobs")
    datasets: str | None = option(None, "comma-separated subset of the datasets", flag="--datasets")
    rows: str | None = option(None, "comma-separated subset of the rows", flag="--rows")
    tables: str | None = option(None, "comma-separated subset of the tables: paper, beyond, "
                                      "wallclock, polyphonic (the piano-roll benchmark)",
                                flag="--tables")
    seeds: int | None = option(None, "at most this many seeds per dataset", min=1, flag="--seeds")
    accelerator: str | None = option(None, "passed to every `vrnn train` (e.g. gpu)",
                                     flag="--accelerator")
    budget_scale: float = option(1.0, "multiply every run's step cap and time limit (e.g. 0.05 "
                                      "for a smoke test)", above=0.0, flag="--budget-scale")
    plan: bool = option(False, "print the plan and its time estimate, run nothing", flag="--plan")
    report_only: bool = option(False, "write the tables, figure and samples from the finished "
                                      "records only, training nothing", flag="--report-only")
    no_report: bool = option(False, "train and write the records, leave the tables as they are "
                                    "(for queued runs; --report-only writes them later)",
                             flag="--no-report")


@dataclass
class DemoOptions:
    out: str = option("runs/demo", "output folder", flag="--out")
    max_epochs: int | None = option(None, "epochs (default 120)", min=1, flag="--max-epochs")
    model: str = option("vrnn-gmm", "the model row", flag="--model")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the option and the problem), exit 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    from .config import PRESETS, VRNNConfig
    from .train import TrainConfig
    p = _Parser(
        prog="vrnn", description="Variational Recurrent Neural Networks (Chung et al. 2015) and "
        "their family: train, evaluate and sample on speech, handwriting, music and your own arrays.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"models: {', '.join(PRESETS)}\n"
               "datasets: lasa, chorales, folk, asterisk-en, fillets-cs, or any path\n"
               "run `vrnn COMMAND --help` for the options and examples of each command")
    add_arguments(p, GlobalOptions)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def cmd(name, help_):
        return sub.add_parser(name, help=help_, description=help_, epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    t = cmd("train", "train a model on a dataset; writes best.ckpt, last.ckpt and logs/ into --out")
    t.add_argument("--data", required=True, help="a registered dataset (vrnn data list) or a file or "
                   "folder of audio, IAM XML or arrays")
    t.add_argument("--model", required=True, help=f"one of {', '.join(PRESETS)}")
    t.add_argument("--out", required=True, help="the run's folder: best.ckpt, last.ckpt, logs/, summary.json")
    t.add_argument("--resume", action="store_true", help="continue from OUT/last.ckpt")
    t.add_argument("--config", help="JSON file: {\"model\": {...}, \"train\": {...}, \"data\": {...}}")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (it is also off when "
                   "stderr is not a terminal)")
    add_arguments(t, VRNNConfig, default_text="by the row and the data kind (vrnn.train.KIND_DEFAULTS)")
    add_arguments(t, TrainConfig)

    e = cmd("evaluate", "ELBO and log-likelihood estimates of a checkpoint on data, normalised "
            "and in the data's own units")
    e.add_argument("checkpoint", help="a checkpoint written by vrnn train (best.ckpt or last.ckpt)")
    e.add_argument("--data", required=True, help="a registered dataset or a path; the split is drawn as "
                   "in training")
    add_arguments(e, EvaluateOptions)

    s = cmd("sample", "generate sequences and write files a person can check")
    s.add_argument("checkpoint", help="a checkpoint written by vrnn train (best.ckpt or last.ckpt)")
    s.add_argument("--out", required=True, help="folder for the samples (.npy and a file to check by "
                   "eye or ear per sequence)")
    add_arguments(s, SampleOptions)

    la = cmd("latents", "per-step KL, posterior means and log-likelihood terms for every sequence")
    la.add_argument("checkpoint", help="a checkpoint written by vrnn train (best.ckpt or last.ckpt)")
    la.add_argument("--data", required=True, help="a registered dataset or a path")
    la.add_argument("--out", required=True, help="output .npz file")
    add_arguments(la, LatentsOptions)

    rs = cmd("resynth", "the DVAE review's speech evaluation: resynthesise spectrograms through the "
             "posterior mean with the original phase; SI-SDR, PESQ and ESTOI per utterance")
    rs.add_argument("checkpoint", help="a checkpoint of a model trained with --output is on spectrogram "
                    "data (e.g. asterisk-en-stft)")
    rs.add_argument("--data", required=True, help="spectrogram data: a registered name or audio with "
                    "the data option spectrogram; the split is drawn as in training")
    rs.add_argument("--out", required=True, help="folder: wav/, metrics.csv, metrics.json")
    add_arguments(rs, ResynthOptions)

    d = cmd("data", "list, inspect and fetch datasets")
    dsub = d.add_subparsers(dest="data_command", required=True, parser_class=_Parser)
    dsub.add_parser("list", help="registered datasets and what is fetched")
    di = dsub.add_parser("info", help="what SPEC holds (kind, sequences, lengths, duration)")
    di.add_argument("spec", help="a registered dataset or a file or folder")
    df = dsub.add_parser("fetch", help="download a speech corpus from Debian's archive into the cache")
    df.add_argument("name", choices=["asterisk-en", "fillets-cs"], help="the corpus to fetch")

    r = cmd("reproduce", "the paired, converged reproduction: Table 1, the successors beside it, "
            "equal wall clock against the public style; tables, the analysis figure and samples")
    add_arguments(r, ReproduceOptions)

    m = cmd("demo", "the main job: train a VRNN on LASA handwriting, evaluate, draw samples and curves")
    add_arguments(m, DemoOptions)
    _add_monitoring_commands(cmd)
    return p


# ------------------------------------------------------- monitoring (vrnn.monitor)
def _add_monitoring_commands(cmd) -> None:
    from .monitor import DetectOptions, StreamOptions, ThresholdOptions, WindowOptions
    from .scoring import ScoreOptions
    wi = cmd("windows", "cut one long series of normal operation into training windows (.npy) and "
             "keep its last part apart as normal data for the threshold")
    wi.add_argument("data", help="rows: .csv (header optional), .jsonl, .npy or .npz")
    wi.add_argument("--key", help="the array of an .npz file")
    wi.add_argument("--out", required=True, help="folder of the windows (vrnn train --data OUT)")
    wi.add_argument("--holdout-out", help="CSV of the held-out last rows")
    add_arguments(wi, WindowOptions)
    sc = cmd("score", "anomaly scores of every row of a file, causally: -log p(x_t | x_<t) in the "
             "data's units and each dimension's share (CSV)")
    sc.add_argument("checkpoint")
    sc.add_argument("--data", required=True, help="rows: .csv (header optional), .jsonl, .npy or .npz")
    sc.add_argument("--key", help="the array of an .npz file")
    sc.add_argument("--out", required=True, help="output score CSV")
    add_arguments(sc, ScoreOptions)
    st = cmd("stream", "score rows as they arrive (stdin or a growing file), one flushed output "
             "line per row; the state can be saved and restored")
    st.add_argument("checkpoint")
    st.add_argument("--input", help="a file of rows (default: stdin)")
    add_arguments(st, StreamOptions)
    add_arguments(st, ScoreOptions)
    th = cmd("threshold", "an alarm threshold from scores of normal data (no labels): POT or a quantile")
    th.add_argument("scores", help="a score CSV (vrnn score) of normal data")
    th.add_argument("--out", required=True, help="output threshold JSON")
    add_arguments(th, ThresholdOptions)
    de = cmd("detect", "alarms (events) from scores and a threshold: start, end, peak, top dimensions")
    de.add_argument("scores", help="a score CSV (vrnn score)")
    de.add_argument("--threshold", required=True, help="a threshold JSON (vrnn threshold)")
    de.add_argument("--out", help="events file, .csv or .json (default: CSV on stdout)")
    add_arguments(de, DetectOptions)


def cmd_windows(a) -> int:
    from .monitor import WindowOptions, write_windows
    r = write_windows(a.data, a.out, a.holdout_out, WindowOptions(**parsed(WindowOptions, a)), key=a.key)
    print(f"{r['windows']} windows of {r['length']} steps -> {a.out}"
          + (f"; {r['holdout_rows']} held-out rows -> {a.holdout_out}" if a.holdout_out else ""), file=sys.stderr)
    return 0


def cmd_score(a) -> int:
    from .monitor import score_file
    from .scoring import ScoreOptions
    o = ScoreOptions(**parsed(ScoreOptions, a))
    s = score_file(a.checkpoint, a.data, a.out, o, key=a.key)
    print(f"scored {len(s.score)} rows -> {a.out} (mean score {s.score.mean():.4g} nats, max "
          f"{s.score.max():.4g})", file=sys.stderr)
    return 0


def cmd_stream(a) -> int:
    from .errors import DataError
    from .monitor import StreamOptions, load_scorer, stream
    from .scoring import ScoreOptions
    o = StreamOptions(**parsed(StreamOptions, a))
    scorer = load_scorer(a.checkpoint, ScoreOptions(**parsed(ScoreOptions, a)))
    if a.input is None:
        if o.follow:
            raise DataError("--follow reads a growing file: give it with --input")
        return stream(scorer, sys.stdin, sys.stdout, o, "stdin")
    path = Path(a.input)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, encoding="utf-8", errors="replace") as f:
        return stream(scorer, f, sys.stdout, o, str(path))


def cmd_threshold(a) -> int:
    from .monitor import ThresholdOptions, fit_threshold
    th = fit_threshold(a.scores, a.out, ThresholdOptions(**parsed(ThresholdOptions, a)))
    print(f"threshold {th['threshold']:.6g} ({th['method']}, risk {th['risk']:g}) -> {a.out}", file=sys.stderr)
    return 0


def cmd_detect(a) -> int:
    from .errors import ConfigError
    from .monitor import DetectOptions, detect, write_events
    o = DetectOptions(**parsed(DetectOptions, a))
    fmt = o.format or ("json" if a.out and a.out.endswith(".json") else "csv")
    if a.out and Path(a.out).suffix not in (".csv", ".json"):
        raise ConfigError(f"--out {a.out}: give a .csv or .json file")
    evs = detect(a.scores, a.threshold, o)
    write_events(evs, a.out, fmt)
    if a.out:
        print(f"{len(evs)} event(s) -> {a.out}", file=sys.stderr)
    return 0


def _quiet_lightning() -> None:
    import logging
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*isinstance.treespec, LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*litlogger.*")
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    # a --max-time stop inside an epoch saves last.ckpt without a validation score
    warnings.filterwarnings("ignore", message=".*could not find the monitored key.*")
    os.environ.setdefault("POSSIBLE_USER_WARNINGS", "off")
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch.accelerators.cuda",
                 "lightning.fabric.utilities.seed", "lightning.pytorch.trainer.connectors.signal_connector"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------- commands
def read_config(path: str | None) -> dict:
    """A --config file: a JSON object with the sections model, train and data, each checked
    against its declaration (unknown keys and bad values name the file and the field)."""
    from .config import VRNNConfig
    from .data import DataOptions
    from .errors import ConfigError
    from .options import check_section
    from .train import TrainConfig
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
    return {"model": check_section(VRNNConfig, cfg.get("model", {}), f"{p}: model",
                                   exclude=("x_dim", "family", "name")),  # --model picks the row
            "train": check_section(TrainConfig, cfg.get("train", {}), f"{p}: train"),
            "data": check_section(DataOptions, cfg.get("data", {}), f"{p}: data")}


def cmd_train(a) -> int:
    from .config import VRNNConfig
    from .train import TrainConfig, fit
    cfg = read_config(a.config)
    tdict = {**cfg.get("train", {}), **parsed(TrainConfig, a)}  # command-line flags win
    tc = TrainConfig(**tdict)
    overrides = {**cfg.get("model", {}), **parsed(VRNNConfig, a)}
    t0 = time.time()
    trainer, module, prepared = fit(a.data, a.model, a.out, tc, overrides, cfg.get("data", {}),
                                    resume=a.resume, progress=not a.no_progress and sys.stderr.isatty(),
                                    say=_err)
    if trainer.global_rank == 0:
        m = trainer.callback_metrics
        best = trainer.checkpoint_callback.best_model_score
        print(f"trained {a.model} on {prepared.data.name} ({len(prepared.splits['train'])} train / "
              f"{len(prepared.splits['valid'])} valid sequences), {module.model.num_parameters():,} "
              f"parameters, {_count(trainer.current_epoch, 'epoch')}, {_count(trainer.global_step, 'step')}, "
              f"{getattr(trainer, 'vrnn_seconds', 0.0):.0f} s training ({time.time() - t0:.0f} s with "
              "loading the data)")
        if best is not None:
            last = m.get("valid/bound")  # absent when a finished run was resumed (no epoch ran)
            print(f"best validation bound ({tc.objective}) {float(best):.2f} nats per sequence"
                  + ("" if last is None else f"; last {float(last):.2f}"))
        ckpts = [str(Path(a.out) / n) for n in ("best.ckpt", "last.ckpt") if (Path(a.out) / n).exists()]
        print(f"checkpoints: {', '.join(ckpts)}; logs: {Path(a.out) / 'logs'}")
    return 0


def _number(v, digits: int = 2) -> str:
    """A score for people: fixed decimals, or 6 significant digits beyond 1e12 (never 70 digits)."""
    if v is None:
        return "n/a (non-finite)"
    return f"{v:.{digits}f}" if abs(v) < 1e12 else f"{v:.6g}"


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def cmd_evaluate(a) -> int:
    import torch
    from .evaluate import evaluate, load_for_scoring, strict_json
    o = EvaluateOptions(**parsed(EvaluateOptions, a))
    torch.manual_seed(o.seed)
    model, normalizer, _, data, _, seqs = load_for_scoring(a.checkpoint, a.data, o.split)
    smc_opts = dict(resample=o.resample, threshold=o.ess_threshold, resampler=o.resampler)
    res = evaluate(model, seqs, o.samples, o.batch_size, o.max_rows, int(o.max_memory * 2 ** 20),
                   progress=not o.json, estimator=o.estimator, normalizer=normalizer, smc_opts=smc_opts,
                   seed=o.seed)
    res.update(split=o.split, model=model.cfg.name, family=model.cfg.family, data=data.name,
               unit="nats per sequence", normalised=True)
    bad = [f"{n} of {res['num_sequences']} sequences under {k}" for k, n in res["non_finite"].items() if n]
    if bad:
        _err(f"vrnn evaluate: warning: non-finite scores even in float64 ({'; '.join(bad)}); "
             "their means are reported as null")
    if o.json:
        print(json.dumps(strict_json(res), allow_nan=False))
        return 0
    fmt = _number
    print(f"{model.cfg.name} on {data.name} ({o.split} split, {res['num_sequences']} sequences, "
          f"{res['num_steps']} steps)")
    names = {"elbo": "ELBO               >=", "is": "log-likelihood IS  ~= ", "smc": "log-likelihood SMC ~= ",
             "exact": "log-likelihood      ="}
    for k, f in res["estimators"].items():
        extra = f" (K={o.samples})" if k in ("is", "smc") else (" (exact)" if k == "exact" else "")
        print(f"  {names[k]} {fmt(f['per_sequence'])} nats per sequence{extra}; "
              f"{fmt(f['per_step'], 4)} per step; {fmt(f['bits_per_dim'], 4)} bits/dim")
        print(f"  {'':21s} {fmt(f['per_sequence_raw'])} nats per sequence in the data's own units; "
              f"{fmt(f['bits_per_dim_raw'], 4)} bits/dim")
    for k, why in res.get("not_offered", {}).items():
        print(f"  ({k} not offered: {why})")
    print(f"  (normalised data, as in the paper; the data's own units add "
          f"{res['raw_offset_per_step']:.4f} nats per step, -sum_d log s_d)")
    if res["rescored_in_float64"]:
        print(f"  {res['rescored_in_float64']} sequence(s) overflowed float32 and were scored in float64")
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


def _check_sample_memory(model, num: int, steps: int) -> None:
    """Refuse, before allocating, a sample that cannot fit in memory: the draws (kept, then
    de-normalised and written) and the per-step state of every sequence."""
    from .errors import ConfigError
    from .inference import row_step_bytes
    from .train import machine_memory
    memory = machine_memory("cpu")
    need = 3 * num * steps * model.cfg.x_dim * 4 + 2 * num * row_step_bytes(model)
    if memory is not None and need > memory:
        flag, value = ("--num", num) if num * row_step_bytes(model) > memory / 4 or num >= steps else ("--steps", steps)
        raise ConfigError(f"{flag} {value}: {num:,} sequences of {steps:,} steps would need about "
                          f"{need / 2 ** 30:,.1f} GiB, more than this machine's {memory / 2 ** 30:,.1f} GiB")


def cmd_sample(a) -> int:
    import numpy as np
    import torch
    from . import checkpoint
    from .writers import write_samples
    o = SampleOptions(**parsed(SampleOptions, a))
    torch.manual_seed(o.seed)
    model, normalizer, desc = checkpoint.load(a.checkpoint)
    steps = o.steps or int(desc.get("median_length") or 100)
    _check_sample_memory(model, o.num, steps)
    prefix, raw_prefix = (None, None) if not o.prefix else _prefix_sequence(o.prefix, model, normalizer)
    from .generate import sample
    x = sample(model, o.num, steps, prefix=prefix, mean=o.mean,
               progress=lambda done, n: _err(f"vrnn sample: {done:,} of {n:,} steps"))
    x = normalizer.invert(x).numpy()
    samples = [x[i] if raw_prefix is None else np.concatenate([raw_prefix, x[i]]) for i in range(o.num)]
    paths = write_samples(a.out, samples, desc["kind"], desc.get("meta", {}))
    what = f"{o.num} sequences of {steps} steps" + (f" after a {len(raw_prefix)}-step prefix" if o.prefix else "")
    print(f"wrote {len(paths)} files for {what} to {a.out}")
    return 0


def cmd_latents(a) -> int:
    import numpy as np
    import torch
    from .evaluate import Float64Fallback, load_for_scoring, padded_batches
    from .smc import particle_filter
    from .writers import write_npz
    o = LatentsOptions(**parsed(LatentsOptions, a))
    torch.manual_seed(o.seed)
    model, _, _, _, idx, seqs = load_for_scoring(a.checkpoint, a.data, o.split)
    if o.smc and not model.latent:
        from .errors import ConfigError
        raise ConfigError(f"--smc: {a.checkpoint} holds an RNN row, which has no latent to filter")
    if o.smc and model.cannot(model.cfg, "smc"):
        from .errors import ConfigError
        raise ConfigError(f"--smc: {model.cannot(model.cfg, 'smc')}")
    lengths = [len(s) for s in seqs]
    T = max(lengths)
    arrays: dict[str, np.ndarray] = {}  # (N, T, ...) in the split's order, zero-padded

    def put(k, v, batch):
        v = v.numpy() if hasattr(v, "numpy") else v
        if k not in arrays:
            arrays[k] = np.zeros((len(seqs),) + ((T,) + v.shape[2:] if v.ndim > 1 else ()), dtype=v.dtype)
        elif arrays[k].dtype == np.float32 and v.dtype == np.float64:  # a batch scored in float64
            arrays[k] = arrays[k].astype(np.float64)
        if v.ndim > 1:
            arrays[k][batch, :v.shape[1]] = v
        else:
            arrays[k][batch] = v

    scorer = Float64Fallback(model)  # scores that overflow float32 are computed in float64
    smc_float64 = smc_bad = 0
    for batch, x, mask in padded_batches(model, seqs, o.batch_size, int(o.max_memory * 2 ** 20)):
        for k, v in scorer.latents(x, mask, sample=o.sample).items():
            if k != "h":
                put(k, v, batch)
        if o.smc:
            opts = dict(resample=o.resample, threshold=o.ess_threshold, resampler=o.resampler)
            f = particle_filter(model, x, mask, o.smc, **opts)
            if not bool(torch.isfinite(f.log_z).all() and torch.isfinite(f.ess).all()):
                f = particle_filter(scorer.double, x.double(), mask.double(), o.smc, **opts)  # float32 overflowed
                smc_float64 += len(batch)
                smc_bad += int((~torch.isfinite(f.log_z)).sum())
            put("ess", f.ess, batch)
            put("resampled", f.resampled, batch)
            put("log_z_smc", f.log_z, batch)
    padded = np.arange(T)[None, :] >= np.asarray(lengths)[:, None]
    for v in arrays.values():
        if v.ndim > 1:
            v[padded] = 0  # whatever the batching, steps past a sequence's end read 0
    arrays["lengths"] = np.asarray(lengths)
    arrays["index"] = np.asarray(idx)
    write_npz(a.out, arrays)
    if smc_float64:
        _err(f"vrnn latents: notice: the particle filter overflowed float32 on {smc_float64} sequence(s): "
             "filtered again in float64" + (f"; log_z_smc is still not finite for {smc_bad}" if smc_bad else ""))
    print(f"wrote per-step {', '.join(sorted(k for k in arrays if k not in ('lengths', 'index')))} "
          f"for {len(seqs)} sequences to {a.out}")
    return 0


def cmd_resynth(a) -> int:
    from .resynth import resynthesise_checkpoint
    o = ResynthOptions(**parsed(ResynthOptions, a))
    metrics = tuple(m.strip() for m in o.metrics.split(",") if m.strip())
    res = resynthesise_checkpoint(a.checkpoint, a.data, a.out, o.split, metrics, o.max_utterances,
                                  progress=_err)
    means = ", ".join(f"{m} {'n/a' if res['means'][m] is None else format(res['means'][m], '.3f')} "
                      f"({res['counted'][m]})" for m in metrics)
    print(f"resynthesised {res['utterances']} utterance(s) into {a.out}: mean {means}")
    return 0


def cmd_data(a) -> int:
    from .data import DATASETS, describe, fetch
    from .data.fetch import fetched_path
    if a.data_command == "list":
        for name, text in DATASETS.items():
            state = ""
            if name in ("asterisk-en", "fillets-cs", "asterisk-en-stft"):
                path = fetched_path(name.removesuffix("-stft"))
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


def _finished(run: Path, max_epochs: int) -> dict | None:
    """The summary of a training run in ``run`` that ended on its own (stopped early, or at
    its epoch or step cap within ``max_epochs``), else None (no run, or one to resume)."""
    try:
        summary = json.loads((run / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or not (run / "last.ckpt").exists():
        return None
    if summary.get("stopped") == "early" or (summary.get("stopped") in ("epochs", "steps")
                                             and int(summary.get("epochs", 0)) >= max_epochs):
        return summary
    return None


def cmd_demo(a) -> int:
    """Train on LASA, evaluate on the test split, write samples and a training-curve plot."""
    import torch
    from . import checkpoint
    from .evaluate import evaluate
    from .train import TrainConfig, best_checkpoint, fit, prepare
    from .writers import plot_curves, plot_handwriting
    o = DemoOptions(**parsed(DemoOptions, a))
    out = Path(o.out)
    t0 = time.time()
    run = out / "train"
    tc = TrainConfig(max_epochs=o.max_epochs or 120, batch_size=16, lr=1e-3, patience=30, seed=0)
    resume = (run / "last.ckpt").exists()
    finished = _finished(run, tc.max_epochs)
    if finished is not None:  # a finished run is scored again, not trained further
        print(f"[demo] {run} already holds a finished run ({finished['stopped']}); scoring it again")
        prepared, epochs = prepare("lasa", tc.seed, tc.fractions, subsample=8), finished["epochs"]
    else:
        print(f"[demo] training {o.model} on LASA handwriting into {run}" + (" (resuming)" if resume else ""))
        trainer, module, prepared = fit("lasa", o.model, run, tc, data_opts={"subsample": 8}, resume=resume,
                                        progress=sys.stderr.isatty(), say=_err)
        epochs = trainer.current_epoch
    model, normalizer, desc = checkpoint.load(best_checkpoint(run))
    prepared = prepared.for_model(model.cfg)
    torch.manual_seed(0)
    res = evaluate(model, prepared.sequences("test"), 40, progress=False, normalizer=normalizer)
    res.update(split="test", model=model.cfg.name, data="lasa", unit="nats per sequence")
    from .evaluate import strict_json
    from .writers import write_text
    write_text(out / "evaluation.json", json.dumps(strict_json(res), indent=2, allow_nan=False) + "\n")
    seqs = prepared.data.sequences
    steps = int(sorted(len(s) for s in seqs)[len(seqs) // 2])
    x = normalizer.invert(model.sample(16, steps)).numpy()
    plot_handwriting(out / "samples.png", list(x), titles=[f"sample {i}" for i in range(16)])
    real = [seqs[i] for i in prepared.splits["test"][:16]]
    plot_handwriting(out / "test_data.png", real, titles=[f"test {i}" for i in range(len(real))])
    plot_curves(out / "training_curve.png", run / "logs" / "csv" / "metrics.csv",
                title=f"{o.model} on LASA")
    print(f"[demo] {model.cfg.name}, {model.num_parameters():,} parameters, "
          f"{_count(epochs, 'epoch')}, {time.time() - t0:.0f} s")
    fmt = _number
    scores = (f"log-likelihood = {fmt(res['log_likelihood'])} nats per trajectory (exact)" if res["exact"] else
              f"ELBO >= {fmt(res['elbo'])}, log-likelihood ~= {fmt(res['log_likelihood'])} nats per "
              "trajectory (K=40)")
    print(f"[demo] test split ({res['num_sequences']} trajectories): {scores}, "
          f"{fmt(res['nats_per_step'], 3)} nats per step (normalised offsets; "
          f"{fmt(res['log_likelihood_raw'])} in the data's own units)")
    print(f"[demo] wrote {out / 'samples.png'}, {out / 'test_data.png'}, "
          f"{out / 'training_curve.png'}, {out / 'evaluation.json'}")
    return 0


def cmd_reproduce(a) -> int:
    from .reproduce import reproduce
    from .errors import ConfigError
    o = ReproduceOptions(**parsed(ReproduceOptions, a))

    def split(text, flag):  # not given: all; given: at least one name ('' is not "all")
        if text is None:
            return None
        names = [n.strip() for n in text.split(",") if n.strip()]
        if not names:
            raise ConfigError(f"{flag}: names nothing (got {text!r}); leave it out for all")
        return names

    reproduce(o.setup, o.out, o.jobs, split(o.datasets, "--datasets"), o.accelerator, o.budget_scale,
              log=print, rows=split(o.rows, "--rows"), tables=split(o.tables, "--tables"), seeds=o.seeds,
              plan_only=o.plan, report_only=o.report_only, no_report=o.no_report)
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "sample": cmd_sample,
            "latents": cmd_latents, "resynth": cmd_resynth, "data": cmd_data, "demo": cmd_demo, "reproduce": cmd_reproduce,
            "windows": cmd_windows, "score": cmd_score, "stream": cmd_stream, "threshold": cmd_threshold, "detect": cmd_detect}


def main(argv=None) -> int:
    from .errors import Interrupted, VRNNError
    command = "vrnn"
    try:
        args = _parser().parse_args(argv)
        command = f"vrnn {args.command}"
        g = GlobalOptions(**parsed(GlobalOptions, args))
        import torch
        from .train import default_threads
        # before the thread pool exists: its threads inherit the flag (set later, only this
        # thread would flush; benchmarks/denormals.py)
        flushed = g.denormals == "flush" and torch.set_flush_denormal(True)
        torch.set_num_threads(g.threads or default_threads())
        _quiet_lightning()
        try:
            return COMMANDS[args.command](args)
        finally:
            if flushed:
                torch.set_flush_denormal(False)  # main() called in a longer-lived process
    except Interrupted as exc:  # a clean stop on SIGINT/SIGTERM (what could be saved, is)
        _err(f"{command}: {exc}")
        return 128 + exc.signum
    except VRNNError as exc:
        _err(f"{command}: error: {exc}")
        return 2
    except OSError as exc:  # a full disk, a folder that cannot be written, ...
        where = exc.filename or ""
        _err(f"{command}: error: {where}{': ' if where else ''}{exc.strerror or exc}")
        return 2
    except KeyboardInterrupt:
        _err(f"{command}: interrupted")
        return 130
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2, one line printed)
        return exc.code if isinstance(exc.code, int) else 2


if __name__ == "__main__":
    sys.exit(main())
