"""Training: a thin Lightning module around the model, and the trainer wiring.

The science lives in models/ and inference.py; this file only adds the engineering:
Adam, gradient-norm clipping before every optimiser step, KL warm-up and free bits, the
ELBO / IWAE / FIVO objectives, truncated BPTT with the state carried across chunks (the
same chunk schedule on every process), a NaN guard that names the term and the step,
early stopping on the validation bound, best/last checkpoints written atomically
(temporary file, then rename), TensorBoard + CSV logs that a resume appends to, DDP with
its own noise on every process.

The loss of each optimiser step is minus the bound's terms of that step's chunk, summed
over the batch, divided by the number of real steps in the whole batch (over all
processes): the chunks of a batch add up to minus its bound per real step, and no chunk
weighs more than its share of the batch's steps.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch.utils.data import DataLoader, Dataset, Sampler

from . import checkpoint
from .config import VRNNConfig
from .data import Normalizer, SequenceSet, load, pad_batch, split
from .errors import ConfigError, DataError, VRNNError
from .fast import SCAN_IMPLS, set_scan
from .inference import BOUNDS, log_likelihood, objective
from .models import build, cannot
from .options import check_instance, option
from .smc import RESAMPLERS, SCHEDULES
from .writers import write_text

# Model sizes per data kind, small enough to train on two CPU cores in minutes. The
# paper's sizes are those of `vrnn reproduce --setup paper`; pass --config to use them.
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
ACCELERATORS = ("cpu", "gpu", "cuda", "auto")
STRATEGIES = ("auto", "ddp", "ddp_spawn")
PRECISIONS = ("32-true", "bf16-mixed")


class NonFiniteLoss(VRNNError):
    """Training produced a NaN or Inf; the message says which term and which step."""


@dataclass
class TrainConfig:
    """Every training option, declared once (type, range, help, flag); see options.py."""

    lr: float = option(1e-3, "Adam learning rate", above=0.0, flag="--lr")
    batch_size: int = option(32, "sequences per batch (per process)", min=1, flag="--batch-size")
    max_epochs: int = option(50, "stop after this many epochs", min=1, flag="--max-epochs")
    max_steps: int | None = option(None, "stop at the end of the epoch in which this many optimiser "
                                         "steps are reached", min=1, flag="--max-steps")
    max_time_minutes: float | None = option(None, "wall-clock budget in minutes", above=0.0,
                                            flag="--max-time", metavar="MINUTES")
    seed: int = option(0, "seed of the initialisation, the batch order, the noise (and of the "
                          "split, unless --split-seed)", min=0, flag="--seed")
    split_seed: int | None = option(None, "seed of the train/valid/test split (default: --seed); fix "
                                          "it to compare seeds on one split", min=0, flag="--split-seed")
    grad_clip: float = option(5.0, "global gradient norm, clipped before each optimiser step",
                              above=0.0, flag="--grad-clip")
    kl_warmup_steps: int = option(0, "KL weight rises linearly 0 -> 1 over this many optimiser "
                                     "steps (0: no warm-up)", min=0, flag="--kl-warmup")
    free_bits: float = option(0.0, "nats per latent dimension per step the KL is charged at "
                                   "least (ELBO only)", min=0.0, flag="--free-bits")
    tbptt: int | None = option(None, "truncated BPTT: chunks of this many steps, the state "
                                     "carried across", min=1, flag="--tbptt")
    patience: int = option(10, "early stopping: epochs without a better validation bound",
                           min=1, flag="--patience")
    bucket: bool | None = option(None, "length-bucketed batches (default: when lengths vary a lot)")
    scan: str = option("fused", "the VRNN's time loop: fused (hand-written backward), autograd, or "
                                "stepwise (every network inside the loop, as the public "
                                "implementations: for comparisons)", choices=SCAN_IMPLS)
    objective: str = option("elbo", "the bound trained on: elbo, iwae or fivo (with --particles)",
                            choices=BOUNDS, flag="--objective")
    particles: int = option(1, "samples (IWAE) or particles (FIVO) per sequence", min=1,
                            flag="--particles")
    resample: str = option("ess", "FIVO: resample when the ESS is low (ess), always, or never",
                           choices=SCHEDULES, flag="--resample")
    ess_threshold: float = option(0.5, "FIVO: resample when the ESS falls below this fraction of "
                                       "the particles", above=0.0, max=1.0, flag="--ess-threshold")
    resampler: str = option("systematic", "FIVO: how ancestors are drawn", choices=RESAMPLERS,
                            flag="--resampler")
    fractions: tuple[float, ...] = option((0.8, 0.1, 0.1), "train / valid / test fractions", min=0.0,
                                          length=3)
    devices: int = option(1, "devices (processes) per node", min=1, flag="--devices")
    accelerator: str = option("cpu", "where to train", choices=ACCELERATORS, flag="--accelerator")
    strategy: str = option("auto", "ddp for several processes", choices=STRATEGIES, flag="--strategy")
    num_nodes: int = option(1, "machines (under torchrun or SLURM)", min=1, flag="--num-nodes")
    precision: str = option("32-true", "32-true, or bf16-mixed (bf16 matmuls; float32 weights, "
                                       "state, KL and log-probabilities). fp16 (16-mixed) is not "
                                       "offered: it needs loss scaling, which this trainer's "
                                       "manual optimisation does not do", choices=PRECISIONS,
                            flag="--precision")
    limit_train_batches: int | None = option(None, "at most this many batches per epoch (quick "
                                                   "checks)", min=1, flag="--limit-train-batches")

    def __post_init__(self):
        check_instance(self)
        if sum(self.fractions) <= 0:
            raise ConfigError(f"fractions must have a positive sum, got {list(self.fractions)}")
        if self.accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--accelerator {self.accelerator}: no CUDA device is available here")
        if self.objective == "iwae" and self.particles > 1 and self.tbptt:
            raise ConfigError("--objective iwae weighs whole sequences and cannot be cut by --tbptt; "
                              "use --objective fivo, which resamples at each chunk's end")
        if self.scan == "stepwise" and self.particles > 1:
            raise ConfigError("scan 'stepwise' (every network in the loop, for comparisons) runs one "
                              "sample per sequence; use --particles 1 or scan 'fused'")
        if self.objective != "elbo" and self.particles > 1 and self.free_bits > 0:
            raise ConfigError(f"--free-bits applies to the ELBO's KL term, not to --objective "
                              f"{self.objective} (use --kl-warmup to temper it)")
        if self.strategy == "auto" and self.devices * self.num_nodes > 1:
            self.strategy = "ddp"


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
    try:
        splits = split(len(data), fractions, seed)
    except DataError as exc:
        raise DataError(f"{spec}: {exc}") from None
    normalizer = Normalizer.for_kind(data.kind, data.meta, [data.sequences[i] for i in splits["train"]])
    return Prepared(data, splits, normalizer)


class SequenceDataset(Dataset):
    def __init__(self, sequences):
        self.sequences = sequences

    def __len__(self):
        return len(self.sequences)

    def __getitem__(self, i):
        return self.sequences[i]


def _world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


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
        return -(-len(self._batches()) // _world()[1])

    def __iter__(self):
        batches = self._batches()
        rank, world = _world()
        need = -(-len(batches) // world) * world  # every process gets as many (cycled)
        if batches and need > len(batches):
            batches = (batches * -(-need // len(batches)))[:need]
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
    """The preset ``model_name`` sized for the data kind, with the head the data needs:
    Bernoulli for piano-rolls, pen strokes for pen data; under ``output="ar"`` the bits of
    the data (all of a piano-roll, the pen bit) are its binary dimensions."""
    fields = dict(KIND_DEFAULTS.get(data.kind, KIND_DEFAULTS["array"]))
    if data.kind == "pianoroll":
        fields["output"] = "bernoulli"
    elif data.kind == "handwriting" and data.meta.get("pen"):
        fields["output"] = "strokes"
    fields.update(overrides or {})
    if fields.get("output") == "ar" and "binary_dims" not in (overrides or {}):
        if data.kind == "pianoroll":
            fields["binary_dims"] = tuple(range(data.dim))
        elif data.kind == "handwriting" and data.meta.get("pen"):
            fields["binary_dims"] = (0,)
    return VRNNConfig.preset(model_name, x_dim=data.dim, **fields)


# --------------------------------------------------------------------------- module
def nonfinite_report(tr, step: int, sequences: int) -> str | None:
    """Which term went NaN/Inf first, at which time step of which sequence; None if finite."""
    for term, values in (("log p(x_t)", tr.log_px), ("KL", tr.kl)):
        bad = ~torch.isfinite(values)
        if bad.any():
            r, t = (int(v) for v in bad.nonzero()[0])
            who = f"sequence {r % sequences}" + (f" (particle {r // sequences})" if values.shape[0] > sequences else "")
            return (f"non-finite {term} ({float(values[r, t].detach())}) at optimiser step {step}, "
                    f"time step {t} of {who} in the batch")
    return None


def noise_seed(seed: int, rank: int, step: int, phase: int = 0) -> int:
    """The seed of the noise of one optimiser step (or validation batch) on one process:
    every process draws its own noise, and a resumed run draws what the uninterrupted run
    would have."""
    return ((((seed * 1_000_003) + rank) * 4 + phase) * 1_000_000_007 + step) % (2 ** 63)


def _all_reduce(t: torch.Tensor, op) -> torch.Tensor:
    if _world()[1] > 1:
        torch.distributed.all_reduce(t, op=op)
    return t


class VRNNModule(L.LightningModule):
    """Adam on minus the chosen bound; manual optimisation so that clipping and TBPTT are explicit."""

    def __init__(self, config: dict, train: dict, vrnn_meta: dict | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.model = set_scan(build(VRNNConfig.from_dict(config)), train.get("scan", "fused"))
        self.tc = train
        self.vrnn_meta = vrnn_meta or {}
        self.automatic_optimization = False

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.tc["lr"])

    def kl_weight(self) -> float:
        warm = self.tc.get("kl_warmup_steps", 0)
        return 1.0 if not warm else min(1.0, (self.global_step + 1) / warm)

    def _objective(self, x, mask, state=None, normaliser=None, continues=None, kl_weight=1.0,
                   free_bits=0.0):
        tc = self.tc
        return objective(self.model, x, mask, state, kl_weight=kl_weight, free_bits=free_bits,
                         bound=tc.get("objective", "elbo"), num_samples=tc.get("particles", 1),
                         normaliser=normaliser, continues=continues, resample=tc.get("resample", "ess"),
                         threshold=tc.get("ess_threshold", 0.5), resampler=tc.get("resampler", "systematic"))

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, mask = batch
        B = x.shape[0]
        # every process runs the same chunk schedule and divides by the whole batch's steps
        stats = _all_reduce(torch.tensor([float(x.shape[1])], device=x.device), torch.distributed.ReduceOp.MAX)
        steps = _all_reduce(mask.sum().detach().reshape(1), torch.distributed.ReduceOp.SUM)
        world = _world()[1]
        normaliser = steps.clamp(min=1.0) / world  # DDP averages the processes' gradients
        L_ = self.tc.get("tbptt") or int(stats)
        chunks = max(1, math.ceil(int(stats) / L_))
        if chunks * L_ > x.shape[1]:  # pad to the common schedule (padding-only chunks still step)
            pad = chunks * L_ - x.shape[1]
            x = torch.cat([x, x.new_zeros(B, pad, x.shape[2])], 1)
            mask = torch.cat([mask, mask.new_zeros(B, pad)], 1)
        fivo = self.tc.get("objective") == "fivo" and self.tc.get("particles", 1) > 1
        state, total_bound, total_kl = None, 0.0, 0.0
        for c in range(chunks):
            xc, mc = x[:, c * L_:(c + 1) * L_], mask[:, c * L_:(c + 1) * L_]
            continues = (mask[:, (c + 1) * L_:].sum(1) > 0) if fivo and c + 1 < chunks else None
            torch.manual_seed(noise_seed(self.tc["seed"], self.global_rank, self.global_step))
            loss, tr = self._objective(xc, mc, state, normaliser, continues, self.kl_weight(),
                                       self.tc.get("free_bits", 0.0))
            if not torch.isfinite(loss):
                self._stop(nonfinite_report(tr, self.global_step, B)
                           or f"non-finite loss at optimiser step {self.global_step}")
            opt.zero_grad(set_to_none=True)
            self.manual_backward(loss)
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), self.tc["grad_clip"])
            if not torch.isfinite(norm):
                self._stop(f"non-finite gradient norm at optimiser step {self.global_step} "
                           f"(loss {float(loss):.4g} was finite)")
            opt.step()
            state = tuple(s.detach() for s in tr.state)
            total_bound += float(tr.bound.sum())
            total_kl += float(tr.kl.detach().sum()) * B / tr.kl.shape[0]
        real = float(mask.sum())
        self.log("train/bound", total_bound / B, on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        self.log("train/kl", total_kl / B, on_step=False, on_epoch=True, batch_size=B, sync_dist=True)
        self.log("train/nats_per_step", total_bound / max(real, 1.0), on_step=True, on_epoch=False,
                 prog_bar=True, batch_size=B)

    def validation_step(self, batch, batch_idx):
        x, mask = batch
        B = x.shape[0]
        torch.manual_seed(noise_seed(self.tc["seed"], self.global_rank, batch_idx, phase=1))
        tr = self.model(x, mask)
        self.log("valid/elbo", float((tr.log_px - tr.kl).sum()) / B, on_epoch=True, batch_size=B,
                 sync_dist=True)
        self.log("valid/kl", float(tr.kl.sum()) / B, on_epoch=True, batch_size=B, sync_dist=True)
        bound, K = (tr.log_px - tr.kl).sum(1), self.tc.get("particles", 1)
        if self.tc.get("objective", "elbo") != "elbo" and K > 1 and self.model.latent:
            # the bound trained on, with K particles: IWAE is IS with K samples; FIVO's log Z
            # needs only the filter (no gradients, so no second, batched pass)
            method = "is" if self.tc["objective"] == "iwae" else "smc"
            bound = log_likelihood(self.model, x, mask, K, method=method, resample=self.tc.get("resample", "ess"),
                                   threshold=self.tc.get("ess_threshold", 0.5),
                                   resampler=self.tc.get("resampler", "systematic"))
        self.log("valid/bound", float(bound.sum()) / B, on_epoch=True, batch_size=B, prog_bar=True,
                 sync_dist=True)

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


class StepCap(L.Callback):
    """``max_steps`` ends training at the end of the epoch in which the optimiser step count
    reaches it, so that the last steps are validated and checkpointed like every epoch."""

    def __init__(self, max_steps: int | None):
        self.max_steps = max_steps

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self.max_steps is not None and trainer.global_step >= self.max_steps:
            trainer.should_stop = True


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, but through a temporary file and a rename, and read
    back with ``weights_only=True``; a failed write (a full disk) is one clear error."""

    def save_checkpoint(self, checkpoint_dict, path, storage_options=None):
        try:
            checkpoint.atomic_save(checkpoint_dict, path)
        except OSError as exc:
            raise VRNNError(f"{path}: cannot write the checkpoint ({exc.strerror or exc})") from None

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        return checkpoint.read(path)


