"""Checkpoints: what a trained model needs besides its weights, loaded without unpickling code.

A vrnn checkpoint is a Lightning checkpoint with one extra entry, ``"vrnn"``::

    {"format": 1, "config": VRNNConfig.to_dict(), "normalizer": Normalizer.state_dict(),
     "data": {"spec", "load_opts", "name", "kind", "meta", "dim", "split_seed", "fractions",
              "median_length"}, "train": TrainConfig as a dict}

Every value in it is a plain type or a tensor, so ``torch.load(path, weights_only=True)``
reads it; nothing in a file a user was handed can run code.
"""

from __future__ import annotations

import errno
from pathlib import Path

import torch

from .config import VRNNConfig
from .errors import CheckpointError, ConfigError
from .files import atomic_write
from .models import build

FORMAT = 1


def read(path) -> dict:
    """The raw checkpoint dict, checked to be a vrnn checkpoint; CheckpointError otherwise."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, random bytes, a pickle with code in it, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({reason[:120]})") from None
    if not isinstance(ckpt, dict) or "vrnn" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(f"{path}: not a vrnn checkpoint (no vrnn model description in it)")
    meta = ckpt["vrnn"]
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: its vrnn entry is a {type(meta).__name__}, not a mapping")
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unsupported vrnn checkpoint format {meta.get('format')!r}")
    for key in ("config", "normalizer", "data"):
        if not isinstance(meta.get(key), dict):
            raise CheckpointError(f"{path}: its vrnn entry has no {key} mapping")
    from .data.sequences import KINDS
    data = meta["data"]
    if data.get("kind") not in KINDS:
        raise CheckpointError(f"{path}: its data description has no valid kind "
                              f"(got {data.get('kind')!r}; one of {', '.join(KINDS)})")
    seed = data.get("split_seed", 0)
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or seed < 0):
        raise CheckpointError(f"{path}: its data description's split_seed must be an integer >= 0, "
                              f"got {seed!r}")
    fr = data.get("fractions", (0.8, 0.1, 0.1))
    if (not isinstance(fr, (list, tuple)) or len(fr) != 3
            or not all(isinstance(f, (int, float)) and not isinstance(f, bool) and f >= 0 for f in fr)
            or sum(fr) <= 0):
        raise CheckpointError(f"{path}: its data description's fractions must be 3 numbers >= 0 with a "
                              f"positive sum, got {fr!r}")
    return ckpt


def model_weights(state_dict: dict) -> dict:
    """The model's own weights from a LightningModule state dict (prefix ``model.``)."""
    return {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}


def load(path, device="cpu"):
    """(model in eval mode, normalizer, data description) from a checkpoint file."""
    from .data import Normalizer

    ckpt = read(path)
    meta = ckpt["vrnn"]
    try:
        cfg = VRNNConfig.from_dict(meta["config"], f"{path}: model config")
        model = build(cfg)
        model.load_state_dict(model_weights(ckpt["state_dict"]))
        normalizer = Normalizer.from_state(meta["normalizer"])
        if normalizer.dim != cfg.x_dim:
            raise ValueError(f"its normaliser has {normalizer.dim} dimensions, the model {cfg.x_dim}")
    except (ConfigError, KeyError, RuntimeError, TypeError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0][:160]
        raise CheckpointError(f"{path}: weights do not match the model it describes ({reason})") from None
    scaled = sorted(set(cfg.discrete_dims) - set(normalizer.skip))
    if scaled:  # written before discrete columns were left alone: its scores are not probabilities
        raise CheckpointError(f"{path}: its normaliser standardised column(s) {scaled}, which its "
                              f"{cfg.output} head models as bits (a vrnn before 0.3 did so); retrain it")
    shifted = [d for d in cfg.power_dims if normalizer.mean[d] != 0]
    if shifted:  # a power minus a mean is no power: the Itakura-Saito density would be of nothing
        raise CheckpointError(f"{path}: its normaliser shifts column(s) {shifted[:5]}, which its "
                              f"{cfg.output} head models as powers")
    return model.to(device).eval(), normalizer, meta["data"]


def atomic_save(obj, path) -> None:
    """torch.save to a temporary file in the same folder, then rename: never half-written.

    The file gets the usual mode of a new file (0o666 & ~umask); see ``files.atomic_write``.
    """
    with atomic_write(path) as tmp:
        try:
            torch.save(obj, tmp)
        except RuntimeError as exc:  # torch.save reports a failed write (a full disk) this way
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise OSError(errno.EIO, f"cannot write it ({reason})", str(path)) from None
