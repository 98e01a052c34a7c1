"""Sequential Monte Carlo (vrnn.smc) and the IWAE/FIVO bounds (vrnn.inference): K=1
reductions, importance sampling as the no-resampling filter, unbiasedness against
numerical integration, masks, the resamplers and the ESS rule, log_z_from_weights,
gradients (fused scan with ancestors against the autograd loop), FIVO's two passes,
truncated BPTT, tempering and free bits.

Statistical checks use many independent runs and tolerances of a few standard errors
estimated from the runs themselves; every run is seeded."""

from __future__ import annotations

import math

import pytest
import torch

from test_scoring import exact_log_px, make_model, make_x, tiny_1d_model
from vrnn.errors import ConfigError
from vrnn.fast import FusedScan, scan_args, set_scan
from vrnn.inference import log_likelihood, log_ratio, log_weights, objective
from vrnn.smc import (Filtered, ancestors, effective_sample_size, last_step_events,
                      log_z_from_weights, particle_filter)

DT = torch.float64
LATENT = ["vrnn-gauss", "srnn-gauss"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def prefix_mask(lengths, T):
    return (torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]).to(DT)


def draws(K, B, T, Z, seed):
    """Proposal noise (K*B, T, Z) and resampling uniforms (B, T, K)."""
    g = gen(seed)
    return torch.randn(K * B, T, Z, dtype=DT, generator=g), torch.rand(B, T, K, dtype=DT, generator=g)


def poor_proposal_model():
    """The 1-D VRNN of test_scoring with its encoder's mean and std shifted: p(x) (which
    numerical integration computes from the prior and the decoder only) is unchanged, but
    q is a worse proposal, so the weights are uneven and the ESS rule resamples often."""
    model = tiny_1d_model("vrnn-gauss", seed=3)
    with torch.no_grad():
        model.encoder.gauss.out.bias[0] += 0.5
        model.encoder.gauss.out.bias[1] += 0.3
    return model


def unbiased_case():
    model = poor_proposal_model()
    x = make_x(3, 2, 1, seed=8) * torch.tensor([0.5, 1.5, 2.5], dtype=DT).view(3, 1, 1)
    truth = torch.tensor([exact_log_px(model, x[i]) for i in range(3)], dtype=DT)
    return model, x, truth


# ------------------------------------------------------------------ K = 1, and IS

@pytest.mark.parametrize("preset", LATENT)
@pytest.mark.parametrize("bound", ["iwae", "fivo"])
def test_k1_bounds_equal_the_elbo(preset, bound):
    """With one particle IWAE and FIVO are the ELBO (inference replaces the sampled
    log-ratio by the analytic KL): same loss, same reported bound, same draws."""
    model = make_model(preset, seed=1)
    x = make_x(3, 5, 2, seed=2)
    mask = prefix_mask([5, 3, 1], 5)
    for kl_weight in (1.0, 0.3):
        torch.manual_seed(3)
        loss_e, tr_e = objective(model, x, mask, bound="elbo", kl_weight=kl_weight)
        torch.manual_seed(3)
        loss_b, tr_b = objective(model, x, mask, bound=bound, num_samples=1, kl_weight=kl_weight)
        torch.testing.assert_close(loss_b, loss_e, rtol=0, atol=0)
        torch.testing.assert_close(tr_b.bound, tr_e.bound, rtol=0, atol=0)
        torch.testing.assert_close(tr_b.bound, (tr_e.log_px - tr_e.kl).sum(1).detach(), rtol=0, atol=0)


