"""The DVAE review's speech evaluation (Girin et al. 2021, their WSJ0 table) for every model of
the family, on asterisk-en spectrograms: train each with the Itakura-Saito head at ONE matched
size, resynthesise the held-out test utterances through the posterior mean with the original
phase, score SI-SDR, PESQ and ESTOI, and compare the ordering with the review's.

    PYTHONPATH=src:.speech-deps python benchmarks/speech_family.py --plan     # time a few steps, print the plan
    PYTHONPATH=src:.speech-deps python benchmarks/speech_family.py [--commit] # run (resumable)
    PYTHONPATH=src:.speech-deps python benchmarks/speech_family.py --baseline # no model: mean power, original phase
    PYTHONPATH=src python benchmarks/speech_family.py --report-only           # the table from the records

Protocol (the same for every model): data ``asterisk-en-stft`` (whole utterances, 513-bin
STFT power, 1024/256 Hann at 16 kHz), every utterance cut to its first ``--max-length``
frames (all splits; the long prompts run to 73 s), the library's seeded 80/10/10 split by
utterance (split seed 0: the test utterances are never seen in training); each family's
preset with ``--output is``, h_dim = a_dim = every MLP width = ``--h``, z_dim ``--z``, one
layer each; Adam lr 1e-3, batch 16, seed 0, at most ``--steps`` optimiser steps, early
stopping on the validation ELBO (patience ``--patience`` epochs, 20 by default: under the
Itakura-Saito likelihood the validation bound stays far below the training bound, and
swings, for the first few hundred steps while a few utterances' loud bins are under-
predicted (x/v is unbounded); a patience of 5 stopped the SRNN and the DKF there, at
168 and 280 steps, in a first run); the best-validation checkpoint is scored. One intra-op thread (torch.set_num_threads(1)).

Each finished model writes results/speech/records/<model>.json (strict JSON; a model whose
record exists is skipped, so a rerun resumes) and, with ``--commit``, commits it at once;
results/speech.md is rewritten from all records after each model. Runs and wavs go to
results/runs/speech/ (not committed).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
# the review's six first, then the causal RVAE, then the KVAE (optional: the review never trained it)
MODELS = ["vrnn-gauss", "srnn-gauss", "dkf-gauss", "storn-gauss", "rvae-gauss", "dsae-gauss",
          "rvae-causal-gauss", "kvae-gauss"]
CONDITIONS = {  # what p and q condition on (the one-liners)
    "vrnn-gauss": "p(z_t | h_t-1), p(x_t | z_t, h_t-1), h_t = RNN(x_t, z_t); q(z_t | x_t, h_t-1)",
    "srnn-gauss": "d_t = RNN(x_t-1); p(z_t | z_t-1, d_t), p(x_t | z_t, d_t); q(z_t | z_t-1, a_t), a_t from x_t:T, d_t:T",
    "dkf-gauss": "p(z_t | z_t-1), p(x_t | z_t); q(z_t | z_t-1, x_t:T) (ST-R)",
    "storn-gauss": "z_t ~ N(0, I), p(x_t | h_t), h_t = RNN(x_t-1, z_t); q(z_t | x_1:t)",
    "rvae-gauss": "z_t ~ N(0, I), p(x_t | z_1:T) (bidirectional); q(z_t | z_1:t-1, x_1:T)",
    "rvae-causal-gauss": "z_t ~ N(0, I), p(x_t | z_1:t); q(z_t | z_1:t-1, x_t:T)",
    "dsae-gauss": "static v, p(z_t | z_1:t-1), p(x_t | z_t, v); q(v | x_1:T), q(z_t | x_1:T, v)",
    "kvae-gauss": "codes a_t: p(x_t | a_t); linear-Gaussian z_t, K matrices mixed by RNN(a_1:t-1); q(a_t | x_t)",
}
# Girin et al. 2021, WSJ0 test set, SI-SDR in dB (their table of the speech experiments)
REVIEW_SI_SDR = {"srnn-gauss": 11.0, "vrnn-gauss": 10.0, "dkf-gauss": 9.3, "dsae-gauss": 9.2,
                 "rvae-gauss": 9.0, "storn-gauss": 6.9}
DATA = "asterisk-en-stft"
RECORDS = ROOT / "results" / "speech" / "records"
TABLE = ROOT / "results" / "speech.md"
RUNS = ROOT / "results" / "runs" / "speech"


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--h", type=int, default=64)
    ap.add_argument("--z", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--patience", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plan", action="store_true", help="time a few steps of each model, print the plan, stop")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--baseline", action="store_true", help="score the no-model baseline (mean power per "
                    "bin with the original phase) into results/speech/baseline-mean-power.json")
    ap.add_argument("--commit", action="store_true", help="git-commit each record as it is written")
    return ap.parse_args(argv)


def overrides(a) -> dict:
    w = a.h
    return dict(output="is", h_dim=w, a_dim=w, z_dim=a.z, phi_x_dim=w, phi_z_dim=w, enc_dim=w, prior_dim=w,
                dec_dim=w, phi_x_layers=1, phi_z_layers=1, enc_layers=1, prior_layers=1, dec_layers=1)


def train_config(a):
    from vrnn.train import TrainConfig

    return TrainConfig(lr=1e-3, batch_size=a.batch_size, max_epochs=10_000, max_steps=a.steps, seed=a.seed,
                       split_seed=0, patience=a.patience)


def prepared(a):
    from vrnn.train import prepare

    return prepare(DATA, 0, (0.8, 0.1, 0.1), max_length=a.max_length)


# ------------------------------------------------------------------------------ plan


def time_steps(model, prep, a, n=4) -> float:
    """Median seconds of one training step (ELBO, backward, clip, Adam) on real batches."""
    from vrnn.train import loader
    from vrnn.inference import objective

    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    dl = iter(loader(prep.sequences("train"), a.batch_size, a.seed, shuffle=True))
    times = []
    for i in range(n + 1):
        x, mask = next(dl)
        t0 = time.perf_counter()
        loss, _ = objective(model, x, mask)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
        opt.step()
        if i:
            times.append(time.perf_counter() - t0)
    return float(np.median(times))


def plan(a, models) -> None:
    from vrnn import build
    from vrnn.train import model_config

    prep = prepared(a)
    n_train = len(prep.splits["train"])
    epochs = math.ceil(a.steps / math.ceil(n_train / a.batch_size))
    print(f"plan: {DATA}, utterances cut to {a.max_length} frames; train/valid/test "
          f"{n_train}/{len(prep.splits['valid'])}/{len(prep.splits['test'])} utterances; "
          f"h {a.h}, z {a.z}, batch {a.batch_size}, <= {a.steps} steps (~{epochs} epochs), patience {a.patience}")
    total = 0.0
    for name in models:
        torch.manual_seed(a.seed)
        cfg = model_config(name, prep.data, overrides(a))
        model = build(cfg)
        step = time_steps(model, prep.for_model(cfg), a)
        # validation each epoch and the test pass: about a forward pass over a tenth of the data each
        est = a.steps * step * 1.25 + 60.0  # + resynthesis and PESQ/ESTOI of the test split
        total += est
        print(f"  {name:18s} {model.num_parameters():>8,} parameters  {step * 1000:7.1f} ms/step  "
              f"<= {est / 60:5.1f} min")
    print(f"  all: <= {total / 60:.1f} min of one thread (early stopping can only shorten it)")


# ------------------------------------------------------------------------------ run


def run_model(name: str, prep, a) -> dict:
    from vrnn import checkpoint
    from vrnn.evaluate import evaluate
    from vrnn.resynth import resynthesise
    from vrnn.train import Prepared, fit

    out = RUNS / name
    if out.exists():
        import shutil
        shutil.rmtree(out)  # a run cut short: start it again (its record does not exist)
    t0 = time.time()
    fit(DATA, name, out, train_config(a), overrides(a), {"max_length": a.max_length}, progress=False,
        prepared=prep)
    train_s = time.time() - t0
    summary = json.loads((out / "summary.json").read_text())
    model, normalizer, _ = checkpoint.load(out / "best.ckpt")
    test = Prepared(prep.data, prep.splits, normalizer)
    seqs = test.sequences("test")
    torch.manual_seed(a.seed)
    ev = evaluate(model, seqs, num_samples=1, batch_size=16, progress=False, estimator="is",
                  normalizer=normalizer, seed=a.seed)
    elbo = ev["estimators"]["elbo"]
    t1 = time.time()
    rs = resynthesise(model, normalizer, prep.data, prep.splits["test"], seqs, out / "resynth")
    return {
        "model": name, "family": model.cfg.family, "conditions_on": CONDITIONS[name],
        "parameters": model.num_parameters(), "data": DATA, "max_length": a.max_length,
        "h_dim": a.h, "z_dim": a.z, "batch_size": a.batch_size, "seed": a.seed, "step_cap": a.steps,
        "patience": a.patience, "steps": summary["steps"], "epochs": summary["epochs"],
        "stopped": summary["stopped"], "converged": summary["converged"],
        "train_seconds": round(train_s, 1), "resynth_seconds": round(time.time() - t1, 1),
        "test_utterances": rs["utterances"], "test_frames": ev["num_steps"],
        "test_elbo_per_frame": elbo["per_step_raw"], "test_elbo_per_frame_scaled": elbo["per_step"],
        "si_sdr": rs["means"]["si_sdr"], "pesq": rs["means"]["pesq"], "estoi": rs["means"]["estoi"],
        "counted": rs["counted"], "torch": torch.__version__,
        "command": "PYTHONPATH=src:.speech-deps python benchmarks/speech_family.py",
    }


def write_record(rec: dict, commit: bool) -> Path:
    from vrnn.evaluate import strict_json
    from vrnn.writers import write_text

    path = RECORDS / f"{rec['model']}.json"
    write_text(path, json.dumps(strict_json(rec), indent=1, allow_nan=False) + "\n")
    write_table()
    if commit:
        for attempt in range(5):  # another git command may hold the index for a moment
            r = subprocess.run(["git", "-C", str(ROOT), "add", str(path), str(TABLE)], capture_output=True)
            r = r if r.returncode else subprocess.run(
                ["git", "-C", str(ROOT), "commit", "-q", "-m", f"Speech evaluation record: {rec['model']}",
                 "--", str(path), str(TABLE)], capture_output=True)
            if r.returncode == 0:
                break
            time.sleep(5)
        else:
            print(f"warning: could not commit {path}: {r.stderr.decode().strip()[:200]}", file=sys.stderr)
    return path


def baseline(a) -> dict:
    """What the original phase alone gives: every frame's power set to the training split's
    mean power of its bin (no model), resynthesised and scored like the models."""
    from vrnn.data.batching import Normalizer
    from vrnn.resynth import original, synthesise
    from vrnn.speech_metrics import score

    prep = prepared(a)
    mean = Normalizer.power_scale([prep.data.sequences[i] for i in prep.splits["train"]]).std
    rate = int(prep.data.meta["sample_rate"])
    files, offsets = prep.data.meta["sequence_files"], prep.data.meta["frame_offsets"]
    rows = []
    for i in prep.splits["test"]:
        frames = len(prep.data.sequences[i])
        reference, phase, length = original(files[i], int(offsets[i]), frames, rate)
        est = synthesise(np.repeat(mean[None], frames, axis=0), phase, length)
        rows.append(score(est, reference, rate))
    out = {"model": "baseline-mean-power", "max_length": a.max_length, "test_utterances": len(rows),
           "command": "PYTHONPATH=src:.speech-deps python benchmarks/speech_family.py --baseline"}
    for m in ("si_sdr", "pesq", "estoi"):
        vals = [r[m] for r in rows if r[m] is not None]
        out[m] = float(np.mean(vals)) if vals else None
        out.setdefault("counted", {})[m] = len(vals)
    return out


# ------------------------------------------------------------------------------ table


def _fmt(v, nd=2):
    return "n/a" if v is None else f"{v:.{nd}f}"


def write_table() -> Path:
    from scipy.stats import spearmanr

    from vrnn.writers import write_text

    recs = {p.stem: json.loads(p.read_text()) for p in sorted(RECORDS.glob("*.json"))}
    order = [m for m in MODELS if m in recs]
    lines = ["# The DVAE review's speech evaluation on asterisk-en spectrograms", "",
             "Every model of the family trained with the Itakura-Saito head (`--output is`) on "
             "`asterisk-en-stft` at one matched size, then the held-out test utterances resynthesised "
             "through the posterior mean with the original phase (`vrnn resynth`) and scored. "
             "Reproduce: `PYTHONPATH=src:.speech-deps python benchmarks/speech_family.py` "
             "(protocol in its docstring; records in `results/speech/records/`).", ""]
    if order:
        r0 = recs[order[0]]
        lines += [f"Size: h {r0['h_dim']}, z {r0['z_dim']}, batch {r0['batch_size']}, at most "
                  f"{r0['step_cap']} optimiser steps, early stopping patience {r0['patience']} epochs, seed "
                  f"{r0['seed']}; utterances cut to {r0['max_length']} frames; {r0['test_utterances']} test "
                  f"utterances ({r0['test_frames']} frames). ELBO per frame: nats of the raw STFT powers "
                  "(all 513 bins of a frame), higher is better.", ""]
    lines += ["| model | conditions on | params | test ELBO / frame | SI-SDR (dB) | PESQ | ESTOI | steps | "
              "ended | review SI-SDR (WSJ0) |", "|---|---|---:|---:|---:|---:|---:|---:|---|---:|"]
    for m in order:
        r = recs[m]
        ended = "converged (early stop)" if r["converged"] else f"capped ({r['stopped']})"
        rev = REVIEW_SI_SDR.get(m)
        cond = r["conditions_on"].replace("|", "\\|")  # a bar inside a cell ends it
        lines.append(f"| {m} | {cond} | {r['parameters']:,} | {_fmt(r['test_elbo_per_frame'], 1)} | "
                     f"{_fmt(r['si_sdr'])} | {_fmt(r['pesq'])} | {_fmt(r['estoi'], 3)} | {r['steps']} | {ended} | "
                     f"{'—' if rev is None else rev} |")
    base = RECORDS.parent / "baseline-mean-power.json"
    if base.exists():
        b = json.loads(base.read_text())
        lines.append(f"| (no model: each bin's mean training power, original phase) | — | 0 | — | {_fmt(b['si_sdr'])} | "
                     f"{_fmt(b['pesq'])} | {_fmt(b['estoi'], 3)} | — | — | — |")
    lines.append("")
    for rvae in ("rvae-gauss", "rvae-causal-gauss"):
        common = [m for m in REVIEW_SI_SDR if m.replace("rvae-gauss", rvae) in recs
                  and recs[m.replace("rvae-gauss", rvae)]["si_sdr"] is not None]
        if len(common) < 3:
            continue
        ours = [recs[m.replace("rvae-gauss", rvae)]["si_sdr"] for m in common]
        theirs = [REVIEW_SI_SDR[m] for m in common]
        rho = spearmanr(ours, theirs).statistic
        our_order = " > ".join(m.replace("rvae-gauss", rvae).removesuffix("-gauss") for _, m in
                               sorted(zip(ours, common), reverse=True))
        their_order = " > ".join(m.removesuffix("-gauss") for _, m in sorted(zip(theirs, common), reverse=True))
        lines.append(f"- SI-SDR ordering with the review's RVAE taken as our `{rvae}` ({len(common)} models): "
                     f"ours {our_order}; the review's {their_order}; Spearman rho = {rho:.2f}.")
    missing = [m for m in MODELS if m not in recs]
    if missing:
        lines.append(f"- Not in the table (no record): {', '.join(missing)}.")
    lines += ["", "Notes: SI-SDR, PESQ (wide-band) and ESTOI are means over the test utterances (each record "
              "counts how many each mean is over: ESTOI needs 384 ms, PESQ finds speech). The step cap ends "
              "at the end of the epoch in which it is reached; \"capped\": stopped by that cap, not by "
              "early stopping. asterisk-en was recorded at 8 kHz and resampled to 16 kHz, so the bins above "
              "4 kHz hold next to nothing. The review's figures are on WSJ0 (many speakers, hours of read "
              "speech) with larger models trained to convergence, and the review trains on 50-frame "
              "chunks; ours are one female speaker's prompts, whole utterances cut to their first "
              "frames, at a small size on a CPU budget. Compare orderings, not values. One seed per model: "
              "differences of a few tenths of a dB are not something this run can tell apart, yet the "
              "rank correlation counts every difference as an ordering."]
    return write_text(TABLE, "\n".join(lines) + "\n")


def main(argv=None) -> int:
    a = parse(argv)
    torch.set_num_threads(1)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    if a.report_only:
        print(write_table())
        return 0
    if a.plan:
        plan(a, models)
        return 0
    if a.baseline:
        from vrnn.evaluate import strict_json
        from vrnn.writers import write_text

        rec = baseline(a)
        write_text(RECORDS.parent / "baseline-mean-power.json",
                   json.dumps(strict_json(rec), indent=1, allow_nan=False) + "\n")
        print(rec)
        print(write_table())
        return 0
    from vrnn.errors import Interrupted

    prep = prepared(a)
    for name in models:
        if (RECORDS / f"{name}.json").exists():
            print(f"{name}: record exists, skipped", flush=True)
            continue
        print(f"{name}: training ...", flush=True)
        try:
            rec = run_model(name, prep, a)
        except Interrupted:
            raise  # SIGINT / SIGTERM: stop the whole run (a rerun resumes at this model)
        except Exception as exc:  # one model failing (KVAE, say) must not stop the others
            print(f"{name}: FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
            continue
        path = write_record(rec, a.commit)
        print(f"{name}: {rec['steps']} steps ({rec['stopped']}), {rec['train_seconds']:.0f} s; test ELBO/frame "
              f"{_fmt(rec['test_elbo_per_frame'], 1)}, SI-SDR {_fmt(rec['si_sdr'])}, PESQ {_fmt(rec['pesq'])}, "
              f"ESTOI {_fmt(rec['estoi'], 3)} -> {path}", flush=True)
    print(write_table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
