"""The training loop: a model and datasets in, a trained model and per-epoch metrics out. No files.

AdamW with weight decay grouped by each method's official rule (`AdapterMethod.no_weight_decay`); the
learning rate warms up linearly from `warmup_lr` to `lr`, then follows a cosine to `min_lr`, per step.
Batches are global: batch b of an epoch is the same set of images whatever the number of processes,
so a DDP run takes the same steps as one process with the same global batch. `Trainer.state_dict()`
is everything a resumed run needs (adapter, optimizer, RNG, counters, history); where it is stored is
the caller's business (the train stage keeps it in RUN/train/last.ckpt).
"""

from __future__ import annotations

import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from vitfold.errors import VitfoldError
from vitfold.pipeline.adapters import get_method
from vitfold.pipeline.adapting import adapter_record, adapter_state_dict, load_adapter, trainable_named_parameters
from vitfold.pipeline.config import TrainConfig

METRIC_FIELDS = ("epoch", "train_loss", "train_acc", "eval_loss", "eval_acc", "lr", "img_per_s", "seconds")


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device: str) -> Dist:
    """One process, or DDP under torchrun (WORLD_SIZE > 1): gloo on CPU, nccl on CUDA."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device == "cuda" and not torch.cuda.is_available():
        raise VitfoldError("--device cuda: no CUDA GPU is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist(device=torch.device("cuda" if use_cuda else "cpu"))
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
    return Dist(rank, world, torch.device("cuda", local) if use_cuda else torch.device("cpu"))


class GlobalBatchSampler(Sampler[list[int]]):
    """Seeded per-epoch permutation cut into global batches (last partial batch dropped); each process
    takes its contiguous share of every global batch."""

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist) -> None:
        if batch_size % d.world:
            raise VitfoldError(f"batch size {batch_size} is not divisible by the {d.world} processes")
        if n < batch_size:
            raise VitfoldError(f"the training split has {n} images, fewer than one batch of {batch_size}")
        self.n, self.batch_size, self.seed, self.d, self.epoch = n, batch_size, seed, d, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n // self.batch_size

    def __iter__(self) -> Iterator[list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        share = self.batch_size // self.d.world
        for b in range(len(self)):
            start = b * self.batch_size + self.d.rank * share
            yield order[start : start + share]


def lr_at(step: int, total: int, steps_per_epoch: int, tc: TrainConfig) -> float:
    """Linear warm-up from warmup_lr to lr over warmup_epochs, then cosine down to min_lr."""
    warmup = int(tc.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return tc.warmup_lr + (tc.lr - tc.warmup_lr) * step / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model: nn.Module, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable tensors, in a decayed and an undecayed group by the method's own rule
    (`AdapterMethod.no_weight_decay`, reproducing each official code's groups)."""
    exempt = get_method(adapter_record(model).method).no_weight_decay
    decay, no_decay = [], []
    for name, p in trainable_named_parameters(model):
        (no_decay if exempt(name) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=0.0)


