"""Sequential Monte Carlo: a particle filter for every latent model of the family, its
log-likelihood estimate, and the FIVO bound (Maddison et al. 2017; Le et al. 2018;
Naesseth et al. 2018).

K particles per sequence. At each real step t every particle proposes z_t from the
model's posterior q and takes the incremental weight

    log w_t = log p(x_t | .) + log p(z_t | .) - log q(z_t | .)

added to its running log-weight W. Where the effective sample size
ESS = (sum_k e^W_k)^2 / sum_k e^(2 W_k) falls to ``threshold`` * K or below (as FIVO's
code: with K = 2 and the default 0.5, the ESS of 2 particles is never below 1; or always,
or never), the sequence's particles are resampled: each takes an ancestor drawn in
proportion to e^W (multinomial or systematic), its state becomes the ancestor's, and W
is reset to 0. At every resampling and at the sequence's own last real step

    log Z += logsumexp_k(W_k) - log K,

an unbiased estimate of p(x) (``exp(log Z)``; log Z itself is a lower bound in
expectation). With resampling "never" it is exactly importance sampling with K samples.
Padded steps add nothing and never resample; each sequence resamples on its own schedule.

The particles of all sequences run as one batch of K*B rows (sample-major: row k*B + b is
particle k of sequence b), and what does not depend on z is computed once per sequence
(``model.smc_features``). Resampling is one gather of the particles' state.

FIVO (``inference.objective(bound="fivo")``) trains on this log Z: the filter runs once
without gradients to draw the noise and the ancestors, then the model's ordinary batched
pass (the fused scan, with a gather of the state after each resampling step) recomputes
the same weights with gradients, and log Z is summed over the same segments. No gradient
flows through the ancestor indices (as in the FIVO paper). In float32 and float64 the two
passes give the same weights to rounding; under bf16 autocast they differ at bf16
precision (the filter's modules and the fused scan cast differently), so the resampling
was decided on slightly different weights than the ones summed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .options import option

RESAMPLERS = ("systematic", "multinomial")
SCHEDULES = ("ess", "always", "never")


# ------------------------------------------------------------------ resampling
def effective_sample_size(log_w: Tensor, lse: Tensor | None = None) -> Tensor:
    """(sum_k w_k)^2 / sum_k w_k^2 over dim 0, from log-weights (K, ...), in log space
    (``lse``: logsumexp(log_w, 0) when the caller has it already)."""
    lse = torch.logsumexp(log_w, 0) if lse is None else lse
    return torch.exp(2.0 * lse - torch.logsumexp(2.0 * log_w, 0))


def ancestors(log_w: Tensor, uniforms: Tensor, method: str = "systematic") -> Tensor:
    """Ancestor indices (K, B) in 0..K-1 for log-weights (K, B).

    ``uniforms`` (B, K) in [0, 1): multinomial uses all K (inverse CDF, independent
    draws); systematic uses the first of each row, u_k = (k + 1 - u) / K (one stratified
    draw: lower variance, the same expected counts K w_k). Each draw v in (0, total] picks
    the first particle whose cumulative weight reaches it, so a particle of zero weight is
    never picked, whatever the rounding.
    """
    K = log_w.shape[0]
    w = torch.exp(log_w - log_w.max(0, keepdim=True).values)  # the heaviest weighs 1
    cdf = w.cumsum(0).transpose(0, 1).contiguous()            # (B, K)
    total = cdf[:, -1:]
    if method == "systematic":
        k = torch.arange(1, K + 1, device=log_w.device, dtype=log_w.dtype)
        v = (k - uniforms[:, :1].to(log_w.dtype)) / K
    elif method == "multinomial":
        v = 1.0 - uniforms.to(log_w.dtype)
    else:
        raise ValueError(f"unknown resampler {method!r}; choose {' or '.join(RESAMPLERS)}")
    v = torch.minimum(v * total, total).contiguous()
    idx = torch.searchsorted(cdf, v, right=False)
    return idx.clamp_(max=K - 1).transpose(0, 1)


@dataclass
class FilterOptions:
    """The particle filter's resampling options, declared once for every command that runs
    the filter (evaluate, latents, score, stream); the rule is ESS <= threshold * K."""

    resample: str = option("ess", "particle filter: resample when the ESS is low (ess), always, or never",
                           choices=SCHEDULES, flag="--resample")
    ess_threshold: float = option(0.5, "particle filter: resample when the ESS falls to this fraction "
                                       "of K or below", above=0.0, max=1.0, flag="--ess-threshold")
    resampler: str = option("systematic", "particle filter: how ancestors are drawn", choices=RESAMPLERS,
                            flag="--resampler")


def resampling_rule(resample: str, threshold: float) -> None:
    if resample not in SCHEDULES:
        raise ValueError(f"unknown resampling schedule {resample!r}; choose one of {', '.join(SCHEDULES)}")
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"the ESS threshold is a fraction of K in (0, 1], got {threshold}")


# ---------------------------------------------------------------- the filter
@dataclass
class Filtered:
    """What one run of the particle filter gives, per sequence (B) and step (T)."""

    log_z: Tensor            # (B,) log of the SMC estimate of p(x)
    ess: Tensor              # (B, T) ESS after step t's weights (before resampling); 0 on padding
    resampled: Tensor        # (B, T) bool: the particles were resampled after step t
    events: Tensor           # (B, T) bool: log Z took a log-mean-exp at step t
    ancestors: list          # T entries: None, or (K*B,) row indices (for forward(ancestors=))
    noise: Tensor | None     # (K*B, T, Z) the proposal noise, when recorded


def _real_mask(x: Tensor, mask: Tensor | None) -> Tensor:
    return torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask


@torch.no_grad()
def particle_filter(model, x: Tensor, mask: Tensor | None = None, particles: int = 16,
                    resample: str = "ess", threshold: float = 0.5, resampler: str = "systematic",
                    state=None, kl_weight: float = 1.0, continues: Tensor | None = None,
                    noise: Tensor | None = None, uniforms: Tensor | None = None,
                    record_noise: bool = False, generator: torch.Generator | None = None) -> Filtered:
    """Run K = ``particles`` particles per sequence through ``model`` (see the module
    docstring); ``state`` continues from a previous chunk (K*B rows). ``continues`` (B,)
    marks sequences that go on after this chunk: they are resampled at their last step
    here (so the next chunk starts from equal weights). ``kl_weight`` tempers the latent
    part of each weight (KL warm-up). ``noise`` (K*B, T, Z) and ``uniforms`` (B, T, K) fix
    the proposal and resampling draws (or, as callables of t, give step t's (K*B, Z) and
    (B, K) draws); by default they are drawn step by step."""
    resampling_rule(resample, threshold)
    if particles < 1:
        raise ValueError(f"particles must be >= 1, got {particles}")
    K = particles
    feats = model.smc_features(x, mask, state)
    parts = model.smc_initial(feats, K, state)
    m = _real_mask(x, mask)
    B, T = m.shape
    R, Z, dev, dt = K * B, model.cfg.z_dim, x.device, x.dtype
    if noise is not None and not callable(noise) and noise.shape != (R, T, Z):
        raise ValueError(f"noise must have shape {(R, T, Z)} (particles*B, T, z_dim), got {tuple(noise.shape)}")
    if uniforms is not None and not callable(uniforms) and uniforms.shape != (B, T, K):
        raise ValueError(f"uniforms must have shape {(B, T, K)}, got {tuple(uniforms.shape)}")
    real_all = m > 0
    n_real = real_all.sum(0).tolist()                  # per step: how many sequences go on
    lengths = real_all.sum(1)
    is_last_all = torch.zeros_like(real_all)           # each sequence's last real step
    is_last_all[torch.arange(B, device=dev), (lengths - 1).clamp(min=0)] = lengths > 0
    any_last = is_last_all.any(0).tolist()
    keep_rows = real_all.repeat(K, 1)                  # (R, T)
    cont = None if continues is None else continues.to(dev)
    W = x.new_zeros(K, B)
    log_z = x.new_zeros(B)
    ess_all = x.new_zeros(B, T)
    res_all = torch.zeros(B, T, dtype=torch.bool, device=dev)
    ev_all = torch.zeros(B, T, dtype=torch.bool, device=dev)
    anc_rows: list = [None] * T
    rec = x.new_zeros(R, T, Z) if (record_noise and noise is None) else None
    cols, identity, log_k = torch.arange(B, device=dev), torch.arange(K, device=dev).unsqueeze(1), math.log(K)
    for t in range(T):
        if n_real[t] == 0:
            break  # every sequence has ended
        full = n_real[t] == B
        real = real_all[:, t]
        if callable(noise):  # per-step draws (inference.SequenceDraws): (R, Z), and (B, K) uniforms
            eps, u_t = noise(t).to(dev, dt), uniforms(t).to(dev, dt) if callable(uniforms) else None
        else:
            eps = noise[:, t] if noise is not None else torch.randn(R, Z, device=dev, dtype=dt, generator=generator)
        if rec is not None:
            rec[:, t] = eps
        log_px, log_ratio, new = model.smc_step(feats, t, parts, eps)
        inc = (log_px + (log_ratio if kl_weight == 1.0 else kl_weight * log_ratio)).view(K, B)
        if full:
            W, parts = W + inc, new
        else:  # padded steps add nothing and leave the particles where they are
            W = W + torch.where(real, inc, 0.0)
            keep = keep_rows[:, t]
            parts = tuple(torch.where(keep.view(R, *([1] * (n.dim() - 1))), n, o) for n, o in zip(new, parts))
        lse = torch.logsumexp(W, 0)
        ess = effective_sample_size(W, lse)
        ess_all[:, t] = ess if full else torch.where(real, ess, 0.0)
        is_last = is_last_all[:, t]
        want = None
        if resample == "always":
            want = real & ~is_last
        elif resample == "ess":
            want = real & ~is_last & (ess <= threshold * K)
        if cont is not None and any_last[t]:
            want = is_last & cont if want is None else want | (is_last & cont)
        resampling = want is not None and bool(want.any())
        if any_last[t] or resampling:
            event = is_last if not resampling else want | is_last
            log_z = log_z + torch.where(event, lse - log_k, 0.0)
            ev_all[:, t] = event
        if resampling:
            u = (u_t if callable(uniforms) else uniforms[:, t]) if uniforms is not None else torch.rand(
                B, K, device=dev, dtype=dt, generator=generator)
            a = torch.where(want, ancestors(W, u, resampler), identity)  # (K, B)
            rows = (a * B + cols).reshape(R)
            parts = tuple(p.index_select(0, rows) for p in parts)
            W = torch.where(want, 0.0, W)
            anc_rows[t] = rows
            res_all[:, t] = want
    return Filtered(log_z, ess_all, res_all, ev_all, anc_rows, rec if rec is not None else noise)


# ------------------------------------------------------------------ the bounds
def log_z_from_weights(log_w: Tensor, events: Tensor) -> Tensor:
    """log Z (B,) from per-step log-weights (K, B, T) and the steps (B, T) where the filter
    took a log-mean-exp: the weights are summed within each segment that ends at an event,
    log-mean-exp'ed over the K particles, and the segments summed. One event at each
    sequence's last real step (no resampling) is the importance-weighted bound."""
    K, B, T = log_w.shape
    ev = events.long()
    seg = (ev.cumsum(1) - ev).unsqueeze(0).expand(K, B, T)
    sums = log_w.new_zeros(K, B, T).scatter_add(2, seg, log_w)
    per_seg = torch.logsumexp(sums, 0) - math.log(K)                          # (B, T)
    complete = torch.arange(T, device=log_w.device).unsqueeze(0) < ev.sum(1, keepdim=True)
    return torch.where(complete, per_seg, 0.0).sum(1)


def last_step_events(mask: Tensor) -> Tensor:
    """(B, T) bool: each row's last real step."""
    last = (mask.sum(1) - 1).long().clamp(min=0)
    ev = torch.zeros(mask.shape, dtype=torch.bool, device=mask.device)
    ev[torch.arange(mask.shape[0], device=mask.device), last] = mask.sum(1) > 0
    return ev
