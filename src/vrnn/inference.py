"""Scoring and training bounds: the ELBO, IWAE and FIVO objectives, the importance-sampled
and the particle-filter log-likelihood, latents, unit conversions.

With log w = sum_t log p(x_t | .) + log p(z_t | .) - log q(z_t | .) the log-weight of one
posterior draw z ~ q (a whole sequence):

    ELBO   E_q[sum_t log p(x_t | .) - KL(q_t || p_t)]            (KL analytic; RNN rows: exact;
                                                                  or sampled: see ``objective``)
    IWAE   log (1/K) sum_k w_k                                    K draws, no resampling
    FIVO   log Z of a particle filter with K particles (smc.py)   resampling where the ESS is low

Each is a lower bound on log p(x) in expectation; IWAE and FIVO tighten with K and equal
the ELBO at K = 1 (the analytic KL then replaces the sampled log-ratio: same expectation,
less variance). All scores are in nats per sequence unless a function says otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .heads import gaussian_log_prob
from .models.base import provides
from .smc import last_step_events, log_z_from_weights, particle_filter

BOUNDS = ("elbo", "iwae", "fivo")
KL_ESTIMATORS = ("analytic", "sampled")
METHODS = ("is", "smc")


def log_ratio(tr) -> Tensor:
    """(rows, T): log p(z_t | .) - log q(z_t | .) at the trace's posterior sample, masked
    (log p from ``tr.log_prior`` where the model gives it: KVAE); a static latent's
    log p(v) - log q(v | x) (DSAE) is added at the first step."""
    log_p = gaussian_log_prob(tr.z, tr.mu_p, tr.std_p) if tr.log_prior is None else tr.log_prior
    r = (log_p - gaussian_log_prob(tr.z, tr.mu_q, tr.std_q)) * tr.mask
    if tr.v is None:
        return r
    v = tr.v
    static = gaussian_log_prob(v, torch.zeros_like(v), torch.ones_like(v)) - gaussian_log_prob(v, tr.mu_v, tr.std_v)
    return torch.cat([r[:, :1] + (static * tr.mask[:, 0]).unsqueeze(1), r[:, 1:]], dim=1)


def objective(model, x: Tensor, mask: Tensor | None = None, state=None, kl_weight: float = 1.0,
              free_bits: float = 0.0, bound: str = "elbo", num_samples: int = 1,
              normaliser=None, continues: Tensor | None = None, resample: str = "ess",
              threshold: float = 0.5, resampler: str = "systematic", kl_estimator: str = "analytic"):
    """The training loss: minus the bound, summed over the batch, per real step.

    ``bound``: "elbo" (with ``num_samples`` K > 1: the mean of K single-draw ELBOs),
    "iwae" or "fivo" with K particles (see the module docstring; FIVO's resampling by
    ``resample``/``threshold``/``resampler`` as in ``smc.particle_filter``).
    ``kl_weight`` < 1 is KL annealing: it scales the KL term of the ELBO, and the latent
    part log p(z) - log q(z) of every IWAE/FIVO weight (a tempered weight). ``free_bits``
    > 0 charges each latent dimension at each step of each sequence at least that many
    nats of KL: a clamp per sequence, step and dimension, stricter than Kingma et al.
    (2016), who clamp the minibatch average of each group's KL; it applies to the ELBO's
    analytic KL only, and is refused for IWAE/FIVO with K > 1. ``kl_estimator`` "sampled"
    trains the ELBO (any K, and IWAE/FIVO at K = 1) on the single-draw log-ratio
    log q(z_t | .) - log p(z_t | .) in place of the analytic KL: the same expectation, more
    variance; it is the ELBO of the FIVO paper's code (its IWAE at K = 1), for comparisons
    with it. ``normaliser``: what the summed bound is divided by (default: this batch's
    real steps; training passes the whole batch's over all processes, divided by the
    number of processes, whose gradients DDP averages). ``continues`` (B,)
    (FIVO under truncated BPTT): sequences that go on after this chunk, resampled at its
    end. Returns ``(loss, trace)``; ``trace.bound`` (B,) is the bound per sequence that is
    reported: at ``kl_weight`` 1 and without free bits, except that FIVO under warm-up
    reports its tempered log Z (its particles were resampled by the tempered weights), which
    is a surrogate, not a bound on log p(x): then ``trace.tempered`` is True (training logs
    it as ``train/fivo_tempered``, never as ``train/bound``).
    Under IWAE and FIVO the trace has K*B rows (FIVO's after resampling) and
    ``trace.state`` carries them on.
    """
    if bound not in BOUNDS:
        raise ValueError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")
    K = int(num_samples)
    if K < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not 0.0 <= kl_weight <= 1.0:
        raise ValueError(f"kl_weight must be in [0, 1], got {kl_weight}")
    if not free_bits >= 0.0:
        raise ValueError(f"free_bits must be >= 0, got {free_bits}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl_estimator {kl_estimator!r}; choose one of {', '.join(KL_ESTIMATORS)}")
    B = x.shape[0]
    if not model.latent or bound == "elbo" or K == 1:
        tr = model(x, mask, state=state, samples=K if model.latent else 1)
        kl = tr.kl
        if kl_estimator == "sampled" and model.latent:
            if free_bits > 0.0:
                raise ValueError("free bits clamp the analytic KL per dimension; the sampled KL has none")
            kl = -log_ratio(tr)
        elif free_bits > 0.0 and tr.kl_dims is not None:
            kl = tr.kl_dims.clamp(min=free_bits).sum(-1) * tr.mask
            if tr.v is not None:  # a static latent's KL (in kl[:, 0], not in kl_dims) is charged whole
                kl = kl + (tr.kl - tr.kl_dims.sum(-1))
        elif free_bits > 0.0 and model.latent:
            model.refuse("free_bits")
        per_seq = (tr.log_px - kl_weight * kl).sum(1).view(-1, B).mean(0)
        reported = (tr.log_px - tr.kl).sum(1).view(-1, B).mean(0)  # (sampled or not: the analytic KL)
    else:
        if free_bits > 0.0:
            raise ValueError("free bits apply to the ELBO's KL term; IWAE and FIVO weigh sampled "
                             "log-ratios instead (use kl_weight to temper them)")
        m = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device) if mask is None else mask
        if bound == "iwae":
            if continues is not None:
                raise ValueError("IWAE weighs whole sequences: it cannot resample at a chunk's end")
            tr = model(x, mask, state=state, samples=K)
            events = last_step_events(m)
        else:
            filt = particle_filter(model, x, mask, K, resample, threshold, resampler, state=state,
                                   kl_weight=kl_weight, continues=continues, record_noise=True)
            tr = model(x, mask, state=state, samples=K, noise=filt.noise, ancestors=filt.ancestors)
            events = filt.events
        ratio = log_ratio(tr)
        per_seq = log_z_from_weights((tr.log_px + kl_weight * ratio).view(K, B, -1), events)
        # (FIVO under warm-up resampled by the tempered weights: its log Z with untempered
        # weights on those segments would be biased, so it reports the tempered bound)
        reported = per_seq if kl_weight == 1.0 or bound == "fivo" else log_z_from_weights(
            (tr.log_px + ratio).detach().view(K, B, -1), events)
    steps = (tr.mask.sum() / max(1, tr.mask.shape[0] // B)).clamp(min=1.0) if normaliser is None else normaliser
    loss = -per_seq.sum() / steps
    tr.bound = reported.detach()
    tr.tempered = bool(bound == "fivo" and model.latent and K > 1 and kl_weight != 1.0)
    return loss, tr


def log_weights(model, x: Tensor, mask: Tensor | None = None, samples: int = 1,
                noise: Tensor | None = None, static_noise: Tensor | None = None) -> Tensor:
    """log p(x, z) - log q(z | x) per sequence and posterior sample, Tensor[samples*B]
    (sample-major: entry k*B + b is sample k of sequence b); ``noise`` (samples*B, T, Z)
    fixes the draws (with ``static_noise`` (samples*B, V) for a per-sequence latent)."""
    tr = model(x, mask, samples=samples, **model.fixed_draws(noise if model.latent else None, static_noise))
    if tr.z is None:
        return tr.log_px.sum(1)
    return (tr.log_px + log_ratio(tr)).sum(1)


def row_step_bytes(model) -> int:
    """A generous estimate of the memory one (sequence, step) row takes in a scoring pass:
    the output parameters and a mixture's per-component terms dominate for wide outputs,
    the states and MLP activations otherwise. Used to size passes under a memory cap."""
    cfg = model.cfg
    k = cfg.n_components if cfg.output in ("gmm", "strokes", "ar") else 1
    widths = max(cfg.phi_x_dim, cfg.phi_z_dim, cfg.enc_dim, cfg.prior_dim, cfg.dec_dim)
    floats = (3 * model.head.param_dim + 3 * k * cfg.x_dim + 12 * max(cfg.h_dim, cfg.a_dim) * cfg.rnn_layers
              + 10 * cfg.z_dim + 4 * widths + 2 * cfg.x_dim)
    return 4 * floats


class SequenceDraws:
    """The random draws of the estimators for B sequences, each from its own generators,
    seeded by (seed, the sequence's position ``index``, the stream): a sequence's scores
    are the same whatever batch it is scored in (padding, batch size, memory caps).
    ``lengths``: the sequences' real steps; ``T``: the padded length; ``K``: samples;
    ``v_dim``: the model's ``static_dim`` (a latent drawn once per sequence, from streams
    of its own)."""

    def __init__(self, seed: int, index, lengths, T: int, K: int, z_dim: int, dtype=torch.float32,
                 v_dim: int = 0):
        self.seed, self.index, self.lengths = int(seed), [int(i) for i in index], [int(n) for n in lengths]
        self.T, self.K, self.Z, self.V, self.dtype = int(T), int(K), int(z_dim), int(v_dim), dtype

    def _gen(self, i: int, stream: int, static: bool = False) -> torch.Generator:
        s = ((self.seed * 1_000_003 + i) * 1_000_033 + stream) % (2 ** 63)
        return torch.Generator().manual_seed(s ^ 0x5DEECE66D5DEECE if static else s)

    def subset(self, start: int, end: int) -> "SequenceDraws":
        return SequenceDraws(self.seed, self.index[start:end], self.lengths[start:end], self.T, self.K,
                             self.Z, self.dtype, self.V)

    def _static(self, streams) -> Tensor:
        """(len(streams)*B, V) standard draws of the static latent (V = 0 without one: empty)."""
        return torch.stack([torch.randn(self.V, generator=self._gen(i, j, static=True), dtype=self.dtype)
                            for j in streams for i in self.index])

    def _padded(self, i: int, n: int, stream: int) -> Tensor:
        out = torch.zeros(self.T, self.Z, dtype=self.dtype)
        out[:n] = torch.randn(n, self.Z, generator=self._gen(i, stream), dtype=self.dtype)
        return out

    def elbo_noise(self) -> Tensor:
        """(B, T, Z): the ELBO's one draw per sequence."""
        return torch.stack([self._padded(i, n, 0) for i, n in zip(self.index, self.lengths)])

    def elbo_static(self) -> Tensor:
        """(B, V): the ELBO's draw of the static latent."""
        return self._static([0])

    def is_noise(self, start: int, k: int) -> Tensor:
        """(k*B, T, Z), sample-major: importance samples start..start+k-1."""
        return torch.stack([self._padded(i, n, 1 + j) for j in range(start, start + k)
                            for i, n in zip(self.index, self.lengths)])

    def is_static(self, start: int, k: int) -> Tensor:
        """(k*B, V), sample-major: the static latent's draws of samples start..start+k-1."""
        return self._static(range(1 + start, 1 + start + k))

    def smc(self) -> dict:
        """``noise`` and ``uniforms`` for ``particle_filter``: per step, each sequence's
        next draws from its own two generators (a sequence's t-th draws do not depend on
        the batch's other sequences or length)."""
        gens = [(self._gen(i, -1), self._gen(i, -2)) for i in self.index]
        K, Z, dt = self.K, self.Z, self.dtype

        def noise(t):  # (K*B, Z), row k*B + b
            return torch.stack([torch.randn(K, Z, generator=g, dtype=dt) for g, _ in gens], 1).reshape(-1, Z)

        def uniforms(t):  # (B, K), drawn at every step whether or not it resamples
            return torch.stack([torch.rand(K, generator=u, dtype=dt) for _, u in gens])

        return {"noise": noise, "uniforms": uniforms}


@provides("log_likelihood")
@torch.no_grad()
def log_likelihood(model, x: Tensor, mask: Tensor | None = None, num_samples: int = 40,
                   method: str = "is", max_rows: int = 4096, max_bytes: int = 2 ** 30,
                   resample: str = "ess", threshold: float = 0.5, resampler: str = "systematic",
                   generator: torch.Generator | None = None, draws: "SequenceDraws | None" = None) -> Tensor:
    """Estimated log p(x) per sequence, Tensor[B]; exact for the RNN rows, which have no
    latent.

    ``method="is"``: importance sampling, log (1/K) sum_k p(x, z_k) / q(z_k | x) with
    z_k ~ q; the K samples run as one batch of K*B rows, split into passes of at most
    ``max_rows`` rows and about ``max_bytes`` of memory (``row_step_bytes`` per row and
    step; one sample per pass at least: split the batch for less), the z-independent work
    shared by the samples of a pass. ``method="smc"``: the particle filter of smc.py with K
    particles (``resample``: "ess" at or below ``threshold`` * K, "always" or "never";
    ``resampler``: "systematic" or "multinomial"); particles interact, so passes split the
    batch into groups of sequences instead. Both are lower bounds in expectation that
    tighten as K grows; K=1 is the ELBO's single-draw estimate. ``generator`` seeds the
    particle filter's draws (IS draws from the global generator: ``torch.manual_seed``).
    ``draws`` (``SequenceDraws`` of these B sequences) takes every draw from each
    sequence's own generator instead: the estimate no longer depends on how passes are cut.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if not model.latent:
        return log_weights(model, x, mask)
    B, T = x.shape[0], x.shape[1]
    K = int(num_samples)
    if method == "smc":
        # no gradients: a step's K particles and the sequence's z-independent features
        group = max(1, min(B, max_rows // K, max_bytes // ((K + T) * row_step_bytes(model))))
        out = []
        for s in range(0, B, group):
            g = min(group, B - s)
            out.append(particle_filter(
                model, x[s:s + group], None if mask is None else mask[s:s + group], K, resample, threshold,
                resampler, generator=generator, **({} if draws is None else draws.subset(s, s + g).smc())).log_z)
        return torch.cat(out)
    per_pass = max(1, min(max_rows // max(B, 1), max_bytes // (max(B * T, 1) * row_step_bytes(model))))
    chunks = []
    for start in range(0, K, per_pass):
        k = min(per_pass, K - start)
        eps, static = (None, None) if draws is None else (draws.is_noise(start, k), draws.is_static(start, k).to(x))
        chunks.append(log_weights(model, x, mask, samples=k, noise=eps, static_noise=static).view(k, B))
    lw = torch.cat(chunks, dim=0)
    return torch.logsumexp(lw, dim=0) - math.log(K)


@provides("latents")
@torch.no_grad()
def latents(model, x: Tensor, mask: Tensor | None = None, sample: bool = False) -> dict:
    """Per-step quantities for analysis and anomaly scoring, all batch-first.

    With ``sample=False`` (default) z_t is the posterior mean (deterministic); with
    ``sample=True`` a posterior draw. Keys: ``mask`` (B,T); ``log_px`` (B,T) log p(x_t|.);
    ``kl`` (B,T); ``plugin_score`` (B,T) = log_px - kl at the z used (low = anomalous): at
    the posterior mean a plug-in value, NOT the per-step ELBO term (its sum is not the ELBO,
    which is an expectation over z ~ q); with ``sample=True`` a one-draw unbiased estimate
    of that term;
    ``h`` (B,T,H) the deterministic state after step t (the VRNN's h_t, the SRNN's
    d_{t+1}); ``h_change`` (B,T) ||h after t - h before t||; and for latent models
    ``posterior_mean``, ``posterior_std``, ``prior_mean``, ``prior_std``, ``z`` (B,T,Z);
    for a static latent (DSAE) ``static_mean``, ``static_std``, ``v`` (B,T,V), the same at
    every real step.
    """
    tr = model(x, mask, **({} if sample else model.mean_draws(x.shape[0], x.shape[1], x)))
    out = {
        "mask": tr.mask,
        "log_px": tr.log_px,
        "kl": tr.kl,
        "plugin_score": tr.log_px - tr.kl,
        "h": tr.h,
        "h_change": (tr.h - tr.h_prev).norm(dim=-1) * tr.mask,
    }
    if tr.z is not None:
        out.update(posterior_mean=tr.mu_q, posterior_std=tr.std_q, prior_mean=tr.mu_p,
                   prior_std=tr.std_p, z=tr.z)
    if tr.v is not None:  # a static latent (DSAE), repeated at every step
        per_step = lambda t: t.unsqueeze(1).expand(-1, tr.mask.shape[1], -1) * tr.mask.unsqueeze(-1)  # noqa: E731
        out.update(static_mean=per_step(tr.mu_v), static_std=per_step(tr.std_v), v=per_step(tr.v))
    return out


def nats_per_step(total_nats: Tensor, mask: Tensor) -> float:
    """Sum of per-sequence log-likelihoods divided by the number of real steps."""
    return float(total_nats.sum() / mask.sum())


def bits_per_dim(total_nats: Tensor, mask: Tensor, x_dim: int) -> float:
    """Negative log-likelihood in bits per dimension per step (lower is better)."""
    return float(-total_nats.sum() / (mask.sum() * x_dim * math.log(2.0)))
