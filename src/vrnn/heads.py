"""Output distributions p(x_t | ...): Gaussian, GMM, Bernoulli, pen strokes and the
Itakura-Saito (exponential power) head of spectrograms.

Every head is a small module with the same verbs, so the model never knows which one it
has:

    params = head(features)          # (..., head.param_dim), unconstrained
    head.log_prob(params, x)         # (...,) log density of x_t, summed over its dimensions
    head.sample(params)              # (..., x_dim) one draw
    head.mean(params)                # (..., x_dim) the distribution's mean
    head.point(params)               # (..., x_dim) a deterministic point: the mean of the
                                     # continuous parts, the most likely value of the bits

Standard deviations are ``softplus(.) + std_floor`` and mixtures are computed in log space
(``logsumexp``), so no head can produce a NaN from a collapsing std or an empty component.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


def positive_std(pre: Tensor, floor: float) -> Tensor:
    """std = softplus(pre) + floor: smooth, positive, never below ``floor``."""
    return F.softplus(pre) + floor


def gaussian_log_prob(x: Tensor, mu: Tensor, std: Tensor) -> Tensor:
    """Diagonal Gaussian log density, summed over the last dimension."""
    return -0.5 * (((x - mu) / std) ** 2 + 2.0 * torch.log(std) + LOG_2PI).sum(-1)


def gaussian_kl(mu_q: Tensor, std_q: Tensor, mu_p: Tensor, std_p: Tensor) -> Tensor:
    """KL(N(mu_q, std_q^2) || N(mu_p, std_p^2)) per dimension (not summed).

    sum_i [log s_p - log s_q + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2]

    The log of the variance ratio is taken as a difference of logs, so that a ratio that
    overflows gives KL = +inf, never inf - inf = NaN.
    """
    log_ratio = 2.0 * (torch.log(std_q) - torch.log(std_p))
    return 0.5 * (torch.exp(log_ratio) + ((mu_q - mu_p) / std_p) ** 2 - 1.0 - log_ratio)


class Head(nn.Module):
    """A linear map from features to the parameters of an output distribution."""

    param_dim: int

    def __init__(self, in_dim: int, x_dim: int, param_dim: int, std_floor: float):
        super().__init__()
        self.x_dim = x_dim
        self.param_dim = param_dim
        self.std_floor = std_floor
        self.proj = nn.Linear(in_dim, param_dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.proj(features)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def sample(self, params: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def mean(self, params: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def point(self, params: Tensor) -> Tensor:
        """What generation feeds back under ``mean=True``: the mean, except that bits take
        their most likely value (so the model keeps seeing its training support)."""
        return self.mean(params)


class GaussianHead(Head):
    """Diagonal Gaussian N(mu, diag std^2)."""

    def __init__(self, in_dim: int, x_dim: int, std_floor: float = 1e-4):
        super().__init__(in_dim, x_dim, 2 * x_dim, std_floor)

    def split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        mu, pre = params.chunk(2, dim=-1)
        return mu, positive_std(pre, self.std_floor)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        mu, std = self.split(params)
        return gaussian_log_prob(x, mu, std)

    def sample(self, params: Tensor) -> Tensor:
        mu, std = self.split(params)
        return mu + std * torch.randn_like(mu)

    def mean(self, params: Tensor) -> Tensor:
        return self.split(params)[0]


class GMMHead(Head):
    """Mixture of k diagonal Gaussians; weights by softmax, density by logsumexp."""

    def __init__(self, in_dim: int, x_dim: int, k: int = 20, std_floor: float = 1e-4):
        super().__init__(in_dim, x_dim, k + 2 * k * x_dim, std_floor)
        self.k = k

    def split(self, params: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        k, d = self.k, self.x_dim
        logits, mu, pre = params.split([k, k * d, k * d], dim=-1)
        shape = params.shape[:-1] + (k, d)
        return (F.log_softmax(logits, -1), mu.reshape(shape),
                positive_std(pre.reshape(shape), self.std_floor))

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        log_w, mu, std = self.split(params)
        comp = gaussian_log_prob(x.unsqueeze(-2), mu, std)  # (..., k)
        return torch.logsumexp(log_w + comp, dim=-1)

    def sample(self, params: Tensor) -> Tensor:
        log_w, mu, std = self.split(params)
        idx = torch.distributions.Categorical(logits=log_w).sample()  # (...)
        pick = idx[..., None, None].expand(*idx.shape, 1, self.x_dim)
        mu_k = mu.gather(-2, pick).squeeze(-2)
        std_k = std.gather(-2, pick).squeeze(-2)
        return mu_k + std_k * torch.randn_like(mu_k)

    def mean(self, params: Tensor) -> Tensor:
        log_w, mu, _ = self.split(params)
        return (log_w.exp().unsqueeze(-1) * mu).sum(-2)


class BernoulliHead(Head):
    """Independent Bernoulli bits from logits (piano-rolls, binary data)."""

    def __init__(self, in_dim: int, x_dim: int, std_floor: float = 1e-4):
        super().__init__(in_dim, x_dim, x_dim, std_floor)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        # -BCE with logits is log-sigmoid based: no log(0) for saturated logits.
        return -F.binary_cross_entropy_with_logits(params, x, reduction="none").sum(-1)

    def sample(self, params: Tensor) -> Tensor:
        return torch.bernoulli(torch.sigmoid(params))

    def mean(self, params: Tensor) -> Tensor:
        return torch.sigmoid(params)

    def point(self, params: Tensor) -> Tensor:
        return (params > 0).to(params.dtype)


class StrokesHead(Head):
    """Pen strokes x = (pen, dx, dy), as in the paper's handwriting model.

    p(x) = Bernoulli(pen; sigmoid(e)) * sum_k pi_k N2((dx, dy); mu_k, sx_k, sy_k, rho_k),
    a mixture of bivariate Gaussians with a correlation rho_k = tanh(.) in (-1, 1).
    """

    def __init__(self, in_dim: int, x_dim: int = 3, k: int = 20, std_floor: float = 1e-4):
        if x_dim != 3:
            raise ValueError(f"the strokes head needs x_dim 3 (pen, dx, dy), got {x_dim}")
        super().__init__(in_dim, 3, 1 + 6 * k, std_floor)
        self.k = k

    def split(self, params: Tensor):
        k = self.k
        pen, logits, mu, pre, rho = params.split([1, k, 2 * k, 2 * k, k], dim=-1)
        shape = params.shape[:-1] + (k, 2)
        rho = torch.tanh(rho) * (1.0 - 1e-5)  # keep 1 - rho^2 away from 0
        return (pen.squeeze(-1), F.log_softmax(logits, -1), mu.reshape(shape),
                positive_std(pre.reshape(shape), self.std_floor), rho)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        pen_logit, log_w, mu, std, rho = self.split(params)
        pen_lp = -F.binary_cross_entropy_with_logits(pen_logit, x[..., 0], reduction="none")
        d = (x[..., None, 1:] - mu) / std  # (..., k, 2)
        one_m = 1.0 - rho ** 2
        quad = (d[..., 0] ** 2 + d[..., 1] ** 2 - 2.0 * rho * d[..., 0] * d[..., 1]) / one_m
        comp = -(LOG_2PI + torch.log(std).sum(-1) + 0.5 * torch.log(one_m) + 0.5 * quad)
        return pen_lp + torch.logsumexp(log_w + comp, dim=-1)

    def sample(self, params: Tensor) -> Tensor:
        pen_logit, log_w, mu, std, rho = self.split(params)
        idx = torch.distributions.Categorical(logits=log_w).sample()
        mu_k = mu.gather(-2, idx[..., None, None].expand(*idx.shape, 1, 2)).squeeze(-2)
        std_k = std.gather(-2, idx[..., None, None].expand(*idx.shape, 1, 2)).squeeze(-2)
        rho_k = rho.gather(-1, idx[..., None]).squeeze(-1)
        e1, e2 = torch.randn_like(mu_k).unbind(-1)
        dx = mu_k[..., 0] + std_k[..., 0] * e1
        dy = mu_k[..., 1] + std_k[..., 1] * (rho_k * e1 + torch.sqrt(1.0 - rho_k ** 2) * e2)
        pen = torch.bernoulli(torch.sigmoid(pen_logit))
        return torch.stack([pen, dx, dy], dim=-1)

    def mean(self, params: Tensor) -> Tensor:
        pen_logit, log_w, mu, _, _ = self.split(params)
        xy = (log_w.exp().unsqueeze(-1) * mu).sum(-2)
        return torch.cat([torch.sigmoid(pen_logit).unsqueeze(-1), xy], dim=-1)

    def point(self, params: Tensor) -> Tensor:
        x = self.mean(params)
        return torch.cat([(params[..., :1] > 0).to(x.dtype), x[..., 1:]], dim=-1)


class ItakuraSaitoHead(Head):
    """The DVAE review's speech likelihood (Girin et al. 2021), over STFT powers.

    Each bin's power x_f = |X_f|^2 of a complex Gaussian X_f ~ CN(0, v_f) is exponential
    with mean v_f: log p(x) = sum_f [-log v_f - x_f / v_f]. Maximising it in v is minimising
    the Itakura-Saito divergence d_IS(x, v) = x/v - log(x/v) - 1, which differs from
    -log p(x_f) by log x_f + 1, a term free of v. v = softplus(.) + ``std_floor`` (the floor
    is a variance here). x = 0 is legal (digital silence): its density is finite. The
    columns it reads must be powers: never shifted by the normaliser, only scaled
    (``VRNNConfig.power_dims``, ``Normalizer.power_scale``).
    """

    def __init__(self, in_dim: int, x_dim: int, std_floor: float = 1e-4):
        super().__init__(in_dim, x_dim, x_dim, std_floor)

    def variance(self, params: Tensor) -> Tensor:
        """v = softplus(params) + floor, the expected power of each bin."""
        return positive_std(params, self.std_floor)

    def log_prob_dims(self, params: Tensor, x: Tensor) -> Tensor:
        """(..., D) per-bin log-densities -log v - x / v (they sum to ``log_prob``)."""
        v = self.variance(params)
        return -torch.log(v) - x / v

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return self.log_prob_dims(params, x).sum(-1)

    def sample(self, params: Tensor) -> Tensor:
        v = self.variance(params)
        return v * torch.empty_like(v).exponential_()  # Exponential with mean v

    def mean(self, params: Tensor) -> Tensor:
        return self.variance(params)


def itakura_saito(x: Tensor, v: Tensor) -> Tensor:
    """d_IS(x, v) = x/v - log(x/v) - 1 per element (x > 0)."""
    r = x / v
    return r - torch.log(r) - 1.0
