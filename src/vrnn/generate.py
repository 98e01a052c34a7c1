"""Generation: free sampling from the prior, and continuation of a prefix.

Generation at step t: z_t ~ prior(h_{t-1}), x_t ~ head(phi_dec(phi_z(z_t), h_{t-1})), then
h_t = f(phi_x(x_t), phi_z(z_t), h_{t-1}). A prefix is first filtered through the
posterior (the same pass as training), and generation continues from its final state.
Everything runs under ``torch.inference_mode`` (no autograd bookkeeping).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .model import State, VRNN


@torch.inference_mode()
def filter_prefix(model: VRNN, prefix: Tensor, mask: Tensor | None = None,
                  noise: Tensor | None = None) -> State:
    """The state after reading ``prefix`` (B, P, D) with the posterior (one z draw per step)."""
    return model(prefix, mask, noise=noise).state


@torch.inference_mode()
def step(model: VRNN, x: Tensor, fz: Tensor | None, state: State) -> State:
    """Advance the recurrence by one step given x_t (B, D) and phi_z(z_t) (B, F) or None."""
    fx = model.phi_x(x)
    h, c = state
    if not model.cfg.latent:
        if model.cfg.cell == "lstm":
            _, (h, c) = model.rnn(fx.unsqueeze(1), (h, c))
        else:
            _, h = model.rnn(fx.unsqueeze(1), h)
        return h, c
    cell = model.cell
    hs, cs = cell.step(cell.w_x(fx) + cell.w_z(fz), cell.w_h(h[0]), list(h.unbind(0)),
                       list(c.unbind(0)), None)
    return torch.stack(hs), torch.stack(cs)


@torch.inference_mode()
def sample(model: VRNN, num: int, steps: int, prefix: Tensor | None = None, mean: bool = False,
           prefix_mask: Tensor | None = None, state: State | None = None) -> Tensor:
    """Generate ``num`` sequences of ``steps`` new steps, Tensor[num, steps, x_dim].

    ``prefix`` (P, D), (1, P, D) or (num, P, D) is filtered through the posterior first and
    not included in the output. ``mean=True`` emits (and feeds back) the output
    distribution's mean instead of a draw; z_t is always drawn from the prior. ``state``
    starts from a given state instead (e.g. one returned by ``filter_prefix``).
    """
    p = next(model.parameters())
    if prefix is not None:
        prefix = torch.as_tensor(prefix, dtype=p.dtype, device=p.device)
        if prefix.dim() == 2:
            prefix = prefix.unsqueeze(0)
        if prefix.shape[0] == 1 and num > 1:
            prefix = prefix.expand(num, -1, -1)
            prefix_mask = None if prefix_mask is None else prefix_mask.expand(num, -1)
        if prefix.shape[0] != num or prefix.shape[-1] != model.cfg.x_dim:
            raise ValueError(f"prefix must be (P, {model.cfg.x_dim}), (1, P, {model.cfg.x_dim}) "
                             f"or ({num}, P, {model.cfg.x_dim}); got {tuple(prefix.shape)}")
        state = filter_prefix(model, prefix, prefix_mask)
    elif state is None:
        state = model.initial_state(num, p.device, p.dtype)
    head, out = model.head, []
    for _ in range(steps):
        top = state[0][-1]
        fz = None
        if model.cfg.latent:
            mu, std = model.prior_params(top)
            fz = model.phi_z(mu + std * torch.randn_like(mu))
            params = head(model.decoder(torch.cat([fz, top], dim=-1)))
        else:
            params = head(model.decoder(top))
        x = head.mean(params) if mean else head.sample(params)
        out.append(x)
        state = step(model, x, fz, state)
    return torch.stack(out, dim=1) if out else p.new_zeros(num, 0, model.cfg.x_dim)
