"""Reproduce the paper's Table 1 comparison and its analysis figure on installable data.

    vrnn reproduce --setup cpu --out results/

trains and evaluates the five Table 1 rows on four datasets (asterisk-en for Blizzard,
fillets-cs for TIMIT, LASA for IAM-OnDB, Bach chorales for JSB) under the paper's
protocol: parameter counts matched to RNN-Gauss by sizing each row's MLPs, the same
budget and early stopping on the validation bound for every row, the test split unseen
in training, ELBO and a 40-sample importance-sampled estimate for VRNN rows and the exact
log-likelihood for RNN rows. Each (dataset, row, seed) run is a `vrnn train` + `vrnn
evaluate --json` pair in its own process, ``--jobs`` at a time; finished runs are kept in
OUT/runs and skipped when the command is run again, so an interrupted reproduction resumes.
Then it writes OUT/table1.md, OUT/table1.json, OUT/analysis.png and OUT/samples/.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, VRNNError

ROWS = ["rnn-gauss", "rnn-gmm", "vrnn-i-gauss", "vrnn-gauss", "vrnn-gmm"]
BINARY_ROWS = ["rnn-gauss", "vrnn-i-gauss", "vrnn-gauss"]  # Bernoulli head; no GMM rows

DATASETS = {
    "asterisk-en": {"plays": "Blizzard", "unit": "nats per 0.5 s sequence", "rows": ROWS},
    "fillets-cs": {"plays": "TIMIT", "unit": "nats per utterance", "rows": ROWS},
    "lasa": {"plays": "IAM-OnDB", "unit": "nats per trajectory", "rows": ROWS},
    "chorales": {"plays": "JSB Chorales", "unit": "nats per step", "rows": BINARY_ROWS},
}


def _speech(h, z, width, layers):
    return dict(h_dim=h, z_dim=z, phi_x_dim=width, phi_z_dim=width, enc_dim=width,
                prior_dim=width, dec_dim=width, phi_x_layers=layers, phi_z_layers=layers,
                enc_layers=layers, prior_layers=layers, dec_layers=layers)


# Per dataset: model sizes (of RNN-Gauss; the other rows are matched to its parameter
# count), training options, seeds, and the budget of every row.
SETUPS = {
    "cpu": {
        "asterisk-en": dict(model=_speech(256, 64, 256, 2), seeds=[0, 1], minutes=6.0,
                            train=dict(batch_size=32, lr=1e-3, patience=1000)),
        "fillets-cs": dict(model=_speech(256, 64, 256, 2), seeds=[0, 1], minutes=6.0,
                           train=dict(batch_size=16, lr=1e-3, tbptt=100, patience=1000)),
        "lasa": dict(model=_speech(128, 16, 64, 1), seeds=[0], minutes=5.0, data=dict(subsample=8),
                     train=dict(batch_size=16, lr=1e-3, patience=1000)),
        "chorales": dict(model=_speech(128, 16, 64, 1), seeds=[0], minutes=3.0,
                         train=dict(batch_size=16, lr=1e-3, patience=1000)),
    },
    # The paper's sizes (docs/paper.md); meant for a GPU: --accelerator gpu.
    "paper": {
        "asterisk-en": dict(model=_speech(4000, 200, 600, 4), seeds=[0, 1], minutes=240.0,
                            train=dict(batch_size=128, lr=3e-4, patience=10)),
        "fillets-cs": dict(model=_speech(2000, 200, 500, 4), seeds=[0, 1], minutes=240.0,
                           train=dict(batch_size=64, lr=1e-3, tbptt=200, patience=10)),
        "lasa": dict(model=_speech(1200, 50, 250, 1), seeds=[0, 1], minutes=60.0,
                     train=dict(batch_size=32, lr=3e-4, patience=20)),
        "chorales": dict(model=_speech(1200, 50, 250, 1), seeds=[0, 1], minutes=60.0,
                         train=dict(batch_size=32, lr=3e-4, patience=20)),
    },
}

WIDTHS = ("phi_x_dim", "phi_z_dim", "enc_dim", "prior_dim", "dec_dim")


def count_params(row: str, x_dim: int, model: dict, output: str | None) -> int:
    from .config import VRNNConfig
    from .model import VRNN
    extra = {"output": output} if output else {}
    return VRNN(VRNNConfig.preset(row, x_dim=x_dim, **model, **extra)).num_parameters()


def match_params(row: str, x_dim: int, base: dict, output: str | None = None) -> dict:
    """The row's model options with one MLP width chosen so that its parameter count is
    as close as possible to RNN-Gauss's with ``base`` (the paper's protocol)."""
    target = count_params("rnn-gauss", x_dim, base, output)
    if row == "rnn-gauss":
        return dict(base)
    best, best_gap = None, None
    lo, hi = 2, 4 * max(base[w] for w in WIDTHS)
    while lo <= hi:  # the count grows with the width: bisect, keep the closest
        mid = (lo + hi) // 2
        cand = dict(base, **{w: mid for w in WIDTHS})
        n = count_params(row, x_dim, cand, output)
        if best_gap is None or abs(n - target) < best_gap:
            best, best_gap = cand, abs(n - target)
        lo, hi = (mid + 1, hi) if n < target else (lo, mid - 1)
    return best


def _vrnn_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "vrnn.cli", "--threads", "1", *map(str, args)]


def _run_one(job: dict, log=print) -> dict:
    """Train then evaluate one (dataset, row, seed); result.json marks it done."""
    run = Path(job["dir"])
    result = run / "result.json"
    if result.exists():
        return json.loads(result.read_text())
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(json.dumps(job["config"], indent=1))
    t0 = time.time()
    trained = run / "trained.json"  # training finished: never train a run twice
    with open(run / "train.log", "a") as f:
        train = _vrnn_cmd("train", "--data", job["dataset"], "--model", job["row"], "--out", run / "ckpt",
                          "--seed", job["seed"], "--max-time", job["minutes"], "--max-epochs", 100000,
                          "--config", run / "config.json", "--no-progress",
                          *(["--resume"] if (run / "ckpt" / "last.ckpt").exists() else []),
                          *job.get("train_args", []))
        if not trained.exists():
            f.write("$ " + shlex.join(train) + "\n")
            f.flush()
            if subprocess.run(train, stdout=f, stderr=subprocess.STDOUT).returncode != 0:
                raise VRNNError(f"{run / 'train.log'}: training {job['row']} on {job['dataset']} failed")
            trained.write_text(json.dumps({"train_seconds": round(time.time() - t0, 1)}))
    train_s = json.loads(trained.read_text())["train_seconds"]
    ev = subprocess.run(_vrnn_cmd("evaluate", run / "ckpt" / "best.ckpt", "--data", job["dataset"],
                                  "--split", "test", "--samples", 40, "--json", "--seed", job["seed"]),
                        capture_output=True, text=True)
    if ev.returncode != 0:
        raise VRNNError(f"{run}: evaluation failed: {ev.stderr.strip()[-300:]}")
    res = json.loads(ev.stdout)
    ckpt = torch.load(run / "ckpt" / "last.ckpt", map_location="cpu", weights_only=True)
    rec = {
        "dataset": job["dataset"], "model": job["row"], "seed": job["seed"], "params": job["params"],
        "elbo": res["elbo"],
        "log_likelihood": res["log_likelihood"],
        "exact": res["exact"], "num_samples": res["num_samples"],
        "nats_per_step": res["nats_per_step"], "num_sequences": res["num_sequences"],
        "unit": DATASETS[job["dataset"]]["unit"],
        "epochs": int(ckpt["epoch"]), "steps": int(ckpt["global_step"]),
        "train_seconds": round(train_s, 1), "budget_minutes": job["minutes"],
    }
    if job["dataset"] == "chorales":  # the music literature reports per step
        rec["elbo"] = None if res["elbo"] is None else res["elbo_nats_per_step"]
        rec["log_likelihood"] = res["nats_per_step"]
    result.write_text(json.dumps(rec, indent=1))
    log(f"[reproduce] {job['dataset']:11s} {job['row']:12s} seed {job['seed']}: "
        f"ELBO {rec['elbo']}, log-lik {rec['log_likelihood']:.2f} ({rec['steps']} steps)")
    return rec


def plan(setup: str, out: Path, datasets, x_dims: dict, accelerator: str | None,
         budget_scale: float = 1.0) -> list[dict]:
    jobs = []
    for ds in datasets:
        s = SETUPS[setup][ds]
        output = "bernoulli" if ds == "chorales" else None
        for row in DATASETS[ds]["rows"]:
            model = match_params(row, x_dims[ds], s["model"], output)
            params = count_params(row, x_dims[ds], model, output)
            config = {"model": model, "train": dict(s["train"]), "data": dict(s.get("data", {}))}
            for seed in s["seeds"]:
                jobs.append({"dataset": ds, "row": row, "seed": seed, "params": params,
                             "minutes": s["minutes"] * budget_scale, "config": config,
                             "dir": str(out / "runs" / ds / f"{row}-seed{seed}"),
                             "train_args": ["--accelerator", accelerator] if accelerator else []})
    return jobs


def _fmt(v, digits=1):
    return "n/a" if v is None else f"{v:,.{digits}f}"


def table(records: list[dict], setup: str, command: str, datasets) -> tuple[str, dict]:
    """Markdown and JSON tables: mean (and spread over seeds) per row and dataset."""
    cols = [d for d in DATASETS if d in datasets]
    digits = {d: (3 if d == "chorales" else 1) for d in cols}
    lines = ["| model | params | " + " | ".join(f"{d} ({DATASETS[d]['plays']})" for d in cols) + " |",
             "| --- | --- | " + " | ".join("---" for _ in cols) + " |"]
    rows = [r for r in ROWS if any(rec["model"] == r for rec in records)]
    for row in rows:
        cells, params = [], []
        for ds in cols:
            recs = [r for r in records if r["model"] == row and r["dataset"] == ds]
            if not recs:
                cells.append("n/a")
                continue
            params.append(f"{recs[0]['params']:,}")
            ll = np.array([r["log_likelihood"] for r in recs])
            spread = f" ± {ll.std():.{digits[ds]}f}" if len(recs) > 1 else ""
            if recs[0]["elbo"] is None:
                cells.append(f"{_fmt(ll.mean(), digits[ds])}{spread}")
            else:
                el = np.array([r["elbo"] for r in recs])
                cells.append(f">= {_fmt(el.mean(), digits[ds])} ~ {_fmt(ll.mean(), digits[ds])}{spread}")
        lines.append(f"| {row} | {' / '.join(params)} | " + " | ".join(cells) + " |")
    minutes = {r["dataset"]: r["budget_minutes"] for r in records}
    budget = ", ".join(f"{d}: {minutes[d]:g} min per row, seeds {SETUPS[setup][d]['seeds']}"
                       for d in cols)
    hw = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    units = "; ".join(f"{d}: {DATASETS[d]['unit']}" for d in cols)
    md = "\n".join(lines) + (
        f"\n\nUnits: {units}. "
        "'>= a ~ b': ELBO a and 40-sample importance-sampled estimate b (VRNN rows); "
        "a single number: exact log-likelihood (RNN rows). '± s': standard deviation of the "
        "estimate over seeds. Test splits, globally normalised data (higher is better).\n"
        f"Budget: wall clock per row with early stopping on the validation bound ({budget}). "
        f"Hardware: {hw}.\nCommand: `{command}`\n")
    js = {"setup": setup, "command": command, "hardware": hw, "budget": {d: SETUPS[setup][d] for d in cols},
          "runs": records}
    return md, js


def analysis_figure(run_dir: Path, dataset: str, path: Path) -> Path:
    """The paper's figure: a test utterance's waveform, and under it the KL per step and
    ||h_t - h_{t-1}||, aligned in time."""
    from .evaluate import load_for_scoring
    from .writers import _figure, _save_png
    model, _, _, data, idx, seqs = load_for_scoring(run_dir / "ckpt" / "best.ckpt", dataset, "test")
    i = int(np.argsort([len(s) for s in seqs])[len(seqs) // 2])  # a median-length one
    x = torch.as_tensor(seqs[i]).unsqueeze(0)
    lat = model.latents(x)
    wave = data.sequences[idx[i]].reshape(-1)
    rate, frame = data.meta.get("sample_rate", 16000), data.dim
    t_wave = np.arange(len(wave)) / rate
    t_step = (np.arange(x.shape[1]) + 0.5) * frame / rate
    fig = _figure(10, 6)
    axes = fig.subplots(3, 1, sharex=True)
    axes[0].plot(t_wave, wave, lw=0.4, color="k")
    axes[0].set_ylabel("waveform")
    axes[0].set_title(f"{model.cfg.name} on a {dataset} test utterance")
    axes[1].plot(t_step, lat["kl"][0].numpy(), color="tab:red")
    axes[1].set_ylabel("KL per step")
    axes[2].plot(t_step, lat["h_change"][0].numpy(), color="tab:blue")
    axes[2].set_ylabel("||h_t - h_(t-1)||")
    axes[2].set_xlabel("seconds")
    fig.tight_layout()
    return _save_png(fig, path)


def write_samples(out: Path, records_dirs: dict) -> list[Path]:
    """Handwriting grids, a few seconds of speech per speech model, a chorale as MIDI."""
    from . import checkpoint
    from .writers import plot_handwriting, plot_pianoroll, plot_waveform, write_midi, write_wav
    written = []
    torch.manual_seed(0)
    for (ds, row), run_dir in sorted(records_dirs.items()):
        model, normalizer, desc = checkpoint.load(Path(run_dir) / "ckpt" / "best.ckpt")
        name = f"{ds}-{row}"
        if ds == "lasa":
            x = normalizer.invert(model.sample(16, int(desc["median_length"]))).numpy()
            written.append(plot_handwriting(out / f"{name}.png", list(x), titles=[row] * 16))
        elif ds in ("asterisk-en", "fillets-cs"):
            rate = desc["meta"].get("sample_rate", 16000)
            steps = int(3.0 * rate / desc["dim"])  # 3 s
            x = normalizer.invert(model.sample(1, steps)).numpy()[0]
            written.append(write_wav(out / f"{name}.wav", x, rate))
            written.append(plot_waveform(out / f"{name}.png", x.reshape(-1), rate, title=name))
        elif ds == "chorales":
            roll = model.sample(1, 64).numpy()[0]
            lowest = desc["meta"].get("lowest_pitch", 36)
            written.append(write_midi(out / f"{name}.mid", roll, lowest))
            written.append(plot_pianoroll(out / f"{name}.png", roll, lowest, title=name))
    return written


def reproduce(setup: str = "cpu", out="results", jobs: int = 2, datasets=None,
              accelerator: str | None = None, budget_scale: float = 1.0, log=print) -> dict:
    from .data import fetch, load
    if setup not in SETUPS:
        raise ConfigError(f"unknown setup {setup!r}; choose {' or '.join(SETUPS)}")
    out = Path(out)
    datasets = list(datasets or DATASETS)
    unknown = [d for d in datasets if d not in DATASETS]
    if unknown:
        raise ConfigError(f"unknown dataset(s) {', '.join(unknown)}; choose from {', '.join(DATASETS)}")
    command = "vrnn reproduce --setup " + setup + (f" --datasets {','.join(datasets)}"
                                                  if set(datasets) != set(DATASETS) else "")
    command += f" --budget-scale {budget_scale:g}" if budget_scale != 1.0 else ""
    t0 = time.time()
    x_dims = {}
    for ds in datasets:  # fetch and cache once, before the parallel jobs
        if ds in ("asterisk-en", "fillets-cs"):
            fetch(ds, progress=log)
        x_dims[ds] = load(ds, **SETUPS[setup][ds].get("data", {})).dim
    todo = plan(setup, out, datasets, x_dims, accelerator, budget_scale)
    for ds in datasets:
        counts = {j["row"]: j["params"] for j in todo if j["dataset"] == ds}
        log(f"[reproduce] {ds}: parameters " + ", ".join(f"{r} {n:,}" for r, n in counts.items()))
    log(f"[reproduce] {len(todo)} runs, {jobs} at a time")
    def attempt(job):  # one failed run must not cancel the others
        try:
            return _run_one(job, log)
        except (VRNNError, OSError, ValueError) as exc:
            log(f"[reproduce] {job['dataset']} {job['row']} seed {job['seed']} FAILED: {exc}")
            return None

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(attempt, todo))
    failed = [j["dir"] for j, r in zip(todo, outcomes) if r is None]
    if failed:
        raise VRNNError(f"{len(failed)} run(s) failed ({', '.join(failed)}); see their train.log, "
                        "fix and run the same command again: finished runs are kept")
    records = outcomes
    md, js = table(records, setup, command, datasets)
    js["wall_minutes"] = round((time.time() - t0) / 60, 1)
    from .writers import _atomic
    with _atomic(out / "table1.md") as tmp:
        Path(tmp).write_text(md)
    with _atomic(out / "table1.json") as tmp:
        Path(tmp).write_text(json.dumps(js, indent=1) + "\n")
    seed0 = {(j["dataset"], j["row"]): j["dir"] for j in todo if j["seed"] == todo[0]["seed"]}
    written = write_samples(out / "samples", seed0)
    for ds in ("fillets-cs", "asterisk-en"):
        if (ds, "vrnn-gauss") in seed0:
            written.append(analysis_figure(Path(seed0[(ds, "vrnn-gauss")]), ds, out / "analysis.png"))
            break
    log(md)
    log(f"[reproduce] wrote {out / 'table1.md'}, {out / 'table1.json'} and {len(written)} figures/samples "
        f"in {js['wall_minutes']} min")
    return js
