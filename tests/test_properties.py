"""Random option values and random small files thrown at `train`, `evaluate` and `sample`
(hypothesis): every run ends with exit 0, or with exit 2 and one line on stderr naming
the option or the file; never a traceback; nothing that existed before is changed."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from test_cli import TINY, make_arrays
from vrnn.cli import main
from vrnn.config import PRESETS

SETTINGS = settings(max_examples=int(os.environ.get("VRNN_PROPERTY_EXAMPLES", 12)), deadline=None,
                    derandomize=os.environ.get("VRNN_PROPERTY_RANDOM") is None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

text = st.sampled_from(["", "x", "1.5", "-1", "0", "nan", "inf", "1e9", "none", "3"])
numbers = st.one_of(st.integers(-3, 4), st.floats(allow_nan=True, allow_infinity=True, width=32), text)

# The tables are drawn from the options' declarations (vrnn.options), so a new option is
# thrown at the commands without anyone adding it here: numbers (good and bad) for numeric
# options, every choice plus a bad one for choices, on/off for switches. A few flags get a
# narrower strategy (hardware, cost) or are set by the test itself; see FIXED.
FIXED = {"--max-epochs", "--limit-train-batches", "--json", "--prefix", "--config"}
NARROW = {
    "--devices": st.sampled_from(["0", "1", "two"]),          # 2+ would start real DDP processes
    "--num-nodes": st.sampled_from(["0", "1", "2", "x"]),      # 2: no cluster here, refused
    "--accelerator": st.sampled_from(["cpu", "tpu", "gpu"]),   # gpu: none here, refused
    "--strategy": st.sampled_from(["auto", "ddp", "horovod"]),
}


def table_for(*classes) -> dict:
    """{flag: strategy} for every declared flag of the dataclasses ``classes``."""
    from vrnn.options import _kinds, specs
    out = {}
    for cls in classes:
        for _, typ, spec, _ in specs(cls):
            flag = spec.flag
            if flag is None or flag in FIXED:
                continue
            if flag in NARROW:
                out[flag] = NARROW[flag]
            elif spec.choices is not None:
                out[flag] = st.sampled_from([str(c) for c in spec.choices] + ["nonsense"])
            elif _kinds(typ)[0] == {"bool"}:
                out[flag] = st.just(None)  # a switch: given or not
            elif _kinds(typ)[0] & {"int", "float", "ints", "floats"}:
                out[flag] = numbers
            else:
                out[flag] = text
    return out


def _tables():
    from vrnn.cli import EvaluateOptions, LatentsOptions, SampleOptions
    from vrnn.config import VRNNConfig
    from vrnn.train import TrainConfig
    return (table_for(TrainConfig, VRNNConfig), table_for(EvaluateOptions), table_for(SampleOptions),
            table_for(LatentsOptions))


TRAIN, EVALUATE, SAMPLE, LATENTS = _tables()


def test_every_declared_flag_is_thrown():
    """The options named in issue 23 (and any added later) are in the tables."""
    for flag in ("--objective", "--particles", "--resample", "--ess-threshold", "--resampler", "--output",
                 "--kl-warmup", "--free-bits", "--tbptt", "--precision", "--h-dim"):
        assert flag in TRAIN, flag
    for flag in ("--estimator", "--resample", "--ess-threshold", "--resampler", "--max-memory", "--samples"):
        assert flag in EVALUATE, flag
    for flag in ("--smc", "--resample", "--ess-threshold", "--resampler", "--sample"):
        assert flag in LATENTS, flag
    assert {"--num", "--steps", "--mean", "--seed"} <= set(SAMPLE)


def add(argv: list, opts: dict) -> list:
    for k, v in opts.items():
        argv += [k] if v is None else [k, str(v)]
    return argv


def options(table):
    """Any subset of the table's options, each with a drawn value."""
    return st.fixed_dictionaries({}, optional=table)


@st.composite
def array_folder(draw):
    """A few sequences as .npy/.csv files, sometimes with a defect (NaN, one step, another
    dimension, text in a CSV, an empty file)."""
    n = draw(st.integers(2, 7))
    files = []
    for i in range(n):
        T = draw(st.integers(1, 9))
        D = draw(st.sampled_from([3, 3, 3, 4]))
        kind = draw(st.sampled_from(["npy", "npy", "csv", "nan", "text", "empty"]))
        files.append((i, T, D, kind))
    return files


