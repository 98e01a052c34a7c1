"""Anomaly detection on the Server Machine Dataset (8 machines; ../shared/data/smd/README).

Per machine, the field's protocol with thresholds chosen WITHOUT test labels:
- ``train`` is cut in two: the first 90% (fit part) in windows of --window steps trains
  the model (the normaliser is fitted on it); the last 10% (validation tail) early-stops
  training and, scored causally, gives the normal scores the POT threshold is fitted on;
- ``test`` is scored causally, continuing the same scorer after the validation tail (test
  follows train in time), one step at a time (vrnn.scoring.Scorer);
- reported: unadjusted precision/recall/F1 at the POT threshold, AUC-PR, point-adjusted F1
  at the POT threshold, the best F1 over thresholds (an ORACLE: it reads the test labels),
  root-cause HitRate@100% / @150% against the operators' interpretation labels.
Rows: VRNN-Gauss, SRNN-Gauss with its filtering posterior, STORN-Gauss and KVAE-Gauss
(particle filter, K particles), RNN-Gauss (exact predictive NLL), a per-dimension z-score
of x_t (sum of z_d^2 / 2 over the fit part's mean/std; shares z_d^2 / 2), an isolation
forest (scikit-learn, fitted on the fit part), and random scores (uniform: they show how
high point-adjusted F1 goes by chance). The family's models whose posterior reads steps
after t (DKF, RVAE, DSAE, the smoothing SRNN) cannot score online: the table says why.

Known flaw of the data: every column was min-max scaled over train AND test together, so
test statistics leak into the scaling; a deployed detector could only scale with train.

Resumable: a (machine, row) already in --records is skipped; rows run one after the other,
all machines of a row first. Run ONE process:

    PYTHONPATH=src python benchmarks/smd.py --data ../shared/data/smd \\
        --records results/smd/records --work /tmp/smd-runs --threads 1
    PYTHONPATH=src python benchmarks/smd.py --table results/smd/records --out results/smd.md
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

MACHINES = ("machine-1-6", "machine-1-7", "machine-2-1", "machine-2-2", "machine-2-7", "machine-2-8",
            "machine-3-3", "machine-3-4")
# model rows: name -> (preset, overrides). Rows of the family that cannot score online
# (vrnn.models.cannot(cfg, "filter"): DKF, RVAE, DSAE and the smoothing SRNN, whose q(z_t | .)
# reads steps after t) have no row; REFUSED says why, from the models themselves.
MODELS = {"vrnn-gauss": ("vrnn-gauss", {}), "rnn-gauss": ("rnn-gauss", {}),
          "srnn-filtering-gauss": ("srnn-gauss", {"posterior": "filtering"}),
          "storn-gauss": ("storn-gauss", {}), "kvae-gauss": ("kvae-gauss", {})}
REFUSED = ("dkf-gauss", "rvae-causal-gauss", "rvae-gauss", "dsae-gauss", "srnn-gauss")
ROWS = ("vrnn-gauss", "rnn-gauss", "zscore", "iforest", "random", "srnn-filtering-gauss", "storn-gauss",
        "kvae-gauss")
SIZE = dict(h_dim=64, z_dim=8, phi_x_dim=32, phi_z_dim=32, enc_dim=32, prior_dim=32, dec_dim=32)


def windows(x: np.ndarray, length: int) -> list[np.ndarray]:
    return [x[i:i + length] for i in range(0, len(x) - length + 1, length)]


def train_model(name: str, fit_part, tail, out: Path, args):
    """Train row ``name`` (MODELS) on windows of the fit part, early-stopped on the tail's windows."""
    from vrnn import checkpoint
    from vrnn.data import Normalizer
    from vrnn.data.registry import SequenceSet
    from vrnn.train import Prepared, TrainConfig, best_checkpoint, fit
    tr, va = windows(fit_part, args.window), windows(tail, args.window)
    data = SequenceSet(tr + va, "array", f"smd-{out.parent.name}")
    splits = {"train": list(range(len(tr))), "valid": list(range(len(tr), len(tr) + len(va))), "test": []}
    prepared = Prepared(data, splits, Normalizer.fit(tr))
    tc = TrainConfig(batch_size=32, max_epochs=1000, max_steps=args.steps, patience=args.patience,
                     seed=0, lr=args.lr)
    t0 = time.time()
    preset, extra = MODELS[name]
    fit(f"smd:{out.parent.name}", preset, out, tc, model_overrides={**SIZE, **extra}, prepared=prepared,
        progress=False)
    summary = json.loads((out / "summary.json").read_text())
    model, normalizer, _ = checkpoint.load(best_checkpoint(out))
    return model, normalizer, {**summary, "train_seconds": round(time.time() - t0, 1),
                               "parameters": model.num_parameters()}


