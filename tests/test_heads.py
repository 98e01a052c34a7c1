"""Output heads and the Gaussian KL against independent torch.distributions computations."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import (Bernoulli, Categorical, Independent, MixtureSameFamily,
                                 MultivariateNormal, Normal, kl_divergence)

from vrnn.heads import (BernoulliHead, GaussianHead, GMMHead, StrokesHead, gaussian_kl,
                        gaussian_log_prob, positive_std)
from vrnn.outputs import make_head

DT = torch.float64
FLOOR = 1e-4




def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _heads(in_dim=5):
    """One of each head, float64, with a mixture size > 1 where there is one."""
    torch.manual_seed(0)
    return {
        "gauss": GaussianHead(in_dim, 3, FLOOR).double(),
        "gmm": GMMHead(in_dim, 2, k=4, std_floor=FLOOR).double(),
        "bernoulli": BernoulliHead(in_dim, 4, FLOOR).double(),
        "strokes": StrokesHead(in_dim, 3, k=3, std_floor=FLOOR).double(),
    }


def _data(head, n, g, scale=1.0):
    """Some x of the head's support, shape (n, x_dim)."""
    if isinstance(head, BernoulliHead):
        return torch.bernoulli(torch.full((n, head.x_dim), 0.5, dtype=DT), generator=g)
    x = scale * torch.randn(n, head.x_dim, dtype=DT, generator=g)
    if isinstance(head, StrokesHead):
        x[:, 0] = torch.bernoulli(torch.full((n,), 0.3, dtype=DT), generator=g)
    return x


def _reference_log_prob(head, params, x):
    """log p(x) of ``head`` computed with torch.distributions only."""
    if isinstance(head, GaussianHead):
        mu, std = head.split(params)
        return Independent(Normal(mu, std), 1).log_prob(x)
    if isinstance(head, GMMHead):
        log_w, mu, std = head.split(params)
        mix = MixtureSameFamily(Categorical(logits=log_w), Independent(Normal(mu, std), 1))
        return mix.log_prob(x)
    if isinstance(head, BernoulliHead):
        return Bernoulli(logits=params).log_prob(x).sum(-1)
    if isinstance(head, StrokesHead):
        pen, log_w, mu, std, rho = head.split(params)
        sx, sy = std[..., 0], std[..., 1]
        cov = torch.stack([torch.stack([sx ** 2, rho * sx * sy], -1),
                           torch.stack([rho * sx * sy, sy ** 2], -1)], -2)  # (..., k, 2, 2)
        mix = MixtureSameFamily(Categorical(logits=log_w),
                                MultivariateNormal(mu, covariance_matrix=cov))
        return Bernoulli(logits=pen).log_prob(x[..., 0]) + mix.log_prob(x[..., 1:])
    raise AssertionError(type(head))


# ------------------------------------------------------------------------ KL, helpers

def test_gaussian_kl_matches_torch_distributions():
    g = _gen(1)
    mu_q, mu_p = torch.randn(50, 3, dtype=DT, generator=g), torch.randn(50, 3, dtype=DT, generator=g)
    std_q = torch.rand(50, 3, dtype=DT, generator=g) * 3 + 1e-3
    std_p = torch.rand(50, 3, dtype=DT, generator=g) * 3 + 1e-3
    got = gaussian_kl(mu_q, std_q, mu_p, std_p)
    want = kl_divergence(Normal(mu_q, std_q), Normal(mu_p, std_p))
    assert got.shape == (50, 3)  # per dimension, not summed
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    # zero exactly when the two coincide
    assert gaussian_kl(mu_q, std_q, mu_q, std_q).abs().max() < 1e-12


def test_gaussian_log_prob_matches_torch_distributions():
    g = _gen(2)
    x, mu = torch.randn(20, 4, dtype=DT, generator=g), torch.randn(20, 4, dtype=DT, generator=g)
    std = torch.rand(20, 4, dtype=DT, generator=g) + 0.1
    torch.testing.assert_close(gaussian_log_prob(x, mu, std),
                               Independent(Normal(mu, std), 1).log_prob(x))


def test_positive_std_floor():
    pre = torch.tensor([-1e4, -100.0, -30.0, 0.0, 5.0], dtype=DT)
    std = positive_std(pre, 0.01)
    assert (std >= 0.01).all()
    torch.testing.assert_close(std[:2], torch.full((2,), 0.01, dtype=DT))
    torch.testing.assert_close(std[3], torch.tensor(0.01 + 0.6931471805599453, dtype=DT))


# --------------------------------------------------------------------- heads' log_prob

@pytest.mark.parametrize("kind", ["gauss", "gmm", "bernoulli", "strokes"])
def test_head_log_prob_matches_torch_distributions(kind):
    head = _heads()[kind]
    g = _gen(3)
    feats = torch.randn(64, 5, dtype=DT, generator=g) * 2.0
    params = head(feats)
    assert params.shape == (64, head.param_dim)
    x = _data(head, 64, g)
    got = head.log_prob(params, x)
    assert got.shape == (64,)
    torch.testing.assert_close(got, _reference_log_prob(head, params, x), rtol=1e-9, atol=1e-9)
    # and with extra leading dims (B, T, P)
    p3, x3 = params.view(8, 8, -1), x.view(8, 8, -1)
    torch.testing.assert_close(head.log_prob(p3, x3), got.view(8, 8))


def test_make_head_kinds():
    from vrnn import VRNNConfig

    def head(output, x_dim=2):
        return make_head(VRNNConfig(x_dim=x_dim, output=output, n_components=5), 4)

    assert isinstance(head("gauss"), GaussianHead)
    h = head("gmm")
    assert isinstance(h, GMMHead) and h.k == 5 and h.param_dim == 5 + 2 * 5 * 2
    assert isinstance(head("bernoulli"), BernoulliHead)
    s = head("strokes", 3)
    assert isinstance(s, StrokesHead) and s.param_dim == 1 + 6 * 5
    with pytest.raises(ValueError):
        StrokesHead(4, 2)


