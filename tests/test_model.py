"""The time-batched VRNN family against a step-by-step reference; masking; gradients;
training; config; dtype and latents."""

from __future__ import annotations

import math

import pytest
import torch

from reference_vrnn import reference_vrnn
from vrnn import VRNNConfig, build
from vrnn.config import PRESETS
from vrnn.errors import ConfigError
from vrnn.inference import latents, objective

DT = torch.float64
PRESET_NAMES = ["rnn-gauss", "rnn-gmm", "vrnn-i-gauss", "vrnn-gauss", "vrnn-gmm"]




def make_model(preset="vrnn-gauss", seed=0, dtype=DT, **kw):
    kw.setdefault("x_dim", 3)
    kw.setdefault("h_dim", 12)
    kw.setdefault("z_dim", 3)
    if PRESETS[preset]["output"] == "gmm" or kw.get("output") == "gmm":
        kw.setdefault("n_components", 4)
    torch.manual_seed(seed)
    return build(VRNNConfig.preset(preset, **kw)).to(dtype)


def make_x(model, B, T, seed=1, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    D = model.cfg.x_dim
    if model.cfg.output == "bernoulli":
        return torch.bernoulli(torch.full((B, T, D), 0.4, dtype=dtype), generator=g)
    x = torch.randn(B, T, D, dtype=dtype, generator=g)
    if model.cfg.output == "strokes":
        x[..., 0] = torch.bernoulli(torch.full((B, T), 0.3, dtype=dtype), generator=g)
    return x


def make_noise(model, B, T, seed=2, dtype=DT):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, model.cfg.z_dim, dtype=dtype, generator=g)


# Every row of the reference check: (preset, overrides)
REFERENCE_CASES = {
    "vrnn-gauss-lstm1": ("vrnn-gauss", {}),
    "vrnn-gauss-lstm2": ("vrnn-gauss", dict(rnn_layers=2)),
    "vrnn-gauss-lstm3-deep-mlps": ("vrnn-gauss", dict(rnn_layers=3, phi_x_layers=2,
                                                       phi_z_layers=2, enc_layers=3,
                                                       prior_layers=2, dec_layers=2,
                                                       phi_x_dim=10, enc_dim=9, dec_dim=7,
                                                       prior_dim=6, phi_z_dim=5)),
    "vrnn-gauss-gru1": ("vrnn-gauss", dict(cell="gru")),
    "vrnn-gauss-gru2": ("vrnn-gauss", dict(cell="gru", rnn_layers=2)),
    "vrnn-i-gauss": ("vrnn-i-gauss", {}),
    "vrnn-i-gauss-lstm2": ("vrnn-i-gauss", dict(rnn_layers=2)),
    "vrnn-gmm": ("vrnn-gmm", {}),
    "vrnn-strokes": ("vrnn-gmm", dict(output="strokes", n_components=3)),
    "vrnn-bernoulli": ("vrnn-gauss", dict(output="bernoulli", x_dim=5)),
    "vrnn-i-bernoulli-gru": ("vrnn-i-gauss", dict(output="bernoulli", x_dim=4, cell="gru")),
    "rnn-gauss": ("rnn-gauss", {}),
    "rnn-gauss-lstm2": ("rnn-gauss", dict(rnn_layers=2)),
    "rnn-gauss-gru": ("rnn-gauss", dict(cell="gru")),
    "rnn-gauss-gru2-deep-dec": ("rnn-gauss", dict(cell="gru", rnn_layers=2, dec_layers=2,
                                                   phi_x_layers=2)),
    "rnn-gmm": ("rnn-gmm", {}),
    "rnn-strokes": ("rnn-gmm", dict(output="strokes", n_components=2)),
    "rnn-bernoulli": ("rnn-gauss", dict(output="bernoulli", x_dim=4)),
}


# ---------------------------------------------------------------- 2. reference model

