"""Which output head a config asks for: the one module that knows every head (the
factorised ones of heads.py and the autoregressive one of autoregressive.py), so that
neither of those imports the other's kind."""

from __future__ import annotations

from .autoregressive import AutoregressiveHead
from .heads import BernoulliHead, GaussianHead, GMMHead, Head, ItakuraSaitoHead, StrokesHead


def make_head(cfg, in_dim: int) -> Head:
    """The output head ``cfg`` (a ``VRNNConfig``) asks for, reading features of ``in_dim``."""
    kind, x_dim, k, floor = cfg.output, cfg.x_dim, cfg.n_components, cfg.std_floor
    if kind == "gauss":
        return GaussianHead(in_dim, x_dim, floor)
    if kind == "gmm":
        return GMMHead(in_dim, x_dim, k, floor)
    if kind == "bernoulli":
        return BernoulliHead(in_dim, x_dim, floor)
    if kind == "strokes":
        return StrokesHead(in_dim, x_dim, k, floor)
    if kind == "is":
        return ItakuraSaitoHead(in_dim, x_dim, floor)
    if kind == "ar":
        return AutoregressiveHead(in_dim, x_dim, hidden=cfg.ar_hidden, k=k,
                                  binary_dims=tuple(cfg.binary_dims), std_floor=floor)
    raise ValueError(f"unknown output head {kind!r}; choose gauss, gmm, bernoulli, strokes, ar or is")
