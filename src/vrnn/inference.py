"""Scoring: the training objective, importance-sampled log-likelihood, latents, unit conversions.

All scores are in nats per sequence unless a function says otherwise.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .heads import gaussian_log_prob


def objective(model, x: Tensor, mask: Tensor | None = None, state=None,
              kl_weight: float = 1.0, free_bits: float = 0.0):
    """The training loss: -(sum_t log p(x_t|.) - kl_weight * KL_t) per real step.

    ``kl_weight`` < 1 is KL annealing (linear warm-up is the caller's schedule);
    ``free_bits`` > 0 charges each latent dimension at each step at least that many nats
    of KL, so the optimiser gains nothing by pushing it lower (Kingma et al. 2016).
    Returns ``(loss, trace)``; the loss is averaged over real steps so its scale does not
    depend on sequence length. The reported bound (``trace``) is always the true ELBO.
    """
    tr = model(x, mask, state=state)
    kl = tr.kl
    if free_bits > 0.0 and tr.kl_dims is not None:
        kl = tr.kl_dims.clamp(min=free_bits).sum(-1) * tr.mask
    steps = tr.mask.sum().clamp(min=1.0)
    loss = -(tr.log_px - kl_weight * kl).sum() / steps
    return loss, tr


def log_weights(model, x: Tensor, mask: Tensor | None = None, samples: int = 1) -> Tensor:
    """log p(x, z) - log q(z | x) per sequence and posterior sample, Tensor[samples*B]
    (sample-major: entry k*B + b is sample k of sequence b)."""
    tr = model(x, mask, samples=samples)
    if tr.z is None:
        return tr.log_px.sum(1)
    log_pz = gaussian_log_prob(tr.z, tr.mu_p, tr.std_p)
    log_qz = gaussian_log_prob(tr.z, tr.mu_q, tr.std_q)
    return (tr.log_px + (log_pz - log_qz) * tr.mask).sum(1)


def row_step_bytes(model) -> int:
    """A generous estimate of the memory one (sequence, step) row takes in a scoring pass:
    the output parameters and a mixture's per-component terms dominate for wide outputs,
    the states and MLP activations otherwise. Used to size passes under a memory cap."""
    cfg = model.cfg
    k = cfg.n_components if cfg.output in ("gmm", "strokes") else 1
    widths = max(cfg.phi_x_dim, cfg.phi_z_dim, cfg.enc_dim, cfg.prior_dim, cfg.dec_dim)
    floats = (3 * model.head.param_dim + 3 * k * cfg.x_dim + 12 * cfg.h_dim * cfg.rnn_layers
              + 10 * cfg.z_dim + 4 * widths + 2 * cfg.x_dim)
    return 4 * floats


@torch.no_grad()
def log_likelihood(model, x: Tensor, mask: Tensor | None = None, num_samples: int = 40,
                   max_rows: int = 4096, max_bytes: int = 2 ** 30) -> Tensor:
    """Importance-sampled estimate of log p(x) per sequence, Tensor[B].

    log p(x) ~= log (1/K) sum_k p(x, z_k) / q(z_k | x),  z_k ~ q. The K samples run as one
    batch of K*B rows, split into passes of at most ``max_rows`` rows and about
    ``max_bytes`` of memory (``row_step_bytes`` per row and step; no Python loop over
    single samples; one sample per pass at least: split the batch for less). What does not
    depend on z (phi_x, the x-parts of the first layers) is computed once per pass and
    shared by its samples. Exact for the RNN rows, which have no latent. The
    estimate is a lower bound in expectation that tightens as K grows; K=1 is the ELBO's
    single-sample estimate.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if not model.cfg.latent:
        return log_weights(model, x, mask)
    B, T = x.shape[0], x.shape[1]
    per_pass = max(1, min(max_rows // max(B, 1), max_bytes // (max(B * T, 1) * row_step_bytes(model))))
    chunks = []
    for start in range(0, num_samples, per_pass):
        k = min(per_pass, num_samples - start)
        chunks.append(log_weights(model, x, mask, samples=k).view(k, B))
    lw = torch.cat(chunks, dim=0)
    return torch.logsumexp(lw, dim=0) - math.log(num_samples)


@torch.no_grad()
def latents(model, x: Tensor, mask: Tensor | None = None, sample: bool = False) -> dict:
    """Per-step quantities for analysis and anomaly scoring, all batch-first.

    With ``sample=False`` (default) z_t is the posterior mean (deterministic); with
    ``sample=True`` a posterior draw. Keys: ``mask`` (B,T); ``log_px`` (B,T) log p(x_t|.);
    ``kl`` (B,T); ``score`` (B,T) = log_px - kl, the per-step ELBO term (low = anomalous);
    ``h`` (B,T,H) h_t; ``h_change`` (B,T) ||h_t - h_{t-1}||; and for VRNN rows
    ``posterior_mean``, ``posterior_std``, ``prior_mean``, ``prior_std``, ``z`` (B,T,Z).
    """
    noise = None
    if model.cfg.latent and not sample:
        noise = x.new_zeros(x.shape[0], x.shape[1], model.cfg.z_dim)
    tr = model(x, mask, noise=noise)
    out = {
        "mask": tr.mask,
        "log_px": tr.log_px,
        "kl": tr.kl,
        "score": tr.log_px - tr.kl,
        "h": tr.h,
        "h_change": (tr.h - tr.h_prev).norm(dim=-1) * tr.mask,
    }
    if tr.z is not None:
        out.update(posterior_mean=tr.mu_q, posterior_std=tr.std_q, prior_mean=tr.mu_p,
                   prior_std=tr.std_p, z=tr.z)
    return out


def nats_per_step(total_nats: Tensor, mask: Tensor) -> float:
    """Sum of per-sequence log-likelihoods divided by the number of real steps."""
    return float(total_nats.sum() / mask.sum())


def bits_per_dim(total_nats: Tensor, mask: Tensor, x_dim: int) -> float:
    """Negative log-likelihood in bits per dimension per step (lower is better)."""
    return float(-total_nats.sum() / (mask.sum() * x_dim * math.log(2.0)))