@pytest.mark.parametrize("case", list(REFERENCE_CASES))
def test_batched_model_matches_step_by_step_reference(case):
    preset, kw = REFERENCE_CASES[case]
    model = make_model(preset, seed=3, **kw)
    B, T = 3, 6
    x, noise = make_x(model, B, T), make_noise(model, B, T)
    ref = reference_vrnn(model, x, noise)
    tr = model(x, noise=noise)
    torch.testing.assert_close(model.elbo(x, noise=noise), ref["elbo"], rtol=0, atol=1e-5)
    # the parts, much tighter than the brief's 1e-5
    torch.testing.assert_close(tr.log_px, ref["log_px"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tr.kl, ref["kl"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tr.h_prev, ref["h_prev"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tr.state[0], ref["state"][0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(tr.state[1], ref["state"][1], rtol=1e-9, atol=1e-9)
    if model.cfg.latent:
        torch.testing.assert_close(tr.z, ref["z"], rtol=1e-9, atol=1e-9)
        assert (tr.kl >= 0).all()
        torch.testing.assert_close(tr.kl_dims.sum(-1), tr.kl)
    else:
        assert tr.z is None and (tr.kl == 0).all()
    # h is h_prev shifted by one, ending in the final top state
    torch.testing.assert_close(tr.h[:, :-1], tr.h_prev[:, 1:])
    torch.testing.assert_close(tr.h[:, -1], tr.state[0][-1])


def test_reference_depends_on_noise():
    """Guard: the comparison above is not vacuous — other noise, other ELBO."""
    model = make_model("vrnn-gauss", seed=3)
    x = make_x(model, 2, 5)
    a = model.elbo(x, noise=make_noise(model, 2, 5, seed=2))
    b = model.elbo(x, noise=make_noise(model, 2, 5, seed=9))
    assert (a - b).abs().min() > 1e-4


def test_rnn_gauss_output_comes_from_previous_state():
    """rnn-gauss: p(x_1) uses h_0 = 0, so log p(x_1) does not depend on x_1's successors
    and p(x_t) never sees x_t itself."""
    model = make_model("rnn-gauss", seed=4)
    x = make_x(model, 2, 5)
    lp = model(x).log_px
    x2 = x.clone()
    x2[:, 2] += 3.0  # change step 2 only
    lp2 = model(x2).log_px
    torch.testing.assert_close(lp[:, :2], lp2[:, :2], rtol=0, atol=0)
    assert (lp[:, 3:] - lp2[:, 3:]).abs().min() > 0  # later steps see x_2 through h
    # step 0's distribution is the same for every row (h_0 = 0)
    params = model(x).params
    torch.testing.assert_close(params[0, 0], params[1, 0], rtol=0, atol=0)


# ---------------------------------------------------------------------- 3. masking

MASK_CASES = ["vrnn-gauss", "vrnn-gauss-lstm2", "vrnn-gauss-gru1", "vrnn-i-gauss", "vrnn-gmm",
              "vrnn-strokes", "vrnn-bernoulli", "rnn-gauss", "rnn-gauss-lstm2", "rnn-gauss-gru",
              "rnn-gmm"]
MASK_CASE_DEFS = dict(REFERENCE_CASES, **{"vrnn-gauss": ("vrnn-gauss", {})})


def _padded_batch(model, lengths, T):
    B = len(lengths)
    x = make_x(model, B, T, seed=11)
    mask = torch.zeros(B, T, dtype=DT)
    for i, L in enumerate(lengths):
        mask[i, :L] = 1.0
    return x, mask


@pytest.mark.parametrize("case", MASK_CASES)
def test_padded_batch_gives_each_row_its_own_elbo_and_state(case):
    preset, kw = MASK_CASE_DEFS[case]
    model = make_model(preset, seed=5, **kw)
    lengths, T = [7, 3, 1, 5], 7
    x, mask = _padded_batch(model, lengths, T)
    noise = make_noise(model, len(lengths), T, seed=12)
    tr = model(x, mask, noise=noise)
    elbo = (tr.log_px - tr.kl).sum(1)
    torch.testing.assert_close(model.elbo(x, mask, noise=noise), elbo)
    for i, L in enumerate(lengths):
        alone = model(x[i:i + 1, :L], noise=noise[i:i + 1, :L])
        torch.testing.assert_close(elbo[i:i + 1], (alone.log_px - alone.kl).sum(1),
                                   rtol=1e-10, atol=1e-10)
        ref = reference_vrnn(model, x[i:i + 1, :L], noise[i:i + 1, :L])
        torch.testing.assert_close(elbo[i:i + 1], ref["elbo"], rtol=1e-9, atol=1e-9)
        for k in range(2):
            torch.testing.assert_close(tr.state[k][:, i:i + 1], alone.state[k],
                                       rtol=1e-10, atol=1e-10)
        # padded steps contribute nothing
        assert (tr.log_px[i, L:] == 0).all() and (tr.kl[i, L:] == 0).all()
        if tr.kl_dims is not None:
            assert (tr.kl_dims[i, L:] == 0).all()


@pytest.mark.parametrize("case", ["vrnn-gauss", "vrnn-gauss-lstm2", "vrnn-gauss-gru1",
                                  "vrnn-strokes", "rnn-gauss", "rnn-gmm", "rnn-gauss-gru"])
def test_padding_values_never_matter(case):
    """Garbage (NaN, inf, 1e6) in padded steps: identical ELBO, identical finite grads."""
    preset, kw = MASK_CASE_DEFS[case]
    model = make_model(preset, seed=6, **kw)
    lengths, T = [6, 2, 4], 6
    x, mask = _padded_batch(model, lengths, T)
    noise = make_noise(model, len(lengths), T, seed=13)
    dirty = x.clone()
    pad = mask == 0
    garbage = torch.tensor([float("nan"), 1e6, -float("inf"), -1e6, 7.0], dtype=DT)
    dirty[pad] = garbage[torch.arange(int(pad.sum())) % len(garbage)].unsqueeze(-1) \
        .expand(-1, x.shape[-1])
    clean = x * mask.unsqueeze(-1)  # zeros in the padding

    results = []
    for inp in (clean, dirty):
        model.zero_grad()
        xi = inp.clone().requires_grad_(True)
        tr = model(xi, mask, noise=noise)
        elbo = (tr.log_px - tr.kl).sum(1)
        elbo.sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((elbo.detach(), tr.state, grads, xi.grad))
    (e0, s0, g0, xg0), (e1, s1, g1, xg1) = results
    assert torch.isfinite(e1).all()
    torch.testing.assert_close(e1, e0, rtol=0, atol=0)
    torch.testing.assert_close(s1[0], s0[0], rtol=0, atol=0)
    torch.testing.assert_close(s1[1], s0[1], rtol=0, atol=0)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for n in g0:
        assert torch.isfinite(g1[n]).all(), n
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0)
    assert torch.isfinite(xg1).all()
    assert (xg1[pad] == 0).all()
    torch.testing.assert_close(xg1, xg0, rtol=0, atol=0)



@pytest.mark.parametrize("scan", ["fused", "autograd"])
def test_srnn_transition_clip_bounds_the_z_chain(scan):
    """With z_{t-1} -> mu_q's gain above 1 a ReLU z-chain grows geometrically along the
    sequence (float32 overflows on long pieces); clipped hidden units (--transition-clip)
    bound mu_p and dmu by |W_out| clip + |b| at every step, whatever the length."""
    from vrnn.fast import set_scan
    T = 400
    x = torch.zeros(2, T, 4)
    outs = {}
    for clip in (0.0, 3.0):
        torch.manual_seed(0)
        model = set_scan(build(VRNNConfig.preset("srnn-gauss", x_dim=4, h_dim=8, z_dim=4, enc_dim=8,
                                                 prior_dim=8, dec_dim=8, phi_x_dim=8,
                                                 transition_clip=clip)), scan)
        with torch.no_grad():
            for net in (model.prior, model.encoder):
                net.in_a.weight.mul_(6.0)  # a gain far above 1
        noise = torch.zeros(2, T, 4)  # the mean path (the weights need grad: the fused chain runs)
        tr = model(x, noise=noise)
        outs[clip] = (model, tr)
    _, tr = outs[0.0]
    assert not torch.isfinite(tr.mu_q).all() or tr.mu_q.abs().max() > 1e6  # the chain ran away
    model, tr = outs[3.0]
    for net, mu in ((model.prior, tr.mu_p), (model.encoder, tr.mu_q - tr.mu_p)):
        w, b = net.gauss.out.weight[:4], net.gauss.out.bias[:4]
        bound = 3.0 * w.abs().sum(1) + b.abs()
        assert torch.isfinite(mu).all() and (mu.abs() <= bound + 1e-5).all()


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_masked_recurrence_matches_the_packed_call(cell):
    """recurrent.run (one unpacked call per distinct length) gives a PackedSequence call's
    outputs, final states and gradients, rows of length 0 keeping their state."""
    from torch import nn

    from vrnn.models.recurrent import make_rnn, run
    torch.manual_seed(3)
    rnn = make_rnn(cell, 4, 6, 2).double()
    lengths = torch.tensor([5, 0, 3, 5, 1])
    inp = torch.randn(5, 5, 4, dtype=DT, requires_grad=True)
    h0 = tuple(torch.randn(2, 5, 6, dtype=DT, requires_grad=True) for _ in range(2))

    def grads(out, final):
        live = (torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)
        loss = (out * live).pow(2).sum() + sum((s * (k + 1)).sum() for k, s in enumerate(final))
        return torch.autograd.grad(loss, [inp, *h0, *rnn.parameters()])

    out, final = run(rnn, inp, lengths, h0)
    packed = nn.utils.rnn.pack_padded_sequence(inp, lengths.clamp(min=1), batch_first=True, enforce_sorted=False)
    ref_out, ref_last = rnn(packed, h0 if cell == "lstm" else h0[0])
    ref_out, _ = nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=True, total_length=5)
    ref_final = ref_last if cell == "lstm" else (ref_last, h0[1])
    ref_final = tuple(torch.where((lengths == 0).view(1, -1, 1), a, b) for a, b in zip(h0, ref_final))
    ref_out = ref_out * (lengths > 0).view(-1, 1, 1)  # the packed call runs an empty row for one step
    torch.testing.assert_close(out, ref_out)
    assert (out[1] == 0).all() and (out[2, 3:] == 0).all()
    for a, b in zip(final, ref_final):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(final[0][:, 1], h0[0][:, 1], rtol=0, atol=0)
    for g, r in zip(grads(out, final), grads(ref_out, ref_final)):
        torch.testing.assert_close(g, r)


def test_a_masked_bidirectional_pass_draws_nothing_from_the_global_rng():
    """The one-direction template that a masked bidirectional pass builds at first use
    (recurrent._direction) initialises its own unused weights: that must not consume the
    global RNG, or the first pass of a process after ``torch.manual_seed`` drew other noise
    than every later one (the non-causal RVAE's z, found comparing two passes)."""
    from vrnn.models import recurrent
    recurrent._ONE_WAY.clear()
    rnn = recurrent.make_rnn("lstm", 3, 5, 1, bidirectional=True).double()
    inp = torch.randn(2, 4, 3, dtype=DT)
    draws = []
    for _ in range(2):
        torch.manual_seed(1)
        recurrent.run_bidirectional(rnn, inp, torch.tensor([4, 2]))
        draws.append(torch.randn(3))
    assert len(recurrent._ONE_WAY) == 1  # the first pass built the template
    torch.testing.assert_close(draws[0], draws[1], rtol=0, atol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_recurrence_matches_the_packed_call(cell):
    """A bidirectional module over padded rows (each direction unpacked, the backward one
    from each row's own end) gives the PackedSequence call's outputs, final states of
    every layer and direction, and gradients (the DSAE's, RVAE's and ST-LR DKF's encoders)."""
    from torch import nn

    from vrnn.models.recurrent import _run, make_rnn, run_bidirectional
    torch.manual_seed(4)
    rnn = make_rnn(cell, 4, 6, 2, bidirectional=True).double()
    lengths = torch.tensor([5, 2, 3, 5, 1])
    inp = torch.randn(5, 5, 4, dtype=DT, requires_grad=True)
    live = (torch.arange(5).unsqueeze(0) < lengths.unsqueeze(1)).unsqueeze(-1)

    out, top = run_bidirectional(rnn, inp, lengths)
    packed = nn.utils.rnn.pack_padded_sequence(inp, lengths, batch_first=True, enforce_sorted=False)
    ref_out, ref_last = rnn(packed)
    ref_out, _ = nn.utils.rnn.pad_packed_sequence(ref_out, batch_first=True, total_length=5)
    ref_h = ref_last[0] if cell == "lstm" else ref_last
    ref_top = torch.cat([ref_h[-2], ref_h[-1]], -1)
    torch.testing.assert_close(out, ref_out)
    assert (out[1, 2:] == 0).all() and (out[4, 1:] == 0).all()
    torch.testing.assert_close(top, ref_top)
    _, last = _run(rnn, inp, lengths)  # (layers * 2, rows, H): every layer, both directions
    for a, b in zip(last if cell == "lstm" else (last,), ref_last if cell == "lstm" else (ref_last,)):
        torch.testing.assert_close(a, b)
    for g, r in zip(torch.autograd.grad((out * live).pow(2).sum() + top.sum(), [inp, *rnn.parameters()]),
                    torch.autograd.grad((ref_out * live).pow(2).sum() + ref_top.sum(), [inp, *rnn.parameters()])):
        torch.testing.assert_close(g, r)


def test_full_mask_equals_no_mask():
    model = make_model("vrnn-gmm", seed=7)
    x, noise = make_x(model, 2, 5), make_noise(model, 2, 5)
    torch.testing.assert_close(model.elbo(x, torch.ones(2, 5, dtype=DT), noise=noise),
                               model.elbo(x, noise=noise), rtol=0, atol=0)


def test_mask_shape_is_checked():
    model = make_model("vrnn-gauss")
    x = make_x(model, 2, 5)
    with pytest.raises(ValueError):
        model(x, torch.ones(2, 4, dtype=DT))
    with pytest.raises(ValueError):
        model(x[..., :2])


def test_state_continues_across_chunks():
    """Truncated BPTT: running [0:3] then [3:6] from the carried state equals one pass."""
    for preset in ("vrnn-gauss", "rnn-gauss"):
        model = make_model(preset, seed=8, rnn_layers=2)
        x, noise = make_x(model, 2, 6), make_noise(model, 2, 6)
        full = model(x, noise=noise)
        a = model(x[:, :3], noise=noise[:, :3])
        b = model(x[:, 3:], state=a.state, noise=noise[:, 3:])
        torch.testing.assert_close(torch.cat([a.log_px, b.log_px], 1), full.log_px)
        torch.testing.assert_close(b.state[0], full.state[0])


# ------------------------------------------------------------ 6. gradients and training

GRAD_CASES = [(p, {}) for p in PRESET_NAMES] + [
    ("vrnn-gauss", dict(output="bernoulli")),
    ("vrnn-gmm", dict(output="strokes", n_components=3)),
    ("rnn-gmm", dict(output="strokes", n_components=3)),
    ("rnn-gauss", dict(output="bernoulli")),
    ("vrnn-gauss", dict(rnn_layers=2, cell="gru", enc_layers=2, dec_layers=2)),
    ("vrnn-i-gauss", dict(rnn_layers=2)),
]


@pytest.mark.parametrize("preset,kw", GRAD_CASES,
                         ids=[f"{p}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
                              for p, kw in GRAD_CASES])
def test_gradients_reach_every_parameter(preset, kw):
    model = make_model(preset, seed=9, **kw)
    x = make_x(model, 4, 5, seed=14)
    torch.manual_seed(15)
    model.elbo(x).sum().backward()
    params = dict(model.named_parameters())
    assert len(params) > 0
    for name, p in params.items():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"
    # parameters that exist only for the rows that need them
    names = set(params)
    assert any(n.startswith("prior.") for n in names) == (model.cfg.latent and
                                                         model.cfg.prior == "learned")
    assert any(n.startswith("rnn.") for n in names) == (not model.cfg.latent)


def toy_waves(seed: int):
    """8 noisy (sin, cos) waves of 8 steps, the last 4 rows 6 steps long."""
    g = torch.Generator().manual_seed(seed)
    t = torch.linspace(0, 2 * math.pi, 8)
    phase = torch.rand(8, 1, generator=g) * 2 * math.pi
    x = torch.stack([torch.sin(t + phase), torch.cos(2 * t + phase)], -1)  # (8, 8, 2)
    x = x + 0.05 * torch.randn(x.shape, generator=g)
    mask = torch.ones(8, 8)
    mask[4:, 6:] = 0
    return x, mask


def adam_improves(model, x, mask, steps: int, seed: int):
    """Train with Adam on (x, mask); the ELBO under fixed noise must rise by 0.1 nats at
    least. Returns the last step's trace."""
    def evaluate():
        torch.manual_seed(123)  # the same noise each time
        with torch.no_grad():
            return float(objective(model, x, mask)[0])

    before = evaluate()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        loss, tr = objective(model, x, mask)
        loss.backward()
        opt.step()
    after = evaluate()
    assert math.isfinite(after) and after < before - 0.1, (before, after)
    return tr


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_adam_lowers_the_objective(preset):
    model = make_model(preset, seed=10, x_dim=2, h_dim=10, z_dim=2, dtype=torch.float32)
    adam_improves(model, *toy_waves(16), steps=50, seed=17)


def test_objective_is_negative_mean_elbo_per_step():
    model = make_model("vrnn-gauss", seed=11)
    x = make_x(model, 3, 6)
    mask = torch.ones(3, 6, dtype=DT)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    torch.manual_seed(0)
    loss, tr = objective(model, x, mask)
    torch.manual_seed(0)
    elbo = model.elbo(x, mask)
    torch.testing.assert_close(loss, -elbo.sum() / mask.sum())
    torch.testing.assert_close((tr.log_px - tr.kl).sum(1), elbo)
    # kl_weight scales only the KL part
    for w in (0.0, 0.3):
        torch.manual_seed(0)
        lw, trw = objective(model, x, mask, kl_weight=w)
        want = -(trw.log_px.sum() - w * trw.kl.sum()) / mask.sum()
        torch.testing.assert_close(lw, want)
    torch.manual_seed(0)
    l0, _ = objective(model, x, mask, kl_weight=0.0)
    assert float(l0.detach()) < float(loss.detach())  # KL > 0 so dropping it lowers the loss
    # the RNN rows: exact NLL per step
    rnn = make_model("rnn-gauss", seed=11)
    loss, _ = objective(rnn, x, mask)
    torch.testing.assert_close(loss, -rnn.elbo(x, mask).sum() / mask.sum())


def test_objective_free_bits():
    model = make_model("vrnn-gauss", seed=12)
    x = make_x(model, 3, 6)
    mask = torch.ones(3, 6, dtype=DT)
    mask[0, 3:] = 0
    steps = mask.sum()
    Z = model.cfg.z_dim

    def run(**kw):
        torch.manual_seed(0)
        return objective(model, x, mask, **kw)

    base, tr = run()
    rec = -tr.log_px.sum() / steps
    # free bits far above every KL: each real step pays exactly free_bits per z dim
    fb = 1e3
    assert float(tr.kl_dims.detach().max()) < fb
    big, trb = run(free_bits=fb)
    torch.testing.assert_close(big, rec + fb * Z * mask.sum() / steps)
    torch.testing.assert_close(big, rec + fb * Z)
    # the reported bound is still the true ELBO
    torch.testing.assert_close(trb.kl, tr.kl)
    # intermediate: charges max(kl_dim, fb) per dim on real steps only
    fb = float(tr.kl_dims.detach()[mask > 0].median())
    mid, _ = run(free_bits=fb)
    want = rec + (tr.kl_dims.clamp(min=fb).sum(-1) * mask).sum() / steps
    torch.testing.assert_close(mid, want)
    assert float(mid.detach()) > float(base.detach())  # some dims were below the floor
    # the gradient of the KL part vanishes when every dim is below the floor
    model.zero_grad()
    big, _ = run(free_bits=1e3)
    big.backward()
    assert model.prior.gauss.out.weight.grad.abs().sum() == 0
    # free bits and kl_weight compose
    both, _ = run(free_bits=1e3, kl_weight=0.5)
    torch.testing.assert_close(both, rec + 0.5 * 1e3 * Z)
    # RNN rows have no latent: free bits change nothing
    rnn = make_model("rnn-gauss", seed=12)
    a, _ = objective(rnn, x, mask)
    b, _ = objective(rnn, x, mask, free_bits=5.0)
    torch.testing.assert_close(a, b)


def test_objective_sampled_kl_is_the_single_draw_log_ratio_and_unbiased():
    """kl_estimator="sampled": the ELBO's KL replaced by log q(z_t | .) - log p(z_t | .) at the
    posterior draw (the FIVO paper's ELBO): the loss is minus the single-draw log-weight, the
    reported bound stays the analytic ELBO, and over many draws it averages to the analytic KL."""
    from vrnn.inference import log_ratio, log_weights
    model = make_model("vrnn-gauss", seed=13)
    x = make_x(model, 3, 6)
    mask = torch.ones(3, 6, dtype=DT)
    mask[1, 4:] = 0
    steps = mask.sum()

    def run(**kw):
        torch.manual_seed(0)
        return objective(model, x, mask, **kw)

    torch.manual_seed(0)
    lw = log_weights(model, x, mask)
    sampled, trs = run(kl_estimator="sampled")
    torch.testing.assert_close(sampled, -lw.sum() / steps)
    analytic, tra = run()
    assert float((sampled - analytic).detach().abs()) > 1e-6  # a different estimate of the same KL
    torch.testing.assert_close(trs.bound, tra.bound)  # the reported bound: the analytic ELBO
    for w in (0.0, 0.4):  # warm-up tempers the sampled KL as it does the analytic one
        lw_w, tr_w = run(kl_estimator="sampled", kl_weight=w)
        torch.testing.assert_close(lw_w, -(tr_w.log_px.sum() + w * log_ratio(tr_w).sum()) / steps)
    # its gradient through the fused time loop (the default) is the autograd loop's
    from vrnn.fast import set_scan
    grads = {}
    for impl in ("fused", "autograd"):
        set_scan(model, impl)
        model.zero_grad()
        run(kl_estimator="sampled")[0].backward()
        grads[impl] = [p.grad.clone() for p in model.parameters()]
    assert all(torch.isfinite(g).all() for g in grads["fused"])
    for a, b in zip(grads["fused"], grads["autograd"]):
        torch.testing.assert_close(a, b)
    # unbiased: per draw, sampled - analytic KL has mean 0 (4,000 draws, within 4 standard errors)
    with torch.no_grad():
        torch.manual_seed(1)
        tr = model(x, mask, samples=4000)
        diff = (-log_ratio(tr) - tr.kl).sum(1)
    assert float(diff.mean().abs()) < 4 * float(diff.std() / math.sqrt(diff.numel())), float(diff.mean())
    assert float(diff.std()) > 0.1  # not the analytic KL under another name
    with pytest.raises(ValueError, match="free bits"):
        run(kl_estimator="sampled", free_bits=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        run(kl_estimator="exact")


# --------------------------------------------------------------------------- 7. config

EXPECTED_PRESETS = {
    "srnn-gauss": dict(latent=True, family="srnn", output="gauss", n_components=1),
    "srnn-gmm": dict(latent=True, family="srnn", output="gmm", n_components=20),
    "rnn-gauss": dict(latent=False, output="gauss", n_components=1),
    "rnn-gmm": dict(latent=False, output="gmm", n_components=20),
    "vrnn-i-gauss": dict(latent=True, prior="standard", output="gauss", n_components=1),
    "vrnn-gauss": dict(latent=True, prior="learned", output="gauss", n_components=1),
    "vrnn-gmm": dict(latent=True, prior="learned", output="gmm", n_components=20),
    "dkf-gauss": dict(latent=True, family="dkf", prior="learned", output="gauss", n_components=1),
    "dkf-gmm": dict(latent=True, family="dkf", prior="learned", output="gmm", n_components=20),
    "storn-gauss": dict(latent=True, family="storn", prior="standard", output="gauss", n_components=1),
    "storn-gmm": dict(latent=True, family="storn", prior="standard", output="gmm", n_components=20),
    "rvae-gauss": dict(latent=True, family="rvae", causal=False, prior="standard", output="gauss", n_components=1),
    "rvae-causal-gauss": dict(latent=True, family="rvae", causal=True, prior="standard", output="gauss",
                              n_components=1),
    "dsae-gauss": dict(latent=True, family="dsae", prior="learned", output="gauss", n_components=1),
    "dsae-gmm": dict(latent=True, family="dsae", prior="learned", output="gmm", n_components=20),
    "kvae-gauss": dict(latent=True, family="kvae", prior="learned", output="gauss", n_components=1),
}


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_preset_fields(name):
    cfg = VRNNConfig.preset(name, x_dim=4)
    for k, v in EXPECTED_PRESETS[name].items():
        assert getattr(cfg, k) == v, (name, k)
    assert cfg.name == name
    assert cfg.phi_x_dim == cfg.h_dim == cfg.dec_dim  # widths default to h_dim
    model = build(VRNNConfig.preset(name, x_dim=4, h_dim=8, z_dim=2))
    assert hasattr(model, "rnn") == (not cfg.latent)
    if cfg.latent:
        assert (model.prior is None) == (cfg.prior == "standard")
    # overrides win
    assert VRNNConfig.preset(name, x_dim=4, n_components=3).n_components == 3


def test_presets_table_matches():
    assert set(PRESETS) == set(EXPECTED_PRESETS)


def test_config_errors():
    with pytest.raises(ConfigError):
        VRNNConfig.preset("vrnn-laplace", x_dim=2)
    with pytest.raises(ConfigError):
        VRNNConfig.preset("vrnn-gauss", x_dim=2, not_a_field=1)
    with pytest.raises(ConfigError):
        VRNNConfig.preset("vrnn-gauss", x_dim=2, output="strokes")
    with pytest.raises(ConfigError):
        VRNNConfig(x_dim=4, output="strokes")
    VRNNConfig(x_dim=3, output="strokes")  # fine
    for bad in (dict(output="poisson"), dict(cell="rnn"), dict(prior="vamp"),
                dict(output="gmm", n_components=0), dict(h_dim=0), dict(z_dim=0),
                dict(rnn_layers=0)):
        with pytest.raises(ConfigError):
            VRNNConfig(x_dim=2, **bad)
    with pytest.raises(ConfigError):
        VRNNConfig(x_dim=0)
    with pytest.raises(ConfigError):
        VRNNConfig.from_dict({"x_dim": 2, "bogus": 1})


@pytest.mark.parametrize("name", PRESET_NAMES)
def test_config_round_trip(name):
    cfg = VRNNConfig.preset(name, x_dim=3, h_dim=16, z_dim=4, rnn_layers=2, enc_dim=5,
                            cell="gru")
    d = cfg.to_dict()
    assert d["enc_dim"] == 5 and d["dec_dim"] == 16 and d["name"] == name
    back = VRNNConfig.from_dict(d)
    assert back == cfg
    assert back.to_dict() == d
    # and it survives a JSON trip (what a checkpoint stores)
    import json
    assert VRNNConfig.from_dict(json.loads(json.dumps(d))) == cfg
    # a model built from the round-tripped config has the same parameter shapes
    a, b = build(cfg), build(back)
    assert [p.shape for p in a.parameters()] == [p.shape for p in b.parameters()]


# ------------------------------------------------------------------- 8. dtype, latents

@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_double_gives_float64(preset):
    model = make_model(preset, dtype=torch.float32)
    x32 = make_x(model, 2, 4, dtype=torch.float32)
    assert model.elbo(x32).dtype == torch.float32
    model.double()
    x = x32.double()
    tr = model(x)
    for name in ("log_px", "kl", "params", "h_prev", "h"):
        assert getattr(tr, name).dtype == DT, name
    assert tr.state[0].dtype == DT and tr.state[1].dtype == DT
    assert model.elbo(x).dtype == DT
    assert model.log_likelihood(x, num_samples=3).dtype == DT
    assert model.sample(2, 3).dtype == DT
    for v in model.latents(x).values():
        assert v.dtype == DT
    # float32 and float64 agree closely given the same noise
    if model.cfg.latent:
        noise = make_noise(model, 2, 4)
        e64 = model.elbo(x, noise=noise)
        model.float()
        e32 = model.elbo(x32, noise=noise.float())
        torch.testing.assert_close(e32.double(), e64, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_latents_keys_and_shapes(preset):
    model = make_model(preset, seed=13, h_dim=10, z_dim=3)
    B, T, H, Z = 3, 6, 10, 3
    x = make_x(model, B, T)
    mask = torch.ones(B, T, dtype=DT)
    mask[1, 4:] = 0
    mask[2, 1:] = 0
    out = latents(model, x, mask)
    base = {"mask", "log_px", "kl", "plugin_score", "h", "h_change"}
    zkeys = {"posterior_mean", "posterior_std", "prior_mean", "prior_std", "z"}
    want = base | zkeys if model.cfg.latent else base
    assert set(out) == want
    for k in ("mask", "log_px", "kl", "plugin_score", "h_change"):
        assert out[k].shape == (B, T), k
    assert out["h"].shape == (B, T, H)
    for k in zkeys & set(out):
        assert out[k].shape == (B, T, Z), k
    torch.testing.assert_close(out["plugin_score"], out["log_px"] - out["kl"])
    # h_change is zero on padded steps, positive on real ones
    pad = mask == 0
    assert (out["h_change"][pad] == 0).all()
    assert (out["h_change"][~pad] > 0).all()
    # for a row alone (no mask) h_change is ||h_t - h_{t-1}||
    alone = latents(model, x[:1])
    h = alone["h"][0]
    h_prev = torch.cat([torch.zeros(1, H, dtype=DT), h[:-1]])
    torch.testing.assert_close(alone["h_change"][0], (h - h_prev).norm(dim=-1))
    if model.cfg.latent:
        # sample=False: z is the posterior mean, deterministic
        torch.testing.assert_close(out["z"], out["posterior_mean"], rtol=0, atol=0)
        torch.testing.assert_close(latents(model, x, mask)["plugin_score"], out["plugin_score"],
                                   rtol=0, atol=0)
        torch.manual_seed(0)
        s = latents(model, x, mask, sample=True)
        assert (s["z"] - s["posterior_mean"]).abs().max() > 1e-3
        assert (out["posterior_std"] > 0).all() and (out["prior_std"] > 0).all()
        if model.cfg.prior == "standard":
            assert (out["prior_mean"] == 0).all() and (out["prior_std"] == 1).all()
    assert model.latents(x, mask).keys() == out.keys()