class _AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer, but a resumed run appends to OUT/logs/csv/metrics.csv
    instead of deleting it (Lightning removes an existing file when the writer starts)."""

    def _check_log_dir_exists(self) -> None:
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                header = f.readline().strip()
            self.metrics_keys = [k for k in header.split(",") if k]


class AppendingCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> _ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment


# --------------------------------------------------------------------------- wiring
def default_threads() -> int:
    """Intra-op threads for CPU training: 1 (measured: small recurrent models run faster and
    degrade far less under load with one thread; see README "Threads")."""
    return int(os.environ.get("VRNN_THREADS", "1"))


RUN_FILES = ("best.ckpt", "last.ckpt", "logs")


def _check_out(out: Path, resume: bool) -> None:
    """``out`` can be written, and holds no earlier run unless resuming it."""
    if not resume:
        held = [name for name in RUN_FILES if (out / name).exists()]
        if held:
            raise ConfigError(f"{out}: already holds a training run ({', '.join(held)}); pass --resume "
                              "to continue it or choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".vrnn-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{out}: cannot write here ({exc.strerror or exc})") from None


def fit(spec: str, model_name: str, out: str | Path, tc: TrainConfig,
        model_overrides: dict | None = None, data_opts: dict | None = None,
        resume: bool = False, progress: bool = True, prepared: Prepared | None = None):
    """Train one model; returns (trainer, module, prepared). Writes into ``out``:
    best.ckpt, last.ckpt, logs/ (TensorBoard + CSV metrics)."""
    out = Path(out)
    L.seed_everything(tc.seed, verbose=False)
    split_seed = tc.seed if tc.split_seed is None else tc.split_seed
    prepared = prepared or prepare(spec, split_seed, tc.fractions, **(data_opts or {}))
    try:
        cfg = model_config(model_name, prepared.data, model_overrides)
    except TypeError as exc:
        raise ConfigError(f"bad model option: {exc}") from None
    for verb, flag, used in (("smc", "--objective fivo", tc.objective == "fivo"), ("tbptt", "--tbptt", tc.tbptt),
                             ("free_bits", "--free-bits", tc.free_bits > 0)):
        if used and cannot(cfg, verb):
            raise ConfigError(f"{flag}: {cannot(cfg, verb)}")
    last = out / "last.ckpt"
    if resume:
        old = checkpoint.read(last)["vrnn"]["config"]  # one-line error if missing or broken
        if VRNNConfig.from_dict(old, f"{last}") != cfg:
            raise ConfigError(f"{last}: was trained with another model configuration; "
                              "use a new --out or the same options")
    _check_out(out, resume)
    meta = {"format": checkpoint.FORMAT, "config": cfg.to_dict(),
            "normalizer": prepared.normalizer.state_dict(),
            "data": prepared.description(spec, split_seed, tc.fractions, data_opts),
            "train": asdict(tc)}
    meta["train"]["fractions"] = list(tc.fractions)
    module = VRNNModule(cfg.to_dict(), meta["train"], {"ckpt": meta, "out": str(out)})
    train_dl = loader(prepared.sequences("train"), tc.batch_size, tc.seed, shuffle=True, bucket=tc.bucket)
    valid_dl = loader(prepared.sequences("valid"), tc.batch_size, bucket=tc.bucket)
    callbacks = [  # best on the validation bound; last after every epoch, for --resume
        ModelCheckpoint(dirpath=out, filename="best", monitor="valid/bound", mode="max",
                        save_top_k=1, enable_version_counter=False),
        ModelCheckpoint(dirpath=out, filename="last", save_top_k=1, enable_version_counter=False),
        EarlyStopping(monitor="valid/bound", mode="max", patience=tc.patience,
                      check_on_train_epoch_end=False),
        StepCap(tc.max_steps),
    ]
    logs = out / "logs"
    trainer = L.Trainer(
        max_epochs=tc.max_epochs,
        max_time=None if tc.max_time_minutes is None else {"minutes": tc.max_time_minutes},
        accelerator=tc.accelerator, devices=tc.devices, strategy=tc.strategy,
        num_nodes=tc.num_nodes, precision=tc.precision,
        logger=[AppendingCSVLogger(logs, name="csv", version=""),
                TensorBoardLogger(logs, name="tb", version="")],
        callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=progress, enable_model_summary=False, log_every_n_steps=1,
        limit_train_batches=tc.limit_train_batches, use_distributed_sampler=False,
    )
    t0 = time.time()
    trainer.fit(module, train_dl, valid_dl, ckpt_path=str(last) if resume else None)
    if trainer.global_rank == 0:
        if not last.exists():
            raise VRNNError(f"{out}: no checkpoint was written: training stopped before its first "
                            "epoch ended (is --max-time or --max-steps too small?)")
        write_summary(out, trainer, tc, time.time() - t0)
    return trainer, module, prepared


def write_summary(out: Path, trainer, tc: TrainConfig, seconds: float) -> dict:
    """OUT/summary.json: how the run ended (``stopped``: "early" when the validation bound
    stopped improving for ``patience`` epochs, else "steps", "epochs" or "time", the cap
    that ended it), its optimiser steps, epochs, seconds (added up over resumes) and best
    validation bound."""
    path = out / "summary.json"
    before = json.loads(path.read_text()) if path.exists() else {}
    early = next(c for c in trainer.callbacks if isinstance(c, EarlyStopping))
    if early.stopped_epoch > 0:
        stopped = "early"
    elif tc.max_steps is not None and trainer.global_step >= tc.max_steps:
        stopped = "steps"
    elif trainer.current_epoch >= tc.max_epochs:
        stopped = "epochs"
    else:
        stopped = "time"
    best = trainer.checkpoint_callback.best_model_score
    summary = {"stopped": stopped, "converged": stopped == "early", "steps": int(trainer.global_step),
               "epochs": int(trainer.current_epoch),
               "seconds": round(before.get("seconds", 0.0) + seconds, 1),
               "best_valid_bound": None if best is None else float(best),
               "objective": tc.objective, "particles": tc.particles}
    write_text(path, json.dumps(summary, indent=1) + "\n")
    return summary


def best_checkpoint(out: str | Path) -> Path:
    out = Path(out)
    best = out / "best.ckpt"
    return best if best.exists() else out / "last.ckpt"