def evaluate_row(scores, shares, val_scores, label, causes, args) -> dict:
    from vrnn import detection, thresholds
    try:
        th = thresholds.pot(val_scores, risk=args.risk, level=args.level)
    except Exception as exc:  # a degenerate tail: say so in the record
        th = {"method": "pot", "threshold": None, "error": str(exc)}
    rec = {"threshold": th, "auc_pr": detection.average_precision(scores, label),
           "oracle_best_f1": detection.best_f1(scores, label),
           "oracle_best_f1_point_adjusted": detection.best_f1(scores, label, adjusted=True)}
    if th["threshold"] is not None:
        pred = scores > th["threshold"]
        rec["unadjusted"] = detection.prf(pred, label)
        rec["point_adjusted"] = detection.prf(detection.point_adjust(pred, label), label)
        rec["flagged_fraction"] = float(pred.mean())
        if shares is not None:
            for p in (100, 150):
                rec[f"hit_rate@{p}"] = detection.hit_rate(shares, pred, causes, p)
    if shares is not None:  # threshold-free root cause: at every labelled step
        every = label.astype(bool)
        for p in (100, 150):
            rec[f"hit_rate@{p}_all_labelled_steps"] = detection.hit_rate(shares, every, causes, p)["hit_rate"]
    return rec


def run_machine(m: str, rows, args, rec: dict | None = None) -> dict:
    """Run ``rows`` on machine ``m``, adding them to ``rec`` (its record so far, if any)."""
    import torch
    from vrnn import detection
    from vrnn.scoring import Scorer
    torch.set_num_threads(args.threads)
    d = np.load(Path(args.data) / f"{m}.npz")
    train, test, label = d["train"].astype(np.float64), d["test"].astype(np.float64), d["test_label"].astype(bool)
    causes = detection.read_interpretation(Path(args.data) / f"{m}.interpretation.txt")
    cut = int(len(train) * 0.9)
    fit_part, tail = train[:cut], train[cut:]
    rec = rec or {"machine": m, "train_steps": len(train), "fit_steps": cut, "tail_steps": len(tail),
                  "test_steps": len(test), "anomalous_fraction": float(label.mean()), "rows": {}}
    warm = args.warmup
    for name in rows:
        t0 = time.time()
        info: dict = {}
        if name in MODELS:
            out = Path(args.work) / m / name
            if out.exists():
                import shutil
                shutil.rmtree(out)
            model, normalizer, info = train_model(name, fit_part, tail, out, args)
            scorer = Scorer(model, normalizer, particles=args.particles, seed=0)
            v = scorer.score(tail)
            s = scorer.score(test)  # continues after the tail: test follows train in time
            val, scores, shares = v.score[warm:], s.score, s.shares
            info["particles"] = scorer.K
            print(f"  {m} {name}: trained in {info['train_seconds']} s ({info['steps']} steps, "
                  f"{info['stopped']})", flush=True)
            info["score_steps_per_second"] = round((len(tail) + len(test)) / (time.time() - t0 - info["train_seconds"]), 1)
        elif name == "zscore":
            mu, sd = fit_part.mean(0), fit_part.std(0)
            sd = np.where(sd < 1e-8, 1.0, sd)
            zt, zv = 0.5 * ((test - mu) / sd) ** 2, 0.5 * ((tail - mu) / sd) ** 2
            scores, shares, val = zt.sum(1), zt, zv.sum(1)
        elif name == "iforest":
            from sklearn.ensemble import IsolationForest
            forest = IsolationForest(n_estimators=100, random_state=0, n_jobs=1).fit(fit_part)
            scores, val, shares = -forest.score_samples(test), -forest.score_samples(tail), None
        else:
            rng = np.random.default_rng(0)
            scores, val, shares = rng.random(len(test)), rng.random(len(tail)), None
        row = evaluate_row(scores, shares, val, label, causes, args)
        row.update(info, seconds=round(time.time() - t0, 1))
        rec["rows"][name] = row
        print(f"  {m} {name}: {row['seconds']} s; POT F1 "
              f"{(row.get('unadjusted') or {}).get('f1')}, AUC-PR {row['auc_pr']}", flush=True)
    return rec


def strict(obj):
    import math
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return strict(obj.item())
    return obj


def commit(path: Path, message: str) -> None:
    """Commit one record as soon as it is written (the run may be stopped at any time)."""
    root = Path(__file__).resolve().parents[1]
    subprocess.run(["git", "add", str(path)], cwd=root, check=False)
    subprocess.run(["git", "commit", "-q", "-m", message, "--", str(path)], cwd=root, check=False)


