"""An autoregressive output head: the dimensions of one step modelled jointly (MADE).

Factorised heads (``GaussianHead``, ``GMMHead``) make the D dimensions of x_t independent
given the model's features. Lai et al. (2019) showed that an RNN whose output is
autoregressive *within* each step (e.g. across the 200 samples of a speech frame) matches
or beats latent-variable models with factorised outputs. This head provides that output,
with the verbs of every other head (``vrnn.heads.Head``), so any model can use it:

    params = head(features)          # (..., param_dim): the context c, linear in the features
    head.log_prob(params, x)         # (...,) log p(x_t | c), summed over the D dims
    head.sample(params)              # (..., D) one exact draw, dimension by dimension
    head.mean(params)                # (..., D) greedy conditional means (not the joint mean)
    head.point(params)               # (..., D) mean, with bits at their most likely value

The density (1-based dims d = 1..D, x = x_t, all leading dims batched):

    p(x | c) = prod_d p(x_d | x_{<d}, c)

computed for every d in ONE pass of a masked MLP in the style of MADE (Germain et al.
2015), with one hidden layer of H units (``hidden``, default max(64, 2 D)):

    [c_h, c_o] = params = proj(features)             c_h: (..., H), c_o: (..., O)
    a = c_h + (W . M^W) x                            hidden pre-activations, (..., H)
    o = c_o + (V . M^V) relu(a) + (A . M^A) x        conditional parameters, (..., O)

Each hidden unit j has a degree m_j in 1..D-1, assigned cyclically, m_j = 1 + (j mod (D-1)),
and stored sorted (a permutation of the units, which changes nothing in the function
class) so that the units a dimension reads form a prefix. Output unit o belongs to one
dimension d(o). The masks (registered buffers, multiplied into the weights):

    M^W[j, d] = 1 iff m_j >= d        input d reaches hidden j
    M^V[o, j] = 1 iff d(o) > m_j      hidden j reaches the outputs of dimension d(o)
    M^A[o, d] = 1 iff d(o) > d        direct, strictly lower-triangular input -> output

so the outputs of dimension d depend on x_{<d} and c only. The context reaches every output
through c_o, so dimension 1, which sees no other dimension, still depends on c. With D = 1
there are no hidden units (H = 0): the head is a context-conditioned mixture.

Each real dimension's conditional is a mixture of k univariate Gaussians,

    p(x_d | x_{<d}, c) = sum_i pi_{d,i} N(x_d; mu_{d,i}, s_{d,i}^2),
    log pi_d = log_softmax(l_d),  s_{d,i} = softplus(.) + std_floor  (vrnn.heads.positive_std)

computed in log space (logsumexp); for k = 1 it is one Gaussian and has no logits. Each
dimension in ``binary_dims`` is Bernoulli(sigmoid(logit_d)), its log-probability taken from
``binary_cross_entropy_with_logits`` (no log(0)). Output layout: O = R b + B_n, with R real
dims of b = 2 (k = 1: mu, pre-std) or b = 3k (logits, mus, pre-stds) outputs each, in order
of ``real_dims``, then one logit for each of the B_n dims of ``binary_dims``. Hence

    param_dim = H + R b + B_n.

Cost. log_prob is one pass: O(H D + O H + O D) per row. Sampling (and mean/point) goes
dimension by dimension but never reruns the network: it keeps s = [a, o-without-hidden]
= params + [W; A]_masked x, starts it at params (x = 0), and after drawing x_d adds x_d
times column d of [W; A] (a rank-1 update, O(H + O)). Dimension d's outputs need only the
hidden units with m_j < d, whose inputs x_{<m_j+1} are all drawn by then, so they are final:
o_d = s_o[d] + V[d, :n_d] relu(a[:n_d]), O(H b). A whole step is O(D (H + O) + H O), the cost
of one pass, not D of them. The draws use the same network as log_prob and are exactly
distributed as exp(log_prob) (Gumbel-max picks the component).

``mean`` sets each dimension to its conditional mean given the earlier dimensions at THEIR
greedy means (bits at their probability sigmoid(logit)): a deterministic trajectory, not
the joint mean E[x]. ``point`` is the same with bits at their most likely value, 1 iff
logit > 0 (ties go to 0); later dims condition on that 0/1. It is the point to feed back
in generation. sample/mean/point run without autograd; log_prob and conditionals are
differentiable.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .heads import LOG_2PI, Head, positive_std

__all__ = ["AutoregressiveHead"]


class AutoregressiveHead(Head):
    """p(x_t | c) = prod_d p(x_d | x_{<d}, c) by one masked MLP; see the module docstring.

    Args:
        in_dim: width of the model's decoder features.
        x_dim: D, the number of dimensions of x_t.
        hidden: H, the width of the masked hidden layer; default max(64, 2 * x_dim). Forced
            to 0 when x_dim == 1 (no other dimension to condition on).
        k: Gaussian components per real dimension (k = 1: one Gaussian).
        binary_dims: 0-based indices of the Bernoulli dimensions; the rest are real.
        std_floor: the smallest standard deviation.
    """

    def __init__(self, in_dim: int, x_dim: int, hidden: int | None = None, k: int = 1,
                 binary_dims: Iterable[int] = (), std_floor: float = 1e-4):
        D = int(x_dim)
        if D < 1:
            raise ValueError(f"x_dim must be >= 1, got {x_dim}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        binary = [int(b) for b in binary_dims]
        if len(set(binary)) != len(binary) or any(not 0 <= b < D for b in binary):
            raise ValueError(f"binary_dims must be distinct indices in 0..{D - 1}, got {binary}")
        binary, bits = sorted(binary), set(binary)
        real = [d for d in range(D) if d not in bits]
        H = max(64, 2 * D) if hidden is None else int(hidden)
        if H < 0:
            raise ValueError(f"hidden must be >= 0, got {hidden}")
        if D == 1:
            H = 0
        b = 2 if k == 1 else 3 * k  # outputs per real dimension
        n_out = len(real) * b + len(binary)
        super().__init__(in_dim, D, H + n_out, std_floor)
        self.k, self.hidden, self.block, self.n_out = int(k), H, b, n_out
        self.real_dims, self.binary_dims = tuple(real), tuple(binary)

        # degrees (1-based) of the hidden units, the output units and the inputs; the masks
        # follow from the constructor's arguments, so they are buffers outside state_dict
        m = (torch.arange(H) % max(D - 1, 1) + 1).sort().values
        owner = torch.tensor([d + 1 for d in real for _ in range(b)] + [d + 1 for d in binary],
                             dtype=torch.long)
        d_in = torch.arange(1, D + 1)
        self.register_buffer("degrees", m, persistent=False)
        self.register_buffer("mask_w", (m[:, None] >= d_in[None, :]).float(), persistent=False)
        self.register_buffer("mask_v", (owner[:, None] > m[None, :]).float(), persistent=False)
        self.register_buffer("mask_a", (owner[:, None] > d_in[None, :]).float(), persistent=False)
        order = torch.tensor(real + binary, dtype=torch.long)
        self.register_buffer("real_index", torch.tensor(real, dtype=torch.long), persistent=False)
        self.register_buffer("binary_index", torch.tensor(binary, dtype=torch.long),
                             persistent=False)
        self.register_buffer("dim_of_factor", order.argsort(), persistent=False)
        self.W = nn.Parameter(torch.empty(H, D))
        self.V = nn.Parameter(torch.empty(n_out, H))
        self.A = nn.Parameter(torch.empty(n_out, D))
        self.reset_masked_parameters()

        # the sequential plan: for each dim, (is_binary, first and last output, n hidden read)
        first = {d: i * b for i, d in enumerate(real)}
        first.update({d: len(real) * b + i for i, d in enumerate(binary)})
        # 0-based d reads the units m_j <= d: of the H cyclic degrees 1 + (j mod (D-1)),
        # q = H // (D-1) full cycles and r more; counted without reading the tensor m
        # (so that the head builds on the meta device, to count parameters before allocating)
        q, r = divmod(H, max(D - 1, 1))
        read = [q * min(d, max(D - 1, 1)) + min(r, d) for d in range(D)]
        self._plan = [(d in bits, first[d], first[d] + (1 if d in bits else b), read[d])
                      for d in range(D)]

    @torch.no_grad()
    def reset_masked_parameters(self) -> None:
        """nn.Linear's init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), with each row's fan-in counted
        over its unmasked inputs (the context is not counted: it arrives through proj);
        masked entries are zero."""
        for w, masks in ((self.W, (self.mask_w,)), (self.V, (self.mask_v, self.mask_a)),
                         (self.A, (self.mask_v, self.mask_a))):
            fan = sum(mk.sum(1) for mk in masks).clamp(min=1.0)
            bound = (1.0 / fan.sqrt()).unsqueeze(1)
            w.uniform_(-1.0, 1.0).mul_(bound)
        self.W.mul_(self.mask_w)
        self.V.mul_(self.mask_v)
        self.A.mul_(self.mask_a)

    # ------------------------------------------------------------------ the network
    def masked_weights(self, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """([W . M^W; A . M^A] (H + O, D), V . M^V (O, H)), in ``dtype``."""
        wx = torch.cat([self.W * self.mask_w, self.A * self.mask_a], dim=0)
        v = self.V * self.mask_v
        if dtype is not None:
            wx, v = wx.to(dtype), v.to(dtype)
        return wx, v

    def network(self, params: Tensor, x: Tensor) -> Tensor:
        """All conditional parameters o (..., O) in one pass (dims' outputs see only x_{<d}),
        in ``params``' precision: autocast is off here, so under bf16-mixed the masked
        products of a float32 density run in float32 like the other heads' log-densities."""
        with torch.autocast(params.device.type, enabled=False):
            wx, v = self.masked_weights(params.dtype)
            s = params + F.linear(x.to(params.dtype), wx)
            a, o = s.split([self.hidden, self.n_out], dim=-1)
            return o + F.linear(F.relu(a), v)

    def _split(self, o: Tensor) -> dict[str, Tensor]:
        k, b, R = self.k, self.block, len(self.real_dims)
        real, logit = o.split([R * b, len(self.binary_dims)], dim=-1)
        real = real.unflatten(-1, (R, b))
        if k == 1:
            mu, pre = real[..., 0:1], real[..., 1:2]
            log_w = torch.zeros_like(mu)
        else:
            logits, mu, pre = real.split([k, k, k], dim=-1)
            log_w = F.log_softmax(logits, dim=-1)
        return {"log_w": log_w, "mu": mu, "std": positive_std(pre, self.std_floor),
                "logit": logit}

    def conditionals(self, params: Tensor, x: Tensor) -> dict[str, Tensor]:
        """The parameters of every p(x_d | x_{<d}, c), from one pass.

        ``log_w``, ``mu``, ``std``: (..., R, k) for the real dims, in the order of
        ``real_dims`` (``log_w`` is zeros for k = 1); ``logit``: (..., B_n) for
        ``binary_dims``. Dimension d's entries do not depend on x_{>=d}.
        """
        return self._split(self.network(params, x))

    def log_prob_dims(self, params: Tensor, x: Tensor) -> Tensor:
        """log p(x_d | x_{<d}, c) for every d, (..., D)."""
        c = self.conditionals(params, x)
        x = x.to(params.dtype)
        parts = []
        if self.real_dims:
            xr = x if not self.binary_dims else x.index_select(-1, self.real_index)
            z = (xr.unsqueeze(-1) - c["mu"]) / c["std"]
            comp = -0.5 * (z ** 2 + LOG_2PI) - torch.log(c["std"])
            parts.append(comp.squeeze(-1) if self.k == 1
                         else torch.logsumexp(c["log_w"] + comp, dim=-1))
        if self.binary_dims:
            xb = x if not self.real_dims else x.index_select(-1, self.binary_index)
            parts.append(-F.binary_cross_entropy_with_logits(c["logit"], xb, reduction="none"))
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts, dim=-1).index_select(-1, self.dim_of_factor)

    def log_prob(self, params: Tensor, x: Tensor) -> Tensor:
        return self.log_prob_dims(params, x).sum(-1)

    # ---------------------------------------------------------- dimension by dimension
    def noise(self, params: Tensor) -> dict[str, Tensor]:
        """The randomness of one draw for params' rows: ``normal`` (..., D), ``gumbel``
        (..., D, k) (k > 1) and ``uniform`` (..., D) (bits). ``sample(params, noise)`` is a
        deterministic function of it."""
        lead, D, dt, dev = params.shape[:-1], self.x_dim, params.dtype, params.device
        out = {"normal": torch.randn(*lead, D, dtype=dt, device=dev)}
        if self.k > 1:
            u = torch.rand(*lead, D, self.k, dtype=dt, device=dev)
            out["gumbel"] = -torch.log(-torch.log(u.clamp_(min=torch.finfo(dt).tiny)))
        if self.binary_dims:
            out["uniform"] = torch.rand(*lead, D, dtype=dt, device=dev)
        return out

    @torch.no_grad()
    def _sequential(self, params: Tensor, rule: str, noise: dict[str, Tensor] | None = None
                    ) -> Tensor:
        """x_1, ..., x_D in turn, each by ``rule`` (sample | mean | point) from its conditional,
        with rank-1 updates of s = params + [W; A] x (see the module docstring)."""
        lead, D, H, k = params.shape[:-1], self.x_dim, self.hidden, self.k
        p = params.reshape(-1, self.param_dim)
        N = p.shape[0]
        wx, v = self.masked_weights(p.dtype)
        wx_rows, v_t = wx.t().contiguous(), v.t().contiguous()  # (D, H + O), (H, O)
        s = p.clone()  # running [a, c_o + A x]
        x = p.new_zeros(D, N)  # dim-major: x[d] is contiguous (written in place, out=)
        if rule == "sample":
            noise = self.noise(p) if noise is None else noise
            eps, gum, uni = (None if t is None else  # dim-major too: (D, N) / (D, N, k)
                             t.reshape(N, D, -1).transpose(0, 1).squeeze(-1).contiguous()
                             for t in (noise["normal"], noise.get("gumbel"),
                                       noise.get("uniform")))
        floor = self.std_floor
        for d, (is_bit, lo, hi, n) in enumerate(self._plan):
            # dim d's outputs: its final hidden units (m_j <= d, a prefix) and s's o-part
            o = torch.addmm(s[:, H + lo:H + hi], F.relu(s[:, :n]), v_t[:n, lo:hi])
            if is_bit:
                logit = o[:, 0]
                if rule == "sample":
                    x[d].copy_(uni[d] < torch.sigmoid(logit))
                elif rule == "point":
                    x[d].copy_(logit > 0)
                else:
                    torch.sigmoid(logit, out=x[d])
            elif k == 1:
                mu, pre = o.unbind(1)
                if rule == "sample":
                    torch.addcmul(mu, positive_std(pre, floor), eps[d], out=x[d])
                else:
                    x[d].copy_(mu)
            else:
                logits, mu, pre = o.split([k, k, k], dim=1)
                if rule == "sample":  # Gumbel-max: component i ~ softmax(logits)
                    i = (logits + gum[d]).argmax(1, keepdim=True)
                    torch.addcmul(mu.gather(1, i).squeeze(1),
                                  positive_std(pre.gather(1, i).squeeze(1), floor), eps[d],
                                  out=x[d])
                else:
                    torch.sum(torch.softmax(logits, 1) * mu, 1, out=x[d])
            if d + 1 < D:
                s.addr_(x[d], wx_rows[d])  # a += x_d W[:, d], o-part += x_d A[:, d]
        return x.t().reshape(*lead, D)

    def sample(self, params: Tensor, noise: dict[str, Tensor] | None = None) -> Tensor:
        """One draw of x_t (..., D), exactly from exp(log_prob); ``noise`` as from
        ``self.noise(params)`` (default: fresh)."""
        return self._sequential(params, "sample", noise)

    def mean(self, params: Tensor) -> Tensor:
        """Greedy conditional means: x_d = E[x_d | x_{<d} = their greedy means, c]; bits at
        sigmoid(logit). Not the joint mean E[x] (the conditionals are not linear in x_{<d})."""
        return self._sequential(params, "mean")

    def point(self, params: Tensor) -> Tensor:
        """Like ``mean``, but bits take their most likely value (1 iff logit > 0) and later
        dims condition on it; real dims take their conditional mean. For feedback in
        generation."""
        return self._sequential(params, "point")

    def extra_repr(self) -> str:
        return (f"x_dim={self.x_dim}, hidden={self.hidden}, k={self.k}, "
                f"binary_dims={self.binary_dims}, param_dim={self.param_dim}")

