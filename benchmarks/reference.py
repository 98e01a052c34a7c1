"""A straightforward VRNN, the way the public implementations write it (the baseline).

Modelled on emited/VariationalRecurrentNeuralNetwork: every network runs inside the Python
loop over time -- phi_x, encoder, prior, decoder, phi_z, an ``nn.LSTMCell``, and the KL and
Gaussian log-likelihood terms per step. Sizes and maths are those of
``vrnn.build(VRNNConfig.preset("vrnn-gauss", ...))`` with 1-layer MLPs of width h_dim, a
1-layer LSTM and std = softplus + 1e-4, so the two have the same parameter count and, with
the same weights and noise, the same ELBO (``load_from`` copies the weights; run this file
to check both).

The one liberty taken: ``nn.LSTMCell`` carries two gate biases (b_ih + b_hh), which are
redundant; ``vrnn`` keeps one. The reference turns ``bias_hh`` into a zero buffer (CUDA's
fused cell wants a tensor there), so the parameter counts match exactly; the extra add of
a zero bias per step costs next to nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOG_2PI = math.log(2.0 * math.pi)


class ReferenceVRNN(nn.Module):
    def __init__(self, x_dim: int, h_dim: int, z_dim: int, std_floor: float = 1e-4):
        super().__init__()
        self.x_dim, self.h_dim, self.z_dim, self.floor = x_dim, h_dim, z_dim, std_floor
        self.phi_x = nn.Sequential(nn.Linear(x_dim, h_dim), nn.ReLU())
        self.phi_z = nn.Sequential(nn.Linear(z_dim, h_dim), nn.ReLU())
        self.enc = nn.Sequential(nn.Linear(h_dim + h_dim, h_dim), nn.ReLU())
        self.enc_mean = nn.Linear(h_dim, z_dim)
        self.enc_std = nn.Linear(h_dim, z_dim)
        self.prior = nn.Sequential(nn.Linear(h_dim, h_dim), nn.ReLU())
        self.prior_mean = nn.Linear(h_dim, z_dim)
        self.prior_std = nn.Linear(h_dim, z_dim)
        self.dec = nn.Sequential(nn.Linear(h_dim + h_dim, h_dim), nn.ReLU())
        self.dec_mean = nn.Linear(h_dim, x_dim)
        self.dec_std = nn.Linear(h_dim, x_dim)
        self.rnn = nn.LSTMCell(h_dim + h_dim, h_dim)
        del self.rnn.bias_hh  # one gate bias, as in vrnn (see module docstring); a zero
        self.rnn.register_buffer("bias_hh", torch.zeros(4 * h_dim))  # buffer: CUDA needs one

    def _std(self, pre: Tensor) -> Tensor:
        return F.softplus(pre) + self.floor

    def forward(self, x: Tensor, noise: Tensor | None = None) -> Tensor:
        """ELBO per sequence (B,), nats; x is (B, T, x_dim)."""
        B, T, _ = x.shape
        h = x.new_zeros(B, self.h_dim)
        c = x.new_zeros(B, self.h_dim)
        elbo = x.new_zeros(B)
        for t in range(T):
            x_t = x[:, t]
            fx = self.phi_x(x_t)
            enc_t = self.enc(torch.cat([fx, h], 1))
            mu_q, std_q = self.enc_mean(enc_t), self._std(self.enc_std(enc_t))
            prior_t = self.prior(h)
            mu_p, std_p = self.prior_mean(prior_t), self._std(self.prior_std(prior_t))
            eps = torch.randn_like(std_q) if noise is None else noise[:, t]
            z = mu_q + std_q * eps
            fz = self.phi_z(z)
            dec_t = self.dec(torch.cat([fz, h], 1))
            mu_x, std_x = self.dec_mean(dec_t), self._std(self.dec_std(dec_t))
            h, c = self.rnn(torch.cat([fx, fz], 1), (h, c))
            var_ratio = (std_q / std_p) ** 2
            kl = 0.5 * (var_ratio + ((mu_q - mu_p) / std_p) ** 2 - 1.0 - torch.log(var_ratio))
            log_px = -0.5 * (((x_t - mu_x) / std_x) ** 2 + 2.0 * torch.log(std_x) + LOG_2PI)
            elbo = elbo + log_px.sum(1) - kl.sum(1)
        return elbo

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def load_from(self, model) -> "ReferenceVRNN":
        """Copy the weights of a ``vrnn.VRNN`` (vrnn-gauss, 1-layer everything) into this."""
        H, Z, X = self.h_dim, self.z_dim, self.x_dim
        self.phi_x[0].load_state_dict(model.phi_x[0].state_dict())
        self.phi_z[0].load_state_dict(model.phi_z[0].state_dict())
        enc = model.encoder
        self.enc[0].weight.copy_(torch.cat([enc.in_x.weight, enc.in_h.weight], 1))
        self.enc[0].bias.copy_(enc.in_x.bias)
        for (m, s), g in (((self.enc_mean, self.enc_std), enc.gauss.out),
                          ((self.prior_mean, self.prior_std), model.prior.gauss.out)):
            m.weight.copy_(g.weight[:Z]); m.bias.copy_(g.bias[:Z])  # noqa: E702
            s.weight.copy_(g.weight[Z:]); s.bias.copy_(g.bias[Z:])  # noqa: E702
        self.prior[0].load_state_dict(model.prior.body[0].state_dict())
        self.dec[0].load_state_dict(model.decoder[0].state_dict())  # input [fz; h] in both
        p = model.head.proj
        self.dec_mean.weight.copy_(p.weight[:X]); self.dec_mean.bias.copy_(p.bias[:X])  # noqa: E702
        self.dec_std.weight.copy_(p.weight[X:]); self.dec_std.bias.copy_(p.bias[X:])  # noqa: E702
        cell = model.cell
        self.rnn.weight_ih.copy_(torch.cat([cell.w_x.weight, cell.w_z.weight], 1))
        self.rnn.bias_ih.copy_(cell.w_x.bias)
        self.rnn.weight_hh.copy_(cell.w_h.weight)
        assert H == model.cfg.h_dim
        return self


def _check() -> None:
    from vrnn import VRNNConfig, build

    torch.manual_seed(0)
    for x_dim, h, z in ((200, 512, 128), (3, 256, 32)):
        model = build(VRNNConfig.preset("vrnn-gauss", x_dim=x_dim, h_dim=h, z_dim=z)).double()
        ref = ReferenceVRNN(x_dim, h, z).double()
        print(f"x_dim {x_dim} h {h} z {z}: parameters vrnn {model.num_parameters():,} "
              f"reference {ref.num_parameters():,}")
        assert model.num_parameters() == ref.num_parameters()
        ref.load_from(model)
        x = torch.randn(4, 7, x_dim, dtype=torch.double)
        noise = torch.randn(4, 7, z, dtype=torch.double)
        a, b = model.elbo(x, noise=noise), ref(x, noise=noise)
        print(f"  max |elbo difference| with the same weights and noise: {(a - b).abs().max():.2e}")
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-7)


if __name__ == "__main__":
    _check()