# ------------------------------------------------------------------- table
def fmt(v, digits=3):
    return "–" if v is None else f"{v:.{digits}f}"


def table(records_dir: Path) -> str:
    recs = [json.loads(p.read_text()) for p in sorted(records_dir.glob("*.json"))]
    if not recs:
        return "no records\n"
    cols = ["P", "R", "F1", "AUC-PR", "PA-F1", "best F1 (oracle)", "best PA-F1 (oracle)", "Hit@100", "Hit@150"]

    def cells(r):
        u, pa = r.get("unadjusted") or {}, r.get("point_adjusted") or {}
        h1, h5 = r.get("hit_rate@100") or {}, r.get("hit_rate@150") or {}
        return [u.get("precision"), u.get("recall"), u.get("f1"), r.get("auc_pr"), pa.get("f1"),
                r["oracle_best_f1"]["f1"], r["oracle_best_f1_point_adjusted"]["f1"],
                h1.get("hit_rate"), h5.get("hit_rate")]

    st = recs[0].get("settings", {})
    minutes = sum(r.get("seconds", 0.0) for r in recs) / 60.0
    lines = [
        f"# Anomaly detection on SMD ({len(recs)} machines)", "",
        "Generated by `PYTHONPATH=src python benchmarks/smd.py --table results/smd/records --out "
        "results/smd.md` from the records in results/smd/records/ (one per machine, written by "
        "`PYTHONPATH=src python benchmarks/smd.py --threads 1`, with scikit-learn installed: `pip install -e .[eval]`).", "",
        f"Protocol: one model per machine, trained on the first 90% of `train` in windows of "
        f"{st.get('window')} steps (at most {st.get('steps')} optimiser steps, early stopping on "
        f"the last 10% of `train`, patience {st.get('patience')} epochs; model size "
        f"{recs[0].get('model_size')}); scores causal, one step at a time (latent rows: particle "
        f"filter, K = {st.get('particles')}), on the last 10% of `train` and then on `test`; the "
        f"threshold is POT (risk {st.get('risk')}, level {st.get('level')}) fitted on the scores of "
        f"that normal tail (first {st.get('warmup')} left out): NO test label is used, except in "
        "the two columns marked oracle. P, R, F1: unadjusted, per step, at the POT threshold. "
        "PA-F1: point-adjusted at the same threshold (a labelled segment counts as found if one of "
        "its steps is flagged). Hit@100/150: root-cause HitRate@100%/150% at the flagged steps "
        "inside the segments of the interpretation files. `random` = uniform random scores: its "
        "point-adjusted F1 shows what point-adjustment gives by chance. `zscore`: "
        "sum_d z_d^2 / 2 of x_t with the fit part's mean and std; `iforest`: scikit-learn's "
        "IsolationForest (100 trees) on the fit part.", "",
        "Known flaw of the data: every column was min-max scaled over train and test together "
        "(test statistics leak into the scaling); a detector deployed on live data could only "
        "scale with training statistics.", "",
        f"Total run time of the records: {minutes:.1f} min on one thread of a shared 2-core machine.", ""]
    lines += ["| machine | row | " + " | ".join(cols) + " |", "|" + " --- |" * (len(cols) + 2)]
    means: dict = {}
    for rec in recs:
        for name, r in rec["rows"].items():
            c = cells(r)
            means.setdefault(name, []).append(c)
            lines.append(f"| {rec['machine']} | {name} | " + " | ".join(fmt(v) for v in c) + " |")
    lines.append("| **mean over machines** | | " + " | ".join("" for _ in cols) + " |")
    for name, rows in means.items():
        avg = []
        for j in range(len(cols)):
            vals = [r[j] for r in rows if r[j] is not None]
            avg.append(sum(vals) / len(vals) if vals else None)
        lines.append(f"| mean of {len(rows)} | **{name}** | " + " | ".join(fmt(v) for v in avg) + " |")
    lines += ["", paired(recs), "", refused()]
    return "\n".join(lines) + "\n"


