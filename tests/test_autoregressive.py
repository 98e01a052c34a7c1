"""The autoregressive (MADE) output head: density against one-dimension-at-a-time
torch.distributions, the autoregressive property, sampling against the density,
gradients and training, shapes, and the cost of sampling."""

from __future__ import annotations

import math

import pytest
import torch
from torch.distributions import Bernoulli, Categorical, MixtureSameFamily, Normal
from torch.utils.flop_counter import FlopCounterMode

from vrnn.autoregressive import AutoregressiveHead
from vrnn.heads import Head

DT = torch.float64
CASES = [  # (D, k, binary_dims)
    (4, 1, ()),
    (5, 3, (1, 3)),
    (3, 2, (0, 1, 2)),
    (1, 2, ()),
    (2, 1, (1,)),
]


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _head(D, k=1, binary=(), hidden=None, in_dim=5, seed=0):
    torch.manual_seed(seed)
    return AutoregressiveHead(in_dim, D, hidden=hidden, k=k, binary_dims=binary).double()


def _x(head, shape, g):
    """Values of the head's support: Gaussian reals, 0/1 bits."""
    x = torch.randn(*shape, head.x_dim, dtype=DT, generator=g) * 1.5
    for d in head.binary_dims:
        x[..., d] = torch.bernoulli(torch.full(shape, 0.5, dtype=DT), generator=g)
    return x


def _factor(head, cond, d):
    """Dimension d's conditional as a torch.distributions object."""
    if d in head.binary_dims:
        return Bernoulli(logits=cond["logit"][..., head.binary_dims.index(d)])
    r = head.real_dims.index(d)
    mu, std = cond["mu"][..., r, :], cond["std"][..., r, :]
    if head.k == 1:
        return Normal(mu[..., 0], std[..., 0])
    return MixtureSameFamily(Categorical(logits=cond["log_w"][..., r, :]), Normal(mu, std))


def _per_dim(head, cond):
    """Each dimension's conditional parameters, a list of D tensors (..., n)."""
    out = []
    for d in range(head.x_dim):
        if d in head.binary_dims:
            out.append(cond["logit"][..., head.binary_dims.index(d)].unsqueeze(-1))
        else:
            r = head.real_dims.index(d)
            out.append(torch.cat([cond[n][..., r, :] for n in ("log_w", "mu", "std")], -1))
    return out


def _chi2_bound(counts, expected, min_expected=5.0):
    """Pearson's chi^2 (cells under ``min_expected`` pooled) and a 5-sigma bound on it,
    dof + 5 sqrt(2 dof), from chi^2's own mean and spread under the null."""
    small = expected < min_expected
    c = torch.cat([counts[~small], counts[small].sum().view(1)])
    e = torch.cat([expected[~small], expected[small].sum().view(1)])
    if e[-1] < min_expected:  # nothing (or too little) pooled: drop the pool cell
        c, e = c[:-1], e[:-1]
    stat = float(((c - e) ** 2 / e).sum())
    dof = len(e) - 1
    return stat, dof + 5.0 * math.sqrt(2.0 * dof)


# ----------------------------------------------------------------------- 1. the density

@pytest.mark.parametrize("D,k,binary", CASES)
def test_log_prob_is_the_sum_of_one_dim_conditionals(D, k, binary):
    """For each d, a pass on x with x_{>=d} replaced by junk gives dim d's conditional;
    sum_d log p(x_d | x_{<d}) from torch.distributions equals log_prob, and each factor
    equals log_prob_dims."""
    head = _head(D, k, binary)
    g = _gen(1)
    params = head(torch.randn(4, 6, 5, dtype=DT, generator=g) * 2.0)
    x = _x(head, (4, 6), g)
    lp_dims = head.log_prob_dims(params, x)
    assert lp_dims.shape == (4, 6, D)
    total = torch.zeros(4, 6, dtype=DT)
    for d in range(D):
        junk = x.clone()
        junk[..., d:] = torch.randn(4, 6, D - d, dtype=DT, generator=g) * 3.0
        factor = _factor(head, head.conditionals(params, junk), d).log_prob(x[..., d])
        torch.testing.assert_close(lp_dims[..., d], factor, rtol=1e-10, atol=1e-10)
        total = total + factor
    lp = head.log_prob(params, x)
    assert lp.shape == (4, 6)
    torch.testing.assert_close(lp, total, rtol=1e-10, atol=1e-10)