@pytest.mark.parametrize("preset", LATENT)
def test_never_resampling_is_importance_sampling(preset):
    """particle_filter(resample="never") with noise eps is log (1/K) sum_k w_k of the K
    posterior draws model(x, samples=K, noise=eps) makes (row k*B + b: draw k of seq b)."""
    model = make_model(preset, seed=4)
    K, B, T, Z = 5, 3, 6, model.cfg.z_dim
    x = make_x(B, T, 2, seed=5)
    mask = prefix_mask([6, 4, 1], T)
    torch.manual_seed(6)
    eps = torch.randn(K * B, T, Z, dtype=DT)
    torch.manual_seed(6)  # log_weights draws the very same noise
    lw = log_weights(model, x, mask, samples=K)
    with torch.no_grad():
        tr = model(x, mask, samples=K, noise=eps)
        # (with and without grad: the fused chain and the loop round apart at 1e-15)
        torch.testing.assert_close(lw, (tr.log_px + log_ratio(tr)).sum(1), rtol=1e-12, atol=1e-12)
    want = torch.logsumexp(lw.view(K, B), 0) - math.log(K)
    filt = particle_filter(model, x, mask, K, resample="never", noise=eps)
    torch.testing.assert_close(filt.log_z, want, rtol=1e-12, atol=1e-12)
    assert not filt.resampled.any() and all(a is None for a in filt.ancestors)
    assert torch.equal(filt.events, last_step_events(mask))
    # and log_likelihood(method="is") with the same seed (one pass) is the same number
    torch.manual_seed(6)
    torch.testing.assert_close(log_likelihood(model, x, mask, num_samples=K), want, rtol=1e-12, atol=1e-12)
    # log_z_from_weights over the trace's per-step weights, one event at the end: the same
    torch.testing.assert_close(
        log_z_from_weights((tr.log_px + log_ratio(tr)).view(K, B, T), last_step_events(mask)), want,
        rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ unbiasedness

@pytest.mark.parametrize("K,resample", [(2, "always"), (16, "ess")])
def test_smc_estimate_is_unbiased(K, resample):
    """E[exp(log Z)] = p(x): the mean over N independent filters of Z / p(x) is 1 within 4
    standard errors, for 3 sequences whose p(x) is integrated numerically (T = 2, 1-D z)."""
    model, x, truth = unbiased_case()
    N = 10000
    filt = particle_filter(model, x.repeat(N, 1, 1), None, K, resample=resample, generator=gen(1))
    assert torch.isfinite(filt.log_z).all()
    ratio = (filt.log_z.view(N, 3) - truth).exp()
    mean, se = ratio.mean(0), ratio.std(0) / math.sqrt(N)
    assert ((mean - 1).abs() < 4 * se).all(), (mean, se)
    assert (se < 0.03).all()  # the check has teeth: a 10% bias would be seen
    # resampling really happened (after step 0; never at the last step)
    res = filt.resampled.view(N, 3, 2)
    assert not res[:, :, 1].any()
    frac = res[:, :, 0].double().mean(0)
    if resample == "always":
        assert (frac == 1).all()
    else:  # the ESS rule chose: most runs resampled, some did not
        assert ((frac > 0.5) & (frac < 0.99)).all(), frac
        ess = filt.ess.view(N, 3, 2)[:, :, 0]
        assert torch.equal(res[:, :, 0], ess < 0.5 * K)


def test_smc_with_many_particles_matches_log_px():
    """log Z with K = 4096 (log_likelihood(method="smc")) is log p(x): R independent runs
    average to it within 4 standard errors plus the O(1/K) bias -Var(log Z)/2."""
    model, x, truth = unbiased_case()
    R = 16
    lz = log_likelihood(model, x.repeat(R, 1, 1), num_samples=4096, method="smc",
                        generator=gen(2)).view(R, 3)
    sd = lz.std(0)
    assert (sd < 0.1).all()
    tol = 4 * sd / math.sqrt(R) + sd ** 2
    assert ((lz.mean(0) - truth).abs() < tol).all(), (lz.mean(0) - truth, tol)
    # the filter behind it resampled
    filt = particle_filter(model, x, None, 4096, generator=gen(3))
    assert filt.resampled[:, 0].all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_smc_is_exact_for_rnn_rows(cell):
    model = make_model("rnn-gauss", seed=7, cell=cell)
    x = make_x(3, 6, 2, seed=8)
    mask = prefix_mask([6, 3, 1], 6)
    exact = model.elbo(x, mask).detach()
    for k in (1, 16):
        est = log_likelihood(model, x, mask, num_samples=k, method="smc")
        torch.testing.assert_close(est, exact, rtol=0, atol=0)
        torch.testing.assert_close(model.log_likelihood(x, mask, num_samples=k, method="smc"), exact,
                                   rtol=0, atol=0)
    with pytest.raises(ConfigError):  # the filter itself has nothing to do for an RNN row
        particle_filter(model, x, mask, 4)


def test_smc_log_likelihood_splits_the_batch_into_groups():
    """log_likelihood(method="smc") runs groups of whole sequences (particles interact):
    with max_rows = K, one sequence per pass, the very filters run one by one."""
    model = make_model("vrnn-gauss", seed=12)
    K, B, T = 8, 3, 5
    x = make_x(B, T, 2, seed=13)
    mask = prefix_mask([5, 2, 4], T)
    got = log_likelihood(model, x, mask, num_samples=K, method="smc", max_rows=K, generator=gen(14))
    g = gen(14)
    want = torch.cat([particle_filter(model, x[b:b + 1], mask[b:b + 1], K, generator=g).log_z
                      for b in range(B)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    one = log_likelihood(model, x, mask, num_samples=K, method="smc", generator=gen(14))
    torch.testing.assert_close(one, particle_filter(model, x, mask, K, generator=gen(14)).log_z,
                               rtol=0, atol=0)


# ------------------------------------------------------------------------ masks

@pytest.mark.parametrize("preset", LATENT)
def test_padded_batch_gives_each_sequence_its_own_filter(preset):
    """A padded batch with the per-sequence noise and uniforms laid out as the batch's
    (noise row k*B + b = particle k of sequence b; uniforms[b, t]) gives each sequence the
    log Z, ESS, resampling and events it gets alone; padded steps never resample."""
    model = make_model(preset, seed=9)
    K, T, Z = 6, 7, model.cfg.z_dim
    lengths = [7, 4, 1, 0, 5]
    B = len(lengths)
    x = make_x(B, T, 2, seed=10) * 2.0
    mask = prefix_mask(lengths, T)
    dirty = x.masked_fill(mask.unsqueeze(-1) == 0, float("nan"))  # padding is never read
    noise, uni = draws(K, B, T, Z, seed=11)  # padded entries: whatever was drawn
    kw = dict(resample="ess", threshold=0.8)
    batch = particle_filter(model, dirty, mask, K, noise=noise, uniforms=uni, **kw)
    rows = torch.arange(K) * B
    schedules = []
    for b, L in enumerate(lengths):
        if L == 0:
            assert float(batch.log_z[b]) == 0.0  # log p(empty) = 0
            continue
        alone = particle_filter(model, x[b:b + 1, :L], None, K, noise=noise[rows + b, :L],
                                uniforms=uni[b:b + 1, :L], **kw)
        torch.testing.assert_close(batch.log_z[b:b + 1], alone.log_z, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batch.ess[b, :L], alone.ess[0], rtol=1e-10, atol=1e-12)
        assert torch.equal(batch.resampled[b, :L], alone.resampled[0])
        assert torch.equal(batch.events[b, :L], alone.events[0])
        schedules.append(alone.resampled[0, :L].tolist())
    pad = mask == 0
    assert not batch.resampled[pad].any() and not batch.events[pad].any()
    assert (batch.ess[pad] == 0).all() and (batch.ess[~pad] >= 1 - 1e-12).all()
    # each sequence on its own schedule: they differ, somebody resampled, and at a step where
    # sequence b did not resample its particles keep their rows
    assert batch.resampled.any() and len({tuple(s[:4]) for s in schedules if len(s) >= 4}) > 1
    for t, a in enumerate(batch.ancestors):
        if a is None:
            assert not batch.resampled[:, t].any()
            continue
        for b in range(B):
            if not batch.resampled[b, t]:
                assert torch.equal(a[rows + b], rows + b)
            else:
                assert torch.equal(a[rows + b] % B, torch.full((K,), b))  # within the sequence


# -------------------------------------------------------------------- resampling

@pytest.mark.parametrize("method", ["systematic", "multinomial"])
@pytest.mark.parametrize("w", [[0.05, 0.3, 0.1, 0.45, 0.1],
                               [0.02, 0.0, 0.13, 0.21, 0.04, 0.3, 0.0, 0.11, 0.09, 0.1]])
def test_resampler_expected_counts(method, w):
    """Each particle is chosen K w_k times on average (N draws, within 4 standard errors);
    multinomial counts are Binomial(K, w_k); systematic counts are floor or ceil of K w_k;
    zero-weight particles are never chosen."""
    w = torch.tensor(w, dtype=DT)
    K, N = len(w), 20000
    log_w = (w.log() + 3.0).unsqueeze(1).expand(K, N)  # a shift changes nothing
    u = torch.rand(N, K, dtype=DT, generator=gen(12))
    a = ancestors(log_w, u, method)
    assert a.shape == (K, N) and a.dtype == torch.long
    counts = torch.nn.functional.one_hot(a, K).sum(0).to(DT)  # (N, K)
    assert (counts.sum(1) == K).all()
    mean, want = counts.mean(0), K * w
    if method == "multinomial":
        se = torch.sqrt(K * w * (1 - w) / N)
        torch.testing.assert_close(counts.var(0), K * w * (1 - w), rtol=0.1, atol=1e-12)
    else:
        frac = want - want.floor()
        se = torch.sqrt(frac * (1 - frac) / N)
        assert ((counts == want.floor()) | (counts == want.ceil())).all()
        # one draw per sequence: the other uniforms are not used
        torch.testing.assert_close(ancestors(log_w, torch.cat([u[:, :1], u[:, 1:].flip(0)], 1),
                                             method), a, rtol=0, atol=0)
    assert ((mean - want).abs() <= 4 * se + 1e-12).all(), (mean, want, se)
    assert (counts[:, w == 0] == 0).all()


@pytest.mark.parametrize("method", ["systematic", "multinomial"])
@pytest.mark.parametrize("where", [0, 2, 4])
def test_degenerate_weights_collapse_to_one_ancestor(method, where):
    K, N = 5, 200
    log_w = torch.full((K, N), -1e4, dtype=DT)
    log_w[where] = 0.0
    log_w[(where + 1) % K, : N // 2] = -math.inf  # -inf weights too
    u = torch.rand(N, K, dtype=DT, generator=gen(13))
    u[0] = 0.0
    u[1, 1:] = 1.0 - 2.0 ** -53  # the largest uniform below 1 (multinomial uses it)
    a = ancestors(log_w, u, method)
    assert (a == where).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_systematic_never_picks_a_zero_weight_particle(dtype):
    K = 16
    log_w = torch.full((K, 1), -math.inf, dtype=dtype)
    log_w[0] = 0.0
    u = torch.full((1, K), 1.0 - torch.finfo(dtype).eps / 2, dtype=dtype)  # in [0, 1): torch.rand's max
    assert float(u[0, 0]) < 1.0
    assert (ancestors(log_w, u, "systematic") == 0).all()


def test_unknown_resampler_and_schedule():
    with pytest.raises(ValueError):
        ancestors(torch.zeros(3, 1, dtype=DT), torch.rand(1, 3, dtype=DT), "stratified")
    model = make_model("vrnn-gauss")
    x = make_x(1, 2, 2)
    for kw in (dict(resample="sometimes"), dict(threshold=0.0), dict(threshold=1.5),
               dict(particles=0)):
        with pytest.raises(ValueError):
            particle_filter(model, x, **kw)


def test_effective_sample_size_by_hand():
    K = 6
    equal = torch.zeros(K, 3, dtype=DT)
    torch.testing.assert_close(effective_sample_size(equal), torch.full((3,), float(K), dtype=DT))
    one = torch.full((K, 1), -math.inf, dtype=DT)
    one[2] = 5.0
    torch.testing.assert_close(effective_sample_size(one), torch.ones(1, dtype=DT))
    w = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=DT)
    want = torch.tensor(100.0 / 30.0, dtype=DT)
    for shift in (0.0, -800.0, 800.0):  # computed in log space: no overflow, no underflow
        torch.testing.assert_close(effective_sample_size((w.log() + shift).unsqueeze(1))[0], want)


@pytest.mark.parametrize("threshold", [0.3, 0.7, 1.0])
def test_ess_rule_resamples_where_ess_is_below_threshold(threshold):
    """Filtered.resampled is exactly (ESS <= threshold K) on real steps but each sequence's
    last; ESS is that of the running weights: recompute it from the per-step weights of
    the pass-2 trace (same noise and ancestors)."""
    model = make_model("vrnn-gauss", seed=14)
    K, B, T = 8, 4, 9
    x = make_x(B, T, 2, seed=15) * 2.0
    mask = prefix_mask([9, 6, 3, 1], T)
    filt = particle_filter(model, x, mask, K, resample="ess", threshold=threshold,
                           record_noise=True, generator=gen(16))
    real, last = mask > 0, last_step_events(mask)
    assert torch.equal(filt.resampled, real & ~last & (filt.ess <= threshold * K))
    assert torch.equal(filt.events, filt.resampled | last)
    if threshold < 1.0:  # both branches taken
        assert filt.resampled.any() and (real & ~last & ~filt.resampled).any()
    else:  # ESS < K unless the weights are exactly equal
        assert torch.equal(filt.resampled, real & ~last)
    # the ESS recomputed from the running weights of the same particles
    with torch.no_grad():
        tr = model(x, mask, samples=K, noise=filt.noise, ancestors=filt.ancestors)
    lw = (tr.log_px + log_ratio(tr)).view(K, B, T)
    W = torch.zeros(K, B, dtype=DT)
    for t in range(T):
        W = W + lw[:, :, t]
        ess = torch.where(real[:, t], effective_sample_size(W), 0.0)
        torch.testing.assert_close(filt.ess[:, t], ess, rtol=1e-10, atol=1e-12)
        W = torch.where(filt.resampled[:, t], 0.0, W)


def test_always_and_never_do_what_they_say():
    model = make_model("vrnn-gauss", seed=17)
    K, B, T = 4, 3, 5
    x = make_x(B, T, 2, seed=18)
    mask = prefix_mask([5, 2, 1], T)
    real, last = mask > 0, last_step_events(mask)
    noise, uni = draws(K, B, T, model.cfg.z_dim, 19)
    always = particle_filter(model, x, mask, K, resample="always", noise=noise, uniforms=uni)
    assert torch.equal(always.resampled, real & ~last)
    assert torch.equal(always.events, real)
    never = particle_filter(model, x, mask, K, resample="never", noise=noise, uniforms=uni)
    assert not never.resampled.any() and torch.equal(never.events, last)
    assert all(a is None for a in never.ancestors)
    assert not torch.allclose(always.log_z, never.log_z)


def test_continues_forces_a_resampling_at_the_last_step():
    model = make_model("vrnn-gauss", seed=20)
    K, B, T = 4, 3, 5
    x = make_x(B, T, 2, seed=21)
    mask = prefix_mask([5, 3, 2], T)
    last = last_step_events(mask)
    cont = torch.tensor([True, False, True])
    noise, uni = draws(K, B, T, model.cfg.z_dim, 22)
    plain = particle_filter(model, x, mask, K, resample="never", noise=noise, uniforms=uni)
    forced = particle_filter(model, x, mask, K, resample="never", continues=cont, noise=noise,
                             uniforms=uni)
    assert torch.equal(forced.resampled, last & cont.unsqueeze(1))
    assert torch.equal(forced.events, last)
    # the forced resampling comes after the last log-mean-exp: log Z is unchanged
    torch.testing.assert_close(forced.log_z, plain.log_z, rtol=0, atol=0)
    ess = particle_filter(model, x, mask, K, threshold=0.5, continues=cont, noise=noise, uniforms=uni)
    assert (ess.resampled[last & cont.unsqueeze(1)]).all()
    assert not ess.resampled[last & ~cont.unsqueeze(1)].any()


# ----------------------------------------------------------- log_z_from_weights

def _log_z_by_loop(log_w, events):
    K, B, T = log_w.shape
    out = torch.zeros(B, dtype=log_w.dtype)
    for b in range(B):
        W = torch.zeros(K, dtype=log_w.dtype)
        for t in range(T):
            W = W + log_w[:, b, t]
            if events[b, t]:
                out[b] += torch.logsumexp(W, 0) - math.log(K)
                W = torch.zeros(K, dtype=log_w.dtype)
    return out  # what follows the last event is not counted


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_z_from_weights_against_a_loop(seed):
    g = gen(30 + seed)
    K, B, T = 5, 7, 9
    log_w = 3.0 * torch.randn(K, B, T, dtype=DT, generator=g)
    events = torch.rand(B, T, generator=g) < 0.35
    events[0] = False            # no event at all: log Z = 0
    events[1] = True             # every step
    events[2] = False
    events[2, -1] = True         # the importance-weighted bound
    events[3, 0] = True          # an event at the first step
    got = log_z_from_weights(log_w, events)
    torch.testing.assert_close(got, _log_z_by_loop(log_w, events), rtol=1e-12, atol=1e-12)
    assert float(got[0]) == 0.0
    torch.testing.assert_close(got[2], torch.logsumexp(log_w[:, 2].sum(-1), 0) - math.log(K))
    torch.testing.assert_close(got[1], (torch.logsumexp(log_w[:, 1], 0) - math.log(K)).sum())


def test_last_step_events():
    mask = prefix_mask([4, 1, 0, 2], 4)
    want = torch.tensor([[0, 0, 0, 1], [1, 0, 0, 0], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(last_step_events(mask), want)


# -------------------------------------------------------------------- gradients

@pytest.mark.parametrize("preset", LATENT)
@pytest.mark.parametrize("bound", ["iwae", "fivo"])
def test_every_parameter_gets_a_finite_gradient(preset, bound):
    model = make_model(preset, seed=40)
    x = make_x(3, 6, 2, seed=41)
    mask = prefix_mask([6, 4, 2], 6)
    torch.manual_seed(42)
    loss, tr = objective(model, x, mask, bound=bound, num_samples=4, threshold=0.9)
    assert torch.isfinite(loss) and torch.isfinite(tr.bound).all() and tr.bound.shape == (3,)
    assert tr.log_px.shape == (4 * 3, 6)
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    total = sum(int((p.grad != 0).any()) for p in model.parameters())
    assert total == len(list(model.parameters()))  # none is silently cut off


@pytest.mark.parametrize("preset,bound", [("vrnn-gauss", "iwae"), ("vrnn-gauss", "fivo"),
                                          ("srnn-gauss", "iwae"), ("srnn-gauss", "fivo")])
def test_adam_improves_the_bound(preset, bound):
    """A few Adam steps on a toy set raise the bound, evaluated with a fixed seed over R
    repeats, by more than 4 standard errors of the evaluation."""
    model = make_model(preset, seed=43)
    x = make_x(8, 6, 2, seed=44) * 0.5 + 1.0
    R = 16

    def evaluate():
        torch.manual_seed(45)
        with torch.no_grad():
            _, tr = objective(model, x.repeat(R, 1, 1), bound=bound, num_samples=4)
        per = tr.bound.view(R, -1).mean(1)
        return float(per.mean()), float(per.std()) / math.sqrt(R)

    before, se0 = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(46)
    for _ in range(30):
        opt.zero_grad()
        loss, _ = objective(model, x, bound=bound, num_samples=4)
        loss.backward()
        opt.step()
    after, se1 = evaluate()
    assert after - before > 4 * math.hypot(se0, se1), (before, after, se0, se1)


def _grads(model, *extra):
    gs = [p.grad.clone() for p in model.parameters()]
    return gs + [t.grad.clone() if t.grad is not None else torch.zeros_like(t) for t in extra]


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_scan_equals_autograd_with_resampling(cell, masked):
    """The particles' pass with the filter's noise and ancestors (FIVO's pass 2): the
    fused scan (it really runs) and the autograd loop give the same trace, the same log Z
    as the filter, and the same gradients of the parameters and of the initial state."""
    model = make_model("vrnn-gauss", seed=50, cell=cell)
    K, B, T = 4, 3, 7
    x = make_x(B, T, 2, seed=51) * 2.0
    mask = prefix_mask([7, 5, 2], T) if masked else torch.ones(B, T, dtype=DT)
    g = gen(52)
    h0 = 0.3 * torch.randn(1, K * B, model.cfg.h_dim, dtype=DT, generator=g)
    c0 = 0.3 * torch.randn(1, K * B, model.cfg.h_dim, dtype=DT, generator=g)
    filt = particle_filter(model, x, mask, K, threshold=0.9, state=(h0, c0), record_noise=True,
                           generator=gen(53))
    anc = [a for a in filt.ancestors if a is not None]
    assert len(anc) >= 2 and any(not torch.equal(a, torch.arange(K * B)) for a in anc)
    assert filt.resampled.any() and (~filt.resampled & (mask > 0) & ~last_step_events(mask)).any()
    out = {}
    for impl in ("autograd", "fused"):
        set_scan(model, impl)
        model.zero_grad()
        s0 = (h0.clone().requires_grad_(), c0.clone().requires_grad_())
        tr = model(x, mask if masked else None, state=s0, samples=K, noise=filt.noise,
                   ancestors=filt.ancestors)
        assert (type(tr.h_prev.grad_fn).__name__ == "FusedScanBackward") == (impl == "fused")
        lz = log_z_from_weights((tr.log_px + log_ratio(tr)).view(K, B, T), filt.events)
        torch.testing.assert_close(lz.detach(), filt.log_z, rtol=1e-12, atol=1e-12)
        loss = -lz.sum() + tr.state[0].pow(2).sum()
        if cell == "lstm":  # (a GRU's c: see test_fused_gru_cell_state_gradient_through_ancestors)
            loss = loss + tr.state[1].sum()
        loss.backward()
        out[impl] = (tr, lz, _grads(model, *s0))
    (ta, la, ga), (tf, lf, gf) = out["autograd"], out["fused"]
    for name in ("log_px", "kl", "params", "h_prev", "h", "z", "mu_q", "std_q", "mu_p", "std_p"):
        torch.testing.assert_close(getattr(tf, name), getattr(ta, name), rtol=0, atol=0, msg=name)
    for a, f in zip(ta.state, tf.state):
        torch.testing.assert_close(f, a, rtol=0, atol=0)
    torch.testing.assert_close(lf, la, rtol=0, atol=0)
    for a, f in zip(ga, gf):
        torch.testing.assert_close(f, a, rtol=1e-9, atol=1e-11)


def _gradcheck_inputs(cell, seed=60):
    torch.manual_seed(seed)
    model = make_model("vrnn-gauss", seed=seed, cell=cell, x_dim=2, h_dim=4, z_dim=2,
                       enc_dim=5, phi_z_dim=3)
    meta, params = scan_args(model)
    params = [p.detach().clone().requires_grad_() for p in params]
    B, T, k = 2, 4, 2
    R = k * B
    g = gen(seed + 1)
    E, G = model.encoder.in_x.out_features, model.cell.w_x.out_features
    ax = torch.randn(B, T, E, generator=g, dtype=DT, requires_grad=True)   # B rows: shared
    gx = torch.randn(B, T, G, generator=g, dtype=DT, requires_grad=True)
    eps = torch.randn(R, T, 2, generator=g, dtype=DT, requires_grad=True)  # 2B rows
    h0 = (0.5 * torch.randn(1, R, 4, generator=g, dtype=DT)).requires_grad_()
    c0 = (0.5 * torch.randn(1, R, 4, generator=g, dtype=DT)).requires_grad_()
    keep = (torch.arange(T)[None, :] < torch.tensor([T, 2] * k)[:, None]).unsqueeze(-1)
    # row r = k*B + b continues from ancestors[t][r], a row of the same sequence b
    anc = (torch.tensor([2, 3, 2, 1]), None, torch.tensor([0, 1, 0, 3]), None)
    return meta + (DT,), ax, gx, eps, keep, anc, h0, c0, params


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_fused_scan_gradcheck_with_samples_and_ancestors(cell):
    """gradcheck of FusedScan.apply with k=2 samples per sequence and resampling; for the
    GRU with c_0 held fixed (its c_0 gradient: the test below)."""
    meta, ax, gx, eps, keep, anc, h0, c0, params = _gradcheck_inputs(cell)
    if cell == "lstm":
        def f(ax, gx, eps, h0, c0, *ps):
            return FusedScan.apply(meta, ax, gx, eps, keep, anc, h0, c0, *ps)
        inputs = (ax, gx, eps, h0, c0, *params)
    else:
        def f(ax, gx, eps, h0, *ps):
            return FusedScan.apply(meta, ax, gx, eps, keep, anc, h0, c0.detach(), *ps)[:6]
        inputs = (ax, gx, eps, h0, *params)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_fused_gru_cell_state_gradient_through_ancestors():
    meta, ax, gx, eps, keep, anc, h0, c0, params = _gradcheck_inputs("gru")
    out = FusedScan.apply(meta, ax, gx, eps, keep, anc, h0, c0, *params)
    gc = torch.randn(out[6].shape, dtype=DT, generator=gen(61))
    (out[6] * gc).sum().backward()
    c = c0.detach().clone().requires_grad_()
    (c[0][anc[0]][anc[2]] * gc[0]).sum().backward()  # c_final[r] = c0[anc[0][anc[2][r]]]
    torch.testing.assert_close(c0.grad, c.grad, rtol=0, atol=1e-12)  # (it is gc itself)


# ------------------------------------------------------------- FIVO's two passes

PASS2 = [("vrnn-gauss", {}), ("vrnn-gauss", dict(cell="gru")), ("vrnn-gauss", dict(rnn_layers=2)),
         ("vrnn-i-gauss", {}), ("vrnn-gmm", {}), ("srnn-gauss", {}), ("srnn-gauss", dict(cell="gru")),
         ("srnn-gauss", dict(posterior="filtering"))]


@pytest.mark.parametrize("preset,kw", PASS2, ids=[f"{p}-{kw}" for p, kw in PASS2])
def test_fivo_pass_two_reproduces_pass_one(preset, kw):
    """objective(bound="fivo") runs the filter, then the batched pass with its noise and
    ancestors; its trace.bound is the filter's log Z for the same draws (same seed), and
    its loss is minus their sum per real step. The VRNN's pass 2 is the fused scan."""
    model = make_model(preset, seed=70, **kw)
    K, B, T = 4, 3, 6
    x = make_x(B, T, 2, seed=71) * 2.0
    mask = prefix_mask([6, 4, 1], T)
    torch.manual_seed(72)
    loss, tr = objective(model, x, mask, bound="fivo", num_samples=K, threshold=0.9)
    torch.manual_seed(72)
    filt = particle_filter(model, x, mask, K, threshold=0.9)
    assert filt.resampled.any()
    torch.testing.assert_close(tr.bound, filt.log_z, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss, -tr.bound.sum() / mask.sum(), rtol=1e-12, atol=1e-12)
    assert tr.log_px.shape == (K * B, T)
    fused = preset.startswith("vrnn") and kw.get("rnn_layers", 1) == 1
    assert (type(tr.h_prev.grad_fn).__name__ == "FusedScanBackward") == fused
    # tempered: the loss is the tempered filter's log Z (its own resampling decisions)
    torch.manual_seed(73)
    loss_t, _ = objective(model, x, mask, bound="fivo", num_samples=K, threshold=0.9, kl_weight=0.4)
    torch.manual_seed(73)
    filt_t = particle_filter(model, x, mask, K, threshold=0.9, kl_weight=0.4)
    torch.testing.assert_close(loss_t, -filt_t.log_z.sum() / mask.sum(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- truncated BPTT

def test_truncated_fivo_chunks_sum_to_the_whole_filter():
    """resample="always": two chunks (the first told that its sequences continue, so it
    resamples at its end; the second from its particles' state) give the log Z of one
    filter over the whole sequence with the same draws (it resamples at the boundary too).
    objective() makes the same draws in the same order, so seeding once reproduces it."""
    model = make_model("vrnn-gauss", seed=80)
    K, B, T, C = 4, 2, 8, 5
    x = make_x(B, T, 2, seed=81)
    noise, uni = draws(K, B, T, model.cfg.z_dim, 82)
    whole = particle_filter(model, x, None, K, resample="always", noise=noise, uniforms=uni)
    assert whole.resampled[:, C - 1].all()
    cont = torch.ones(B, dtype=torch.bool)
    f1 = particle_filter(model, x[:, :C], None, K, resample="always", continues=cont,
                         noise=noise[:, :C], uniforms=uni[:, :C])
    assert f1.resampled[:, -1].all()
    with torch.no_grad():
        st = model(x[:, :C], samples=K, noise=noise[:, :C], ancestors=f1.ancestors).state
    assert st[0].shape[1] == K * B
    f2 = particle_filter(model, x[:, C:], None, K, resample="always", state=st,
                         noise=noise[:, C:], uniforms=uni[:, C:])
    assert torch.isfinite(f1.log_z).all() and torch.isfinite(f2.log_z).all()
    torch.testing.assert_close(f1.log_z + f2.log_z, whole.log_z, rtol=1e-12, atol=1e-12)
    # the same through objective(): chunk 1 with continues, chunk 2 from trace.state
    torch.manual_seed(83)
    l1, t1 = objective(model, x[:, :C], bound="fivo", num_samples=K, resample="always",
                       continues=cont)
    l1.backward()
    state = tuple(s.detach() for s in t1.state)
    l2, t2 = objective(model, x[:, C:], bound="fivo", num_samples=K, resample="always",
                       continues=~cont, state=state)
    l2.backward()
    torch.manual_seed(83)
    ref = particle_filter(model, x, None, K, resample="always")
    assert torch.isfinite(t1.bound).all() and torch.isfinite(t2.bound).all()
    torch.testing.assert_close(t1.bound + t2.bound, ref.log_z, rtol=1e-12, atol=1e-12)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_truncated_fivo_srnn_state_continues():
    """The SRNN's chunks (its inference RNN sees only the chunk, so no equality with the
    whole): chunk 1's trace.state has K*B rows and carries into chunk 2's filter and its
    forward pass; the log Z increments are finite."""
    model = make_model("srnn-gauss", seed=84)
    K, B, T, C = 4, 3, 8, 4
    x = make_x(B, T, 2, seed=85)
    mask = prefix_mask([8, 8, 6], T)
    cont = torch.ones(B, dtype=torch.bool)
    torch.manual_seed(86)
    l1, t1 = objective(model, x[:, :C], mask[:, :C], bound="fivo", num_samples=K, continues=cont)
    assert all(s.shape[1] == K * B for s in t1.state)
    state = tuple(s.detach() for s in t1.state)
    l2, t2 = objective(model, x[:, C:], mask[:, C:], bound="fivo", num_samples=K, state=state)
    assert torch.isfinite(l1) and torch.isfinite(l2)
    assert torch.isfinite(t1.bound).all() and torch.isfinite(t2.bound).all()
    with torch.no_grad():
        tr = model(x[:, C:], mask[:, C:], state=state, samples=K)
    assert tr.log_px.shape == (K * B, T - C) and torch.isfinite(tr.log_px).all()
    # the chunk-2 filter started from the particles' z: other z's, another log Z
    noise, uni = draws(K, B, T - C, model.cfg.z_dim, 87)
    f_a = particle_filter(model, x[:, C:], mask[:, C:], K, state=state, noise=noise, uniforms=uni)
    moved = tuple(s.clone() for s in state)
    moved[2].add_(1.0)
    f_b = particle_filter(model, x[:, C:], mask[:, C:], K, state=moved, noise=noise, uniforms=uni)
    assert (f_a.log_z - f_b.log_z).abs().max() > 1e-6


@pytest.mark.parametrize("preset", LATENT)
def test_fivo_accepts_a_state_with_one_row_per_sequence(preset):
    model = make_model(preset, seed=88)
    x = make_x(3, 4, 2, seed=89)
    _, tr = objective(model, x)  # an ELBO chunk: B rows
    state = tuple(s.detach() for s in tr.state)
    _, iw = objective(model, x, state=state, bound="iwae", num_samples=4)
    assert torch.isfinite(iw.bound).all()
    _, fv = objective(model, x, state=state, bound="fivo", num_samples=4)
    assert torch.isfinite(fv.bound).all()


# -------------------------------------------------------- kl_weight and free bits

@pytest.mark.parametrize("bound,K", [("elbo", 1), ("elbo", 3), ("iwae", 4), ("fivo", 4)])
def test_kl_weight_changes_the_loss_not_the_reported_bound(bound, K):
    """Tempering changes the loss; trace.bound is the untempered bound of the same draws
    (for FIVO with resample="never", whose draws do not depend on the weights)."""
    model = make_model("vrnn-gauss", seed=90)
    x = make_x(3, 5, 2, seed=91)
    kw = dict(resample="never") if bound == "fivo" else {}
    torch.manual_seed(92)
    l1, t1 = objective(model, x, bound=bound, num_samples=K, **kw)
    torch.manual_seed(92)
    l2, t2 = objective(model, x, bound=bound, num_samples=K, kl_weight=0.3, **kw)
    assert abs(float((l1 - l2).detach())) > 1e-3
    if bound != "elbo":  # the tempered loss is the bound of the tempered weights
        ratio = log_ratio(t2)
        want = log_z_from_weights((t2.log_px + 0.3 * ratio).view(K, 3, -1), last_step_events(t2.mask[:3]))
        torch.testing.assert_close(l2, -want.sum() / t2.mask[:3].sum(), rtol=1e-12, atol=1e-12)
    if bound == "fivo":  # FIVO resampled by the tempered weights: it reports the tempered bound
        torch.testing.assert_close(t2.bound, want, rtol=1e-12, atol=1e-12)
    else:  # the ELBO and IWAE report the untempered bound of the same draws
        torch.testing.assert_close(t2.bound, t1.bound, rtol=1e-12, atol=1e-12)


def test_reported_fivo_bound_is_unbiased():
    """exp(trace.bound) of FIVO is an unbiased estimate of p(x) (at kl_weight 1; under
    warm-up FIVO reports its tempered bound: test_kl_weight_changes_the_loss_not_...)."""
    model = poor_proposal_model()
    with torch.no_grad():  # z_1 matters more for step 2: resampling choices matter
        model.cell.w_z.weight.mul_(3.0)
        model.phi_z[0].weight.mul_(3.0)
        model.head.proj.weight.mul_(2.0)
    x = make_x(3, 2, 1, seed=8)[2:] * 2.5
    truth = exact_log_px(model, x[0])
    N = 20000
    torch.manual_seed(93)
    with torch.no_grad():
        _, tr = objective(model, x.expand(N, -1, -1), bound="fivo", num_samples=2, resample="always")
    r = (tr.bound - truth).exp()
    se = float(r.std()) / math.sqrt(N)
    assert abs(float(r.mean()) - 1.0) < 4 * se, (float(r.mean()), se)


def test_free_bits_refused_for_iwae_and_fivo():
    model = make_model("vrnn-gauss", seed=94)
    x = make_x(2, 4, 2, seed=95)
    for bound in ("iwae", "fivo"):
        with pytest.raises(ValueError, match="free bits"):
            objective(model, x, bound=bound, num_samples=4, free_bits=0.1)
        loss, tr = objective(model, x, bound=bound, num_samples=1, free_bits=0.1)  # = the ELBO
        assert torch.isfinite(loss)
    loss, _ = objective(model, x, bound="elbo", num_samples=3, free_bits=0.1)
    assert torch.isfinite(loss)
    with pytest.raises(ValueError):
        objective(model, x, bound="fivo2", num_samples=4)
    with pytest.raises(ValueError):
        objective(model, x, bound="iwae", num_samples=0)
    with pytest.raises(ValueError, match="IWAE"):
        objective(model, x, bound="iwae", num_samples=4, continues=torch.ones(2, dtype=torch.bool))


def test_filtered_fields():
    model = make_model("vrnn-gauss", seed=96)
    K, B, T = 3, 2, 4
    x = make_x(B, T, 2, seed=97)
    f = particle_filter(model, x, None, K, record_noise=True, generator=gen(98))
    assert isinstance(f, Filtered)
    assert f.log_z.shape == (B,) and f.ess.shape == f.resampled.shape == f.events.shape == (B, T)
    assert f.noise.shape == (K * B, T, model.cfg.z_dim) and len(f.ancestors) == T
    # the recorded noise replays a run (without resampling, nothing else is drawn)
    f = particle_filter(model, x, None, K, resample="never", record_noise=True, generator=gen(98))
    g = particle_filter(model, x, None, K, resample="never", noise=f.noise)
    torch.testing.assert_close(g.log_z, f.log_z, rtol=0, atol=0)
    assert particle_filter(model, x, None, K, generator=gen(98)).noise is None
