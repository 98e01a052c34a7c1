"""Correct at the edges (issue 23): numerics and naming, results that looked valid but were
wrong, one-line errors, hangs and silence. One test per item, through the CLI where a user
meets it; tiny models and data made here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from test_cli import TINY, make_arrays, run, train
from vrnn import VRNNConfig, build
from vrnn.inference import objective
from vrnn.smc import particle_filter


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(data folder, config file, run folder) of one tiny VRNN-Gauss trained for 1 epoch."""
    root = tmp_path_factory.mktemp("edges")
    data = make_arrays(root / "arrays")
    cfg = root / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    out = root / "run"
    assert train(data, out, cfg, "vrnn-gauss", 1) == 0
    return data, cfg, out


def tiny_model(**kw):
    torch.manual_seed(0)
    return build(VRNNConfig.preset(kw.pop("name", "vrnn-gauss"), x_dim=kw.pop("x_dim", 3), h_dim=8,
                                   z_dim=2, phi_x_dim=8, phi_z_dim=8, enc_dim=8, prior_dim=8,
                                   dec_dim=8, **kw))


# ------------------------------------------------------------------ numerics and naming
def test_fivo_under_warmup_logs_its_tempered_surrogate_not_a_bound(arrays, tiny_config, tmp_path):
    out = tmp_path / "fivo"
    assert train(arrays, out, tiny_config, "vrnn-gauss", 1, "--objective", "fivo", "--particles", 2,
                 "--kl-warmup", 1000) == 0
    lines = (out / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    assert "train/fivo_tempered" in header
    if "train/bound" in header:  # the column may exist, but no value is logged in it
        col = header.index("train/bound")
        assert all(row.split(",")[col] == "" for row in lines[1:])
    model, x = tiny_model(), torch.randn(3, 5, 3)
    assert objective(model, x, bound="fivo", num_samples=2, kl_weight=0.5)[1].tempered
    assert not objective(model, x, bound="fivo", num_samples=2)[1].tempered


def test_autoregressive_density_runs_in_float32_under_bf16_autocast():
    model = tiny_model(x_dim=100, output="ar")
    g = torch.Generator().manual_seed(1)
    params = torch.randn(4, 6, model.head.param_dim, generator=g)
    x = torch.randn(4, 6, 100, generator=g)
    ref = model.head.log_prob(params, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model.head.log_prob(params, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-3)


def test_fivo_with_two_particles_resamples_as_fivo_does():
    """The ESS of 2 particles is never below 1 = 0.5 x 2: the rule is ESS <= K/2."""
    model = tiny_model()
    x = 30.0 * torch.randn(2, 40, 3, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    f = particle_filter(model, x, particles=2)
    assert bool(f.resampled.any())


def test_free_bits_help_says_where_it_clamps(capsys):
    assert run("train", "--help") == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "clamped per sequence, step and dimension" in text


def test_latents_names_the_posterior_mean_score_a_plug_in_value(trained, tmp_path):
    data, _, out = trained
    assert run("latents", out / "best.ckpt", "--data", data, "--out", tmp_path / "l.npz") == 0
    lat = np.load(tmp_path / "l.npz")
    assert "plugin_score" in lat.files and "score" not in lat.files
    np.testing.assert_allclose(lat["plugin_score"], lat["log_px"] - lat["kl"], rtol=1e-5, atol=1e-5)


def test_api_refuses_empty_batches_and_negative_weights():
    model, x = tiny_model(), torch.randn(2, 4, 3)
    for bad in (torch.randn(0, 4, 3), torch.randn(2, 0, 3)):
        with pytest.raises(ValueError, match="at least one sequence"):
            model.elbo(bad)
    with pytest.raises(ValueError, match="kl_weight"):
        objective(model, x, kl_weight=-1.0)
    with pytest.raises(ValueError, match="free_bits"):
        objective(model, x, free_bits=-1.0)