def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, d: Dist, amp: bool) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy over the whole split."""
    model.eval()
    loss_sum, correct, count = 0.0, 0, 0
    for x, y in loader:
        x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)
        loss_sum += float(F.cross_entropy(logits.float(), y, reduction="sum"))
        correct += int((logits.argmax(-1) == y).sum())
        count += len(y)
    return loss_sum / count, correct / count


def _progress(iterable, total: int, desc: str, enabled: bool):
    """A per-epoch bar on an interactive terminal (rank 0); logs get one line per epoch instead."""
    from tqdm import tqdm

    shown = enabled and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not shown, dynamic_ncols=True)


EpochCallback = Callable[[dict[str, Any], bool], None]  # (the epoch's metrics row, best accuracy so far?)


class Trainer:
    """Fine-tunes an adapted model's trainable tensors on `train_set`, evaluating on `eval_set`.

    bf16 autocast on CUDA, fp32 elsewhere; `tc.compile` wraps the step in `torch.compile` (the weights,
    adapter state and checkpoints stay those of `model`)."""

    def __init__(
        self, model: nn.Module, tc: TrainConfig, d: Dist, train_set: Dataset, eval_set: Dataset, seed: int
    ) -> None:
        self.model, self.tc, self.d = model, tc, d
        self.amp = d.device.type == "cuda"
        self.sampler = GlobalBatchSampler(len(train_set), tc.batch_size, seed, d)
        self.loader = DataLoader(train_set, batch_sampler=self.sampler, num_workers=tc.num_workers, pin_memory=self.amp)
        self.eval_loader = DataLoader(eval_set, batch_size=max(1, tc.batch_size // d.world), num_workers=tc.num_workers)
        net = nn.parallel.DistributedDataParallel(model) if d.world > 1 else model
        self.net = torch.compile(net) if tc.compile else net
        self.optimizer = make_optimizer(model, tc.weight_decay)
        self.epoch, self.step, self.best_acc = 0, 0, -1.0
        self.history: list[dict[str, Any]] = []

    def state_dict(self) -> dict[str, Any]:
        """Counters, metrics history, adapter and optimizer state and the RNG: all a resume needs."""
        return {
            "epoch": self.epoch,
            "step": self.step,
            "best_acc": self.best_acc,
            "history": self.history,
            "adapter": adapter_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "rng": _rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_adapter(self.model, state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.epoch, self.step, self.best_acc = state["epoch"], state["step"], state["best_acc"]
        self.history = list(state["history"])

    def fit(self, on_epoch: EpochCallback | None = None, eval_name: str = "eval", log=print) -> dict[str, Any]:
        """Train from `self.epoch` to `tc.epochs`; returns the last epoch's row and the best accuracy."""
        tc, d = self.tc, self.d
        total_steps = tc.epochs * len(self.sampler)
        for epoch in range(self.epoch, tc.epochs):
            row = self._train_epoch(epoch, total_steps)
            if (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs:
                eval_loss, eval_acc = evaluate(self.model, self.eval_loader, d, self.amp)
                row.update(eval_loss=round(eval_loss, 6), eval_acc=round(eval_acc, 6))
            improved = row["eval_acc"] != "" and row["eval_acc"] > self.best_acc
            if improved:
                self.best_acc = row["eval_acc"]
            self.history.append(row)
            self.epoch = epoch + 1
            if on_epoch is not None:
                on_epoch(row, improved)
            if d.main:
                log(
                    f"epoch {epoch + 1}/{tc.epochs}: train loss {row['train_loss']:.4f} acc {row['train_acc']:.3f}"
                    + (f", {eval_name} acc {row['eval_acc']:.3f}" if row["eval_acc"] != "" else "")
                    + f", {row['img_per_s']:.0f} img/s"
                )
        return {**self.history[-1], "best_acc": self.best_acc}

    def _train_epoch(self, epoch: int, total_steps: int) -> dict[str, Any]:
        tc, d = self.tc, self.d
        self.sampler.set_epoch(epoch)
        self.net.train()
        loss_sum, correct, seen, started, lr = 0.0, 0, 0, time.perf_counter(), 0.0
        bar = _progress(self.loader, len(self.sampler), f"epoch {epoch + 1}/{tc.epochs}", d.main)
        for x, y in bar:
            lr = lr_at(self.step, total_steps, len(self.sampler), tc)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            x, y = x.to(d.device, non_blocking=True), y.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=torch.bfloat16, enabled=self.amp):
                logits = self.net(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=tc.label_smoothing)
            value = loss.item()
            if not math.isfinite(value):  # stop before a NaN step reaches the adapter
                raise VitfoldError(
                    f"training diverged: loss {value} at epoch {epoch + 1}, step {self.step + 1} (lr {lr:.3g}); "
                    "lower the learning rate or check the data and the adapter options"
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.step += 1
            loss_sum += value * len(y)
            correct += int((logits.argmax(-1) == y).sum())
            seen += len(y)
            rate = seen * d.world / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}", img_s=f"{rate:.0f}")
        seconds = time.perf_counter() - started
        return {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum / seen, 6),
            "train_acc": round(correct / seen, 6),
            "eval_loss": "",
            "eval_acc": "",
            "lr": lr,
            "img_per_s": round(seen * d.world / seconds, 2),
            "seconds": round(seconds, 3),
        }