def test_three_bits_normalise():
    """An all-binary head's probabilities of the 8 patterns sum to one."""
    head = _head(3, binary=(0, 1, 2))
    params = head(torch.randn(2, 5, dtype=DT, generator=_gen(2)))
    pats = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=DT)
    probs = head.log_prob(params[:, None, :].expand(2, 8, -1), pats.expand(2, 8, 3)).exp()
    torch.testing.assert_close(probs.sum(1), torch.ones(2, dtype=DT), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------- 2. the autoregressive property

def test_masks_connect_exactly_the_earlier_dims():
    """Paths input d -> outputs of dim e, through the hidden layer or directly, exist iff d < e."""
    head = _head(6, k=2, binary=(2,), hidden=17)
    paths = head.mask_v @ head.mask_w + head.mask_a  # (O, D)
    dims = torch.tensor([d for d in head.real_dims for _ in range(head.block)]
                        + list(head.binary_dims))
    earlier = torch.arange(6)[None, :] < dims[:, None]
    assert ((paths > 0) == earlier).all()
    assert head.degrees.min() >= 1 and head.degrees.max() <= 5
    # cyclic degrees: every degree is used, their counts differ by at most one
    counts = torch.bincount(head.degrees, minlength=6)[1:]
    assert counts.min() >= 1 and counts.max() - counts.min() <= 1


@pytest.mark.parametrize("D,k,binary", [(5, 3, (1, 3)), (4, 1, ()), (3, 2, (0, 1, 2))])
def test_perturbing_x_d_changes_only_later_dims(D, k, binary):
    head = _head(D, k, binary)
    g = _gen(3)
    params = head(torch.randn(8, 5, dtype=DT, generator=g))
    x = _x(head, (8,), g)
    base = _per_dim(head, head.conditionals(params, x))
    for d in range(D):
        x2 = x.clone()
        x2[:, d] = 1.0 - x2[:, d] if d in binary else x2[:, d] + 1.7
        new = _per_dim(head, head.conditionals(params, x2))
        for e in range(D):
            diff = (new[e] - base[e]).abs().max()
            if e <= d:
                assert diff == 0.0, (d, e, diff)
            else:  # every later dim sees x_d (the direct connections alone guarantee it)
                assert diff > 1e-6, (d, e, diff)


# --------------------------------------------------------- 3. sampling against the density

def test_sample_is_the_reparameterised_draw():
    """sample(params, noise) equals, dim by dim, the draw the one-pass conditionals give for
    that noise: Gumbel-max component, mu + std * eps, bit = [u < sigmoid(logit)]."""
    head = _head(6, k=3, binary=(0, 4))
    params = head(torch.randn(3, 7, 5, dtype=DT, generator=_gen(4)) * 2.0).detach()
    torch.manual_seed(5)
    noise = head.noise(params)
    x = head.sample(params, noise)
    c = head.conditionals(params, x)
    for d in range(6):
        if d in head.binary_dims:
            p = torch.sigmoid(c["logit"][..., head.binary_dims.index(d)])
            want = (noise["uniform"][..., d] < p).to(DT)
        else:
            r = head.real_dims.index(d)
            i = (c["log_w"][..., r, :] + noise["gumbel"][..., d, :]).argmax(-1, keepdim=True)
            mu = c["mu"][..., r, :].gather(-1, i).squeeze(-1)
            std = c["std"][..., r, :].gather(-1, i).squeeze(-1)
            want = mu + std * noise["normal"][..., d]
        torch.testing.assert_close(x[..., d], want, rtol=1e-10, atol=1e-10)


def _correlated_2d_head():
    """D=2, k=2, with dim 2's mixture weights and means pulled by x_1."""
    head = _head(2, k=2, hidden=8, in_dim=3)
    with torch.no_grad():  # dim 2's outputs: logits at 6:8, means at 8:10
        head.A[6:8, 0] = torch.tensor([1.0, -1.0], dtype=DT)
        head.A[8:10, 0] = torch.tensor([1.5, -1.0], dtype=DT)
        head.V.mul_(2.0)
    params = head(torch.tensor([[2.0, -2.0, 1.0]], dtype=DT)).detach()
    return head, params


def _quantile_edges(nodes, mass, q):
    """Cell edges at the model's quantiles q: grid nodes (len n + 1), from the masses of the
    n grid intervals, so that every interval lies inside one cell."""
    cdf = mass.cumsum(0) / mass.sum()
    return nodes[torch.searchsorted(cdf, torch.tensor(q, dtype=DT)) + 1]


def test_samples_match_the_density_2d_mixture():
    """20k draws vs exp(log_prob) integrated over a 10 x 10 grid of cells (midpoint rule);
    the bound comes from chi^2's spread. Shuffling x_2 across draws (a factorised sampler
    with the right marginals) must fail the same bound."""
    head, params = _correlated_2d_head()
    n = 20000
    torch.manual_seed(6)
    x = head.sample(params.expand(n, -1))
    # midpoint quadrature of the density on a box holding all but ~1e-6 of the mass
    c = head.conditionals(params, torch.zeros(1, 2, dtype=DT))  # dim 1 sees only the context
    mu1, sd1 = c["mu"][0, 0].detach(), c["std"][0, 0].detach()
    lo1, hi1 = float((mu1 - 8 * sd1).min()), float((mu1 + 8 * sd1).max())
    g1 = torch.linspace(lo1, hi1, 801, dtype=DT)
    g2 = torch.linspace(-14.0, 18.0, 1601, dtype=DT)
    m1, m2 = (g1[1:] + g1[:-1]) / 2, (g2[1:] + g2[:-1]) / 2
    X1, X2 = torch.meshgrid(m1, m2, indexing="ij")
    pts = torch.stack([X1, X2], -1).reshape(-1, 2)
    with torch.no_grad():
        dens = head.log_prob(params.expand(len(pts), -1), pts).exp().view(len(m1), len(m2))
    mass = dens * (g1[1] - g1[0]) * (g2[1] - g2[0])
    assert abs(float(mass.sum()) - 1.0) < 1e-4  # exp(log_prob) is a normalised density
    q = [i / 10 for i in range(1, 10)]
    e1, e2 = _quantile_edges(g1, mass.sum(1), q), _quantile_edges(g2, mass.sum(0), q)
    expected = torch.zeros(10, 10, dtype=DT)
    expected.index_put_((torch.bucketize(m1, e1)[:, None].expand_as(mass),
                         torch.bucketize(m2, e2)[None, :].expand_as(mass)), mass, accumulate=True)
    expected = n * expected / expected.sum()

    def counts(s):
        out = torch.zeros(10, 10, dtype=DT)
        out.index_put_((torch.bucketize(s[:, 0].contiguous(), e1),
                        torch.bucketize(s[:, 1].contiguous(), e2)),
                       torch.ones(n, dtype=DT), accumulate=True)
        return out

    stat, bound = _chi2_bound(counts(x).flatten(), expected.flatten())
    assert stat < bound, (stat, bound)
    shuffled = torch.stack([x[:, 0], x[torch.randperm(n), 1]], -1)
    bad, _ = _chi2_bound(counts(shuffled).flatten(), expected.flatten())
    assert bad > bound, (bad, bound)


def test_samples_match_the_density_three_bits():
    """8 patterns of an all-binary D=3 head with strongly coupled bits: frequencies of 20k
    draws vs exp(log_prob), each within 5 binomial sigmas, and chi^2 within its bound."""
    head = _head(3, binary=(0, 1, 2), in_dim=2)
    with torch.no_grad():
        head.A.copy_(torch.tensor([[0.0, 0, 0], [3.0, 0, 0], [-2.0, 2.5, 0]], dtype=DT))
    params = head(torch.tensor([[0.3, -0.2]], dtype=DT)).detach()
    n = 20000
    torch.manual_seed(7)
    x = head.sample(params.expand(n, -1))
    assert set(x.unique().tolist()) <= {0.0, 1.0}
    pats = torch.tensor([[i >> 2 & 1, i >> 1 & 1, i & 1] for i in range(8)], dtype=DT)
    p = head.log_prob(params.expand(8, -1), pats).detach().exp()
    code = (x[:, 0] * 4 + x[:, 1] * 2 + x[:, 2]).long()
    freq = torch.bincount(code, minlength=8).to(DT)
    assert ((freq / n - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq / n, p)
    stat, bound = _chi2_bound(freq, n * p)
    assert stat < bound, (stat, bound)


def test_samples_match_the_density_mixed_bits_and_reals():
    """D=3, binary_dims=(0, 2), dim 1 a 2-Gaussian mixture: counts of (x_0, x_1's cell, x_2)
    vs exp(log_prob) integrated over x_1's cells (midpoint rule), chi^2 within its bound."""
    head = _head(3, k=2, binary=(0, 2), in_dim=2)
    with torch.no_grad():  # outputs: dim 1 at 0:6 (logits, mus, pre-stds), bits 0, 2 at 6, 7
        head.A[2:4, 0] = torch.tensor([2.0, -2.0], dtype=DT)  # dim 1's means follow x_0
        head.A[7] = torch.tensor([1.5, 1.2, 0.0], dtype=DT)  # x_2 follows x_0 and x_1
    params = head(torch.tensor([[0.5, -1.0]], dtype=DT)).detach()
    n = 20000
    torch.manual_seed(8)
    x = head.sample(params.expand(n, -1))
    assert set(x[:, [0, 2]].unique().tolist()) <= {0.0, 1.0}
    grid = torch.linspace(-25.0, 25.0, 20001, dtype=DT)
    mid, h = (grid[1:] + grid[:-1]) / 2, grid[1] - grid[0]
    edges = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0], dtype=DT)  # 6 cells for x_1
    cell = torch.bucketize(mid, edges)
    expected = torch.zeros(2, 6, 2, dtype=DT)
    with torch.no_grad():
        for b0 in (0, 1):
            for b2 in (0, 1):
                pts = torch.stack([torch.full_like(mid, b0), mid, torch.full_like(mid, b2)], -1)
                mass = head.log_prob(params.expand(len(mid), -1), pts).exp() * h
                expected[b0, :, b2] = torch.zeros(6, dtype=DT).index_add_(0, cell, mass)
    assert abs(float(expected.sum()) - 1.0) < 1e-6  # sums over bits, integrates over x_1
    got = torch.zeros(2, 6, 2, dtype=DT)
    got.index_put_((x[:, 0].long(), torch.bucketize(x[:, 1].contiguous(), edges), x[:, 2].long()),
                   torch.ones(n, dtype=DT), accumulate=True)
    stat, bound = _chi2_bound(got.flatten(), n * expected.flatten())
    assert stat < bound, (stat, bound)


