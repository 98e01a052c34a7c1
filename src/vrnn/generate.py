"""Generation: free sampling from the prior, and continuation of a prefix.

Each model's ``generate_step`` draws z_t from its prior, x_t from its output head, and
advances its state with x_t (VRNN: z_t ~ prior(h_{t-1}), x_t ~ head(phi_dec(phi_z(z_t),
h_{t-1})), h_t = f(phi_x(x_t), phi_z(z_t), h_{t-1}); SRNN: z_t ~ prior(z_{t-1}, d_t),
x_t ~ head(phi_dec(z_t, d_t)), d_{t+1} = f(d_t, phi_x(x_t)); RNN: x_t ~ head(phi_dec(h_{t-1}))).
A prefix is first filtered through the posterior (the same pass as training), and
generation continues from its final state. A model that cannot generate online (the
non-causal RVAE) draws whole sequences with its ``generate_sequence`` and refuses a
prefix. Everything runs under ``torch.inference_mode``.
"""

from __future__ import annotations

from time import monotonic

import torch
from torch import Tensor

from .models import SequenceModel, State
from .models.base import provides


@torch.inference_mode()
def filter_prefix(model: SequenceModel, prefix: Tensor, mask: Tensor | None = None,
                  noise: Tensor | None = None) -> State:
    """The state after reading ``prefix`` (B, P, D) with the posterior (one z draw per step)."""
    return model(prefix, mask, noise=noise).state


@provides("sample")
@torch.inference_mode()
def sample(model: SequenceModel, num: int, steps: int, prefix: Tensor | None = None, mean: bool = False,
           prefix_mask: Tensor | None = None, state: State | None = None, progress=None) -> Tensor:
    """Generate ``num`` sequences of ``steps`` new steps, Tensor[num, steps, x_dim].

    ``prefix`` (P, D), (1, P, D) or (num, P, D) is filtered through the posterior first and
    not included in the output. ``mean=True`` emits (and feeds back) the output head's
    ``point`` instead of a draw: the mean of continuous outputs, the most likely value of
    bits (piano-roll notes, pen lifts); z_t is always drawn from the prior. ``state``
    starts from a given state instead (e.g. one returned by ``filter_prefix``).
    ``progress(done, steps)``, if given, is called about every 10 seconds.
    """
    for name, value in (("num", num), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name == "num" else 0):
            raise ValueError(f"{name} must be an integer >= {1 if name == 'num' else 0}, got {value!r}")
    p = next(model.parameters())
    if prefix is not None:
        model.refuse("prefix")
        prefix = torch.as_tensor(prefix, dtype=p.dtype, device=p.device)
        if prefix.dim() == 2:
            prefix = prefix.unsqueeze(0)
        if prefix.shape[0] == 1 and num > 1:
            prefix = prefix.expand(num, -1, -1)
            prefix_mask = None if prefix_mask is None else prefix_mask.expand(num, -1)
        if prefix.dim() != 3 or prefix.shape[0] != num or prefix.shape[-1] != model.cfg.x_dim:
            raise ValueError(f"prefix must be (P, {model.cfg.x_dim}), (1, P, {model.cfg.x_dim}) "
                             f"or ({num}, P, {model.cfg.x_dim}); got {tuple(prefix.shape)}")
        state = filter_prefix(model, prefix, prefix_mask)
    elif state is None:
        if model.cannot(model.cfg, "online"):  # a whole sequence at once (the non-causal RVAE)
            return model.generate_sequence(num, steps, mean) if steps else p.new_zeros(num, 0, model.cfg.x_dim)
        state = model.initial_state(num, p.device, p.dtype)
    out, said = [], monotonic()
    for t in range(steps):
        x, state = model.generate_step(state, mean)
        out.append(x)
        if progress is not None and t % 64 == 63 and monotonic() - said >= 10.0:
            progress(t + 1, steps)
            said = monotonic()
    return torch.stack(out, dim=1) if out else p.new_zeros(num, 0, model.cfg.x_dim)
