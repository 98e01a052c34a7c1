"""The row layout of K samples (or particles) per sequence: K*B rows, sample-major (row
k*B + b is sample k of sequence b), and what is computed once per sequence broadcast to
them. Shared by the models and their fused time loops (fast.py, fast_srnn.py)."""

from __future__ import annotations

from torch import Tensor


def add_shared(shared: Tensor, rows: Tensor) -> Tensor:
    """shared (B, ..., D) + rows (k*B, ..., D), row k*B + b getting shared[b]; k = 1 is a
    plain sum. What does not depend on z is computed once per sequence and broadcast."""
    if shared.shape[0] == rows.shape[0]:
        return shared + rows
    return (rows.view(-1, *shared.shape) + shared).view(rows.shape)


def repeat_rows(t: Tensor, k: int, dim: int = 0) -> Tensor:
    """``t`` with its rows (on ``dim``) repeated k times, sample-major."""
    if k == 1:
        return t
    reps = [1] * t.dim()
    reps[dim] = k
    return t.repeat(*reps)
