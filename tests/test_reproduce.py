"""The reproduction's bookkeeping, without training: the plan (one split, shared runs, caps),
parameter matching, the records, the paired statistics and the tables written from the
records alone (`vrnn reproduce --report-only`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from vrnn import reproduce as rp

X_DIMS = {"asterisk-en": 200, "fillets-cs": 200, "lasa": 3, "chorales": 46, "folk": 39}


def fake_record(dataset: str, row: str, seed: int, ll: float, table: str = "paper") -> dict:
    """A record as run_job writes it, from made-up scores."""
    job = {"table": table, "dataset": dataset, "row": row, "preset": rp.ROWS[row].preset, "seed": seed,
           "params": 1000, "config": {"model": {}, "train": {"split_seed": 0, "patience": 5, "max_steps": 100,
                                                             "batch_size": 4}, "data": {}}}
    exact = rp.ROWS[row].preset.startswith("rnn-")
    fig = lambda v: {"per_sequence": v, "per_sequence_raw": v + 10, "per_step": v, "per_step_raw": v}  # noqa: E731
    est = {"exact": fig(ll)} if exact else {"elbo": fig(ll - 2), "is": fig(ll), "smc": fig(ll + 1)}
    res = {"estimators": est, "exact": exact, "num_sequences": 5, "num_steps": 50, "family": "x"}
    summary = {"steps": 100, "epochs": 3, "seconds": 1.0, "converged": True, "stopped": "early",
               "best_valid_bound": ll}
    return rp.make_record(job, res, summary, {"seed": 0, "test_sha1": "abc"})


def write_records(out: Path, records) -> None:
    for r in records:
        p = out / "records" / ("wallclock" if r["table"] == "wallclock" else "main") / r["dataset"]
        p.mkdir(parents=True, exist_ok=True)
        (p / f"{r['model']}-seed{r['seed']}.json").write_text(json.dumps(r))


def test_paired_differences_use_the_common_seeds_only():
    recs = [fake_record("lasa", "vrnn-gauss", s, v) for s, v in ((0, 10.0), (1, 12.0), (2, 20.0))]
    recs += [fake_record("lasa", "rnn-gauss", s, v) for s, v in ((0, 9.0), (1, 13.0))]
    mean, se, wins, n = rp.paired(recs, "vrnn-gauss", "rnn-gauss")
    assert (mean, wins, n) == (0.0, 1, 2)  # differences +1 and -1; seed 2 has no partner
    assert se == pytest.approx(1.0)  # std 1.414 / sqrt 2
    assert rp.paired(recs, "vrnn-gmm", "rnn-gauss") is None
    assert rp.best_rnn(recs + [fake_record("lasa", "rnn-gmm", 0, 30.0)]) == "rnn-gmm"


def test_plan_runs_every_row_on_one_split_and_shares_the_paper_rows(tmp_path):
    jobs = rp.plan("cpu", tmp_path, list(X_DIMS), X_DIMS, None, 1.0)
    keys = [(j["table_dir"], j["dataset"], j["row"], j["seed"]) for j in jobs]
    assert len(keys) == len(set(keys))  # a row run once even where two tables show it
    for j in jobs:
        s = rp.SETUPS["cpu"][j["dataset"]]
        assert j["config"]["train"]["split_seed"] == s["split_seed"]  # one split per dataset
        assert j["seed"] in s["seeds"]
        if j["table"] == "wallclock":
            assert "max_steps" not in j["config"]["train"]
            assert j["config"]["train"]["max_time_minutes"] == s["wallclock_minutes"]
        else:
            assert j["config"]["train"]["max_steps"] == s["train"]["max_steps"]
    chorales = {j["row"] for j in jobs if j["dataset"] == "chorales"}
    assert not chorales & (rp.GMM_ROWS | rp.AR_ROWS)  # binary data: no mixtures, no speech-only rows
    folk = {j["row"] for j in jobs if j["dataset"] == "folk"}
    assert folk == {"rnn-gauss", "vrnn-i-gauss", "vrnn-gauss"}  # a Table 1 column only
    assert {"rnn-ar", "vrnn-ar"} <= {j["row"] for j in jobs if j["dataset"] == "fillets-cs"}
    assert {j["row"] for j in jobs if j["table"] == "wallclock"} == set(rp.WALLCLOCK_ROWS)
    fivo = [j for j in jobs if j["row"] == "vrnn-gauss-fivo"]
    assert fivo and all(j["config"]["train"]["objective"] == "fivo" and j["config"]["train"]["particles"] == 4
                        for j in fivo)
    small = rp.plan("cpu", tmp_path, ["lasa"], X_DIMS, None, 0.1, rows=["vrnn-gauss"], seeds=2)
    assert [(j["row"], j["seed"], j["config"]["train"]["max_steps"]) for j in small] == [
        ("vrnn-gauss", 0, 600), ("vrnn-gauss", 1, 600)]


@pytest.mark.parametrize("row", ["vrnn-gauss", "vrnn-gmm", "srnn-gauss", "vrnn-ar", "rnn-ar"])
def test_rows_are_parameter_matched_to_rnn_gauss(row):
    base = rp.SETUPS["cpu"]["lasa"]["model"]
    target = rp.count_params("rnn-gauss", 3, rp._model_fields(rp.ROWS["rnn-gauss"], "lasa", base))
    fields = rp.match_params(rp.ROWS[row], "lasa", 3, base)
    n = rp.count_params(rp.ROWS[row].preset, 3, fields)
    assert abs(n - target) / target < 0.02, (row, n, target)


def test_report_writes_every_table_from_the_records_alone(tmp_path):
    recs = []
    for s in (0, 1, 2):
        recs += [fake_record("lasa", "rnn-gauss", s, 100.0 + s), fake_record("lasa", "rnn-gmm", s, 110.0 + s),
                 fake_record("lasa", "vrnn-gauss", s, 120.0 + s), fake_record("lasa", "srnn-gauss", s, 125.0 + 2 * s),
                 fake_record("lasa", "vrnn-gauss-fivo", s, 119.0)]
    recs += [fake_record("folk", row, s, -3.0 + 0.1 * s) for row in ("rnn-gauss", "vrnn-gauss") for s in (0, 1)]
    recs += [fake_record("asterisk-en", "vrnn-gmm", s, -5.0 * s, "wallclock") for s in (0, 1)]
    recs += [fake_record("asterisk-en", "vrnn-gmm-stepwise", s, -6.0 * s, "wallclock") for s in (0, 1)]
    for r in recs:
        if r["table"] == "wallclock":
            r["config"]["train"]["max_time_minutes"] = 8.0
    write_records(tmp_path, recs)
    js = rp.report(tmp_path, "cpu", list(rp.DATASETS), "vrnn reproduce --report-only", log=lambda *_: None)

    assert len(js["runs"]) == len(recs)
    for r in json.loads((tmp_path / "table1.json").read_text())["runs"]:
        for key in ("dataset", "model", "objective", "seed", "params", "elbo", "log_likelihood",
                    "log_likelihood_smc", "log_likelihood_raw", "unit", "steps", "seconds", "converged", "split"):
            assert key in r, key
    fivo = [r for r in js["runs"] if r["model"] == "vrnn-gauss-fivo"]
    assert {r["objective"] for r in fivo} == {"fivo"}

    table1 = (tmp_path / "table1.md").read_text()
    assert "| vrnn-gauss | >= 119.0 ~ 121.0 ± 0.6 |" in table1  # mean of 120, 121, 122; SE 1/sqrt 3
    assert "srnn-gauss" not in table1  # the paper's rows only
    beyond = (tmp_path / "beyond.md").read_text()
    # paired to its counterpart: srnn - vrnn = 5, 6, 7 -> 6.0 ± 0.6, 3 of 3; fivo: -1, -2, -3
    assert "| srnn-gauss | vrnn-gauss | 6.0 ± 0.6 | 3 of 3 |" in beyond
    assert "| vrnn-gauss-fivo | vrnn-gauss | -2.0 ± 0.6 | 0 of 3 |" in beyond
    # folk is a Table 1 column only: in table1.md, not in the successors' tables, but its
    # training curves are with the others
    assert table1.splitlines()[2] == "| model | lasa (IAM-OnDB) | folk (Nottingham) |"
    assert "folk (Nottingham)" not in beyond.splitlines()[2] and "**folk: training curves**" in beyond
    wall = (tmp_path / "wallclock.md").read_text()
    assert "ours wins 1 of 2 seeds" in wall  # seed 0 ties (not a win), seed 1 +1
    assert not math.isnan(js["runs"][0]["log_likelihood"])
    said = []
    assert rp.figures(tmp_path, js["runs"], log=said.append) == []  # no checkpoints in a fresh clone
    assert "left as they are" in said[0]


def test_samples_come_from_the_lowest_seed_with_a_checkpoint(tmp_path):
    recs = [fake_record("lasa", "vrnn-gauss", s, 1.0) for s in (2, 0, 1)]
    for s in (1, 2):  # seed 0's checkpoint is not here
        ckpt = tmp_path / "runs" / "main" / "lasa" / f"vrnn-gauss-seed{s}" / "ckpt"
        ckpt.mkdir(parents=True)
        (ckpt / "best.ckpt").write_bytes(b"")
    assert rp.first_checkpoints(tmp_path, recs) == {
        ("lasa", "vrnn-gauss"): tmp_path / "runs" / "main" / "lasa" / "vrnn-gauss-seed1"}


def test_a_finished_runs_record_is_written_whole_with_its_curve(tmp_path, monkeypatch):
    """The record is written once, curve facts included: reporting later does not rewrite it
    (a rewritten record is a second commit of the same result)."""
    import subprocess

    import torch
    job = rp.plan("cpu", tmp_path, ["lasa"], X_DIMS, None, 1.0, rows=["vrnn-gauss"], seeds=1)[0]
    ckpt = Path(job["dir"]) / "ckpt"
    (ckpt / "logs" / "csv").mkdir(parents=True)
    (ckpt / "summary.json").write_text(json.dumps({"stopped": "early", "converged": True, "steps": 30,
                                                   "epochs": 3, "seconds": 2.0, "best_valid_bound": -5.0}))
    (ckpt / "logs" / "csv" / "metrics.csv").write_text(
        "epoch,step,train/bound,train/kl,valid/bound,valid/kl\n0,9,-9.0,1.0,,\n0,9,,,-8.0,2.0\n"
        "1,19,-6.0,1.5,,\n1,19,,,-5.0,2.5\n2,29,-5.5,1.6,,\n2,29,,,-5.5,2.6\n")
    torch.save({"vrnn": {"data": {"split_seed": 0, "fractions": [0.8, 0.1, 0.1], "load_opts": {}}}},
               ckpt / "best.ckpt")
    fig = {"per_sequence": -5.0, "per_sequence_raw": -4.0, "per_step": -0.1, "per_step_raw": -0.1}
    res = {"estimators": {"elbo": fig, "is": fig, "smc": fig}, "exact": False, "num_sequences": 3,
           "num_steps": 30, "family": "vrnn"}

    def fake_run(cmd, **kw):
        assert "evaluate" in cmd  # training has finished: only scoring runs
        return subprocess.CompletedProcess(cmd, 0, stdout=json.dumps(res), stderr="")

    monkeypatch.setattr(rp.subprocess, "run", fake_run)
    rec = rp.run_job(job, tmp_path, log=lambda *_: None)
    assert rec["curve"] == {"best_epoch": 1, "epochs_logged": 3, "valid_bound_best": -5.0, "valid_kl_best": 2.5,
                            "train_bound_at_best": -6.0, "train_kl_at_best": 1.5, "valid_bound_last": -5.5}
    path = rp.record_path(tmp_path, job)
    written = path.read_text()
    assert json.loads(written) == rec
    rp.load_records(tmp_path)
    assert path.read_text() == written


def test_a_run_stopped_before_its_first_checkpoint_starts_afresh(tmp_path, monkeypatch):
    """Killed before the first epoch ended, a run leaves logs but no last.ckpt: `vrnn train`
    would refuse that folder without --resume, and there is nothing to resume."""
    job = rp.plan("cpu", tmp_path, ["lasa"], X_DIMS, None, 1.0, rows=["vrnn-gauss"], seeds=1)[0]
    logs = Path(job["dir"]) / "ckpt" / "logs"
    logs.mkdir(parents=True)
    (logs / "metrics.csv").write_text("epoch\n")
    calls = []

    def fake_run(cmd, **kw):
        calls.append((cmd, logs.exists()))
        raise RuntimeError("stop here")

    monkeypatch.setattr(rp.subprocess, "run", fake_run)
    with pytest.raises(RuntimeError, match="stop here"):
        rp.run_job(job, tmp_path, log=lambda *_: None)
    (cmd, had_logs), = calls
    assert "train" in cmd and "--resume" not in cmd and not had_logs


def poly_record(row: str, seed: int, ll: float, dataset: str = "jsb") -> dict:
    """A piano-roll benchmark record from made-up scores (nats per step)."""
    job = {"table": "polyphonic", "dataset": dataset, "row": row, "preset": rp.ROWS[row].preset, "seed": seed,
           "params": 1000, "config": {"model": {}, "train": {"patience": 5, "max_steps": 100, "batch_size": 4},
                                      "data": {}}}
    exact = not rp.ROWS[row].latent
    fig = lambda v: {"per_sequence": 50 * v, "per_sequence_raw": 50 * v, "per_step": v, "per_step_raw": v}  # noqa: E731
    est = {"exact": dict(fig(ll), per_step_after_first=ll + 0.1)} if exact else \
        {"elbo": fig(ll - 0.3), "is": fig(ll - 0.1), "smc": fig(ll)}
    res = {"estimators": est, "exact": exact, "num_sequences": 77, "num_steps": 4725}
    summary = {"steps": 100, "epochs": 3, "seconds": 1.0, "converged": True, "stopped": "early",
               "best_valid_bound": ll}
    trained = None
    if rp.ROWS[row].objective != "elbo":
        trained = {"estimator": "smc", "num_samples": 4, "estimators": {"smc": fig(ll - 0.2)}}
    return rp.make_record(job, res, summary, {"seed": None, "test_sha1": "abc"}, trained)


def test_polyphonic_plan_keeps_the_sets_own_split_and_widens_the_rnn(tmp_path):
    jobs = rp.plan("cpu", tmp_path, ["jsb", "lasa"], {"jsb": 88, "lasa": 3}, None, 1.0, tables=["polyphonic"])
    assert {j["dataset"] for j in jobs} == {"jsb"}  # lasa has no polyphonic rows
    assert [j["row"] for j in jobs if j["seed"] == 0] == rp.POLYPHONIC_ROWS
    assert all("split_seed" not in j["config"]["train"] and j["table_dir"] == "polyphonic" for j in jobs)
    params = {j["row"]: j["params"] for j in jobs}
    assert abs(params["rnn-gauss"] - params["vrnn-gauss"]) / params["vrnn-gauss"] < 0.03
    assert abs(params["rnn-ar"] - params["vrnn-ar"]) / params["vrnn-ar"] < 0.03
    vrnn = next(j for j in jobs if j["row"] == "vrnn-gauss")["config"]["model"]
    assert vrnn["h_dim"] == vrnn["z_dim"] == 32 and vrnn["output"] == "bernoulli"  # FIVO's JSB size
    ar = next(j for j in jobs if j["row"] == "vrnn-ar")["config"]["model"]
    assert ar["binary_dims"] == list(range(88))
    # no paper-table rows on the benchmark sets, no benchmark rows elsewhere
    assert rp.rows_for("jsb", "paper") == [] and rp.rows_for("chorales", "polyphonic") == []


def test_polyphonic_report_puts_published_figures_beside_ours(tmp_path):
    recs = []
    for s in (0, 1, 2):
        recs += [poly_record("rnn-gauss", s, -8.6), poly_record("rnn-ar", s, -5.5 - 0.1 * s),
                 poly_record("vrnn-gauss", s, -7.0), poly_record("vrnn-gauss-iwae", s, -6.9),
                 poly_record("vrnn-gauss-fivo", s, -6.8), poly_record("vrnn-ar", s, -5.4),
                 poly_record("srnn-gauss-warmup", s, -7.2), poly_record("srnn-gauss-warmup-long", s, -6.9 + 0.1 * s),
                 poly_record("vrnn-gauss-warmup-long", s, -7.0)]
    recs += [poly_record("srnn-gauss-clip", s, -7.0) for s in (0, 1)]  # seed 2 not finished
    recs += [poly_record("vrnn-gauss-elbo-sampled", s, -6.95 - 0.01 * s) for s in (0, 1)]
    out = tmp_path
    for r in recs:
        p = out / "records" / "polyphonic" / r["dataset"]
        p.mkdir(parents=True, exist_ok=True)
        (p / f"{r['model']}-seed{r['seed']}.json").write_text(json.dumps(r))
    rp.report(out, "cpu", list(rp.DATASETS), "vrnn reproduce --report-only", log=lambda *_: None)
    md = (out / "polyphonic.md").read_text()
    assert "| RNN (LSTM, Bernoulli) | 1,000 |  | = -8.600 ± 0.000 | (exact) | (exact) | -8.500 ± 0.000 |" in md
    assert ("| VRNN, FIVO (K=4) | 1,000 | -7.100 ± 0.000 | -6.900 ± 0.000 | -6.800 ± 0.000 | "
            "-7.000 ± 0.000 (K=4) |") in md
    assert "| LSTM | Bai, Kolter, Koltun 2018" in md and "-8.45 (first frame left out)" in md
    # the targets, decided from the records: -8.5 < -8.45; FIVO bound -7.0 >= -7.51; RNN-NADE -5.19
    assert "- RNN at or above TCN's LSTM (first frame left out): missed (-8.500 against -8.45)" in md
    assert "published N=5 FIVO: met (-7.000 against -7.51)" in md
    assert ("ordering FIVO >= IWAE >= ELBO, paired per seed: by each row's own bound met (FIVO - IWAE "
            "0.100 ± 0.000, 3 of 3 seeds; IWAE - ELBO 0.200 ± 0.000, 3 of 3)") in md
    # against the ELBO trained on the sampled KL, on the two seeds it has (SMC: IWAE -6.9 + 0.2)
    assert ("the same ordering with the ELBO trained on the sampled KL (as the FIVO paper's code): paired "
            "per seed: by each row's own bound met (FIVO - IWAE 0.100 ± 0.000, 3 of 3 seeds; IWAE - ELBO "
            "0.155 ± 0.005, 2 of 2)") in md
    assert ("the ELBO trained on the sampled KL against the analytic KL (SMC, K=40): 0.045 ± 0.005 nats per "
            "step, the sampled one ahead in 2 of 2 seeds") in md
    assert "| VRNN, ELBO with the sampled KL | 1,000 |" in md
    # the best SRNN row's ELBO (-6.9 + 0.1 s - 0.3: -7.1), and the SRNN paired with the VRNN at one schedule
    assert ("SRNN's ELBO at or above its paper's bound: missed (-7.100 against -4.74; SRNN, KL warm-up over "
            "4,000 steps, the best SRNN row") in md
    assert ("SRNN against the VRNN, both with the KL weight rising over 4,000 steps (SMC, K=40): 0.200 ± 0.058 "
            "nats per step, the SRNN ahead in 3 of 3 seeds") in md
    assert ("SRNN with clipped transitions against the plain one (both warmed up over 4,000 steps; SMC, "
            "K=40): -0.150 ± 0.050 nats per step over the 2 seed(s) both finished, the clipped one ahead in 0") in md
    assert ("SRNN with clipped transitions against the VRNN, both with the KL weight rising over 4,000 steps "
            "(SMC, K=40): 0.000 ± 0.000 nats per step, the SRNN ahead in 0 of 2 seeds") in md
    assert "our best row at or above RNN-NADE: missed (-5.400 against -5.19; VRNN, MADE output)" in md
    assert "VRNN-AR ahead in 3 of 3 seeds" in md  # -5.4 against -5.5, -5.6, -5.7
    assert "Not run yet: Nottingham, MuseData, Piano-midi.de." in md
    assert not (out / "table1.md").read_text().count("jsb")  # the benchmark has its own table


def test_a_run_on_some_datasets_keeps_every_table_whole(tmp_path):
    """The tables come from every record: reporting after a run on one dataset (or with
    --datasets) never drops the other datasets' rows from table1.md."""
    recs = [fake_record("lasa", row, s, 100.0 + s) for row in ("rnn-gauss", "vrnn-gauss") for s in (0, 1)]
    recs += [poly_record("rnn-gauss", 0, -8.6)]
    write_records(tmp_path, [r for r in recs if r["table"] != "polyphonic"])
    p = tmp_path / "records" / "polyphonic" / "jsb"
    p.mkdir(parents=True)
    (p / "rnn-gauss-seed0.json").write_text(json.dumps(recs[-1]))
    rp.reproduce("cpu", tmp_path, datasets=["jsb"], report_only=True, log=lambda *_: None)
    assert "lasa (IAM-OnDB)" in (tmp_path / "table1.md").read_text()
    assert "JSB Chorales" in (tmp_path / "polyphonic.md").read_text()


