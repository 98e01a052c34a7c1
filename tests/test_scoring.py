"""Scoring and generation: importance-sampled log p(x) against the ELBO and against
numerical integration; samples against the density; prefix continuation; unit conversions."""

from __future__ import annotations

import math

import pytest
import torch

from vrnn import VRNN, VRNNConfig, bits_per_dim, build, nats_per_step
from vrnn import generate
from vrnn.inference import log_likelihood, log_weights

DT = torch.float64




def make_model(preset="vrnn-gauss", seed=0, **kw):
    kw.setdefault("x_dim", 2)
    kw.setdefault("h_dim", 8)
    kw.setdefault("z_dim", 2)
    if "gmm" in preset:
        kw.setdefault("n_components", 3)
    torch.manual_seed(seed)
    return build(VRNNConfig.preset(preset, **kw)).double()


def make_x(B, T, D, seed=1):
    return torch.randn(B, T, D, dtype=DT, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------- numerical integration over z

def _log_trapz_normal(log_g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """log of the integral of N(u; 0, 1) exp(log_g(u)) du over the last axis (trapezoid)."""
    du = u[1] - u[0]
    w = torch.full_like(u, float(du))
    w[0] = w[-1] = du / 2
    log_n = -0.5 * u ** 2 - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(log_g + log_n + w.log(), dim=-1)


@torch.no_grad()
def exact_log_px(model: VRNN, x: torch.Tensor, n: int = 801, width: float = 8.0) -> float:
    """log p(x) of one sequence x (T, 1), T in {1, 2}, z_dim 1, by integration over z.

    log p(x) = log int p(z1) p(x1|z1) [int p(z2|h1) p(x2|z2,h1) dz2] dz1, each integral a
    trapezoid rule on a grid of +-``width`` prior stds, using the model's own submodules.
    The change of variables z = mu + std * u turns p(z) dz into N(u; 0, 1) du.
    """
    cfg = model.cfg
    assert cfg.latent and cfg.z_dim == 1 and cfg.x_dim == 1 and x.shape[0] in (1, 2)
    H = cfg.h_dim
    u = torch.linspace(-width, width, n, dtype=DT)
    h0, c0 = model.initial_state(1, dtype=DT)
    top0 = h0[-1]                                                    # (1, H)
    mu0, s0 = model.prior_params(top0)                               # (1, 1)
    z1 = mu0 + s0 * u.unsqueeze(-1)                                  # (n, 1)
    fz1 = model.phi_z(z1)
    p1 = model.head(model.decoder(torch.cat([fz1, top0.expand(n, H)], -1)))
    log_g = model.head.log_prob(p1, x[0].expand(n, 1))               # (n,)
    if x.shape[0] == 2:
        fx1 = model.phi_x(x[0].expand(n, 1))
        cell = model.cell
        hs, cs = cell.step(cell.w_x(fx1) + cell.w_z(fz1), cell.w_h(h0[0].expand(n, H)),
                           [h.expand(n, H) for h in h0.unbind(0)],
                           [c.expand(n, H) for c in c0.unbind(0)], None)
        top1 = hs[-1]                                                # (n, H)
        mu1, s1 = model.prior_params(top1)                           # (n, 1)
        z2 = mu1.unsqueeze(1) + s1.unsqueeze(1) * u.view(1, n, 1)    # (n, n, 1)
        fz2 = model.phi_z(z2)
        p2 = model.head(model.decoder(torch.cat([fz2, top1.unsqueeze(1).expand(n, n, H)], -1)))
        inner = _log_trapz_normal(model.head.log_prob(p2, x[1].expand(n, n, 1)), u)  # (n,)
        log_g = log_g + inner
    return float(_log_trapz_normal(log_g, u))


def tiny_1d_model(preset="vrnn-gauss", seed=0, **kw):
    return make_model(preset, seed=seed, x_dim=1, z_dim=1, h_dim=8, **kw)


def test_numerical_integration_is_right_for_a_known_case():
    """Guard for the integrator: with a decoder that ignores z, p(x1) is the decoder's
    Gaussian (the integral of the prior is 1)."""
    model = tiny_1d_model()
    with torch.no_grad():
        for p in model.phi_z.parameters():
            p.zero_()
    x = torch.tensor([[0.7]], dtype=DT)
    h = model.initial_state(1, dtype=DT)[0][-1]
    fz = model.phi_z(torch.zeros(1, 1, dtype=DT))
    want = model.head.log_prob(model.head(model.decoder(torch.cat([fz, h], -1))), x)
    assert abs(exact_log_px(model, x) - float(want.detach())) < 1e-10


# ------------------------------------------------------------ 4. importance sampling

@pytest.mark.parametrize("preset", ["vrnn-gauss", "vrnn-i-gauss", "vrnn-gmm"])
@pytest.mark.parametrize("T", [1, 2])
def test_importance_sampling_matches_numerical_integration(preset, T):
    model = tiny_1d_model(preset, seed=3)
    x = make_x(1, T, 1, seed=4)
    truth = exact_log_px(model, x[0])
    # the grid is fine enough: halving it changes nothing
    assert abs(exact_log_px(model, x[0], n=401) - truth) < 1e-4
    # K large enough that the estimate's own noise (~0.01 nats here) is well inside the
    # tolerance; a K=1..100 estimate would sit visibly below the truth
    torch.manual_seed(5)
    est = model.log_likelihood(x, num_samples=20000, max_rows=5000)
    assert est.shape == (1,)
    assert abs(float(est) - truth) < 0.05, (float(est), truth)
    # the ELBO is a lower bound on the truth (averaged over noise)
    torch.manual_seed(6)
    elbo = model.elbo(x.expand(2000, -1, -1)).mean()
    assert float(elbo.detach()) < truth


def test_importance_sampling_batch_of_different_sequences():
    """Rows of a batch are not mixed up: each row's estimate matches its own integral."""
    model = tiny_1d_model("vrnn-gauss", seed=7)
    x = make_x(3, 2, 1, seed=8) * torch.tensor([0.5, 1.0, 2.0], dtype=DT).view(3, 1, 1)
    truth = torch.tensor([exact_log_px(model, x[i]) for i in range(3)], dtype=DT)
    assert (truth.max() - truth.min()) > 0.5  # the rows differ enough to be told apart
    torch.manual_seed(9)
    est = model.log_likelihood(x, num_samples=20000, max_rows=30000)
    torch.testing.assert_close(est, truth, rtol=0, atol=0.05)
    # a padded batch: rows of lengths 2, 1, 2 each get their own log p(x_1:L)
    mask = torch.tensor([[1, 1], [1, 0], [1, 1]], dtype=DT)
    dirty = x.clone()
    dirty[1, 1] = float("nan")
    truth[1] = exact_log_px(model, x[1, :1])
    torch.manual_seed(10)
    est = model.log_likelihood(dirty, mask, num_samples=20000, max_rows=30000)
    torch.testing.assert_close(est, truth, rtol=0, atol=0.05)


def test_k1_estimates_average_to_the_elbo():
    """E[log w] with one sample = the ELBO: the mean of many K=1 estimates agrees with the
    mean of many noisy ELBO draws within 3 standard errors."""
    model = make_model("vrnn-gauss", seed=10, x_dim=2, z_dim=2, h_dim=8)
    x = make_x(1, 4, 2, seed=11)
    n = 4000
    xs = x.expand(n, -1, -1)
    torch.manual_seed(12)
    k1 = model.log_likelihood(xs, num_samples=1)          # n independent K=1 estimates
    with torch.no_grad():
        torch.manual_seed(13)
        el = model.elbo(xs)
    se = math.sqrt(float(k1.var()) / n + float(el.var()) / n)
    assert abs(float(k1.mean()) - float(el.mean())) < 3 * se, (k1.mean(), el.mean(), se)
    assert float(k1.var()) > float(el.var())  # MC KL adds variance: the test is not vacuous
    # and one K=1 estimate is exactly log p(x, z) - log q(z | x) for one posterior draw
    torch.manual_seed(14)
    a = model.log_likelihood(x, num_samples=1)
    torch.manual_seed(14)
    b = log_weights(model, x)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_log_weights_by_hand():
    """log w = sum_t log p(x_t|.) + log p(z_t|h) - log q(z_t|x, h) with the same noise."""
    from torch.distributions import Independent, Normal
    model = make_model("vrnn-gmm", seed=15)
    x = make_x(2, 5, 2, seed=16)
    mask = torch.ones(2, 5, dtype=DT)
    mask[1, 3:] = 0
    torch.manual_seed(17)
    lw = log_weights(model, x, mask)
    torch.manual_seed(17)
    tr = model(x, mask)
    lpz = Independent(Normal(tr.mu_p, tr.std_p), 1).log_prob(tr.z)
    lqz = Independent(Normal(tr.mu_q, tr.std_q), 1).log_prob(tr.z)
    want = (tr.log_px + (lpz - lqz) * mask).sum(1)
    torch.testing.assert_close(lw, want)


def test_estimates_grow_with_k():
    model = make_model("vrnn-gauss", seed=18, x_dim=2, z_dim=2, h_dim=8)
    x = make_x(3, 5, 2, seed=19)
    R = 30  # repeats, averaged
    xs = x.repeat(R, 1, 1)  # (3R, T, D): R independent estimates per sequence
    means = {}
    for k in (1, 10, 100):
        torch.manual_seed(20 + k)
        means[k] = model.log_likelihood(xs, num_samples=k).view(R, 3).mean(0)
    assert (means[1] < means[10]).all(), means
    assert (means[10] < means[100]).all(), means


@pytest.mark.parametrize("preset,cell", [("rnn-gauss", "lstm"), ("rnn-gmm", "lstm"),
                                         ("rnn-gauss", "gru")])
def test_rnn_rows_are_exact(preset, cell):
    model = make_model(preset, seed=21, cell=cell, rnn_layers=2)
    x = make_x(3, 6, 2, seed=22)
    mask = torch.ones(3, 6, dtype=DT)
    mask[2, 2:] = 0
    exact = model.elbo(x, mask)
    for k in (1, 7, 40):
        torch.testing.assert_close(model.log_likelihood(x, mask, num_samples=k), exact,
                                   rtol=0, atol=0)
    # and the RNN's exact value is the sum of its per-step log densities, row by row
    for i, L in enumerate([6, 6, 2]):
        torch.testing.assert_close(model.log_likelihood(x[i:i + 1, :L]), exact[i:i + 1],
                                   rtol=1e-12, atol=1e-12)


def test_chunking_gives_the_same_estimate():
    """max_rows only splits the K*B rows into passes: every split estimates the same value
    (the draws differ, since randn of one big block != randn of several small ones)."""
    model = tiny_1d_model("vrnn-gauss", seed=23)
    x = make_x(2, 2, 1, seed=24)
    truth = torch.tensor([exact_log_px(model, x[i]) for i in range(2)], dtype=DT)
    for max_rows in (7, 2 * 1000, 100000):  # odd passes, a ragged last pass, one pass
        torch.manual_seed(25)
        est = model.log_likelihood(x, num_samples=20001, max_rows=max_rows)
        torch.testing.assert_close(est, truth, rtol=0, atol=0.05)
    # one row per pass (slow: fewer samples, so a looser tolerance, ~3 standard errors)
    torch.manual_seed(26)
    est = model.log_likelihood(x, num_samples=3000, max_rows=1)
    torch.testing.assert_close(est, truth, rtol=0, atol=0.12)
    # with a single sample every chunking is identical (one pass, same draws)
    torch.manual_seed(27)
    a = model.log_likelihood(x, num_samples=1, max_rows=1)
    torch.manual_seed(27)
    b = model.log_likelihood(x, num_samples=1, max_rows=100)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_log_likelihood_with_padding():
    model = make_model("vrnn-gauss", seed=28)
    x = make_x(3, 6, 2, seed=29)
    mask = torch.ones(3, 6, dtype=DT)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    dirty = x.clone()
    dirty[mask == 0] = float("nan")
    torch.manual_seed(30)
    a = model.log_likelihood(x, mask, num_samples=50)
    torch.manual_seed(30)
    b = model.log_likelihood(dirty, mask, num_samples=50)
    assert torch.isfinite(b).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # rows keep their own value: the padded row's estimate (K=1) equals that row alone
    # run with the same posterior draw, i.e. the ELBO-style weight of its prefix
    torch.manual_seed(31)
    lw = log_weights(model, x, mask)
    torch.manual_seed(31)
    tr = model(x, mask)
    for i, L in enumerate([6, 4, 1]):
        eps = ((tr.z - tr.mu_q) / tr.std_q)[i:i + 1, :L].detach()
        alone = model(x[i:i + 1, :L], noise=eps)
        torch.testing.assert_close(alone.z, tr.z[i:i + 1, :L])
        from torch.distributions import Independent, Normal
        lpz = Independent(Normal(alone.mu_p, alone.std_p), 1).log_prob(alone.z)
        lqz = Independent(Normal(alone.mu_q, alone.std_q), 1).log_prob(alone.z)
        torch.testing.assert_close(lw[i:i + 1], (alone.log_px + lpz - lqz).sum(1))


def test_log_likelihood_arguments():
    model = make_model("vrnn-gauss")
    x = make_x(1, 3, 2)
    with pytest.raises(ValueError):
        model.log_likelihood(x, num_samples=0)
    assert log_likelihood(model, x, num_samples=2).shape == (1,)
    assert not model.log_likelihood(x, num_samples=2).requires_grad


# ------------------------------------------------------------ 5. samples vs density

@pytest.mark.parametrize("preset", ["vrnn-gauss", "vrnn-gmm", "rnn-gmm"])
def test_samples_follow_the_density(preset):
    """Histogram of model.sample(N, 1) against the density exp(log_likelihood) (and, for the
    VRNN rows, against the numerically integrated one) on a 1-D model with T = 1."""
    model = tiny_1d_model(preset, seed=33)
    with torch.no_grad():  # a sharper, more non-Gaussian marginal than the init gives
        model.head.proj.weight.mul_(3.0)
    N = 40000
    torch.manual_seed(34)
    xs = model.sample(N, 1)
    assert xs.shape == (N, 1, 1) and torch.isfinite(xs).all()
    xs = xs.flatten()
    lo, hi = float(xs.min()) - 3.0, float(xs.max()) + 3.0
    grid = torch.linspace(lo, hi, 1201, dtype=DT)
    torch.manual_seed(35)
    ll = model.log_likelihood(grid.view(-1, 1, 1), num_samples=300, max_rows=400000)
    dens = ll.exp()
    dx = float(grid[1] - grid[0])

    def mass(d, a, b):  # trapezoid mass of density d on [a, b] (grid points inside)
        inside = (grid >= a) & (grid <= b)
        v = d[inside]
        return float((v.sum() - 0.5 * (v[0] + v[-1])) * dx)

    total = mass(dens, lo, hi)
    assert abs(total - 1.0) < 0.02, total
    if model.cfg.latent:  # the IS density agrees with the integrated one pointwise
        sub = grid[::50]
        exact = torch.tensor([exact_log_px(model, g.view(1, 1), n=401) for g in sub], dtype=DT)
        torch.manual_seed(36)
        est = model.log_likelihood(sub.view(-1, 1, 1), num_samples=20000, max_rows=10 ** 6)
        bulk = exact > exact.max() - 6.0  # far tails: q is a poor proposal there
        assert bulk.sum() >= 8
        torch.testing.assert_close(est[bulk], exact[bulk], rtol=0, atol=0.05)
        # and the density itself, everywhere, on an absolute scale
        assert float((est.exp() - exact.exp()).abs().max()) < 0.03 * float(exact.exp().max())
    edges = torch.quantile(xs, torch.linspace(0, 1, 9, dtype=DT)[1:-1])
    edges = torch.cat([torch.tensor([lo], dtype=DT), edges, torch.tensor([hi], dtype=DT)])
    # snap edges onto the grid so each bin's mass is a clean trapezoid sum
    edges = grid[torch.searchsorted(grid, edges).clamp(max=len(grid) - 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        emp = float(((xs >= a) & (xs < b)).double().mean())
        mod = mass(dens, float(a), float(b))
        se = math.sqrt(emp * (1 - emp) / N)
        assert abs(emp - mod) < 5 * se + 0.004, (float(a), float(b), emp, mod)


def test_samples_follow_a_known_rnn_density():
    """rnn-gauss, T = 1: x_1 ~ N(mu, std) from h_0 = 0, read off the head; the samples'
    mean and std match, and a second step conditions on the first."""
    model = make_model("rnn-gauss", seed=36, x_dim=1)
    torch.manual_seed(37)
    xs = model.sample(20000, 2)
    h0 = model.initial_state(1, dtype=DT)[0][-1]
    mu, std = model.head.split(model.head(model.decoder(h0)))
    torch.testing.assert_close(xs[:, 0].mean(0), mu[0].detach(), rtol=0, atol=5 * float(std.detach()) / 141)
    torch.testing.assert_close(xs[:, 0].std(0), std[0].detach(), rtol=0.03, atol=0)


# ------------------------------------------------------------ 5. prefix continuation

PREFIX_CASES = [("vrnn-gauss", {}), ("vrnn-gauss", dict(rnn_layers=2)),
                ("vrnn-gauss", dict(cell="gru", rnn_layers=2)), ("vrnn-i-gauss", {}),
                ("vrnn-gmm", {}), ("rnn-gauss", {}), ("rnn-gmm", dict(rnn_layers=2)),
                ("rnn-gauss", dict(cell="gru"))]
PREFIX_IDS = [f"{p}-{'-'.join(f'{k}{v}' for k, v in kw.items())}" for p, kw in PREFIX_CASES]


def _step(model, x, fz, state):
    """One recurrence step by hand from the model's pieces: h_t from x_t, phi_z(z_t), h_{t-1}."""
    fx = model.phi_x(x)
    h, c = state
    if not model.cfg.latent:
        if model.cfg.cell == "lstm":
            _, (h, c) = model.rnn(fx.unsqueeze(1), (h, c))
        else:
            _, h = model.rnn(fx.unsqueeze(1), h)
        return h, c
    cell = model.cell
    hs, cs = cell.step(cell.w_x(fx) + cell.w_z(fz), cell.w_h(h[0]), list(h.unbind(0)),
                       list(c.unbind(0)), None)
    return torch.stack(hs), torch.stack(cs)


@pytest.mark.parametrize("preset,kw", PREFIX_CASES, ids=PREFIX_IDS)
def test_filter_prefix_equals_forward_and_stepping(preset, kw):
    model = make_model(preset, seed=38, **kw)
    B, P = 3, 5
    prefix = make_x(B, P, 2, seed=39)
    eps = torch.randn(B, P, model.cfg.z_dim, dtype=DT,
                      generator=torch.Generator().manual_seed(40))
    state = generate.filter_prefix(model, prefix, noise=eps)
    tr = model(prefix, noise=eps)
    torch.testing.assert_close(state[0], tr.state[0], rtol=0, atol=0)
    torch.testing.assert_close(state[1], tr.state[1], rtol=0, atol=0)
    # step through the prefix with the posterior z's of that trace
    st = model.initial_state(B, dtype=DT)
    for t in range(P):
        fz = model.phi_z(tr.z[:, t]) if model.cfg.latent else None
        st = _step(model, prefix[:, t], fz, st)
        # every intermediate top state is the trace's h_t
        torch.testing.assert_close(st[0][-1], tr.h[:, t], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st[0], tr.state[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st[1], tr.state[1], rtol=1e-12, atol=1e-12)
    # other noise, other state (VRNN rows): the comparison is not vacuous
    if model.cfg.latent:
        other = generate.filter_prefix(model, prefix, noise=eps + 1.0)
        assert (other[0] - state[0]).abs().max() > 1e-6
    # a padded prefix: each row's state is its own
    mask = torch.ones(B, P, dtype=DT)
    mask[1, 2:] = 0
    padded = generate.filter_prefix(model, prefix, mask, noise=eps)
    alone = generate.filter_prefix(model, prefix[1:2, :2], noise=eps[1:2, :2])
    torch.testing.assert_close(padded[0][:, 1:2], alone[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(padded[1][:, 1:2], alone[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("preset,kw", PREFIX_CASES, ids=PREFIX_IDS)
@pytest.mark.parametrize("mean", [False, True])
def test_sample_with_prefix_equals_sample_from_filtered_state(preset, kw, mean):
    """model.sample(n, T, prefix=p) draws the prefix noise first (inside filter_prefix),
    then per step: prior z (VRNN rows), then the output draw. Re-seeding and running
    filter_prefix then generate.sample(state=...) makes the very same draws."""
    model = make_model(preset, seed=41, **kw)
    n, T, P = 4, 6, 3
    p = make_x(1, P, 2, seed=42)[0]  # (P, D)
    torch.manual_seed(43)
    a = model.sample(n, T, prefix=p, mean=mean)
    torch.manual_seed(43)
    state = generate.filter_prefix(model, p.unsqueeze(0).expand(n, -1, -1))
    b = generate.sample(model, n, T, state=state, mean=mean)
    assert a.shape == (n, T, 2) and torch.isfinite(a).all()
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # a prefix given as (1, P, D) or (n, P, D) is the same prefix
    torch.manual_seed(43)
    torch.testing.assert_close(model.sample(n, T, prefix=p.unsqueeze(0), mean=mean), a,
                               rtol=0, atol=0)
    torch.manual_seed(43)
    torch.testing.assert_close(model.sample(n, T, prefix=p.expand(n, P, 2).clone(), mean=mean),
                               a, rtol=0, atol=0)
    # the prefix matters (the continuation is conditioned on it)
    torch.manual_seed(43)
    c = model.sample(n, T, prefix=p + 2.0, mean=mean)
    assert (c - a).abs().max() > 1e-6
    # with mean=True the RNN rows are deterministic; sampled rows are not
    torch.manual_seed(44)
    d = model.sample(n, T, prefix=p, mean=mean)
    if mean and not model.cfg.latent:
        torch.testing.assert_close(d, a, rtol=0, atol=0)
    else:
        assert (d - a).abs().max() > 1e-6


def test_sample_by_hand_vrnn():
    """generate.sample's draws, in order: prior z, then head.sample; then the state step."""
    model = make_model("vrnn-gauss", seed=45, rnn_layers=2)
    n, T = 3, 4
    torch.manual_seed(46)
    got = model.sample(n, T)
    torch.manual_seed(46)
    state = model.initial_state(n, dtype=DT)
    outs = []
    with torch.no_grad():
        for _ in range(T):
            top = state[0][-1]
            mu, std = model.prior(top)
            z = mu + std * torch.randn_like(mu)
            fz = model.phi_z(z)
            params = model.head(model.decoder(torch.cat([fz, top], -1)))
            x = model.head.sample(params)
            outs.append(x)
            state = _step(model, x, fz, state)
    torch.testing.assert_close(got, torch.stack(outs, 1), rtol=0, atol=0)


def test_sample_shapes_and_errors():
    model = make_model("vrnn-gmm", seed=47)
    assert model.sample(3, 0).shape == (3, 0, 2)
    assert model.sample(1, 4).shape == (1, 4, 2)
    assert model.sample(2, 3, mean=True).shape == (2, 3, 2)
    with pytest.raises(ValueError):
        model.sample(3, 2, prefix=torch.zeros(2, 4, 2, dtype=DT))  # 2 rows for 3 samples
    with pytest.raises(ValueError):
        model.sample(3, 2, prefix=torch.zeros(4, 5, dtype=DT))     # wrong x_dim
    bern = make_model("vrnn-gauss", seed=48, output="bernoulli", x_dim=4)
    s = bern.sample(5, 3)
    assert set(s.unique().tolist()) <= {0.0, 1.0}


# ------------------------------------------------------------------ 9. unit conversions

def test_nats_per_step_by_hand():
    total = torch.tensor([-12.0, -30.0], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=DT)  # 6 real steps
    assert nats_per_step(total, mask) == pytest.approx(-7.0, abs=1e-12)
    assert isinstance(nats_per_step(total, mask), float)
    assert nats_per_step(torch.tensor([5.0]), torch.ones(1, 10)) == pytest.approx(0.5)


def test_bits_per_dim_by_hand():
    total = torch.tensor([-12.0, -30.0], dtype=DT)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=DT)
    # 42 nats over 6 steps x 3 dims = 42 / 18 nats per dim = (7/3) / ln 2 bits
    want = 42.0 / (6 * 3 * math.log(2.0))
    assert bits_per_dim(total, mask, 3) == pytest.approx(want, rel=1e-12)
    assert bits_per_dim(total, mask, 3) == pytest.approx(1.0 / math.log(2.0) * 7 / 3, rel=1e-12)
    # lower is better: a higher log-likelihood gives fewer bits
    assert bits_per_dim(total + 1.0, mask, 3) < bits_per_dim(total, mask, 3)
    # one bit per dim: log p = -ln 2 per dim per step
    assert bits_per_dim(torch.tensor([-4 * 2 * math.log(2.0)]), torch.ones(1, 4), 2) == \
        pytest.approx(1.0, rel=1e-12)


def test_batches_within_caps_size_and_covers_every_index():
    from vrnn.evaluate import batches_within
    lengths = [5, 100, 3, 40, 40, 7, 1000, 2]
    batches = list(batches_within(lengths, batch_size=3, max_bytes=100 * 8, row_bytes=4))
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each once
    for b in batches:
        assert len(b) <= 3
        padded = len(b) * max(lengths[i] for i in b) * 4
        assert padded <= 800 or len(b) == 1  # a single long sequence still gets a pass
    assert [6] in batches  # 1000 steps: alone
    flat = [lengths[i] for b in batches for i in b]
    assert flat == sorted(flat)  # shortest first: little padding


@pytest.mark.parametrize("preset", ["vrnn-gauss", "vrnn-i-gauss", "vrnn-gmm"])
def test_samples_share_features_and_equal_repeated_rows(preset):
    """forward(x, samples=k) is forward on x repeated k times (sample-major) with the same
    noise; IS built on it is unchanged."""
    model = make_model(preset, x_dim=3, h_dim=8, z_dim=2)
    x = make_x(4, 6, 3)
    mask = torch.ones(4, 6, dtype=DT)
    mask[2, 3:] = 0
    noise = torch.randn(3 * 4, 6, 2, dtype=DT, generator=torch.Generator().manual_seed(4))
    grads = []
    for tr in (model(x, mask, noise=noise, samples=3),
               model(x.repeat(3, 1, 1), mask.repeat(3, 1), noise=noise)):
        model.zero_grad()
        (tr.log_px - tr.kl).sum().backward()  # with grad: the loop broadcasts, autograd sums
        grads.append([p.grad.clone() for p in model.parameters()])
        if len(grads) == 1:
            a = tr
    for name in ("log_px", "kl", "params", "h_prev", "z", "mu_q", "std_q"):
        torch.testing.assert_close(getattr(a, name), getattr(tr, name), rtol=1e-12, atol=1e-12)
    for ga, gb in zip(*grads):
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="samples"):
        model(x, samples=0)
    with pytest.raises(ValueError, match="noise must have shape"):  # one row per sample
        model(x, samples=3, noise=noise[:4])
    with pytest.raises(ValueError, match="no latent"):
        make_model("rnn-gauss", x_dim=3)(x, samples=2)