# ------------------------------------------------------------- 4. gradients and training

def test_gradients_reach_every_parameter():
    head = _head(5, k=2, binary=(1, 4), hidden=12)
    g = _gen(9)
    feats = torch.randn(6, 3, 5, dtype=DT, generator=g)
    x = _x(head, (6, 3), g)
    head.log_prob(head(feats), x).sum().backward()
    for name, p in head.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert (p.grad != 0).any(), name
    # masked weights get no gradient where the mask is zero
    for w, m in ((head.W, head.mask_w), (head.V, head.mask_v), (head.A, head.mask_a)):
        assert (w.grad[m == 0] == 0).all()


def test_adam_learns_intra_step_correlation():
    """x_2 = x_1 + 0.1 noise: a few hundred Adam steps take the NLL far below the best any
    diagonal Gaussian reaches (its MLE, in closed form: sum_d log(2 pi e var_d) / 2)."""
    g = _gen(10)
    n = 1000
    x1 = torch.randn(n, dtype=DT, generator=g)
    x = torch.stack([x1, x1 + 0.1 * torch.randn(n, dtype=DT, generator=g)], -1)
    diag_best = 0.5 * float(torch.log(2 * math.pi * math.e * x.var(0, unbiased=False)).sum())
    true_nll = 0.5 * math.log(2 * math.pi * math.e) * 2 + math.log(0.1)  # ~0.54 nats
    head = _head(2, hidden=16, in_dim=1)
    feats = torch.ones(n, 1, dtype=DT)  # a constant context: only the head's own structure
    opt = torch.optim.Adam(head.parameters(), lr=0.03)
    for _ in range(300):
        opt.zero_grad()
        loss = -head.log_prob(head(feats), x).mean()
        loss.backward()
        opt.step()
    nll = float(loss.detach())
    assert nll < diag_best - 1.5, (nll, diag_best)
    assert nll > true_nll - 0.1  # sanity: no better than the data's own entropy


