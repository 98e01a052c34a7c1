"""Training: a thin Lightning module around the model, and the trainer wiring.

The science lives in model.py / inference.py; this file only adds the engineering:
Adam, gradient-norm clipping before every optimiser step, KL warm-up and free bits,
truncated BPTT with the state carried across chunks, a NaN guard that names the term and
the step, early stopping on the validation bound, best/last checkpoints written
atomically (temporary file, then rename), TensorBoard + CSV logs, resume, DDP.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, Sampler

from . import checkpoint
from .config import VRNNConfig
from .data import Normalizer, SequenceSet, load, pad_batch, split, tbptt_chunks
from .errors import ConfigError, VRNNError
from .fast import set_scan
from .inference import objective
from .model import VRNN

# Model sizes per data kind, small enough to train on two CPU cores in minutes.
# The paper's sizes are in docs/paper.md; pass --config to use them.
KIND_DEFAULTS: dict[str, dict] = {
    "handwriting": dict(h_dim=128, z_dim=16, phi_x_dim=64, phi_z_dim=64, enc_dim=64,
                        prior_dim=64, dec_dim=64),
    "speech": dict(h_dim=256, z_dim=64, phi_x_layers=2, phi_z_layers=2, enc_layers=2,
                   prior_layers=2, dec_layers=2),
    "pianoroll": dict(h_dim=128, z_dim=16, phi_x_dim=64, phi_z_dim=64, enc_dim=64,
                      prior_dim=64, dec_dim=64),
    "array": dict(h_dim=128, z_dim=16, phi_x_dim=64, phi_z_dim=64, enc_dim=64,
                  prior_dim=64, dec_dim=64),
}


class NonFiniteLoss(VRNNError):
    """Training produced a NaN or Inf; the message says which term and which step."""


@dataclass
class TrainConfig:
    lr: float = 1e-3
    batch_size: int = 32
    max_epochs: int = 50
    max_time_minutes: float | None = None
    seed: int = 0
    grad_clip: float = 5.0          # global gradient norm, clipped before each Adam step
    kl_warmup_steps: int = 0        # linear KL weight 0 -> 1 over this many optimiser steps
    free_bits: float = 0.0          # nats per latent dimension per step
    tbptt: int | None = None        # chunk length for truncated BPTT (state carried)
    patience: int = 10              # early stopping on the validation bound
    bucket: bool | None = None      # length-bucketed batches (None: when lengths vary a lot)
    scan: str = "fused"             # the VRNN's time loop: "fused" (vrnn.fast) or "autograd"
    fractions: tuple = (0.8, 0.1, 0.1)
    devices: int | str = 1
    accelerator: str = "cpu"
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    limit_train_batches: int | float | None = None


# ----------------------------------------------------------------------------- data
@dataclass
class Prepared:
    """A dataset cut into seeded, disjoint splits, normalised with training statistics."""

    data: SequenceSet
    splits: dict
    normalizer: Normalizer

    def sequences(self, which: str) -> list[np.ndarray]:
        idx = range(len(self.data)) if which == "all" else self.splits[which]
        return [self.normalizer.apply(self.data.sequences[i]) for i in idx]

    def description(self, spec: str, seed: int, fractions, load_opts: dict | None = None) -> dict:
        return {"spec": spec, "load_opts": dict(load_opts or {}), "name": self.data.name, "kind": self.data.kind,
                "meta": _plain(self.data.meta), "dim": self.data.dim, "split_seed": seed,
                "median_length": int(np.median(self.data.lengths)),
                "fractions": [float(f) for f in fractions]}


def _plain(meta: dict) -> dict:
    """Only the JSON-able scalars of meta (long per-sequence lists stay out of checkpoints)."""
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}


def prepare(spec: str, seed: int = 0, fractions=(0.8, 0.1, 0.1), data: SequenceSet | None = None,
            **load_opts) -> Prepared:
    data = data if data is not None else load(spec, **load_opts)
    splits = split(len(data), fractions, seed)
    normalizer = Normalizer.for_kind(data.kind, data.meta, [data.sequences[i] for i in splits["train"]])
    return Prepared(data, splits, normalizer)


class SequenceDataset(Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return self.sequences[i]


class EpochBatches(Sampler):
    """Batches of indices drawn from (seed, epoch), so the order is the same after a resume.

    With ``bucket`` the shuffled order is cut into windows of 1024 sequences, each sorted
    by length before it is cut into batches, and the batches are shuffled: little padding
    for variable-length data such as whole utterances. Under torch.distributed each process
    takes every world-th batch (the list padded so that all get as many); Lightning calls
    ``set_epoch`` on it directly.
    """

    WINDOW = 1024

    def __init__(self, lengths, batch_size: int, seed: int = 0, shuffle: bool = True,
                 bucket: bool = False):
        self.lengths = list(lengths)
        self.batch_size, self.seed, self.shuffle, self.bucket = batch_size, seed, shuffle, bucket
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    @staticmethod
    def _world() -> tuple[int, int]:
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1

    def _batches(self) -> list[list[int]]:
        n, g = len(self.lengths), torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
        order = torch.randperm(n, generator=g).tolist() if self.shuffle else list(range(n))
        if not self.bucket:
            return [order[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
        batches = []
        for w in range(0, n, self.WINDOW):
            window = sorted(order[w:w + self.WINDOW], key=self.lengths.__getitem__)
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __len__(self):
        return -(-len(self._batches()) // self._world()[1])

    def __iter__(self):
        batches = self._batches()
        rank, world = self._world()
        batches += batches[: -(-len(batches) // world) * world - len(batches)]
        return iter(batches[rank::world])


def loader(sequences, batch_size: int, seed: int = 0, shuffle: bool = False,
           bucket: bool | None = None) -> DataLoader:
    """Padded batches with masks; ``bucket=None`` buckets by length when lengths vary a lot."""
    lengths = [len(s) for s in sequences]
    if bucket is None:
        bucket = max(lengths) > 2 * float(np.median(lengths))
    return DataLoader(SequenceDataset(sequences), collate_fn=pad_batch,
                      batch_sampler=EpochBatches(lengths, batch_size, seed, shuffle, bucket))


def model_config(model_name: str, data: SequenceSet, overrides: dict | None = None) -> VRNNConfig:
    """The preset ``model_name`` sized for the data kind, with the head the data needs."""
    fields = dict(KIND_DEFAULTS.get(data.kind, KIND_DEFAULTS["array"]))
    if data.kind == "pianoroll":
        fields["output"] = "bernoulli"
    elif data.kind == "handwriting" and data.meta.get("pen"):
        fields["output"] = "strokes"
    fields.update(overrides or {})
    return VRNNConfig.preset(model_name, x_dim=data.dim, **fields)


# --------------------------------------------------------------------------- module
def nonfinite_report(tr, step: int) -> str | None:
    """Which term went NaN/Inf first, at which time step of which sequence; None if finite."""
    for term, values in (("log p(x_t)", tr.log_px), ("KL", tr.kl)):
        bad = ~torch.isfinite(values)
        if bad.any():
            b, t = (int(v) for v in bad.nonzero()[0])
            return (f"non-finite {term} ({float(values[b, t].detach())}) at optimiser step {step}, "
                    f"time step {t} of sequence {b} in the batch")
    return None


class VRNNModule(L.LightningModule):
    """Adam on the negative ELBO; manual optimisation so that clipping and TBPTT are explicit."""

    def __init__(self, config: dict, train: dict, vrnn_meta: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model = set_scan(VRNN(VRNNConfig.from_dict(config)), train.get("scan", "fused"))
        self.tc = train
        self.vrnn_meta = vrnn_meta or {}
        self.automatic_optimization = False

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.tc["lr"])

    def kl_weight(self) -> float:
        warm = self.tc.get("kl_warmup_steps", 0)
        return 1.0 if not warm else min(1.0, (self.global_step + 1) / warm)

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, mask = batch
        state, total_elbo, total_kl = None, 0.0, 0.0
        for xc, mc in tbptt_chunks(x, mask, self.tc.get("tbptt")):
            loss, tr = objective(self.model, xc, mc, state, kl_weight=self.kl_weight(),
                                 free_bits=self.tc.get("free_bits", 0.0))
            if not torch.isfinite(loss):
                self._stop(nonfinite_report(tr, self.global_step)
                           or f"non-finite loss at optimiser step {self.global_step}")
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.tc["grad_clip"])
            if not torch.isfinite(norm):
                self._stop(f"non-finite gradient norm at optimiser step {self.global_step} "
                           f"(loss {float(loss):.4g} was finite)")
            opt.step()
            state = tuple(s.detach() for s in tr.state)
            total_elbo += float((tr.log_px - tr.kl).detach().sum())
            total_kl += float(tr.kl.detach().sum())
        B = x.shape[0]
        self.log("train/elbo", total_elbo / B, on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        self.log("train/kl", total_kl / B, on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        self.log("train/nats_per_step", total_elbo / float(mask.sum()), on_step=True, on_epoch=False,
                 prog_bar=True, batch_size=B)

    def validation_step(self, batch, batch_idx):
        x, mask = batch
        tr = self.model(x, mask)
        B = x.shape[0]
        self.log("valid/elbo", float((tr.log_px - tr.kl).sum()) / B, on_epoch=True, batch_size=B,
                 prog_bar=True, sync_dist=True)
        self.log("valid/kl", float(tr.kl.sum()) / B, on_epoch=True, batch_size=B, sync_dist=True)

    def _stop(self, message: str):
        """Save the current (still finite, pre-step) weights, then stop with a clear message."""
        out = self.vrnn_meta.get("out")
        if out and self.global_rank == 0:
            path = Path(out) / "nonfinite-stop.ckpt"
            checkpoint.atomic_save({"state_dict": self.state_dict(), "vrnn": self.vrnn_meta["ckpt"]}, path)
            message += f"; weights before the failing step saved to {path}"
        raise NonFiniteLoss(message)

    def on_save_checkpoint(self, ckpt: dict) -> None:
        ckpt["vrnn"] = self.vrnn_meta["ckpt"]
        ckpt["vrnn_rng"] = torch.get_rng_state()

    def on_load_checkpoint(self, ckpt: dict) -> None:
        if "vrnn_rng" in ckpt:
            torch.set_rng_state(ckpt["vrnn_rng"])


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file and a rename, and read
    back with ``weights_only=True``."""

    def save_checkpoint(self, checkpoint_dict, path, storage_options=None):
        checkpoint.atomic_save(checkpoint_dict, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return checkpoint.read(path)


# --------------------------------------------------------------------------- wiring
def default_threads() -> int:
    """Intra-op threads for CPU training: 1 (measured: small recurrent models run faster and
    degrade far less under load with one thread; see README "Threads")."""
    return int(os.environ.get("VRNN_THREADS", "1"))


def fit(spec: str, model_name: str, out: str | Path, tc: TrainConfig,
        model_overrides: dict | None = None, data_opts: dict | None = None,
        resume: bool = False, progress: bool = True, prepared: Prepared | None = None):
    """Train one model; returns (trainer, module, prepared). Writes into ``out``:
    best.ckpt, last.ckpt, logs/ (TensorBoard + CSV metrics)."""
    out = Path(out)
    L.seed_everything(tc.seed, verbose=False)
    prepared = prepared or prepare(spec, tc.seed, tc.fractions, **(data_opts or {}))
    try:
        cfg = model_config(model_name, prepared.data, model_overrides)
    except TypeError as exc:
        raise ConfigError(f"bad model option: {exc}") from None
    last = out / "last.ckpt"
    if resume:
        old = checkpoint.read(last)["vrnn"]["config"]  # one-line error if missing or broken
        if old != cfg.to_dict():
            raise ConfigError(f"{last}: was trained with another model configuration; "
                              "use a new --out or the same options")
    elif last.exists():
        raise ConfigError(f"{out}: already holds a training run; pass --resume to continue it "
                          "or choose another --out")
    meta = {"format": checkpoint.FORMAT, "config": cfg.to_dict(),
            "normalizer": prepared.normalizer.state_dict(),
            "data": prepared.description(spec, tc.seed, tc.fractions, data_opts),
            "train": asdict(tc)}
    meta["train"]["fractions"] = list(tc.fractions)
    module = VRNNModule(cfg.to_dict(), meta["train"], {"ckpt": meta, "out": str(out)})
    train_dl = loader(prepared.sequences("train"), tc.batch_size, tc.seed, shuffle=True, bucket=tc.bucket)
    valid_dl = loader(prepared.sequences("valid"), tc.batch_size, bucket=tc.bucket)
    callbacks = [  # best on the validation bound; last after every epoch, for --resume
        ModelCheckpoint(dirpath=out, filename="best", monitor="valid/elbo", mode="max",
                        save_top_k=1, enable_version_counter=False),
        ModelCheckpoint(dirpath=out, filename="last", save_top_k=1, enable_version_counter=False),
        EarlyStopping(monitor="valid/elbo", mode="max", patience=tc.patience),
    ]
    logs = out / "logs"
    trainer = L.Trainer(
        max_epochs=tc.max_epochs,
        max_time=None if tc.max_time_minutes is None else {"minutes": tc.max_time_minutes},
        accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy,
        num_nodes=tc.num_nodes, precision=tc.precision,
        logger=[CSVLogger(logs, name="csv", version=""), TensorBoardLogger(logs, name="tb", version="")],
        callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=1,
        limit_train_batches=tc.limit_train_batches, use_distributed_sampler=False,
    )
    trainer.fit(module, train_dl, valid_dl, ckpt_path=str(last) if resume else None)
    return trainer, module, prepared


def best_checkpoint(out: str | Path) -> Path:
    out = Path(out)
    best = out / "best.ckpt"
    return best if best.exists() else out / "last.ckpt"
