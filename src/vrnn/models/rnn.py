"""The latent-free baselines of the paper's Table 1 (RNN-Gauss, RNN-GMM).

    generation  x_t ~ p(x_t | h_{t-1})     params = head(phi_dec(h_{t-1}))
    recurrence  h_t = f(phi_x(x_t), h_{t-1})   f an LSTM (default) or GRU stack

There is no latent: the log-likelihood is exact, and the whole recurrence runs as
``nn.LSTM``/``nn.GRU`` calls over the sequence (``recurrent.run``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from ..outputs import make_head
from .base import SequenceModel, State, Trace, input_net, mlp
from .recurrent import lengths_of, make_rnn, run


class RNN(SequenceModel):
    """RNN-Gauss / RNN-GMM (and any other head): ``vrnn.build`` makes one for family "rnn".
    State: (h, c), each (layers, B, h_dim); c is unused (zeros) for a GRU."""

    family = "rnn"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.phi_x = input_net(cfg)
        self.rnn = make_rnn(cfg.cell, cfg.phi_x_dim, cfg.h_dim, cfg.rnn_layers)
        self.decoder = mlp(cfg.h_dim, cfg.dec_dim, cfg.dec_layers)
        self.head = make_head(cfg, cfg.dec_dim)

    def initial_state(self, batch: int, device=None, dtype=None) -> State:
        shape = (self.cfg.rnn_layers, batch, self.cfg.h_dim)
        return (torch.zeros(shape, device=device, dtype=dtype),
                torch.zeros(shape, device=device, dtype=dtype))

    def forward(self, x: Tensor, mask: Tensor | None = None, state: State | None = None,
                noise: Tensor | None = None, samples: int = 1, ancestors=None) -> Trace:
        """h_t = f(phi_x(x_t), h_{t-1}) over the whole sequence; x_t ~ head(phi_dec(h_{t-1}))."""
        if samples != 1 or ancestors is not None:
            raise ValueError(f"samples={samples}: an RNN row has no latent to sample")
        x, mask = self.check_inputs(x, mask)
        if state is None:
            state = self.initial_state(x.shape[0], x.device, x.dtype)
        out, final = run(self.rnn, self.phi_x(x), lengths_of(mask), state)  # empty rows keep their state
        h_prev = torch.cat([state[0][-1].unsqueeze(1), out[:, :-1]], dim=1)
        params = self.head(self.decoder(h_prev)).to(x.dtype)  # log-probs in x's precision
        log_px = self.head.log_prob(params, x)
        m = torch.ones_like(log_px) if mask is None else mask
        return Trace(log_px * m, torch.zeros_like(log_px), params, h_prev, out, final, m)

    @torch.inference_mode()
    def generate_step(self, state: State, mean: bool = False):
        params = self.head(self.decoder(state[0][-1]))
        x = self.head.point(params) if mean else self.head.sample(params)
        _, new = run(self.rnn, self.phi_x(x).unsqueeze(1), None, state)
        return x, new

    def smc_features(self, x, mask, state=None):
        raise ConfigError("an RNN row has no latent: its log-likelihood is exact, no particles needed")