# ------------------------------------------------------------------------ 5. shapes

@pytest.mark.parametrize("lead", [(3, 4), (5,)])
@pytest.mark.parametrize("D,k,binary", CASES + [(200, 2, (0, 57, 199))])
def test_shapes_and_param_dim(lead, D, k, binary):
    head = _head(D, k, binary, in_dim=7)
    H = 0 if D == 1 else max(64, 2 * D)
    b = 2 if k == 1 else 3 * k
    assert isinstance(head, Head) and head.x_dim == D and head.hidden == H
    assert head.param_dim == H + (D - len(binary)) * b + len(binary)
    g = _gen(11)
    params = head(torch.randn(*lead, 7, dtype=DT, generator=g))
    assert params.shape == (*lead, head.param_dim)
    x = _x(head, lead, g)
    lp = head.log_prob(params, x)
    assert lp.shape == lead and torch.isfinite(lp).all()
    assert head.log_prob_dims(params, x).shape == (*lead, D)
    for fn in (head.sample, head.mean, head.point):
        out = fn(params)
        assert out.shape == (*lead, D) and out.dtype == DT and torch.isfinite(out).all()
    pt, s = head.point(params), head.sample(params)
    for d in binary:
        assert set(pt[..., d].unique().tolist()) <= {0.0, 1.0}
        assert set(s[..., d].unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("D,k,binary", [(5, 3, (1, 3)), (4, 1, ()), (3, 2, (0, 1, 2))])
def test_mean_and_point_are_greedy_fixed_points(D, k, binary):
    """mean: each dim is its conditional mean given the earlier dims at theirs (bits at
    sigmoid(logit)); point: the same with bits at 1 iff logit > 0, conditioned on."""
    head = _head(D, k, binary)
    params = head(torch.randn(2, 3, 5, dtype=DT, generator=_gen(12)) * 2.0).detach()
    for rule in ("mean", "point"):
        m = getattr(head, rule)(params)
        c = head.conditionals(params, m)
        for d in range(D):
            if d in binary:
                logit = c["logit"][..., binary.index(d)]
                want = torch.sigmoid(logit) if rule == "mean" else (logit > 0).to(DT)
            else:
                r = head.real_dims.index(d)
                want = (c["log_w"][..., r, :].exp() * c["mu"][..., r, :]).sum(-1)
            torch.testing.assert_close(m[..., d], want, rtol=1e-10, atol=1e-10)


def test_constructor_checks_and_dtypes():
    for bad in (dict(binary_dims=(3,)), dict(binary_dims=(0, 0)), dict(k=0), dict(hidden=-1)):
        with pytest.raises(ValueError):
            AutoregressiveHead(4, 3, **bad)
    with pytest.raises(ValueError):
        AutoregressiveHead(4, 0)
    head = AutoregressiveHead(4, 3, hidden=10, k=2)  # float32 weights, float64 params
    params = head(torch.randn(2, 4)).double()
    assert head.log_prob(params, torch.randn(2, 3, dtype=DT)).dtype == DT
    with torch.inference_mode():  # as vrnn.generate calls it
        assert head.sample(head(torch.randn(2, 4))).shape == (2, 3)


# --------------------------------------------------------------------- 6. sampling cost

def test_sampling_a_step_costs_about_one_pass_not_d():
    """D=200, H=400, 64 rows: drawing one step never calls the full network, and its
    matmul FLOPs are under those of 1.5 full passes (D passes would be 200x)."""
    head = AutoregressiveHead(256, 200, hidden=400)
    params = head(torch.randn(64, 256)).detach()
    x = torch.randn(64, 200)
    calls = []
    full = head.network
    head.network = lambda *a, **kw: (calls.append(1), full(*a, **kw))[1]
    with FlopCounterMode(display=False) as one_pass:
        head.network(params, x)
    assert len(calls) == 1
    calls.clear()
    for fn in (head.sample, head.mean, head.point):
        with FlopCounterMode(display=False) as seq:
            out = fn(params)
        assert out.shape == (64, 200)
        assert not calls, fn
        assert seq.get_total_flops() < 1.5 * one_pass.get_total_flops(), (
            seq.get_total_flops(), one_pass.get_total_flops())


# ------------------------------------------------- in every model, on every kind of data
@pytest.mark.parametrize("preset", ["rnn-gauss", "rnn-gmm", "vrnn-i-gauss", "vrnn-gauss", "vrnn-gmm",
                                    "srnn-gauss", "srnn-gmm"])
@pytest.mark.parametrize("kind", ["real", "pen", "pianoroll"])
def test_every_model_row_takes_the_ar_output(preset, kind):
    """Every row with output="ar" on real-valued frames, pen strokes (bit + offsets) and
    piano-rolls (all bits): finite ELBO and IS, gradients everywhere, masks respected,
    samples with the bits exactly 0/1."""
    from vrnn import VRNNConfig, build
    D, bits = {"real": (5, ()), "pen": (3, (0,)), "pianoroll": (4, (0, 1, 2, 3))}[kind]
    torch.manual_seed(0)
    model = build(VRNNConfig.preset(preset, x_dim=D, h_dim=8, z_dim=2, output="ar", binary_dims=bits,
                                    n_components=2, ar_hidden=6)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, D, generator=g, dtype=torch.double)
    for b in bits:
        x[..., b] = (x[..., b] > 0).double()
    mask = torch.ones(3, 5, dtype=torch.double)
    mask[1, 3:] = 0
    tr = model(x, mask)
    elbo = (tr.log_px - tr.kl).sum(1)
    assert torch.isfinite(elbo).all() and (tr.log_px[1, 3:] == 0).all()
    elbo.sum().backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert torch.isfinite(model.log_likelihood(x, mask, num_samples=3)).all()
    # a padded batch gives row 1 what it gets alone (the head is per step)
    if not model.latent:
        alone = (lambda t: (t.log_px - t.kl).sum(1))(model(x[1:2, :3]))
        torch.testing.assert_close(elbo[1:2], alone)
    s = model.sample(4, 3, mean=True)
    assert s.shape == (4, 3, D) and torch.isfinite(s).all()
    if bits:
        assert set(s[..., list(bits)].unique().tolist()) <= {0.0, 1.0}
