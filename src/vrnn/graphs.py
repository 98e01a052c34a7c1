"""A whole training step captured in a CUDA graph and replayed: no launch overhead per op.

On a GPU the VRNN's time loop launches a few dozen small kernels per step, so a batch of
short-sequence work is bound by launch latency, not by arithmetic. ``GraphedTrainStep``
records forward, loss, backward, gradient clipping and the Adam update once per input
shape into a CUDA graph and replays it for every later batch of that shape: one launch
per training step. Nothing in the step synchronises with the host (the loss stays on the
device), which is what makes it capturable.

    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=True)
    step = GraphedTrainStep(model, opt, grad_clip=5.0)
    for x, mask in batches:           # same shapes -> replays; a new shape -> a new capture
        loss = step(x, mask)          # a 0-d CUDA tensor

Requirements: CUDA, an optimiser created with ``capturable=True``, and (for the RNN rows)
no mask, whose packing reads lengths on the host. Warm-up runs before each capture leave
the model and optimiser exactly as they were.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .inference import objective


class GraphedTrainStep:
    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 5.0,
                 kl_weight: float = 1.0, free_bits: float = 0.0, warmup: int = 3):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedTrainStep needs a CUDA device")
        for group in optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError("create the optimiser with capturable=True to capture its step")
        self.model, self.opt = model, optimizer
        self.grad_clip, self.kl_weight, self.free_bits, self.warmup = grad_clip, kl_weight, free_bits, warmup
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.graphs: dict = {}

    def _step(self, x: Tensor, mask: Tensor | None) -> Tensor:
        loss, _ = objective(self.model, x, mask, kl_weight=self.kl_weight, free_bits=self.free_bits)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.opt.step()
        return loss.detach()

    def _snapshot(self):
        state = [p.detach().clone() for p in self.params]
        opt_state = {id(p): {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                     for p, s in self.opt.state.items()}
        return state, opt_state

    def _restore(self, snap) -> None:
        state, opt_state = snap
        with torch.no_grad():
            for p, v in zip(self.params, state):
                p.copy_(v)
            for p, s in self.opt.state.items():
                saved = opt_state.get(id(p))
                for k, v in s.items():
                    if saved is None:  # state created by the warm-up: back to zero
                        if torch.is_tensor(v):
                            v.zero_()
                    elif torch.is_tensor(v):
                        v.copy_(saved[k])

    def _capture(self, x: Tensor, mask: Tensor | None):
        static_x = x.clone()
        static_mask = None if mask is None else mask.clone()
        snap = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up (lazy init, allocator) off the capture
            for _ in range(self.warmup):
                self.opt.zero_grad(set_to_none=True)
                self._step(static_x, static_mask)
        torch.cuda.current_stream().wait_stream(side)
        self._restore(snap)
        graph = torch.cuda.CUDAGraph()
        self.opt.zero_grad(set_to_none=True)
        with torch.cuda.graph(graph):  # records the kernels; runs nothing
            loss = self._step(static_x, static_mask)
        return graph, static_x, static_mask, loss

    def __call__(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        key = (tuple(x.shape), x.dtype, mask is None)
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, mask)
        graph, static_x, static_mask, loss = self.graphs[key]
        static_x.copy_(x)
        if static_mask is not None:
            static_mask.copy_(mask)
        graph.replay()
        return loss