def write_folder(root: Path, files) -> Path:
    folder = root / "data"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, T, D, kind in files:
        x = rng.normal(size=(T, D)).astype(np.float32)
        if kind == "nan":
            x[0, 0] = np.nan
        if kind in ("npy", "nan"):
            np.save(folder / f"s{i}.npy", x)
        elif kind == "csv":
            (folder / f"s{i}.csv").write_text("\n".join(",".join(f"{v:.3f}" for v in row) for row in x))
        elif kind == "text":
            (folder / f"s{i}.csv").write_text("1,2,3\n4,oops,6\n")
        else:
            (folder / f"s{i}.npy").write_bytes(b"")
    return folder


def tree_hashes(root: Path) -> dict:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath) / name
            out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def check_outcome(code, captured, argv, before, root):
    event(f"exit {code}")  # (pytest --hypothesis-show-statistics shows how many of each)
    assert code in (0, 2), (argv, code, captured.err[-2000:])
    assert "Traceback" not in captured.err, (argv, captured.err[-2000:])
    if code == 2:
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1, (argv, captured.err)
        line = lines[0]
        named = [a for a in argv if isinstance(a, str) and (a.startswith("--") or "/" in a)]
        names = {a.lstrip("-") for a in named} | {a.lstrip("-").replace("-", "_") for a in named}
        assert any(n and n in line for n in names) or str(root) in line, (argv, line)
    after = tree_hashes(root)
    for path, digest in before.items():  # nothing that existed was changed or removed
        assert after.get(path) == digest, (argv, path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    data = make_arrays(root / "arrays", n=10)
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    assert main(["--threads", "1", "train", "--data", str(data), "--model", "vrnn-gauss", "--out",
                 str(root / "run"), "--max-epochs", "1", "--batch-size", "4", "--config", str(cfg),
                 "--no-progress"]) == 0
    return root


@SETTINGS
@given(opts=options(TRAIN), files=array_folder(), model=st.sampled_from(sorted(PRESETS) + ["vrnn-x"]))
def test_train_with_random_options_and_files(opts, files, model, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_folder(root, files)
        cfg = root / "tiny.json"
        cfg.write_text(json.dumps(TINY))
        before = tree_hashes(root)
        argv = ["--threads", "1", "train", "--data", str(data), "--model", model, "--out", str(root / "out"),
                "--config", str(cfg), "--no-progress", "--max-epochs", "1", "--limit-train-batches", "1"]
        add(argv, opts)
        capsys.readouterr()
        code = main(argv)
        check_outcome(code, capsys.readouterr(), argv, before, root)


@SETTINGS
@given(opts=options(EVALUATE), files=array_folder())
def test_evaluate_with_random_options_and_files(opts, files, trained, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_folder(root, files)
        before = {**tree_hashes(root), **tree_hashes(trained)}
        argv = ["--threads", "1", "evaluate", str(trained / "run" / "last.ckpt"), "--data", str(data), "--json"]
        add(argv, opts)
        capsys.readouterr()
        code = main(argv)
        captured = capsys.readouterr()
        if code == 0:
            json.loads(captured.out)
            assert "NaN" not in captured.out and "Infinity" not in captured.out  # strict JSON
        check_outcome(code, captured, argv, {k: v for k, v in before.items() if k.startswith(tmp)}, root)
        assert tree_hashes(trained) == {k: v for k, v in before.items() if k.startswith(str(trained))}


@SETTINGS
@given(opts=options(SAMPLE), prefix=st.one_of(st.none(), array_folder()), mean=st.booleans())
def test_sample_with_random_options_and_files(opts, prefix, mean, trained, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        argv = ["--threads", "1", "sample", str(trained / "run" / "last.ckpt"), "--out", str(root / "out")]
        if prefix is not None:
            folder = write_folder(root, prefix[:1])
            argv += ["--prefix", str(next(folder.iterdir()))]
        if mean:
            argv.append("--mean")
        add(argv, {k: v for k, v in opts.items() if not (k == "--mean" and mean)})
        before = tree_hashes(root)
        capsys.readouterr()
        code = main(argv)
        check_outcome(code, capsys.readouterr(), argv, before, root)
        if code != 0:
            assert not (root / "out").exists() or not any((root / "out").iterdir())


@SETTINGS
@given(opts=options(LATENTS), files=array_folder())
def test_latents_with_random_options_and_files(opts, files, trained, capsys):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = write_folder(root, files)
        before = tree_hashes(root)
        argv = add(["--threads", "1", "latents", str(trained / "run" / "last.ckpt"), "--data", str(data),
                    "--out", str(root / "l.npz")], opts)
        capsys.readouterr()
        code = main(argv)
        check_outcome(code, capsys.readouterr(), argv, before, root)
        if code == 0:
            with np.load(root / "l.npz") as z:
                assert all(np.isfinite(z[k]).all() for k in z.files if z[k].dtype.kind == "f")