def test_the_dvae_family_rows_are_planned_for_asterisk_en_only_with_its_protocol(tmp_path):
    jobs = rp.plan("cpu", tmp_path, list(X_DIMS), X_DIMS, None, 1.0, rows=rp.FAMILY_ROWS)
    s = rp.SETUPS["cpu"]["asterisk-en"]
    assert {j["dataset"] for j in jobs} == {"asterisk-en"}  # not the other stand-in sets
    assert sorted((j["row"], j["seed"]) for j in jobs) == sorted(
        (r, k) for r in rp.FAMILY_ROWS for k in s["seeds"])
    target = rp.count_params("rnn-gauss", 200, rp._model_fields(rp.ROWS["rnn-gauss"], "asterisk-en", s["model"]))
    for j in jobs:
        assert j["table"] == "beyond" and j["table_dir"] == "main"
        assert j["config"]["train"] == {**s["train"], "split_seed": s["split_seed"]}  # the rows' own protocol
        assert j["config"]["data"] == s["data"]
        assert abs(j["params"] - target) / target < 0.02, (j["row"], j["params"], target)
    for ds in X_DIMS:
        assert bool(set(rp.FAMILY_ROWS) & set(rp.rows_for(ds, "beyond"))) == (ds == "asterisk-en")


def test_a_row_without_smc_shows_not_offered_with_the_reason(tmp_path):
    from vrnn.config import VRNNConfig
    from vrnn.models import cannot
    why = cannot(VRNNConfig.preset("dsae-gauss", x_dim=4), "smc")
    assert why
    recs = []
    for s in (0, 1):
        recs += [fake_record("asterisk-en", "rnn-gauss", s, -30.0), fake_record("asterisk-en", "vrnn-gauss", s, -20.0),
                 fake_record("asterisk-en", "dkf-gauss", s, -10.0 - s), fake_record("lasa", "rnn-gauss", s, 1.0)]
        job = {"table": "beyond", "dataset": "asterisk-en", "row": "dsae-gauss", "preset": "dsae-gauss", "seed": s,
               "params": 1000, "config": {"model": {}, "train": {"split_seed": 0, "patience": 5, "max_steps": 100,
                                                                 "batch_size": 4}, "data": {}}}
        fig = {"per_sequence": -25.0, "per_sequence_raw": -15.0, "per_step": -2.5, "per_step_raw": -1.5}
        res = {"estimators": {"elbo": fig, "is": fig}, "exact": False, "num_sequences": 5, "num_steps": 50,
               "not_offered": {"smc": why}}  # what `vrnn evaluate --estimator all` gives
        summary = {"steps": 100, "epochs": 3, "seconds": 1.0, "converged": True, "stopped": "early",
                   "best_valid_bound": -25.0}
        recs.append(rp.make_record(job, res, summary, {"seed": 0, "test_sha1": "abc"}))
    assert recs[-1]["log_likelihood_smc"] is None and recs[-1]["not_offered"] == {"smc": why}
    write_records(tmp_path, recs)
    rp.report(tmp_path, "cpu", list(rp.DATASETS), "vrnn reproduce --report-only", log=lambda *_: None)
    beyond = (tmp_path / "beyond.md").read_text()
    dsae = next(line for line in beyond.splitlines() if line.startswith("| dsae-gauss | 1,000 |"))
    assert dsae.split(" | ")[4] == "not offered (below)"
    assert f"SMC not offered for dsae-gauss: {why}." in beyond
    dkf = next(line for line in beyond.splitlines() if line.startswith("| dkf-gauss | 1,000 |"))
    assert dkf.split(" | ")[4] == "-9.5 ± 0.5"  # DKF offers SMC: its figure (IS + 1 in fake_record)
    # the summary says where the family did not run; the family table ranks by IS against the VRNN
    assert "| dsae-gauss | >= -25.0 ~ -25.0 ± 0.0 | not run |" in beyond
    assert "| 1 | dkf-gauss | -10.5 ± 0.5 | 9.5 ± 0.5 | 2 of 2 | 9.5 ± 0.5 | 2 of 2 |" in beyond
    assert "| 2 | vrnn-gauss | -20.0 ± 0.0 | ref | | ref | |" in beyond
    assert "| 3 | dsae-gauss | -25.0 ± 0.0 | -5.0 ± 0.0 | 0 of 2 | not offered | |" in beyond
    assert "not run on fillets-cs, lasa, chorales (no compute for them)" in beyond