# ----------------------------------------------------------------- sample / mean / floor

@pytest.mark.parametrize("kind", ["gauss", "gmm", "bernoulli", "strokes"])
def test_head_sample_shape_and_mean(kind):
    head = _heads()[kind]
    g = _gen(4)
    feats = torch.randn(3, 5, dtype=DT, generator=g)
    params = head(feats).detach()
    s = head.sample(params)
    assert s.shape == (3, head.x_dim) and s.dtype == DT
    s2 = head.sample(params.unsqueeze(1).expand(3, 2, -1))
    assert s2.shape == (3, 2, head.x_dim)
    # empirical mean over many draws vs head.mean()
    n = 20000
    torch.manual_seed(5)
    draws = head.sample(params.unsqueeze(0).expand(n, -1, -1))  # (n, 3, D)
    emp_mean, emp_sd = draws.mean(0), draws.std(0)
    mean = head.mean(params)
    assert mean.shape == (3, head.x_dim)
    tol = 5.0 * emp_sd / n ** 0.5 + 1e-6
    assert ((emp_mean - mean).abs() <= tol).all(), (emp_mean, mean)
    if kind in ("bernoulli", "strokes"):
        bits = draws if kind == "bernoulli" else draws[..., 0]
        assert set(bits.unique().tolist()) <= {0.0, 1.0}


def test_gmm_and_strokes_sample_pick_components():
    """With one dominant component, the draws follow that component's mean and std."""
    k, d = 3, 2
    gmm = GMMHead(1, d, k=k, std_floor=FLOOR).double()
    logits = torch.tensor([-50.0, 50.0, -50.0], dtype=DT)
    mu = torch.tensor([[-10.0, -10.0], [3.0, -2.0], [10.0, 10.0]], dtype=DT)
    pre = torch.tensor([[0.0, 0.0], [1.0, -1.0], [0.0, 0.0]], dtype=DT)
    params = torch.cat([logits, mu.flatten(), pre.flatten()])
    torch.manual_seed(6)
    draws = gmm.sample(params.expand(20000, -1))
    std = torch.nn.functional.softplus(pre[1]) + FLOOR
    torch.testing.assert_close(draws.mean(0), mu[1], atol=0.05, rtol=0)
    torch.testing.assert_close(draws.std(0), std, atol=0.03, rtol=0)

    st = StrokesHead(1, 3, k=2, std_floor=FLOOR).double()
    # pen, logits(2), mu(2x2), pre(2x2), rho(2)
    params = torch.tensor([2.0, 40.0, -40.0, 1.0, -1.0, 9.0, 9.0,
                           0.5, 0.5, 0.0, 0.0, 1.0, 0.0], dtype=DT)
    draws = st.sample(params.expand(40000, -1))
    sx = torch.nn.functional.softplus(torch.tensor(0.5, dtype=DT)) + FLOOR
    rho = torch.tanh(torch.tensor(1.0, dtype=DT)) * (1 - 1e-5)
    torch.testing.assert_close(draws[:, 1:].mean(0), torch.tensor([1.0, -1.0], dtype=DT),
                               atol=0.03, rtol=0)
    torch.testing.assert_close(draws[:, 1].std(), sx, atol=0.02, rtol=0)
    corr = torch.corrcoef(draws[:, 1:].t())[0, 1]
    assert abs(corr - rho) < 0.02
    assert abs(draws[:, 0].mean() - torch.sigmoid(torch.tensor(2.0, dtype=DT))) < 0.01


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_std_never_below_floor(dtype):
    floor = 1e-3
    pre = torch.full((2, 4 * 6 + 4), -1e4, dtype=dtype)
    g = GaussianHead(1, 3, floor).to(dtype)
    _, std = g.split(pre[:, :6])
    assert (std >= torch.tensor(floor, dtype=dtype)).all()
    m = GMMHead(1, 3, k=4, std_floor=floor).to(dtype)
    _, _, std = m.split(pre[:, :m.param_dim])
    assert (std >= torch.tensor(floor, dtype=dtype)).all()
    s = StrokesHead(1, 3, k=4, std_floor=floor).to(dtype)
    _, _, _, std, rho = s.split(pre[:, :s.param_dim])
    assert (std >= torch.tensor(floor, dtype=dtype)).all()
    assert (rho.abs() < 1).all()
    # very negative pre-activations still give draws, not NaN / inf
    torch.manual_seed(0)
    for head in (g, m, s):
        p = pre[:, :head.param_dim]
        assert torch.isfinite(head.sample(p)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["gauss", "gmm", "bernoulli", "strokes"])
def test_log_prob_finite_for_extreme_inputs(kind, dtype):
    head = _heads()[kind].to(dtype)
    P = head.param_dim
    x = _data(head, 4, _gen(7), scale=50.0).to(dtype)
    for fill in (-1e4, -80.0, 80.0, 1e4):  # huge logits, tiny std (floor), rho -> +-1
        params = torch.full((4, P), fill, dtype=dtype, requires_grad=True)
        lp = head.log_prob(params, x)
        assert torch.isfinite(lp).all(), (kind, fill, lp)
        lp.sum().backward()
        assert torch.isfinite(params.grad).all(), (kind, fill)
    # mixed signs: one component collapsed, others wide
    params = torch.randn(4, P, dtype=dtype, generator=_gen(8)) * 1e3
    assert torch.isfinite(head.log_prob(params, x)).all()