def paired(recs) -> str:
    """Each model row against the VRNN on the machines both ran: mean paired difference of
    unadjusted F1 at the POT threshold and of AUC-PR, with its standard error."""
    from vrnn.stats import mean_se
    out = ["Paired against vrnn-gauss on the machines both ran (mean difference ± standard error; "
           "positive: the row detects better):", "",
           "| row | machines | F1 - VRNN's | AUC-PR - VRNN's | machines where F1 is higher |",
           "| --- | --- | --- | --- | --- |"]
    for name in [r for r in ROWS if r != "vrnn-gauss"]:
        pairs = [(rec["rows"][name], rec["rows"]["vrnn-gauss"]) for rec in recs
                 if name in rec["rows"] and "vrnn-gauss" in rec["rows"]]
        if not pairs:
            continue
        f1 = [a["unadjusted"]["f1"] - b["unadjusted"]["f1"] for a, b in pairs  # rows with a POT threshold
              if a.get("unadjusted") and b.get("unadjusted")]
        ap = [a["auc_pr"] - b["auc_pr"] for a, b in pairs]

        def ms(v):
            m, se = mean_se(v)
            return f"{m:+.3f} ± {se:.3f}"
        out.append(f"| {name} | {len(pairs)} | {ms(f1) if f1 else '–'} | {ms(ap)} | "
                   f"{sum(d > 0 for d in f1)} of {len(f1)} |")
    return "\n".join(out)


def refused() -> str:
    """The family's rows that cannot score online, each with the model's own reason."""
    from vrnn import VRNNConfig
    from vrnn.models import cannot
    lines = ["Rows of the family with no online score (the model's own reason, "
             "`vrnn.models.cannot(cfg, \"filter\")`):", ""]
    for preset in REFUSED:
        lines.append(f"- `{preset}`: {cannot(VRNNConfig.preset(preset, x_dim=1), 'filter')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/smd")
    ap.add_argument("--records", default="results/smd/records")
    ap.add_argument("--work", default="/tmp/smd-runs", help="training runs (checkpoints) go here")
    ap.add_argument("--machines", nargs="*", default=list(MACHINES))
    ap.add_argument("--rows", nargs="*", default=list(ROWS), help="rows to run (a row already in a "
                    "machine's record is skipped)")
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--steps", type=int, default=600, help="optimiser steps per model")
    ap.add_argument("--patience", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--particles", type=int, default=16)
    ap.add_argument("--risk", type=float, default=1e-3)
    ap.add_argument("--level", type=float, default=0.98)
    ap.add_argument("--warmup", type=int, default=20, help="first tail scores left out of the POT fit")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-commit", action="store_true")
    ap.add_argument("--table", help="only write the table of the records in this folder")
    ap.add_argument("--out", default="results/smd.md")
    ap.add_argument("--estimate", type=float, default=3.5, help="minutes per model row and machine, for the plan")
    args = ap.parse_args(argv)
    if args.table:
        Path(args.out).write_text(table(Path(args.table)))
        print(f"wrote {args.out}")
        return 0
    os.environ.setdefault("VRNN_THREADS", str(args.threads))
    from vrnn.cli import _quiet_lightning
    _quiet_lightning()
    records = Path(args.records)
    records.mkdir(parents=True, exist_ok=True)
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        ap.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    settings = {k: getattr(args, k) for k in ("window", "steps", "patience", "lr", "particles", "risk",
                                              "level", "warmup", "threads")}

    def read(m):
        path = records / f"{m}.json"
        return json.loads(path.read_text()) if path.exists() else None
    # row by row (all machines of a row before the next row), so that a stopped run leaves
    # whole rows; a (machine, row) already in its record is skipped
    todo = [(name, m) for name in args.rows for m in args.machines if name not in ((read(m) or {}).get("rows") or {})]
    print(f"plan: {len(todo)} (row, machine) runs to do of {len(args.rows) * len(args.machines)}: "
          f"{', '.join(sorted({n for n, _ in todo})) or 'none'}; models {SIZE}, windows of {args.window}, "
          f"at most {args.steps} optimiser steps each (batch 32, early stop patience {args.patience}), "
          f"K = {args.particles}; estimate ~{args.estimate:.1f} min per model row and machine, "
          f"~{args.estimate * sum(n in MODELS for n, _ in todo):.0f} min in all on {args.threads} thread(s)",
          flush=True)
    for name, m in todo:
        rec = read(m)
        if rec is not None and rec.get("settings") != settings:
            sys.exit(f"{records / (m + '.json')}: was run with other settings ({rec.get('settings')}); "
                     "rows of one record must share them")
        t0 = time.time()
        rec = strict(run_machine(m, [name], args, rec))
        rec["seconds"] = round(rec.get("seconds", 0.0) + time.time() - t0, 1)
        rec["settings"], rec["model_size"] = settings, SIZE
        path = records / f"{m}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1, allow_nan=False) + "\n")
        tmp.replace(path)
        print(f"{m} {name}: done in {time.time() - t0:.1f} s -> {path}", flush=True)
        if not args.no_commit:
            commit(path, f"SMD record: {m}, row {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