@pytest.mark.parametrize("no_report", [False, True])
def test_no_report_trains_and_records_but_leaves_the_tables(tmp_path, monkeypatch, no_report):
    """`--no-report` (queued runs): each finished run's record is written, the tables are
    not rewritten (they are, without it), and the log says which command writes them."""
    jobs = [{"dir": str(tmp_path / "runs" / f"s{k}"), "table": "polyphonic", "table_dir": "polyphonic",
             "dataset": "jsb", "row": "rnn-gauss", "seed": k, "params": 1} for k in (0, 1)]
    done = rp.record_path(tmp_path, jobs[0])  # seed 0 was recorded by an earlier run
    done.parent.mkdir(parents=True)
    done.write_text("{}")
    ran, reported, lines = [], [], []
    monkeypatch.setattr(rp, "plan", lambda *a, **k: jobs)
    monkeypatch.setattr(rp, "describe_plan", lambda *a, **k: None)
    monkeypatch.setattr(rp, "run_job", lambda j, out, log: ran.append(j) or {"record": 1})
    monkeypatch.setattr(rp, "report", lambda *a, **k: reported.append(a) or {"runs": []})
    monkeypatch.setattr(rp, "figures", lambda *a, **k: [])
    js = rp.reproduce("cpu", tmp_path, datasets=["jsb"], rows=["rnn-gauss"], seeds=2,
                      no_report=no_report, log=lines.append)
    assert ran == jobs  # run_job itself skips what is recorded
    assert bool(reported) is not no_report and (js is None) is no_report
    if no_report:
        assert "1 run(s) trained and recorded" in lines[-1] and "(1 recorded before)" in lines[-1]
        assert "--report-only` writes them" in lines[-1]
    else:
        assert "wrote the tables" in lines[-1]


def test_no_report_contradicts_report_only(tmp_path):
    with pytest.raises(rp.ConfigError, match="--no-report"):
        rp.reproduce("cpu", tmp_path, report_only=True, no_report=True, log=lambda *_: None)
